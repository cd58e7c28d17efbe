"""The two model families, ``embed -> blocks -> final_norm -> readout``: :class:`ResidualMLP` and
:class:`Transformer` on one shared base, the :data:`FAMILIES` registry, and :func:`build` (seeded,
one build at a time), :func:`config_for` and :func:`count_params`.

Definitions: ``docs/definitions.md#hook-sites``, ``#frozen-random``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..checks import register_model
from .blocks import (
    GATE_BUFFERS,
    HookPoint,
    MLPBlock,
    ScaledLayerNorm,
    TransformerBlock,
    _norm,
)
from .config import MLPConfig, ModelConfig, TransformerConfig, layer_widths
from .glyphs import glyph_embedding
from .heads import FixedReadout

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
for _f in FAMILIES.values():   # checks.check_model's "a workbench model"
    register_model(_f.name, _f.model)


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
