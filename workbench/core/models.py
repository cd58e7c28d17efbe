"""Two model families with one shape: ``embed -> blocks -> final_norm -> readout``.

Every block adds its output to the residual stream and passes its activations
through named identity :class:`HookPoint` modules, so growth, residual-stream
recording, layer-wise LMC and per-layer neural collapse treat both families
alike. Hook names follow TransformerLens (``blocks.3.attn_out``):

==============  =====================================================
model level     ``embed_out`` (token embedding or MLP stem output),
                ``pos_embed_out`` (Transformer), ``features``
                (final-norm output = input of the readout, Papyan 2020)
Transformer     ``resid_pre``, ``attn_out``, ``resid_mid``, ``mlp_out``,
block           ``resid_post``
ResidualMLP     ``resid_pre``, ``block_out``, ``resid_post``
block
==============  =====================================================

A model is fully described by its config plus its state dict; that is what a
checkpoint holds (see :mod:`workbench.store`). ``config.validate()`` checks every field's
type and range and the memory budget (:func:`estimate_memory`, ``WORKBENCH_MAX_MODEL_MB``)
before anything is allocated; :func:`build`, the model constructors and the run store's
load all go through it.

What a family knows about itself lives on its classes, so other modules never switch on
the model type: the config says which dataset kind it takes (``data_kind``,
``from_dataset``, ``check_dataset``, ``check_inputs``) and how big it is
(``param_count``); the model lists its embedding modules, its REPAIR sites, its
permutation symmetries (``perm_axes``, ``perm_sites``) and counts its own training FLOPs
(``count_flops``); a block knows how to add exactly 0 to the stream (``zero_output_``) and
holds its fade-in gate as buffers (``residual_scale``, ``fade_done``, ``fade_steps``: part of
the state dict, hence of every checkpoint). :data:`FAMILIES` maps each family name to its
:class:`Family` record (config class, model class, data kind); :func:`build`,
:func:`config_from_dict`, :func:`config_for` and the run store read it.

Definitions: ``docs/definitions.md#hook-sites``, ``#glyph-embedding``, ``#frozen-random``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import threading
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import (check_bool, check_choice, check_features, check_float, check_int, check_labels, check_seed, check_str,
                     check_tokens, env_limit)

__all__ = [
    "HookPoint", "MLPConfig", "TransformerConfig", "ResidualMLP", "Transformer",
    "MLPBlock", "TransformerBlock", "ScaledLayerNorm", "Family", "FAMILIES", "family_of", "build", "config_from_dict", "config_to_dict",
    "glyph_images", "glyph_embedding", "count_params", "config_for", "estimate_memory", "check_memory",
    "max_model_mb", "NOMINAL_BATCH", "GATE_BUFFERS", "FixedReadout", "simplex_etf_rows", "ebv_rows", "welch_bound",
]

D_IN_MAX = 2**20        # input features of an MLP
N_CLASSES_MAX = 2**20   # classes of an MLP
VOCAB_MAX = 2**20       # tokens of a Transformer
CONTEXT_MAX = 65536     # positions of a Transformer
NOMINAL_BATCH = 16      # examples per batch assumed by validate()'s memory estimate


class HookPoint(nn.Module):
    """Identity module marking a named site of the residual computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


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
    if not isinstance(config, _config_types()):
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
    """``None`` or a list of ``n_layers`` integers in [1, 65536] (plain ``int``s)."""
    if widths is None:
        return None
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or len(widths) != n_layers:
        raise ValueError(f"layer_widths must be None or a list of n_layers={n_layers} integers in [1, 65536], "
                         f"got {widths!r:.80}")
    return [check_int(f"layer_widths[{i}]", w, 1, 65536) for i, w in enumerate(widths)]


