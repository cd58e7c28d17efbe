"""Specialists on one substrate: the check that models can be composed (one vocabulary, one frozen
substrate, one architecture), the shared-vocabulary text domains, class-split tasks, and training the
specialists from one base.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..core import checks
from ..core import data as _data
from ..core.training import TrainConfig, train


class SubstrateError(ValueError):
    """Models cannot be composed: different vocabularies, substrates or architectures."""


# ----------------------------------------------------------------------------- checks


def _out_size(model: nn.Module) -> int:
    cfg = model.config
    return cfg.vocab_size if hasattr(cfg, "vocab_size") else cfg.n_classes


def check_substrate(models: Sequence[nn.Module]) -> None:
    """Raise :class:`SubstrateError` unless all models share one vocabulary and one substrate.

    Checked: the model family; the output size (vocabulary or classes); the token strings when
    configs list them; the embedding kind (``"glyph"``, ``"frozen-random"`` or ``"trainable"``);
    and, for frozen embeddings, that the embedding tables are equal element for element.
    """
    models = list(models)
    if not models:
        raise SubstrateError("no models given")
    families = [getattr(m.config, "family", type(m).__name__) for m in models]
    if len(set(families)) > 1:
        raise SubstrateError(f"members belong to different model families: {families}")
    sizes = [_out_size(m) for m in models]
    if len(set(sizes)) > 1:
        raise SubstrateError(f"members have different vocabularies: output sizes {sizes}; "
                             "build every specialist's data with one shared vocabulary (see shared_text)")
    vocabs = [getattr(m.config, "vocab", None) for m in models]
    listed = [v for v in vocabs if v is not None]
    for i, v in enumerate(listed[1:], 1):
        if list(v) != list(listed[0]):
            j = next(k for k, (a, b) in enumerate(zip(listed[0], v)) if a != b)
            raise SubstrateError(f"members have different vocabularies: token {j} is {listed[0][j]!r} in one "
                                 f"and {v[j]!r} in another")
    kinds = [getattr(m.config, "embedding", None) for m in models]
    if len(set(kinds)) > 1:
        raise SubstrateError(f"members use different substrates (embedding kinds {kinds}); "
                             "train specialists over one frozen substrate")
    if kinds[0] in ("glyph", "frozen-random"):
        ref = models[0].tok_embed.weight.detach().cpu()
        for i, m in enumerate(models[1:], 1):
            other = m.tok_embed.weight.detach().cpu()
            if other.shape != ref.shape:
                raise SubstrateError(f"members use different substrates: embedding table of member {i} has shape "
                                     f"{tuple(other.shape)}, member 0 {tuple(ref.shape)}")
            if not torch.equal(other, ref):
                diff = float((other - ref).abs().max())
                raise SubstrateError(f"members use different substrates: the frozen {kinds[0]} embedding of member "
                                     f"{i} differs from member 0's (max |difference| {diff:.3g}); build them with "
                                     "the same vocabulary, d_model, font and seed")


def _check_mergeable(base: nn.Module, models: Sequence[nn.Module]) -> None:
    """Same substrate, same architecture (config fields other than ``seed``) and the same tensors."""
    check_substrate([base, *models])
    base_cfg = dataclasses.asdict(base.config)
    for i, m in enumerate(models):
        cfg = dataclasses.asdict(m.config)
        differ = sorted(k for k in base_cfg if k != "seed" and base_cfg[k] != cfg.get(k))
        if differ:
            raise SubstrateError(f"weight-space merges need one architecture: model {i} differs from the base in "
                                 f"{differ}")
        a, b = base.state_dict(), m.state_dict()
        if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
            raise SubstrateError(f"weight-space merges need one architecture: model {i}'s tensors differ from the base's")


# ----------------------------------------------------------------------------- data


_SHARED_TEXT_REFUSED = ("path", "text", "vocab", "corpus")   # data.load("text") options shared_text sets itself


def shared_text(corpora: Iterable[str] = ("grammar", "arithmetic"), **options) -> dict[str, _data.Dataset]:
    """``{corpus: Dataset}`` of built-in text corpora over one shared vocabulary (sorted union of characters).

    ``options`` are passed to ``data.load("text", ...)`` for every corpus (``context``,
    ``corpus_chars``, ``seed``, ...); the text sources and the vocabulary (``path``, ``text``,
    ``vocab``, ``corpus``) are refused with ``ValueError``. With one vocabulary, models built from any of the datasets
    (``models.config_for``) share token ids and, with a frozen embedding, one substrate.
    """
    if isinstance(corpora, (str, bytes)) or not hasattr(corpora, "__iter__"):
        raise ValueError(f"corpora must be a list of built-in corpus names, got {corpora!r}")
    corpora = list(corpora)
    if not corpora:
        raise ValueError("corpora: shared_text needs at least one corpus")
    for c in corpora:
        checks.check_choice("corpora[]", c, sorted(_data.CORPORA))
    if len(set(corpora)) != len(corpora):
        raise ValueError(f"corpora must not repeat a corpus, got {corpora}")
    refused = [k for k in _SHARED_TEXT_REFUSED if k in options]
    if refused:   # the sources are the built-in corpora, and the vocabulary is built here
        raise ValueError(f"shared_text options must not include {', '.join(_SHARED_TEXT_REFUSED)}: it reads the "
                         f"built-in corpora named in corpora (of {sorted(_data.CORPORA)}) and builds the vocabulary "
                         f"itself; got {', '.join(refused)} (for a text of your own use data.load('text', text=...))")
    chars: set[str] = set()
    for c in corpora:
        chars |= set(_data.load("text", corpus=c, **options).vocab)
    vocab = "".join(sorted(chars))
    return {c: _data.load("text", corpus=c, vocab=vocab, **options) for c in corpora}


def concat(datasets: Mapping[str, _data.Dataset] | Sequence[_data.Dataset], name: str = "mixture") -> _data.Dataset:
    """One dataset holding every part's train and validation examples (same vocabulary and length).

    Used to train a shared base before specialising, and as a calibration set for gates.
    Its ``spec()`` lists the parts' specs under ``parts``.
    """
    checks.check_str("name", name, 200)
    if not isinstance(datasets, (Mapping, list, tuple)):
        raise ValueError(f"datasets must be a dict or list of Datasets, got {type(datasets).__name__}")
    parts = list(datasets.values()) if isinstance(datasets, Mapping) else list(datasets)
    if not parts:
        raise ValueError("datasets: concat needs at least one dataset")
    for i, d in enumerate(parts):
        checks.check_dataset(f"datasets[{i}]", d)
    first = parts[0]
    for d in parts[1:]:
        if d.kind != first.kind or d.n_classes != first.n_classes or d.vocab != first.vocab:
            raise SubstrateError("concat: datasets must share kind and vocabulary")
        if d.x_train.shape[1:] != first.x_train.shape[1:]:
            raise ValueError(f"concat: example shapes differ ({tuple(d.x_train.shape[1:])} vs "
                             f"{tuple(first.x_train.shape[1:])})")
    cat = lambda attr: torch.cat([getattr(d, attr) for d in parts])  # noqa: E731
    return _data.Dataset(name, first.kind, cat("x_train"), cat("y_train"), cat("x_val"), cat("y_val"),
                         first.n_classes, f"concatenation of {len(parts)} datasets: " + "; ".join(
                             d.description for d in parts), first.vocab, {"parts": [d.spec() for d in parts]})


def train_specialists(base: nn.Module, datasets: Mapping[str, _data.Dataset], config: TrainConfig | None = None,
                      callbacks=(), parent: str | None = None, group: str | None = None) -> dict:
    """Fine-tune one copy of ``base`` per dataset: ``{name: Run}``, all from one initialisation.

    ``run.meta`` records ``role="specialist"``, the ``domain``, the ``parent`` run id and the
    ``group`` (if given), so weight-space merges can find their base in the store.
    """
    from ..lmc.permute import check_model_data

    if not isinstance(datasets, Mapping) or not datasets:
        raise ValueError("datasets must be a non-empty dict {name: Dataset}")
    for name, ds in datasets.items():
        check_model_data(base, ds, f"datasets[{name!r}]")
    if config is not None:
        config.validate()
    runs = {}
    for name, ds in datasets.items():
        run = train(copy.deepcopy(base), ds, config, callbacks=callbacks, name=f"specialist-{name}")
        run.meta = {"role": "specialist", "domain": name, "parent": parent, "group": group}
        runs[name] = run
    return runs


def class_tasks(dataset: _data.Dataset, groups: Sequence[Sequence[int]]) -> dict[str, _data.Dataset]:
    """``{"classes 0,1": Dataset}``: one task per group of classes, holding only those classes' examples.

    The label space stays the dataset's (a model keeps all its outputs), so models fine-tuned on
    different tasks share one architecture and can be merged; used for the sequential experiment.
    """
    checks.check_dataset("dataset", dataset, kind="vector")
    if isinstance(groups, (str, bytes)) or not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"groups must be a non-empty list of lists of class labels, got {groups!r:.80}")
    out = {}
    for g in groups:
        if isinstance(g, (str, bytes)) or not isinstance(g, (list, tuple)) or not g:
            raise ValueError(f"groups[] must be a non-empty list of class labels, got {g!r:.80}")
        labels = [checks.check_int("groups[][]", c, 0, dataset.n_classes - 1) for c in g]
        if len(set(labels)) != len(labels):
            raise ValueError(f"groups[] must not repeat a class, got {list(g)}")
        name = "classes " + ",".join(map(str, labels))
        if name in out:
            raise ValueError(f"groups must differ, got {list(g)} twice")
        cls = torch.tensor(labels)
        tr, va = torch.isin(dataset.y_train, cls), torch.isin(dataset.y_val, cls)
        if not tr.any() or not va.any():
            raise ValueError(f"groups[]: classes {labels} have no training or validation examples")
        out[name] = _data.Dataset(f"{dataset.name} ({name})", dataset.kind, dataset.x_train[tr], dataset.y_train[tr],
                                  dataset.x_val[va], dataset.y_val[va], dataset.n_classes,
                                  f"{dataset.description}; only {name}", dataset.vocab,
                                  {**dataset.options, "classes": labels})
    return out
