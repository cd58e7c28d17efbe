"""Effective depth after Csordas et al. (2025): the layer where blocks stop feeding later blocks and its ratio
to the depth, at every stage of a growth group, and the config of a given depth closest to a parameter
budget (depth x width sweeps at fixed parameters).

Definitions: ``docs/definitions.md#effective-depth``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch.nn as nn

from ...core import checks
from ...core import monitor as _monitor
from ...residual import skip_effects
from .runner import _is_native, _read

# ============================================================================ 7. effective depth


def width_for_params(dataset, n_layers: int, params: int, mlp_ratio: int = 2, **overrides):
    """The model config for ``dataset`` with ``n_layers`` blocks whose parameter count is closest to ``params``.

    The width ``d_model`` (a multiple of ``n_heads`` for Transformers, default 2 heads) is searched in
    ``[1, 1024]``; the MLP width is ``mlp_ratio * d_model`` (``d_mlp`` or ``d_hidden``). For a depth x
    width sweep at fixed parameters (Petty et al. 2024). ``overrides`` set other config fields.
    """
    from ...core.models import config_for, family_of

    n_layers = checks.check_int("n_layers", n_layers, 1, 256)
    params = checks.check_int("params", params, 1, 10**10)
    mlp_ratio = checks.check_int("mlp_ratio", mlp_ratio, 1, 64)
    seq = family_of(dataset).name == "transformer"
    heads = checks.check_int("n_heads", overrides.pop("n_heads", 2), 1, 256) if seq else 1
    best = None
    for d in range(heads, 1025, heads):
        size = {"d_mlp": mlp_ratio * d, "n_heads": heads} if seq else {"d_hidden": mlp_ratio * d}
        cfg = config_for(dataset, n_layers=n_layers, d_model=d, **size, **overrides)
        gap = abs(cfg.param_count() - params)
        if best is None or gap < best[0]:
            best = (gap, cfg)
        elif cfg.param_count() > params:
            break
    return best[1]


def _effective(heatmap: pd.DataFrame, L: int, threshold: float) -> dict:
    future = [0.0] * L
    for r in heatmap.itertuples():
        s = int(r.skipped)
        if np.isfinite(r.effect):
            future[s] = max(future[s], float(r.effect))
    peak = max(future) if future else 0.0
    if L < 2 or peak <= 0:
        return {"effective_depth": float("nan"), "ratio": float("nan"), "n_layers": L, "peak_layer": -1,
                "future_effect": future}
    s_star = int(np.argmax(future))
    d = next(s for s in range(s_star + 1, L + 1) if s == L or future[s] < threshold * peak)
    return {"effective_depth": float(d), "ratio": d / L, "n_layers": L, "peak_layer": s_star,
            "future_effect": future}


def effective_depth(model: nn.Module, x=None, y=None, mask=None, threshold: float = 0.5, effects=None,
                    batch_size: int | None = 256) -> dict:
    """The effective depth ``D`` of a model and its ratio ``D / L`` (after Csordas et al. 2025; Hu et al. 2025).

    From the skip heat-map of :func:`workbench.residual.skip_effects` (``E[s, l]``: mean relative change of
    block ``l``'s contribution when block ``s`` is skipped), the future effect of block ``s`` is
    ``F_s = max_{l > s} E[s, l]`` (``F_{L-1} = 0``: nothing follows it). With ``s* = argmax F``, the drop
    begins at ``D = min{s > s* : F_s < threshold F_{s*}}`` (``threshold`` 0.5): blocks ``0 .. D-1`` feed the
    computation of later blocks, blocks from ``D`` on mostly write to the output. ``ratio = D / L``; NaN for
    ``L < 2`` or when no block affects a later one. ``effects``: a :class:`~workbench.residual.SkipEffects`
    already computed (then ``x`` is not needed). Returns ``{effective_depth, ratio, n_layers, peak_layer,
    future_effect}``. ``docs/definitions.md#effective-depth``.
    """
    from ...residual.skip import SkipEffects

    threshold = checks.check_float("threshold", threshold, 0.0, 1.0, lo_open=True, hi_open=True)
    if effects is None:
        if x is None:
            raise ValueError("x is required when no effects are given")
        effects = skip_effects(model, x, y=y, mask=mask, batch_size=batch_size)
    if not isinstance(effects, SkipEffects) or effects.member_layers is not None:
        raise ValueError("effects must be the SkipEffects of one model (not a mixture's)")
    return _effective(effects.heatmap, effects.n_layers, threshold)


def group_runs(store, group: str, device=None) -> list:
    """The runs of a growth group (``grow(..., store=, group=)``), loaded from ``store`` in stage order."""
    checks.check_str("group", group, 200)
    listed = store.list()
    sel = listed[(listed["group_name"] == group) & listed["stage"].notna()]
    if not len(sel):
        raise ValueError(f"group: no stored run belongs to growth group {group!r}")
    sel = sel.sort_values("stage")
    return [store.load(rid, device=device) for rid in sel["run_id"]]


def effective_depth_stages(runs, x, y=None, mask=None, threshold: float = 0.5, monitor=None) -> pd.DataFrame:
    """The effective depth at every growth stage: ``stage, run_id, n_layers, effective_depth, ratio, peak_layer``.

    ``runs``: the stage runs of a growth group (:func:`group_runs`; each a Run whose model is that stage's,
    as loaded from the store) or models; the stage is ``run.meta["stage"]`` (else the position). The same
    ``x`` (and ``mask``) is read by every stage. ``docs/definitions.md#effective-depth``.
    """
    mon = _monitor.resolve(monitor)
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Iterable):
        raise ValueError(f"runs must be a list of runs (or models), got {type(runs).__name__}")
    runs = list(runs)
    rows = []
    for i, r in enumerate(runs):
        if mon.stopped:
            break
        model = getattr(r, "model", r)
        meta = getattr(r, "meta", {}) or {}
        stage = meta.get("stage", i)
        L = len(getattr(model, "blocks", [])) if _is_native(model) else _read(model, f"runs[{i}]").n_layers
        res = effective_depth(model, x, y=y, mask=mask, threshold=threshold) if L >= 1 else \
            {"effective_depth": float("nan"), "ratio": float("nan"), "peak_layer": -1}
        rows.append((stage, getattr(r, "run_id", None), L, res["effective_depth"], res["ratio"], res["peak_layer"]))
        mon.report((i + 1) / len(runs), f"stage {stage}: {L} blocks")
    return pd.DataFrame(rows, columns=["stage", "run_id", "n_layers", "effective_depth", "ratio", "peak_layer"])
