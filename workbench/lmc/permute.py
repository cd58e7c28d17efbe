"""Permutation symmetries of our two model families, and how to find the permutation that aligns two models.

A permutation of hidden units that is applied consistently to every weight touching
those units leaves a network's function unchanged. :func:`perm_spec` lists, for each
parameter, which permutation acts on which axis (the ``PermutationSpec`` of Git Re-Basin,
Ainsworth et al. 2022):

- ``res``: the residual stream, one permutation shared by the stem / token and position
  embedding columns, every block's residual input and output, every LayerNorm's gain and
  bias, and the readout's input. (LayerNorm commutes with a permutation of its features,
  so pre- and Peri-LN models keep the symmetry.) Readout rows (classes, vocabulary) and
  embedding rows (tokens, positions) never permute.
- ``hidden.{i}`` (ResidualMLP) / ``mlp.{i}`` (Transformer): the hidden units of block i.
- ``heads.{i}`` (Transformer): attention heads of block i permuted as whole heads, and
  inside each head two within-head permutations: ``qk.{i}`` shared by queries and keys
  (so every score ``q . k`` is unchanged) and ``vo.{i}`` shared by values and the output
  projection's columns. They are stored as flat index vectors over ``d_model`` that keep
  each head's dimensions together.

Each family states its own symmetries (``model.perm_axes()`` and, for activation matching,
``model.perm_sites()`` in :mod:`workbench.models`); this module only solves and applies them.

A permutation is a ``dict[str, LongTensor]``: ``perm[p][i]`` is the unit of the permuted
model (B) that moves to position ``i``, i.e. ``permuted = w.index_select(axis, perm[p])``.

:func:`match_weights` is Git Re-Basin's weight matching; :func:`match_activations` matches
units by the correlation of their activations on data. :func:`permute` applies a
permutation and returns a new model; it computes exactly the function of the original.

Definitions: ``docs/definitions.md#perm-spec``, ``#weight-matching``, ``#activation-matching``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from ..core import checks
from .. import hooks
from ..core.data import Dataset

MAX_ITER = 10_000   # coordinate-descent sweeps of match_weights

__all__ = ["PermSpec", "perm_spec", "permute", "random_permutation", "identity_permutation", "match_weights",
           "match_activations", "check_same_architecture", "check_model_data"]


@dataclass
class PermSpec:
    """Which permutation acts on which axis of every (view) parameter, and the head structure."""

    axes: dict[str, tuple]                        # parameter -> perm name (or None) per axis
    sizes: dict[str, int]                         # perm name -> number of units
    heads: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # group -> (qk perm, vo perm, n_heads)

    def perm_to_axes(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list] = {p: [] for p in self.sizes}
        for name, axes in self.axes.items():
            for axis, p in enumerate(axes):
                if p is not None:
                    out[p].append((name, axis))
        return out

    def units(self) -> list[str]:
        """What one coordinate-descent step solves: plain permutations, and head groups as one unit each."""
        group_of = {p: g for g, (qk, vo, _) in self.heads.items() for p in (qk, vo)}
        return list(dict.fromkeys(group_of.get(p, p) for p in self.sizes))  # spec order, groups once

    def unit_perms(self, unit: str) -> tuple[str, ...]:
        return self.heads[unit][:2] if unit in self.heads else (unit,)


# ----------------------------------------------------------------------------- architecture


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ``ValueError`` unless both models have the same family and config (the init seed may differ)."""
    from ..core.models import config_to_dict

    ca, cb = checks.check_model("model_a", model_a).config, checks.check_model("model_b", model_b).config
    da, db = config_to_dict(ca), config_to_dict(cb)
    da.pop("seed"), db.pop("seed")
    diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    if diff:
        detail = ", ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in diff)
        raise ValueError(f"the two models have different configs ({detail}); "
                         "connectivity needs two models of the same architecture")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for k in sa:
        if k not in sb or sa[k].shape != sb[k].shape:
            raise ValueError(f"the two models' weights differ in shape at {k!r}")


def check_model_data(model: nn.Module, dataset, name: str = "dataset") -> None:
    """Raise ``ValueError`` unless ``model`` can run on ``dataset`` (checked before any forward pass).

    ``name`` is the argument the dataset came in (``"data"``, ``"calibration"`` ...); the pairing
    itself (family against kind, ``d_in``, classes, vocabulary, context) is
    :func:`workbench.training.check_pairing`.
    """
    from ..core.training import check_pairing

    check_pairing(model, checks.check_dataset(name, dataset))