@dataclass
class MLPConfig:
    """Residual MLP for vector data (digits, MNIST-1D)."""

    d_in: int                 # input features (64 for digits, 40 for MNIST-1D)
    n_classes: int            # output classes
    d_model: int = 128        # width of the residual stream
    n_layers: int = 2         # number of residual blocks
    d_hidden: int = 256       # hidden units inside each block
    norm: str = "pre"         # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))); "none": x + f(x);
    #                           "lns": x + f(LN(x) / sqrt(l)) (LayerNorm Scaling, l the 1-based block index)
    activation: str = "relu"  # "relu" or "gelu"
    seed: int = 0             # initialisation seed
    layer_widths: list[int] | None = None  # per-block hidden units after growth.widen; None: d_hidden each
    classifier: str = "learned"  # readout: "learned", "etf" (fixed simplex ETF) or "ebv" (fixed EBV, cosine logits)
    ebv_tau: float = 0.1         # "ebv": logits = normalize(f) W^T / ebv_tau
    ebv_threshold: float = 0.05  # "ebv": pairwise |cos| of the head's rows pushed below this (seeded descent)

    family = "mlp"            # key in FAMILIES (a class attribute, not a field)
    CHOICES = MappingProxyType({"norm": ("lns", "none", "peri", "pre"), "activation": ("gelu", "relu"),
                                "classifier": ("ebv", "etf", "learned")})  # string fields
    data_kind = "vector"      # the Dataset.kind this family takes

    def validate(self) -> "MLPConfig":
        """Check every field (type and range), then the memory budget (:func:`check_memory`); returns self.

        Checked values are stored back as plain Python ``int``/``str`` (a ``numpy.int64`` field
        becomes an ``int``), so the config is JSON-ready and safe for ``torch.Generator.manual_seed``.
        """
        self.d_in = check_int("d_in", self.d_in, 1, D_IN_MAX)
        self.n_classes = check_int("n_classes", self.n_classes, 2, N_CLASSES_MAX)
        self.d_model = check_int("d_model", self.d_model, 1, 8192)
        self.n_layers = check_int("n_layers", self.n_layers, 0, 256)
        self.d_hidden = check_int("d_hidden", self.d_hidden, 1, 65536)
        self.norm = _plain_str(check_choice("norm", self.norm, self.CHOICES["norm"]))
        self.activation = _plain_str(check_choice("activation", self.activation, self.CHOICES["activation"]))
        self.seed = check_seed("seed", self.seed)
        self.layer_widths = _check_layer_widths(self.layer_widths, self.n_layers)
        self.classifier = _plain_str(check_choice("classifier", self.classifier, self.CHOICES["classifier"]))
        self.ebv_tau = check_float("ebv_tau", self.ebv_tau, 1e-4, 100.0)
        self.ebv_threshold = check_float("ebv_threshold", self.ebv_threshold, 0.0, 1.0, hi_open=True)
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
        from .data import IGNORE

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

    vocab_size: int                 # number of tokens
    context: int = 64               # maximum sequence length (learned positions)
    d_model: int = 128              # width of the residual stream
    n_layers: int = 2               # number of blocks
    n_heads: int = 4                # attention heads; d_model must be divisible by it
    d_mlp: int = 512                # hidden units of each MLP
    norm: str = "pre"               # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))) (Peri-LN); "none": no LayerNorm;
    #                                 "lns": x + f(LN(x) / sqrt(l)) (LayerNorm Scaling, l the 1-based block index)
    tie_embeddings: bool = False    # readout weight shared with the token embedding
    embedding: str = "trainable"    # "trainable", "frozen-random" (seeded) or "glyph" (frozen)
    vocab: list[str] | None = None  # token strings; needed for "glyph" embeddings
    glyph_font: str | None = None   # font file for "glyph"; None: GNU Unifont if installed, else Pillow's
    seed: int = 0                   # initialisation seed (also of frozen-random embeddings)
    layer_widths: list[int] | None = None  # per-block MLP hidden units after growth.widen; None: d_mlp each

    family = "transformer"          # key in FAMILIES (a class attribute, not a field)
    CHOICES = MappingProxyType({"norm": ("lns", "none", "peri", "pre"),
                                "embedding": ("frozen-random", "glyph", "trainable")})
    data_kind = "sequence"          # the Dataset.kind this family takes

    def validate(self) -> "TransformerConfig":
        """Check every field (type and range), then the memory budget (:func:`check_memory`); returns self.

        Checked values are stored back as plain Python values (``int``, ``str``, a ``list`` of
        ``str`` for ``vocab``), so a ``numpy.int64`` field becomes an ``int``.
        """
        self.vocab_size = check_int("vocab_size", self.vocab_size, 2, VOCAB_MAX)
        self.context = check_int("context", self.context, 1, CONTEXT_MAX)
        self.d_model = check_int("d_model", self.d_model, 1, 16384)
        self.n_layers = check_int("n_layers", self.n_layers, 0, 256)
        self.n_heads = check_int("n_heads", self.n_heads, 1, 256)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        self.d_mlp = check_int("d_mlp", self.d_mlp, 1, 65536)
        self.norm = _plain_str(check_choice("norm", self.norm, self.CHOICES["norm"]))
        check_bool("tie_embeddings", self.tie_embeddings)
        self.embedding = _plain_str(check_choice("embedding", self.embedding, self.CHOICES["embedding"]))
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
        self.seed = check_seed("seed", self.seed)
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
        from .data import IGNORE

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


ModelConfig = MLPConfig | TransformerConfig


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-ready dict of a model config, with its family."""
    return {"family": config.family, **dataclasses.asdict(config)}


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys raise ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"model config must be a dict with a 'family', got {type(d).__name__}")
    d = dict(d)
    family = d.pop("family", None)
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"model family must be one of {sorted(FAMILIES)}, got {family!r}")
    cls = FAMILIES[family].config
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {family} config fields: {sorted(unknown, key=str)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = required - set(d)
    if missing:
        raise ValueError(f"{family} config is missing field(s) {sorted(missing)}")
    return cls(**d)


# ----------------------------------------------------------------------------- blocks


def _norm(d: int, kind: str) -> nn.Module:
    return nn.LayerNorm(d) if kind != "none" else nn.Identity()


class ScaledLayerNorm(nn.LayerNorm):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth"): ``LN(x) * depth_scale`` with
    ``depth_scale = 1 / sqrt(l)``, ``l`` the 1-based index of the block it sits in.

    ``depth_scale`` is a 0-d buffer (in the state dict, so a checkpoint keeps it) fixed when the block
    is placed: a block keeps its scale when blocks are inserted below it or removed, so growth with
    a zero block stays function preserving and removing a block equals skipping it. A block made by
    ``new_block()`` is placed by the model's ``sync_config()`` (``pending``); see
    ``docs/definitions.md#layernorm-scaling``.
    """

    def __init__(self, d: int, layer: int = 0):
        super().__init__(d)
        self.register_buffer("depth_scale", torch.tensor(1.0 / math.sqrt(layer + 1)))
        self.pending = False

    def place(self, layer: int) -> None:
        """Set ``depth_scale = 1 / sqrt(layer + 1)`` (``layer`` 0-based) and clear ``pending``."""
        self.depth_scale.fill_(1.0 / math.sqrt(layer + 1))
        self.pending = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.depth_scale


