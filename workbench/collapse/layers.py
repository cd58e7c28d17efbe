"""Collapse layer by layer: the feature sites of a model, features collected at each, and the measures per
layer.

Definitions: ``docs/definitions.md#nc-features``, ``#nc-layers``.
"""
from __future__ import annotations

import contextlib

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from .. import hooks
from ..core.data import IGNORE
from ..core.models import HookPoint
from .measure import _check_n_classes, metrics

# ----------------------------------------------------------------------------- features per layer


def sites(model: nn.Module) -> list[tuple[int, str]]:
    """``(layer, hook name)`` pairs where collapse is measured, shallow to deep.

    Layer 0 is the residual stream entering the first block (``blocks.0.resid_pre``),
    layer ``l`` the output of block ``l`` (``blocks.{l-1}.resid_post``), and layer
    ``L + 1`` the readout input ``features`` (after the final norm).
    """
    n = len(model.blocks)
    out = [(0, "blocks.0.resid_pre")] if n else []
    out += [(i + 1, f"blocks.{i}.resid_post") for i in range(n)]
    return out + [(n + 1, "features")]


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[str]):
    """Each named hook site's output appended to a list per name while the block runs (via
    :func:`workbench.hooks.record`, which removes the hooks on exit)."""
    store = {name: [] for name in names}
    with hooks.record(model, names=names, fn=lambda name, t: store[name].append(t)):
        yield store


def _check_sites(model: nn.Module, site_names) -> list[str]:
    if site_names is None:
        return ["features"]
    if isinstance(site_names, (str, bytes)) or not isinstance(site_names, (list, tuple)) or not site_names:
        raise ValueError(f"site_names must be a non-empty list of hook names (see sites()), got {site_names!r}")
    known = {name for name, m in model.named_modules() if isinstance(m, HookPoint)}
    bad = [n for n in site_names if n not in known]
    if bad:
        raise ValueError(f"site_names: no hook site {bad[:5]} in this model; sites are e.g. "
                         f"{[s for _, s in sites(model)][:6]}")
    return list(site_names)


def _check_xy(model: nn.Module, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets that ``model`` can score: tokens in its vocabulary or vectors of its d_in; labels
    (``IGNORE`` allowed for sequences) below its number of outputs, one per example (or per token)."""
    cfg = checks.check_model("model", model).config
    x, y = checks.as_tensor("x", x), checks.as_tensor("y", y)
    cfg.check_inputs("x", x)  # the family's input check: token ids in the vocabulary, or real vectors of d_in
    sequence = cfg.data_kind == "sequence"
    if sequence:
        checks.check_labels("y", y, cfg.vocab_size, ignore=IGNORE)
    else:
        checks.check_labels("y", y, cfg.n_classes)
    if tuple(y.shape) != (tuple(x.shape) if sequence else (len(x),)):
        raise ValueError(f"y must have one label per {'token' if sequence else 'example'} of x, "
                         f"got shapes x {tuple(x.shape)}, y {tuple(y.shape)}")
    if len(x) == 0:
        raise ValueError("x must hold at least one example")
    return x, y


@torch.no_grad()
def collect(model: nn.Module, x: torch.Tensor, y: torch.Tensor, site_names: list[str] | None = None,
            batch_size: int = 1024) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One forward pass in eval mode recording several hook sites.

    Returns ``(features, labels, predictions)``: ``features[name]`` is ``(n, d)`` with one row
    per scored sample (every vector example; every position whose target is not ``IGNORE``
    for sequences), ``labels`` and the network's argmax ``predictions`` are ``(n,)``.
    """
    checks.check_int("batch_size", batch_size, 1)
    names = _check_sites(model, site_names)
    x, y = _check_xy(model, x, y)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats = {n: [] for n in names}
    labels, preds = [], []
    try:
        with _capture(model, names) as store:
            for i in range(0, len(x), batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                logits = model(xb)
                mask = yb != IGNORE                                   # (B,) or (B, T)
                labels.append(yb[mask])
                preds.append(logits.argmax(-1)[mask])
                for n in names:
                    feats[n].append(store[n].pop()[mask])             # (n_scored, d)
    finally:
        model.train(was_training)
    return {n: torch.cat(v) for n, v in feats.items()}, torch.cat(labels), torch.cat(preds)


def layer_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
                  n_classes: int | None = None, min_count: int | None = None, **options) -> pd.DataFrame:
    """Collapse at every layer (:func:`sites`) from one forward pass: tidy ``layer, site, metric, value``.

    The readout is the classifier at the ``features`` site (NC2 of ``W``, NC3); NC4 compares
    each layer's nearest class mean with the network's final prediction (progressive
    collapse, He and Su 2022; their ``D_l`` is ``n_classes * nc1``).
    """
    _check_n_classes(n_classes)
    if min_count is not None:
        checks.check_int("min_count", min_count, 2)
    pairs = sites(model)
    feats, labels, preds = collect(model, x, y, [s for _, s in pairs], batch_size)
    rows = []
    for layer, site in pairs:
        clf = model.readout if site == "features" else None
        m = metrics(feats[site], labels, clf, preds, n_classes=n_classes, min_count=min_count, **options)
        rows += [{"layer": layer, "site": site, "metric": k, "value": v} for k, v in m.items()]
    return pd.DataFrame(rows, columns=["layer", "site", "metric", "value"])
