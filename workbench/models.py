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
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_bool, check_choice, check_int, check_seed, check_str, env_limit

__all__ = [
    "HookPoint", "MLPConfig", "TransformerConfig", "ResidualMLP", "Transformer",
    "MLPBlock", "TransformerBlock", "build", "config_from_dict", "config_to_dict",
    "glyph_images", "glyph_embedding", "count_params", "config_for", "estimate_memory", "check_memory",
    "max_model_mb", "NOMINAL_BATCH",
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


def _param_count(cfg) -> int:
    """Parameters of the model a (type-checked) config builds, counted from the shapes (tied weights once)."""
    if isinstance(cfg, MLPConfig):
        d, h = cfg.d_model, cfg.d_hidden
        norm = 0 if cfg.norm == "none" else 2 * d
        block = norm + (d * h + h) + (h * d + d) + (2 * d if cfg.norm == "peri" else 0)
        return (cfg.d_in * d + d) + cfg.n_layers * block + norm + (d * cfg.n_classes + cfg.n_classes)
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    block += 4 * d if cfg.norm == "peri" else 0
    return v * d + cfg.context * d + cfg.n_layers * block + 2 * d + (0 if cfg.tie_embeddings else v * d)


def _activation_floats(cfg, batch_size: int) -> int:
    """Activations kept for the backward pass of one batch, in floats (see :func:`estimate_memory`)."""
    if isinstance(cfg, MLPConfig):
        d, h = cfg.d_model, cfg.d_hidden
        return batch_size * (cfg.d_in + cfg.n_layers * (4 * d + 2 * h) + 2 * d + 2 * cfg.n_classes)
    d, m = cfg.d_model, cfg.d_mlp
    per_token = cfg.n_layers * (10 * d + 2 * m) + 4 * d + 2 * cfg.vocab_size
    return batch_size * cfg.context * per_token


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
    if not isinstance(config, (MLPConfig, TransformerConfig)):
        raise ValueError(f"config must be an MLPConfig or TransformerConfig, got {type(config).__name__}")
    check_int("batch_size", batch_size, 1, 10_000_000)
    n = _param_count(config)
    params, act = 4 * n, 4 * _activation_floats(config, batch_size)
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


@dataclass
class MLPConfig:
    """Residual MLP for vector data (digits, MNIST-1D)."""

    d_in: int                 # input features (64 for digits, 40 for MNIST-1D)
    n_classes: int            # output classes
    d_model: int = 128        # width of the residual stream
    n_layers: int = 2         # number of residual blocks
    d_hidden: int = 256       # hidden units inside each block
    norm: str = "pre"         # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))); "none": x + f(x)
    activation: str = "relu"  # "relu" or "gelu"
    seed: int = 0             # initialisation seed

    family = "mlp"

    def validate(self) -> "MLPConfig":
        """Check every field (type and range), then the memory budget (:func:`check_memory`); returns self."""
        check_int("d_in", self.d_in, 1, D_IN_MAX)
        check_int("n_classes", self.n_classes, 2, N_CLASSES_MAX)
        check_int("d_model", self.d_model, 1, 8192)
        check_int("n_layers", self.n_layers, 0, 256)
        check_int("d_hidden", self.d_hidden, 1, 65536)
        check_choice("norm", self.norm, ["none", "peri", "pre"])
        check_choice("activation", self.activation, ["gelu", "relu"])
        check_seed("seed", self.seed)
        check_memory(self)
        return self


@dataclass
class TransformerConfig:
    """Decoder-only Transformer for token sequences (khop, modadd, text)."""

    vocab_size: int                 # number of tokens
    context: int = 64               # maximum sequence length (learned positions)
    d_model: int = 128              # width of the residual stream
    n_layers: int = 2               # number of blocks
    n_heads: int = 4                # attention heads; d_model must be divisible by it
    d_mlp: int = 512                # hidden units of each MLP
    norm: str = "pre"               # "pre": x + f(LN(x)); "peri": x + LN(f(LN(x))) (Peri-LN)
    tie_embeddings: bool = False    # readout weight shared with the token embedding
    embedding: str = "trainable"    # "trainable", "frozen-random" (seeded) or "glyph" (frozen)
    vocab: list[str] | None = None  # token strings; needed for "glyph" embeddings
    glyph_font: str | None = None   # font file for "glyph"; None: GNU Unifont if installed, else Pillow's
    seed: int = 0                   # initialisation seed (also of frozen-random embeddings)

    family = "transformer"

    def validate(self) -> "TransformerConfig":
        """Check every field (type and range), then the memory budget (:func:`check_memory`); returns self."""
        check_int("vocab_size", self.vocab_size, 2, VOCAB_MAX)
        check_int("context", self.context, 1, CONTEXT_MAX)
        check_int("d_model", self.d_model, 1, 16384)
        check_int("n_layers", self.n_layers, 0, 256)
        check_int("n_heads", self.n_heads, 1, 256)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_int("d_mlp", self.d_mlp, 1, 65536)
        check_choice("norm", self.norm, ["peri", "pre"])
        check_bool("tie_embeddings", self.tie_embeddings)
        check_choice("embedding", self.embedding, ["frozen-random", "glyph", "trainable"])
        if self.vocab is not None:
            if not isinstance(self.vocab, (list, tuple)) or not all(isinstance(t, str) for t in self.vocab):
                shown = repr(self.vocab) if len(repr(self.vocab)) <= 60 else repr(self.vocab)[:57] + "..."
                raise ValueError(f"vocab must be a list of token strings or None, got {shown}")
            if len(self.vocab) > VOCAB_MAX:
                raise ValueError(f"vocab must list at most {VOCAB_MAX} token strings, got {len(self.vocab)}")
        if self.embedding == "glyph":
            if not self.vocab or len(self.vocab) != self.vocab_size:
                raise ValueError("vocab must list vocab_size token strings for glyph embeddings")
        if self.glyph_font is not None:
            check_str("glyph_font", self.glyph_font, 4096)
        check_seed("seed", self.seed)
        check_memory(self)
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


ModelConfig = MLPConfig | TransformerConfig
_CONFIGS = {"mlp": MLPConfig, "transformer": TransformerConfig}


def config_to_dict(config: ModelConfig) -> dict:
    """JSON-ready dict of a model config, with its family."""
    return {"family": config.family, **dataclasses.asdict(config)}


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys raise ``ValueError``."""
    if not isinstance(d, dict):
        raise ValueError(f"model config must be a dict with a 'family', got {type(d).__name__}")
    d = dict(d)
    family = d.pop("family", None)
    if not isinstance(family, str) or family not in _CONFIGS:
        raise ValueError(f"model family must be one of {sorted(_CONFIGS)}, got {family!r}")
    cls = _CONFIGS[family]
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


class MLPBlock(nn.Module):
    """``x + s * post_norm(proj(act(fc(pre_norm(x)))))``; ``s = residual_scale`` (1 unless fading in)."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.pre_norm = _norm(cfg.d_model, cfg.norm)
        self.fc = nn.Linear(cfg.d_model, cfg.d_hidden)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.proj = nn.Linear(cfg.d_hidden, cfg.d_model)
        self.post_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "peri" else nn.Identity()
        self.residual_scale = 1.0  # gate m of MSG-style fade-in: x + m f(x)
        self.resid_pre, self.block_out, self.resid_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_model) -> (B, d_model)
        x = self.resid_pre(x)
        h = self.act(self.fc(self.pre_norm(x)))  # (B, d_hidden)
        out = self.post_norm(self.proj(h))
        if self.residual_scale != 1.0:
            out = self.residual_scale * out
        return self.resid_post(x + self.block_out(out))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # rows: [q; k; v], head-major inside each
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def head_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head contributions ``(B, T, H, C)`` whose sum over H plus ``proj.bias`` is ``forward(x)``."""
        B, T, C = x.shape
        H, D = self.n_heads, C // self.n_heads
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # (B, T, H, D)
        w = self.proj.weight.view(C, H, D)  # (C_out, H, D)
        return torch.einsum("bthd,chd->bthc", y, w)


class TransformerMLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu_new, so the Hugging Face export is exact
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LN: ``x + attn(LN(x))``; Peri-LN: ``x + LN(attn(LN(x)))``; then the same for the MLP."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        peri = cfg.norm == "peri"
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln1_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = TransformerMLP(cfg)
        self.ln2_post = nn.LayerNorm(cfg.d_model) if peri else nn.Identity()
        self.residual_scale = 1.0  # gate m of MSG-style fade-in
        self.resid_pre, self.attn_out, self.resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.mlp_out, self.resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = self.resid_pre(x)
        a = self.ln1_post(self.attn(self.ln1(x)))
        if self.residual_scale != 1.0:
            a = self.residual_scale * a
        x = self.resid_mid(x + self.attn_out(a))
        m = self.ln2_post(self.mlp(self.ln2(x)))
        if self.residual_scale != 1.0:
            m = self.residual_scale * m
        return self.resid_post(x + self.mlp_out(m))


# ----------------------------------------------------------------------------- models


class _ResidualModel(nn.Module):
    """Shared shape: ``embed`` -> ``blocks`` -> ``final_norm`` -> ``readout``."""

    config: ModelConfig
    blocks: nn.ModuleList

    def new_block(self) -> nn.Module:
        """A fresh block of this model's config (PyTorch default init, on the model's device)."""
        raise NotImplementedError

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
        """Keep ``config.n_layers`` equal to ``len(blocks)`` after growth."""
        self.config = dataclasses.replace(self.config, n_layers=len(self.blocks))


class ResidualMLP(_ResidualModel):
    """stem -> N residual MLP blocks -> final norm -> readout. Input ``(B, d_in)``, logits ``(B, n_classes)``."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.config = cfg.validate()
        self.stem = nn.Linear(cfg.d_in, cfg.d_model)
        self.embed_out = HookPoint()
        self.blocks = nn.ModuleList(MLPBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = _norm(cfg.d_model, cfg.norm)
        self.features = HookPoint()
        self.readout = nn.Linear(cfg.d_model, cfg.n_classes)

    def new_block(self) -> MLPBlock:
        return MLPBlock(self.config).to(self.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, d_in) -> (B, d_model)
        return self.embed_out(self.stem(x))


class Transformer(_ResidualModel):
    """Decoder-only Transformer. Tokens ``(B, T)`` -> logits ``(B, T, vocab_size)``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg.validate()
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model)
        self.embed_out, self.pos_embed_out = HookPoint(), HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.features = HookPoint()
        self.readout = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.readout.weight = self.tok_embed.weight
        if cfg.embedding != "trainable":
            self.tok_embed.weight.requires_grad_(False)

    def new_block(self) -> TransformerBlock:
        block = TransformerBlock(self.config).to(self.device)
        _gpt2_init(block)
        return block

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        T = tokens.shape[-1]
        if T > self.config.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.context}")
        pos = torch.arange(T, device=tokens.device)
        return self.embed_out(self.tok_embed(tokens)) + self.pos_embed_out(self.pos_embed(pos))


def _gpt2_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def build(config: ModelConfig, device: str | torch.device | None = None) -> ResidualMLP | Transformer:
    """Build and initialise a model from its config, deterministically from ``config.seed``.

    The global RNG is left untouched (the seed is applied inside ``torch.random.fork_rng``).
    MLPs use PyTorch's default init; Transformers use GPT-2's N(0, 0.02). Frozen-random
    embeddings are N(0, 1/d_model) rows; glyph embeddings come from :func:`glyph_embedding`.
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if isinstance(config, MLPConfig):
            model = ResidualMLP(config)
        elif isinstance(config, TransformerConfig):
            model = Transformer(config)
            _gpt2_init(model)
            with torch.no_grad():
                if config.embedding == "frozen-random":
                    model.tok_embed.weight.normal_(0.0, 1.0 / math.sqrt(config.d_model))
                elif config.embedding == "glyph":
                    table, _ = glyph_embedding(config.vocab, config.d_model, config.glyph_font)
                    model.tok_embed.weight.copy_(table)
        else:
            raise TypeError(f"config must be an MLPConfig or TransformerConfig, got {type(config).__name__}")
    return model.to(device) if device is not None else model


def config_for(dataset, **overrides) -> ModelConfig:
    """A model config that fits ``dataset`` (input size, classes or vocabulary, context), validated.

    Vector data -> :class:`MLPConfig`; sequence data -> :class:`TransformerConfig` with the
    dataset's vocabulary (so glyph embeddings can be drawn). ``overrides`` set other fields.
    """
    if dataset.kind == "vector":
        return MLPConfig(d_in=dataset.d_in, n_classes=dataset.n_classes, **overrides).validate()
    base = dict(vocab_size=dataset.vocab_size, context=dataset.seq_len, vocab=list(dataset.vocab))
    return TransformerConfig(**{**base, **overrides}).validate()


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
