"""Weight-space merges of specialists: task vectors, linear, task arithmetic, TIES, LiNeS, DARE, DARE-TIES,
SLERP and Model Stock, and the cosines between task vectors; ``merge(method, ...)`` picks one by name.

Definitions: ``docs/definitions.md#merges``, ``#task-vectors``, ``#task-arithmetic``, ``#ties``, ``#lines``,
``#dare``, ``#slerp``, ``#model-stock``, ``#task-vector-cosine``.
"""
from __future__ import annotations

import copy
import re
from typing import Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from .mixture import _numbers
from .substrate import _check_mergeable

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
            keep = (torch.rand(v.shape, generator=gen) < density).to(device=v.device, dtype=v.dtype)  # CPU stream
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




