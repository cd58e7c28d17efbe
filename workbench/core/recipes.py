"""The preset experiments, as frozen dataclasses shared by notebooks, the bench and the dashboard.

A recipe says which data, which model size and which training budget an experiment uses, and
builds each of them (``load_data()``, ``model_config(ds, n_layers)``, ``train_config()``), so no
caller picks keys out of nested dicts by hand. Recipes are immutable: ``dataclasses.replace``
(or the ``overrides`` of each builder) gives a variant.

- :data:`KHOP` -- growth on 2-hop pointer chasing in the table layout (notebook 01, bench, Grow page).
- :data:`TEXT` -- growth on a character LM, where growth pays in FLOPs (notebook 01 section 5, bench).
- :data:`COLLAPSE` -- ``{"digits": ..., "mnist1d": ...}``: the terminal phase of training (Collapse page, notebook 04).
- :data:`TRANSFORMER_PAIR` -- two Transformers on one-hop khop for connectivity (Connectivity page, notebook 03).
- :data:`MLP_PAIR` -- two residual MLPs on vector data for connectivity (the Connectivity page's pair).
- :data:`COMPOSE` -- a base on pooled corpora, then one specialist per corpus (Compose page).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["GrowthRecipe", "CollapseRecipe", "PairRecipe", "ComposeRecipe", "KHOP", "TEXT", "COLLAPSE",
           "TRANSFORMER_PAIR", "MLP_PAIR", "COMPOSE"]


def _frozen(d: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class GrowthRecipe:
    """A growth experiment: a task, a Transformer size, a budget per growth stage (and an optional depth sweep)."""

    dataset: str                               # data.load name
    data_options: Mapping[str, Any]            # data.load options
    d_model: int                               # residual width
    n_heads: int                               # attention heads
    d_mlp: int                                 # MLP hidden units
    final_layers: int                          # depth the schedule grows to
    steps_per_stage: int                       # optimizer steps per growth stage
    batch_size: int
    lr: float
    eval_every: int
    eval_max: int                              # examples per split for evaluation (0: all)
    sweep_hops: tuple[int, ...] = ()           # depth sweep: tasks (khop hops)
    sweep_depths: tuple[int, ...] = ()         # depth sweep: depths
    sweep_steps: int = 0                       # depth sweep: steps per run

    def load_data(self, **overrides):
        """The recipe's dataset (``overrides`` replace options, e.g. ``hops=3``)."""
        from . import data

        return data.load(self.dataset, **{**self.data_options, **overrides})

    def model_options(self) -> dict[str, int]:
        """Width options for :class:`~workbench.models.TransformerConfig` (no depth, no vocabulary)."""
        return {"d_model": self.d_model, "n_heads": self.n_heads, "d_mlp": self.d_mlp}

    def model_config(self, dataset, n_layers: int, **overrides):
        """A :class:`~workbench.models.TransformerConfig` of this size for ``dataset`` with ``n_layers`` blocks."""
        from . import models

        return models.config_for(dataset, n_layers=n_layers, **{**self.model_options(), **overrides})

    def train_config(self, steps: int | None = None, **overrides):
        """A :class:`~workbench.TrainConfig` with the recipe's optimizer settings (``steps``: one stage by default)."""
        from .training import TrainConfig

        options = {"steps": self.steps_per_stage if steps is None else steps, "batch_size": self.batch_size,
                   "lr": self.lr, "eval_every": self.eval_every, "eval_max": self.eval_max, **overrides}
        return TrainConfig(**options).validate()

    def sweep_config(self, **overrides):
        """The depth sweep's :class:`~workbench.TrainConfig` (``sweep_steps`` steps)."""
        return self.train_config(steps=self.sweep_steps, **overrides)


# Pointer chasing in the "table" layout (position i holds f(i), then "|" and 8 query nodes, each
# scored), where one look-up is one attention step, so 2 hops need 2 blocks. Measured (1 thread, val
# accuracy): after 600 steps 1 hop is solved at every depth, 2 hops at depth >= 2 (> 0.99) while
# depth 1 stays at the one-look-up baseline (~0.38, growth.khop_baseline); 3 hops need more steps.
KHOP = GrowthRecipe(
    dataset="khop",
    data_options=_frozen({"hops": 2, "nodes": 8, "queries": 8, "layout": "table", "n_train": 20000, "n_val": 500}),
    d_model=32, n_heads=2, d_mlp=64, final_layers=2,
    steps_per_stage=400, batch_size=64, lr=3e-3, eval_every=50, eval_max=500,
    sweep_hops=(1, 2), sweep_depths=(1, 2, 3), sweep_steps=600,
)

# Character-level LM on the built-in grammar corpus (843 training windows of 32 characters), 1 -> 2
# blocks, G_stack at step 200. Measured (1 thread, three seed pairs): the grown model reaches the
# from-scratch 2-block model's final val loss with 0.56-0.70 of its training FLOPs. At this small
# budget a 1-block model from scratch on the same FLOPs ends lower still: the win is cheap shallow
# steps, not depth yet.
TEXT = GrowthRecipe(
    dataset="text",
    data_options=_frozen({"context": 32, "corpus_chars": 30000}),
    d_model=32, n_heads=2, d_mlp=128, final_layers=2,
    steps_per_stage=200, batch_size=32, lr=3e-3, eval_every=25, eval_max=0,
)


