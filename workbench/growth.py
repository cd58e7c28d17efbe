"""Growing models in depth: add a block, stack the trained stack, freeze what is below.

Both model families share the shape ``embed -> blocks -> final_norm -> readout`` (see
:mod:`workbench.models`), so every operator here works on both without special cases.

- :func:`add_layer` inserts one block. ``init="zero"`` keeps the function exactly
  (Net2Net's identity init in residual form: the new block adds 0 to the stream);
  ``"copy"`` duplicates the neighbouring block; ``"random"`` uses the family's normal
  init; ``"fade"`` inserts a freshly initialised block behind a gate ``m`` that ramps
  0 -> 1 over ``fade_steps`` optimizer steps, ``out = m*block(x) + (1-m)*x`` (MSG).
- :func:`stack` is G_stack (Du et al. 2024): the trained stack repeated in order.
- :func:`freeze` / :func:`unfreeze`: frozen parameters have ``requires_grad=False``, so they
  get no gradient, are left out of a fresh optimizer and stay bitwise unchanged.
- :func:`rebuild_optimizer` makes the AdamW for the next stage: the trainable parameters,
  with the optimizer state (Adam moments, step counts) of parameters that existed before.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from . import models as _models
from .training import Callback, TrainConfig

__all__ = ["INITS", "add_layer", "stack", "freeze", "unfreeze", "frozen_layers", "rebuild_optimizer",
           "FadeIn", "fading_blocks", "advance_fades"]

INITS = ("zero", "copy", "random", "fade")


# ----------------------------------------------------------------------------- helpers


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"expected a workbench model with a .blocks ModuleList, got {type(model).__name__}")
    return blocks


def _sync(model: nn.Module) -> None:
    if hasattr(model, "sync_config"):
        model.sync_config()


def _param_like(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _resolve_position(position, n: int) -> int:
    if position == "top":
        return n
    if position == "bottom":
        return 0
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"position must be 'top', 'bottom' or an integer in [0, {n}], got {position!r}")
    if position < 0:
        position += n + 1  # -1 == "top"
    if not 0 <= position <= n:
        raise ValueError(f"position must be 'top', 'bottom' or an integer in [0, {n}], got {position!r}")
    return position


def _zero_output(block: nn.Module) -> None:
    """Make a residual block add exactly 0 to the stream (function preserving).

    Pre-LN / no norm: zero the output projections (weights and biases). Peri-LN: the
    block's output passes through a LayerNorm, and ``LN(0) = bias``, so zero the output
    norms' gains and biases instead (the projections keep their init so that the gains
    receive a gradient from the first step).
    """
    with torch.no_grad():
        if isinstance(block, _models.TransformerBlock):
            pairs = [(block.attn.proj, block.ln1_post), (block.mlp.proj, block.ln2_post)]
        elif isinstance(block, _models.MLPBlock):
            pairs = [(block.proj, block.post_norm)]
        else:
            raise TypeError(f"don't know how to zero-initialise a {type(block).__name__}")
        for proj, post_norm in pairs:
            if isinstance(post_norm, nn.LayerNorm):
                post_norm.weight.zero_()
                post_norm.bias.zero_()
            else:
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()


def _fresh_block(model: nn.Module, seed: int | None) -> nn.Module:
    like = _param_like(model)
    if seed is None:
        seed = 1_000_003 * int(getattr(model.config, "seed", 0)) + len(_blocks(model)) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = model.new_block()
    return block.to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- operators


def add_layer(model: nn.Module, init: str = "zero", position: str | int = "top", *, fade_steps: int = 100,
              seed: int | None = None) -> nn.Module:
    """Insert one block into ``model`` in place and return the new block.

    init:
        ``"zero"``: function preserving (the block adds exactly 0 at insertion; see
        :func:`_zero_output` for pre/peri placement); ``"copy"``: a copy of the neighbouring
        block (the one below the insertion point, or above it at the bottom);
        ``"random"``: the family's normal init; ``"fade"``: normal init behind a gate that
        starts at 0 (function preserving at insertion) and ramps to 1 over ``fade_steps``
        steps of :class:`FadeIn` (which :func:`grow` attaches; add it yourself to ``wb.train``).
    position:
        ``"top"`` (after the last block, default), ``"bottom"`` or an index in ``[0, n_layers]``.
    seed:
        seed of the new block's init (``"random"``/``"fade"``/``"zero"``); by default derived
        from the model's seed and depth, so growth is reproducible.

    The new block is trainable. ``model.config.n_layers`` follows. Optimizers built before
    do not know the new parameters: use :func:`rebuild_optimizer` (``grow`` does).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    blocks = _blocks(model)
    n = len(blocks)
    pos = _resolve_position(position, n)
    if init == "copy":
        if n == 0:
            raise ValueError("init='copy' needs an existing block to copy; the model has none")
        block = copy.deepcopy(blocks[pos - 1 if pos > 0 else 0])
        for p in block.parameters():
            p.requires_grad_(True)
        block.residual_scale, block.fade = 1.0, None
    else:
        block = _fresh_block(model, seed)
        if init == "zero":
            _zero_output(block)
        elif init == "fade":
            if isinstance(fade_steps, bool) or not isinstance(fade_steps, int) or fade_steps < 1:
                raise ValueError(f"fade_steps must be an integer >= 1, got {fade_steps!r}")
            block.residual_scale = 0.0
            block.fade = {"steps": fade_steps, "done": 0}
    blocks.insert(pos, block)
    _sync(model)
    return block


