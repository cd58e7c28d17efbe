"""Optimal-transport fusion (Singh and Jaggi 2020): couple the units of two models with POT's EMD or
Sinkhorn, transport one onto the other and average.

Definitions: ``docs/definitions.md#ot-fusion``.
"""
from __future__ import annotations

import copy
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from .. import hooks
from . import permute as _perm
from ..core.data import Dataset
from .permute import check_same_architecture
from .interpolation import (
    SPLITS,
    _check_data,
    _evaluate,
    _params,
    _progress,
    _refuse_batchnorm,
)

# ----------------------------------------------------------------------------- optimal-transport fusion

FUSE_METHODS = ("vanilla", "emd", "sinkhorn")
FUSE_GROUNDS = ("activations", "weights")
QK_MODES = ("joint", "separate")
REG_RANGE = (1e-4, 10.0)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_r (a[i, r] - b[j, r])^2`` for rows ``i`` of ``a`` and ``j`` of ``b`` (float64)."""
    a, b = a.double(), b.double()
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def _coupling(cost: np.ndarray, method: str, reg: float) -> np.ndarray:
    """An ``n x n`` coupling with uniform marginals ``1/n``: identity (vanilla), ``ot.emd`` or
    ``ot.bregman.sinkhorn`` (log-stabilised) on the cost scaled to a maximum of 1 (so ``reg`` is relative)."""
    import ot

    n = cost.shape[0]
    if method == "vanilla":
        return np.eye(n) / n
    u = np.full(n, 1.0 / n)
    scale = float(cost.max())
    c = cost / scale if scale > 0 else cost
    if method == "emd":
        return ot.emd(u, u, c)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        return ot.bregman.sinkhorn(u, u, c, reg, method="sinkhorn_stabilized", numItermax=1000, stopThr=1e-9)


def _head_coupling(costs: list[np.ndarray], n_heads: int, method: str, reg: float) -> list[np.ndarray]:
    """Couplings of the dims of one attention layer that keep heads together: a coupling of heads
    (cost: the optimal within-head transport cost of each head pair, summed over ``costs``) times,
    for each head pair, a coupling of their dims; one flat ``n x n`` coupling per cost."""
    import ot

    n = costs[0].shape[0]
    D = n // n_heads
    scaled = [c / c.max() if c.max() > 0 else c for c in costs]
    u = np.full(D, 1.0 / D)
    blocks = [c.reshape(n_heads, D, n_heads, D) for c in scaled]
    head_cost = np.array([[sum(ot.emd2(u, u, np.ascontiguousarray(b[i, :, j, :])) for b in blocks)
                           for j in range(n_heads)] for i in range(n_heads)])
    t_head = _coupling(head_cost, method, reg)
    out = []
    for b in blocks:
        t = np.zeros((n_heads, D, n_heads, D))
        for i in range(n_heads):
            for j in range(n_heads):
                if t_head[i, j] > 1e-12 / n_heads:
                    t[i, :, j, :] = t_head[i, j] * D * _coupling(np.ascontiguousarray(b[i, :, j, :]), method, reg)
        out.append(t.reshape(n, n))
    return out


def _fusion_spec(model: nn.Module, qk: str) -> tuple[dict, dict, dict]:
    """``(axes, sizes, heads)`` of the permutation spec, with keys mapped by their own ``qk.i#k`` map
    when ``qk="separate"`` (heads: group -> (maps of that layer, n_heads))."""
    spec = _perm.perm_spec(model)
    axes, sizes = dict(spec.axes), dict(spec.sizes)
    heads = {}
    for g, (pq, pv, H) in spec.heads.items():
        if qk == "separate":
            pk = f"{pq}#k"
            sizes[pk] = sizes[pq]
            for name, ax in list(axes.items()):
                if ".attn.k." in name:
                    axes[name] = tuple(pk if p == pq else p for p in ax)
            heads[g] = ((pq, pk, pv), H)
        else:
            heads[g] = ((pq, pv), H)
    return axes, sizes, heads


def _transport(w: torch.Tensor, axes: tuple, maps: dict, except_axis: int | None = None) -> torch.Tensor:
    """``w`` with every mapped axis replaced by ``M @ w`` along it (``M``: a row-normalised coupling)."""
    for axis, p in enumerate(axes):
        if p is None or axis == except_axis or p not in maps:
            continue
        m = maps[p].to(w.device)
        moved = w.movedim(axis, 0)
        w = (m @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape).movedim(0, axis)
    return w


@torch.no_grad()
def _activation_costs(model_a, model_b, x: torch.Tensor, qk: str, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Squared distances between A's and B's units over the sample (and positions), summed over the
    sites of each map (every residual site for ``res``), divided by the number of rows."""
    sites_a, sites_b = model_a.perm_sites(), model_b.perm_sites()
    keys = []
    for p, s in sites_a.items():
        for j, (_, part) in enumerate(s):
            name = f"{p}#k" if qk == "separate" and p.startswith("qk.") and part == "k" else p
            keys.append((name, p, j, part))
    costs: dict = {}
    rows = 0
    store: dict = {}
    watched = {(tag, p, j): m for tag, sites in (("a", sites_a), ("b", sites_b))
               for p, s in sites.items() for j, (m, _) in enumerate(s)}
    dev_a, dev_b = next(model_a.parameters()).device, next(model_b.parameters()).device
    modes = model_a.training, model_b.training
    model_a.eval(), model_b.eval()
    try:
        with hooks.watch(watched, store.__setitem__):
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size]
                model_a(xb.to(dev_a)), model_b(xb.to(dev_b))
                for name, p, j, part in keys:
                    a = _perm._part(store[("a", p, j)], part)
                    b = _perm._part(store[("b", p, j)], part).to(a.device)
                    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
                    c = _sq_dist(a.T, b.T)
                    costs[name] = costs[name] + c if name in costs else c
                rows += int(np.prod(store[("a", "res", 0)].shape[:-1]))
                store.clear()
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])
    return {k: v / max(rows, 1) for k, v in costs.items()}


