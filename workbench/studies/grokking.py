"""Grokking on modular addition with Nanda et al.'s progress measures, and Tian's training-fraction threshold.

- :class:`GrokConfig` and :func:`run`: a one-layer Transformer without LayerNorm
  (``TransformerConfig(norm="none")``) trained full-batch with AdamW and strong weight decay on
  ``a + b = (a + b) mod p`` (the ``modadd`` dataset of :mod:`workbench.data`), through
  :func:`workbench.training.train`, so the result is an ordinary :class:`~workbench.training.Run`
  that :class:`~workbench.store.RunStore` saves.
- :class:`ProgressMeasures`: a callback that every ``every`` steps records the Fourier norms of the
  embedding, the key frequencies, the restricted and excluded losses and the sum of squared weights
  (``docs/definitions.md#grok-measures``) into the run's metrics (``split="measure"``).
- :func:`phases`: the three phases (memorisation, circuit formation, clean-up) read off the metrics
  (``docs/definitions.md#grok-phases``).
- :func:`tian_model` / :func:`tian_threshold`: Tian's (2025) two-layer model with frozen one-hot
  inputs and a quadratic activation, swept over ``n / (M ln M)`` (``docs/definitions.md#grok-threshold``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import data, models
from ..core import monitor as _monitor
from ..core.checks import check_choice, check_float, check_int, check_seed
from ..core.training import Callback, Run, TrainConfig, TrainState, train

__all__ = ["GrokConfig", "run", "ProgressMeasures", "fourier_basis", "fourier_norms", "key_frequencies",
           "grid_logits", "nanda_init_", "restricted_excluded", "squared_weights", "phases", "tian_model", "tian_threshold",
           "TIAN_REPORTED", "TIAN_CRITICAL", "TIAN_OPTIMIZERS"]

TIAN_CRITICAL = 2.75  # Tian (2025): predicted critical ratio n / (M ln M)
# Tian (2025), M = 71, 3000 full-batch epochs: test accuracy at n / (M ln M)
TIAN_REPORTED = {1.67: 0.00, 2.75: 0.02, 4.16: 0.81, 5.0: 0.97}
_TIAN_COLUMNS = ["ratio", "n", "train_acc", "test_acc", "seconds"]


@dataclass
class GrokConfig:
    """Everything a grokking run needs (defaults: grok on 2 CPU cores in a few minutes).

    The model is initialised as Nanda et al. (2023) do (:func:`nanda_init_`); with GPT-2's
    ``N(0, 0.02)`` these defaults had not memorised after 1000 steps (train/val accuracy 0.76/0.70).
    Measured here (seed 0, one torch thread, a 2-core machine shared with other jobs):

    - the defaults (40% train): train accuracy 0.99 by step 100, validation 0.5 at step 2100 and
      0.99 at step 3200 (evaluated every 100 steps); 6000 steps in 559 s wall (about 0.09 s a step,
      validation 0.99 reached after about 310 s), of which 7.9 s (1.4%) in the progress measures.
    - ``train_fraction=0.6``: train accuracy 0.99 at step 200, validation 0.99 at step 800
      (1500 steps in 400 s wall, about 0.27 s a step with three runs sharing the two cores).
    - ``p=31, train_fraction=0.6`` (notebook 07): 0.99 train at step 100, validation at step 850.

    The earlier ~0.5 s a step was the loaded machine, not the measures (measured every 100 steps
    they cost about 1% of the run; ``bench/bench_grokking.py`` measures the overhead).
    """

    p: int = 53                   # modulus (prime)
    train_fraction: float = 0.4   # share of the p*p pairs used for training
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int = 256
    lr: float = 3e-3              # AdamW, full batch, constant
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    steps: int = 6000
    eval_every: int = 50          # train/val loss and accuracy every N steps
    grad_clip: float = 0.0        # max gradient norm (0: off)
    every: int = 100              # progress measures every N steps (0: off)
    n_key: int = 5                # number of key frequencies (top embedding Fourier norms)
    seed: int = 0                 # data split and initialisation

    def validate(self) -> "GrokConfig":
        """Check every field; returns self (values stored back as plain Python numbers)."""
        self.p = check_int("p", self.p, 3, 211)
        if any(self.p % q == 0 for q in range(2, int(math.isqrt(self.p)) + 1)):
            raise ValueError(f"p must be a prime in [3, 211], got {self.p}")
        self.train_fraction = check_float("train_fraction", self.train_fraction, 0.01, 0.99)
        self.d_model = check_int("d_model", self.d_model, 4, 1024)
        self.n_heads = check_int("n_heads", self.n_heads, 1, 64)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.d_mlp = check_int("d_mlp", self.d_mlp, 1, 8192)
        self.lr = check_float("lr", self.lr, 0, 1, lo_open=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0, 10)
        self.beta1 = check_float("beta1", self.beta1, 0, 1, hi_open=True)
        self.beta2 = check_float("beta2", self.beta2, 0, 1, hi_open=True)
        self.steps = check_int("steps", self.steps, 1, 1_000_000)
        self.eval_every = check_int("eval_every", self.eval_every, 1, 1_000_000)
        self.grad_clip = check_float("grad_clip", self.grad_clip, 0, 1e6)
        self.every = check_int("every", self.every, 0, 1_000_000)
        self.n_key = check_int("n_key", self.n_key, 1, (self.p - 1) // 2)
        self.seed = check_seed("seed", self.seed)
        return self


# ----------------------------------------------------------------------------- Fourier measures


def fourier_basis(p: int) -> torch.Tensor:
    """Orthonormal Fourier basis of functions on Z_p, rows ``(p, p)``: constant, then ``cos(w_k x)``,
    ``sin(w_k x)`` for ``k = 1..(p-1)/2`` with ``w_k = 2 pi k / p`` (``docs/definitions.md#grok-measures``)."""
    check_int("p", p, 3, 10_000)
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True)


