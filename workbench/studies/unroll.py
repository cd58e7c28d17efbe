"""Shallow unrolling of a residual stack (Bermeitinger et al. 2023, "Make Deep Networks Shallow Again").

A residual stack computes ``y_L = (I + F_L) ... (I + F_1) x0``; expanded,
``y_L = x0 + sum_i F_i(x0) + sum_{i<j} J_{F_j}(x0) F_i(x0) + ...``. The first-order truncation,
:func:`parallel`, runs every block on the start of the stream ``x0`` and sums their outputs:
``y_par = x0 + sum_i F_i(x0)``, then the model's final norm and readout. :func:`gap` measures, per depth
prefix, how far the deep stream is from it and how much of the difference the second-order term explains
(Jacobian-vector products, ``torch.func.jvp``); :func:`compare` puts the deep model, its unrolled copy and
the unrolled copy fine-tuned side by side; :func:`compare_layouts` retrains both layouts from scratch at
equal parameters (the paper's Table 2).

What ``F_i`` is (``unit``): ``"block"`` (default) -- a whole block's residual update,
``F_i(x) = block_i(x) - x``; for a Transformer block that is ``a(x) + m(x + a(x))`` (the MLP reads the
stream after its own block's attention, so the first-order model keeps each block intact and only
removes the dependence *between* blocks). ``"sublayer"`` (Transformer only) -- attention and MLP are
separate ``F``s, both reading ``x0``. The fade-in gate of a block is part of ``F_i``.

Definitions: ``docs/definitions.md#unroll-parallel``, ``#unroll-gap``, ``#unroll-second-order``.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn

from ..core.checks import check_choice, check_int, check_model, check_seed
from ..core.data import Dataset
from ..core.models import MLPBlock, TransformerBlock, build
from ..core.training import TrainConfig, loss_and_correct, train

__all__ = ["UNITS", "ParallelModel", "parallel", "branches", "terms", "gap", "compare", "compare_layouts"]

UNITS = ("block", "sublayer")


def _pieces(block: nn.Module, unit: str) -> list[Callable]:
    """The residual updates of one block as functions of the stream, in the order the block adds them.

    ``unit="block"``: one function per block, returned as its pieces ``[a, m]`` chained (see
    :func:`branches`); ``"sublayer"``: each piece reads the same input.
    """
    if isinstance(block, MLPBlock):
        def mlp(x):
            return block._gate(block.post_norm(block.proj(block.act(block.fc(block.pre_norm(x))))))
        return [mlp]
    if isinstance(block, TransformerBlock):
        def attn(x):
            return block._gate(block.ln1_post(block.attn(block.ln1(x))))

        def mlp(x):
            return block._gate(block.ln2_post(block.mlp(block.ln2(x))))
        return [attn, mlp]
    raise ValueError(f"unknown block type {type(block).__name__}")


def _add_block(block: nn.Module, unit: str, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` plus the block's first-order update(s) read at ``x0``, added in the block's own order, so a
    stack whose other blocks add exactly 0 gives exactly the deep stream."""
    pieces = _pieces(block, unit)
    if unit == "sublayer" or len(pieces) == 1:
        for f in pieces:
            y = y + f(x0)
        return y
    a = pieces[0](x0)  # whole Transformer block: the MLP reads x0 + a(x0), as inside the block
    return (y + a) + pieces[1](x0 + a)


def branches(model: nn.Module, unit: str = "block") -> list[Callable]:
    """The ``F_i`` of ``model`` as functions ``x -> update`` (``docs/definitions.md#unroll-parallel``)."""
    check_model("model", model)
    check_choice("unit", unit, UNITS)
    out = []
    for blk in model.blocks:
        if unit == "sublayer" or isinstance(blk, MLPBlock):
            out.extend(_pieces(blk, unit))
        else:
            def whole(x, blk=blk):
                a, m = _pieces(blk, unit)
                h = a(x)
                return h + m(x + h)
            out.append(whole)
    return out


