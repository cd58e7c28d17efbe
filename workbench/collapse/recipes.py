"""The collapse experiment's recipes: the preset trainings of the Collapse page and notebook.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..core import checks, recipes
from ..core.models import MLPConfig, build
from ..core.training import TrainConfig
from .mixup import MixupLoss, imbalanced_counts, subsample
from .tracking import track

RECIPE_NAMES = tuple(recipes.COLLAPSE)


def recipe(dataset_name: str = "digits", *, imbalance: list[int] | float | None = None, n_minority: int = 5,
           mixup: float = 0.0, etf_classifier: bool = False, classifier: str = "learned",
           ebv_tau: float | None = None, ebv_threshold: float | None = None, weight_decay: float | None = None,
           epochs: int | None = None, n_layers: int | None = None, d_model: int | None = None,
           lr: float | None = None, batch_size: int | None = None, seed: int = 0, eval_every_epochs: int = 10,
           device: str | torch.device | None = None):
    """``(model, TrainConfig, dataset)`` that reach the terminal phase of training.

    ``dataset_name``: ``"digits"`` or ``"mnist1d"``. ``imbalance``: per-class training counts,
    or a ratio in (0, 1] applied to the last ``n_minority`` classes (step imbalance).
    ``mixup``: Mixup's Beta parameter alpha (0 = off; train with ``loss_fn=MixupLoss(alpha)``,
    which :func:`train_collapse` does). ``classifier``: the model config's head, ``"learned"``,
    ``"etf"`` (fixed simplex ETF) or ``"ebv"`` (fixed equiangular basis vectors, cosine logits over
    ``ebv_tau``, rows below ``ebv_threshold``); the config records it, so a stored run rebuilds the head.
    ``etf_classifier=True`` is ``classifier="etf"``. The remaining arguments override the recipe's defaults (:data:`workbench.recipes.COLLAPSE`).
    """
    if not isinstance(dataset_name, str) or dataset_name not in recipes.COLLAPSE:
        raise ValueError(f"dataset_name: recipes exist for {sorted(recipes.COLLAPSE)}, got {dataset_name!r}")
    checks.check_float("mixup", mixup, 0.0, 100.0)
    checks.check_bool("etf_classifier", etf_classifier)
    checks.check_choice("classifier", classifier, ("learned", "etf", "ebv"))
    if etf_classifier and classifier not in ("learned", "etf"):
        raise ValueError(f"etf_classifier=True asks for classifier='etf', got classifier={classifier!r}")
    classifier = "etf" if etf_classifier else str(classifier)
    heads = {k: v for k, v in (("ebv_tau", ebv_tau), ("ebv_threshold", ebv_threshold)) if v is not None}
    if heads and classifier != "ebv":
        raise ValueError(f"{sorted(heads)} apply to classifier='ebv', got classifier={classifier!r}")
    checks.check_int("n_minority", n_minority, 0)
    seed = checks.check_seed("seed", seed)
    checks.check_int("eval_every_epochs", eval_every_epochs, 1, 100_000)
    if epochs is not None:
        checks.check_int("epochs", epochs, 1, 100_000)
    declared = {**checks.constraints(MLPConfig), **checks.constraints(TrainConfig)}   # the configs' own bounds
    for name, v in (("n_layers", n_layers), ("d_model", d_model), ("batch_size", batch_size),
                    ("weight_decay", weight_decay), ("lr", lr)):
        if v is not None:
            declared[name].check(name, v)
    if imbalance is not None and not isinstance(imbalance, (list, tuple, torch.Tensor)):
        checks.check_float("imbalance", imbalance, 0.0, 1.0, lo_open=True)
    from ..core import data

    overrides = {"weight_decay": weight_decay, "epochs": epochs, "n_layers": n_layers, "d_model": d_model,
                 "lr": lr, "batch_size": batch_size}
    r = dataclasses.replace(recipes.COLLAPSE[dataset_name], **{k: v for k, v in overrides.items() if v is not None})
    ds = data.load(r.dataset)
    if imbalance is not None:
        if not isinstance(imbalance, (list, tuple, torch.Tensor)):
            per_class = torch.bincount(ds.y_train, minlength=ds.n_classes).tolist()
            imbalance = imbalanced_counts(per_class, float(imbalance), n_minority)
        ds = subsample(ds, list(imbalance), seed)
    model = build(r.model_config(ds, seed, classifier=classifier, **heads), device=device)
    cfg = r.train_config(len(ds.x_train), eval_every_epochs, seed)
    return model, cfg, ds


def train_collapse(dataset_name: str = "digits", *, every: int = 1, layers: bool = True, max_samples: int = 512,
                   callbacks=(), on_record=None, **recipe_options):
    """Train a :func:`recipe` while tracking collapse; returns the :class:`~workbench.training.Run`.

    The run's metrics hold the collapse rows (``split="train"`` with ``epoch``, ``layer``
    and ``site`` columns) next to the usual loss and accuracy; ``run.meta["collapse"]``
    records the recipe options and the tracker's time.
    """
    from ..core.training import train

    track(every=every, layers=layers, max_samples=max_samples)   # check the tracker's arguments before any work
    mixup = recipe_options.get("mixup", 0.0)
    seed = recipe_options.get("seed", 0)
    model, cfg, ds = recipe(dataset_name, **recipe_options)
    tracker = track(every=every, layers=layers, max_samples=max_samples, seed=seed, on_record=on_record)
    loss_fn = MixupLoss(mixup, seed) if mixup else None
    t0 = time.perf_counter()
    run = train(model, ds, cfg, callbacks=[tracker, *callbacks], name=f"collapse-{dataset_name}", loss_fn=loss_fn)
    run.meta["collapse"] = {"recipe": dataset_name, **{k: v for k, v in recipe_options.items()},
                            "track_seconds": tracker.seconds, "total_seconds": time.perf_counter() - t0}
    run.meta["collapse"]["class_counts"] = torch.bincount(ds.y_train, minlength=ds.n_classes).tolist()
    return run
