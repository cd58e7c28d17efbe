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
- :func:`grow_stage` runs one stage of a schedule (operation, freezing, optimizer, training);
  :func:`grow` is the loop over a schedule's stages (saving each, honouring a :class:`GrowControl`).

What differs between the families lives on the model classes (:mod:`workbench.models`): a
block's ``zero_output_()`` per norm placement, its fade-in gate (buffers, so a checkpoint
saved mid-fade reloads with the same function), the model's ``embedding_modules()``. Growth
is validated like a fresh config (field ranges and the memory budget ``WORKBENCH_MAX_MODEL_MB``)
before the model changes. The preset experiments are :data:`workbench.recipes.KHOP` and
:data:`workbench.recipes.TEXT`.

Definitions: ``docs/definitions.md#add-layer``, ``#zero-init``, ``#fade-in``, ``#g-stack``, ``#freeze``,
``#growth-comparison``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn

from . import checks
from . import models as _models
from .flops import examples_seen, flops_per_example, steps_for_budget
from .training import Callback, TrainConfig

__all__ = ["INITS", "OPS", "PRESETS", "khop_baseline", "add_layer", "stack", "freeze", "unfreeze", "frozen_layers", "block_table",
           "rebuild_optimizer", "FadeIn", "fading_blocks", "advance_fades", "Stage", "check_schedule", "preset",
           "schedule_depths", "GrowControl", "grow_stage", "StageResult", "grow", "compare", "Comparison", "depth_sweep", "flops_to_reach",
           "WIDEN_INITS", "widen", "width_table", "TemplateLinear", "MixtureMLP", "MIXTURE_INITS", "mixture_grow",
           "fit_mixture", "CRITERIA", "CANDIDATES", "natural_score", "expansion_candidates", "score_candidates",
           "check_criterion", "trace_table", "timeline_table"]

INITS = ("zero", "copy", "random", "fade")
WIDEN_INITS = ("zero", "copy", "orthogonal")   # widen
CRITERIA = ("natural",)                        # grow(criterion=...)
CANDIDATES = ("add_layer", "widen")            # what criterion growth may propose

# Bounds on what growth may build or run (the model configs allow at most 256 blocks).
MAX_DEPTH = 256
MAX_STEPS = 10_000_000           # steps of one stage (TrainConfig's own bound)
MAX_STAGES = 1000
MAX_SWEEP_RUNS = 256             # depth_sweep: datasets x seeds x depths
MAX_SEEDS = 16


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
    return list(model.embedding_modules())


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


# ----------------------------------------------------------------------------- khop baseline

# The preset growth experiments (the khop task in the table layout, the character LM) are
# workbench.recipes.KHOP and workbench.recipes.TEXT.


def khop_baseline(dataset, split: str = "val") -> float:
    """Accuracy of the best simple answer that follows one pointer only, on a table-layout khop split.

    Read ``f(q)`` (one look-up). If ``hops == 1`` that is the answer; if ``f(q) == q`` the chain
    stays at ``q``, so ``q`` is the answer for any number of hops; otherwise answer the most
    frequent value in the table (ties: the smallest node id). A depth-1 Transformer trained on
    2 or 3 hops ends close to this number; beating it needs a second look-up, i.e. depth.
    """
    checks.check_choice("split", split, ("train", "val"))
    ds = _dataset_obj(dataset)
    opts = ds.options or {}
    if ds.name != "khop" or opts.get("layout") != "table":
        raise ValueError(f"khop_baseline needs a khop dataset with layout='table', got {ds.name!r} "
                         f"with layout={opts.get('layout')!r}")
    nodes, hops = opts["nodes"], opts["hops"]
    x, y = ds.split(split)
    table, queries, answers = x[:, :nodes], x[:, nodes + 1:], y[:, nodes + 1:]
    fq = torch.gather(table, 1, queries)
    if hops == 1:
        guess = fq
    else:
        mode = torch.mode(table, dim=1).values[:, None].expand_as(queries)
        guess = torch.where(fq == queries, queries, mode)
    return float((guess == answers).float().mean())


# ----------------------------------------------------------------------------- schedules

OPS = ("train", "add_layer", "stack", "widen")


