"""Growth by a criterion: the natural expansion score (Mitchell et al. 2023), candidate expansions and
their scores, the check of the criterion's settings, and the tables of a criterion-grown run.

Definitions: ``docs/definitions.md#natural-score``, ``#natural-growth``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..core import checks
from ..core.training import TrainConfig
from .operators import MAX_DEPTH, MAX_STAGES, _blocks, add_layer
from .width import widen

CRITERIA = ("natural",)                        # grow(criterion=...)

CANDIDATES = ("add_layer", "widen")            # what criterion growth may propose

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


# ----------------------------------------------------------------------------- natural expansion score

MAX_SCORE_EXAMPLES = 4096


def _default_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over scored positions (the training loss, without the accuracy count vmap cannot run)."""
    from ..core.data import IGNORE

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