def fourier_norms(embedding: torch.Tensor, p: int) -> np.ndarray:
    """Norm of each frequency ``k = 1..(p-1)/2`` of the number-token embedding ``W_E[:p]`` (``(p, d)``):
    ``sqrt(||c_k^T W_E||^2 + ||s_k^T W_E||^2)`` with ``c_k, s_k`` the unit cos/sin vectors."""
    W = embedding[:p].detach().to("cpu", torch.float64)
    coef = fourier_basis(p) @ W                           # (p, d)
    sq = (coef[1:] ** 2).sum(1).reshape(-1, 2).sum(1)     # cos + sin per frequency
    return sq.sqrt().numpy()


def key_frequencies(norms, n_key: int) -> list[int]:
    """The ``n_key`` frequencies (1-based ``k``) with the largest Fourier norms, in decreasing norm."""
    norms = np.asarray(norms)
    order = np.argsort(-norms, kind="stable")[:n_key]
    return [int(i) + 1 for i in order]


@torch.no_grad()
def grid_logits(model: nn.Module, p: int) -> torch.Tensor:
    """Logits over the ``p`` number tokens at the answer position for every pair: ``(p, p, p)``, ``[a, b, c]``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = model(x.to(device))[:, -1, :p].to("cpu", torch.float64)
    model.train(was)
    return out.reshape(p, p, p)


def _key_directions(p: int, keys) -> torch.Tensor:
    """Unit vectors ``cos(w_k(a+b-c))``, ``sin(w_k(a+b-c))`` over the ``(a, b, c)`` grid: ``(2K, p^3)``."""
    s = torch.arange(p)[:, None] + torch.arange(p)[None, :]              # a + b
    d = (s[:, :, None] - torch.arange(p)[None, None, :]).to(torch.float64)  # a + b - c
    dirs = []
    for k in keys:
        w = 2 * math.pi * k / p
        dirs += [torch.cos(w * d).reshape(-1), torch.sin(w * d).reshape(-1)]
    D = torch.stack(dirs)
    return D / D.norm(dim=1, keepdim=True)


def restricted_excluded(logits: torch.Tensor, keys, train_mask: torch.Tensor) -> tuple[float, float]:
    """``(restricted loss, excluded loss)`` of grid logits ``(p, p, p)`` (``docs/definitions.md#grok-measures``).

    ``L`` projected onto the span of ``cos/sin(w_k(a+b-c))`` for the key frequencies ``keys`` gives the
    restricted logits (cross-entropy over all ``p^2`` pairs); ``L`` minus that projection gives the
    excluded logits (cross-entropy over the training pairs, ``train_mask`` ``(p, p)`` bool).
    """
    p = logits.shape[0]
    L = logits.reshape(-1)
    D = _key_directions(p, keys)
    proj = (D.T @ (D @ L)).reshape(p, p, p)  # directions are orthonormal (distinct k in 1..(p-1)/2)
    target = ((torch.arange(p)[:, None] + torch.arange(p)[None, :]) % p).reshape(-1)
    restricted = F.cross_entropy(proj.reshape(p * p, p), target).item()
    excl = (logits - proj).reshape(p * p, p)
    m = train_mask.reshape(-1)
    excluded = F.cross_entropy(excl[m], target[m]).item()
    return restricted, excluded


def squared_weights(model: nn.Module) -> float:
    """Sum of squared parameters (every parameter once)."""
    return float(sum(float((q.detach().double() ** 2).sum()) for q in model.parameters()))


def _train_mask(dataset: data.Dataset, p: int) -> torch.Tensor:
    m = torch.zeros(p, p, dtype=torch.bool)
    m[dataset.x_train[:, 0], dataset.x_train[:, 2]] = True
    return m


class ProgressMeasures(Callback):
    """Every ``every`` steps (and at the start and end) append rows ``split="measure"`` to the metrics:
    ``fourier_k`` (k = 1..(p-1)/2), ``key_rank_r`` (the r-th key frequency), ``restricted_loss``,
    ``excluded_loss``, ``sum_sq_weights``. ``seconds`` accumulates the time spent measuring."""

    def __init__(self, p: int, every: int = 100, n_key: int = 5):
        self.p = check_int("p", p, 3, 10_000)
        self.every = check_int("every", every, 1, None)
        self.n_key = check_int("n_key", n_key, 1, (self.p - 1) // 2)
        self.seconds = 0.0
        self._mask = None
        self._last = -1

    def measure(self, state: TrainState) -> None:
        t0 = time.perf_counter()
        if self._mask is None:
            self._mask = _train_mask(state.dataset, self.p)
        model, step = state.model, state.step
        norms = fourier_norms(model.tok_embed.weight, self.p)
        keys = key_frequencies(norms, self.n_key)
        restricted, excluded = restricted_excluded(grid_logits(model, self.p), keys, self._mask)
        row = {"step": step, "split": "measure", **state.extra}
        rows = [{**row, "metric": f"fourier_{k + 1}", "value": float(v)} for k, v in enumerate(norms)]
        rows += [{**row, "metric": f"key_rank_{r + 1}", "value": float(k)} for r, k in enumerate(keys)]
        rows += [{**row, "metric": "restricted_loss", "value": restricted},
                 {**row, "metric": "excluded_loss", "value": excluded},
                 {**row, "metric": "sum_sq_weights", "value": squared_weights(model)}]
        state.rows.extend(rows)
        self._last = step
        self.seconds += time.perf_counter() - t0

    def on_start(self, state):
        self.measure(state)

    def on_step(self, state):
        if state.step % self.every == 0:
            self.measure(state)

    def on_end(self, state):
        if state.step != self._last:
            self.measure(state)


# ----------------------------------------------------------------------------- the run


def dataset_for(config: GrokConfig) -> data.Dataset:
    """The ``modadd`` dataset of a (validated) config."""
    return data.load("modadd", p=config.p, train_fraction=config.train_fraction, seed=config.seed)


def model_for(config: GrokConfig, dataset: data.Dataset) -> models.Transformer:
    """One-layer Transformer without LayerNorm for ``dataset`` (GPT-2 init from ``config.seed``)."""
    cfg = models.TransformerConfig.from_dataset(dataset, n_layers=1, d_model=config.d_model,
                                                n_heads=config.n_heads, d_mlp=config.d_mlp, norm="none",
                                                seed=config.seed)
    model = models.build(cfg)
    nanda_init_(model, config.seed)
    return model


@torch.no_grad()
def nanda_init_(model: models.Transformer, seed: int = 0) -> models.Transformer:
    """Nanda et al.'s (2023) initialisation, in place: every weight ``N(0, 1/d_model)`` (std
    ``1/sqrt(d_model)``) except the readout, ``N(0, 1/vocab_size)``; biases 0. GPT-2's ``N(0, 0.02)``
    starts the weights so small that weight decay 1.0 keeps the network near zero: the defaults had
    not memorised after 1000 steps (train/val accuracy 0.76/0.70, an earlier measurement)."""
    d, v = model.config.d_model, model.config.vocab_size
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.requires_grad:
            m.weight.normal_(0.0, (1.0 / math.sqrt(v)) if m is model.readout else 1.0 / math.sqrt(d),
                             generator=gen)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return model


def run(config: GrokConfig | None = None, callbacks=(), device: str | torch.device | None = None) -> Run:
    """Train a grokking run (full-batch AdamW) and return the :class:`~workbench.training.Run`.

    Metrics: the usual ``train``/``val`` loss and accuracy every ``eval_every`` steps, the
    per-step ``batch`` loss, and with ``every > 0`` the progress measures (``split="measure"``,
    :class:`ProgressMeasures`). ``run.meta["grok"]`` holds the config and the measuring time.
    """
    if config is not None and not isinstance(config, GrokConfig):
        raise ValueError(f"config must be a GrokConfig or None, got {type(config).__name__}")
    config = (config or GrokConfig()).validate()
    ds = dataset_for(config)
    model = model_for(config, ds)
    if device is not None:
        model = model.to(device)
    tc = TrainConfig(steps=config.steps, batch_size=len(ds.x_train), lr=config.lr,
                     weight_decay=config.weight_decay, eval_every=config.eval_every, eval_max=0, grad_clip=config.grad_clip,
                     seed=config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            betas=(config.beta1, config.beta2))
    pm = [ProgressMeasures(config.p, config.every, config.n_key)] if config.every else []
    t0 = time.perf_counter()
    out = train(model, ds, tc, callbacks=[*pm, *callbacks], optimizer=opt, name=f"grok-p{config.p}")
    out.meta["grok"] = {**asdict(config), "seconds": time.perf_counter() - t0,
                        "measure_seconds": pm[0].seconds if pm else 0.0}
    return out


def phases(metrics: pd.DataFrame, threshold: float = 0.99) -> dict:
    """Phase boundaries (steps) from a run's metrics (``docs/definitions.md#grok-phases``).

    ``memorised``: first evaluation with train accuracy >= ``threshold``; ``cleanup``: first with
    validation accuracy >= 0.5 (after ``memorised``); ``grokked``: first with validation accuracy >=
    ``threshold``. A boundary not reached is ``None``; ``end`` is the last step.
    """
    check_float("threshold", threshold, 0, 1, lo_open=True)
    m = metrics[metrics["metric"] == "acc"]

    def first(split, level, after=0):
        s = m[(m["split"] == split) & (m["value"] >= level) & (m["step"] >= after)]
        return int(s["step"].min()) if len(s) else None

    mem = first("train", threshold)
    return {"memorised": mem, "cleanup": first("val", 0.5, mem or 0), "grokked": first("val", threshold),
            "end": int(metrics["step"].max()) if len(metrics) else 0}


def measures_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Wide table of the progress measures: one row per measured step (columns ``step`` + measures)."""
    m = metrics[metrics["split"] == "measure"]
    return m.pivot_table(index="step", columns="metric", values="value").reset_index()


