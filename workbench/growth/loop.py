"""The growth loop: run a schedule stage by stage (operation, freezing, optimizer, training), save each
stage, and honour a :class:`GrowControl` ("add a block now", stop).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from ..core.flops import examples_seen, flops_per_example
from ..core.training import Callback, TrainConfig
from .natural import CANDIDATES, CRITERIA, _sample, check_criterion, score_candidates
from .operators import (
    INITS,
    MAX_STAGES,
    FadeIn,
    _blocks,
    _check_depth,
    _embedding_modules,
    add_layer,
    freeze,
    frozen_layers,
    rebuild_optimizer,
    stack,
    unfreeze,
)
from .schedule import Stage, _dataset_obj, _depths, check_schedule
from .width import _widths_of, widen

# ----------------------------------------------------------------------------- grow


class GrowControl:
    """Requests from another thread (the dashboard), honoured between steps by :func:`grow`.

    ``request_layer(init)`` asks for one more block now: the current stage ends after the
    step in progress, the block is added (with the stage's freeze policy) and training
    continues for the stage's remaining steps. ``stop()`` ends the whole growth run, as stopping
    :func:`grow`'s ``monitor`` does.
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
                 control: GrowControl | None = None, monitor=None):
        self.flops0, self.per_example = flops0, per_example
        self.n_train, self.batch_size, self.start_step = n_train, batch_size, start_step
        self.control, self.monitor, self._done = control, monitor, 0
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
        """Runs after every other callback of the step: end the stage on a stop or a request."""
        if (self.monitor is not None and self.monitor.stopped) or (
                self.control is not None and self.control.stop_event.is_set()):
            state.stop, self.interrupted = True, "stop"
        elif self.control is not None and self.control.pending():
            state.stop, self.interrupted = True, "add_layer"


class _ControlCheck(Callback):
    def __init__(self, book: _Bookkeeping):
        self.book = book

    def on_step(self, state) -> None:
        self.book.check_control(state)




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
               control: GrowControl | None = None, name: str | None = None, monitor=None) -> StageResult:
    """Run one growth stage on ``model`` in place: its operation, its freezing, then its training.

    The stage's operation (``train``: none, ``add_layer``, ``stack``) is applied, what is frozen is
    set (``stage.freeze``), AdamW is rebuilt keeping the state of existing parameters
    (:func:`rebuild_optimizer`, from ``optimizer``), the model is evaluated once right after the
    operation (so function preservation shows on the curves) and trained ``stage.steps`` steps
    with ``wb.train`` using ``replace(config, steps=stage.steps, lr=stage.lr or config.lr,
    seed=config.seed + index)`` (warm-up in stage 0 only). ``step`` and ``flops`` are where the
    run stands before the stage (its metrics continue from them). :func:`grow` is a loop of these.
    ``monitor`` (:mod:`workbench.monitor`): stopped, the stage ends after the step in progress.
    """
    ds = _dataset_obj(dataset)
    from ..lmc.permute import check_model_data

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
                        name or f"{ds.name}-grow", _monitor.resolve(monitor))
    import pandas as pd

    result.run.metrics = pd.concat(result.frames, ignore_index=True)
    return result


def _run_stage(model: nn.Module, ds, s: Stage, config: TrainConfig, index: int, step: int, flops_total: float,
               opt, callbacks, control, name: str, monitor=None) -> StageResult:
    """:func:`grow_stage` on checked arguments (``run.metrics``: the training metrics only)."""
    import pandas as pd

    from ..core import training as _training
    from ..core.models import count_params

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
    book = _Bookkeeping(flops_total, per_example, len(ds.x_train), cfg.batch_size, step, control, monitor)
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
         score_examples: int = 64, damping: float = 1e-4, max_growths: int = 8, cooldown: int = 0, monitor=None):
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
    ``control`` (a :class:`GrowControl`) lets another thread add a layer now (or stop).
    ``on_stage(run_k)`` is called after each stage (the dashboard refreshes its strip there).
    ``monitor`` (:mod:`workbench.monitor`, default the running job's): stopped, the run ends after the
    step in progress (status ``"cancelled"``, the stage so far saved); progress comes from the
    callbacks (:class:`workbench.jobs.TrainProgress`).

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

    from ..core import training as _training
    from ..lmc.permute import check_model_data

    ds = _dataset_obj(dataset)
    check_model_data(model, ds)
    config = (config or TrainConfig()).validate()
    monitor = _monitor.resolve(monitor)
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
        res = _run_stage(model, ds, s, config, stage_idx, step, flops_total, opt, callbacks, control, name,
                         monitor)
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
