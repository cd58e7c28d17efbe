"""Prune and heal: a new model without some blocks (equal to the model with them skipped), the same as a
:class:`~workbench.training.Run`, optionally healed by training, and accuracy and loss against the fraction
removed per ranking.

Definitions: ``docs/definitions.md#prune-heal``.
"""
from __future__ import annotations

import copy
from typing import Iterable

import pandas as pd
import torch
import torch.nn as nn

from ...core import checks
from ...core import monitor as _monitor
from ...core.data import IGNORE
from ...core.training import Callback
from .runner import _is_native
from .similarity import RANK_METHODS, Rankings, Similarity, layer_similarity, rankings

# ============================================================================ 2. prune and heal


PRUNE_METHODS = RANK_METHODS + ("random",)


def _native_model(model, name: str = "model"):
    if not _is_native(model):
        raise ValueError(f"{name}: removing blocks needs a workbench model (Transformer or ResidualMLP), got "
                         f"{type(model).__name__}; run_sequence(model, x, order) reads any model with blocks left out")
    return model


def _check_layers(name: str, layers, n_layers: int) -> list[int]:
    """Distinct block indices in ``[0, n_layers - 1]``, sorted."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{name} must be a list of block indices in [0, {n_layers - 1}], got {layers!r:.80}")
    layers = list(layers)
    out = [checks.check_int(f"{name}[{i}]", v, 0, n_layers - 1) for i, v in enumerate(layers)]
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must list each block once, got {layers}")
    return sorted(out)


def prune(model: nn.Module, layers) -> nn.Module:
    """A new model with blocks ``layers`` removed; ``model`` is unchanged.

    The new model is a deep copy holding the other blocks in order (weights, fade-in gates, frozen flags
    and LayerNorm-Scaling factors as they were), its ``config`` rewritten by ``sync_config``
    (``n_layers``, ``layer_widths``), so :class:`~workbench.store.RunStore` saves and reloads it as any
    model. Its forward equals ``model``'s with those blocks replaced by the identity. Pruning every
    block is refused. ``docs/definitions.md#prune-heal``.
    """
    _native_model(model)
    L = len(model.blocks)
    drop = set(_check_layers("layers", layers, L))
    if L and len(drop) == L:
        raise ValueError(f"layers: pruning every block ({L} of {L}) leaves no residual stack; keep at least one")
    new = copy.deepcopy(model)
    new.blocks = nn.ModuleList(b for i, b in enumerate(new.blocks) if i not in drop)
    new.sync_config()
    return new


def _dataset(dataset, name: str = "dataset"):
    from ...core.data import Dataset, from_spec

    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, dict):
        return from_spec(dataset)
    raise ValueError(f"{name} must be a workbench.data.Dataset or a dataset spec, got {type(dataset).__name__}")


class _Stop(Callback):
    """A training callback that stops when the monitor is stopped (so a page's Stop ends a heal)."""

    def __init__(self, mon):
        self.mon = mon

    def on_start(self, state):
        if self.mon.stopped:
            state.stop = True

    def on_step(self, state):
        if self.mon.stopped:
            state.stop = True


def prune_run(source, layers, dataset=None, heal=None, name: str | None = None, callbacks=(),
              monitor=None):
    """Remove blocks ``layers`` from a model or a :class:`~workbench.training.Run` and return a new Run.

    ``dataset``: what to evaluate (and heal) on; default the source run's (rebuilt from its spec).
    ``heal``: a :class:`~workbench.training.TrainConfig` for a healing fine-tune of what remains (the whole
    pruned model, with :func:`workbench.train`), or None. The Run's metrics are the heal's (its first rows an
    evaluation right after pruning, at step 0) or that evaluation alone; ``meta`` holds ``removed``,
    ``kept`` (original indices), ``parent`` (the source run id, if stored) and ``healed_steps``. It is an
    ordinary run: ``RunStore.save`` stores it, ``RunStore.load`` rebuilds the same function.
    """
    from ...core import training

    mon = _monitor.resolve(monitor)
    run_in = source if isinstance(source, training.Run) else None
    model = run_in.model if run_in is not None else source
    _native_model(model, "source")
    if dataset is None and run_in is None:
        raise ValueError("dataset is required when the source is a model (a Run knows its own dataset)")
    ds = _dataset(dataset if dataset is not None else run_in.dataset)
    if heal is not None and not isinstance(heal, training.TrainConfig):
        raise ValueError(f"heal must be a TrainConfig or None, got {type(heal).__name__}")
    if name is not None:
        checks.check_str("name", name, 200)
    L = len(model.blocks)
    removed = _check_layers("layers", layers, L)
    pruned = prune(model, removed)
    kept = [i for i in range(L) if i not in set(removed)]
    base_name = name or f"{run_in.name if run_in is not None else ds.name}-pruned"
    meta = {"removed": removed, "kept": kept, "parent": run_in.run_id if run_in is not None else None,
            "n_layers_before": L, "healed_steps": 0}
    eval_max = heal.eval_max if heal is not None else 2048
    rows = [{"step": 0, "split": split, "metric": metric, "value": value}
            for split in ("train", "val") for metric, value in training.evaluate(pruned, ds, split, eval_max).items()]
    start = pd.DataFrame(rows)
    if heal is None:
        cfg = run_in.train_config if run_in is not None else training.TrainConfig()
        return training.Run(model=pruned, train_config=cfg, dataset=ds.spec(), metrics=start, name=base_name,
                            meta=meta)
    healed = training.train(pruned, ds, heal, callbacks=[_Stop(mon), *callbacks], name=base_name)
    healed.metrics = pd.concat([start, healed.metrics], ignore_index=True)
    done = healed.metrics[healed.metrics["split"] == "batch"]
    healed.meta = {**meta, "healed_steps": int(done["step"].max()) if len(done) else 0}
    return healed


def _removal_order(method: str, k: int, ranks: Rankings | None, sim: Similarity | None, L: int,
                   seed: int) -> list[int]:
    """The ``k`` blocks a method removes: the ``k`` least important, Gromov's best span of ``k``, or seeded random."""
    if k == 0:
        return []
    if method == "angular":
        start = sim.best_span(k)
        return list(range(start, start + k))
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(L, generator=g)[:k].tolist())
    return sorted(ranks.order(method)[:k])