# ----------------------------------------------------------------------------- Tian's threshold


class TianModel(nn.Module):
    """``y = V sigma(W [e_a; e_b])`` with frozen one-hot ``e``, ``sigma(x) = x^2`` (Tian 2025)."""

    def __init__(self, M: int, hidden: int):
        super().__init__()
        self.M = M
        self.W = nn.Linear(2 * M, hidden, bias=False)
        self.V = nn.Linear(hidden, M, bias=False)

    def forward(self, ab: torch.Tensor) -> torch.Tensor:  # (N, 2) int -> (N, M)
        Wt = self.W.weight.T                                               # (2M, hidden)
        h = F.embedding(ab[:, 0], Wt) + F.embedding(self.M + ab[:, 1], Wt)  # W [e_a; e_b], (N, hidden)
        return self.V(h ** 2)


def tian_model(M: int = 71, hidden: int = 512, seed: int = 0) -> TianModel:
    """Tian's two-layer model initialised as his code does (``docs/definitions.md#grok-threshold``): the
    ``a`` and ``b`` halves of ``W`` are two ``nn.Linear(M, hidden)``, so ``U(-1/sqrt(M), 1/sqrt(M))`` (not the
    ``1/sqrt(2M)`` of one ``Linear(2M, hidden)``); ``V`` PyTorch's default ``U(-1/sqrt(hidden), 1/sqrt(hidden))``.
    Seeded (global RNG untouched)."""
    check_int("M", M, 3, 1000)
    check_int("hidden", hidden, 1, 65536)
    with models.seeded(check_seed("seed", seed)):
        model = TianModel(M, hidden)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(M)
            model.W.weight.uniform_(-bound, bound)
        return model


