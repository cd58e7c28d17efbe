"""The two flat model configs, :class:`MLPConfig` and :class:`TransformerConfig`, with what each family
knows about its data (``data_kind``, ``from_dataset``, ``check_dataset``, ``check_inputs``) and its size
(``param_count``, ``activation_floats``); the memory budget every ``validate()`` ends with
(``WORKBENCH_MAX_MODEL_MB``); a config to and from a JSON-ready dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..checks import (
    SEED_MAX,
    Flag,
    Interval,
    OneOf,
    bounded,
    check_features,
    check_fields,
    check_int,
    check_labels,
    check_str,
    check_tokens,
    constraints,
    env_limit,
    required,
)
from .heads import _check_fixed_head

NOMINAL_BATCH = 16      # examples per batch assumed by validate()'s memory estimate
# The bounds shared by both families' fields (each field declares its own; see the configs below).
VOCAB_MAX = 2**20                   # tokens of a Transformer (vocab_size, and the length of vocab)
WIDTH = Interval(int, 1, 65536)     # hidden units of one block's MLP: d_hidden, d_mlp, each of layer_widths
DEPTH = Interval(int, 0, 256)       # blocks: n_layers
SEED = Interval(int, 0, SEED_MAX)   # initialisation seed
NORMS = OneOf(("lns", "none", "peri", "pre"))


# ----------------------------------------------------------------------------- memory budget


def max_model_mb() -> float:
    """The model memory budget in MB: ``WORKBENCH_MAX_MODEL_MB`` (default 2048), read at call time."""
    return env_limit("WORKBENCH_MAX_MODEL_MB", 2048)


def estimate_memory(config, batch_size: int = NOMINAL_BATCH) -> dict:
    """Estimated memory of training a model of ``config`` (float32), in bytes, before building it.

    ``params`` is the exact parameter count ``P`` (from the shapes; :func:`count_params` of the
    built model). Training holds the weights, their gradients and AdamW's two moments:
    ``train_bytes = 4 * 4 * P`` (4x the weights). Activations kept for the backward pass of
    one batch of ``B = batch_size`` examples, 4 bytes each:

    - MLP: ``B * (d_in + n_layers * (4 d_model + 2 d_hidden) + 2 d_model + 2 n_classes)``
    - Transformer: ``B * context * (n_layers * (10 d_model + 2 d_mlp) + 4 d_model + 2 vocab_size)``
      (the attention matrix is not counted: ``scaled_dot_product_attention`` uses fused kernels)

    ``total_bytes = train_bytes + activation_bytes``; :meth:`MLPConfig.validate` and
    :meth:`TransformerConfig.validate` refuse a total over ``WORKBENCH_MAX_MODEL_MB`` for a
    nominal batch of :data:`NOMINAL_BATCH`; :func:`workbench.training.train` checks the real batch.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be an MLPConfig or TransformerConfig, got {type(config).__name__}")
    check_int("batch_size", batch_size, 1, 10_000_000)
    n = config.param_count()
    params, act = 4 * n, 4 * config.activation_floats(batch_size)
    return {"params": n, "param_bytes": params, "train_bytes": 4 * params, "activation_bytes": act,
            "total_bytes": 4 * params + act, "batch_size": batch_size}


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 2**20:.2f} MB"


def check_memory(config, batch_size: int = NOMINAL_BATCH) -> dict:
    """Refuse (``ValueError`` with the estimate and the limit) a config whose training would not fit the budget."""
    est = estimate_memory(config, batch_size)
    limit = max_model_mb()
    if est["total_bytes"] > limit * 2**20:
        raise ValueError(
            f"the {config.family} model is too large: training it needs about {_fmt_bytes(est['total_bytes'])} "
            f"({est['params']:,} parameters = {_fmt_bytes(est['param_bytes'])} of weights, x4 with gradients and "
            f"AdamW state, plus {_fmt_bytes(est['activation_bytes'])} of activations for a batch of {batch_size}), "
            f"more than the limit of {limit:g} MB (WORKBENCH_MAX_MODEL_MB)")
    return est


# ----------------------------------------------------------------------------- configs


def _plain_str(value) -> str:
    """A checked string option as a plain ``str`` (``numpy.str_`` and other subclasses normalised)."""
    return str(value)


def _shape_error(name: str, x: torch.Tensor, want: str) -> ValueError:
    return ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")


