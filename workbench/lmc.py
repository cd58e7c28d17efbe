"""Linear mode connectivity: interpolation curves, barriers, alignment, REPAIR, layer-wise LMC, instability.

``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``. Curves are evaluated for all alphas
at once: the parameters are stacked along a leading axis and run through one module with
``torch.func.functional_call`` (under ``torch.vmap`` on GPUs; no model is rebuilt).
Our models normalise with LayerNorm only (per-example statistics, no running buffers),
so an interpolated model needs no statistics reset; BatchNorm models are refused.

Barriers (``barrier``) follow both public definitions (Git Re-Basin's endpoint mean and
Entezari/Frankle's linear one), on loss and on error. Alignment (``align``) permutes B
onto A with :mod:`workbench.permute`. ``repair`` is REPAIR (Jordan et al. 2022) adapted
to LayerNorm models; ``layerwise`` interpolates one group of parameters at a time
(Adilova et al. 2023); ``instability`` is Frankle et al.'s (2020) spawning experiment;
``plane`` evaluates the loss over the plane through three models.
"""
from __future__ import annotations

import copy
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import checks, hooks
from . import permute as _perm
from .data import IGNORE, Dataset
from .permute import check_model_data, check_same_architecture

__all__ = ["curve", "barrier", "barrier_value", "interpolate", "align", "repair", "compare", "layerwise",
           "layerwise_curves", "layer_groups", "fuse", "transport_maps", "fusion_curve", "barrier_estimate", "instability", "plane", "Plane", "train_pair", "evaluate_params", "Cancelled"]

Progress = Callable[[int, int, str], None]

# Bounds on the sizes of a computation (each point is one evaluation of a model on the data).
N_ALPHAS = (2, 1001)          # points on an interpolation curve
MAX_RESOLUTION = 101          # points per axis of plane()
MAX_SPAWN_STEPS = 100         # spawn points of instability()
MAX_SEEDS = 16                # models trained by train_pair()
SPLITS = ("train", "val")
METHODS = ("none", "weights", "activations", "repair")


def _check_n_alphas(n_alphas) -> int:
    return checks.check_int("n_alphas", n_alphas, *N_ALPHAS)


def _check_splits(splits) -> list[str]:
    return checks.check_choices("splits", splits, SPLITS)


def _check_data(model_a: nn.Module, model_b: nn.Module, dataset) -> None:
    """Both models of one architecture (so one pairing check covers both) and able to run on ``dataset``."""
    check_same_architecture(model_a, model_b)
    check_model_data(model_a, dataset)


class Cancelled(RuntimeError):
    """Raised when a ``stop`` event is set during a long computation."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("cancelled")


def _refuse_batchnorm(model: nn.Module) -> None:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise NotImplementedError("BatchNorm models need their statistics reset after interpolation; "
                                  "the workbench's models use LayerNorm only")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Distinct parameters by name (tied weights once, as ``named_parameters`` lists them)."""
    return {k: v.detach() for k, v in model.named_parameters()}


def _pair(model_a: nn.Module, model_b: nn.Module) -> tuple[dict, dict]:
    check_same_architecture(model_a, model_b)
    _refuse_batchnorm(model_a)
    pa, pb = _params(model_a), _params(model_b)
    device = next(iter(pa.values())).device
    return pa, {k: v.to(device) for k, v in pb.items()}


def _lerp_stack(pa: dict, pb: dict, alphas: torch.Tensor, names=None) -> dict[str, torch.Tensor]:
    """``{name: (n_alphas, *shape)}``; only ``names`` are interpolated (the rest stay A's, broadcast)."""
    out = {}
    for k, a in pa.items():
        if names is None or k in names:
            w = alphas.to(a.device, a.dtype).view(-1, *([1] * a.dim()))
            out[k] = torch.lerp(a.unsqueeze(0), pb[k].unsqueeze(0), w)
        else:
            out[k] = a.unsqueeze(0).expand(len(alphas), *a.shape)
    return out


def interpolate(model_a: nn.Module, model_b: nn.Module, alpha: float) -> nn.Module:
    """A new model with parameters ``(1 - alpha) A + alpha B`` (``alpha`` any finite number: outside [0, 1]
    the line is extrapolated)."""
    alpha = checks.check_float("alpha", alpha)
    pa, pb = _pair(model_a, model_b)
    out = copy.deepcopy(model_a)
    with torch.no_grad():
        for k, p in out.named_parameters():
            p.copy_(torch.lerp(pa[k], pb[k], float(alpha)))
    return out.eval()


# ----------------------------------------------------------------------------- batched evaluation


