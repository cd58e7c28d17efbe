"""Compose specialists trained over one frozen substrate: logit mixtures and weight-space merges.

Growing Transformers (Bochkov 2025) trains specialists on different corpora over the same
frozen, deterministic embedding table and merges them by averaging their output logits,
with no architectural change. This module provides that merge and the weight-space merges
that need a shared initialisation (specialists fine-tuned from one base), and one table that
says whether a merge beats its parts without forgetting:

>>> import workbench as wb
>>> domains = wb.compose.shared_text(["grammar", "arithmetic"], context=32, corpus_chars=20_000)
>>> cfg = wb.models.config_for(domains["grammar"], d_model=64, embedding="frozen-random")
>>> base = wb.models.build(cfg)
>>> runs = wb.compose.train_specialists(base, domains, wb.TrainConfig(steps=100))
>>> members = {name: run.model for name, run in runs.items()}
>>> merges = {"mixture": wb.compose.LogitMixture(list(members.values())),
...           "TIES": wb.compose.ties(base, list(members.values()), density=0.2)}
>>> table = wb.compose.evaluate(members, merges, domains)       # tidy: model, role, domain, metric, value

Logit mixtures (:class:`LogitMixture`) need only a shared vocabulary and substrate; weight-space
merges (:func:`linear`, :func:`task_arithmetic`, :func:`ties`, :func:`lines`) also need the same
architecture and a shared parent ``base``: a task vector is ``theta_i - theta_base``.

DARE, SLERP and Model Stock are further weight-space merges, all reached through :func:`merge`;
:func:`sequential` merges models one at a time as their tasks arrive (OPCM, averaging, task arithmetic)
and scores each merge on every task seen so far.

Definitions: ``docs/definitions.md#task-arithmetic``, ``#ties``, ``#lines``, ``#logit-mixture``, ``#dare``,
``#slerp``, ``#model-stock``, ``#task-vector-cosine``, ``#opcm``.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks
from . import data as _data
from .models import seeded
from .training import TrainConfig, evaluate as _evaluate_one, loss_and_correct, train

__all__ = ["SubstrateError", "check_substrate", "shared_text", "concat", "train_specialists", "LogitMixture",
           "task_vectors", "linear", "task_arithmetic", "ties", "lines", "dare", "dare_ties", "slerp", "slerp_tensor",
           "model_stock", "model_stock_ratio", "task_cosines", "opcm_project", "opcm", "sequential", "SEQUENTIAL",
           "sweep", "class_tasks", "merge", "MERGES", "evaluate", "summary", "gate_table"]


class SubstrateError(ValueError):
    """Models cannot be composed: different vocabularies, substrates or architectures."""


# ----------------------------------------------------------------------------- checks


def _out_size(model: nn.Module) -> int:
    cfg = model.config
    return cfg.vocab_size if hasattr(cfg, "vocab_size") else cfg.n_classes


def check_substrate(models: Sequence[nn.Module]) -> None:
    """Raise :class:`SubstrateError` unless all models share one vocabulary and one substrate.

    Checked: the model family; the output size (vocabulary or classes); the token strings when
    configs list them; the embedding kind (``"glyph"``, ``"frozen-random"`` or ``"trainable"``);
    and, for frozen embeddings, that the embedding tables are equal element for element.
    """
    models = list(models)
    if not models:
        raise SubstrateError("no models given")
    families = [getattr(m.config, "family", type(m).__name__) for m in models]
    if len(set(families)) > 1:
        raise SubstrateError(f"members belong to different model families: {families}")
    sizes = [_out_size(m) for m in models]
    if len(set(sizes)) > 1:
        raise SubstrateError(f"members have different vocabularies: output sizes {sizes}; "
                             "build every specialist's data with one shared vocabulary (see shared_text)")
    vocabs = [getattr(m.config, "vocab", None) for m in models]
    listed = [v for v in vocabs if v is not None]
    for i, v in enumerate(listed[1:], 1):
        if list(v) != list(listed[0]):
            j = next(k for k, (a, b) in enumerate(zip(listed[0], v)) if a != b)
            raise SubstrateError(f"members have different vocabularies: token {j} is {listed[0][j]!r} in one "
                                 f"and {v[j]!r} in another")
    kinds = [getattr(m.config, "embedding", None) for m in models]
    if len(set(kinds)) > 1:
        raise SubstrateError(f"members use different substrates (embedding kinds {kinds}); "
                             "train specialists over one frozen substrate")
    if kinds[0] in ("glyph", "frozen-random"):
        ref = models[0].tok_embed.weight.detach().cpu()
        for i, m in enumerate(models[1:], 1):
            other = m.tok_embed.weight.detach().cpu()
            if other.shape != ref.shape:
                raise SubstrateError(f"members use different substrates: embedding table of member {i} has shape "
                                     f"{tuple(other.shape)}, member 0 {tuple(ref.shape)}")
            if not torch.equal(other, ref):
                diff = float((other - ref).abs().max())
                raise SubstrateError(f"members use different substrates: the frozen {kinds[0]} embedding of member "
                                     f"{i} differs from member 0's (max |difference| {diff:.3g}); build them with "
                                     "the same vocabulary, d_model, font and seed")


def _check_mergeable(base: nn.Module, models: Sequence[nn.Module]) -> None:
    """Same substrate, same architecture (config fields other than ``seed``) and the same tensors."""
    check_substrate([base, *models])
    base_cfg = dataclasses.asdict(base.config)
    for i, m in enumerate(models):
        cfg = dataclasses.asdict(m.config)
        differ = sorted(k for k in base_cfg if k != "seed" and base_cfg[k] != cfg.get(k))
        if differ:
            raise SubstrateError(f"weight-space merges need one architecture: model {i} differs from the base in "
                                 f"{differ}")
        a, b = base.state_dict(), m.state_dict()
        if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
            raise SubstrateError(f"weight-space merges need one architecture: model {i}'s tensors differ from the base's")


# ----------------------------------------------------------------------------- data


_SHARED_TEXT_REFUSED = ("path", "text", "vocab", "corpus")   # data.load("text") options shared_text sets itself


def shared_text(corpora: Iterable[str] = ("grammar", "arithmetic"), **options) -> dict[str, _data.Dataset]:
    """``{corpus: Dataset}`` of built-in text corpora over one shared vocabulary (sorted union of characters).

    ``options`` are passed to ``data.load("text", ...)`` for every corpus (``context``,
    ``corpus_chars``, ``seed``, ...); the text sources and the vocabulary (``path``, ``text``,
    ``vocab``, ``corpus``) are refused with ``ValueError``. With one vocabulary, models built from any of the datasets
    (``models.config_for``) share token ids and, with a frozen embedding, one substrate.
    """
    if isinstance(corpora, (str, bytes)) or not hasattr(corpora, "__iter__"):
        raise ValueError(f"corpora must be a list of built-in corpus names, got {corpora!r}")
    corpora = list(corpora)
    if not corpora:
        raise ValueError("corpora: shared_text needs at least one corpus")
    for c in corpora:
        checks.check_choice("corpora[]", c, sorted(_data.CORPORA))
    if len(set(corpora)) != len(corpora):
        raise ValueError(f"corpora must not repeat a corpus, got {corpora}")
    refused = [k for k in _SHARED_TEXT_REFUSED if k in options]
    if refused:   # the sources are the built-in corpora, and the vocabulary is built here
        raise ValueError(f"shared_text options must not include {', '.join(_SHARED_TEXT_REFUSED)}: it reads the "
                         f"built-in corpora named in corpora (of {sorted(_data.CORPORA)}) and builds the vocabulary "
                         f"itself; got {', '.join(refused)} (for a text of your own use data.load('text', text=...))")
    chars: set[str] = set()
    for c in corpora:
        chars |= set(_data.load("text", corpus=c, **options).vocab)
    vocab = "".join(sorted(chars))
    return {c: _data.load("text", corpus=c, vocab=vocab, **options) for c in corpora}


def concat(datasets: Mapping[str, _data.Dataset] | Sequence[_data.Dataset], name: str = "mixture") -> _data.Dataset:
    """One dataset holding every part's train and validation examples (same vocabulary and length).

    Used to train a shared base before specialising, and as a calibration set for gates.
    Its ``spec()`` lists the parts' specs under ``parts``.
    """
    checks.check_str("name", name, 200)
    if not isinstance(datasets, (Mapping, list, tuple)):
        raise ValueError(f"datasets must be a dict or list of Datasets, got {type(datasets).__name__}")
    parts = list(datasets.values()) if isinstance(datasets, Mapping) else list(datasets)
    if not parts:
        raise ValueError("datasets: concat needs at least one dataset")
    for d in parts:
        if not isinstance(d, _data.Dataset):
            raise ValueError(f"datasets must hold workbench Datasets, got {type(d).__name__}")
    first = parts[0]
    for d in parts[1:]:
        if d.kind != first.kind or d.n_classes != first.n_classes or d.vocab != first.vocab:
            raise SubstrateError("concat: datasets must share kind and vocabulary")
        if d.x_train.shape[1:] != first.x_train.shape[1:]:
            raise ValueError(f"concat: example shapes differ ({tuple(d.x_train.shape[1:])} vs "
                             f"{tuple(first.x_train.shape[1:])})")
    cat = lambda attr: torch.cat([getattr(d, attr) for d in parts])  # noqa: E731
    return _data.Dataset(name, first.kind, cat("x_train"), cat("y_train"), cat("x_val"), cat("y_val"),
                         first.n_classes, f"concatenation of {len(parts)} datasets: " + "; ".join(
                             d.description for d in parts), first.vocab, {"parts": [d.spec() for d in parts]})


def train_specialists(base: nn.Module, datasets: Mapping[str, _data.Dataset], config: TrainConfig | None = None,
                      callbacks=(), parent: str | None = None, group: str | None = None) -> dict:
    """Fine-tune one copy of ``base`` per dataset: ``{name: Run}``, all from one initialisation.

    ``run.meta`` records ``role="specialist"``, the ``domain``, the ``parent`` run id and the
    ``group`` (if given), so weight-space merges can find their base in the store.
    """
    from .permute import check_model_data

    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty dict {name: Dataset}")
    for name, ds in datasets.items():
        check_model_data(base, ds, f"datasets[{name!r}]")
    if config is not None:
        config.validate()
    runs = {}
    for name, ds in datasets.items():
        run = train(copy.deepcopy(base), ds, config, callbacks=callbacks, name=f"specialist-{name}")
        run.meta = {"role": "specialist", "domain": name, "parent": parent, "group": group}
        runs[name] = run
    return runs


# ----------------------------------------------------------------------------- logit mixture


def _member_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)``: the same computation as ``model(x)``, hook points included."""
    h = model.embed(x)
    for block in model.blocks:
        h = block(h)
    feats = model.features(model.final_norm(h))
    return feats, model.readout(feats)


