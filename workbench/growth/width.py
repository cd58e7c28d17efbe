"""Growth in width: widen a block's MLP (zero, copy or orthogonal new units) keeping the function.

Definitions: ``docs/definitions.md#widen``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch
import torch.nn as nn

from ..core import checks
from ..core import models as _models
from .operators import _blocks, _mlp_pair, _sync

# ----------------------------------------------------------------------------- width growth

# the configs' bound on a block's hidden units (d_hidden, d_mlp, each of layer_widths), from their constraints
MAX_WIDTH = min(c.hi for f in _models.FAMILIES.values() for name, c in checks.constraints(f.config).items()
                if name in ("d_hidden", "d_mlp"))




WIDEN_INITS = ("zero", "copy", "orthogonal")   # widen

def _widths_of(model: nn.Module) -> list[int]:
    return [int(_mlp_pair(b)[1].out_features) for b in _blocks(model)]


def _check_widths(model: nn.Module, widths: list[int], what: str) -> None:
    """Refuse widening whose config would not validate (ranges, memory budget) before the model changes."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or not hasattr(config, "validate"):
        return
    try:
        dataclasses.replace(config, n_layers=len(widths), layer_widths=list(widths)).validate()
    except ValueError as e:
        raise ValueError(f"model: {what} would make the block widths {widths}, which is refused: {e}") from None


def _orthogonal_rows(old: torch.Tensor, n_new: int, generator: torch.Generator) -> torch.Tensor:
    """``n_new`` unit rows orthogonal to the rows of ``old`` (``(h, d)``) as far as the dimension allows.

    The rows span the directions ``old`` uses least: its null space first, then its weakest right
    singular directions (when ``h + n_new > d`` no exact complement exists). The new rows are random
    orthonormal combinations of those directions (orthonormal themselves when ``n_new <= d``).
    """
    d = old.shape[1]
    _, s, vh = torch.linalg.svd(old.double(), full_matrices=True)        # vh: (d, d), strongest first
    k = min(n_new, d)
    basis = vh[d - k:]                                                    # (k, d): the least used directions
    g = torch.randn(max(n_new, k), k, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)                                             # (n_new, k), orthonormal columns
    rows = q[:n_new] @ basis
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def widen(model: nn.Module, layer: int = -1, factor: float = 2, init: str = "zero", *,
          seed: int | None = None) -> nn.Module:
    """Widen the MLP of block ``layer`` from ``h`` to ``round(factor * h)`` hidden units, in place, keeping
    the function; returns the block.

    ``ResidualMLP``: the block's hidden units (``fc -> act -> proj``); ``Transformer``: the MLP hidden
    units ``d_mlp`` of that block (attention heads are left as they are). New units:

    - ``"zero"``: incoming weights drawn like the family's fresh layers (PyTorch's default init for
      the MLP, GPT-2's N(0, 0.02) for the Transformer), bias 0, **outgoing weights 0**;
    - ``"copy"``: Net2WiderNet (Chen et al. 2016): new unit ``h + j`` copies unit ``j mod h`` (incoming
      weights and bias), and every unit's outgoing column is divided by the number of its copies
      (itself included), so the sum the next layer sees is unchanged;
    - ``"orthogonal"``: unit-norm incoming rows orthogonal to the old rows (their null space, then their
      weakest singular directions) scaled to the old rows' mean norm, bias 0, outgoing weights 0.

    Function preserving for every init (up to rounding: ``"copy"`` divides). The new weights are new
    parameters, so optimizers built before do not know them: use :func:`rebuild_optimizer`.
    ``model.config.layer_widths`` follows. ``seed``: the new units' draw (default: from the model's seed,
    the layer and its width). Definition: ``docs/definitions.md#widen``.
    """
    checks.check_choice("init", init, WIDEN_INITS)
    blocks = _blocks(model)
    n = len(blocks)
    if n == 0:
        raise ValueError("widen needs a block to widen; the model has none")
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, numbers.Integral) or not -n <= layer < n:
        raise ValueError(f"layer must be an integer in [{-n}, {n - 1}] (the model has {n} blocks; negative: from "
                         f"the top), got {layer!r}")
    layer = int(layer) % n
    factor = checks.check_float("factor", factor, 1.0, 64.0, lo_open=True)
    if seed is not None:
        seed = checks.check_seed("seed", seed)
    owner, fc, proj = _mlp_pair(blocks[layer])
    h = fc.out_features
    h_new = int(round(factor * h))
    if h_new <= h:
        raise ValueError(f"factor {factor} adds no unit to block {layer} ({h} hidden units); use a larger factor")
    if h_new > MAX_WIDTH:
        raise ValueError(f"factor {factor} would give block {layer} {h_new} hidden units; at most {MAX_WIDTH}")
    widths = _widths_of(model)
    widths[layer] = h_new
    _check_widths(model, widths, f"widen(layer={layer}, factor={factor})")
    n_add = h_new - h
    if seed is None:
        seed = (1_000_003 * int(getattr(getattr(model, "config", None), "seed", 0)) + 7919 * layer + h) % (2 ** 63)
    gen = torch.Generator().manual_seed(seed)
    W1, b1, W2 = fc.weight.detach(), fc.bias.detach() if fc.bias is not None else None, proj.weight.detach()
    d_in = W1.shape[1]
    with torch.no_grad():
        if init == "copy":
            src = torch.arange(h, h_new) % h
            counts = torch.ones(h, dtype=W2.dtype, device=W2.device).index_add_(
                0, src.to(W2.device), torch.ones(n_add, dtype=W2.dtype, device=W2.device))
            new_in = W1[src]
            new_b = b1[src] if b1 is not None else None
            out_old = W2 / counts
            out_new = out_old[:, src]
        else:
            if init == "orthogonal":
                rows = _orthogonal_rows(W1.cpu(), n_add, gen)
                scale = W1.double().norm(dim=1).mean().cpu()
                new_in = (rows * scale).to(W1)
            elif isinstance(model, _models.Transformer):
                new_in = (torch.randn(n_add, d_in, generator=gen, dtype=torch.float64) * 0.02).to(W1)
            else:  # PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                bound = 1.0 / math.sqrt(d_in)
                new_in = ((torch.rand(n_add, d_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(W1)
            new_b = torch.zeros(n_add, dtype=W1.dtype, device=W1.device) if b1 is not None else None
            out_old = W2
            out_new = torch.zeros(W2.shape[0], n_add, dtype=W2.dtype, device=W2.device)
        new_fc = nn.Linear(d_in, h_new, bias=b1 is not None).to(device=W1.device, dtype=W1.dtype)
        new_fc.weight.copy_(torch.cat([W1, new_in], 0))
        if b1 is not None:
            new_fc.bias.copy_(torch.cat([b1, new_b], 0))
        new_proj = nn.Linear(h_new, W2.shape[0], bias=proj.bias is not None).to(device=W2.device, dtype=W2.dtype)
        new_proj.weight.copy_(torch.cat([out_old, out_new], 1))
        if proj.bias is not None:
            new_proj.bias.copy_(proj.bias)
    new_fc.requires_grad_(fc.weight.requires_grad)
    new_proj.requires_grad_(proj.weight.requires_grad)
    owner.fc, owner.proj = new_fc, new_proj
    _sync(model)
    return blocks[layer]


def width_table(model: nn.Module):
    """One row per block: ``layer, width`` (hidden units of its MLP), ``params``."""
    import pandas as pd

    return pd.DataFrame([{"layer": i, "width": int(_mlp_pair(b)[1].out_features),
                          "params": sum(p.numel() for p in b.parameters())} for i, b in enumerate(_blocks(model))])