TIAN_OPTIMIZERS = ("adam", "adamw")


def tian_threshold(ratios=(1.67, 2.75, 4.16, 5.0), M: int = 71, epochs: int = 3000, hidden: int = 512,
                   lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0, *, optimizer: str = "adam",
                   monitor=None) -> pd.DataFrame:
    """Test accuracy against ``n / (M ln M)`` (``docs/definitions.md#grok-threshold``).

    For each ratio, ``n = round(ratio M ln M)`` of the ``M^2`` pairs (a seeded permutation) train
    Tian's model full-batch for ``epochs`` steps with cross-entropy; the rest test. ``optimizer="adam"``
    (his code): ``torch.optim.Adam`` with ``weight_decay`` as an L2 term added to the gradient, which
    Adam's normalisation makes strong once the data gradient has vanished; ``"adamw"``: decoupled decay
    (``lr * weight_decay`` per step, 1e-7 at the defaults: in effect none, and no generalisation).
    Returns columns ``ratio, n, train_acc, test_acc, seconds``.

    ``monitor`` (:mod:`workbench.monitor`): after each ratio a report whose payload is the table so far;
    its ``stopped`` is read every 50 epochs: once stopped the sweep ends and returns the ratios finished
    (the interrupted one is dropped).
    """
    monitor = _monitor.resolve(monitor)
    check_int("M", M, 3, 1000)
    check_int("epochs", epochs, 1, 1_000_000)
    check_float("lr", lr, 0, 1, lo_open=True)
    check_float("weight_decay", weight_decay, 0, 10)
    check_seed("seed", seed)
    check_choice("optimizer", optimizer, TIAN_OPTIMIZERS)
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__len__") or not len(ratios):
        raise ValueError(f"ratios must be a non-empty list of numbers in (0, {M / math.log(M):.3g}), got {ratios!r}")
    ratios = [check_float(f"ratios[{i}]", r, 0, M / math.log(M), lo_open=True, hi_open=True)
              for i, r in enumerate(ratios)]
    a, b = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
    ab, y = torch.stack([a.reshape(-1), b.reshape(-1)], 1), ((a + b) % M).reshape(-1)
    perm = torch.randperm(M * M, generator=torch.Generator().manual_seed(seed))
    rows = []
    for r in ratios:
        n = max(1, min(M * M - 1, round(r * M * math.log(M))))
        tr, te = perm[:n], perm[n:]
        model = tian_model(M, hidden, seed)
        opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW)(model.parameters(), lr=lr,
                                                                                weight_decay=weight_decay)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            if epoch % 50 == 0 and monitor.stopped:
                return pd.DataFrame(rows, columns=_TIAN_COLUMNS)
            loss = F.cross_entropy(model(ab[tr]), y[tr])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            tr_acc = float((model(ab[tr]).argmax(1) == y[tr]).float().mean())
            te_acc = float((model(ab[te]).argmax(1) == y[te]).float().mean())
        rows.append({"ratio": r, "n": n, "train_acc": tr_acc, "test_acc": te_acc,
                     "seconds": time.perf_counter() - t0})
        monitor.report(len(rows) / len(ratios), f"ratio {len(rows)} / {len(ratios)}",
                       pd.DataFrame(rows, columns=_TIAN_COLUMNS), force=True)
    return pd.DataFrame(rows, columns=_TIAN_COLUMNS)