def _numbers(name: str, values, n: int) -> list[float]:
    """``n`` finite real numbers (bools, strings and complex values refused)."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
        raise ValueError(f"{name} must be {n} numbers (one per model), got {values!r}")
    return [checks.check_float(f"{name}[]", v) for v in values]


class LogitMixture(nn.Module):
    """A model whose logits are a weighted mean of its members' logits (the Growing Transformers merge).

    ``LogitMixture(models, weights=None, mode="logits")``: ``weights`` (one per member, normalised
    to sum 1) default to equal. ``mode="logits"`` averages logits (Bochkov 2025);
    ``mode="probs"`` returns ``log(sum_k w_k softmax(logits_k))``, the log-probabilities of a
    mixture of the members' distributions. :meth:`fit_gate` replaces the fixed weights by
    per-token weights ``softmax(W [f_1; ...; f_K] + b)`` computed from the members' final features
    ``f_k`` at each position (so the mixture stays causal), fitted on a small calibration set.

    Input and output are those of a member (tokens ``(B, T)`` -> logits ``(B, T, V)``), so
    ``wb.evaluate`` and :mod:`workbench.sampling` take a mixture like any model. It has no single
    residual stream: residual-stream tools apply to ``mixture.members[k]`` (each member's hook
    points still fire inside the mixture's forward pass). ``config`` is the first member's with
    the smallest member context.
    """

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float] | None = None, mode: str = "logits"):
        super().__init__()
        models = list(models)
        check_substrate(models)
        checks.check_choice("mode", mode, ("logits", "probs"))
        w = torch.full((len(models),), 1.0 / len(models)) if weights is None else \
            torch.tensor(_numbers("weights", weights, len(models)), dtype=torch.float32)
        if len(w) != len(models) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(models)} non-negative numbers with a positive sum, got {weights!r}")
        self.members = nn.ModuleList(models)
        self.register_buffer("weights", w / w.sum())
        self.mode = mode
        self.gate: nn.Linear | None = None
        cfg = models[0].config
        if hasattr(cfg, "context"):
            cfg = dataclasses.replace(cfg, context=min(m.config.context for m in models))
        self.config = cfg

    def __len__(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def _parts(self, x: torch.Tensor):
        feats, logits = zip(*(_member_forward(m, x) for m in self.members))
        return feats, torch.stack(logits, dim=-2)  # (..., K, V)

    def _weights(self, feats) -> torch.Tensor:
        if self.gate is None:
            return self.weights  # (K,)
        return torch.softmax(self.gate(torch.cat(feats, dim=-1)), dim=-1)  # (..., K)

    def _combine(self, logits: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.mode == "logits":
            return (w.unsqueeze(-1) * logits).sum(-2)
        logw = torch.log(w.clamp_min(1e-30)).unsqueeze(-1)
        return torch.logsumexp(F.log_softmax(logits, dim=-1) + logw, dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[0]

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass with its parts: ``(output (..., V), member logits (..., K, V), weights (..., K))``.

        ``output`` is ``forward(x)``; ``weights`` are the fixed weights broadcast or the gate's
        per-token weights. The residual-stream tools split a mixture's logit with these.
        """
        feats, logits = self._parts(x)
        w = self._weights(feats)
        return self._combine(logits, w), logits, w.expand(*logits.shape[:-1])

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits stacked on a new first axis: ``(K, *x.shape, V)``."""
        return self._parts(x)[1].movedim(-2, 0)

    @torch.no_grad()
    def mixture_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The weight of each member at each position: ``(*x.shape, K)`` (constant without a gate)."""
        feats, logits = self._parts(x)
        return self._weights(feats).expand(*logits.shape[:-1])

    def fit_gate(self, calibration, steps: int = 200, lr: float = 1e-2, batch_size: int = 64,
                 max_examples: int = 512, seed: int = 0) -> "LogitMixture":
        """Fit per-token gating weights on a calibration set; the members stay frozen. Returns ``self``.

        ``calibration``: a Dataset, or several (a list or ``{name: Dataset}``), whose training
        splits (first ``max_examples`` of each) are pooled. The gate starts at the fixed weights
        (zero matrix, bias ``log w``) and minimises the mixture's cross-entropy with AdamW.
        """
        checks.check_int("steps", steps, 1, 1_000_000)
        checks.check_float("lr", lr, 0.0, 10.0, lo_open=True)
        checks.check_int("batch_size", batch_size, 1, 1_000_000)
        checks.check_int("max_examples", max_examples, 1)
        seed = checks.check_seed("seed", seed)
        if isinstance(calibration, _data.Dataset):
            calibration = [calibration]
        if not isinstance(calibration, (Mapping, list, tuple)):
            raise ValueError(f"calibration must be a Dataset, a list or a dict of them, got {type(calibration).__name__}")
        parts = list(calibration.values()) if isinstance(calibration, Mapping) else list(calibration)
        if not parts:
            raise ValueError("calibration must hold at least one Dataset")
        from .permute import check_model_data

        for d in parts:
            for m in self.members:
                check_model_data(m, d, "calibration")
        x = torch.cat([d.x_train[:max_examples] for d in parts])
        y = torch.cat([d.y_train[:max_examples] for d in parts])
        device = self.device
        was_training = self.training
        self.eval()
        with torch.no_grad():  # members are frozen: compute their outputs once
            feats, logits = [], []
            for i in range(0, len(x), 256):
                f, lg = self._parts(x[i:i + 256].to(device))
                feats.append(torch.cat(f, dim=-1))
                logits.append(lg)
            feats, logits = torch.cat(feats), torch.cat(logits)
        gen = torch.Generator().manual_seed(seed)
        with seeded(seed):
            gate = nn.Linear(feats.shape[-1], len(self.members)).to(device)
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.copy_(torch.log(self.weights.clamp_min(1e-30)))
        opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen).to(device)
                w = torch.softmax(gate(feats[idx]), dim=-1)
                loss, _, _ = loss_and_correct(self._combine(logits[idx], w), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in gate.parameters():
            p.requires_grad_(False)
        self.gate = gate
        self.train(was_training)
        return self


# ----------------------------------------------------------------------------- weight-space merges


def _float_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def task_vectors(base: nn.Module, models: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """``theta_i - theta_base`` per model, as ``{name: tensor}`` over the tensors fine-tuning changed.

    Tensors no model changed (the frozen substrate among them) are left out, so sparsity
    settings such as TIES' ``density`` count only what training moved.
    """
    models = list(models)
    if not models:
        raise ValueError("models: a merge needs at least one fine-tuned model")
    _check_mergeable(base, models)
    b = base.state_dict()
    sds = [m.state_dict() for m in models]
    keys = [k for k in _float_keys(base) if any(not torch.equal(sd[k], b[k]) for sd in sds)]
    return [{k: (sd[k] - b[k]).detach().float() for k in keys} for sd in sds]


def _apply(base: nn.Module, vector: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` with ``vector`` added to its tensors."""
    merged = copy.deepcopy(base)
    state = merged.state_dict()
    with torch.no_grad():
        for k, v in vector.items():
            state[k].add_(v.to(state[k].dtype))
    merged.eval()
    return merged


def linear(models: Sequence[nn.Module], weights: Sequence[float] | None = None,
           base: nn.Module | None = None) -> nn.Module:
    """Weighted average of the models' weights (a model soup); equal weights by default.

    Meaningful only for models that share an initialisation. With ``base`` the result equals
    ``task_arithmetic(base, models, scale=1/K)`` for equal weights.
    """
    models = list(models)
    if not models:
        raise ValueError("models: linear needs at least one model")
    _check_mergeable(base if base is not None else models[0], models)
    w = [1.0 / len(models)] * len(models) if weights is None else _numbers("weights", weights, len(models))
    if len(w) != len(models) or abs(sum(w)) < 1e-12:
        raise ValueError(f"weights must be {len(models)} numbers with a non-zero sum, got {weights!r}")
    w = [v / sum(w) for v in w]
    merged = copy.deepcopy(models[0])
    state = merged.state_dict()
    sds = [m.state_dict() for m in models]
    with torch.no_grad():
        for k in _float_keys(merged):
            state[k].copy_(sum(wi * sd[k].float() for wi, sd in zip(w, sds)).to(state[k].dtype))
    merged.eval()
    return merged


def task_arithmetic(base: nn.Module, models: Sequence[nn.Module], scale: float = 1.0) -> nn.Module:
    """``theta_base + scale * sum_i tau_i`` (Ilharco et al. 2023); ``scale`` is usually tuned on validation data."""
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    taus = task_vectors(base, models)
    return _apply(base, {k: scale * sum(t[k] for t in taus) for k in (taus[0] if taus else {})})


def _ties_vector(taus: list[dict[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    if not taus or not taus[0]:
        return {}
    keys = list(taus[0])
    flat = torch.stack([torch.cat([t[k].flatten() for k in keys]) for t in taus])  # (K, N)
    # 1. trim: keep each task vector's top-density fraction of entries by magnitude (over all its entries)
    n_keep = max(1, int(round(density * flat.shape[1])))
    if n_keep < flat.shape[1]:
        thresh = flat.abs().kthvalue(flat.shape[1] - n_keep + 1, dim=1, keepdim=True).values  # (K, 1)
        flat = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
    # 2. elect: the sign of the summed mass per entry (ties at zero take the overall majority sign)
    elected = torch.sign(flat.sum(0))
    majority = 1.0 if elected.sum() >= 0 else -1.0
    elected = torch.where(elected == 0, torch.full_like(elected, majority), elected)
    # 3. disjoint merge: mean over the entries that agree with the elected sign (zeros do not count)
    agree = (torch.sign(flat) == elected) & (flat != 0)
    merged = (flat * agree).sum(0) / agree.sum(0).clamp_min(1)
    out, i = {}, 0
    for k in keys:
        n = taus[0][k].numel()
        out[k] = merged[i:i + n].view_as(taus[0][k])
        i += n
    return out


def ties(base: nn.Module, models: Sequence[nn.Module], density: float = 0.2, scale: float = 1.0) -> nn.Module:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge; ``theta_base + scale * tau_TIES``.

    Trim keeps the ``density`` fraction of largest-magnitude entries of each task vector (over
    the whole vector, as in the authors' code), elect takes the sign of each entry's summed
    trimmed values, and the merge averages only the entries that agree with it.
    """
    checks.check_float("density", density, 0.0, 1.0, lo_open=True)
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    return _apply(base, {k: scale * v for k, v in _ties_vector(task_vectors(base, models), density).items()})


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def lines(base: nn.Module, models: Sequence[nn.Module], alpha: float | None = None, beta: float = 0.5,
          merged: str = "task_arithmetic", density: float = 0.2) -> nn.Module:
    """LiNeS (Wang et al. 2024): scale the merged task vector by depth, ``theta_base + lambda(l) tau``.

    ``lambda(l) = alpha + beta * l / (L - 1)`` for block ``l`` of ``L`` (0-based); tensors outside
    the blocks (embeddings, final norm, readout) get ``alpha``. ``tau`` is the sum of task vectors
    (``merged="task_arithmetic"``) or the TIES vector (``merged="ties"``, with ``density``).
    ``alpha=None`` uses the authors' multi-task rule ``alpha = (|sum_i tau_i|_1 / |tau|_1) / K``
    (``1/K`` for task arithmetic). ``alpha=1, beta=0`` is task arithmetic with scale 1. With one
    model, ``beta = 1 - alpha`` is the single-task edit that keeps shallow layers near the base.
    """
    checks.check_choice("merged", merged, ("task_arithmetic", "ties"))
    checks.check_float("density", density, 0.0, 1.0, lo_open=True)
    if alpha is not None:
        alpha = checks.check_float("alpha", alpha, -100.0, 100.0)
    beta = checks.check_float("beta", beta, -100.0, 100.0)
    taus = task_vectors(base, models)
    if merged == "task_arithmetic":
        tau = {k: sum(t[k] for t in taus) for k in (taus[0] if taus else {})}
    elif merged == "ties":
        tau = _ties_vector(taus, density)
    else:
        raise ValueError(f"merged must be one of ['task_arithmetic', 'ties'], got {merged!r}")
    if alpha is None:
        summed = sum(float(sum(t[k] for t in taus).abs().sum()) for k in tau)
        norm = sum(float(v.abs().sum()) for v in tau.values())
        alpha = (summed / norm) / len(taus) if norm > 0 else 1.0 / max(len(taus), 1)
    n_blocks = len(base.blocks)

    def lam(key: str) -> float:
        m = _BLOCK.search(key)
        return alpha if m is None else alpha + beta * int(m.group(1)) / max(n_blocks - 1, 1)

    return _apply(base, {k: lam(k) * v for k, v in tau.items()})


# ----------------------------------------------------------------------------- DARE, SLERP, Model Stock


def _check_rescale(rescale: str) -> str:
    return checks.check_choice("rescale", rescale, ("density", "l1", "none"))


def _dare_vectors(taus: list[dict[str, torch.Tensor]], density: float, rescale: str,
                  seed: int) -> list[dict[str, torch.Tensor]]:
    """Drop each entry of each task vector with probability ``1 - density`` (one seeded generator), then rescale.

    ``rescale="density"``: divide the kept entries by ``density`` (Yu et al. 2024; the expected
    value is the task vector); ``"l1"``: scale each tensor so its L1 norm equals the undropped
    tensor's (mergekit's ``rescale_norm: l1``); ``"none"``: keep the kept entries as they are.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for tau in taus:
        dropped = {}
        for k, v in tau.items():
            keep = (torch.rand(v.shape, generator=gen) < density).to(v.dtype)
            d = v * keep
            if rescale == "density":
                d = d / density
            elif rescale == "l1":
                after = d.abs().sum()
                d = d * (v.abs().sum() / after) if after > 0 else d
            dropped[k] = d
        out.append(dropped)
    return out


def dare(base: nn.Module, models: Sequence[nn.Module], density: float = 0.5, rescale: str = "density",
         seed: int = 0, scale: float = 1.0) -> nn.Module:
    """DARE (Yu et al. 2024): drop-and-rescale each task vector, then task arithmetic.

    ``theta_base + scale * sum_i DARE(tau_i)``: every entry of every task vector is kept with
    probability ``density`` (seeded by ``seed``) and rescaled by ``1 / density``
    (``rescale="density"``, the paper) or per tensor to the undropped L1 norm (``rescale="l1"``,
    as mergekit does), or not at all (``"none"``). ``density=1`` is :func:`task_arithmetic` exactly.
    Definition: ``docs/definitions.md#dare``.
    """
    density = checks.check_float("density", density, 0.0, 1.0, lo_open=True)
    rescale = _check_rescale(rescale)
    seed = checks.check_seed("seed", seed)
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    dropped = _dare_vectors(task_vectors(base, models), density, rescale, seed)
    return _apply(base, {k: scale * sum(d[k] for d in dropped) for k in (dropped[0] if dropped else {})})


def dare_ties(base: nn.Module, models: Sequence[nn.Module], density: float = 0.5, rescale: str = "density",
              seed: int = 0, scale: float = 1.0) -> nn.Module:
    """DARE's random drop and rescale in place of TIES' trim, then TIES' sign election and disjoint mean.

    ``theta_base + scale * tau`` where ``tau`` is the mean, per entry, of the dropped-and-rescaled
    task vectors whose sign agrees with the sign of their sum (dropped entries do not count), as
    mergekit's ``dare_ties``. Definition: ``docs/definitions.md#dare``.
    """
    density = checks.check_float("density", density, 0.0, 1.0, lo_open=True)
    rescale = _check_rescale(rescale)
    seed = checks.check_seed("seed", seed)
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    dropped = _dare_vectors(task_vectors(base, models), density, rescale, seed)
    return _apply(base, {k: scale * v for k, v in _ties_vector(dropped, 1.0).items()})


SLERP_PARALLEL = 0.9995   # |cos| above which SLERP falls back to linear interpolation (mergekit's DOT_THRESHOLD)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two tensors viewed as flat vectors (computed in float64).

    ``sin((1-t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b`` with ``cos Omega`` the cosine
    of ``a`` and ``b``; linear ``(1-t) a + t b`` when ``|cos Omega| > SLERP_PARALLEL`` or either is zero.
    """
    a64, b64 = a.double(), b.double()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    dot = float((a64.flatten() @ b64.flatten()) / (na * nb))
    if abs(dot) > SLERP_PARALLEL:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    omega = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    s = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / s * a64 + torch.sin(t * omega) / s * b64).to(a.dtype)


def slerp(base: nn.Module | None, models: Sequence[nn.Module], t: float = 0.5) -> nn.Module:
    """SLERP between two models, tensor by tensor (as mergekit): ``t=0`` is ``models[0]``, ``t=1`` ``models[1]``.

    Interpolates the weights themselves (not task vectors); ``base`` is only checked for a shared
    architecture. Tensors equal in both (a frozen substrate) are kept as they are; tensors that are
    nearly parallel are interpolated linearly (:func:`slerp_tensor`). Definition:
    ``docs/definitions.md#slerp``.
    """
    t = checks.check_float("t", t, 0.0, 1.0)
    models = list(models)
    if len(models) != 2:
        raise ValueError(f"models: slerp interpolates between exactly 2 models, got {len(models)}")
    _check_mergeable(base if base is not None else models[0], models)
    merged = copy.deepcopy(models[0])
    state = merged.state_dict()
    sa, sb = models[0].state_dict(), models[1].state_dict()
    with torch.no_grad():
        for k in _float_keys(merged):
            if not torch.equal(sa[k], sb[k]):
                state[k].copy_(slerp_tensor(sa[k], sb[k], t))
    merged.eval()
    return merged


def _cosine(a: torch.Tensor, b: torch.Tensor, dim=None) -> torch.Tensor:
    """Cosine of two tensors (flattened, or along ``dim``); 0 where either is zero."""
    if dim is None:
        a, b, dim = a.flatten(), b.flatten(), 0
    den = a.norm(dim=dim) * b.norm(dim=dim)
    num = (a * b).sum(dim=dim)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def model_stock_ratio(cos: torch.Tensor | float, n: int) -> torch.Tensor:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)`` (``cos`` clipped to [0, 1])."""
    cos = torch.as_tensor(cos, dtype=torch.float64).clamp(0.0, 1.0)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(base: nn.Module, models: Sequence[nn.Module], per_row: bool = False) -> nn.Module:
    """Model Stock (Jang et al. 2024): ``t * mean_i(theta_i) + (1 - t) * theta_0`` per tensor.

    ``t = N cos / (1 + (N - 1) cos)`` with ``cos`` the mean pairwise cosine of the fine-tuned
    offsets ``theta_i - theta_0`` of that tensor (clipped to [0, 1], so opposed offsets give
    ``t = 0``, the base). ``per_row=True`` computes ``cos`` and ``t`` for each row (output unit)
    of tensors with two or more axes, as mergekit's ``filter_wise``. Needs two or more models.
    Definition: ``docs/definitions.md#model-stock``.
    """
    checks.check_bool("per_row", per_row)
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"models: model_stock needs at least 2 fine-tuned models, got {len(models)}")
    taus = task_vectors(base, models)
    n = len(taus)
    out = {}
    for k in taus[0]:
        vs = [t[k].double() for t in taus]
        row = per_row and vs[0].dim() >= 2
        flat = [v.reshape(v.shape[0], -1) for v in vs] if row else vs
        cos = torch.stack([_cosine(flat[i], flat[j], 1 if row else None)
                           for i in range(n) for j in range(i + 1, n)]).mean(0)
        ratio = model_stock_ratio(cos, n)
        if row:
            ratio = ratio.reshape(-1, *([1] * (vs[0].dim() - 1)))
        out[k] = (ratio * sum(vs) / n).float()
    return _apply(base, out)


def task_cosines(base: nn.Module, models, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy ``a, b, cosine``: the cosine of every pair of task vectors (all their entries flattened).

    ``models``: a list or ``{name: model}``; ``names`` label a list (default ``model i``).
    Definition: ``docs/definitions.md#task-vector-cosine``.
    """
    named = _task_names(models, names)
    taus = task_vectors(base, list(named.values()))
    flat = [torch.cat([t[k].flatten().double() for k in t]) if t else torch.zeros(1, dtype=torch.float64)
            for t in taus]
    labels = list(named)
    rows = [{"a": labels[i], "b": labels[j], "cosine": float(_cosine(flat[i], flat[j]))}
            for i in range(len(flat)) for j in range(len(flat))]
    return pd.DataFrame(rows, columns=["a", "b", "cosine"])


def _task_names(models, names=None) -> dict[str, nn.Module]:
    if isinstance(models, Mapping):
        if names is not None:
            raise ValueError("names: give names only with a list of models (a dict names its models)")
        return {str(k): v for k, v in models.items()}
    if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
        raise ValueError(f"models must be a list or a dict of models, got {type(models).__name__}")
    if names is None:
        return {f"model {i}": m for i, m in enumerate(models)}
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != len(models):
        raise ValueError(f"names must give one label per model ({len(models)}), got {names!r}")
    for nm in names:
        checks.check_str("names[]", nm, 200)
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {list(names)}")
    return dict(zip(names, models))


# ----------------------------------------------------------------------------- sequential merging (OPCM)


def _split_rank(s: torch.Tensor, alpha: float) -> int:
    """OPCM's split rank: the first index whose cumulative share of the singular values exceeds ``alpha``."""
    if s.sum() <= 0:
        return 0
    return int((s.cumsum(0) / s.sum() > alpha).float().argmax())


def opcm_project(tau: torch.Tensor, merged: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """OPCM's projection of a 2-D task vector ``tau`` away from the top singular directions of ``merged``.

    With the full SVD ``merged = U S V^T`` and ``P = U^T tau V``: the diagonal of ``P`` is zeroed
    (no ``u_i v_i^T`` component for any ``i``) and its top-left ``r x r`` block, ``r`` the first
    index at which the cumulative share of singular values exceeds ``alpha``; returns ``U P V^T``
    (Tang et al. 2025, the authors' FusionBench code). Definition: ``docs/definitions.md#opcm``.
    """
    m64 = merged.double()
    if m64.norm() == 0:
        return tau.clone()
    u, s, vh = torch.linalg.svd(m64, full_matrices=True)
    p = u.T @ tau.double() @ vh.T
    p.diagonal().zero_()
    r = _split_rank(s, alpha)
    p[:r, :r] = 0
    return (u @ p @ vh).to(tau.dtype)


def _norm(vec: Mapping[str, torch.Tensor]) -> float:
    return float(sum(float(v.double().pow(2).sum()) for v in vec.values())) ** 0.5


SEQUENTIAL = ("opcm", "average", "task_arithmetic")


def _sequential_vectors(taus, method: str, alpha: float, scale: float) -> list[dict[str, torch.Tensor]]:
    """The merged task vector after each task arrives (``len(taus)`` of them)."""
    out = []
    if method == "opcm":
        acc = None
        norms = []
        for tau in taus:
            norms.append(_norm(tau))
            if acc is None:
                acc = {k: v.clone() for k, v in tau.items()}
            else:
                acc = {k: acc[k] + (opcm_project(v, acc[k], alpha) if v.dim() == 2 else v) for k, v in tau.items()}
            total = _norm(acc)
            target = sum(norms) / len(norms)
            out.append({k: v * (target / total) if total > 0 else v.clone() for k, v in acc.items()})
    else:
        acc = None
        for i, tau in enumerate(taus, 1):
            acc = {k: v.clone() for k, v in tau.items()} if acc is None else {k: acc[k] + v for k, v in tau.items()}
            factor = 1.0 / i if method == "average" else scale
            out.append({k: factor * v for k, v in acc.items()})
    return out


def sequential(base: nn.Module, models, method: str = "opcm", datasets=None, alpha: float = 0.5,
               scale: float = 1.0, split: str = "val", max_examples: int = 0):
    """Merge models one at a time as their tasks arrive: ``(merged after each task, table)``.

    ``models``: the fine-tuned models in arrival order (a list, or ``{task: model}``); ``method``:
    ``"opcm"`` (Tang et al. 2025: each new task vector projected by :func:`opcm_project` away from
    the running merge's top singular directions in every 2-D tensor, added to the running sum,
    which is rescaled to the mean norm of the task vectors seen so far), ``"average"``
    (``theta_0 + mean_{i<=t} tau_i``) or ``"task_arithmetic"`` (``theta_0 + scale * sum_{i<=t} tau_i``).
    ``datasets`` (one per model, same order; optional): the table has the loss and accuracy of
    the merge after ``n_tasks`` tasks on every task seen so far, tidy ``method, n_tasks, task,
    metric, value``. Definition: ``docs/definitions.md#opcm``.
    """
    from .permute import check_model_data

    checks.check_choice("method", method, SEQUENTIAL)
    alpha = checks.check_float("alpha", alpha, 0.0, 1.0, hi_open=True)
    scale = checks.check_float("scale", scale, -100.0, 100.0)
    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    named = _task_names(models, list(datasets) if isinstance(datasets, Mapping) and not isinstance(models, Mapping)
                        else None)
    if datasets is not None:
        parts = list(datasets.values()) if isinstance(datasets, Mapping) else datasets
        if not isinstance(parts, (list, tuple)) or len(parts) != len(named):
            raise ValueError(f"datasets must give one Dataset per model ({len(named)}), got "
                             f"{len(parts) if hasattr(parts, '__len__') else parts!r}")
        for name, ds in zip(named, parts):
            check_model_data(base, ds, f"datasets[{name!r}]")
    merged = [_apply(base, v) for v in _sequential_vectors(task_vectors(base, list(named.values())), method,
                                                            alpha, scale)]
    rows = []
    if datasets is not None:
        tasks = list(named)
        for n, model in enumerate(merged, 1):
            for task, ds in zip(tasks[:n], parts[:n]):
                for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                    rows.append({"method": method, "n_tasks": n, "task": task, "metric": metric, "value": value})
    return merged, pd.DataFrame(rows, columns=["method", "n_tasks", "task", "metric", "value"])


def opcm(base: nn.Module, models: Sequence[nn.Module], alpha: float = 0.5) -> nn.Module:
    """The OPCM merge after all ``models`` arrived in order (:func:`sequential` with ``method="opcm"``)."""
    return sequential(base, list(models), "opcm", alpha=alpha)[0][-1]


def sweep(method: str, base: nn.Module, models: Sequence[nn.Module], datasets, knob: str, values,
          split: str = "val", max_examples: int = 0, **options) -> pd.DataFrame:
    """Loss and accuracy of ``merge(method, ..., knob=x)`` on every dataset for each ``x`` in ``values``.

    Tidy ``method, knob, x, domain, metric, value``; e.g. SLERP's accuracy against ``t``.
    """
    from .permute import check_model_data

    checks.check_choice("method", method, sorted(MERGES))
    checks.check_str("knob", knob, 50)
    if knob in options:
        raise ValueError(f"options must not include the swept knob {knob!r}")
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or not 1 <= len(values) <= 101:
        raise ValueError(f"values must be 1 to 101 numbers, got {values!r:.80}")
    xs = [checks.check_float("values[]", v) for v in values]
    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    if not datasets:
        raise ValueError("datasets: sweep needs at least one dataset")
    datasets = dict(datasets) if isinstance(datasets, Mapping) else _named(datasets)
    for domain, ds in datasets.items():
        check_model_data(base, ds, f"datasets[{domain!r}]")
    rows = []
    for x in xs:
        model = merge(method, base, models, **{knob: x}, **options)
        for domain, ds in datasets.items():
            for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                rows.append({"method": method, "knob": knob, "x": x, "domain": domain, "metric": metric,
                             "value": value})
    return pd.DataFrame(rows, columns=["method", "knob", "x", "domain", "metric", "value"])


def class_tasks(dataset: _data.Dataset, groups: Sequence[Sequence[int]]) -> dict[str, _data.Dataset]:
    """``{"classes 0,1": Dataset}``: one task per group of classes, holding only those classes' examples.

    The label space stays the dataset's (a model keeps all its outputs), so models fine-tuned on
    different tasks share one architecture and can be merged; used for the sequential experiment.
    """
    if not isinstance(dataset, _data.Dataset) or dataset.kind != "vector":
        raise ValueError("dataset must be a workbench vector Dataset (e.g. digits)")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"groups must be a non-empty list of lists of class labels, got {groups!r:.80}")
    out = {}
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple)) or not g:
            raise ValueError(f"groups[] must be a non-empty list of class labels, got {g!r:.80}")
        labels = [checks.check_int("groups[][]", c, 0, dataset.n_classes - 1) for c in g]
        if len(set(labels)) != len(labels):
            raise ValueError(f"groups[] must not repeat a class, got {list(g)}")
        name = "classes " + ",".join(map(str, labels))
        if name in out:
            raise ValueError(f"groups must differ, got {list(g)} twice")
        cls = torch.tensor(labels)
        tr, va = torch.isin(dataset.y_train, cls), torch.isin(dataset.y_val, cls)
        if not tr.any() or not va.any():
            raise ValueError(f"groups[]: classes {labels} have no training or validation examples")
        out[name] = _data.Dataset(f"{dataset.name} ({name})", dataset.kind, dataset.x_train[tr], dataset.y_train[tr],
                                  dataset.x_val[va], dataset.y_val[va], dataset.n_classes,
                                  f"{dataset.description}; only {name}", dataset.vocab,
                                  {**dataset.options, "classes": labels})
    return out


MERGES = {
    "linear": lambda base, models, **kw: linear(models, base=base, **kw),
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "lines": lines,
    "dare": dare,
    "dare_ties": dare_ties,
    "slerp": slerp,
    "model_stock": model_stock,
    "opcm": opcm,
}


def merge(method: str, base: nn.Module, models: Sequence[nn.Module], **options) -> nn.Module:
    """One entry point for the weight-space merges: ``method`` in :data:`MERGES`."""
    checks.check_choice("method", method, sorted(MERGES))
    return MERGES[method](base, list(models), **options)


# ----------------------------------------------------------------------------- evaluation


def _named(models) -> dict[str, nn.Module]:
    if models is None:
        return {}
    if isinstance(models, Mapping):
        return dict(models)
    return {f"model {i}": m for i, m in enumerate(models)}


def evaluate(members, merges=None, datasets=None, split: str = "val", max_examples: int = 0,
             references=None) -> pd.DataFrame:
    """Loss and accuracy of every specialist and every merge on every domain, one tidy table.

    ``members`` and ``merges``: ``{name: model}`` (or lists, named ``model i``); ``datasets``:
    ``{domain: Dataset}``; ``references`` (optional, e.g. the shared base) are listed with role
    ``"reference"``. Columns: ``model, role ("specialist"/"merge"/"reference"), domain, metric
    ("loss"/"acc"), value``. See :func:`summary` for the verdict per model.
    """
    from .permute import check_model_data

    checks.check_choice("split", split, ("train", "val"))
    checks.check_int("max_examples", max_examples, 0)
    if not datasets:
        raise ValueError("datasets: evaluate needs at least one dataset")
    datasets = _named(datasets) if not isinstance(datasets, Mapping) else dict(datasets)
    rows = []
    groups = (("specialist", _named(members)), ("merge", _named(merges)), ("reference", _named(references)))
    for role, group in groups:
        for name, model in group.items():
            for domain, ds in datasets.items():
                check_model_data(model, ds, f"datasets[{domain!r}]")
    for role, group in groups:
        for name, model in group.items():
            for domain, ds in datasets.items():
                for metric, value in _evaluate_one(model, ds, split, max_examples).items():
                    rows.append({"model": name, "role": role, "domain": domain, "metric": metric, "value": value})
    return pd.DataFrame(rows, columns=["model", "role", "domain", "metric", "value"])


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model: mean loss and accuracy over domains, and the verdict against the specialists.

    ``worst_gap``: the largest excess loss over the best specialist on any one domain (forgetting
    shows as a large gap); ``beats_parts``: the mean loss is below every specialist's mean loss.
    """
    if not isinstance(table, pd.DataFrame) or not {"model", "role", "domain", "metric", "value"} <= set(table):
        raise ValueError("table must be evaluate()'s DataFrame (model, role, domain, metric, value)")
    loss = table[table["metric"] == "loss"].pivot_table(index="model", columns="domain", values="value", sort=False)
    acc = table[table["metric"] == "acc"].pivot_table(index="model", columns="domain", values="value", sort=False)
    roles = table.drop_duplicates("model").set_index("model")["role"]
    specialists = [m for m in loss.index if roles[m] == "specialist"]
    best = loss.loc[specialists].min() if specialists else loss.min()
    best_mean = loss.loc[specialists].mean(axis=1).min() if specialists else float("nan")
    out = pd.DataFrame({
        "model": loss.index, "role": [roles[m] for m in loss.index],
        "mean_loss": loss.mean(axis=1).values, "mean_acc": acc.loc[loss.index].mean(axis=1).values,
        "worst_gap": (loss - best).max(axis=1).values,
    })
    out["beats_parts"] = out["mean_loss"] < best_mean
    return out.reset_index(drop=True)


def gate_table(mixture: LogitMixture, tokens: torch.Tensor, vocab: Sequence[str] | None = None,
               names: Sequence[str] | None = None) -> pd.DataFrame:
    """Tidy ``position, token, member, weight``: how much each member counts at each position of one sequence.

    ``tokens``: ids ``(T,)``; ``vocab`` turns them into strings; ``names`` label the members.
    """
    if not isinstance(mixture, LogitMixture):
        raise ValueError(f"mixture must be a LogitMixture, got {type(mixture).__name__}")
    tokens = checks.check_tokens("tokens", tokens, _out_size(mixture.members[0])).reshape(-1)
    if not 1 <= len(tokens) <= mixture.config.context:
        raise ValueError(f"tokens must be 1 to {mixture.config.context} token ids (the context), got {len(tokens)}")
    if vocab is not None and (not hasattr(vocab, "__len__") or len(vocab) < _out_size(mixture.members[0])):
        raise ValueError(f"vocab must list {_out_size(mixture.members[0])} token strings, got {len(vocab) if hasattr(vocab, '__len__') else vocab!r}")
    if names is not None and (isinstance(names, str) or len(names) != len(mixture)):
        raise ValueError(f"names must give one label per member ({len(mixture)}), got {names!r}")
    w = mixture.mixture_weights(tokens[None].to(mixture.device))[0].cpu()  # (T, K)
    names = list(names) if names is not None else [f"member {k}" for k in range(len(mixture))]
    rows = [{"position": t, "token": vocab[int(tok)] if vocab is not None else int(tok), "member": names[k],
             "weight": float(w[t, k])} for t, tok in enumerate(tokens) for k in range(w.shape[1])]
    return pd.DataFrame(rows, columns=["position", "token", "member", "weight"])