def _split_data(dataset: Dataset, split: str, max_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = dataset.split(split)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    return x, y


@torch.no_grad()
def evaluate_params(model: nn.Module, params: dict[str, torch.Tensor], dataset: Dataset, split: str = "val",
                    max_examples: int = 2048, max_rows: int = 1 << 13,
                    use_vmap: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy of ``n`` parameter sets ``{name: (n, *shape)}`` run through ``model``'s code.

    The ``n`` models share one module; nothing is rebuilt or copied. On GPUs one
    ``functional_call`` under ``torch.vmap`` per data batch runs them as batched matrix
    products; on CPUs, where those products are compute-bound anyway, a plain loop of
    ``functional_call`` over the sets measured faster than ``vmap`` (``use_vmap`` overrides).
    Returns ``(loss (n,), acc (n,))`` over the first ``max_examples`` examples of ``split``
    (0: all), scored positions only.
    """
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    checks.check_int("max_rows", max_rows, 1)
    if use_vmap is not None:
        checks.check_bool("use_vmap", use_vmap)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: (n, *shape) tensor}")
    check_model_data(model, dataset)
    return _evaluate(model, params, dataset, split, max_examples, max_rows, use_vmap)


@torch.no_grad()
def _evaluate(model: nn.Module, params: dict[str, torch.Tensor], dataset: Dataset, split: str, max_examples: int,
              max_rows: int = 1 << 13, use_vmap: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate_params` without the argument checks (the callers here have made them once)."""
    x, y = _split_data(dataset, split, max_examples)
    n = next(iter(params.values())).shape[0]
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    if use_vmap is None:
        use_vmap = device.type != "cpu"
    per_example = int(np.prod(x.shape[1:])) if x.dim() > 1 and dataset.kind == "sequence" else 1
    batch = max(1, max_rows // ((n if use_vmap else 1) * per_example))
    if use_vmap:
        run = torch.vmap(lambda p, xb: functional_call(model, p, (xb,)), in_dims=(0, None))
    else:
        def run(p, xb):
            return torch.stack([functional_call(model, {k: v[i] for k, v in p.items()}, (xb,)) for i in range(n)])
    loss, correct, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    try:
        with warnings.catch_warnings():
            # CPU attention has no vmap batching rule yet: torch loops over the models (still one call).
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for i in range(0, len(x), batch):
                xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
                logits = run(params, xb)                                  # (n, B, [T,] K)
                flat = logits.reshape(n, -1, logits.shape[-1])            # (n, rows, K)
                target = yb.reshape(1, -1).expand(n, -1)                  # (n, rows)
                ce = F.cross_entropy(flat.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
                mask = target != IGNORE
                loss += ce.sum(1).double().cpu()
                correct += ((flat.argmax(-1) == target) & mask).sum(1).double().cpu()
                count += int(mask[0].sum())
    finally:
        model.train(was_training)
    return (loss / max(count, 1)).numpy(), (correct / max(count, 1)).numpy()


def _chunked_eval(model, stacked_fn, n: int, dataset, split, max_examples, budget: int = 50_000_000):
    """Evaluate ``n`` parameter sets produced by ``stacked_fn(slice)`` in chunks of bounded memory."""
    params = _params(model)
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, min(n, budget // max(n_params, 1)))
    if next(iter(params.values())).device.type == "cpu":
        chunk = 1  # CPU: one parameter set at a time (see evaluate_params); nothing large is stacked
    losses, accs = [], []
    for s in range(0, n, chunk):
        l, a = _evaluate(model, stacked_fn(slice(s, min(n, s + chunk))), dataset, split, max_examples)
        losses.append(l), accs.append(a)
    return np.concatenate(losses), np.concatenate(accs)


def curve(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, n_alphas: int = 25,
          splits: Sequence[str] = ("train", "val"), max_examples: int = 2048,
          alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Loss and accuracy along the straight line from A (alpha 0) to B (alpha 1).

    Returns a tidy DataFrame with columns ``alpha, split, loss, acc, error``; ``max_examples``
    per split (0: all). ``alphas`` overrides the evenly spaced grid: 1 to 1001 finite numbers
    (outside [0, 1] the line is extrapolated).
    """
    _check_data(model_a, model_b, dataset)
    splits = _check_splits(splits)
    checks.check_int("max_examples", max_examples, 0)
    if alphas is None:
        grid = torch.linspace(0, 1, _check_n_alphas(n_alphas))
    else:
        if isinstance(alphas, (str, bytes)) or not hasattr(alphas, "__len__") \
                or not 1 <= len(alphas) <= N_ALPHAS[1]:
            raise ValueError(f"alphas must be a list of 1 to {N_ALPHAS[1]} numbers, got {alphas!r}")
        grid = torch.tensor([checks.check_float("alphas[]", a) for a in alphas], dtype=torch.float32)
    pa, pb = _pair(model_a, model_b)
    rows = []
    for split in splits:
        loss, acc = _chunked_eval(model_a, lambda s: _lerp_stack(pa, pb, grid[s]), len(grid), dataset, split,
                                  max_examples)
        rows += [{"alpha": float(a), "split": split, "loss": float(l), "acc": float(c), "error": 1 - float(c)}
                 for a, l, c in zip(grid, loss, acc)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- barriers


def _barrier_1d(alpha: np.ndarray, value: np.ndarray, definition: str) -> tuple[float, float]:
    order = np.argsort(alpha)
    alpha, value = alpha[order], value[order]
    if not (np.isclose(alpha[0], 0) and np.isclose(alpha[-1], 1)):
        raise ValueError("a barrier needs the curve's endpoints (alpha 0 and 1)")
    v0, v1 = value[0], value[-1]
    if definition == "endpoint_mean":
        excess = value - (v0 + v1) / 2
    elif definition == "linear":
        excess = value - ((1 - alpha) * v0 + alpha * v1)
    else:
        raise ValueError(f"definition must be 'endpoint_mean' or 'linear', got {definition!r}")
    i = int(np.argmax(excess))
    return float(excess[i]), float(alpha[i])


def barrier(curve_df: pd.DataFrame) -> pd.DataFrame:
    """Barriers of a curve, one row per (split, metric, definition), with the alpha where each peaks.

    - ``endpoint_mean`` (Git Re-Basin's code): ``max_a L(a) - (L(0) + L(1)) / 2``.
    - ``linear`` (Entezari et al. 2022, Frankle et al. 2020): ``max_a L(a) - ((1-a) L(0) + a L(1))``.

    Metrics are ``loss`` and ``error`` (1 - accuracy). Any extra grouping columns of the
    curve (e.g. ``method``) are kept. Columns: ``[groups...], split, metric, definition,
    barrier, alpha``. The two definitions agree when ``L(0) = L(1)`` and differ by at most
    ``|L(1) - L(0)| / 2`` otherwise.
    """
    if not isinstance(curve_df, pd.DataFrame):
        raise ValueError(f"curve_df must be a DataFrame from curve(), got {type(curve_df).__name__}")
    missing = {"alpha", "loss", "acc"} - set(curve_df.columns)
    if missing or curve_df.empty:
        raise ValueError(f"curve_df must be a non-empty curve() table with columns alpha, loss, acc; "
                         f"missing {sorted(missing)}" if missing else "curve_df must be a non-empty curve() table")
    if "error" not in curve_df:
        curve_df = curve_df.assign(error=1 - curve_df["acc"])
    groups = [c for c in curve_df.columns if c not in ("alpha", "loss", "acc", "error")]
    rows = []
    for key, g in curve_df.groupby(groups, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in ("loss", "error"):
            for definition in ("endpoint_mean", "linear"):
                b, a = _barrier_1d(g["alpha"].to_numpy(float), g[metric].to_numpy(float), definition)
                rows.append({**dict(zip(groups, key)), "metric": metric, "definition": definition,
                             "barrier": b, "alpha": a})
    return pd.DataFrame(rows)


def barrier_value(barriers: pd.DataFrame, split: str = "val", metric: str = "loss", definition: str = "linear",
                  **where) -> float:
    """One number out of :func:`barrier`'s table (``where`` filters extra columns such as ``method``)."""
    checks.check_choice("metric", metric, ("loss", "error"))
    checks.check_choice("definition", definition, ("endpoint_mean", "linear"))
    if not isinstance(barriers, pd.DataFrame) or "barrier" not in barriers:
        raise ValueError("barriers must be the DataFrame from barrier()")
    for k in where:
        if k not in barriers:
            raise ValueError(f"{k} is not a column of barriers (columns: {list(barriers.columns)})")
    sel = (barriers["split"] == split) & (barriers["metric"] == metric) & (barriers["definition"] == definition)
    for k, v in where.items():
        sel &= barriers[k] == v
    if sel.sum() != 1:
        raise ValueError(f"expected one barrier row for {split}/{metric}/{definition} {where}, found {int(sel.sum())}")
    return float(barriers.loc[sel, "barrier"].iloc[0])


# ----------------------------------------------------------------------------- alignment


def align(model_a: nn.Module, model_b: nn.Module, method: str = "weights", data=None, seed: int = 0,
          max_iter: int = 100, max_examples: int = 2048) -> nn.Module:
    """A copy of B with its units permuted to match A; it computes exactly B's function.

    Exactly up to float round-off: permuting features changes the order of sums (matrix
    products, LayerNorm statistics), so float32 outputs may differ in the last bits (about
    1e-6 of the largest logit); in float64 the difference is ~1e-14.

    ``method="weights"``: Git Re-Basin weight matching (:func:`workbench.permute.match_weights`,
    random sweep order from ``seed``). ``method="activations"``: correlation of activations
    on ``data`` (a Dataset, whose training inputs are used, or an input tensor).
    """
    checks.check_choice("method", method, ("weights", "activations"))
    seed = checks.check_seed("seed", seed)
    checks.check_int("max_iter", max_iter, 1, _perm.MAX_ITER)
    checks.check_int("max_examples", max_examples, 0)
    if method == "weights":
        perm, _ = _perm.match_weights(model_a, model_b, seed=seed, max_iter=max_iter)
    elif method == "activations":
        if data is None:
            raise ValueError("activation matching needs data (a Dataset or an input tensor)")
        perm, _ = _perm.match_activations(model_a, model_b, data, max_examples=max_examples)
    else:
        raise ValueError(f"method must be 'weights' or 'activations', got {method!r}")
    return _perm.permute(model_b, perm).eval()


# ----------------------------------------------------------------------------- REPAIR


@torch.no_grad()
def _unit_stats(model: nn.Module, layers: list[nn.Linear], x: torch.Tensor, batch_size: int = 1024):
    """Mean and std of each layer's output units over examples (and positions), float64: one
    ``(mean, std)`` pair per layer, all from the same forward passes (recorded with :func:`hooks.watch`)."""
    s = [0.0] * len(layers)
    ss = [0.0] * len(layers)
    n = [0] * len(layers)

    def add(i, out):
        o = out.reshape(-1, out.shape[-1]).double()
        s[i], ss[i], n[i] = s[i] + o.sum(0), ss[i] + (o * o).sum(0), n[i] + o.shape[0]

    device = next(model.parameters()).device
    with hooks.watch(dict(enumerate(layers)), add):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
    means = [si / ni for si, ni in zip(s, n)]
    return [(m, (q / ni - m**2).clamp_min(0).sqrt()) for m, q, ni in zip(means, ss, n)]


@torch.no_grad()
def repair(model_a: nn.Module, model_b: nn.Module, alpha: float, data, max_examples: int = 2048,
           eps: float = 1e-5) -> nn.Module:
    """REPAIR (Jordan et al. 2022): the interpolated model with its hidden units renormalised.

    For every block's ``fc`` layer (the hidden units before the activation) the goal
    statistics per unit are ``mu = (1-alpha) mu_A + alpha mu_B`` and
    ``sd = (1-alpha) sd_A + alpha sd_B``, measured on ``data``. Block by block, the
    interpolated model's own statistics are measured (with earlier blocks already
    repaired) and the layer's rows and bias are rescaled so its units have the goal
    statistics; the correction is folded into the weights, so the result is a plain model.

    REPAIR was defined for networks without norms or with BatchNorm. Our models use
    LayerNorm, which re-standardises each example's residual vector, so the block inputs
    keep their scale; the variance collapse of interpolation shows up in the hidden units,
    and those are what is renormalised. The residual stream, attention and the output
    projections are left as interpolated. ``data``: a Dataset (training inputs) or a tensor.
    """
    check_same_architecture(model_a, model_b)
    alpha = checks.check_float("alpha", alpha, 0.0, 1.0)
    checks.check_float("eps", eps, 0.0, 1.0, lo_open=True)
    x = _perm._inputs(data, max_examples, model_a)
    model = interpolate(model_a, model_b, alpha)
    was = model_a.training, model_b.training
    model_a.eval(), model_b.eval()
    try:
        stats_a = _unit_stats(model_a, model_a.repair_sites(), x)
        stats_b = _unit_stats(model_b, model_b.repair_sites(), x)
        goals = [((1 - alpha) * ma + alpha * mb, (1 - alpha) * sa + alpha * sb)
                 for (ma, sa), (mb, sb) in zip(stats_a, stats_b)]
    finally:
        model_a.train(was[0]), model_b.train(was[1])
    for layer, (goal_mean, goal_std) in zip(model.repair_sites(), goals):   # block by block: earlier ones repaired
        (mean, std), = _unit_stats(model, [layer], x)
        scale = goal_std / (std + eps)
        layer.weight.mul_(scale[:, None].to(layer.weight.dtype))
        layer.bias.copy_(((layer.bias.double() - mean) * scale + goal_mean).to(layer.bias.dtype))
    return model


# ----------------------------------------------------------------------------- comparison


def compare(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, n_alphas: int = 25,
            methods: Sequence[str] = ("none", "weights", "activations", "repair"),
            splits: Sequence[str] = ("train", "val"), max_examples: int = 2048, seed: int = 0,
            progress: Progress | None = None, stop: threading.Event | None = None) -> pd.DataFrame:
    """Curves before alignment, after weight matching, after activation matching and after REPAIR.

    REPAIR is applied on top of activation matching (as in Jordan et al.), one repaired
    model per alpha. Returns the curves of :func:`curve` with a ``method`` column.
    """
    _check_data(model_a, model_b, dataset)
    _check_n_alphas(n_alphas)
    splits = _check_splits(splits)
    checks.check_int("max_examples", max_examples, 0)
    seed = checks.check_seed("seed", seed)
    methods = checks.check_choices("methods", methods, METHODS)
    frames, matched = [], {}
    steps = len(methods)
    for i, method in enumerate(methods):
        _check(stop)
        if progress:
            progress(i, steps, f"curve: {method}")
        if method == "none":
            df = curve(model_a, model_b, dataset, n_alphas, splits, max_examples)
        elif method == "weights":
            df = curve(model_a, align(model_a, model_b, "weights", seed=seed), dataset, n_alphas, splits, max_examples)
        else:
            if "activations" not in matched:
                matched["activations"] = align(model_a, model_b, "activations", data=dataset, max_examples=max_examples)
            b = matched["activations"]
            if method == "activations":
                df = curve(model_a, b, dataset, n_alphas, splits, max_examples)
            else:
                df = _repair_curve(model_a, b, dataset, n_alphas, splits, max_examples, stop)
        frames.append(df.assign(method=method))
    if progress:
        progress(steps, steps, "done")
    return pd.concat(frames, ignore_index=True)[["method", "alpha", "split", "loss", "acc", "error"]]


def _repair_curve(model_a, model_b, dataset, n_alphas, splits, max_examples, stop=None) -> pd.DataFrame:
    grid = np.linspace(0, 1, n_alphas)
    repaired = []
    for a in grid:
        _check(stop)
        m = model_a if a == 0 else model_b if a == 1 else repair(model_a, model_b, float(a), dataset, max_examples)
        repaired.append(_params(m))
    stacked = {k: torch.stack([p[k].to(repaired[0][k].device) for p in repaired]) for k in repaired[0]}
    rows = []
    for split in splits:
        loss, acc = _evaluate(model_a, stacked, dataset, split, max_examples)
        rows += [{"alpha": float(a), "split": split, "loss": float(l), "acc": float(c), "error": 1 - float(c)}
                 for a, l, c in zip(grid, loss, acc)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- layer-wise


def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Default groups for :func:`layerwise`: ``embed``, each ``block i``, and ``readout`` (final norm + readout)."""
    groups: dict[str, list[str]] = {"embed": []}
    for i in range(len(model.blocks)):
        groups[f"block {i}"] = []
    groups["readout"] = []
    embeds = model.embedding_modules()  # the family's fact: stem, or token and position embeddings
    embed_prefixes = tuple(f"{name}." for name, m in model.named_modules() if any(m is e for e in embeds))
    for name in _params(model):
        if name.startswith("blocks."):
            groups[f"block {int(name.split('.')[1])}"].append(name)
        elif embed_prefixes and name.startswith(embed_prefixes):
            groups["embed"].append(name)
        else:
            groups["readout"].append(name)
    return {k: v for k, v in groups.items() if v}


def _layerwise_paths(groups: dict[str, list[str]], mode: str) -> list[tuple[str, str, set]]:
    """``(direction, group, names)`` of every path: one group at a time (``single``), or the groups
    ``1..k`` (``from input``) and ``k..L`` (``from output``) for every ``k`` (``cumulative``)."""
    order = list(groups)
    if mode == "single":
        return [("single", g, set(groups[g])) for g in order]
    ins = [("from input", order[k], {n for g in order[:k + 1] for n in groups[g]}) for k in range(len(order))]
    outs = [("from output", order[k], {n for g in order[k:] for n in groups[g]}) for k in range(len(order))]
    return ins + outs


def _check_groups(groups, pa: dict) -> dict[str, list[str]]:
    if groups is not None:
        if not isinstance(groups, dict) or not groups or not all(
                isinstance(k, str) and isinstance(v, (list, tuple, set)) and all(isinstance(n, str) for n in v)
                for k, v in groups.items()):
            raise ValueError("groups must be a non-empty dict {group name: [parameter names]}")
        unknown = {n for names in groups.values() for n in names} - set(pa)
        if unknown:
            raise ValueError(f"unknown parameter names in groups: {sorted(unknown)[:5]}")
    return groups


LAYERWISE_MODES = ("single", "cumulative")
LAYERWISE_BASES = ("both", "a", "b")


def layerwise_curves(model_a: nn.Module, model_b: nn.Module, dataset: Dataset,
                     groups: dict[str, list[str]] | None = None, n_alphas: int = 11, mode: str = "single",
                     base: str = "both", split: str = "val", max_examples: int = 2048,
                     progress: Progress | None = None, stop: threading.Event | None = None) -> pd.DataFrame:
    """The curves behind :func:`layerwise`: loss and accuracy along every layer-wise path.

    ``mode="single"``: only group ``l`` moves (``direction`` ``"single"``); ``mode="cumulative"``: the
    groups ``1..k`` move (``"from input"``) and the groups ``k..L`` (``"from output"``), ``group`` naming
    ``k``. ``base="a"``: everything else is A's, alpha 0 is A; ``"b"``: the mirror image (alpha 0 is B,
    alpha 1 is B with the moved groups taken from A); ``"both"``: both. Columns ``mode, direction,
    group, base, alpha, split, loss, acc, error`` (base ``"A"``/``"B"``). Definition:
    ``docs/definitions.md#layerwise-lmc``.
    """
    _check_data(model_a, model_b, dataset)
    _check_n_alphas(n_alphas)
    mode = checks.check_choice("mode", mode, LAYERWISE_MODES)
    base = checks.check_choice("base", base, LAYERWISE_BASES)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    pa, pb = _pair(model_a, model_b)
    groups = _check_groups(groups, pa) or layer_groups(model_a)
    paths = _layerwise_paths(groups, mode)
    bases = [b for b in (("A", (pa, pb)), ("B", (pb, pa))) if base in ("both", b[0].lower())]
    grid = torch.linspace(0, 1, n_alphas)
    frames, total, done = [], len(bases) * len(paths), 0
    for bname, (p0, p1) in bases:
        for direction, gname, names in paths:
            _check(stop)
            if progress:
                progress(done, total, f"layer-wise: {gname} {direction} (base {bname})")
            loss, acc = _chunked_eval(model_a, lambda s: _lerp_stack(p0, p1, grid[s], names), len(grid),
                                      dataset, split, max_examples)
            frames.append(pd.DataFrame({"mode": mode, "direction": direction, "group": gname, "base": bname,
                                        "alpha": grid.numpy().astype(float), "split": split, "loss": loss,
                                        "acc": acc, "error": 1 - acc}))
            done += 1
    if progress:
        progress(total, total, "done")
    return pd.concat(frames, ignore_index=True)


def layerwise(model_a: nn.Module, model_b: nn.Module, dataset: Dataset, groups: dict[str, list[str]] | None = None,
              n_alphas: int = 11, split: str = "val", max_examples: int = 2048,
              progress: Progress | None = None, stop: threading.Event | None = None, mode: str = "single",
              base: str = "both") -> pd.DataFrame:
    """Layer-wise LMC (Adilova et al. 2023): interpolate one group, take everything else from A (and from B).

    With base A the path runs from A (alpha 0) to A with the group replaced by B's
    (alpha 1); with base B from B with A's group to B. ``groups``: name -> parameter
    names (default :func:`layer_groups`). ``mode="cumulative"`` moves the groups ``1..k`` and
    ``k..L`` instead (a ``direction`` column, ``"from input"`` / ``"from output"``); ``base``
    ``"a"``, ``"b"`` or ``"both"`` (default). Returns a tidy DataFrame ``group, base, split, metric,
    definition, barrier, alpha`` (plus ``direction`` when cumulative); the curves themselves are
    :func:`layerwise_curves`. Definition: ``docs/definitions.md#layerwise-lmc``.
    """
    curves = layerwise_curves(model_a, model_b, dataset, groups, n_alphas, mode, base, split, max_examples,
                              progress, stop)
    cols = ["group", "base", "split", "metric", "definition", "barrier", "alpha"]
    if mode == "cumulative":
        cols = ["direction"] + cols
    keep = curves.drop(columns=["mode"] + ([] if mode == "cumulative" else ["direction"]))
    return barrier(keep)[cols]


# ----------------------------------------------------------------------------- plane


@dataclass
class Plane:
    """Loss over the plane through three models: ``grid`` (x, y, loss, acc) and ``points`` (name, x, y)."""

    grid: pd.DataFrame
    points: pd.DataFrame
    split: str


def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, dataset: Dataset, resolution: int = 15,
          margin: float = 0.2, split: str = "val", max_examples: int = 1024) -> Plane:
    """Evaluate ``A + x e1 + y e2`` on a ``resolution x resolution`` grid.

    ``e1`` points from A to B, ``e2`` is the part of ``C - A`` orthogonal to it (Gram-Schmidt,
    Garipov et al. 2018), both unit vectors in parameter space; A sits at (0, 0), B at
    (|B - A|, 0), C above the x axis. The grid covers the three points plus ``margin`` of
    the span on every side. ``resolution`` in [2, 101] per axis, ``margin`` in [0, 10].
    """
    _check_data(model_a, model_b, dataset)
    check_same_architecture(model_a, model_c)
    checks.check_int("resolution", resolution, 2, MAX_RESOLUTION)
    checks.check_float("margin", margin, 0.0, 10.0)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    pa, pb = _pair(model_a, model_b)
    _, pc = _pair(model_a, model_c)
    names = list(pa)
    flat = lambda p: torch.cat([p[k].reshape(-1).double() for k in names])  # noqa: E731
    a, b, c = flat(pa), flat(pb), flat(pc)
    u, v = b - a, c - a
    e1 = u / u.norm()
    v = v - (v @ e1) * e1
    if v.norm() < 1e-12:
        raise ValueError("the three models lie on one line; no plane through them")
    e2 = v / v.norm()
    pts = {"A": (0.0, 0.0), "B": (float(u.norm()), 0.0), "C": (float((c - a) @ e1), float((c - a) @ e2))}
    xs, ys = [p[0] for p in pts.values()], [p[1] for p in pts.values()]
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    gx = np.linspace(min(xs) - margin * span, max(xs) + margin * span, resolution)
    gy = np.linspace(min(ys) - margin * span, max(ys) + margin * span, resolution)
    X, Y = np.meshgrid(gx, gy)
    coords = torch.tensor(np.stack([X.ravel(), Y.ravel()], 1))              # (n, 2)
    shapes = [pa[k].shape for k in names]
    sizes = [pa[k].numel() for k in names]
    dtype = pa[names[0]].dtype

    def stacked(s: slice) -> dict:
        theta = a[None] + coords[s, :1].to(a.device) * e1[None] + coords[s, 1:].to(a.device) * e2[None]  # (m, P)
        parts = theta.to(dtype).split(sizes, dim=1)
        return {k: t.reshape(-1, *shape) for k, t, shape in zip(names, parts, shapes)}

    loss, acc = _chunked_eval(model_a, stacked, len(coords), dataset, split, max_examples)
    grid = pd.DataFrame({"x": coords[:, 0].numpy(), "y": coords[:, 1].numpy(), "loss": loss, "acc": acc})
    points = pd.DataFrame([{"name": k, "x": x, "y": y} for k, (x, y) in pts.items()])
    return Plane(grid, points, split)


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
                 fit_examples: int = 256, progress: Progress | None = None,
                 stop: threading.Event | None = None) -> tuple[pd.DataFrame, dict]:
    """Loss of the fused model against the Sinkhorn ``reg``, next to vanilla averaging, EMD and the parents.

    Returns ``(table, maps)``: ``table`` has columns ``method`` (``"A"``, ``"B"``, ``"vanilla"``,
    ``"emd"``, ``"sinkhorn"``), ``reg`` (NaN except for Sinkhorn), ``split, loss, acc, error``;
    ``maps`` is ``{(method, reg or None): transport_maps(...)}`` for vanilla, EMD and each Sinkhorn ``reg``. The couplings are fitted
    on ``fit_examples`` training inputs of ``dataset``; the losses are on ``split``.
    """
    _check_data(model_a, model_b, dataset)
    if isinstance(regs, (str, bytes)) or not isinstance(regs, (list, tuple)) or not 1 <= len(regs) <= 50:
        raise ValueError(f"regs must be a list of 1 to 50 numbers in [{REG_RANGE[0]}, {REG_RANGE[1]}], got {regs!r}")
    regs = [checks.check_float("regs[]", r, *REG_RANGE) for r in regs]
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    checks.check_int("fit_examples", fit_examples, 1, 100_000)
    jobs = [("A", None), ("B", None), ("vanilla", None), ("emd", None)] + [("sinkhorn", r) for r in regs]
    rows, maps = [], {}
    for i, (method, reg) in enumerate(jobs):
        _check(stop)
        if progress:
            progress(i, len(jobs), f"fusion: {method}" + (f" reg={reg:g}" if reg else ""))
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
    if progress:
        progress(len(jobs), len(jobs), "done")
    return pd.DataFrame(rows), maps


# ----------------------------------------------------------------------------- barrier estimate


def _mean_loss(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (differentiable in ``params``)."""
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        logits = functional_call(model, params, (x[i:i + batch],))
        yb = y[i:i + batch].reshape(-1)
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb, ignore_index=IGNORE,
                                        reduction="sum")
        count += int((yb != IGNORE).sum())
    return total / max(count, 1)


def barrier_estimate(model_a: nn.Module, model_b: nn.Module, dataset: Dataset | None,
                     groups: dict[str, list[str]] | None = None, split: str = "train", max_examples: int = 2048,
                     n_alphas: int = 11, loss_fn: Callable[[dict], torch.Tensor] | None = None) -> pd.DataFrame:
    """First-order layer-wise barrier estimate (Adilova et al. 2024) next to the measured barrier.

    ``estimate = 1/4 (grad L(theta_A) - grad L(theta_B)) . (theta_B - theta_A)`` restricted to each
    group's parameters (the average of the two first-order expansions of ``L(midpoint)`` from A and
    from B, minus the endpoints' mean). Measured on the single-layer path with base A:
    ``midpoint`` = ``L(mid) - (L(A) + L(A with B's group)) / 2`` and ``barrier`` = the linear loss
    barrier over ``n_alphas`` points. For a quadratic loss without curvature between groups the
    estimate is exactly twice ``midpoint`` (``-d^T H d / 4`` against ``-d^T H d / 8``). A last row
    ``all`` is the whole model. ``loss_fn`` (params dict -> scalar tensor) replaces the mean
    cross-entropy on ``split`` of ``dataset`` (then ``dataset`` may be None). Columns ``group,
    estimate, midpoint, barrier``. Definition: ``docs/definitions.md#barrier-estimate``.
    """
    check_same_architecture(model_a, model_b)
    _check_n_alphas(n_alphas)
    if loss_fn is None:
        check_model_data(model_a, dataset)
        checks.check_choice("split", split, SPLITS)
        checks.check_int("max_examples", max_examples, 0)
        x, y = _split_data(dataset, split, max_examples)
        device = next(model_a.parameters()).device
        x, y = x.to(device), y.to(device)
        was = model_a.training
        model_a.eval()

        def loss_fn(p):  # noqa: F811 - the default loss
            return _mean_loss(model_a, p, x, y)
    elif not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable (params dict -> scalar tensor) or None, got {loss_fn!r}")
    else:
        was = model_a.training
    pa, pb = _pair(model_a, model_b)
    groups = _check_groups(groups, pa) or layer_groups(model_a)
    groups = {**groups, "all": list(pa)}
    try:
        grads = []
        for p in (pa, pb):
            leaf = {k: v.clone().requires_grad_(True) for k, v in p.items()}
            with torch.enable_grad():
                g = torch.autograd.grad(loss_fn(leaf), list(leaf.values()), allow_unused=True)
            grads.append({k: (gi if gi is not None else torch.zeros_like(leaf[k])).detach() for k, gi in zip(leaf, g)})
        grid = torch.linspace(0, 1, n_alphas)
        mids = torch.tensor([0.0, 0.5, 1.0])
        rows = []
        with torch.no_grad():
            for gname, names in groups.items():
                names = set(names)
                est = sum(float(((grads[0][k] - grads[1][k]).double() * (pb[k] - pa[k]).double()).sum())
                          for k in names) / 4
                curve_ = [float(loss_fn({k: v[i] for k, v in _lerp_stack(pa, pb, grid, names).items()}))
                          for i in range(len(grid))]
                ends = [float(loss_fn({k: v[i] for k, v in _lerp_stack(pa, pb, mids, names).items()}))
                        for i in range(3)]
                b, _ = _barrier_1d(grid.numpy().astype(float), np.array(curve_), "linear")
                rows.append({"group": gname, "estimate": est, "midpoint": ends[1] - (ends[0] + ends[2]) / 2,
                             "barrier": b})
    finally:
        model_a.train(was)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- training helpers


def _check_seeds(name: str, seeds, at_least: int) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)) \
            or not at_least <= len(seeds) <= MAX_SEEDS:
        raise ValueError(f"{name} must be a list of {at_least} to {MAX_SEEDS} seeds, got {seeds!r}")
    return [checks.check_seed(f"{name}[]", s) for s in seeds]


def train_pair(config, dataset: Dataset, seeds: Sequence[int] = (0, 1), train_config=None, callbacks=()) -> list:
    """Train one model per seed (initialisation and data order both from the seed); returns the Runs."""
    import dataclasses

    from .models import build
    from .training import TrainConfig, train

    seeds = _check_seeds("seeds", seeds, 1)
    tc = (train_config or TrainConfig()).validate()
    check_model_data(build(config.validate()), dataset)
    runs = []
    for s in seeds:
        model = build(dataclasses.replace(config, seed=s))
        runs.append(train(model, dataset, dataclasses.replace(tc, seed=s), callbacks=callbacks,
                          name=f"{dataset.name}-{config.family}-seed{s}"))
    return runs


def instability(config, dataset: Dataset, spawn_steps: Sequence[int], train_config=None,
                child_seeds: Sequence[int] = (1, 2), n_alphas: int = 11, split: str = "val",
                max_examples: int = 2048, progress: Progress | None = None,
                stop: threading.Event | None = None) -> pd.DataFrame:
    """Instability analysis (Frankle et al. 2020): spawn two children at step k and measure their barrier.

    One parent (init ``config.seed``, data order ``train_config.seed``) is trained to each
    spawn step in turn, keeping its optimizer state. At step ``k`` two copies (with the
    parent's optimizer state) train for the remaining ``train_config.steps - k`` steps with
    data orders ``child_seeds``. Returns one row per ``k``: ``spawn_step``, the linear loss
    and error barriers between the children (``loss_barrier``, ``error_barrier``) and their
    accuracies (``acc_a``, ``acc_b``) on ``split``.
    """
    import dataclasses

    from .models import build
    from .training import StopOnEvent, TrainConfig, make_optimizer, train

    tc = (train_config or TrainConfig()).validate()
    if isinstance(spawn_steps, (str, bytes)) or not isinstance(spawn_steps, (list, tuple, range)) \
            or not 1 <= len(spawn_steps) <= MAX_SPAWN_STEPS:
        raise ValueError(f"spawn_steps must be a list of 1 to {MAX_SPAWN_STEPS} steps in [0, {tc.steps - 1}] "
                         f"(train_config.steps = {tc.steps}), got {spawn_steps!r}")
    steps = sorted(set(checks.check_int("spawn_steps[]", k, 0, tc.steps - 1) for k in spawn_steps))
    if isinstance(child_seeds, (str, bytes)) or not isinstance(child_seeds, (list, tuple)) or len(child_seeds) != 2:
        raise ValueError(f"child_seeds must be a list of two seeds (one per child), got {child_seeds!r}")
    child_seeds = [checks.check_seed("child_seeds[]", s) for s in child_seeds]
    _check_n_alphas(n_alphas)
    checks.check_choice("split", split, SPLITS)
    checks.check_int("max_examples", max_examples, 0)
    cbs = [StopOnEvent(stop)] if stop is not None else []
    parent = build(config.validate())
    check_model_data(parent, dataset)
    opt = make_optimizer(parent, tc)
    at, rows = 0, []
    for i, k in enumerate(steps):
        _check(stop)
        if progress:
            progress(i, len(steps), f"spawn at step {k}")
        if k > at:
            train(parent, dataset, dataclasses.replace(tc, steps=k - at), callbacks=cbs, optimizer=opt, start_step=at)
            at = k
        children = []
        for s in child_seeds:
            _check(stop)
            child = copy.deepcopy(parent)
            child_opt = make_optimizer(child, tc)
            child_opt.load_state_dict(opt.state_dict())
            run = train(child, dataset, dataclasses.replace(tc, steps=tc.steps - k, seed=s), callbacks=cbs,
                        optimizer=child_opt, start_step=k)
            if run.status == "cancelled":
                raise Cancelled("cancelled")
            children.append(child)
        c = curve(children[0], children[1], dataset, n_alphas, (split,), max_examples)
        b = barrier(c)
        ends = c.sort_values("alpha")
        rows.append({"spawn_step": k, "split": split,
                     "loss_barrier": barrier_value(b, split, "loss", "linear"),
                     "error_barrier": barrier_value(b, split, "error", "linear"),
                     "acc_a": float(ends["acc"].iloc[0]), "acc_b": float(ends["acc"].iloc[-1])})
    if progress:
        progress(len(steps), len(steps), "done")
    return pd.DataFrame(rows)