def layer_widths(config) -> list[int]:
    """Hidden units of each block's MLP: ``config.layer_widths`` (set when :func:`workbench.growth.widen`
    made the blocks differ), else the family's width (``d_hidden`` / ``d_mlp``) for every block."""
    widths = getattr(config, "layer_widths", None)
    if widths is not None:
        return list(widths)
    return [getattr(config, "d_hidden", None) or config.d_mlp] * config.n_layers


def _check_layer_widths(widths, n_layers: int) -> list[int] | None:
    """``None`` or a list of ``n_layers`` integers in :data:`WIDTH` (plain ``int``s)."""
    if widths is None:
        return None
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or len(widths) != n_layers:
        raise ValueError(f"layer_widths must be None or a list of n_layers={n_layers} integers in "
                         f"[{WIDTH.lo}, {WIDTH.hi}], got {widths!r:.80}")
    return [WIDTH.check(f"layer_widths[{i}]", w) for i, w in enumerate(widths)]


def _choices(cls) -> MappingProxyType:
    """``{field: allowed values}`` of a config's string fields, read from their declared constraints."""
    return MappingProxyType({k: c.values for k, c in constraints(cls).items() if isinstance(c, OneOf)})


@dataclass
class MLPConfig:
    """Residual MLP for vector data (digits, MNIST-1D)."""

    d_in: int = required(Interval(int, 1, 2**20))           # input features (64 for digits, 40 for MNIST-1D)
    n_classes: int = required(Interval(int, 2, 2**20))      # output classes
    d_model: int = bounded(128, Interval(int, 1, 8192))     # width of the residual stream
    n_layers: int = bounded(2, DEPTH)                       # number of residual blocks
    d_hidden: int = bounded(256, WIDTH)                     # hidden units inside each block
    norm: str = bounded("pre", NORMS)   # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))); "none": x + f(x);
    #                                     "lns": x + f(LN(x) / sqrt(l)) (LayerNorm Scaling, l the 1-based block index)
    activation: str = bounded("relu", OneOf(("gelu", "relu")))
    seed: int = bounded(0, SEED)                            # initialisation seed
    layer_widths: list[int] | None = None  # per-block hidden units after growth.widen; None: d_hidden each
    # readout: "learned", "etf" (fixed simplex ETF) or "ebv" (fixed EBV, cosine logits)
    classifier: str = bounded("learned", OneOf(("ebv", "etf", "learned")))
    ebv_tau: float = bounded(0.1, Interval(float, 1e-4, 100.0))    # "ebv": logits = normalize(f) W^T / ebv_tau
    # "ebv": pairwise |cos| of the head's rows pushed below this (seeded descent)
    ebv_threshold: float = bounded(0.05, Interval(float, 0.0, 1.0, hi_open=True))

    family = "mlp"            # key in FAMILIES (a class attribute, not a field)
    data_kind = "vector"      # the Dataset.kind this family takes
    # CHOICES (set below the class): the allowed values of the string fields, from their constraints

    def validate(self) -> "MLPConfig":
        """Check every field's declared constraint (:func:`workbench.checks.check_fields`), then
        ``layer_widths``, the fixed head and the memory budget (:func:`check_memory`); returns self.

        Checked values are stored back as plain Python ``int``/``str`` (a ``numpy.int64`` field
        becomes an ``int``), so the config is JSON-ready and safe for ``torch.Generator.manual_seed``.
        """
        check_fields(self)
        self.layer_widths = _check_layer_widths(self.layer_widths, self.n_layers)
        _check_fixed_head(self.classifier, self.n_classes, self.d_model, self.ebv_threshold)
        check_memory(self)
        return self

    # -- what the family knows about its data

    @classmethod
    def from_dataset(cls, dataset, **overrides) -> "MLPConfig":
        """A validated config that fits a vector ``dataset`` (input features, classes); ``overrides`` set the rest."""
        return cls(**{"d_in": dataset.d_in, "n_classes": dataset.n_classes, **overrides}).validate()

    def check_dataset(self, dataset) -> None:
        """Refuse a dataset this model cannot run on (see :func:`workbench.training.check_pairing`)."""
        from ..data import IGNORE

        name = dataset.name
        if dataset.x_train.dim() != 2 or dataset.x_train.shape[1] != self.d_in:
            raise ValueError(f"the model takes d_in={self.d_in} features but dataset {name!r} has "
                             f"{tuple(dataset.x_train.shape[1:])}")
        for split in ("train", "val"):
            x, y = dataset.split(split)
            if not x.dtype.is_floating_point:
                raise ValueError(f"dataset {name!r}: an MLP takes real (floating-point) features, the {split} "
                                 f"features are {x.dtype}")
            if y.dim() != 1:
                raise ValueError(f"dataset {name!r}: an MLP takes one label per example, the {split} labels have "
                                 f"shape {tuple(y.shape)}")
        top = max([dataset.n_classes - 1] + _label_max(dataset, IGNORE))
        if top >= self.n_classes:
            raise ValueError(f"the model has {self.n_classes} classes but dataset {name!r} has labels up to {top}")
        for split in ("train", "val"):
            check_labels(f"dataset {name!r} {split} labels", dataset.split(split)[1], self.n_classes, ignore=IGNORE)

    def check_inputs(self, name: str, x) -> torch.Tensor:
        """``x`` must be real vectors ``(N, d_in)``; returns it."""
        check_features(name, x)
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise _shape_error(name, x, f"vectors (N, {self.d_in})")
        return x

    # -- size

    def param_count(self) -> int:
        """Parameters of the model this (type-checked) config builds, counted from the shapes."""
        d = self.d_model
        norm = 0 if self.norm == "none" else 2 * d
        blocks = sum(norm + (d * h + h) + (h * d + d) + (2 * d if self.norm == "peri" else 0)
                     for h in layer_widths(self))
        return (self.d_in * d + d) + blocks + norm + (d * self.n_classes + self.n_classes)

    def activation_floats(self, batch_size: int) -> int:
        """Activations kept for the backward pass of one batch, in floats (see :func:`estimate_memory`)."""
        d = self.d_model
        per_block = sum(4 * d + 2 * h for h in layer_widths(self))
        return batch_size * (self.d_in + per_block + 2 * d + 2 * self.n_classes)