def _weight_cost(view_a, view_b, axes, sizes, p: str, maps: dict) -> torch.Tensor:
    """Squared distance between A's and B's units of map ``p`` over the weights it acts on whose other
    axes are settled (``maps``), B transported by those maps (Singh and Jaggi's layer-by-layer order)."""
    n = sizes[p]
    total = torch.zeros(n, n, dtype=torch.float64)
    for k, ax in axes.items():
        for axis, q in enumerate(ax):
            if q != p or any(o is not None and o != p and o not in maps for o in ax):
                continue
            a = view_a[k].double().movedim(axis, 0).reshape(n, -1)
            b = _transport(view_b[k].double(), ax, maps, except_axis=axis).movedim(axis, 0).reshape(n, -1)
            total += _sq_dist(a.cpu(), b.cpu())
    return total


def transport_maps(model_a: nn.Module, model_b: nn.Module, method: str = "emd", reg: float = 0.08, data=None,
                   ground: str = "activations", qk: str = "joint", max_examples: int = 256) -> dict[str, np.ndarray]:
    """The couplings of :func:`fuse`: ``{map name: (n, n) array}``, entry ``[i, j]`` the mass moved from
    A's unit ``i`` to B's unit ``j``, uniform marginals ``1/n`` (for ``"emd"`` with a unique optimum,
    ``n T`` is a permutation matrix; ``"vanilla"`` is the identity over ``n``).

    Maps are named as the permutations of :func:`workbench.permute.perm_spec` (``res``, ``hidden.i`` /
    ``mlp.i``, ``qk.i``, ``vo.i``; ``qk.i#k`` for the keys when ``qk="separate"``). Ground metric:
    squared distance of the units' activations on ``data`` (``ground="activations"``, the first
    ``max_examples`` training inputs of a Dataset or rows of an input tensor) or of their weights with
    the other axes already transported (``ground="weights"``, residual stream first). The residual
    stream has one map shared by every block, as in the permutation spec: its activation cost sums the
    residual sites (each block's input and the branch outputs added to it), i.e. the residual and branch
    maps are averaged into one. Attention: a coupling of heads, then within each head pair a coupling of
    dimensions; queries and keys share one map (``qk="joint"``) or have one each (``"separate"``, one
    shared head coupling); values have their own map, carried into the output projection's columns.
    Definition: ``docs/definitions.md#ot-fusion``.
    """
    check_same_architecture(model_a, model_b)
    _refuse_batchnorm(model_a)
    method = checks.check_choice("method", method, FUSE_METHODS)
    reg = checks.check_float("reg", reg, *REG_RANGE)
    ground = checks.check_choice("ground", ground, FUSE_GROUNDS)
    qk = checks.check_choice("qk", qk, QK_MODES)
    checks.check_int("max_examples", max_examples, 1, 100_000)
    axes, sizes, heads = _fusion_spec(model_a, qk)
    head_of = {p: g for g, (ps, _) in heads.items() for p in ps}
    if method == "vanilla":
        return {p: np.eye(n) / n for p, n in sizes.items()}
    if ground == "activations":
        if data is None:
            raise ValueError("data must be a Dataset or an input tensor for ground='activations' "
                             "(or use ground='weights')")
        x = _perm._inputs(data, max_examples, model_a)
        costs = {k: v.cpu().numpy() for k, v in _activation_costs(model_a, model_b, x, qk).items()}
    else:
        costs = None
        view_a, view_b = _perm._view(model_a), _perm._view(model_b)
        view_a = {k: v for k, v in view_a.items() if k in axes}
        view_b = {k: v for k, v in view_b.items() if k in axes}
    out: dict[str, np.ndarray] = {}
    settled: dict[str, torch.Tensor] = {}
    units = list(dict.fromkeys(head_of.get(p, p) for p in sizes))      # spec order: res, then block by block
    for u in units:
        names = heads[u][0] if u in heads else (u,)
        if costs is None:
            c = {p: _weight_cost(view_a, view_b, axes, sizes, p, settled).numpy() for p in names}
        else:
            c = {p: costs[p] for p in names}
        if u in heads:
            ts = _head_coupling([c[p] for p in names], heads[u][1], method, reg)
            new = dict(zip(names, ts))
        else:
            new = {u: _coupling(c[u], method, reg)}
        out.update(new)
        settled.update({p: torch.as_tensor(t / np.maximum(t.sum(1, keepdims=True), 1e-300)) for p, t in new.items()})
    return out


