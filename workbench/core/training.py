"""Training loop shared by every page: ``train(model, dataset, TrainConfig) -> Run``.

AdamW with a constant or cosine schedule (linear warm-up), epoch-wise shuffling from
``TrainConfig.seed`` (so two runs differ in data order only by that seed), periodic
evaluation on both splits, callbacks for progress and cancellation, and divergence
detection (:func:`diverged`). The model and the data are checked against each other up
front (:func:`check_pairing`). The device is the model's. Metrics are a tidy DataFrame with columns
``step, split, metric, value`` (``split`` is ``"train"``, ``"val"`` or ``"batch"`` for the
per-step minibatch loss).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (SEED_MAX, Interval, OneOf, bounded, check_choice, check_dataset, check_fields, check_int,
                     constraints)
from .data import IGNORE, Dataset
from .monitor import current as _current_job

__all__ = ["TrainConfig", "Run", "TrainState", "Callback", "ProgressBar", "StopOnEvent", "train", "evaluate",
           "loss_and_correct", "make_optimizer", "check_pairing", "diverged", "BLOWUP_FACTOR", "BLOWUP_FLOOR"]

BLOWUP_FACTOR = 100.0   # a loss this many times its split's best so far ...
BLOWUP_FLOOR = 10.0     # ... and above this (and twice the loss of uniform guessing) means divergence


STEPS = Interval(int, 1, 10_000_000)   # optimizer steps of one training (growth's stages read it too)


@dataclass
class TrainConfig:
    steps: int = bounded(500, STEPS)                                 # optimizer steps
    batch_size: int = bounded(64, Interval(int, 1, 1_000_000))       # examples per step
    lr: float = bounded(1e-3, Interval(float, 0, 10, lo_open=True))  # peak learning rate
    weight_decay: float = bounded(0.0, Interval(float, 0, 10))       # AdamW decoupled weight decay
    schedule: str = bounded("constant", OneOf(("constant", "cosine")))  # "cosine": to 0 at the last step
    warmup: int = bounded(0, Interval(int, 0, STEPS.hi))             # linear warm-up steps
    eval_every: int = bounded(50, Interval(int, 1, STEPS.hi))        # evaluate both splits every N steps and at the end
    eval_max: int = bounded(2048, Interval(int, 0, 100_000_000))     # examples per split used for evaluation (0: all)
    grad_clip: float = bounded(1.0, Interval(float, 0, 1e6))         # max gradient norm (0: off)
    seed: int = bounded(0, Interval(int, 0, SEED_MAX))               # data order

    # CHOICES (set below the class): the allowed values of the string fields, from their constraints

    def validate(self) -> "TrainConfig":
        """Check every field's declared constraint (:func:`workbench.checks.check_fields`: bools are not
        numbers); returns self.

        The checked values are stored back as plain Python ``int``/``float``/``str`` (a
        ``numpy.int64`` seed becomes an ``int``, so ``torch.Generator.manual_seed`` and
        ``json.dumps`` take it).
        """
        return check_fields(self)


TrainConfig.CHOICES = MappingProxyType({k: c.values for k, c in constraints(TrainConfig).items()
                                        if isinstance(c, OneOf)})


@dataclass
class Run:
    """A trained model with everything needed to store and reproduce it."""

    model: nn.Module
    train_config: TrainConfig
    dataset: dict                       # Dataset.spec(): what load() needs to rebuild the data
    metrics: pd.DataFrame               # tidy: step, split, metric, value (+ optional extra columns)
    status: str = "completed"           # "completed", "cancelled" or "diverged" (see training.diverged)
    name: str = "run"
    meta: dict = field(default_factory=dict)   # free-form JSON-able extras (growth stage, parent run, ...)
    optimizer: torch.optim.Optimizer | None = None  # kept in memory so training can continue
    run_id: str | None = None           # set by RunStore.save / load

    def final(self, metric: str = "loss", split: str = "val") -> float:
        """Last recorded value of a metric (NaN if absent)."""
        m = self.metrics
        sel = m[(m["metric"] == metric) & (m["split"] == split)]
        return float(sel["value"].iloc[-1]) if len(sel) else float("nan")


@dataclass
class TrainState:
    """What callbacks see. Set ``stop = True`` to end training after this step."""

    model: nn.Module
    dataset: Dataset
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    step: int = 0
    loss: float = float("nan")
    rows: list = field(default_factory=list)
    stop: bool = False
    extra: dict = field(default_factory=dict)  # columns added to every metrics row (e.g. stage)


class Callback:
    """Hooks into :func:`train`; override what you need."""

    def on_start(self, state: TrainState) -> None: ...
    def on_step(self, state: TrainState) -> None: ...
    def on_eval(self, state: TrainState, rows: list[dict]) -> None: ...
    def on_end(self, state: TrainState) -> None: ...


class ProgressBar(Callback):
    """tqdm progress bar (``tqdm.auto``: a widget in notebooks, text in a terminal)."""

    def __init__(self, **tqdm_kwargs):
        self.kwargs = tqdm_kwargs
        self.bar = None

    def on_start(self, state):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.config.steps, **self.kwargs)

    def on_step(self, state):
        self.bar.update(1)
        if state.step % 10 == 0:
            self.bar.set_postfix(loss=f"{state.loss:.4f}")

    def on_end(self, state):
        self.bar.close()


class StopOnEvent(Callback):
    """Stop training when a ``threading.Event`` is set (the dashboard's stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def on_step(self, state):
        if self.event.is_set():
            state.stop = True


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
    """Cross-entropy and number of correct predictions over scored positions.

    logits ``(B, K)`` or ``(B, T, K)``; y ``(B,)`` or ``(B, T)`` with ``IGNORE`` at unscored positions.
    Returns ``(loss, n_correct, n_scored)``; with ``reduction="sum"`` the loss is summed.
    """
    flat_logits, flat_y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_y, ignore_index=IGNORE, reduction=reduction)
    mask = flat_y != IGNORE
    correct = (flat_logits.argmax(-1) == flat_y) & mask
    return loss, int(correct.sum()), int(mask.sum())