def stack(model: nn.Module, factor: int = 2) -> nn.Module:
    """G_stack: replace ``blocks`` by ``factor`` copies of the trained stack, in order, in place.

    ``[b0, b1] -> [b0, b1, b0', b1']`` for ``factor=2``. The copies are independent,
    trainable parameters. Returns the model.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    blocks = _blocks(model)
    if len(blocks) == 0:
        raise ValueError("stack needs at least one block; the model has none")
    original = list(blocks)
    for _ in range(factor - 1):
        for b in original:
            new = copy.deepcopy(b)
            for p in new.parameters():
                p.requires_grad_(True)
            blocks.append(new)
    _sync(model)
    return model


def _embedding_modules(model: nn.Module) -> list[nn.Module]:
    names = ("stem", "tok_embed", "pos_embed")
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


def _substrate_frozen(model: nn.Module) -> bool:
    """Glyph and frozen-random token embeddings are frozen by definition and stay frozen."""
    return getattr(getattr(model, "config", None), "embedding", "trainable") != "trainable"


def freeze(model: nn.Module, below: int | None = None, *, layers: Iterable[int] | None = None,
           embed: bool = True) -> nn.Module:
    """Freeze blocks ``0 .. below-1`` (and, with ``embed=True``, the embedding when ``below >= 1``).

    Frozen parameters get ``requires_grad=False``: no gradient, no place in a fresh
    optimizer, bitwise unchanged by training. ``layers`` freezes an explicit list of block
    indices instead. The final norm and readout stay trainable (with tied embeddings the
    readout is the token embedding, so it freezes with the embedding). Freezing is
    additive: call :func:`unfreeze` first to start over. Returns the model.
    """
    blocks = _blocks(model)
    n = len(blocks)
    if (below is None) == (layers is None):
        raise ValueError("give exactly one of below= (an integer) or layers= (block indices)")
    if layers is None:
        if isinstance(below, bool) or not isinstance(below, int) or not 0 <= below <= n:
            raise ValueError(f"below must be an integer in [0, {n}] (the model has {n} blocks), got {below!r}")
        idx = list(range(below))
        with_embed = embed and below >= 1
    else:
        idx = list(layers)
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
        if bad:
            raise ValueError(f"layers must be block indices in [0, {n - 1}] (the model has {n} blocks), got {bad}")
        with_embed = embed and 0 in idx
    for i in idx:
        blocks[i].requires_grad_(False)
    if with_embed:
        for m in _embedding_modules(model):
            m.requires_grad_(False)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Make every parameter trainable again, except a frozen substrate (glyph/frozen-random embeddings)."""
    model.requires_grad_(True)
    if _substrate_frozen(model):
        model.tok_embed.weight.requires_grad_(False)
    return model


def frozen_layers(model: nn.Module) -> list[bool]:
    """Per block: True when all of its parameters are frozen."""
    return [not any(p.requires_grad for p in b.parameters()) for b in _blocks(model)]


def rebuild_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      config: TrainConfig | None = None, lr: float | None = None) -> torch.optim.AdamW:
    """A fresh AdamW over ``model``'s trainable parameters that keeps ``optimizer``'s state.

    Parameters the old optimizer knew keep their Adam moments and step counts (the
    ``optimizer.state[p]`` entries are carried over, as tensors, not copied); new
    parameters start with empty state; frozen parameters are left out. The learning rate
    is ``lr``, else ``config.lr``, else the old optimizer's first group's base rate.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    seen, unique = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    if not unique:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    if lr is None:
        if config is not None:
            lr = config.lr
        elif optimizer is not None:
            g = optimizer.param_groups[0]
            lr = g.get("initial_lr", g["lr"])
        else:
            lr = TrainConfig().lr
    wd = config.weight_decay if config is not None else (
        optimizer.param_groups[0].get("weight_decay", 0.0) if optimizer is not None else 0.0)
    new = torch.optim.AdamW(unique, lr=lr, weight_decay=wd)
    if optimizer is not None:
        for p in unique:
            if p in optimizer.state and optimizer.state[p]:
                new.state[p] = optimizer.state[p]
    return new


# ----------------------------------------------------------------------------- fade-in


def fading_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks whose fade-in gate has not reached 1 yet."""
    return [b for b in _blocks(model) if getattr(b, "fade", None) is not None]


class FadeIn(Callback):
    """Ramp the gate of blocks added with ``init="fade"``: ``m = done / steps``, one step per optimizer step."""

    def on_step(self, state) -> None:
        advance_fades(state.model)


def advance_fades(model: nn.Module, steps: int = 1) -> None:
    """Advance every fading block's gate by ``steps`` optimizer steps; a gate that reaches 1 is done."""
    for b in fading_blocks(model):
        b.fade["done"] = min(b.fade["done"] + steps, b.fade["steps"])
        b.residual_scale = b.fade["done"] / b.fade["steps"]
        if b.fade["done"] >= b.fade["steps"]:
            b.residual_scale = 1.0
            b.fade = None
