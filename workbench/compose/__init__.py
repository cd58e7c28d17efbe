"""Compose specialists trained over one frozen substrate: logit mixtures and weight-space merges.

Growing Transformers (Bochkov 2025) trains specialists on different corpora over the same
frozen, deterministic embedding table and merges them by averaging their output logits,
with no architectural change. This module provides that merge and the weight-space merges
that need a shared initialisation (specialists fine-tuned from one base), and one table that
says whether a merge beats its parts without forgetting:

>>> import workbench as wb
>>> domains = wb.compose.shared_text(["grammar", "arithmetic"], context=32, corpus_chars=20_000)
>>> cfg = wb.models.config_for(domains["grammar"], d_model=64, embedding="frozen-random")
>>> base = wb.models.build(cfg)
>>> runs = wb.compose.train_specialists(base, domains, wb.TrainConfig(steps=100))
>>> members = {name: run.model for name, run in runs.items()}
>>> merges = {"mixture": wb.compose.LogitMixture(list(members.values())),
...           "TIES": wb.compose.ties(base, list(members.values()), density=0.2)}
>>> table = wb.compose.evaluate(members, merges, domains)       # tidy: model, role, domain, metric, value

Logit mixtures (:class:`LogitMixture`) need only a shared vocabulary and substrate; weight-space
merges (:func:`linear`, :func:`task_arithmetic`, :func:`ties`, :func:`lines`) also need the same
architecture and a shared parent ``base``: a task vector is ``theta_i - theta_base``.

DARE, SLERP and Model Stock are further weight-space merges, all reached through :func:`merge`;
:func:`sequential` merges models one at a time as their tasks arrive (OPCM, averaging, task arithmetic)
and scores each merge on every task seen so far.

Definitions: ``docs/definitions.md#task-arithmetic``, ``#ties``, ``#lines``, ``#logit-mixture``, ``#dare``,
``#slerp``, ``#model-stock``, ``#task-vector-cosine``, ``#opcm``.
"""
from __future__ import annotations

from .evaluation import MERGES, evaluate, merge, summary, sweep
from .merges import (
    dare,
    dare_ties,
    linear,
    lines,
    model_stock,
    model_stock_ratio,
    slerp,
    slerp_tensor,
    task_arithmetic,
    task_cosines,
    task_vectors,
    ties,
)
from .mixture import LogitMixture, gate_table
from .online import SEQUENTIAL, opcm, opcm_project, sequential
from .substrate import (
    SubstrateError,
    check_substrate,
    class_tasks,
    concat,
    shared_text,
    train_specialists,
)

__all__ = [
    "SubstrateError", "check_substrate", "shared_text", "concat", "train_specialists", "LogitMixture",
    "task_vectors", "linear", "task_arithmetic", "ties", "lines", "dare", "dare_ties", "slerp",
    "slerp_tensor", "model_stock", "model_stock_ratio", "task_cosines", "opcm_project", "opcm", "sequential",
    "SEQUENTIAL", "sweep", "class_tasks", "merge", "MERGES", "evaluate", "summary", "gate_table",
]