EVAL_TOKENS = 2**16  # at most this many positions per evaluation batch (long sequences get smaller batches)


def evaluate(model: nn.Module, dataset: Dataset, split: str = "val", max_examples: int = 0,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on a split (first ``max_examples`` if > 0; 0: all), in eval mode.

    The model and the data are checked first (:func:`check_pairing`). Batches hold at most
    ``batch_size`` examples and :data:`EVAL_TOKENS` positions (the result does not depend on it).
    """
    check_choice("split", split, ["train", "val"])
    check_int("max_examples", max_examples, 0, None)
    check_int("batch_size", batch_size, 1, 1_000_000)
    check_pairing(model, dataset)
    return _evaluate(model, dataset, split, max_examples, batch_size)


@torch.no_grad()
def _evaluate(model: nn.Module, dataset: Dataset, split: str, max_examples: int, batch_size: int = 1024):
    x, y = dataset.split(split)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    if x.dim() > 1 and dataset.sequence_length is not None:  # long sequences: smaller batches
        batch_size = max(1, min(batch_size, EVAL_TOKENS // max(x.shape[1], 1)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        loss, c, n = loss_and_correct(model(xb), yb, reduction="sum")
        total, correct, count = total + float(loss), correct + c, count + n
    model.train(was_training)
    return {"loss": total / max(count, 1), "acc": correct / max(count, 1)}


def check_pairing(model: nn.Module, dataset: Dataset) -> None:
    """Refuse, with a message saying what does not fit, a model and a dataset that cannot go together.

    Checked: the dataset is a :class:`~workbench.data.Dataset` with examples and labels of
    matching lengths; a native MLP (``config.family == "mlp"``) takes vector data with
    ``d_in`` features (floating point) and has at least as many classes as the labels need;
    a Transformer takes sequence data whose token ids and targets fit its ``vocab_size``
    (at least the dataset's vocabulary), whose sequences fit its ``context``, and whose
    vocabulary agrees with the model's ``vocab`` when both list one. Models without a native
    config are only checked for the dataset's own consistency. The family-specific part is the
    config's own ``check_dataset`` (:mod:`workbench.models`). Returns ``None``.
    """
    check_dataset("dataset", dataset)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    name = dataset.name
    for split in ("train", "val"):
        x, y = dataset.split(split)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 1 or y.dim() < 1 \
                or len(x) != len(y):
            raise ValueError(f"dataset {name!r}: the {split} examples and labels must be tensors of one length")
    if len(dataset.x_train) == 0:
        raise ValueError(f"dataset {name!r} has no training examples")
    from .models import FAMILIES

    cfg = getattr(model, "config", None)
    fam = FAMILIES.get(getattr(cfg, "family", None))
    if fam is None or not isinstance(cfg, fam.config):
        return
    if dataset.kind != fam.data_kind:
        raise ValueError(f"model family {fam.name!r} takes {fam.data_kind} data; dataset {name!r} is a "
                         f"{dataset.kind} dataset")
    cfg.check_dataset(dataset)


def diverged(history: list[float], n_classes: int | None = None) -> bool:
    """Whether the last loss of one split's evaluation ``history`` marks the run as diverged.

    The rule: the last loss is not finite, or it is more than :data:`BLOWUP_FACTOR` (100) times
    the best (lowest) loss of the split so far, counting the loss of uniform guessing,
    ``ln(n_classes)``, as a bound on the best, *and* above :data:`BLOWUP_FLOOR` (10) and
    ``2 ln(n_classes)`` (twice the loss of uniform guessing). So a loss of 1.6e13 after 0.3
    diverged, while ordinary overfitting (validation loss from 0.1 to 3) did not.
    """
    if not history:
        return False
    last = history[-1]
    if not math.isfinite(last):
        return True
    guess = math.log(n_classes) if n_classes and n_classes > 1 else math.inf
    best = min([guess, *[v for v in history if math.isfinite(v)]])
    return last > BLOWUP_FACTOR * best and last > max(BLOWUP_FLOOR, 2 * guess if math.isfinite(guess) else 0.0)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; frozen ones are left out entirely."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "cosine":
        span = max(config.steps - config.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - config.warmup, span) / span))
    return 1.0


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless index batches: shuffle every epoch, drop nothing (last batch may be short)."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def train(model: nn.Module, dataset: Dataset, config: TrainConfig | None = None, callbacks=(),
          optimizer: torch.optim.Optimizer | None = None, start_step: int = 0, name: str | None = None,
          extra: dict[str, Any] | None = None, loss_fn=None) -> Run:
    """Train ``model`` in place on ``dataset`` and return a :class:`Run`.

    ``optimizer``: continue with an existing optimizer (its state is kept, e.g. after growth);
    by default a fresh AdamW over trainable parameters. ``start_step`` offsets the recorded
    steps so stages of a growth schedule line up. ``extra`` columns are added to every row.
    ``loss_fn(model, x, y) -> scalar`` replaces the cross-entropy of a minibatch (e.g. mixup,
    :class:`workbench.collapse.MixupLoss`); evaluation always reports plain cross-entropy.

    The model and the data are checked against each other first (:func:`check_pairing`), and
    a native model's memory for this batch size against the budget
    (:func:`workbench.models.check_memory`). A NaN or infinite minibatch loss stops training
    with ``status="diverged"``; so does an evaluation whose train or validation loss blew up
    (:func:`diverged`: more than 100x the split's best and above 10), which also records
    ``run.meta["diverged"]`` (step, split, loss, best). Run as a job with a step budget
    (:func:`workbench.monitor.current`'s ``take_steps``), training stops as ``"cancelled"`` where the
    budget ends, with a final evaluation, like a Stop.
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig or None, got {type(config).__name__}")
    config = (config or TrainConfig()).validate()
    check_int("start_step", start_step, 0, None)
    check_pairing(model, dataset)
    from .models import FAMILIES, check_memory

    if isinstance(getattr(model, "config", None), tuple(f.config for f in FAMILIES.values())):
        check_memory(model.config, min(config.batch_size, len(dataset.x_train)))
    device = next(model.parameters()).device
    optimizer = optimizer or make_optimizer(model, config)
    base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    state = TrainState(model, dataset, config, optimizer, step=start_step, extra=dict(extra or {}))
    gen = torch.Generator().manual_seed(config.seed)
    batches = _batches(len(dataset.x_train), config.batch_size, gen)
    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    status, t0 = "completed", time.perf_counter()
    history: dict[str, list[float]] = {"train": [], "val": []}
    blowup: dict = {}

    def record_eval(step: int) -> None:
        rows = []
        for split in ("train", "val"):
            for metric, value in _evaluate(model, dataset, split, config.eval_max).items():
                rows.append({"step": step, "split": split, "metric": metric, "value": value, **state.extra})
                if metric == "loss" and not blowup:
                    history[split].append(value)
                    if diverged(history[split], dataset.n_classes):
                        best = min((v for v in history[split][:-1] if math.isfinite(v)), default=None)
                        blowup.update(step=step, split=split, loss=value, best=best)
        rows.append({"step": step, "split": "train", "metric": "seconds", "value": time.perf_counter() - t0,
                     **state.extra})
        state.rows.extend(rows)
        for cb in callbacks:
            cb.on_eval(state, rows)

    for cb in callbacks:
        cb.on_start(state)
    job = _current_job()   # a job's step budget (a student's on a class server) counts every training in it
    model.train()
    with torch.enable_grad():
        for i in range(config.steps):
            if not job.take_steps(1):
                status = "cancelled"
                break
            idx = next(batches).to(device)
            factor = _lr_factor(i, config)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * factor
            xb, yb = x_train[idx], y_train[idx]
            loss = loss_fn(model, xb, yb) if loss_fn is not None else loss_and_correct(model(xb), yb)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               config.grad_clip)
            optimizer.step()
            state.step = start_step + i + 1
            state.loss = float(loss.detach())
            state.rows.append({"step": state.step, "split": "batch", "metric": "loss", "value": state.loss,
                               **state.extra})
            if not math.isfinite(state.loss):
                status = "diverged"
                break
            for cb in callbacks:
                cb.on_step(state)
            if state.stop:
                status = "cancelled"
                break
            if (i + 1) % config.eval_every == 0 or i + 1 == config.steps:
                record_eval(state.step)
                if blowup:
                    status = "diverged"
                    break
    if status != "diverged" and (not state.rows or state.rows[-1]["metric"] != "seconds"):
        record_eval(state.step)  # final evaluation after a stop (the run stays "cancelled")
    model.eval()
    for cb in callbacks:
        cb.on_end(state)
    metrics = pd.DataFrame(state.rows, columns=None if state.rows else ["step", "split", "metric", "value"])
    meta = {"diverged": {k: (v if math.isfinite(v) else str(v)) if isinstance(v, float) else v
                         for k, v in blowup.items()}} if blowup and status == "diverged" else {}
    return Run(model=model, train_config=config, dataset=dataset.spec(), metrics=metrics, status=status,
               name=name or f"{dataset.name}-{getattr(model.config, 'family', 'model')}", meta=meta,
               optimizer=optimizer)
