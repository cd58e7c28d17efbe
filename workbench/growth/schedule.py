"""Growth schedules: the stages of a growth experiment (``Stage``), their checks and the presets
(layer-wise, G_stack, scratch), and the one-look-up baseline of the khop task they are read against.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from ..core import checks
from .operators import INITS, MAX_DEPTH, MAX_STAGES, MAX_STEPS, _resolve_position
from .width import WIDEN_INITS

# ----------------------------------------------------------------------------- khop baseline

# The preset growth experiments (the khop task in the table layout, the character LM) are
# workbench.recipes.KHOP and workbench.recipes.TEXT.


def _dataset_obj(dataset):
    from ..core import data as _data

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