def prune_heal_curve(model: nn.Module, dataset, methods=PRUNE_METHODS, fractions=None, heal=None,
                     rank_examples: int = 256, eval_max: int = 2048, seed: int = 0, monitor=None) -> pd.DataFrame:
    """Accuracy and loss against the fraction of blocks removed, per ranking, healed and not.

    For each ``method`` and each ``k = round(f L)`` (``fractions`` in ``[0, 1)``; default every
    ``k = 0 .. L-1``): ``block_influence`` and ``skip`` remove the ``k`` least important blocks of
    :func:`rankings`; ``angular`` removes Gromov et al.'s contiguous span of ``k`` blocks with the smallest
    angular distance ``d(l, k)``; ``random`` a seeded random set. Rankings are measured once, on the first
    ``rank_examples`` validation examples (scored tokens only). Each pruned model is evaluated on the
    validation split (``eval_max`` examples); with ``heal`` (a TrainConfig) a copy is also fine-tuned and
    evaluated (``k = 0``: the model trained as long, the control). Returns ``method, n_removed, fraction,
    removed, healed, acc, loss``; stops early (what is done so far) when the monitor stops.
    ``docs/definitions.md#prune-heal``.
    """
    from ...core import training

    mon = _monitor.resolve(monitor)
    _native_model(model)
    ds = _dataset(dataset)
    methods = list(checks.check_choices("methods", methods, PRUNE_METHODS))
    if heal is not None and not isinstance(heal, training.TrainConfig):
        raise ValueError(f"heal must be a TrainConfig or None, got {type(heal).__name__}")
    rank_examples = checks.check_int("rank_examples", rank_examples, 1, 100_000)
    eval_max = checks.check_int("eval_max", eval_max, 0, None)
    seed = checks.check_seed("seed", seed)
    L = len(model.blocks)
    if L < 2:
        raise ValueError(f"model: a prune curve needs at least 2 blocks, got n_layers = {L}")
    if fractions is None:
        ks = list(range(L))
    else:
        if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
            raise ValueError(f"fractions must be a list of numbers in [0, 1), got {fractions!r:.80}")
        ks = sorted({min(L - 1, round(checks.check_float(f"fractions[{i}]", f, 0.0, 1.0, hi_open=True) * L))
                     for i, f in enumerate(fractions)})
    xr, yr = ds.x_val[:rank_examples], ds.y_val[:rank_examples]
    mask = (yr != IGNORE) if (yr.shape == xr.shape and ds.kind == "sequence") else None
    ranks = rankings(model, xr, y=yr, mask=mask, skip="skip" in methods) \
        if set(methods) & {"block_influence", "skip"} else None
    sim = layer_similarity(model, xr, mask=mask) if "angular" in methods else None
    rows = []
    jobs = [(m, k) for m in methods for k in ks]
    total = len(jobs) * (2 if heal is not None else 1)
    done = 0
    for method, k in jobs:
        if mon.stopped:
            break
        removed = _removal_order(method, k, ranks, sim, L, seed)
        pruned = prune(model, removed)
        label = ",".join(map(str, removed))
        ev = training.evaluate(pruned, ds, "val", eval_max)
        rows.append((method, k, k / L, label, False, ev["acc"], ev["loss"]))
        done += 1
        mon.report(done / total, f"{method}: {k} of {L} removed")
        if heal is not None and not mon.stopped:
            run = training.train(pruned, ds, heal, callbacks=[_Stop(mon)])
            if run.status == "cancelled":
                break
            ev = training.evaluate(pruned, ds, "val", eval_max)
            rows.append((method, k, k / L, label, True, ev["acc"], ev["loss"]))
            done += 1
            mon.report(done / total, f"{method}: {k} of {L} removed, healed")
    return pd.DataFrame(rows, columns=["method", "n_removed", "fraction", "removed", "healed", "acc", "loss"])