def perm_spec(model: nn.Module) -> PermSpec:
    """The permutation spec of a :class:`~workbench.models.ResidualMLP` or :class:`~workbench.models.Transformer`.

    Each family states its own symmetries (``model.perm_axes()``, :mod:`workbench.models`).
    """
    return PermSpec(**checks.check_model("model", model).perm_axes())


def _view(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each attention ``qkv`` split into ``q``, ``k``, ``v`` (the parameters of the spec)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for k, v in state.items():
        if ".attn.qkv." in k:
            prefix, kind = k.split(".attn.qkv.")
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{prefix}.attn.{name}.{kind}"] = part
        else:
            out[k] = v
    return out


def _unview(view: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in view.items():
        if ".attn.q." in k:
            prefix, kind = k.split(".attn.q.")
            out[f"{prefix}.attn.qkv.{kind}"] = torch.cat([view[f"{prefix}.attn.{n}.{kind}"] for n in "qkv"], 0)
        elif ".attn.k." in k or ".attn.v." in k:
            continue
        else:
            out[k] = v
    return out


def _permuted(w: torch.Tensor, axes: tuple, perm: dict, except_axis: int | None = None) -> torch.Tensor:
    for axis, p in enumerate(axes):
        if p is not None and axis != except_axis:
            w = w.index_select(axis, perm[p].to(w.device))
    return w


def permute(model: nn.Module, perm: dict[str, torch.Tensor]) -> nn.Module:
    """A new model: ``model`` with every unit permuted by ``perm`` (computes the same function)."""
    spec = perm_spec(model)
    _check_perm("perm", perm, spec)
    view = _view(model)
    new = {k: _permuted(v, spec.axes.get(k, ()), perm) for k, v in view.items()}
    out = copy.deepcopy(model)
    out.load_state_dict(_unview(new))
    return out


def _check_perm(name: str, perm, spec: PermSpec) -> None:
    """``perm`` must map every permutation of ``spec`` to a 1-D integer tensor holding a permutation of its units."""
    if not isinstance(perm, dict):
        raise ValueError(f"{name} must be a dict of permutations (perm name -> index tensor), got {type(perm).__name__}")
    missing = set(spec.sizes) - set(perm)
    if missing:
        raise ValueError(f"{name} lacks {sorted(missing)}")
    for p, n in spec.sizes.items():
        v = perm[p]
        if not isinstance(v, torch.Tensor) or v.dtype.is_floating_point or v.dtype.is_complex \
                or v.dtype == torch.bool or v.shape != (n,) \
                or not torch.equal(torch.sort(v.cpu()).values, torch.arange(n)):
            raise ValueError(f"{name}[{p!r}] must be an integer tensor holding a permutation of range({n})")


def identity_permutation(model: nn.Module) -> dict[str, torch.Tensor]:
    return {p: torch.arange(n) for p, n in perm_spec(model).sizes.items()}


def random_permutation(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A uniformly random element of the model's permutation group (heads shuffled, and dims inside heads)."""
    seed = checks.check_seed("seed", seed)
    spec = perm_spec(model)
    g = torch.Generator().manual_seed(seed)
    perm = {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}
    for qk, vo, H in spec.heads.values():
        D = spec.sizes[qk] // H
        order = torch.randperm(H, generator=g)
        for p in (qk, vo):
            within = torch.stack([torch.randperm(D, generator=g) for _ in range(H)])  # (H, D)
            perm[p] = (order[:, None] * D + within[order]).reshape(-1)
    return perm


# ----------------------------------------------------------------------------- assignment


def _lsa(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximum-weight assignment: ``col[i]`` matched to row ``i``, and the total weight."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols, float(cost[rows, cols].sum())


def _solve_heads(c_qk: np.ndarray, c_vo: np.ndarray, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Joint head + within-head assignment for one attention layer.

    For every pair (head i of A, head j of B) the best within-head matchings of the q/k
    dimensions and of the v/o dimensions are solved separately; their summed value scores
    the pair, and a head-level assignment on those scores picks the pairs. This is the
    exact maximiser over "permute whole heads, then dimensions inside each head".
    """
    C = c_qk.shape[0]
    D = C // n_heads
    q4 = c_qk.reshape(n_heads, D, n_heads, D)
    v4 = c_vo.reshape(n_heads, D, n_heads, D)
    score = np.zeros((n_heads, n_heads))
    within = np.zeros((2, n_heads, n_heads, D), dtype=np.int64)
    for i in range(n_heads):
        for j in range(n_heads):
            within[0, i, j], sq = _lsa(q4[i, :, j, :])
            within[1, i, j], sv = _lsa(v4[i, :, j, :])
            score[i, j] = sq + sv
    head, _ = _lsa(score)
    rows = np.arange(n_heads)
    perm_qk = (head[:, None] * D + within[0, rows, head]).reshape(-1)
    perm_vo = (head[:, None] * D + within[1, rows, head]).reshape(-1)
    return perm_qk, perm_vo


def _solve_unit(spec: PermSpec, unit: str, costs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if unit in spec.heads:
        qk, vo, H = spec.heads[unit]
        pq, pv = _solve_heads(costs[qk], costs[vo], H)
        return {qk: pq, vo: pv}
    col, _ = _lsa(costs[unit])
    return {unit: col}


def _value(cost: np.ndarray, perm: np.ndarray) -> float:
    return float(cost[np.arange(len(perm)), perm].sum())


# ----------------------------------------------------------------------------- weight matching


def match_weights(model_a: nn.Module, model_b: nn.Module, seed: int = 0, max_iter: int = 100,
                  init: str | dict[str, torch.Tensor] = "anchored") -> tuple[dict[str, torch.Tensor], dict]:
    """Git Re-Basin weight matching: the permutation of B that maximises ``sum_l <W_a, P W_b>``.

    Coordinate descent as in Ainsworth et al. (2022): each sweep visits the permutations in
    an order drawn from ``seed`` and solves each one's linear assignment
    (``scipy.optimize.linear_sum_assignment``, maximise) with the others fixed; stop after a
    sweep without improvement or after ``max_iter`` sweeps. Attention heads are solved as
    one unit per layer (see :func:`_solve_heads`).

    ``init``: ``"identity"`` starts from identity permutations (the reference code);
    ``"anchored"`` (default) first visits the units once in data-flow order (residual stream,
    then block by block), each solved only from the weights whose other axes are already
    settled (the stem or embeddings and the readout anchor the residual stream). Starting
    from identity, the many block weights seen through still-wrong neighbouring permutations
    can outweigh those anchors and trap the descent (a randomly permuted copy of a
    Transformer is then not recovered); the anchored start recovers it exactly. A dict
    gives the starting permutation explicitly.

    A unit whose neighbouring permutations did not change since it was last solved is not
    solved again: its cost matrix, hence its solution, would be the same.

    Returns ``(perm, info)``; ``info`` has ``sweeps``, ``solves`` and ``objective``.
    """
    check_same_architecture(model_a, model_b)
    seed = checks.check_seed("seed", seed)
    checks.check_int("max_iter", max_iter, 1, MAX_ITER)
    spec = perm_spec(model_a)
    if isinstance(init, dict):
        _check_perm("init", init, spec)
    elif init not in ("anchored", "identity"):
        raise ValueError(f"init must be 'anchored', 'identity' or a permutation dict, got {init!r}")
    problem = _WeightMatching(spec, model_a, model_b, init)
    solves = problem.anchored_start() if init == "anchored" else 0
    sweeps, more = problem.descend(np.random.default_rng(seed), max_iter)
    return problem.permutation(), {"sweeps": sweeps, "solves": solves + more, "objective": problem.objective()}


class _WeightMatching:
    """One weight-matching problem: building each permutation's cost, solving it, applying the answer.

    Cost matrices are summed in float32 (the models' precision; 2x faster than float64 on CPU);
    assignments and objective comparisons are made in float64 on those matrices.
    """

    def __init__(self, spec: PermSpec, model_a: nn.Module, model_b: nn.Module, init):
        self.spec, self.p2a = spec, spec.perm_to_axes()
        self.wa = {k: v.float() for k, v in _view(model_a).items() if k in spec.axes}
        self.wb = {k: v.float() for k, v in _view(model_b).items() if k in spec.axes}
        self.device = next(iter(self.wa.values())).device
        start = init if isinstance(init, dict) else {p: torch.arange(n) for p, n in spec.sizes.items()}
        self.perm = {p: start[p].to(self.device) for p in spec.sizes}
        # A's side of every cost term is fixed: (n, rest) with the permuted axis first.
        self.flat_a = {(k, ax): self.wa[k].movedim(ax, 0).reshape(spec.sizes[p], -1)
                       for p, terms in self.p2a.items() for k, ax in terms}
        self.units = spec.units()
        self.deps = {}   # unit -> the other permutations its cost terms read
        for u in self.units:
            own = set(spec.unit_perms(u))
            self.deps[u] = sorted({q for p in own for k, _ in self.p2a[p] for q in spec.axes[k] if q is not None}
                                  - own)
        self.version = {p: 0 for p in spec.sizes}               # bumped whenever a permutation changes
        self.seen: dict[str, tuple | None] = {u: None for u in self.units}   # deps' versions at the last solve

    # -- building the cost of one permutation

    def cost(self, p: str, known: set | None = None) -> np.ndarray:
        """``sum_terms A_flat @ (P B)_flat^T`` over the weights ``p`` acts on, B permuted by the other
        permutations; with ``known`` only the terms whose other permutations are all in ``known``."""
        spec, n = self.spec, self.spec.sizes[p]
        total = torch.zeros(n, n, device=self.device)
        for k, ax in self.p2a[p]:
            if known is not None and any(q is not None and q not in known and q != p for q in spec.axes[k]):
                continue  # anchored start: this term still depends on an unsettled permutation
            b = _permuted(self.wb[k], spec.axes[k], self.perm, except_axis=ax).movedim(ax, 0).reshape(n, -1)
            total += self.flat_a[(k, ax)] @ b.T
        return total.cpu().double().numpy()

    # -- solving one unit (a permutation, or one layer's heads)

    def solve(self, unit: str, known: set | None = None) -> tuple[dict, dict]:
        """``(costs, new)``: the unit's cost matrices and their maximum-weight assignments."""
        costs = {p: self.cost(p, known) for p in self.spec.unit_perms(unit)}
        return costs, _solve_unit(self.spec, unit, costs)

    def stamp(self, unit: str) -> tuple:
        return tuple(self.version[q] for q in self.deps[unit])

    # -- applying an answer

    def apply(self, new: dict[str, np.ndarray]) -> None:
        for p, v in new.items():
            self.perm[p] = torch.as_tensor(v, device=self.device)
            self.version[p] += 1

    # -- the two phases

    def anchored_start(self) -> int:
        """Visit the units once in data-flow order (spec order: res first, then block by block), each
        solved from the terms already settled; returns the number of solves."""
        known: set = set()
        for u in self.units:
            own = set(self.spec.unit_perms(u))
            _, new = self.solve(u, known | own)
            self.apply(new)
            if set(self.deps[u]) <= known:  # every term was used: a full solve, no need to repeat it unchanged
                self.seen[u] = self.stamp(u)
            known |= own
        return len(self.units)

    def descend(self, rng: np.random.Generator, max_iter: int) -> tuple[int, int]:
        """Coordinate descent sweeps until one brings no improvement; returns ``(sweeps, solves)``."""
        sweeps = solves = 0
        for sweeps in range(1, max_iter + 1):
            progress = False
            for ui in rng.permutation(len(self.units)):
                u = self.units[ui]
                stamp = self.stamp(u)
                if self.seen[u] == stamp:
                    continue  # same cost matrix as last time: same answer
                self.seen[u] = stamp
                costs, new = self.solve(u)
                solves += 1
                old_val = sum(_value(costs[p], self.perm[p].cpu().numpy()) for p in new)
                new_val = sum(_value(costs[p], new[p]) for p in new)
                if new_val > old_val + 1e-12 * max(1.0, abs(old_val)):
                    progress = True
                    self.apply(new)
            if not progress:
                break
        return sweeps, solves

    def objective(self) -> float:
        """``sum_l <W_a, P W_b>`` in float64 at the current permutation."""
        return sum(float((self.wa[k].double() * _permuted(self.wb[k], self.spec.axes[k], self.perm).double()).sum())
                   for k in self.spec.axes)

    def permutation(self) -> dict[str, torch.Tensor]:
        return {p: v.cpu() for p, v in self.perm.items()}


# ----------------------------------------------------------------------------- activation matching


def _activation_sites(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """perm name -> [(module, part)] whose forward output holds that permutation's units (``model.perm_sites()``)."""
    return model.perm_sites()


class _Moments:
    """Running float64 sums for the correlation of two activation matrices."""

    def __init__(self):
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
        self.n += a.shape[0]
        self.sa = self.sa + a.sum(0)
        self.sb = self.sb + b.sum(0)
        self.saa = self.saa + (a * a).sum(0)
        self.sbb = self.sbb + (b * b).sum(0)
        self.sab = self.sab + a.T @ b

    def corr(self) -> torch.Tensor:
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        sda = (self.saa / n - ma**2).clamp_min(0).sqrt()
        sdb = (self.sbb / n - mb**2).clamp_min(0).sqrt()
        return (self.sab / n - ma[:, None] * mb[None, :]) / (sda[:, None] * sdb[None, :] + 1e-4)


def _part(out: torch.Tensor, part: str) -> torch.Tensor:
    if part == "all":
        return out
    C = out.shape[-1] // 3
    return out[..., "qkv".index(part) * C:("qkv".index(part) + 1) * C]


def _inputs(data, max_examples: int, model: nn.Module | None = None) -> torch.Tensor:
    """Training inputs of a Dataset, or an input tensor, checked against ``model`` (first ``max_examples``; 0: all)."""
    checks.check_int("max_examples", max_examples, 0)
    if isinstance(data, Dataset):
        if model is not None:
            check_model_data(model, data, "data")
        data = data.x_train
    elif not isinstance(data, torch.Tensor):
        raise ValueError(f"data must be a Dataset or an input tensor, got {type(data).__name__}")
    elif model is not None:
        model.config.check_inputs("data", data)
    if len(data) == 0:
        raise ValueError("data must hold at least one example")
    return data[:max_examples] if max_examples else data


@torch.no_grad()
def match_activations(model_a: nn.Module, model_b: nn.Module, data, max_examples: int = 2048,
                      batch_size: int = 512) -> tuple[dict[str, torch.Tensor], dict]:
    """Match units by the correlation of their activations on ``data`` (Git Re-Basin's activation matching).

    Correlation ``(E[ab] - mu_a mu_b) / (sd_a sd_b + 1e-4)`` in float64 over examples (and
    positions, for sequences); one assignment per permutation. The residual permutation
    sums the correlations over every residual site (each block's input, the last block's
    output and the final-norm output); attention heads use the correlations of q and k
    (for ``qk``) and of v (for ``vo``) with the joint head assignment of weight matching.
    ``data``: a Dataset (its training inputs) or an input tensor.
    """
    check_same_architecture(model_a, model_b)
    checks.check_int("batch_size", batch_size, 1)
    spec = perm_spec(model_a)
    x = _inputs(data, max_examples, model_a)
    sites_a, sites_b = _activation_sites(model_a), _activation_sites(model_b)
    moments = {(p, j): _Moments() for p, s in sites_a.items() for j in range(len(s))}
    store: dict = {}
    watched = {(tag, p, j): module for tag, sites in (("a", sites_a), ("b", sites_b))
               for p, s in sites.items() for j, (module, _) in enumerate(s)}
    modes = model_a.training, model_b.training
    model_a.eval(), model_b.eval()
    try:
        with hooks.watch(watched, store.__setitem__):
            for i in range(0, len(x), batch_size):
                xa = x[i:i + batch_size].to(next(model_a.parameters()).device)
                model_a(xa)
                model_b(xa.to(next(model_b.parameters()).device))
                for (p, j), m in moments.items():
                    part = sites_a[p][j][1]
                    a_out = store[("a", p, j)]
                    m.add(_part(a_out, part), _part(store[("b", p, j)], part).to(a_out.device))
                store.clear()
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])
    corr = {}
    for (p, _), m in moments.items():
        c = m.corr()
        corr[p] = corr[p] + c if p in corr else c
    costs = {p: c.cpu().numpy() for p, c in corr.items()}
    perm = {}
    for u in spec.units():
        perm.update({p: torch.as_tensor(v) for p, v in _solve_unit(spec, u, costs).items()})
    mean_corr = {p: float(np.mean(costs[p][np.arange(len(v)), v.numpy()]) / len(sites_a[p])) for p, v in perm.items()}
    return perm, {"mean_corr": mean_corr}
