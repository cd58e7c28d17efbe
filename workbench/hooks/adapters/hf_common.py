"""Shared logic of the Hugging Face decoder adapters (GPT-NeoX, Llama-like, Gemma, Phi).

A family adapter is a subclass of :class:`HFDecoderAdapter` naming where its modules live
(class attributes ``base``, ``layers``, ``embed``, ``norm``, ``head`` and, per decoder layer,
``attn``, ``o_proj``, ``mlp`` and ``mid_norm``). Hook sites are forward hooks on the model's own
modules, under the workbench's names:

- ``embed_out``: the token-embedding output (scaled, where the model scales it);
- ``blocks.l.resid_pre`` / ``blocks.l.resid_post``: the decoder layer's input / output;
- ``blocks.l.attn.z``: the input of the attention output projection as ``(B, T, H, D)``,
  ``H`` the number of *query* heads (grouped-query attention shares keys and values, not outputs);
- ``blocks.l.attn_out`` / ``blocks.l.mlp_out``: the attention / MLP module outputs;
- ``blocks.l.resid_mid`` (sequential blocks only): the input of the norm before the MLP,
  ``resid_pre + attn_out``; parallel blocks (:attr:`~workbench.hooks.Adapter.parallel`) have none;
- ``features``: the final-norm output.

Nothing here imports ``transformers``: the adapters only read the model they are given.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from .. import Adapter

__all__ = ["HFDecoderAdapter", "causal_lm", "resolve", "eager_patterns"]


def resolve(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b`` for ``path = "a.b"`` (``""``: ``root``)."""
    mod = root
    for part in filter(None, path.split(".")):
        mod = getattr(mod, part)
    return mod


def _names(name: str | tuple[str, ...]) -> tuple[str, ...]:
    return (name,) if isinstance(name, str) else tuple(name)


def causal_lm(model_types: tuple[str, ...], base: str, head: str | tuple[str, ...]) -> Callable[[object], bool]:
    """Predicate: a Hugging Face causal LM with ``config.model_type`` in ``model_types`` and the
    submodules ``base`` (decoder stack) and ``head`` (unembedding; a tuple: any one of these names,
    as module names changed between ``transformers`` versions)."""
    wanted = frozenset(model_types)

    def match(model) -> bool:
        cfg = getattr(model, "config", None)
        return (isinstance(model, nn.Module) and getattr(cfg, "model_type", None) in wanted
                and any(isinstance(getattr(model, h, None), nn.Module) for h in _names(head))
                and hasattr(model, base))
    match.label = "Hugging Face " + " / ".join(model_types)
    match.model_types = wanted
    return match


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def replace_output_hook(names, name, module_of, fn):
    """A forward hook on the module that writes ``name`` (``blocks.l.attn_out`` / ``blocks.l.mlp_out``)
    whose return value, ``fn(output)``, replaces that output (tuple outputs keep their other items)."""
    parts = name.split(".")
    if name not in names or len(parts) != 3 or parts[2] not in ("attn_out", "mlp_out"):
        raise KeyError(f"site {name!r} cannot be replaced: only blocks.<l>.attn_out and blocks.<l>.mlp_out")

    def hook(module, args, out):
        return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
    return module_of(int(parts[1]), parts[2]).register_forward_hook(hook)


def _set_attention(model: nn.Module, implementation) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter) and implementation is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation


@contextlib.contextmanager
def eager_patterns(model: nn.Module, modules: dict[int, nn.Module], fn):
    """Context: ``model`` runs with ``transformers``' eager attention and each attention module in
    ``modules`` (``{layer: module}``) hands its weights ``(B, H, T, T)`` to ``fn(layer, weights)``.

    Eager attention is the library's reference implementation of each family (rotary or learned
    positions, grouped-query heads, q/k norms, sliding windows, soft-capping): its weights are exactly
    the pattern the model uses, which a recomputation from q and k would have to re-derive per family.
    The weights are dropped from the module's output after ``fn`` (the decoder layer discards them), so
    one layer's pattern lives at a time. The model's attention implementation is restored on exit.
    """
    before = getattr(model.config, "_attn_implementation", None)
    _set_attention(model, "eager")
    if getattr(model.config, "_attn_implementation", None) != "eager":
        _set_attention(model, before)
        raise ValueError(f"model: {type(model).__name__} cannot switch to eager attention, so its attention "
                         "weights cannot be read")

    def hook_for(layer):
        def hook(module, args, out):
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise ValueError(f"model: the attention of layer {layer} ({type(module).__name__}) returned no "
                                 "weights under eager attention")
            fn(layer, weights)
            return (out[0], None) + tuple(out[2:])
        return hook

    handles = [module.register_forward_hook(hook_for(layer)) for layer, module in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _set_attention(model, before)


class HFDecoderAdapter(Adapter):
    """A Hugging Face decoder-only causal LM under the workbench's hook names (see the module docstring)."""

    family = "transformer"
    model_types: tuple[str, ...] = ()
    base = "model"                 # the decoder stack, from the causal LM
    layers = "layers"              # the decoder layers, from base
    embed = "embed_tokens"         # token embedding, from base
    norm = "norm"                  # final norm, from base
    head: str | tuple[str, ...] = "lm_head"   # unembedding, from the causal LM (a tuple: the first present)
    attn = "self_attn"             # per layer
    o_proj = "o_proj"              # from attn
    mlp = "mlp"                    # per layer
    mid_norm: str | None = "post_attention_layernorm"   # per layer; its input is resid_mid (sequential only)

    def __init__(self, model: nn.Module):
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if kind not in self.model_types:
            raise TypeError(f"{type(self).__name__} reads Hugging Face model_type {', '.join(self.model_types)}; "
                            f"got {type(model).__name__} (model_type {kind!r})")
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError("encoder-decoder models are not supported: the workbench reads decoder-only models")
        self.model = model
        self.stack = resolve(model, self.base)
        self.blocks = resolve(self.stack, self.layers)
        self.n_layers = len(self.blocks)
        self.n_heads = int(cfg.num_attention_heads)
        self.parallel = self._is_parallel(cfg)
        per = ["resid_pre", "attn.z", "attn_out"] + ([] if self.parallel else ["resid_mid"]) + ["mlp_out",
                                                                                               "resid_post"]
        self._names = ["embed_out"] + [f"blocks.{i}.{s}" for i in range(self.n_layers) for s in per] + ["features"]

    # ------------------------------------------------------------------ family hooks (overridden where needed)

    def _is_parallel(self, cfg) -> bool:
        return False

    def embed_scale(self) -> float | None:
        """Factor the model's forward multiplies the embedding by (``None``: none); see Gemma."""
        return None

    # ------------------------------------------------------------------ Adapter interface

    def site_names(self):
        return list(self._names)

    def _o_proj(self, layer: int) -> nn.Module:
        return resolve(resolve(self.blocks[layer], self.attn), self.o_proj)

    def add_hook(self, name, fn):
        if name not in self._names:
            raise KeyError(f"no hook site {name!r}")
        if name == "embed_out":
            scale = self.embed_scale()
            emb = resolve(self.stack, self.embed)
            if scale is None:
                return emb.register_forward_hook(lambda m, a, out: fn(out))
            return emb.register_forward_hook(lambda m, a, out: fn(out * torch.tensor(scale, dtype=out.dtype)))
        if name == "features":
            return self.final_norm().register_forward_hook(lambda m, a, out: fn(out))
        parts = name.split(".")
        layer, site = int(parts[1]), ".".join(parts[2:])
        block = self.blocks[layer]
        if site == "resid_pre":
            return block.register_forward_pre_hook(
                lambda m, args, kwargs: fn(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        if site == "resid_post":
            return block.register_forward_hook(lambda m, a, out: fn(_first(out)))
        if site == "attn_out":
            return resolve(block, self.attn).register_forward_hook(lambda m, a, out: fn(_first(out)))
        if site == "mlp_out":
            return resolve(block, self.mlp).register_forward_hook(lambda m, a, out: fn(_first(out)))
        if site == "resid_mid":
            return resolve(block, self.mid_norm).register_forward_pre_hook(lambda m, args: fn(args[0]))
        if site == "attn.z":
            H = self.n_heads

            def pre(m, args):
                z = args[0]
                fn(z.view(*z.shape[:-1], H, z.shape[-1] // H))
            return self._o_proj(layer).register_forward_pre_hook(pre)
        raise KeyError(f"no hook site {name!r}")

    def replace_hook(self, name, fn):
        """Replace site ``blocks.l.attn_out`` or ``blocks.l.mlp_out`` by ``fn(activation)`` (activation
        patching); returns a removable handle. The module's other outputs (attention weights, caches) pass."""
        return replace_output_hook(self._names, name, lambda layer, site: resolve(
            self.blocks[layer], self.attn if site == "attn_out" else self.mlp), fn)

    def forward(self, x):
        return self.model(input_ids=x).logits

    def final_norm(self):
        return resolve(self.stack, self.norm)

    def readout(self):
        head = next(getattr(self.model, h) for h in _names(self.head) if isinstance(getattr(self.model, h, None),
                                                                                    nn.Module))
        return head.weight, getattr(head, "bias", None)

    def block(self, layer):
        return self.blocks[layer]

    def watch_patterns(self, fn, layers):
        """Attention weights from ``transformers``' eager attention (:func:`eager_patterns`)."""
        return eager_patterns(self.model, {l: resolve(self.blocks[l], self.attn) for l in layers}, fn)

    def head_projection(self, layer):
        """``(H, D, C)`` from the output projection's ``(C, H * D)`` weight, and its bias (or ``None``)."""
        proj = self._o_proj(layer)
        C, HD = proj.weight.shape
        H = self.n_heads
        return proj.weight.view(C, H, HD // H).permute(1, 2, 0), proj.bias