def _block_norm(d: int, kind: str, layer: int | None) -> nn.Module:
    """The norm in front of a block's sublayer: ``"lns"`` scales it by ``1/sqrt(layer + 1)``; ``layer=None``:
    not placed yet (scale of layer 0 until ``sync_config`` places it)."""
    if kind != "lns":
        return _norm(d, kind)
    norm = ScaledLayerNorm(d, layer or 0)
    norm.pending = layer is None
    return norm


# The fade-in gate of a block, as persistent buffers (so state_dict(), hence every checkpoint,
# holds them), with the values of a block that is not fading: gate 1, no ramp. A state dict
# saved before these buffers existed loads as "fully faded in".
GATE_BUFFERS = {"residual_scale": 1.0, "fade_done": 0, "fade_steps": 0}


class _GatedBlock(nn.Module):
    """A residual block whose output is scaled by a fade-in gate ``m`` (MSG-style: ``x + m f(x)``).

    Buffers (0-d): ``residual_scale`` (float, the gate ``m``), ``fade_done`` and ``fade_steps``
    (int64, the ramp's progress; ``fade_steps == 0`` means not fading). Assigning a number
    (``block.residual_scale = 0.5``) replaces the buffer by a tensor of that value on the same
    device and dtype. ``fade`` reads the ramp as ``{"steps", "done"}`` or ``None``.
    """

    def _init_gate(self) -> None:
        self.register_buffer("residual_scale", torch.ones(()))
        self.register_buffer("fade_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("fade_steps", torch.zeros((), dtype=torch.long))

    def __setattr__(self, name, value):
        if name in GATE_BUFFERS and not isinstance(value, torch.Tensor) and name in self.__dict__.get("_buffers", {}):
            old = self._buffers[name]
            kind = numbers.Real if old.dtype.is_floating_point else numbers.Integral
            if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, kind) \
                    or not math.isfinite(float(value)):
                what = "a finite number" if kind is numbers.Real else "an integer"
                raise ValueError(f"{name} must be {what}, got {value!r}")
            value = torch.tensor(value, dtype=old.dtype, device=old.device)
        super().__setattr__(name, value)

    def _gate(self, out: torch.Tensor) -> torch.Tensor:
        """``residual_scale * out``; skipped when the gate is exactly 1 (read on the CPU only: on an
        accelerator the multiply is cheaper than a host sync, and ``out * 1.0 == out`` exactly)."""
        s = self.residual_scale
        if s.device.type != "cpu" or float(s) != 1.0:
            out = out * s
        return out

    @property
    def fade(self) -> dict | None:
        """The fade-in ramp ``{"steps": total, "done": steps so far}``, or ``None`` when not fading."""
        steps = int(self.fade_steps)
        return None if steps == 0 else {"steps": steps, "done": int(self.fade_done)}

    @fade.setter
    def fade(self, value: dict | None) -> None:
        if value is None:
            self.fade_steps, self.fade_done = 0, 0
        else:
            self.fade_steps, self.fade_done = int(value["steps"]), int(value["done"])

    def start_fade(self, steps: int) -> None:
        """Gate 0 now, ramping to 1 over ``steps`` calls of :meth:`advance_fade` (one per optimizer step)."""
        steps = check_int("fade_steps", steps, 1, None)
        self.residual_scale, self.fade_steps, self.fade_done = 0.0, steps, 0

    def end_fade(self) -> None:
        """Gate 1, no ramp (what a freshly built block has)."""
        self.residual_scale, self.fade_steps, self.fade_done = 1.0, 0, 0

    def advance_fade(self, steps: int = 1) -> None:
        """Move the ramp ``steps`` optimizer steps on: ``m = done / steps``; at the end the gate is 1 and the ramp gone."""
        ramp = self.fade
        if ramp is None:
            return
        done = min(ramp["done"] + steps, ramp["steps"])
        if done >= ramp["steps"]:
            self.end_fade()
        else:
            self.residual_scale, self.fade_done = done / ramp["steps"], done

    def check_gate(self, where: str = "block") -> None:
        """Refuse gate buffers out of range (a hand-edited or foreign checkpoint)."""
        s, done, steps = float(self.residual_scale), int(self.fade_done), int(self.fade_steps)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{where}.residual_scale must be in [0, 1], got {s}")
        if steps < 0 or not 0 <= done <= steps:
            raise ValueError(f"{where}: fade_done must be in [0, fade_steps] and fade_steps >= 0, got "
                             f"fade_done={done}, fade_steps={steps}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # checkpoints written before the gate was a buffer: fully faded in (the defaults), not an error
        absent = [name for name in GATE_BUFFERS if prefix + name not in state_dict]
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
            setattr(self, name, GATE_BUFFERS[name])

    # -- family knowledge every block type provides

    def _output_paths(self) -> list[tuple[nn.Linear, nn.Module]]:
        """``(output projection, post-norm)`` of each branch that writes into the stream."""
        raise NotImplementedError

    def zero_output_(self) -> "_GatedBlock":
        """Make the block add exactly 0 to the stream (function preserving), in place; returns it.

        Pre-LN, LayerNorm Scaling (``"lns"``) and no norm: zero the output projections (weights and
        biases). Peri-LN: the
        output passes through a LayerNorm, and ``LN(0) = bias``, so zero the output norms'
        gains and biases instead (the projections keep their init so that the gains receive a
        gradient from the first step).
        """
        with torch.no_grad():
            for proj, post_norm in self._output_paths():
                if isinstance(post_norm, nn.LayerNorm):
                    post_norm.weight.zero_()
                    post_norm.bias.zero_()
                else:
                    proj.weight.zero_()
                    if proj.bias is not None:
                        proj.bias.zero_()
        return self

    @property
    def mlp_in(self) -> nn.Linear:
        """The block's first MLP layer (its hidden pre-activation units; what REPAIR renormalises)."""
        raise NotImplementedError


class MLPBlock(_GatedBlock):
    """``x + s * post_norm(proj(act(fc(pre_norm(x)))))``; ``s = residual_scale`` (1 unless fading in)."""

    def __init__(self, cfg: MLPConfig, d_hidden: int | None = None, layer: int | None = None):
        super().__init__()  # d_hidden: this block's width; layer: its index (the "lns" scale)
        h = cfg.d_hidden if d_hidden is None else d_hidden
        self.pre_norm = _block_norm(cfg.d_model, cfg.norm, layer)
        self.fc = nn.Linear(cfg.d_model, h)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.proj = nn.Linear(h, cfg.d_model)
        self.post_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "peri" else nn.Identity()
        self._init_gate()  # gate m of MSG-style fade-in: x + m f(x)
        self.resid_pre, self.block_out, self.resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_model) -> (B, d_model)
        x = self.resid_pre(x)
        h = self.act(self.fc(self.pre_norm(x)))  # (B, d_hidden)
        out = self._gate(self.post_norm(self.proj(h)))
        return self.resid_post(x + self.block_out(out))

    def _output_paths(self):
        return [(self.proj, self.post_norm)]

    @property
    def mlp_in(self) -> nn.Linear:
        return self.fc

    def count_flops(self, c, rg: bool) -> bool:
        """Add this block's matrix products to the counter ``c`` (see :mod:`workbench.flops`); returns
        whether the stream after the block requires a gradient."""
        h = c.norm(self.pre_norm, rg)
        h = c.linear(self.fc, h)
        h = c.linear(self.proj, h)
        h = c.norm(self.post_norm, h)
        return rg or h


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on the fused ``scaled_dot_product_attention`` path.

    The per-head pattern ``softmax(q k^T / sqrt(D) + causal mask)`` ``(B, H, T, T)`` exists only on
    request: :meth:`pattern` recomputes it from an input, and inside :meth:`watch_pattern` the forward
    takes the explicit path (pattern, then ``pattern @ v``) and hands each pattern to a function.
    Definition: ``docs/definitions.md#attention-pattern``.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: [q; k; v], head-major inside each
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self._pattern_fns: list = []   # set by watch_pattern only; empty: the fused path

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        return tuple(t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)

    @staticmethod
    def _pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        T = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self._heads(x)
        if self._pattern_fns:   # asked for the pattern: the explicit path
            p = self._pattern(q, k)
            for fn in list(self._pattern_fns):
                out = fn(p)
                p = p if out is None else out
            y = p.to(v.dtype) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def pattern(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pattern ``(B, H, T, T)`` (query, key) of the input ``x`` ``(B, T, C)`` (after ``ln1``)."""
        q, k, _ = self._heads(x)
        return self._pattern(q, k)

    @contextlib.contextmanager
    def watch_pattern(self, fn):
        """While open, each forward computes the pattern explicitly and calls ``fn(pattern)`` with it
        (``(B, H, T, T)``); a tensor ``fn`` returns replaces the pattern. The fused path returns on exit."""
        self._pattern_fns.append(fn)
        try:
            yield
        finally:
            self._pattern_fns.remove(fn)

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head contributions ``(B, T, H, C)`` whose sum over H plus ``proj.bias`` is ``forward(x)``."""
        B, T, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self._heads(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, D)
        w = self.proj.weight.view(C, H, D)  # (C_out, H, D)
        return torch.einsum("bthd,chd->bthc", y, w)


class TransformerMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None):  # d_mlp: this MLP's width
        super().__init__()
        m = cfg.d_mlp if d_mlp is None else d_mlp
        self.fc = nn.Linear(cfg.d_model, m)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new, so the Hugging Face export is exact
        self.proj = nn.Linear(m, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(_GatedBlock):
    """Pre-LN: ``x + attn(LN(x))``; Peri-LN: ``x + LN(attn(LN(x)))``; LNS: ``x + attn(LN(x) / sqrt(l))``;
    then the same for the MLP."""

    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None, layer: int | None = None):
        super().__init__()  # layer: the block's index (the "lns" scale)
        peri = cfg.norm == "peri"
        self.ln1 = _block_norm(cfg.d_model, cfg.norm, layer)  # "none": nn.Identity
        self.attn = CausalSelfAttention(cfg)
        self.ln1_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self.ln2 = _block_norm(cfg.d_model, cfg.norm, layer)
        self.mlp = TransformerMLP(cfg, d_mlp)
        self.ln2_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self._init_gate()  # gate m of MSG-style fade-in
        self.resid_pre, self.attn_out, self.resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.mlp_out, self.resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = self.resid_pre(x)
        a = self._gate(self.ln1_post(self.attn(self.ln1(x))))
        x = self.resid_mid(x + self.attn_out(a))
        m = self._gate(self.ln2_post(self.mlp(self.ln2(x))))
        return self.resid_post(x + self.mlp_out(m))

    def _output_paths(self):
        return [(self.attn.proj, self.ln1_post), (self.mlp.proj, self.ln2_post)]

    @property
    def mlp_in(self) -> nn.Linear:
        return self.mlp.fc

    def count_flops(self, c, rg: bool) -> bool:
        """Add this block's matrix products and attention core to the counter ``c``; returns whether the
        stream after the block requires a gradient."""
        a = c.norm(self.ln1, rg)
        a = c.linear(self.attn.qkv, a)
        a = c.attention(self.attn.proj.in_features, a)
        a = c.linear(self.attn.proj, a)
        a = c.norm(self.ln1_post, a)
        rg = rg or a
        m = c.norm(self.ln2, rg)
        m = c.linear(self.mlp.fc, m)
        m = c.linear(self.mlp.proj, m)
        m = c.norm(self.ln2_post, m)
        return rg or m