@dataclass
class TransformerConfig:
    """Decoder-only Transformer for token sequences (khop, modadd, text)."""

    vocab_size: int = required(Interval(int, 2, VOCAB_MAX))    # number of tokens
    context: int = bounded(64, Interval(int, 1, 65536))        # maximum sequence length (learned positions)
    d_model: int = bounded(128, Interval(int, 1, 16384))       # width of the residual stream
    n_layers: int = bounded(2, DEPTH)                          # number of blocks
    n_heads: int = bounded(4, Interval(int, 1, 256))           # attention heads; d_model must be divisible by it
    d_mlp: int = bounded(512, WIDTH)                           # hidden units of each MLP
    # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))) (Peri-LN); "none": no LayerNorm;
    # "lns": x + f(LN(x) / sqrt(l)) (LayerNorm Scaling, l the 1-based block index)
    norm: str = bounded("pre", NORMS)
    tie_embeddings: bool = bounded(False, Flag())              # readout weight shared with the token embedding
    # "trainable", "frozen-random" (seeded) or "glyph" (frozen)
    embedding: str = bounded("trainable", OneOf(("frozen-random", "glyph", "trainable")))
    vocab: list[str] | None = None  # token strings; needed for "glyph" embeddings
    glyph_font: str | None = None   # font file for "glyph"; None: GNU Unifont if installed, else Pillow's
    seed: int = bounded(0, SEED)    # initialisation seed (also of frozen-random embeddings)
    layer_widths: list[int] | None = None  # per-block MLP hidden units after growth.widen; None: d_mlp each

    family = "transformer"          # key in FAMILIES (a class attribute, not a field)
    data_kind = "sequence"          # the Dataset.kind this family takes
    # CHOICES (set below the class): the allowed values of the string fields, from their constraints

    def validate(self) -> "TransformerConfig":
        """Check every field's declared constraint (:func:`workbench.checks.check_fields`), then the
        fields that depend on others (heads dividing ``d_model``, ``vocab``, ``glyph_font``,
        ``layer_widths``) and the memory budget (:func:`check_memory`); returns self.

        Checked values are stored back as plain Python values (``int``, ``str``, a ``list`` of
        ``str`` for ``vocab``), so a ``numpy.int64`` field becomes an ``int``.
        """
        check_fields(self)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.vocab is not None:
            if not isinstance(self.vocab, (list, tuple)) or not all(isinstance(t, str) for t in self.vocab):
                shown = repr(self.vocab) if len(repr(self.vocab)) <= 60 else repr(self.vocab)[:57] + "..."
                raise ValueError(f"vocab must be a list of token strings or None, got {shown}")
            if len(self.vocab) > VOCAB_MAX:
                raise ValueError(f"vocab must list at most {VOCAB_MAX} token strings, got {len(self.vocab)}")
            if type(self.vocab) is not list or any(type(t) is not str for t in self.vocab):
                self.vocab = [str(t) for t in self.vocab]
        if self.embedding == "glyph":
            if not self.vocab or len(self.vocab) != self.vocab_size:
                raise ValueError("vocab must list vocab_size token strings for glyph embeddings")
        if self.glyph_font is not None:
            self.glyph_font = _plain_str(check_str("glyph_font", self.glyph_font, 4096))
        self.layer_widths = _check_layer_widths(self.layer_widths, self.n_layers)
        check_memory(self)
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    # -- what the family knows about its data

    @classmethod
    def from_dataset(cls, dataset, **overrides) -> "TransformerConfig":
        """A validated config that fits a sequence ``dataset``: its vocabulary (size and token strings, so
        glyph embeddings can be drawn) and its sequence length as the context; ``overrides`` set the rest."""
        base = dict(vocab_size=dataset.vocab_size, context=dataset.seq_len,
                    vocab=list(dataset.vocab) if dataset.vocab is not None else None)
        return cls(**{**base, **overrides}).validate()

    def check_dataset(self, dataset) -> None:
        """Refuse a dataset this model cannot run on (see :func:`workbench.training.check_pairing`)."""
        from ..data import IGNORE

        name = dataset.name
        if dataset.vocab_size > self.vocab_size:
            raise ValueError(f"the model's vocab_size is {self.vocab_size} but dataset {name!r} has a vocabulary "
                             f"of {dataset.vocab_size} tokens")
        if dataset.x_train.dim() != 2 or dataset.seq_len > self.context:
            raise ValueError(f"the model's context is {self.context} but dataset {name!r} has sequences of length "
                             f"{dataset.seq_len}")
        if self.vocab is not None and dataset.vocab is not None and list(self.vocab[:len(dataset.vocab)]) != \
                list(dataset.vocab):
            i = next((i for i, (a, b) in enumerate(zip(self.vocab, dataset.vocab)) if a != b), len(self.vocab))
            mine = repr(self.vocab[i]) if i < len(self.vocab) else "missing"
            raise ValueError(f"the model's vocabulary differs from the vocabulary of dataset {name!r}: token {i} is "
                             f"{mine} in the model and {dataset.vocab[i]!r} in the data")
        for split in ("train", "val"):
            x, y = dataset.split(split)
            if y.shape != x.shape:
                raise ValueError(f"dataset {name!r}: the {split} targets must have the tokens' shape "
                                 f"{tuple(x.shape)}, got {tuple(y.shape)}")
            check_tokens(f"dataset {name!r} {split} tokens", x, self.vocab_size)
            check_labels(f"dataset {name!r} {split} targets", y, self.vocab_size, ignore=IGNORE)

    def check_inputs(self, name: str, x) -> torch.Tensor:
        """``x`` must be token ids ``(N, T)`` in the vocabulary with ``T <= context``; returns it."""
        check_tokens(name, x, self.vocab_size)
        if x.dim() != 2 or x.shape[1] > self.context:
            raise _shape_error(name, x, f"token ids (N, T) with T <= the context {self.context}")
        return x

    # -- size

    def param_count(self) -> int:
        """Parameters of the model this (type-checked) config builds, counted from the shapes (tied weights once)."""
        d, v = self.d_model, self.vocab_size
        ln = 0 if self.norm == "none" else 2 * d  # one LayerNorm's gain and bias
        blocks = sum(ln + (3 * d * d + 3 * d) + (d * d + d) + ln + (d * m + m) + (m * d + d)
                     + (4 * d if self.norm == "peri" else 0) for m in layer_widths(self))
        return v * d + self.context * d + blocks + ln + (0 if self.tie_embeddings else v * d)

    def activation_floats(self, batch_size: int) -> int:
        """Activations kept for the backward pass of one batch, in floats (see :func:`estimate_memory`)."""
        d = self.d_model
        per_token = sum(10 * d + 2 * m for m in layer_widths(self)) + 4 * d + 2 * self.vocab_size
        return batch_size * self.context * per_token


def _label_max(dataset, ignore: int) -> list[int]:
    """The largest integer label of each split (unscored positions left out)."""
    out = []
    for split in ("train", "val"):
        y = dataset.split(split)[1]
        if not y.dtype.is_floating_point and not y.dtype.is_complex and y.dtype != torch.bool:
            valid = y[y != ignore]
            if valid.numel():
                out.append(int(valid.max()))
    return out


MLPConfig.CHOICES = _choices(MLPConfig)
TransformerConfig.CHOICES = _choices(TransformerConfig)
ModelConfig = MLPConfig | TransformerConfig




