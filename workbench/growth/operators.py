"""Growth operators: add a block (zero, copy, random, fade-in), stack (G_stack), freeze, and the optimizer
that carries its state across growth.

Definitions: ``docs/definitions.md#add-layer``, ``#zero-init``, ``#fade-in``, ``#g-stack``, ``#freeze``.
"""
from __future__ import annotations

import copy
import dataclasses
import numbers
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from ..core import checks
from ..core import models as _models
from ..core.training import Callback, TrainConfig

INITS = ("zero", "copy", "random", "fade")

# Bounds on what growth may build or run. Depth and steps are the configs' own bounds, read from their
# declared constraints (the blocks every family allows; the steps of one TrainConfig, hence of one stage).
MAX_DEPTH = min(checks.constraints(f.config)["n_layers"].hi for f in _models.FAMILIES.values())
MAX_STEPS = checks.constraints(TrainConfig)["steps"].hi
MAX_STAGES = 1000
MAX_SWEEP_RUNS = 256             # depth_sweep: datasets x seeds x depths
MAX_SEEDS = 16


# ----------------------------------------------------------------------------- helpers


def _mlp_pair(block: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    """``(owner, fc, proj)``: the module holding the block's MLP and its two linear layers."""
    owner = block.mlp if hasattr(block, "mlp") else block
    fc, proj = getattr(owner, "fc", None), getattr(owner, "proj", None)
    if not isinstance(fc, nn.Linear) or not isinstance(proj, nn.Linear):
        raise TypeError(f"don't know how to widen a {type(block).__name__}")
    return owner, fc, proj


def _blocks(model: nn.Module) -> nn.ModuleList:
    return checks.check_model("model", model).blocks


def _sync(model: nn.Module) -> None:
    if hasattr(model, "sync_config"):
        model.sync_config()


def _param_like(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _resolve_position(position, n: int) -> int:
    """``"top"``, ``"bottom"`` or an index in ``[0, n]`` (negative indices count from the top: -1 == "top")."""
    if isinstance(position, str) and position in ("top", "bottom"):
        return n if position == "top" else 0
    if isinstance(position, (bool, np.bool_)) or not isinstance(position, numbers.Integral) \
            or not -(n + 1) <= position <= n:
        raise ValueError(f"position must be 'top', 'bottom' or an integer in [{-(n + 1)}, {n}] (negative: from "
                         f"the top), got {position!r}")
    return int(position) + (n + 1 if position < 0 else 0)


def _zero_output(block: nn.Module) -> None:
    """Make a residual block add exactly 0 to the stream (function preserving): the block's own
    ``zero_output_()`` (pre-LN / no norm: zero output projections; Peri-LN: zero output norms)."""
    zero = getattr(block, "zero_output_", None)
    if not callable(zero):
        raise TypeError(f"don't know how to zero-initialise a {type(block).__name__}")
    zero()


def _check_depth(model: nn.Module, n_layers: int, what: str, widths: list[int] | None = None) -> None:
    """Refuse growth whose config would not validate (the memory budget ``WORKBENCH_MAX_MODEL_MB`` among
    its checks) before the model is changed. ``widths``: the blocks' hidden units after it (default: the
    present blocks' widths, new blocks at the config's width)."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config) or not hasattr(config, "validate"):
        return
    changes: dict = {"n_layers": n_layers}
    if getattr(config, "layer_widths", None) is not None or widths is not None:
        base = getattr(config, "d_hidden", None) or config.d_mlp
        have = list(widths) if widths is not None else list(config.layer_widths)
        changes["layer_widths"] = (have + [base] * max(0, n_layers - len(have)))[:n_layers]
    try:
        dataclasses.replace(config, **changes).validate()
    except ValueError as e:
        raise ValueError(f"model: {what} would grow it to {n_layers} blocks, which is refused: {e}") from None


def _fresh_block(model: nn.Module, seed: int | None) -> nn.Module:
    like = _param_like(model)
    if seed is None:
        seed = 1_000_003 * int(getattr(model.config, "seed", 0)) + len(_blocks(model)) + 1
    with _models.seeded(seed):
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
    checks.check_choice("init", init, INITS)
    checks.check_int("fade_steps", fade_steps, 1, MAX_STEPS)
    if seed is not None:
        seed = checks.check_seed("seed", seed)
    blocks = _blocks(model)
    n = len(blocks)
    pos = _resolve_position(position, n)
    if n + 1 > MAX_DEPTH:
        raise ValueError(f"model: add_layer would make {n + 1} blocks; at most {MAX_DEPTH} are allowed")
    if init == "copy" and n == 0:
        raise ValueError("init='copy' needs an existing block to copy; the model has none")
    widths = [int(_mlp_pair(b)[1].out_features) for b in blocks]
    grown = copy.deepcopy(blocks[pos - 1 if pos > 0 else 0]) if init == "copy" else None
    base = getattr(getattr(model, "config", None), "d_hidden", None) or getattr(getattr(model, "config", None),
                                                                              "d_mlp", 0)
    widths.insert(pos, int(_mlp_pair(grown)[1].out_features) if grown is not None else base)
    _check_depth(model, n + 1, "add_layer", widths=widths)
    if init == "copy":
        block = grown
        for p in block.parameters():
            p.requires_grad_(True)
        block.end_fade()
    else:
        block = _fresh_block(model, seed)
        if init == "zero":
            _zero_output(block)
        elif init == "fade":
            block.start_fade(fade_steps)
    blocks.insert(pos, block)
    _sync(model)
    return block


def stack(model: nn.Module, factor: int = 2) -> nn.Module:
    """G_stack: replace ``blocks`` by ``factor`` copies of the trained stack, in order, in place.

    ``[b0, b1] -> [b0, b1, b0', b1']`` for ``factor=2``. The copies are independent,
    trainable parameters. Returns the model.
    """
    blocks = _blocks(model)
    checks.check_int("factor", factor, 1, max(1, MAX_DEPTH // max(len(blocks), 1)))
    if len(blocks) == 0:
        raise ValueError("stack needs at least one block; the model has none")
    _check_depth(model, len(blocks) * factor, f"stack (factor {factor})",
                 widths=[int(_mlp_pair(b)[1].out_features) for b in blocks] * factor)
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
    """The modules below block 0 (the family's own ``embedding_modules()``)."""
    return list(checks.check_model("model", model).embedding_modules())


def freeze(model: nn.Module, below: int | None = None, *, layers: Iterable[int] | None = None,
           embed: bool = True) -> nn.Module:
    """Freeze blocks ``0 .. below-1`` (and, with ``embed=True``, the embedding when ``below >= 1``).

    Frozen parameters get ``requires_grad=False``: no gradient, no place in a fresh
    optimizer, bitwise unchanged by training. ``layers`` freezes an explicit list of block
    indices instead. The final norm and readout stay trainable (with tied embeddings the
    readout is the token embedding, so it freezes with the embedding). Freezing is
    additive: call :func:`unfreeze` first to start over. Returns the model.
    """
    checks.check_bool("embed", embed)
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
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise ValueError(f"layers must be a list of block indices in [0, {n - 1}], got {layers!r}")
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
    for p in model.substrate_parameters():  # glyph and frozen-random token embeddings stay frozen
        p.requires_grad_(False)
    return model


def frozen_layers(model: nn.Module) -> list[bool]:
    """Per block: True when all of its parameters are frozen."""
    return [not any(p.requires_grad for p in b.parameters()) for b in _blocks(model)]


def block_table(model: nn.Module):
    """One row per block: ``layer, params, trainable_params, frozen, gate`` (gate: fade-in ``m``, 1 when done).

    Rows for the embedding (``layer=-1``, ``part="embed"``) and the head (final norm + readout,
    ``part="head"``) frame the blocks, so a strip of the whole model can be drawn.
    """
    import pandas as pd

    def row(layer, part, modules):
        params = {id(p): p for m in modules for p in m.parameters()}
        n = sum(p.numel() for p in params.values())
        t = sum(p.numel() for p in params.values() if p.requires_grad)
        return {"layer": layer, "part": part, "params": n, "trainable_params": t, "frozen": n > 0 and t == 0}

    rows = [row(-1, "embed", _embedding_modules(model))]
    for i, b in enumerate(_blocks(model)):
        rows.append({**row(i, "block", [b]), "gate": float(getattr(b, "residual_scale", 1.0))})
    head = [m for m in (getattr(model, "final_norm", None), getattr(model, "readout", None)) if m is not None]
    rows.append(row(len(_blocks(model)), "head", head))
    df = pd.DataFrame(rows)
    df["gate"] = df["gate"].fillna(1.0) if "gate" in df else 1.0
    return df


def rebuild_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                      config: TrainConfig | None = None, lr: float | None = None) -> torch.optim.AdamW:
    """A fresh AdamW over ``model``'s trainable parameters that keeps ``optimizer``'s state.

    Parameters the old optimizer knew keep their Adam moments and step counts (the
    ``optimizer.state[p]`` entries are carried over, as tensors, not copied); new
    parameters start with empty state; frozen parameters are left out. The learning rate
    is ``lr``, else ``config.lr``, else the old optimizer's first group's base rate.
    """
    if lr is not None:
        checks.check_float("lr", lr, 0.0, 10.0, lo_open=True)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch optimizer or None, got {type(optimizer).__name__}")
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
    checks.check_int("steps", steps, 0, MAX_STEPS)
    for b in fading_blocks(model):
        b.advance_fade(steps)
