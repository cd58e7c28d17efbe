"""Training loop shared by every page: ``train(model, dataset, TrainConfig) -> Run``.

AdamW with a constant or cosine schedule (linear warm-up), epoch-wise shuffling from
``TrainConfig.seed`` (so two runs differ in data order only by that seed), periodic
evaluation on both splits, callbacks for progress and cancellation, and divergence
detection. The device is the model's. Metrics are a tidy DataFrame with columns
``step, split, metric, value`` (``split`` is ``"train"``, ``"val"`` or ``"batch"`` for the
per-step minibatch loss).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE, Dataset

__all__ = ["TrainConfig", "Run", "TrainState", "Callback", "ProgressBar", "StopOnEvent", "train", "evaluate",
           "loss_and_correct", "make_optimizer"]


@dataclass
class TrainConfig:
    steps: int = 500              # optimizer steps
    batch_size: int = 64          # examples per step
    lr: float = 1e-3              # peak learning rate
    weight_decay: float = 0.0     # AdamW decoupled weight decay
    schedule: str = "constant"    # "constant" or "cosine" (to 0 at the last step)
    warmup: int = 0               # linear warm-up steps
    eval_every: int = 50          # evaluate both splits every N steps (and at the end)
    eval_max: int = 2048          # examples per split used for evaluation (0: all)
    grad_clip: float = 1.0        # max gradient norm (0: off)
    seed: int = 0                 # data order

    def validate(self) -> "TrainConfig":
        checks = [("steps", self.steps, 1, 10_000_000), ("batch_size", self.batch_size, 1, 1_000_000),
                  ("warmup", self.warmup, 0, 10_000_000), ("eval_every", self.eval_every, 1, 10_000_000),
                  ("eval_max", self.eval_max, 0, 100_000_000), ("seed", self.seed, 0, 2**63 - 1)]
        for name, v, lo, hi in checks:
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        for name, v, lo, hi in [("lr", self.lr, 0.0, 10.0), ("weight_decay", self.weight_decay, 0.0, 10.0),
                                ("grad_clip", self.grad_clip, 0.0, 1e6)]:
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be a number in (0, 10], got {self.lr!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be one of ['constant', 'cosine'], got {self.schedule!r}")
        return self


@dataclass
class Run:
    """A trained model with everything needed to store and reproduce it."""

    model: nn.Module
    train_config: TrainConfig
    dataset: dict                       # Dataset.spec(): what load() needs to rebuild the data
    metrics: pd.DataFrame               # tidy: step, split, metric, value (+ optional extra columns)
    status: str = "completed"           # "completed", "cancelled" or "diverged"
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


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, split: str = "val", max_examples: int = 0,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on a split (first ``max_examples`` if > 0), in eval mode."""
    x, y = dataset.split(split)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
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
    A NaN or infinite loss stops training with ``status="diverged"``.
    """
    config = (config or TrainConfig()).validate()
    if dataset.kind == "sequence" and getattr(model.config, "vocab_size", dataset.n_classes) != dataset.n_classes:
        raise ValueError(f"model vocab_size {model.config.vocab_size} != dataset vocabulary {dataset.n_classes}")
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

    def record_eval(step: int) -> None:
        rows = []
        for split in ("train", "val"):
            for metric, value in evaluate(model, dataset, split, config.eval_max).items():
                rows.append({"step": step, "split": split, "metric": metric, "value": value, **state.extra})
        rows.append({"step": step, "split": "train", "metric": "seconds", "value": time.perf_counter() - t0,
                     **state.extra})
        state.rows.extend(rows)
        for cb in callbacks:
            cb.on_eval(state, rows)

    for cb in callbacks:
        cb.on_start(state)
    model.train()
    with torch.enable_grad():
        for i in range(config.steps):
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
    if status != "diverged" and (not state.rows or state.rows[-1]["metric"] != "seconds"):
        record_eval(state.step)  # final evaluation after a stop
    model.eval()
    for cb in callbacks:
        cb.on_end(state)
    metrics = pd.DataFrame(state.rows, columns=None if state.rows else ["step", "split", "metric", "value"])
    return Run(model=model, train_config=config, dataset=dataset.spec(), metrics=metrics, status=status,
               name=name or f"{dataset.name}-{getattr(model.config, 'family', 'model')}", optimizer=optimizer)
