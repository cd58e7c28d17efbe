"""The curse of depth (Sun et al. 2025): per layer, the residual's norm growth, in/out cosine, relative
contribution and ``||J - I||`` (Jacobian-vector products), and how much of a measure the deep half of
the stack carries.

Definitions: ``docs/definitions.md#depth-profile``, ``#layernorm-scaling``.
"""
from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn as nn

from ...core import checks
from ...core import monitor as _monitor
from ...residual import contributions, skip_effects
from ...residual.batch import EPS, _tokens
from .runner import BlockRunner, _batch_size, _chunks, _inference
from .similarity import _mask_for

# ============================================================================ 5. the curse of depth


def _jac_dev(run: BlockRunner, l: int, h: torch.Tensor, n_directions: int, g: torch.Generator) -> torch.Tensor:
    """``(n_directions, B)`` of ``||(J_l - I) v||^2`` for random unit ``v`` per example (over all its positions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    shape = h.shape
    for _ in range(n_directions):
        v = torch.randn(shape, generator=g, dtype=torch.float32).to(device=h.device, dtype=h.dtype)
        flat = v.reshape(shape[0], -1)
        v = (flat / flat.norm(dim=1, keepdim=True).clamp_min(EPS)).reshape(shape)
        with sdpa_kernel([SDPBackend.MATH]):
            _, jv = torch.func.jvp(lambda t: run.block(l, t), (h,), (v,))
        out.append((jv - v).float().reshape(shape[0], -1).pow(2).sum(1))
    return torch.stack(out)


def depth_profile(model: nn.Module, x, mask=None, n_directions: int = 4, skip: bool = True, y=None, seed: int = 0,
                  batch_size: int | None = 256, monitor=None) -> pd.DataFrame:
    """Per layer: the measures of the curse of depth (Sun et al. 2025).

    With ``h_l`` the residual entering block ``l`` (``h_L`` final), per token, averaged over tokens
    (``mask`` restricts them):

    - ``resid_norm``: ``||h_l||`` for ``l = 0 .. L`` (the variance growth of Pre-LN);
    - ``norm_growth``: ``||h_{l+1}|| / ||h_l||``; ``cos_in_out``: ``cos(h_l, h_{l+1})`` (= ``1 - BI_l``);
    - ``rel_norm``: our relative contribution ``||h_{l+1} - h_l|| / ||h_l||``
      (:func:`workbench.residual.contributions`, sublayer ``layer``);
    - ``jac_dev``: ``sqrt(E ||(J_l - I) v||^2)`` over ``n_directions`` seeded random directions ``v`` per
      example, uniform on the unit sphere of the example's whole ``(T, C)`` residual, ``J_l`` the block's
      Jacobian at ``h_l`` (``torch.func.jvp``, attention on the math kernel): an estimate of
      ``||J_l - I||_F / sqrt(T C)``, 0 for a block that adds a constant, small for a block near the identity
      (all positions, ``mask`` not applied);
    - ``skip_l2`` (``skip=True``): the output change when the block is skipped (``l2`` of
      :func:`workbench.residual.skip_effects`), how much the output still needs the block.

    Returns ``layer, metric, value``; a stopped monitor ends it early with the rows measured so far.
    ``docs/definitions.md#depth-profile``.
    """
    mon = _monitor.resolve(monitor)
    n_directions = checks.check_int("n_directions", n_directions, 0, 256)
    checks.check_bool("skip", skip)
    seed = checks.check_seed("seed", seed)
    batch_size = _batch_size(batch_size)
    run = BlockRunner(model)
    L = run.n_layers
    if L == 0:
        raise ValueError("model: a depth profile needs at least one block, got n_layers = 0")
    g = torch.Generator().manual_seed(seed)
    sums: dict = {}
    count, jcount = 0, 0

    def add(key, v):
        sums[key] = sums.get(key, 0.0) + float(v)

    with _inference(run.model):
        xb = run.batch(x)
        m_all = _mask_for(run, xb, mask)
        for sl in _chunks(len(xb), batch_size):
            m = m_all[sl]
            h = run.begin(xb[sl])
            hs = [h]
            for i in range(L):
                hs.append(run.block(i, hs[-1]))
            norms = [_tokens(t).float().norm(dim=-1) for t in hs]
            count += int(m.sum())
            for l in range(L + 1):
                add((l, "resid_norm"), norms[l][m].double().sum())
            for l in range(L):
                a, b = _tokens(hs[l]).float(), _tokens(hs[l + 1]).float()
                add((l, "norm_growth"), (norms[l + 1] / norms[l].clamp_min(EPS))[m].double().sum())
                cos = (a * b).sum(-1) / (norms[l].clamp_min(EPS) * norms[l + 1].clamp_min(EPS))
                add((l, "cos_in_out"), cos[m].double().sum())
            if n_directions and not mon.stopped:
                jcount += n_directions * (sl.stop - sl.start)
                for l in range(L):
                    if mon.stopped:
                        break
                    add((l, "jac_dev"), _jac_dev(run, l, hs[l], n_directions, g).double().sum())
                    mon.report((l + 1) / (L + 2), f"||J - I|| of block {l}")
    if count == 0:
        raise ValueError("mask: no token is selected, so there is nothing to average")
    rows = []
    for (l, metric), v in sums.items():
        if metric == "jac_dev":
            rows.append((l, metric, math.sqrt(v / jcount)))
        else:
            rows.append((l, metric, v / count))
    if not mon.stopped:
        contrib = contributions(model, x, mask=mask, batch_size=batch_size)
        contrib = contrib[contrib["sublayer"] == "layer"]
        rows += [(int(r.layer), "rel_norm", float(r.rel_norm)) for r in contrib.itertuples()]
        mon.report((L + 1) / (L + 2), "relative contributions")
    if skip and not mon.stopped:
        eff = skip_effects(model, x, y=y, mask=mask, batch_size=batch_size)
        rows += [(int(r.skipped), "skip_l2", float(r.l2)) for r in eff.output.itertuples()]
    order = {"resid_norm": 0, "norm_growth": 1, "cos_in_out": 2, "rel_norm": 3, "jac_dev": 4, "skip_l2": 5}
    df = pd.DataFrame(rows, columns=["layer", "metric", "value"])
    return df.sort_values(["metric", "layer"], key=lambda c: c.map(order) if c.name == "metric" else c,
                          ignore_index=True)


def deep_half(profile: pd.DataFrame, metrics=("rel_norm", "jac_dev", "skip_l2")) -> pd.DataFrame:
    """How much of each per-layer measure the deep half carries: ``metric, shallow, deep, deep_share``.

    ``shallow``/``deep``: the mean over blocks ``l < L/2`` and ``l >= L/2`` (the middle block of an odd
    stack counts as deep); ``deep_share = sum_deep / sum_all``. An idle deep half (the curse of depth) has
    a small ``deep_share`` of ``skip_l2``, ``rel_norm`` and ``jac_dev``. ``profile``: :func:`depth_profile`.
    """
    if not isinstance(profile, pd.DataFrame) or not {"layer", "metric", "value"} <= set(profile.columns):
        raise ValueError("profile must be a depth_profile table (columns layer, metric, value)")
    blocks = profile[profile["metric"] == "rel_norm"]["layer"]
    L = int(blocks.max()) + 1 if len(blocks) else int(profile["layer"].max())
    rows = []
    for metric in metrics:
        sel = profile[(profile["metric"] == metric) & (profile["layer"] < L)]
        if not len(sel):
            continue
        deep = sel["layer"] >= L / 2 - 1e-9 if L % 2 == 0 else sel["layer"] >= (L - 1) / 2
        v = sel["value"].clip(lower=0)
        total = float(v.sum())
        rows.append((metric, float(sel[~deep]["value"].mean()) if (~deep).any() else float("nan"),
                     float(sel[deep]["value"].mean()), float(v[deep].sum()) / total if total > 0 else float("nan")))
    return pd.DataFrame(rows, columns=["metric", "shallow", "deep", "deep_share"])