@dataclass
class Stage:
    """One stage of a growth schedule: an operation, then ``steps`` of training."""

    op: str = "train"                # "train" (no growth), "add_layer", "stack" or "widen"
    steps: int = 200                 # optimizer steps trained after the operation (>= 1)
    freeze: int | str | None = None  # None: all trainable; k: blocks below k (and the embedding) frozen;
                                     # "old": every block that existed before this stage's operation
    lr: float | None = None          # learning rate of this stage (None: the TrainConfig's)
    init: str = "zero"               # add_layer: "zero", "copy", "random" or "fade"; widen: "zero", "copy", "orthogonal"
    n: int = 1                       # add_layer: how many blocks to add
    position: str | int = "top"      # add_layer: "top", "bottom" or an index
    factor: int = 2                  # stack: depth multiplier; widen: width multiplier (> 1)
    fade_steps: int = 100            # add_layer with init="fade": steps of the 0 -> 1 ramp
    layer: int = -1                  # widen: the block whose MLP is widened (negative: from the top)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_stage(s, k: int) -> Stage:
    if isinstance(s, Stage):
        return s
    if isinstance(s, dict):
        names = {f.name for f in dataclasses.fields(Stage)}
        unknown = set(s) - names
        if unknown:
            raise ValueError(f"stage {k}: unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        return Stage(**s)
    raise ValueError(f"stage {k}: expected a Stage or a dict, got {type(s).__name__}")


def _staged(where: str, check, *args, **kwargs):
    """A :mod:`workbench.checks` check whose message starts with the stage it is about."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_schedule(schedule, n_layers: int) -> list[Stage]:
    """Validate a schedule for a model that starts with ``n_layers`` blocks; returns the Stages.

    Errors name the stage: zero or negative steps, an unknown operation or init, freezing
    more blocks than the model has at that stage, a bad learning rate.
    """
    if isinstance(schedule, (Stage, dict)) or not hasattr(schedule, "__iter__"):
        raise ValueError("schedule must be a list of stages (Stage objects or dicts)")
    checks.check_int("n_layers", n_layers, 0, MAX_DEPTH)
    stages = [_as_stage(s, k) for k, s in enumerate(schedule)]
    if not stages:
        raise ValueError("schedule is empty: give at least one stage")
    if len(stages) > MAX_STAGES:
        raise ValueError(f"schedule must have at most {MAX_STAGES} stages, got {len(stages)}")
    depth = n_layers
    for k, s in enumerate(stages):
        where = f"stage {k} ({s.op})"
        if s.op not in OPS:
            raise ValueError(f"stage {k}: unknown operation {s.op!r}; allowed: {list(OPS)}")
        _staged(where, checks.check_int, "steps", s.steps, 1, MAX_STEPS)
        if s.lr is not None:
            _staged(where, checks.check_float, "lr", s.lr, 0.0, 10.0, lo_open=True)
        if s.op == "add_layer":
            _staged(where, checks.check_choice, "init", s.init, INITS)
            if depth >= MAX_DEPTH:
                raise ValueError(f"{where}: the model has {depth} blocks at this stage, the most allowed "
                                 f"({MAX_DEPTH}); no block can be added")
            _staged(where, checks.check_int, "n", s.n, 1, MAX_DEPTH - depth)
            _staged(where, checks.check_int, "fade_steps", s.fade_steps, 1, MAX_STEPS)
            if s.init == "copy" and depth == 0:
                raise ValueError(f"{where}: init='copy' needs an existing block; the model has none")
            _resolve_position(s.position, depth)
            depth += s.n
        elif s.op == "stack":
            if depth == 0:
                raise ValueError(f"{where}: stack needs at least one block; the model has none")
            _staged(where, checks.check_int, "factor", s.factor, 1, max(1, MAX_DEPTH // depth))
            depth *= s.factor
        elif s.op == "widen":
            if depth == 0:
                raise ValueError(f"{where}: widen needs a block; the model has none")
            _staged(where, checks.check_choice, "init", s.init, WIDEN_INITS)
            _staged(where, checks.check_float, "factor", s.factor, 1.0, 64.0, lo_open=True)
            if isinstance(s.layer, bool) or not isinstance(s.layer, numbers.Integral) or not -depth <= s.layer < depth:
                raise ValueError(f"{where}: layer must be an integer in [{-depth}, {depth - 1}] (the model has "
                                 f"{depth} blocks at this stage), got {s.layer!r}")
        if s.freeze is not None and s.freeze != "old":
            if isinstance(s.freeze, bool) or not isinstance(s.freeze, numbers.Integral) or not 0 <= s.freeze <= depth:
                raise ValueError(f"{where}: freeze must be None, 'old' or an integer in [0, {depth}] "
                                 f"(the model has {depth} blocks at this stage), got {s.freeze!r}")
    return stages


PRESETS = ("layerwise", "gstack", "scratch")


def preset(name: str, steps: int = 200, *, start_layers: int = 1, final_layers: int = 4, stack_at: int | None = None,
           total_steps: int | None = None, init: str = "zero", freeze_lower: bool = True) -> list[Stage]:
    """Ready-made schedules (the dashboard's presets).

    - ``"layerwise"``: one layer at a time, lower layers frozen: train ``start_layers`` blocks
      for ``steps``, then ``final_layers - start_layers`` times add one block (``init``) and
      train ``steps`` with every older block frozen (``freeze_lower``).
    - ``"gstack"``: G_stack at step N: train ``start_layers`` blocks for ``stack_at`` steps, stack
      to ``final_layers`` (must be a multiple), train the rest of ``total_steps``.
    - ``"scratch"``: one stage of ``total_steps`` (default ``steps * final_layers``); build the
      model with ``final_layers`` blocks yourself.
    """
    checks.check_choice("preset", name, PRESETS)
    checks.check_int("steps", steps, 1, MAX_STEPS)
    checks.check_int("start_layers", start_layers, 0 if name != "gstack" else 1, MAX_DEPTH)
    checks.check_int("final_layers", final_layers, max(start_layers, 1), MAX_DEPTH)
    if stack_at is not None:
        checks.check_int("stack_at", stack_at, 1, MAX_STEPS)
    if total_steps is not None:
        checks.check_int("total_steps", total_steps, 1, MAX_STEPS)
    checks.check_choice("init", init, INITS)
    checks.check_bool("freeze_lower", freeze_lower)
    if name == "layerwise":
        out = [Stage("train", steps)]
        out += [Stage("add_layer", steps, freeze="old" if freeze_lower else None, init=init)
                for _ in range(final_layers - start_layers)]
        return out
    if name == "gstack":
        total = total_steps or steps * 2
        at = stack_at if stack_at is not None else total // 2
        if final_layers % start_layers:
            raise ValueError(f"gstack: final_layers ({final_layers}) must be a multiple of start_layers ({start_layers})")
        if not 0 < at < total:
            raise ValueError(f"gstack: stack_at must be in [1, {total - 1}], got {at}")
        return [Stage("train", at), Stage("stack", total - at, factor=final_layers // start_layers)]
    if name == "scratch":
        return [Stage("train", total_steps or steps * final_layers)]
    raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")


def schedule_depths(schedule, n_layers: int) -> list[int]:
    """Depth after each stage's operation."""
    return _depths(check_schedule(schedule, n_layers), n_layers)


def _depths(stages: list[Stage], n_layers: int) -> list[int]:
    out, depth = [], n_layers
    for s in stages:
        if s.op == "add_layer":
            depth += s.n
        elif s.op == "stack":
            depth *= s.factor
        out.append(depth)
    return out


# ----------------------------------------------------------------------------- grow


class GrowControl:
    """Requests from another thread (the dashboard), honoured between steps by :func:`grow`.

    ``request_layer(init)`` asks for one more block now: the current stage ends after the
    step in progress, the block is added (with the stage's freeze policy) and training
    continues for the stage's remaining steps. ``stop()`` ends the whole growth run.
    """

    def __init__(self, stop_event=None):
        import threading

        self.stop_event = stop_event or threading.Event()
        self._lock = threading.Lock()
        self._requests: list[str] = []

    def request_layer(self, init: str = "zero") -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
        with self._lock:
            self._requests.append(init)

    def pending(self) -> bool:
        return bool(self._requests)

    def take(self) -> str | None:
        with self._lock:
            return self._requests.pop(0) if self._requests else None

    def stop(self) -> None:
        self.stop_event.set()


class _Bookkeeping(Callback):
    """Adds cumulative training FLOPs to every metrics row; honours a GrowControl between steps."""

    def __init__(self, flops0: float, per_example: float, n_train: int, batch_size: int, start_step: int,
                 control: GrowControl | None = None):
        self.flops0, self.per_example = flops0, per_example
        self.n_train, self.batch_size, self.start_step = n_train, batch_size, start_step
        self.control, self._done = control, 0
        self.interrupted: str | None = None

    def flops_at(self, step: int) -> float:
        return self.flops0 + self.per_example * examples_seen(step - self.start_step, self.n_train, self.batch_size)

    def _fill(self, rows) -> None:
        for r in rows:
            if "flops" not in r:
                r["flops"] = float(self.flops_at(r["step"]))

    def on_step(self, state) -> None:
        self._fill(state.rows[self._done:])
        self._done = len(state.rows)

    def on_eval(self, state, rows) -> None:
        self._fill(rows)
        self._done = len(state.rows)

    def check_control(self, state) -> None:
        """Runs after every other callback of the step: end the stage on a request or a stop."""
        if self.control is not None:
            if self.control.stop_event.is_set():
                state.stop, self.interrupted = True, "stop"
            elif self.control.pending():
                state.stop, self.interrupted = True, "add_layer"


class _ControlCheck(Callback):
    def __init__(self, book: _Bookkeeping):
        self.book = book

    def on_step(self, state) -> None:
        self.book.check_control(state)


def _dataset_obj(dataset):
    from . import data as _data

    if isinstance(dataset, _data.Dataset):
        return dataset
    if isinstance(dataset, dict):
        d = dict(dataset)
        if "name" not in d:
            raise ValueError(f"dataset: a spec dict needs a 'name', got keys {sorted(d)}")
        return _data.load(d.pop("name"), **d)
    if isinstance(dataset, str):
        return _data.load(dataset)
    raise ValueError(f"dataset must be a Dataset, a name or a spec dict, got {type(dataset).__name__}")


def _apply_freeze(model: nn.Module, freeze_spec, old_blocks: set[int]) -> None:
    """Reset to all-trainable, then freeze per a Stage's ``freeze`` (``old_blocks``: ids of blocks before the op)."""
    unfreeze(model)
    if freeze_spec == "old":
        idx = [i for i, b in enumerate(_blocks(model)) if id(b) in old_blocks]
        if idx:
            freeze(model, layers=idx, embed=True)
            for m in _embedding_modules(model):
                m.requires_grad_(False)
    elif freeze_spec:
        freeze(model, below=freeze_spec)


def _apply_op(model: nn.Module, s: Stage) -> None:
    if s.op == "add_layer":
        for _ in range(s.n):
            add_layer(model, init=s.init, position=s.position, fade_steps=s.fade_steps)
    elif s.op == "stack":
        stack(model, s.factor)
    elif s.op == "widen":
        widen(model, s.layer, s.factor, init=s.init)


@dataclass
class StageResult:
    """What one growth stage did (:func:`grow_stage`)."""

    stage: Stage                      # the stage as run (after an add-layer request: the re-planned stage)
    index: int                        # position in the run (stage k trains with seed config.seed + k)
    run: Any                          # this stage's Run; its metrics: the eval right after the op, then training
    frames: list                      # those metrics as the two DataFrames :func:`grow` concatenates
    train_config: TrainConfig         # the stage's own TrainConfig
    optimizer: torch.optim.Optimizer  # AdamW after the stage (state of every parameter it trained)
    steps_done: int                   # optimizer steps this stage ran
    step: int                         # global step at the end of the stage
    flops: float                      # cumulative training FLOPs at the end of the stage
    interrupted: str | None           # "add_layer" or "stop" when a GrowControl ended it early
    status: str                       # "completed" (also after an add-layer request), "cancelled" or "diverged"


def grow_stage(model: nn.Module, dataset, stage, config: TrainConfig | None = None, *, index: int = 0,
               step: int = 0, flops: float = 0.0, optimizer: torch.optim.Optimizer | None = None, callbacks=(),
               control: GrowControl | None = None, name: str | None = None) -> StageResult:
    """Run one growth stage on ``model`` in place: its operation, its freezing, then its training.

    The stage's operation (``train``: none, ``add_layer``, ``stack``) is applied, what is frozen is
    set (``stage.freeze``), AdamW is rebuilt keeping the state of existing parameters
    (:func:`rebuild_optimizer`, from ``optimizer``), the model is evaluated once right after the
    operation (so function preservation shows on the curves) and trained ``stage.steps`` steps
    with ``wb.train`` using ``replace(config, steps=stage.steps, lr=stage.lr or config.lr,
    seed=config.seed + index)`` (warm-up in stage 0 only). ``step`` and ``flops`` are where the
    run stands before the stage (its metrics continue from them). :func:`grow` is a loop of these.
    """
    ds = _dataset_obj(dataset)
    from .permute import check_model_data

    check_model_data(model, ds)
    config = (config or TrainConfig()).validate()
    stage = check_schedule([stage], len(_blocks(model)))[0]
    index = checks.check_int("index", index, 0, MAX_STAGES)
    step = checks.check_int("step", step, 0, None)
    flops = checks.check_float("flops", flops, 0.0, None)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch optimizer or None, got {type(optimizer).__name__}")
    if control is not None and not isinstance(control, GrowControl):
        raise ValueError(f"control must be a GrowControl or None, got {type(control).__name__}")
    if name is not None:
        checks.check_str("name", name, 200)
    result = _run_stage(model, ds, stage, config, index, step, flops, optimizer, callbacks, control,
                        name or f"{ds.name}-grow")
    import pandas as pd

    result.run.metrics = pd.concat(result.frames, ignore_index=True)
    return result


def _run_stage(model: nn.Module, ds, s: Stage, config: TrainConfig, index: int, step: int, flops_total: float,
               opt, callbacks, control, name: str) -> StageResult:
    """:func:`grow_stage` on checked arguments (``run.metrics``: the training metrics only)."""
    import pandas as pd

    from . import training as _training
    from .models import count_params

    seq_len = ds.sequence_length
    old_blocks = {id(b) for b in _blocks(model)}
    _apply_op(model, s)
    _apply_freeze(model, s.freeze, old_blocks)
    opt = rebuild_optimizer(model, opt, config, lr=s.lr or config.lr)
    cfg = dataclasses.replace(config, steps=s.steps, lr=s.lr or config.lr, seed=config.seed + index,
                              warmup=config.warmup if index == 0 else 0)
    per_example = flops_per_example(model, seq_len)
    extra = {"stage": index, "op": s.op, "n_layers": len(_blocks(model)),
             "trainable_params": count_params(model, trainable_only=True)}
    book = _Bookkeeping(flops_total, per_example, len(ds.x_train), cfg.batch_size, step, control)
    cbs = [book, FadeIn(), *callbacks, _ControlCheck(book)]
    # evaluate at the start of every stage (right after growth, so function preservation shows)
    rows = [{"step": step, "split": split, "metric": metric, "value": value, **extra, "flops": flops_total}
            for split in ("train", "val")
            for metric, value in _training.evaluate(model, ds, split, cfg.eval_max).items()]
    start = pd.DataFrame(rows)
    run = _training.train(model, ds, cfg, callbacks=cbs, optimizer=opt, start_step=step,
                          name=f"{name}-stage{index}", extra=extra)
    m = run.metrics
    if "flops" in m.columns and m["flops"].isna().any():
        m["flops"] = [book.flops_at(s_) if pd.isna(f) else f for s_, f in zip(m["step"], m["flops"])]
    elif "flops" not in m.columns:
        m["flops"] = [book.flops_at(s_) for s_ in m["step"]]
    done_steps = int(m["step"].max()) - step if len(m) else 0
    interrupted = book.interrupted
    if run.status == "diverged":
        status = "diverged"
    elif run.status == "cancelled" and interrupted != "add_layer":
        status = "cancelled"
    else:
        status = "completed"
    run.train_config, run.status = cfg, status
    return StageResult(stage=s, index=index, run=run, frames=[start, m], train_config=cfg, optimizer=opt,
                       steps_done=done_steps, step=step + done_steps, flops=book.flops_at(step + done_steps),
                       interrupted=interrupted, status=status)


def grow(model: nn.Module, dataset, schedule=None, config: TrainConfig | None = None, *, store=None,
         group: str | None = None, name: str | None = None, callbacks=(), control: GrowControl | None = None,
         optimizer: torch.optim.Optimizer | None = None, on_stage=None, criterion: str | None = None,
         tau: float = 2.0, check_every: int | None = None, candidates=CANDIDATES, widen_factor: float = 2.0,
         score_examples: int = 64, damping: float = 1e-4, max_growths: int = 8, cooldown: int = 0):
    """Train ``model`` in place through a growth ``schedule``; returns one :class:`~workbench.training.Run`.

    Each stage is one :func:`grow_stage`: it applies its operation (``train``: none,
    ``add_layer``, ``stack``), sets what is frozen, rebuilds AdamW keeping the state of existing
    parameters (:func:`rebuild_optimizer`), evaluates once right after the operation (so
    function preservation shows on the curves) and trains ``steps`` steps with ``wb.train``.
    Stage ``k`` trains with ``replace(config, steps=stage.steps, lr=stage.lr or config.lr,
    seed=config.seed + k)``; warm-up applies to the first stage only.

    The Run's metrics carry the columns ``stage``, ``op``, ``n_layers``, ``trainable_params`` and
    cumulative training ``flops`` (:mod:`workbench.flops`). With ``store``, every stage is
    saved when it ends (weights at that point, metrics so far) with
    ``meta = {"group", "stage", "parent", ...}``; the returned Run is the last stage's entry.
    ``control`` (a :class:`GrowControl`) lets another thread add a layer now or stop.
    ``on_stage(run_k)`` is called after each stage (the dashboard refreshes its strip there).

    ``criterion="natural"`` (then ``schedule`` is None): growth decides itself when and where. Training
    runs ``config.steps`` steps in stages of ``check_every`` (default ``config.steps // 10``); after each,
    the natural expansion score ``eta`` (:func:`natural_score`, ``score_examples`` training examples,
    ``damping``) of the model and ``eta'`` of every candidate (:func:`expansion_candidates`: a zero block
    at each insertion point, each block widened by ``widen_factor``) are computed; the best candidate is
    applied (function preserving) when ``eta'/eta > tau``, at most ``max_growths`` times, and the next
    ``cooldown`` checks after a growth are skipped (Deaconu et al.'s cool-down). The trace, one
    row per candidate and check (``step, candidate, op, eta, eta_new, eta_ratio, accepted, n_layers,
    widths``), is ``run.meta["trace"]`` (:func:`trace_table`). Definition: ``docs/definitions.md#natural-growth``.
    """
    import uuid

    import pandas as pd

    from . import training as _training
    from .permute import check_model_data

    ds = _dataset_obj(dataset)
    check_model_data(model, ds)
    config = (config or TrainConfig()).validate()
    if criterion is None:
        stages = check_schedule(schedule, len(_blocks(model)))
        _check_depth(model, max([len(_blocks(model))] + _depths(stages, len(_blocks(model)))), "the schedule")
    else:
        checks.check_choice("criterion", criterion, CRITERIA)
        if schedule is not None:
            raise ValueError("give a schedule or a criterion, not both (criterion='natural' plans its own stages)")
        opts = check_criterion(config, len(_blocks(model)), tau=tau, check_every=check_every, candidates=candidates,
                               widen_factor=widen_factor, score_examples=score_examples, damping=damping,
                               max_growths=max_growths, cooldown=cooldown)
        tau, check_every, candidates = opts["tau"], opts["check_every"], opts["candidates"]
        widen_factor, score_examples, damping = opts["widen_factor"], opts["score_examples"], opts["damping"]
        max_growths, cooldown = opts["max_growths"], opts["cooldown"]
        stages = []
    for arg, v in (("group", group), ("name", name)):
        if v is not None:
            checks.check_str(arg, v, 200)
    group = group or f"grow-{uuid.uuid4().hex[:8]}"
    name = name or f"{ds.name}-grow"
    flops_total, step, parent = 0.0, 0, None
    frames, run_ids, stage_log = [], [], []
    opt, status = optimizer, "completed"
    pending = list(stages)
    stage_idx = 0
    last_cfg = config
    trace: list[dict] = []
    growths, steps_left, cool = 0, config.steps if criterion is not None else 0, 0
    if criterion is not None:
        pending = [Stage("train", min(check_every, steps_left))]
    while pending:
        s = pending.pop(0)
        if criterion is not None:
            stages.append(s)
        res = _run_stage(model, ds, s, config, stage_idx, step, flops_total, opt, callbacks, control, name)
        opt, last_cfg, run_k = res.optimizer, res.train_config, res.run
        frames += res.frames
        step, flops_total, status = res.step, res.flops, res.status
        entry = {**s.to_dict(), "stage": stage_idx, "steps_done": res.steps_done, "n_layers": len(_blocks(model)),
                 "widths": _widths_of(model), "frozen": frozen_layers(model), "interrupted": res.interrupted,
                 "flops": flops_total, "end_step": step}
        stage_log.append(entry)
        run_k.metrics = pd.concat(frames, ignore_index=True)
        run_k.name = f"{name}-stage{stage_idx}"
        run_k.meta = {"group": group, "stage": stage_idx, "parent": parent, "op": s.op,
                      "frozen": frozen_layers(model), "flops": flops_total, "schedule": [st.to_dict() for st in stages]}
        if criterion is not None:
            run_k.meta.update(criterion=criterion, tau=tau, trace=list(trace))
        if store is not None:
            parent = store.save(run_k)
            run_ids.append(parent)
        if on_stage is not None:
            on_stage(run_k)
        stage_idx += 1
        if status != "completed":
            break
        if res.interrupted == "add_layer" and control is not None:
            init = control.take() or "zero"
            rest = s.steps - res.steps_done
            pending.insert(0, dataclasses.replace(s, op="add_layer", n=1, init=init, position="top",
                                                  steps=max(rest, 1)))
            continue
        if criterion is not None:
            steps_left -= res.steps_done
            if steps_left <= 0:
                break
            nxt = Stage("train", min(check_every, steps_left))
            if cool > 0:
                cool -= 1
            elif growths < max_growths:
                x, y = _sample(ds, score_examples, config.seed + stage_idx)
                x, y = x.to(model.device), y.to(model.device)
                eta, rows = score_candidates(model, x, y, candidates, factor=widen_factor, damping=damping)
                best = max(rows, key=lambda r: r["eta_ratio"]) if rows else None
                accept = best is not None and best["eta_ratio"] > tau
                for r in rows:
                    trace.append({"step": step, "candidate": r["candidate"], "op": r["op"], "eta": r["eta"],
                                  "eta_new": r["eta_new"], "eta_ratio": r["eta_ratio"],
                                  "accepted": bool(accept and r is best), "n_layers": len(_blocks(model)),
                                  "widths": _widths_of(model)})
                if accept:
                    growths, cool = growths + 1, cooldown
                    if best["op"] == "add_layer":
                        nxt = Stage("add_layer", nxt.steps, init="zero", position=best["position"])
                    else:
                        nxt = Stage("widen", nxt.steps, init="zero", layer=best["layer"], factor=best["factor"])
            pending.append(nxt)
    metrics = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["step", "split", "metric", "value"])
    run = _training.Run(model=model, train_config=last_cfg, dataset=ds.spec(), metrics=metrics, status=status,
                        name=name, optimizer=opt, run_id=run_ids[-1] if run_ids else None,
                        meta={"group": group, "stage": stage_idx - 1, "parent": run_ids[-2] if len(run_ids) > 1 else None,
                              "stages": stage_log, "stage_run_ids": run_ids, "flops": flops_total})
    if criterion is not None:
        run.meta.update(criterion=criterion, tau=tau, trace=trace)
    return run


def check_criterion(config: TrainConfig, n_layers: int, *, tau: float = 2.0, check_every: int | None = None,
                    candidates=CANDIDATES, widen_factor: float = 2.0, score_examples: int = 64,
                    damping: float = 1e-4, max_growths: int = 8, cooldown: int = 0) -> dict:
    """Validate the options of ``grow(criterion="natural", ...)`` for ``config`` and a model of ``n_layers``
    blocks; returns them checked (``check_every`` filled in: ``config.steps // 10`` by default)."""
    config = config.validate()
    tau = checks.check_float("tau", tau, 1.0, 1e9)
    check_every = checks.check_int("check_every", check_every, 1, config.steps) if check_every is not None \
        else max(1, config.steps // 10)
    if isinstance(candidates, str) or not hasattr(candidates, "__iter__"):
        raise ValueError(f"candidates must be a non-empty list of distinct values from {list(CANDIDATES)}, "
                         f"got {candidates!r}")
    candidates = list(checks.check_choices("candidates", list(candidates), CANDIDATES))
    if n_layers == 0 and "add_layer" not in candidates:
        raise ValueError("candidates: a model with 0 blocks can only grow by 'add_layer'; include it")
    return {"tau": tau, "check_every": check_every, "candidates": candidates,
            "widen_factor": checks.check_float("widen_factor", widen_factor, 1.0, 64.0, lo_open=True),
            "score_examples": checks.check_int("score_examples", score_examples, 1, MAX_SCORE_EXAMPLES),
            "damping": checks.check_float("damping", damping, 0.0, 1e6, lo_open=True),
            "max_growths": checks.check_int("max_growths", max_growths, 0, MAX_STAGES),
            "cooldown": checks.check_int("cooldown", cooldown, 0, MAX_STAGES)}


def trace_table(run):
    """The criterion trace of a :func:`grow` run (``criterion="natural"``) as a DataFrame: one row per
    candidate and check, ``step, candidate, op, eta, eta_new, eta_ratio, accepted, n_layers, widths``."""
    import pandas as pd

    cols = ["step", "candidate", "op", "eta", "eta_new", "eta_ratio", "accepted", "n_layers", "widths"]
    meta = getattr(run, "meta", None) or {}
    return pd.DataFrame(list(meta.get("trace", [])), columns=cols)


def timeline_table(run):
    """Depth and width after each stage of a :func:`grow` run: ``stage, op, step, n_layers, width``
    (``width``: hidden units summed over the blocks), ``widths`` (per block)."""
    import pandas as pd

    rows = []
    for e in (getattr(run, "meta", None) or {}).get("stages", []):
        widths = list(e.get("widths", []))
        rows.append({"stage": e["stage"], "op": e["op"], "step": e.get("end_step", 0) - e.get("steps_done", 0),
                     "n_layers": e["n_layers"], "width": int(sum(widths)), "widths": widths})
    return pd.DataFrame(rows, columns=["stage", "op", "step", "n_layers", "width", "widths"])


# ----------------------------------------------------------------------------- width growth

MAX_WIDTH = 65536                # the configs' bound on a block's hidden units


def _mlp_pair(block: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    """``(owner, fc, proj)``: the module holding the block's MLP and its two linear layers."""
    owner = block.mlp if hasattr(block, "mlp") else block
    fc, proj = getattr(owner, "fc", None), getattr(owner, "proj", None)
    if not isinstance(fc, nn.Linear) or not isinstance(proj, nn.Linear):
        raise TypeError(f"don't know how to widen a {type(block).__name__}")
    return owner, fc, proj


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


# ----------------------------------------------------------------------------- MixtureGrowth


class TemplateLinear(nn.Module):
    """A linear layer whose weight is a combination of shared templates: ``W = sum_k coeff[k] T[k]``.

    ``templates`` is a :class:`torch.nn.Parameter` of shape ``(K, out, in)`` shared (by reference) by
    every layer of a :class:`MixtureMLP`; ``coeff`` (``(K,)``) and ``bias`` are the layer's own.
    """

    def __init__(self, templates: nn.Parameter, coeff: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.templates = templates
        self.coeff = nn.Parameter(coeff.clone())
        self.bias = nn.Parameter(bias.clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.coeff, self.templates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class MixtureMLP(nn.Module):
    """MixtureGrowth's template network (Pham et al., WACV 2024), as an MLP classifier:
    ``stem -> relu -> [TemplateLinear -> relu] x n_layers -> readout``.

    The ``n_layers`` hidden-to-hidden layers share one bank of ``n_templates`` templates ``(K, h, h)``;
    each has its own ``K`` coefficients. ``members`` (set by :func:`mixture_grow`) is the number of
    networks the grown one is made of (1 for a trained small network). Definition:
    ``docs/definitions.md#mixture-growth``.
    """

    def __init__(self, d_in: int, n_classes: int, width: int = 32, n_layers: int = 2, n_templates: int = 2,
                 seed: int = 0):
        super().__init__()
        self.d_in = checks.check_int("d_in", d_in, 1, _models.D_IN_MAX)
        self.n_classes = checks.check_int("n_classes", n_classes, 2, _models.N_CLASSES_MAX)
        self.width = checks.check_int("width", width, 1, 4096)
        self.n_layers = checks.check_int("n_layers", n_layers, 1, 64)
        self.n_templates = checks.check_int("n_templates", n_templates, 1, 64)
        self.members = 1
        with _models.seeded(checks.check_seed("seed", seed)):
            self.stem = nn.Linear(d_in, width)
            bound = 1.0 / math.sqrt(width)
            self.templates = nn.Parameter((torch.rand(n_templates, width, width) * 2 - 1) * bound)
            coeff = torch.randn(n_layers, n_templates) / math.sqrt(n_templates)
            self.layers = nn.ModuleList(
                TemplateLinear(self.templates, coeff[i], (torch.rand(width) * 2 - 1) * bound) for i in range(n_layers))
            self.readout = nn.Linear(width, n_classes)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The hidden activations after the stem and after each template layer."""
        h = torch.relu(self.stem(x))
        out = [h]
        for layer in self.layers:
            h = torch.relu(layer(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(x)[-1])


MIXTURE_INITS = ("orthogonal", "zero", "random")


def mixture_grow(members, init: str = "orthogonal", *, seed: int = 0) -> MixtureMLP:
    """Grow ``m >= 2`` trained :class:`MixtureMLP` members (same shape) into one of ``m`` times the width.

    The grown template bank is the members' templates placed on the block diagonal: template ``k`` of
    member ``a`` becomes a ``(m h, m h)`` template that is ``T_a[k]`` in block ``(a, a)`` and also, shifted,
    in every off-diagonal block ``(a, b)``: the grown layer's weight has the members' own combinations
    on the diagonal and **new combinations of the learned templates** in the off-diagonal blocks. The new
    coefficients are

    - ``"orthogonal"`` (default): random, orthogonal to the layer's existing coefficient vectors
      (in the pooled template space), scaled to their mean norm;
    - ``"zero"``: zero, so the grown network computes the members side by side exactly: its hidden
      units are the members' units concatenated and its logits the mean of the members' logits;
    - ``"random"``: N(0, 1/K).

    The stem's rows and the readout's columns are the members' (readout divided by ``m``).
    Definition: ``docs/definitions.md#mixture-growth``.
    """
    checks.check_choice("init", init, MIXTURE_INITS)
    seed = checks.check_seed("seed", seed)
    if isinstance(members, MixtureMLP) or not isinstance(members, (list, tuple)) or len(members) < 2 \
            or not all(isinstance(m, MixtureMLP) for m in members):
        raise ValueError("members must be a list of at least 2 MixtureMLP networks")
    if len(members) > 16:
        raise ValueError(f"members must list at most 16 networks, got {len(members)}")
    a0 = members[0]
    shape = (a0.d_in, a0.n_classes, a0.width, a0.n_layers, a0.n_templates)
    for i, mb in enumerate(members):
        if (mb.d_in, mb.n_classes, mb.width, mb.n_layers, mb.n_templates) != shape:
            raise ValueError(f"members[{i}] has (d_in, n_classes, width, n_layers, n_templates) = "
                             f"{(mb.d_in, mb.n_classes, mb.width, mb.n_layers, mb.n_templates)}, members[0] {shape}")
    m, h, L, K = len(members), a0.width, a0.n_layers, a0.n_templates
    KK = m * K                               # pooled templates: member a's k-th is index a*K + k
    H = m * h
    if H > 4096:
        raise ValueError(f"the grown width would be {H}; at most 4096")
    gen = torch.Generator().manual_seed(seed)
    grown = MixtureMLP(a0.d_in, a0.n_classes, H, L, 1, seed=seed)
    with torch.no_grad():
        # templates: pooled template (a, k) placed in every block (r, c) whose coefficient picks it;
        # a block-structured bank (m*m*KK templates would be needed in general), so the grown network
        # keeps one coefficient vector per (layer, block): W[l][r, c] = sum_j C[l, r, c, j] T_j
        T = torch.stack([t for mb in members for t in mb.templates.detach()])           # (KK, h, h)
        C = torch.zeros(L, m, m, KK, dtype=T.dtype)
        for a, mb in enumerate(members):
            for l, layer in enumerate(mb.layers):
                C[l, a, a, a * K:(a + 1) * K] = layer.coeff.detach()
        for l in range(L):
            old = torch.stack([C[l, a, a] for a in range(m)])                            # (m, KK)
            scale = old.norm(dim=1).mean()
            for r in range(m):
                for c in range(m):
                    if r == c or init == "zero":
                        continue
                    if init == "random":
                        C[l, r, c] = torch.randn(KK, generator=gen, dtype=torch.float64).to(T.dtype) / math.sqrt(KK)
                        continue
                    prev = [C[l, a, a] for a in range(m)] + [C[l, rr, cc] for rr in range(m) for cc in range(m)
                                                            if rr != cc and C[l, rr, cc].abs().sum() > 0]
                    v = torch.randn(KK, generator=gen, dtype=torch.float64)
                    q, _ = torch.linalg.qr(torch.stack(prev).double().T)                 # orthonormal basis of old
                    if q.shape[1] < KK:
                        v = v - q @ (q.T @ v)
                    C[l, r, c] = (v / v.norm().clamp_min(1e-12) * scale.double()).to(T.dtype)
        grown.members = m
        grown.templates = nn.Parameter(T.clone())
        grown.n_templates = KK
        grown.block_coeff = nn.Parameter(C)                                             # (L, m, m, KK)
        grown.stem.weight.copy_(torch.cat([mb.stem.weight for mb in members], 0))
        grown.stem.bias.copy_(torch.cat([mb.stem.bias for mb in members], 0))
        grown.readout.weight.copy_(torch.cat([mb.readout.weight for mb in members], 1) / m)
        grown.readout.bias.copy_(sum(mb.readout.bias for mb in members) / m)
        grown.layers = nn.ModuleList(
            _BlockTemplateLinear(grown, l, torch.cat([mb.layers[l].bias for mb in members], 0)) for l in range(L))
    return grown


class _BlockTemplateLinear(nn.Module):
    """Layer ``l`` of a grown :class:`MixtureMLP`: block ``(r, c)`` of its weight is
    ``sum_j block_coeff[l, r, c, j] templates[j]`` (the members' combinations on the diagonal)."""

    def __init__(self, net: MixtureMLP, l: int, bias: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_net", net)   # not a submodule (no cycle); the net owns templates/coeffs
        self.l = l
        self.bias = nn.Parameter(bias.clone())

    @property
    def coeff(self) -> torch.Tensor:
        return self._net.block_coeff[self.l]

    @property
    def weight(self) -> torch.Tensor:
        blocks = torch.einsum("rcj,joi->rcoi", self._net.block_coeff[self.l], self._net.templates)  # (m, m, h, h)
        m, _, h, _ = blocks.shape
        return blocks.permute(0, 2, 1, 3).reshape(m * h, m * h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def fit_mixture(model: MixtureMLP, x: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 1e-2,
                batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train a :class:`MixtureMLP` with AdamW on ``(x, y)`` for ``steps`` minibatch steps; returns the losses."""
    checks.check_int("steps", steps, 1, MAX_STEPS)
    checks.check_float("lr", lr, 0.0, 10.0, lo_open=True)
    checks.check_int("batch_size", batch_size, 1, 100_000)
    checks.check_features("x", x)
    if x.dim() != 2 or x.shape[1] != model.d_in or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, {model.d_in}) features and y (N,) labels, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    checks.check_labels("y", y, model.n_classes)
    gen = torch.Generator().manual_seed(checks.check_seed("seed", seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------- natural expansion score

MAX_SCORE_EXAMPLES = 4096


def _default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over scored positions (the training loss, without the accuracy count vmap cannot run)."""
    from .data import IGNORE

    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def natural_score(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, damping: float = 1e-4, loss_fn=None,
                  params=None) -> float:
    """The natural expansion score ``eta = g^T F^-1 g`` of Mitchell et al. (2023, Self-Expanding Neural Networks).

    ``g = (1/N) sum_i g_i`` is the gradient of the mean loss over the ``N`` examples ``(x, y)``, ``g_i`` the
    per-example gradient (one backward pass per example), and ``F = diag((1/N) sum_i g_i^2) + damping`` the
    empirical diagonal Fisher, so ``eta = sum_p g_p^2 / (mean_i g_{i,p}^2 + damping)`` over the trainable
    parameters (``params``: an explicit list instead). ``loss_fn(logits, y)``: default the workbench's
    cross-entropy over scored positions (sequence models: mean over one example's tokens). The model
    is scored in eval mode and left as it was. Definition: ``docs/definitions.md#natural-score``.
    """
    damping = checks.check_float("damping", damping, 0.0, 1e6, lo_open=True)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or len(x) != len(y) or len(x) == 0:
        raise ValueError("x and y must be tensors with the same number (>= 1) of examples")
    if len(x) > MAX_SCORE_EXAMPLES:
        raise ValueError(f"x must hold at most {MAX_SCORE_EXAMPLES} examples, got {len(x)}")
    loss_fn = loss_fn or _default_loss
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    seen, ps = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            ps.append(p)
    if not ps:
        raise ValueError("the model has no trainable parameters to score")
    was_training = model.training
    model.eval()
    try:
        g_sum, g_sq = _per_example_moments(model, ps, x, y, loss_fn)
    finally:
        model.train(was_training)
    n = len(x)
    eta = sum(float(((s / n) ** 2 / (q / n + damping)).sum()) for s, q in zip(g_sum, g_sq))
    return eta


def _per_example_moments(model: nn.Module, ps: list, x: torch.Tensor, y: torch.Tensor, loss_fn, chunk: int = 64):
    """``(sum_i g_i, sum_i g_i^2)`` per parameter in float64: per-example gradients by ``torch.func``
    (``vmap`` of ``grad`` in chunks), or one backward pass per example where vmap cannot run the model."""
    from torch.func import functional_call, grad, vmap

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    keys = [names[id(p)] for p in ps] if all(id(p) in names for p in ps) else None
    g_sum = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
    g_sq = [torch.zeros_like(p, dtype=torch.float64) for p in ps]
    if keys is not None:
        fixed = {n: b for n, b in model.named_buffers()}
        fixed.update({n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in
                      {id(q) for q in ps}})

        def one(params, xi, yi):
            logits = functional_call(model, {**fixed, **dict(zip(keys, params))}, (xi[None],), tie_weights=True)
            return loss_fn(logits, yi[None])

        try:
            per = vmap(grad(one), in_dims=(None, 0, 0))
            detached = tuple(p.detach() for p in ps)
            for i in range(0, len(x), chunk):
                grads = per(detached, x[i:i + chunk], y[i:i + chunk])
                for s, q, g in zip(g_sum, g_sq, grads):
                    g = g.double()
                    s += g.sum(0)
                    q += (g * g).sum(0)
            return g_sum, g_sq
        except (RuntimeError, NotImplementedError, TypeError):  # an op vmap has no rule for: loop instead
            for s, q in zip(g_sum, g_sq):
                s.zero_()
                q.zero_()
    for i in range(len(x)):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, ps, allow_unused=True)
        for s, q, g in zip(g_sum, g_sq, grads):
            if g is not None:
                g = g.double()
                s += g
                q += g * g
    return g_sum, g_sq


def _sample(ds, n: int, seed: int):
    x, y = ds.split("train")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[:min(n, len(x))]
    return x[idx], y[idx]


def expansion_candidates(model: nn.Module, candidates=CANDIDATES, *, factor: float = 2.0) -> list[dict]:
    """The function-preserving additions scored by :func:`score_candidates`: a zero-initialised block at
    every insertion point (``add_layer``) and each block's MLP widened by ``factor`` (``widen``, zero
    outgoing weights). Each is ``{"candidate", "op", "position"|"layer", ...}``."""
    checks.check_choices("candidates", list(candidates), CANDIDATES)
    n = len(_blocks(model))
    out = []
    if "add_layer" in candidates and n < MAX_DEPTH:
        out += [{"candidate": f"add_layer@{p}", "op": "add_layer", "position": p} for p in range(n + 1)]
    if "widen" in candidates:
        out += [{"candidate": f"widen@{l}", "op": "widen", "layer": l, "factor": factor} for l in range(n)]
    return out


def _apply_candidate(model: nn.Module, c: dict, seed: int | None = None) -> None:
    if c["op"] == "add_layer":
        add_layer(model, init="zero", position=c["position"], seed=seed)
    else:
        widen(model, c["layer"], c.get("factor", 2.0), init="zero", seed=seed)


def score_candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, candidates=CANDIDATES, *,
                     factor: float = 2.0, damping: float = 1e-4, loss_fn=None) -> tuple[float, list[dict]]:
    """``eta`` of ``model`` and, per candidate, ``eta'`` of a copy grown by it (function preserving, so
    the old parameters' gradients are unchanged and the new parameters' gradients are what the
    addition brings): rows ``candidate, op, eta, eta_new, eta_ratio``. Candidates the config refuses
    (memory budget, bounds) are left out."""
    eta = natural_score(model, x, y, damping=damping, loss_fn=loss_fn)
    rows = []
    for c in expansion_candidates(model, candidates, factor=factor):
        trial = copy.deepcopy(model)
        try:
            _apply_candidate(trial, c)
        except ValueError:
            continue
        eta_new = natural_score(trial, x, y, damping=damping, loss_fn=loss_fn)
        rows.append({**c, "eta": eta, "eta_new": eta_new, "eta_ratio": eta_new / eta if eta > 0 else float("inf")})
    return eta, rows


# ----------------------------------------------------------------------------- compare, sweep


def _as_model_config(ds, model_config):
    """A model config for ``ds``: ``None`` (the family's fit, :func:`workbench.models.config_for`), a dict of
    overrides, or a config (validated)."""
    if model_config is None:
        return _models.config_for(ds)
    if isinstance(model_config, dict):
        return _models.config_for(ds, **model_config)
    return model_config.validate()


def flops_to_reach(metrics, target: float, metric: str = "loss", split: str = "val") -> float:
    """Training FLOPs at which ``metric`` on ``split`` first reaches ``target`` (<= for loss, >= for acc).

    Linear interpolation in FLOPs between the two evaluations around the crossing; NaN if never reached.
    """
    import pandas as pd

    if not isinstance(metrics, pd.DataFrame) or not {"metric", "split", "flops", "step", "value"} <= set(metrics):
        raise ValueError("metrics must be a run's metrics DataFrame with columns step, split, metric, value, flops")
    target = checks.check_float("target", target)
    checks.check_choice("metric", metric, ("loss", "acc"))
    checks.check_choice("split", split, ("train", "val", "batch"))
    m = metrics[(metrics["metric"] == metric) & (metrics["split"] == split)].sort_values(["flops", "step"])
    better = (lambda v: v <= target) if metric == "loss" else (lambda v: v >= target)
    prev = None
    for f, v in zip(m["flops"], m["value"]):
        if better(v):
            if prev is None or prev[1] == v:
                return float(f)
            f0, v0 = prev
            return float(f0 + (f - f0) * (v0 - target) / (v0 - v))
        prev = (f, v)
    return float("nan")


@dataclass
class Comparison:
    """Result of :func:`compare`. ``metrics``: tidy rows of both runs with a ``method`` column."""

    metrics: Any                      # DataFrame: method, stage, step, flops, split, metric, value, ...
    summary: Any                      # DataFrame: one row per method
    target_loss: float                # the from-scratch model's final validation loss
    flops_to_target: dict             # {"grown": FLOPs, "scratch": FLOPs} to reach target_loss
    ratio: float                      # grown / scratch (< 1: growth saves compute); NaN if not reached
    runs: dict = field(default_factory=dict)   # {"grown": Run, "scratch": Run}

    def __repr__(self) -> str:
        return (f"Comparison(target_loss={self.target_loss:.4f}, flops_to_target="
                f"{ {k: f'{v:.3g}' for k, v in self.flops_to_target.items()} }, ratio={self.ratio:.3f})")


def compare(schedule, dataset, model_config=None, config: TrainConfig | None = None, *, start_layers: int | None = None,
            store=None, callbacks=(), name: str | None = None) -> Comparison:
    """A growth schedule against a from-scratch model of the final depth, on equal FLOP budgets.

    The grown model starts from ``model_config`` with ``start_layers`` blocks (default: the
    config's ``n_layers``) and follows ``schedule``; the scratch model is the same config at
    the final depth, same seed, trained with ``config`` for as many steps as fit in the grown
    run's total training FLOPs. ``target_loss`` is scratch's final validation loss, and
    ``flops_to_target`` the FLOPs each needs to first reach it.
    """
    import pandas as pd

    ds = _dataset_obj(dataset)
    config = (config or TrainConfig()).validate()
    mc = _as_model_config(ds, model_config)
    if start_layers is not None:
        checks.check_int("start_layers", start_layers, 0, MAX_DEPTH)
        mc = dataclasses.replace(mc, n_layers=start_layers).validate()
    final_depth = schedule_depths(schedule, mc.n_layers)[-1]
    name = name or f"{ds.name}-compare"

    grown_model = _models.build(mc)
    grown = grow(grown_model, ds, schedule, config, store=store, name=f"{name}-grown", callbacks=callbacks)
    budget = grown.meta["flops"]

    scratch_model = _models.build(dataclasses.replace(mc, n_layers=final_depth))
    seq_len = ds.sequence_length
    per_example = flops_per_example(scratch_model, seq_len)
    steps = steps_for_budget(budget, per_example, len(ds.x_train), config.batch_size)
    scratch = grow(scratch_model, ds, [Stage("train", steps)], config, store=store, name=f"{name}-scratch",
                   callbacks=callbacks)

    target = scratch.final("loss", "val")
    frames, rows, reach = [], [], {}
    for method, run in (("grown", grown), ("scratch", scratch)):
        frames.append(run.metrics.assign(method=method))
        reach[method] = flops_to_reach(run.metrics, target)
        rows.append({"method": method, "n_layers": run.model.config.n_layers,
                     "steps": int(run.metrics["step"].max()), "flops": run.meta["flops"],
                     "val_loss": run.final("loss"), "val_acc": run.final("acc"), "flops_to_target": reach[method]})
    metrics = pd.concat(frames, ignore_index=True)
    cols = ["method"] + [c for c in metrics.columns if c != "method"]
    ratio = reach["grown"] / reach["scratch"] if reach["scratch"] and not math.isnan(reach["scratch"]) else float("nan")
    return Comparison(metrics=metrics[cols], summary=pd.DataFrame(rows), target_loss=target,
                      flops_to_target=reach, ratio=float(ratio), runs={"grown": grown, "scratch": scratch})


def depth_sweep(datasets, depths, model_config=None, config: TrainConfig | None = None, *, seeds=(0,),
                callbacks=()):
    """Final accuracy and loss against depth, each depth trained from scratch with the same steps.

    ``datasets``: one Dataset (or name), a list, or ``{label: Dataset}`` (e.g. khop with hops
    1..3 in the table layout, where ``hops`` look-ups need about ``hops`` blocks:
    ``{h: wb.recipes.KHOP.load_data(hops=h) for h in (1, 2, 3)}``). Returns a tidy
    DataFrame with columns ``task, depth, seed, split, metric, value, flops`` (``flops``:
    the run's training FLOPs).
    """
    import pandas as pd

    from . import training as _training

    if isinstance(datasets, dict):
        items = list(datasets.items())
    elif isinstance(datasets, (list, tuple)):
        items = [(None, d) for d in datasets]
    else:
        items = [(None, datasets)]
    config = (config or TrainConfig()).validate()
    if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
        raise ValueError(f"depths must be a non-empty list of integers in [0, {MAX_DEPTH}], got {depths!r}")
    depths = list(depths)
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DEPTH]
    if bad or not depths:
        raise ValueError(f"depths must be a non-empty list of integers in [0, {MAX_DEPTH}], got {depths!r}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple, range)) \
            or not 1 <= len(seeds) <= MAX_SEEDS:
        raise ValueError(f"seeds must be a list of 1 to {MAX_SEEDS} seeds, got {seeds!r}")
    seeds = [checks.check_seed("seeds[]", s) for s in seeds]
    n_runs = len(items) * len(seeds) * len(depths)
    if n_runs > MAX_SWEEP_RUNS:
        raise ValueError(f"depth_sweep: datasets x seeds x depths = {len(items)} x {len(seeds)} x {len(depths)} = "
                         f"{n_runs} runs; at most {MAX_SWEEP_RUNS} are allowed")
    datasets_ = [(label, _dataset_obj(d)) for label, d in items]
    models_ = [_as_model_config(ds, model_config) for _, ds in datasets_]
    rows = []
    for (label, ds), base_mc in zip(datasets_, models_):
        from .permute import check_model_data

        check_model_data(_models.build(dataclasses.replace(base_mc, n_layers=0)), ds)
        label = label if label is not None else ds.name
        seq_len = ds.sequence_length
        for seed in seeds:
            for depth in depths:
                mc = dataclasses.replace(base_mc, n_layers=depth, seed=seed)
                model = _models.build(mc)
                per_example = flops_per_example(model, seq_len)
                cfg = dataclasses.replace(config, seed=seed, eval_every=config.steps)
                run = _training.train(model, ds, cfg, callbacks=callbacks)
                flops = per_example * examples_seen(int(run.metrics["step"].max()), len(ds.x_train), cfg.batch_size)
                for split in ("train", "val"):
                    for metric in ("loss", "acc"):
                        rows.append({"task": label, "depth": depth, "seed": seed, "split": split, "metric": metric,
                                     "value": run.final(metric, split), "flops": float(flops)})
    return pd.DataFrame(rows)