class ParallelModel(nn.Module):
    """The first-order (unrolled) model: ``readout(final_norm(x0 + sum_i F_i(x0)))``, ``x0 = embed(x)``.

    Holds the model it was built from (``base``); its parameters are that model's. ``config`` is the base
    model's, so :func:`workbench.training.train` checks data against it and can fine-tune it.
    """

    def __init__(self, model: nn.Module, unit: str = "block"):
        super().__init__()
        check_model("model", model)
        self.unit = check_choice("unit", unit, UNITS)
        self.base = model
        self.config = model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base.blocks

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def stream(self, x0: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """``y_par`` after the first ``n_blocks`` blocks (all by default), from the embedded input ``x0``."""
        y = x0
        for blk in list(self.base.blocks)[:n_blocks]:
            y = _add_block(blk, self.unit, x0, y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.unembed(self.stream(self.base.embed(x)))


def parallel(model: nn.Module, unit: str = "block", copy_model: bool = True) -> ParallelModel:
    """The first-order model of ``model`` (``docs/definitions.md#unroll-parallel``).

    ``copy_model=True`` (default) works on a deep copy, so fine-tuning the unrolled model leaves ``model``
    alone; ``False`` shares the parameters.
    """
    check_model("model", model)
    check_choice("unit", unit, UNITS)
    return ParallelModel(copy.deepcopy(model) if copy_model else model, unit)


@contextlib.contextmanager
def _math_attention():
    """Forward-mode AD needs the decomposed ("math") attention kernel: the fused CPU kernels have no JVP."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _mean_norm(t: torch.Tensor) -> float:
    return float(t.norm(dim=-1).mean())


@torch.no_grad()
def terms(model: nn.Module, x0: torch.Tensor, unit: str = "block"):
    """Yield, after each block ``k = 1..L``, ``(x0, y_k, y_par_k, S2_k)`` from the stream's start ``x0``.

    ``y_k``: the deep stream after ``k`` blocks; ``y_par_k = x0 + sum_{i<=k} F_i(x0)``; ``S2_k =
    sum_{j<=k} J_{F_j}(x0) sum_{i<j} F_i(x0)``, the second-order term, by Jacobian-vector products
    (``torch.func.jvp``; ``docs/definitions.md#unroll-second-order``). For linear ``F_i = A_i``,
    ``S2_2 = A_2 A_1 x0``. The model is used as it is (call ``model.eval()`` first for dropout-free numbers).
    """
    check_model("model", model)
    check_choice("unit", unit, UNITS)
    fs = branches(model, unit)
    per_block = 2 if unit == "sublayer" and model.config.family == "transformer" else 1
    deep, par, s2, prev = x0, x0, torch.zeros_like(x0), torch.zeros_like(x0)
    with _math_attention():
        for k, blk in enumerate(model.blocks, start=1):
            deep = blk(deep)
            par = _add_block(blk, unit, x0, par)
            for f in fs[(k - 1) * per_block: k * per_block]:
                out, jv = torch.func.jvp(f, (x0,), (prev,))
                s2 = s2 + jv
                prev = prev + out
            yield x0, deep, par, s2


@torch.no_grad()
def gap(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, unit: str = "block",
        max_examples: int = 512) -> pd.DataFrame:
    """Per depth prefix ``k = 1..L``: how far the deep stream is from its first-order truncation.

    Returns a tidy DataFrame ``depth, metric, value`` with metrics (``docs/definitions.md#unroll-gap``,
    ``#unroll-second-order``):

    - ``gap = E||y_k - y_par,k|| / E||y_k - x0||`` (norms over the residual dimension, means over
      examples and positions; ``y_k`` the stream after the first ``k`` blocks, before the final norm);
    - ``second_order = E||S2_k|| / E||y_k - x0||`` with ``S2_k = sum_{j<=k} J_{F_j}(x0) sum_{i<j} F_i(x0)``
      (Jacobian-vector products);
    - ``second_order_share = 1 - E||y_k - y_par,k - S2_k|| / E||y_k - y_par,k||``: the part of the gap the
      second-order term explains (1 when the expansion stops there, e.g. two linear blocks; NaN when the
      gap is 0);
    - with labels ``y``: ``acc_deep``, ``acc_parallel``, ``loss_deep``, ``loss_parallel`` -- the readout
      (final norm included) reading ``y_k`` and ``y_par,k``.

    ``x``: inputs the model takes (the first ``max_examples``).
    """
    check_model("model", model)
    check_choice("unit", unit, UNITS)
    check_int("max_examples", max_examples, 1, 1_000_000)
    model.config.check_inputs("x", x)
    x = x[:max_examples].to(model.device)
    if y is not None:
        if not isinstance(y, torch.Tensor) or len(y) < len(x):
            raise ValueError("y must be a tensor of labels with one entry per example of x")
        y = y[:max_examples].to(model.device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for k, (x0, deep, par, s2) in enumerate(terms(model, model.embed(x), unit), start=1):
            moved = _mean_norm(deep - x0)
            diff = deep - par
            dnorm = _mean_norm(diff)
            share = 1 - _mean_norm(diff - s2) / dnorm if dnorm > 0 else float("nan")
            vals = {"gap": dnorm / moved if moved > 0 else float("nan"),
                    "second_order": _mean_norm(s2) / moved if moved > 0 else float("nan"),
                    "second_order_share": share}
            if y is not None:
                for name, h in (("deep", deep), ("parallel", par)):
                    loss, c, n = loss_and_correct(model.unembed(h), y)
                    vals[f"loss_{name}"], vals[f"acc_{name}"] = float(loss), c / max(n, 1)
            rows += [{"depth": k, "metric": m, "value": float(v)} for m, v in vals.items()]
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=["depth", "metric", "value"])


def _eval_rows(model, dataset, label: str) -> list[dict]:
    from ..core.training import evaluate

    out = evaluate(model, dataset, "val")
    return [{"model": label, "split": "val", "metric": m, "value": v} for m, v in out.items()]


def compare(model: nn.Module, dataset: Dataset, finetune: TrainConfig | None = None, unit: str = "block",
            callbacks=()) -> pd.DataFrame:
    """Validation loss and accuracy of the deep model, its unrolled copy and the unrolled copy fine-tuned.

    Tidy DataFrame ``model, split, metric, value`` with ``model`` in ``"deep"``, ``"unrolled"``,
    ``"unrolled + fine-tuned"``. ``finetune``: the :class:`~workbench.training.TrainConfig` of the
    fine-tuning (default 200 steps at lr 1e-3); ``model`` is not changed.
    """
    check_model("model", model)
    if finetune is not None and not isinstance(finetune, TrainConfig):
        raise ValueError(f"finetune must be a TrainConfig or None, got {type(finetune).__name__}")
    finetune = finetune or TrainConfig(steps=200, lr=1e-3, eval_every=200)
    rows = _eval_rows(model, dataset, "deep")
    unrolled = parallel(model, unit)
    rows += _eval_rows(unrolled, dataset, "unrolled")
    train(unrolled, dataset, finetune, callbacks=callbacks)
    rows += _eval_rows(unrolled, dataset, "unrolled + fine-tuned")
    return pd.DataFrame(rows)


def _best(run, metric: str = "loss") -> tuple[float, int]:
    """The lowest validation ``metric`` over a run's evaluations and the step it was reached at."""
    m = run.metrics
    sel = m[(m["metric"] == metric) & (m["split"] == "val")]
    if not len(sel):
        return float("nan"), -1
    i = int(sel["value"].to_numpy().argmin())
    return float(sel["value"].iloc[i]), int(sel["step"].iloc[i])


def compare_layouts(dataset: Dataset, config, train_config: TrainConfig | None = None, seeds=(0, 1, 2),
                    unit: str = "block", callbacks=()) -> pd.DataFrame:
    """Both layouts trained from scratch at equal parameters (Bermeitinger et al. 2023, Table 2).

    For each seed, ``build(config with that seed)`` is trained as the deep (sequential) stack, and the same
    initialisation as the first-order (parallel) layout: the two have the same parameters, one for one,
    the same embedding, final norm and readout, and see the same minibatches.

    Returns a tidy DataFrame ``layout, seed, split, metric, value`` (``docs/definitions.md#unroll-layouts``)
    with, on the validation split: ``loss`` and ``acc`` at the end of training; ``best_loss`` (the lowest
    validation loss over the evaluations, every ``train_config.eval_every`` steps: the early-stopping
    point, the comparison at convergence when the budget is long enough for both layouts to overfit),
    ``best_acc`` (the accuracy at that evaluation) and ``best_step``; ``train_loss`` at the end (split
    ``"train"``); and ``params``.
    """
    import dataclasses

    from ..core.models import count_params

    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise ValueError(f"train_config must be a TrainConfig or None, got {type(train_config).__name__}")
    train_config = train_config or TrainConfig(steps=500, eval_every=500)
    seeds = [check_seed("seed", s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    rows = []
    for seed in seeds:
        cfg = dataclasses.replace(config, seed=seed)
        for layout in ("sequential", "parallel"):
            model = build(cfg)
            net = model if layout == "sequential" else parallel(model, unit, copy_model=False)
            run = train(net, dataset, dataclasses.replace(train_config, seed=seed), callbacks=callbacks)
            base = {"layout": layout, "seed": seed, "split": "val"}
            best, step = _best(run)
            m = run.metrics
            at = m[(m["split"] == "val") & (m["metric"] == "acc") & (m["step"] == step)]["value"]
            vals = {"loss": run.final("loss"), "acc": run.final("acc"), "best_loss": best,
                    "best_acc": float(at.iloc[-1]) if len(at) else float("nan"), "best_step": float(step),
                    "params": float(count_params(net))}
            rows += [{**base, "metric": k, "value": v} for k, v in vals.items()]
            rows.append({**base, "split": "train", "metric": "train_loss", "value": run.final("loss", "train")})
    return pd.DataFrame(rows)
