"""The workbench's own families (:class:`~workbench.models.Transformer`, :class:`~workbench.models.ResidualMLP`).

Hook sites are the models' :class:`~workbench.models.HookPoint` modules, plus ``blocks.{l}.attn.z``:
the per-head attention outputs ``(B, T, H, D)`` entering each block's output projection.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from ...core import models as _models
from .. import Adapter, register_adapter

__all__ = ["NativeAdapter"]


class NativeAdapter(Adapter):
    """Workbench models: hook sites are the :class:`~workbench.models.HookPoint` modules."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = model.config.family
        self.n_layers = len(model.blocks)
        self.n_heads = getattr(model.config, "n_heads", 0)
        self._points = {n: m for n, m in model.named_modules() if isinstance(m, _models.HookPoint)}
        if self.family == "transformer":
            for i, b in enumerate(model.blocks):
                self._points[f"blocks.{i}.attn.z"] = b.attn.proj

    def site_names(self):
        return list(self._points)

    def add_hook(self, name, fn):
        if name not in self._points:
            raise KeyError(f"no hook site {name!r}")
        module = self._points[name]
        if name.endswith(".attn.z"):
            H = self.n_heads

            def pre(mod, args):
                z = args[0]
                fn(z.view(*z.shape[:-1], H, z.shape[-1] // H))
            return module.register_forward_pre_hook(pre)
        return module.register_forward_hook(lambda mod, args, out: fn(out))

    def forward(self, x):
        return self.model(x)

    def final_norm(self):
        return self.model.final_norm

    def readout(self):
        r = self.model.readout
        return r.weight, r.bias

    def unembed(self, resid):
        return self.model.readout(self.model.final_norm(resid))

    def block(self, layer):
        return self.model.blocks[layer]

    @contextlib.contextmanager
    def watch_patterns(self, fn, layers):
        """The explicit attention path of the chosen blocks (:meth:`CausalSelfAttention.watch_pattern`);
        the other blocks stay on the fused path."""
        if self.family != "transformer":
            raise ValueError(f"model: a {type(self.model).__name__} has no attention (it takes vectors); attention "
                             "patterns need a Transformer")
        with contextlib.ExitStack() as stack:
            for layer in layers:
                stack.enter_context(self.model.blocks[layer].attn.watch_pattern(lambda p, layer=layer: fn(layer, p)))
            yield

    def head_projection(self, layer):
        block = self.model.blocks[layer]
        if not isinstance(block.ln1_post, nn.Identity):
            raise ValueError("a per-head decomposition needs a pre-LN model: Peri-LN normalises the attention "
                             "output, which is then not a sum of per-head terms")
        proj, s = block.attn.proj, float(block.residual_scale)
        C, H = proj.weight.shape[0], self.n_heads
        w = proj.weight.view(C, H, C // H).permute(1, 2, 0) * s  # (H, D, C)
        return w, None if proj.bias is None else proj.bias * s


register_adapter((_models.Transformer, _models.ResidualMLP), NativeAdapter,
                 name="workbench Transformer / ResidualMLP")
