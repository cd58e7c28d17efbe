"""The logit mixture: members' next-token log-probabilities averaged with fixed or per-token gated weights,
and the gate's table over a text.

Definitions: ``docs/definitions.md#logit-mixture``.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..core import data as _data
from ..core.models import seeded
from ..core.training import loss_and_correct
from ..hooks import register_mixture
from .substrate import _out_size, check_substrate

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


@register_mixture
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
        self.register_buffer("weights", (w / w.sum()).to(next(iter(models[0].parameters()), w).device))  # members'
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
        from ..lmc.permute import check_model_data

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