@torch.no_grad()
def fuse(model_a: nn.Module, model_b: nn.Module, method: str = "emd", reg: float = 0.08, data=None,
         ground: str = "activations", qk: str = "joint", max_examples: int = 256,
         maps: dict[str, np.ndarray] | None = None) -> nn.Module:
    """Optimal-transport fusion (Singh and Jaggi 2020; Imfeld et al. 2024): a new model, in A's basis.

    Every weight of B is transported onto A's units along each of its axes, ``W_B' = M_out W_B
    M_in^T`` with ``M = T / T.sum(1)`` (rows of the coupling normalised to 1; for a permutation this is
    exactly :func:`workbench.permute.permute`), then ``W = 1/2 W_A + 1/2 W_B'``. (Imfeld et al. write
    the mirror image, A transported onto B: ``1/2 T^T (W_A T_in) + 1/2 W_B``.) Biases and LayerNorm
    gains and biases are transported the same way, then averaged; buffers are A's. ``method``:
    ``"vanilla"`` (plain averaging), ``"emd"`` (hard: with a permuted copy of A as B it computes A's
    function) or ``"sinkhorn"`` (soft, entropic ``reg`` in [1e-4, 10] relative to the largest cost).
    ``maps`` reuses the couplings of :func:`transport_maps`; otherwise they are computed with the
    arguments given there. Definition: ``docs/definitions.md#ot-fusion``.
    """
    if maps is None:
        maps = transport_maps(model_a, model_b, method, reg, data, ground, qk, max_examples)
    else:
        check_same_architecture(model_a, model_b)
        if qk not in QK_MODES:
            checks.check_choice("qk", qk, QK_MODES)
    axes, sizes, _ = _fusion_spec(model_a, qk)
    if not isinstance(maps, dict) or set(maps) != set(sizes):
        raise ValueError(f"maps must be the dict of transport_maps() with keys {sorted(sizes)}")
    for p, n in sizes.items():
        if np.shape(maps[p]) != (n, n):
            raise ValueError(f"maps[{p!r}] must be a {n} x {n} coupling, got shape {np.shape(maps[p])}")
    rows = {p: torch.as_tensor(np.asarray(t, dtype=np.float64)) for p, t in maps.items()}
    rows = {p: t / t.sum(1, keepdim=True).clamp_min(1e-300) for p, t in rows.items()}
    view_a, view_b = _perm._view(model_a), _perm._view(model_b)
    fused = {}
    for k, wa in view_a.items():
        if k in axes and wa.is_floating_point():
            wb = _transport(view_b[k].double().to(wa.device), axes[k], rows)
            fused[k] = (0.5 * wa.double() + 0.5 * wb).to(wa.dtype)
        else:
            fused[k] = wa.clone()
    out = copy.deepcopy(model_a)
    out.load_state_dict(_perm._unview(fused))
    return out.eval()


