"""The residual blocks and their parts: :class:`HookPoint` (the named identity sites), the norm placements
(Pre-LN, Peri-LN, none, LayerNorm Scaling), the fade-in gate every block carries as buffers, the MLP
block, causal self-attention (fused path, patterns on request) and the Transformer block.

Definitions: ``docs/definitions.md#hook-sites``, ``#fade-in``, ``#layernorm-scaling``, ``#attention-pattern``.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checks import (
    check_int,
)
from .config import MLPConfig, TransformerConfig


class HookPoint(nn.Module):
    """Identity module marking a named site of the residual computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ----------------------------------------------------------------------------- blocks


def _norm(d: int, kind: str) -> nn.Module:
    return nn.LayerNorm(d) if kind != "none" else nn.Identity()


class ScaledLayerNorm(nn.LayerNorm):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth"): ``LN(x) * depth_scale`` with
    ``depth_scale = 1 / sqrt(l)``, ``l`` the 1-based index of the block it sits in.

    ``depth_scale`` is a 0-d buffer (in the state dict, so a checkpoint keeps it) fixed when the block
    is placed: a block keeps its scale when blocks are inserted below it or removed, so growth with
    a zero block stays function preserving and removing a block equals skipping it. A block made by
    ``new_block()`` is placed by the model's ``sync_config()`` (``pending``); see
    ``docs/definitions.md#layernorm-scaling``.
    """

    def __init__(self, d: int, layer: int = 0):
        super().__init__(d)
        self.register_buffer("depth_scale", torch.tensor(1.0 / math.sqrt(layer + 1)))
        self.pending = False

    def place(self, layer: int) -> None:
        """Set ``depth_scale = 1 / sqrt(layer + 1)`` (``layer`` 0-based) and clear ``pending``."""
        self.depth_scale.fill_(1.0 / math.sqrt(layer + 1))
        self.pending = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.depth_scale


def _block_norm(d: int, kind: str, layer: int | None) -> nn.Module:
    """The norm in front of a block's sublayer: ``"lns"`` scales it by ``1/sqrt(layer + 1)``; ``layer=None``:
    not placed yet (scale of layer 0 until ``sync_config`` places it)."""
    if kind != "lns":
        return _norm(d, kind)
    norm = ScaledLayerNorm(d, layer or 0)
    norm.pending = layer is None
    return norm


# The fade-in gate of a block, as persistent buffers (so state_dict(), hence every checkpoint,
# holds them), with the values of a block that is not fading: gate 1, no ramp. A state dict
# saved before these buffers existed loads as "fully faded in".
GATE_BUFFERS = {"residual_scale": 1.0, "fade_done": 0, "fade_steps": 0}


class _GatedBlock(nn.Module):
    """A residual block whose output is scaled by a fade-in gate ``m`` (MSG-style: ``x + m f(x)``).

    Buffers (0-d): ``residual_scale`` (float, the gate ``m``), ``fade_done`` and ``fade_steps``
    (int64, the ramp's progress; ``fade_steps == 0`` means not fading). Assigning a number
    (``block.residual_scale = 0.5``) replaces the buffer by a tensor of that value on the same
    device and dtype. ``fade`` reads the ramp as ``{"steps", "done"}`` or ``None``.
    """

    def _init_gate(self) -> None:
        self.register_buffer("residual_scale", torch.ones(()))
        self.register_buffer("fade_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("fade_steps", torch.zeros((), dtype=torch.long))

    def __setattr__(self, name, value):
        if name in GATE_BUFFERS and not isinstance(value, torch.Tensor) and name in self.__dict__.get("_buffers", {}):
            old = self._buffers[name]
            kind = numbers.Real if old.dtype.is_floating_point else numbers.Integral
            if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, kind) \
                    or not math.isfinite(float(value)):
                what = "a finite number" if kind is numbers.Real else "an integer"
                raise ValueError(f"{name} must be {what}, got {value!r}")
            value = torch.tensor(value, dtype=old.dtype, device=old.device)
        super().__setattr__(name, value)

    def _gate(self, out: torch.Tensor) -> torch.Tensor:
        """``residual_scale * out``; skipped when the gate is exactly 1 (read on the CPU only: on an
        accelerator the multiply is cheaper than a host sync, and ``out * 1.0 == out`` exactly)."""
        s = self.residual_scale
        if s.device.type != "cpu" or float(s) != 1.0:
            out = out * s
        return out

    @property
    def fade(self) -> dict | None:
        """The fade-in ramp ``{"steps": total, "done": steps so far}``, or ``None`` when not fading."""
        steps = int(self.fade_steps)
        return None if steps == 0 else {"steps": steps, "done": int(self.fade_done)}

    @fade.setter
    def fade(self, value: dict | None) -> None:
        if value is None:
            self.fade_steps, self.fade_done = 0, 0
        else:
            self.fade_steps, self.fade_done = int(value["steps"]), int(value["done"])

    def start_fade(self, steps: int) -> None:
        """Gate 0 now, ramping to 1 over ``steps`` calls of :meth:`advance_fade` (one per optimizer step)."""
        steps = check_int("fade_steps", steps, 1, None)
        self.residual_scale, self.fade_steps, self.fade_done = 0.0, steps, 0

    def end_fade(self) -> None:
        """Gate 1, no ramp (what a freshly built block has)."""
        self.residual_scale, self.fade_steps, self.fade_done = 1.0, 0, 0

    def advance_fade(self, steps: int = 1) -> None:
        """Move the ramp ``steps`` optimizer steps on: ``m = done / steps``; at the end the gate is 1 and the ramp gone."""
        ramp = self.fade
        if ramp is None:
            return
        done = min(ramp["done"] + steps, ramp["steps"])
        if done >= ramp["steps"]:
            self.end_fade()
        else:
            self.residual_scale, self.fade_done = done / ramp["steps"], done

    def check_gate(self, where: str = "block") -> None:
        """Refuse gate buffers out of range (a hand-edited or foreign checkpoint)."""
        s, done, steps = float(self.residual_scale), int(self.fade_done), int(self.fade_steps)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{where}.residual_scale must be in [0, 1], got {s}")
        if steps < 0 or not 0 <= done <= steps:
            raise ValueError(f"{where}: fade_done must be in [0, fade_steps] and fade_steps >= 0, got "
                             f"fade_done={done}, fade_steps={steps}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # checkpoints written before the gate was a buffer: fully faded in (the defaults), not an error
        absent = [name for name in GATE_BUFFERS if prefix + name not in state_dict]
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
            setattr(self, name, GATE_BUFFERS[name])

    # -- family knowledge every block type provides

    def _output_paths(self) -> list[tuple[nn.Linear, nn.Module]]:
        """``(output projection, post-norm)`` of each branch that writes into the stream."""
        raise NotImplementedError

    def zero_output_(self) -> "_GatedBlock":
        """Make the block add exactly 0 to the stream (function preserving), in place; returns it.

        Pre-LN, LayerNorm Scaling (``"lns"``) and no norm: zero the output projections (weights and
        biases). Peri-LN: the
        output passes through a LayerNorm, and ``LN(0) = bias``, so zero the output norms'
        gains and biases instead (the projections keep their init so that the gains receive a
        gradient from the first step).
        """
        with torch.no_grad():
            for proj, post_norm in self._output_paths():
                if isinstance(post_norm, nn.LayerNorm):
                    post_norm.weight.zero_()
                    post_norm.bias.zero_()
                else:
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
        return self

    @property
    def mlp_in(self) -> nn.Linear:
        """The block's first MLP layer (its hidden pre-activation units; what REPAIR renormalises)."""
        raise NotImplementedError


class MLPBlock(_GatedBlock):
    """``x + s * post_norm(proj(act(fc(pre_norm(x)))))``; ``s = residual_scale`` (1 unless fading in)."""

    def __init__(self, cfg: MLPConfig, d_hidden: int | None = None, layer: int | None = None):
        super().__init__()  # d_hidden: this block's width; layer: its index (the "lns" scale)
        h = cfg.d_hidden if d_hidden is None else d_hidden
        self.pre_norm = _block_norm(cfg.d_model, cfg.norm, layer)
        self.fc = nn.Linear(cfg.d_model, h)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.proj = nn.Linear(h, cfg.d_model)
        self.post_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "peri" else nn.Identity()
        self._init_gate()  # gate m of MSG-style fade-in: x + m f(x)
        self.resid_pre, self.block_out, self.resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_model) -> (B, d_model)
        x = self.resid_pre(x)
        h = self.act(self.fc(self.pre_norm(x)))  # (B, d_hidden)
        out = self._gate(self.post_norm(self.proj(h)))
        return self.resid_post(x + self.block_out(out))

    def _output_paths(self):
        return [(self.proj, self.post_norm)]

    @property
    def mlp_in(self) -> nn.Linear:
        return self.fc

    def count_flops(self, c, rg: bool) -> bool:
        """Add this block's matrix products to the counter ``c`` (see :mod:`workbench.flops`); returns
        whether the stream after the block requires a gradient."""
        h = c.norm(self.pre_norm, rg)
        h = c.linear(self.fc, h)
        h = c.linear(self.proj, h)
        h = c.norm(self.post_norm, h)
        return rg or h


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on the fused ``scaled_dot_product_attention`` path.

    The per-head pattern ``softmax(q k^T / sqrt(D) + causal mask)`` ``(B, H, T, T)`` exists only on
    request: :meth:`pattern` recomputes it from an input, and inside :meth:`watch_pattern` the forward
    takes the explicit path (pattern, then ``pattern @ v``) and hands each pattern to a function.
    Definition: ``docs/definitions.md#attention-pattern``.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: [q; k; v], head-major inside each
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self._pattern_fns: list = []   # set by watch_pattern only; empty: the fused path

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        return tuple(t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)

    @staticmethod
    def _pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        T = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self._heads(x)
        if self._pattern_fns:   # asked for the pattern: the explicit path
            p = self._pattern(q, k)
            for fn in list(self._pattern_fns):
                out = fn(p)
                p = p if out is None else out
            y = p.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pattern ``(B, H, T, T)`` (query, key) of the input ``x`` ``(B, T, C)`` (after ``ln1``)."""
        q, k, _ = self._heads(x)
        return self._pattern(q, k)

    @contextlib.contextmanager
    def watch_pattern(self, fn):
        """While open, each forward computes the pattern explicitly and calls ``fn(pattern)`` with it
        (``(B, H, T, T)``); a tensor ``fn`` returns replaces the pattern. The fused path returns on exit."""
        self._pattern_fns.append(fn)
        try:
            yield
        finally:
            self._pattern_fns.remove(fn)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head contributions ``(B, T, H, C)`` whose sum over H plus ``proj.bias`` is ``forward(x)``."""
        B, T, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self._heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, D)
        w = self.proj.weight.view(C, H, D)  # (C_out, H, D)
        return torch.einsum("bthd,chd->bthc", y, w)


class TransformerMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None):  # d_mlp: this MLP's width
        super().__init__()
        m = cfg.d_mlp if d_mlp is None else d_mlp
        self.fc = nn.Linear(cfg.d_model, m)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new, so the Hugging Face export is exact
        self.proj = nn.Linear(m, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(_GatedBlock):
    """Pre-LN: ``x + attn(LN(x))``; Peri-LN: ``x + LN(attn(LN(x)))``; LNS: ``x + attn(LN(x) / sqrt(l))``;
    then the same for the MLP."""

    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None, layer: int | None = None):
        super().__init__()  # layer: the block's index (the "lns" scale)
        peri = cfg.norm == "peri"
        self.ln1 = _block_norm(cfg.d_model, cfg.norm, layer)  # "none": nn.Identity
        self.attn = CausalSelfAttention(cfg)
        self.ln1_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self.ln2 = _block_norm(cfg.d_model, cfg.norm, layer)
        self.mlp = TransformerMLP(cfg, d_mlp)
        self.ln2_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self._init_gate()  # gate m of MSG-style fade-in
        self.resid_pre, self.attn_out, self.resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.mlp_out, self.resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = self.resid_pre(x)
        a = self._gate(self.ln1_post(self.attn(self.ln1(x))))
        x = self.resid_mid(x + self.attn_out(a))
        m = self._gate(self.ln2_post(self.mlp(self.ln2(x))))
        return self.resid_post(x + self.mlp_out(m))

    def _output_paths(self):
        return [(self.attn.proj, self.ln1_post), (self.mlp.proj, self.ln2_post)]

    @property
    def mlp_in(self) -> nn.Linear:
        return self.mlp.fc

    def count_flops(self, c, rg: bool) -> bool:
        """Add this block's matrix products and attention core to the counter ``c``; returns whether the
        stream after the block requires a gradient."""
        a = c.norm(self.ln1, rg)
        a = c.linear(self.attn.qkv, a)
        a = c.attention(self.attn.proj.in_features, a)
        a = c.linear(self.attn.proj, a)
        a = c.norm(self.ln1_post, a)
        rg = rg or a
        m = c.norm(self.ln2, rg)
        m = c.linear(self.mlp.fc, m)
        m = c.linear(self.mlp.proj, m)
        m = c.norm(self.ln2_post, m)
        return rg or m