# ----------------------------------------------------------------------------- models


def _norm_axes(axes: dict, prefix: str, module: nn.Module) -> None:
    """A LayerNorm's gain and bias live on the residual stream (an Identity has no parameters)."""
    if isinstance(module, nn.LayerNorm):
        axes[f"{prefix}.weight"] = ("res",)
        axes[f"{prefix}.bias"] = ("res",)


def _linear_axes(axes: dict, prefix: str, p_out, p_in, bias: bool = True) -> None:
    axes[f"{prefix}.weight"] = (p_out, p_in)
    if bias:
        axes[f"{prefix}.bias"] = (p_out,)


class _ResidualModel(nn.Module):
    """Shared shape: ``embed`` -> ``blocks`` -> ``final_norm`` -> ``readout``."""

    config: ModelConfig
    blocks: nn.ModuleList
    max_seq_len: int | None = None   # longest input sequence (None: the family has no sequence axis)

    def new_block(self) -> nn.Module:
        """A fresh block of this model's config (PyTorch default init, on the model's device)."""
        raise NotImplementedError

    def init_weights_(self) -> None:
        """The family's initialisation on top of the constructor's (called by :func:`build` under the seed)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state: ``readout(final_norm(resid))`` (the logit lens)."""
        return self.readout(self.features(self.final_norm(resid)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.unembed(h)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sync_config(self) -> None:
        """Keep ``config.n_layers`` equal to ``len(blocks)`` after growth; the new config is validated
        (field ranges and the memory budget, ``WORKBENCH_MAX_MODEL_MB``) before it is kept."""
        widths = [int(blk.mlp_in.out_features) for blk in self.blocks]  # after growth.widen blocks may differ
        base = getattr(self.config, "d_hidden", None) or self.config.d_mlp
        self.config = dataclasses.replace(self.config, n_layers=len(self.blocks), layer_widths=None if all(
            w == base for w in widths) else widths).validate()
        for i, blk in enumerate(self.blocks):  # "lns": a block made by new_block() gets its position's scale
            for norm in blk.modules():
                if isinstance(norm, ScaledLayerNorm) and norm.pending:
                    norm.place(i)

    # -- family knowledge

    def embedding_modules(self) -> list[nn.Module]:
        """The modules that map inputs into the residual stream (frozen with the blocks below them)."""
        raise NotImplementedError

    def substrate_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen by definition (glyph and frozen-random token embeddings); they stay frozen."""
        return []

    def repair_sites(self) -> list[nn.Linear]:
        """The layers REPAIR renormalises: each block's first MLP layer (pre-activation hidden units)."""
        return [blk.mlp_in for blk in self.blocks]

    def perm_axes(self) -> dict:
        """The permutation symmetries: ``{"axes": {param: perm per axis}, "sizes": {perm: units},
        "heads": {group: (qk perm, vo perm, n_heads)}}`` (see :class:`workbench.permute.PermSpec`)."""
        raise NotImplementedError

    def perm_sites(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """perm name -> ``[(module, part)]`` whose forward output holds that permutation's units
        (``part``: ``"all"``, or ``"q"``/``"k"``/``"v"`` for a slice of a fused ``qkv`` output)."""
        sites: dict[str, list] = {"res": [(blk.resid_pre, "all") for blk in self.blocks] + [(self.features, "all")]}
        if len(self.blocks):
            sites["res"].append((self.blocks[-1].resid_post, "all"))
        return sites

    def count_flops(self, c) -> None:
        """Add one training step's matrix products to the counter ``c`` (see :mod:`workbench.flops`)."""
        raise NotImplementedError

    def optional_state_keys(self) -> set[str]:
        """State-dict keys an older checkpoint may lack (the fade-in gate buffers; they default to "faded in")."""
        return {f"blocks.{i}.{name}" for i in range(len(self.blocks)) for name in GATE_BUFFERS}

    def check_gates(self) -> None:
        """Refuse fade-in gate buffers out of range (``ValueError`` naming the block)."""
        for i, blk in enumerate(self.blocks):
            blk.check_gate(f"blocks.{i}")


# ----------------------------------------------------------------------------- fixed classifier heads


def simplex_etf_rows(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``sqrt(C/(C-1)) (I - 11^T/C) U^T`` ``(C, d)`` float64, ``U (d, C)`` a seeded random partial orthogonal
    matrix (needs ``d >= C``): unit rows with pairwise cosine ``-1/(C-1)`` (``docs/definitions.md#simplex-etf``).
    Unchecked core of :func:`workbench.collapse.simplex_etf`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, n_classes, generator=g, dtype=torch.float64))      # (d, C)
    centre = torch.eye(n_classes, dtype=torch.float64) - 1.0 / n_classes
    return math.sqrt(n_classes / (n_classes - 1)) * centre @ u.T


def welch_bound(n_classes: int, dim: int) -> float:
    """The least possible max pairwise ``|cos|`` of ``C`` unit vectors in ``d`` dims: ``sqrt((C-d)/(d(C-1)))``
    for ``C > d``, else 0 (Welch 1974)."""
    return math.sqrt((n_classes - dim) / (dim * (n_classes - 1))) if n_classes > dim else 0.0


def ebv_rows(n_classes: int, dim: int, threshold: float, seed: int = 0, max_steps: int = 2000,
             lr: float = 0.5) -> torch.Tensor:
    """Equiangular Basis Vectors (Shen et al. 2023) ``(C, d)`` float64: seeded Gaussian rows on the sphere,
    then projected gradient steps on ``1/2 sum_{i != j} relu(|cos_ij| - 0.98 threshold)^2`` (rows
    renormalised after each step) until every pairwise ``|cos| <= threshold`` or ``max_steps``.
    Unchecked core of :func:`workbench.collapse.ebv` (``docs/definitions.md#ebv``)."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n_classes, dim, generator=g, dtype=torch.float64), dim=1)
    diag = torch.eye(n_classes, dtype=torch.bool)
    for _ in range(max_steps):
        cos = (u @ u.T).masked_fill_(diag, 0.0)
        if float(cos.abs().max()) <= threshold:
            break
        push = torch.sign(cos) * (cos.abs() - 0.98 * threshold).clamp_min(0.0)   # d loss / d cos_ij
        u = F.normalize(u - lr * (push @ u), dim=1)
    return u


def _check_fixed_head(kind: str, n_classes: int, dim: int, threshold: float) -> None:
    if kind == "etf" and dim < n_classes:
        raise ValueError(f"classifier='etf' of {n_classes} classes needs d_model >= {n_classes}, got {dim}")
    if kind == "ebv" and threshold < welch_bound(n_classes, dim):
        raise ValueError(f"ebv_threshold must be at least the Welch bound {welch_bound(n_classes, dim):.4g} for "
                         f"{n_classes} unit vectors in d_model={dim} dims, got {threshold}")


class FixedReadout(nn.Linear):
    """A fixed (frozen) classifier head: weight and zero bias with ``requires_grad=False`` (a substrate).

    ``"etf"``: logits ``f W^T`` with ``W`` a simplex ETF (:func:`simplex_etf_rows`); ``"ebv"``:
    ``normalize(f) W^T / tau`` with ``W`` equiangular basis vectors (:func:`ebv_rows`). Built from the
    config seed, so the config rebuilds it; the state dict (hence a stored run) holds it too.
    """

    def __init__(self, d_model: int, n_classes: int, normalize: bool = False, tau: float = 1.0):
        super().__init__(d_model, n_classes)
        self.normalize, self.tau = bool(normalize), float(tau)
        self.requires_grad_(False)

    @classmethod
    def of(cls, cfg) -> "FixedReadout":
        head = cls(cfg.d_model, cfg.n_classes, normalize=cfg.classifier == "ebv",
                   tau=cfg.ebv_tau if cfg.classifier == "ebv" else 1.0)
        w = (simplex_etf_rows(cfg.n_classes, cfg.d_model, cfg.seed) if cfg.classifier == "etf"
             else ebv_rows(cfg.n_classes, cfg.d_model, cfg.ebv_threshold, cfg.seed))
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.zero_()
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            return F.linear(F.normalize(x, dim=-1), self.weight, self.bias) / self.tau
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize}, tau={self.tau:g}"


class ResidualMLP(_ResidualModel):
    """stem -> N residual MLP blocks -> final norm -> readout. Input ``(B, d_in)``, logits ``(B, n_classes)``."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.config = cfg.validate()
        self.stem = nn.Linear(cfg.d_in, cfg.d_model)
        self.embed_out = HookPoint()
        self.blocks = nn.ModuleList(MLPBlock(cfg, h, layer=i) for i, h in enumerate(layer_widths(cfg)))
        self.final_norm = _norm(cfg.d_model, cfg.norm)
        self.features = HookPoint()
        self.readout = FixedReadout.of(cfg) if cfg.classifier != "learned" else nn.Linear(cfg.d_model, cfg.n_classes)

    def new_block(self) -> MLPBlock:
        return MLPBlock(self.config).to(self.device)

    def substrate_parameters(self) -> list[nn.Parameter]:
        return list(self.readout.parameters()) if isinstance(self.readout, FixedReadout) else []

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, d_model)
        return self.embed_out(self.stem(x))

    def embedding_modules(self) -> list[nn.Module]:
        return [self.stem]

    def perm_axes(self) -> dict:
        cfg = self.config
        axes: dict[str, tuple] = {}
        sizes = {"res": cfg.d_model}
        _linear_axes(axes, "stem", "res", None)
        for i, blk in enumerate(self.blocks):
            h = f"hidden.{i}"
            sizes[h] = blk.mlp_in.out_features
            _norm_axes(axes, f"blocks.{i}.pre_norm", blk.pre_norm)
            _linear_axes(axes, f"blocks.{i}.fc", h, "res")
            _linear_axes(axes, f"blocks.{i}.proj", "res", h)
            _norm_axes(axes, f"blocks.{i}.post_norm", blk.post_norm)
        _norm_axes(axes, "final_norm", self.final_norm)
        _linear_axes(axes, "readout", None, "res")
        return {"axes": axes, "sizes": sizes, "heads": {}}

    def perm_sites(self):
        sites = super().perm_sites()
        for i, blk in enumerate(self.blocks):
            sites[f"hidden.{i}"] = [(blk.act, "all")]
        return sites

    def count_flops(self, c) -> None:
        rg = c.linear(self.stem, False)
        for b in self.blocks:
            rg = b.count_flops(c, rg)
        rg = c.norm(self.final_norm, rg)
        c.linear(self.readout, rg)


class Transformer(_ResidualModel):
    """Decoder-only Transformer. Tokens ``(B, T)`` -> logits ``(B, T, vocab_size)``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg.validate()
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model)
        self.embed_out, self.pos_embed_out = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, m, layer=i) for i, m in enumerate(layer_widths(cfg)))
        self.final_norm = _norm(cfg.d_model, cfg.norm)  # "none": nn.Identity (no LayerNorm anywhere)
        self.features = HookPoint()
        self.readout = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.readout.weight = self.tok_embed.weight
        if cfg.embedding != "trainable":
            self.tok_embed.weight.requires_grad_(False)

    @property
    def max_seq_len(self) -> int:
        return self.config.context

    def new_block(self) -> TransformerBlock:
        block = TransformerBlock(self.config).to(self.device)
        _gpt2_init(block)
        return block

    def init_weights_(self) -> None:
        """GPT-2's N(0, 0.02) (biases 0); frozen-random embeddings N(0, 1/d_model); glyph embeddings drawn."""
        config = self.config
        _gpt2_init(self)
        with torch.no_grad():
            if config.embedding == "frozen-random":
                self.tok_embed.weight.normal_(0.0, 1.0 / math.sqrt(config.d_model))
            elif config.embedding == "glyph":
                table, _ = glyph_embedding(config.vocab, config.d_model, config.glyph_font)
                self.tok_embed.weight.copy_(table)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        T = tokens.shape[-1]
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.context}")
        pos = torch.arange(T, device=tokens.device)
        return self.embed_out(self.tok_embed(tokens)) + self.pos_embed_out(self.pos_embed(pos))

    def embedding_modules(self) -> list[nn.Module]:
        return [self.tok_embed, self.pos_embed]

    def substrate_parameters(self) -> list[nn.Parameter]:
        return [self.tok_embed.weight] if self.config.embedding != "trainable" else []

    def perm_axes(self) -> dict:
        """Heads permute as whole heads, with the within-head permutations ``qk`` (queries and keys) and
        ``vo`` (values and the output projection's columns); ``q``/``k``/``v`` name the thirds of ``qkv``."""
        cfg = self.config
        axes: dict[str, tuple] = {"tok_embed.weight": (None, "res"), "pos_embed.weight": (None, "res")}
        sizes = {"res": cfg.d_model}
        heads: dict[str, tuple] = {}
        for i, blk in enumerate(self.blocks):
            b = f"blocks.{i}"
            qk, vo, m = f"qk.{i}", f"vo.{i}", f"mlp.{i}"
            sizes.update({qk: cfg.d_model, vo: cfg.d_model, m: blk.mlp.fc.out_features})
            heads[f"heads.{i}"] = (qk, vo, cfg.n_heads)
            _norm_axes(axes, f"{b}.ln1", blk.ln1)
            _linear_axes(axes, f"{b}.attn.q", qk, "res")
            _linear_axes(axes, f"{b}.attn.k", qk, "res")
            _linear_axes(axes, f"{b}.attn.v", vo, "res")
            _linear_axes(axes, f"{b}.attn.proj", "res", vo)
            _norm_axes(axes, f"{b}.ln1_post", blk.ln1_post)
            _norm_axes(axes, f"{b}.ln2", blk.ln2)
            _linear_axes(axes, f"{b}.mlp.fc", m, "res")
            _linear_axes(axes, f"{b}.mlp.proj", "res", m)
            _norm_axes(axes, f"{b}.ln2_post", blk.ln2_post)
        _norm_axes(axes, "final_norm", self.final_norm)
        _linear_axes(axes, "readout", None, "res", bias=False)
        return {"axes": axes, "sizes": sizes, "heads": heads}

    def perm_sites(self):
        sites = super().perm_sites()
        for i, blk in enumerate(self.blocks):
            sites[f"mlp.{i}"] = [(blk.mlp.act, "all")]
            sites[f"qk.{i}"] = [(blk.attn.qkv, "q"), (blk.attn.qkv, "k")]
            sites[f"vo.{i}"] = [(blk.attn.qkv, "v")]
        return sites

    def count_flops(self, c) -> None:
        rg = c.trainable(self.tok_embed, self.pos_embed)
        for b in self.blocks:
            rg = b.count_flops(c, rg)
        rg = c.norm(self.final_norm, rg)
        c.linear(self.readout, rg)


def _gpt2_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- the family registry


@dataclass(frozen=True)
class Family:
    """One native model family: its config class, model class and the kind of dataset it takes."""

    name: str           # config.family
    config: type        # the flat dataclass config
    model: type         # the nn.Module built from it
    data_kind: str      # Dataset.kind it takes: "vector" or "sequence"

    def __iter__(self):  # ``config_cls, model_cls = FAMILIES["mlp"]``
        return iter((self.config, self.model))


FAMILIES: dict[str, Family] = {
    cfg.family: Family(cfg.family, cfg, model, cfg.data_kind)
    for cfg, model in ((MLPConfig, ResidualMLP), (TransformerConfig, Transformer))
}


def _config_types() -> tuple[type, ...]:
    return tuple(f.config for f in FAMILIES.values())


def family_of(of) -> Family:
    """The :class:`Family` of a family name, a config, a model, or a :class:`~workbench.data.Dataset` or
    :class:`~workbench.data.Shape` (the family taking its ``kind``). Raises ``ValueError`` listing the
    families for anything else.
    """
    if isinstance(of, str) and of in FAMILIES:
        return FAMILIES[of]
    for f in FAMILIES.values():
        if isinstance(of, (f.config, f.model)):
            return f
    kind = getattr(of, "kind", None)
    if isinstance(kind, str) and (hasattr(of, "x_train") or hasattr(of, "n_train")):
        for f in FAMILIES.values():
            if f.data_kind == kind:
                return f
    raise ValueError(f"not a native model family: {of!r:.80}; families: {sorted(FAMILIES)}")


_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's global RNG seeded to ``seed``, then restore it; thread-safe.

    PyTorch's module initialisers draw from the global RNG, which all threads of a process share.
    Two jobs building models at once (the server's job queue, Dask's in-process workers) would
    interleave their draws and get initialisations that depend on timing; the lock makes every
    seeded initialisation of the workbench happen one at a time, so a seed means one model.
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build(config: ModelConfig, device: str | torch.device | None = None) -> ResidualMLP | Transformer:
    """Build and initialise a model from its config, deterministically from ``config.seed``.

    The global RNG is left untouched (the seed is applied inside :func:`seeded`, one build at a time).
    MLPs use PyTorch's default init; Transformers use GPT-2's N(0, 0.02). Frozen-random
    embeddings are N(0, 1/d_model) rows; glyph embeddings come from :func:`glyph_embedding`.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    if not isinstance(config, _config_types()):
        raise TypeError(f"config must be an MLPConfig or TransformerConfig, got {type(config).__name__}")
    with seeded(config.validate().seed):
        model = FAMILIES[config.family].model(config)
        model.init_weights_()
    return model.to(device) if device is not None else model


def config_for(dataset, **overrides) -> ModelConfig:
    """A model config that fits ``dataset`` (input size, classes or vocabulary, context), validated.

    The family is the one taking ``dataset.kind`` (:data:`FAMILIES`): vector data ->
    :class:`MLPConfig`; sequence data -> :class:`TransformerConfig` with the dataset's
    vocabulary (so glyph embeddings can be drawn). ``overrides`` set other fields.
    """
    return family_of(dataset).config.from_dataset(dataset, **overrides)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


# ----------------------------------------------------------------------------- glyphs

_UNIFONT_PATHS = (
    "/usr/share/fonts/opentype/unifont/unifont.otf",
    "/usr/share/fonts/truetype/unifont/unifont.ttf",
    "/usr/share/fonts/unifont/unifont.otf",
)


def _load_font(font: str | None, size: int = 32):
    import os

    from PIL import ImageFont

    if font is None:
        for path in _UNIFONT_PATHS:
            if os.path.exists(path):
                return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC), path
        return ImageFont.load_default(size=size), "pillow-default"
    if not os.path.exists(font):
        raise ValueError(f"glyph_font: font file {font!r} does not exist")
    return ImageFont.truetype(font, size, layout_engine=ImageFont.Layout.BASIC), font


def _render(text: str, font, size: int = 32):
    import numpy as np
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    w, h = max(right - left, 1), max(bottom - top, 1)
    img = Image.new("L", (max(w, size), max(h, size)), 0)
    ImageDraw.Draw(img).text((-left, -top), text, font=font, fill=255)
    if img.size != (size, size):  # multi-character tokens: drawn side by side, then resized
        img = img.resize((size, size), Image.BILINEAR)
    return (np.asarray(img) > 127).astype(np.float32)  # (size, size) binary


def glyph_images(vocab: list[str], font: str | None = None, size: int = 32):
    """Render each token as a ``size x size`` binary bitmap (Bochkov 2025 recipe).

    Returns ``(images (V, size, size) float32 array, report)`` where ``report`` is a dict with
    the font used and ``fallback``: the tokens the font cannot draw (blank or the font's
    missing-glyph box). Those are drawn as their code points (``U+000A``) instead, so no two
    tokens silently share a bitmap.
    """
    import unicodedata

    import numpy as np

    pil_font, used = _load_font(font, size)
    missing_box = _render("\U0010fffd", pil_font, size)  # a code point no font draws
    images, fallback = [], []
    for tok in vocab:
        drawable = all(unicodedata.category(c)[0] not in "CZ" or c == " " for c in tok)
        img = _render(tok, pil_font, size) if drawable else np.zeros((size, size), np.float32)
        if img.sum() == 0 or np.array_equal(img, missing_box):
            fallback.append(tok)
            img = _render(" ".join(f"U+{ord(c):04X}" for c in tok), pil_font, size)
        images.append(img)
    return np.stack(images), {"font": used, "fallback": fallback, "coverage": 1 - len(fallback) / max(len(vocab), 1)}


def glyph_embedding(vocab: list[str], d_model: int, font: str | None = None):
    """Frozen glyph embedding table ``(V, d_model)``: bitmaps -> PCA over the vocabulary -> L2-normalised rows.

    PCA yields at most ``min(V, 1024)`` components; when ``d_model`` exceeds that, the
    remaining columns are zero (the rows still differ). Returns ``(table, report)``.
    """
    import numpy as np

    images, report = glyph_images(vocab, font)
    X = images.reshape(len(vocab), -1).astype(np.float64)
    X = X - X.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    k = min(d_model, U.shape[1])
    table = np.zeros((len(vocab), d_model))
    table[:, :k] = U[:, :k] * S[:k]
    norms = np.linalg.norm(table, axis=1, keepdims=True)
    table = table / np.maximum(norms, 1e-12)
    return torch.tensor(table, dtype=torch.float32), report