def fusion_curve(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, regs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
                 ground: str = "activations", qk: str = "joint", split: str = "val", max_examples: int = 2048,
                 fit_examples: int = 256, monitor=None) -> tuple[pd.DataFrame, dict]:
    """Loss of the fused model against the Sinkhorn ``reg``, next to vanilla averaging, EMD and the parents.

    Returns ``(table, maps)``: ``table`` has columns ``method`` (``"A"``, ``"B"``, ``"vanilla"``,
    ``"emd"``, ``"sinkhorn"``), ``reg`` (NaN except for Sinkhorn), ``split, loss, acc, error``;
    ``maps`` is ``{(method, reg or None): transport_maps(...)}`` for vanilla, EMD and each Sinkhorn ``reg``. The couplings are fitted
    on ``fit_examples`` training inputs of ``dataset``; the losses are on ``split``. ``monitor``: progress
    per fused model; stopped, it raises :class:`Cancelled`.
    """
    _check_data(model_a, model_b, dataset)
    if isinstance(regs, (str, bytes)) or not isinstance(regs, (list, tuple)) or not 1 <= len(regs) <= 50:
        raise ValueError(f"regs must be a list of 1 to 50 numbers in [{REG_RANGE[0]}, {REG_RANGE[1]}], got {regs!r}")
    regs = [checks.check_float("regs[]", r, *REG_RANGE) for r in regs]
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    checks.check_int("fit_examples", fit_examples, 1, 100_000)
    jobs = [("A", None), ("B", None), ("vanilla", None), ("emd", None)] + [("sinkhorn", r) for r in regs]
    monitor = _monitor.resolve(monitor)
    rows, maps = [], {}
    for i, (method, reg) in enumerate(jobs):
        _progress(monitor, i, len(jobs), f"fusion: {method}" + (f" reg={reg:g}" if reg else ""))
        if method in ("A", "B"):
            model = model_a if method == "A" else model_b
        else:
            m = transport_maps(model_a, model_b, method, reg or 0.08, dataset, ground, qk, fit_examples)
            maps[(method, reg)] = m
            model = fuse(model_a, model_b, method, qk=qk, maps=m)
        loss, acc = _evaluate(model_a, {k: v.unsqueeze(0) for k, v in _params(model).items()}, dataset, split,
                              max_examples)
        rows.append({"method": method, "reg": float("nan") if reg is None else reg, "split": split,
                     "loss": float(loss[0]), "acc": float(acc[0]), "error": 1 - float(acc[0])})
    monitor.report(1.0, "done")
    return pd.DataFrame(rows), maps