@dataclass(frozen=True)
class CollapseRecipe:
    """A residual MLP trained into the terminal phase (zero training error, then on), measured in epochs."""

    dataset: str              # "digits" or "mnist1d"
    d_model: int
    n_layers: int
    d_hidden: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    schedule: str             # "constant" or "cosine"
    warmup_epochs: int = 0

    def steps_per_epoch(self, n_train: int) -> int:
        return math.ceil(n_train / min(self.batch_size, n_train))

    def model_config(self, dataset, seed: int = 0, **overrides):
        """The MLP config; ``overrides`` set other fields (e.g. ``classifier="etf"``)."""
        from . import models

        return models.MLPConfig(d_in=dataset.d_in, n_classes=dataset.n_classes, d_model=self.d_model,
                                n_layers=self.n_layers, d_hidden=self.d_hidden, seed=seed, **overrides).validate()

    def train_config(self, n_train: int, eval_every_epochs: int = 10, seed: int = 0):
        from .training import TrainConfig

        spe = self.steps_per_epoch(n_train)
        return TrainConfig(steps=self.epochs * spe, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, schedule=self.schedule, warmup=self.warmup_epochs * spe,
                           eval_every=eval_every_epochs * spe, eval_max=0, seed=seed).validate()


# Both reach zero training error and then keep training within two minutes on 2 CPU cores.
# Digits: zero error by epoch ~8 of 100 at a constant rate. MNIST-1D does not reach zero training
# error at a constant rate in that time: cosine decay does (at about epoch 45 of 80).
COLLAPSE: Mapping[str, CollapseRecipe] = _frozen({
    "digits": CollapseRecipe("digits", d_model=128, n_layers=3, d_hidden=256, epochs=100, batch_size=64, lr=1e-3,
                             weight_decay=5e-2, schedule="constant"),
    "mnist1d": CollapseRecipe("mnist1d", d_model=128, n_layers=2, d_hidden=256, epochs=80, batch_size=128, lr=3e-3,
                              weight_decay=5e-2, schedule="cosine", warmup_epochs=1),
})


@dataclass(frozen=True)
class PairRecipe:
    """Two models of one config trained from different seeds, for linear-mode connectivity."""

    dataset: str
    data_options: Mapping[str, Any] = field(default_factory=_frozen)
    model_options: Mapping[str, Any] = field(default_factory=_frozen)
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    seeds: tuple[int, int] = (0, 1)

    def load_data(self, **overrides):
        from . import data

        return data.load(self.dataset, **{**self.data_options, **overrides})

    def model_config(self, dataset, **overrides):
        from . import models

        return models.config_for(dataset, **{**self.model_options, **overrides})

    def train_config(self, **overrides):
        from .training import TrainConfig

        options = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, **overrides}
        options.setdefault("eval_every", options["steps"])
        return TrainConfig(**options).validate()

    def replace(self, **changes) -> "PairRecipe":
        return dataclasses.replace(self, **changes)


# One-hop khop in the table layout: a small Transformer learns it within a few hundred steps, so
# both endpoints are trained (val acc 1.0). Train loss barrier 1.63 -> 1.04 (weight matching) ->
# 0.35 (activation matching), notebook 03.
TRANSFORMER_PAIR = PairRecipe(
    dataset="khop",
    data_options=_frozen({"hops": 1, "nodes": 8, "queries": 8, "layout": "table", "n_train": 4000, "n_val": 500}),
    model_options=_frozen({"d_model": 32, "n_heads": 4, "d_mlp": 64, "n_layers": 2}),
    steps=500, batch_size=64, lr=3e-3,
)

# The Connectivity page's pair on vector data (digits, or MNIST-1D with its own input size).
MLP_PAIR = PairRecipe(dataset="digits", model_options=_frozen({"d_model": 128, "n_layers": 2}), steps=300,
                      batch_size=64, lr=3e-3)


@dataclass(frozen=True)
class ComposeRecipe:
    """A base Transformer on pooled character corpora over one substrate, then one specialist per corpus
    fine-tuned from it (the weight-space merges need one base)."""

    context: int = 32               # characters per training window
    corpus_chars: int = 20_000      # characters taken from each corpus
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    steps: int = 150                # per stage: the base, then each specialist
    batch_size: int = 32
    lr: float = 3e-3                # the base's
    specialist_lr: float = 1e-3     # the specialists' (fine-tuning)
    eval_max: int = 256

    def model_options(self, **overrides) -> dict:
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads, "d_mlp": self.d_mlp,
                **overrides}

    def train_config(self, steps: int | None = None, **overrides):
        """The base's :class:`~workbench.TrainConfig` (the specialists': ``lr=specialist_lr``), evaluated twice."""
        from .training import TrainConfig

        steps = self.steps if steps is None else steps
        options = {"steps": steps, "batch_size": self.batch_size, "lr": self.lr, "eval_every": max(steps // 2, 1),
                   "eval_max": self.eval_max, **overrides}
        return TrainConfig(**options).validate()


# The Compose page's: 2-block Transformers of width 64 on 20k characters per corpus, 150 steps per stage.
COMPOSE = ComposeRecipe()
