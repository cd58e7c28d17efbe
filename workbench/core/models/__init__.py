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

from .config import MLPConfig, TransformerConfig, estimate_memory, check_memory, max_model_mb, NOMINAL_BATCH
from .blocks import HookPoint, MLPBlock, TransformerBlock, ScaledLayerNorm, GATE_BUFFERS
from .families import (
    ResidualMLP, Transformer, Family, FAMILIES, family_of, build, config_from_dict, config_to_dict,
    count_params, config_for,
)
from .heads import FixedReadout, simplex_etf_rows, ebv_rows, welch_bound
from .glyphs import glyph_images, glyph_embedding

# read as attributes of the package by other modules (not part of the public surface)
from .blocks import CausalSelfAttention  # noqa: F401
from .config import VOCAB_MAX, ModelConfig, _fmt_bytes, layer_widths  # noqa: F401
from .families import seeded  # noqa: F401

__all__ = [
    "HookPoint", "MLPConfig", "TransformerConfig", "ResidualMLP", "Transformer", "MLPBlock",
    "TransformerBlock", "ScaledLayerNorm", "Family", "FAMILIES", "family_of", "build", "config_from_dict",
    "config_to_dict", "glyph_images", "glyph_embedding", "count_params", "config_for", "estimate_memory",
    "check_memory", "max_model_mb", "NOMINAL_BATCH", "GATE_BUFFERS", "FixedReadout", "simplex_etf_rows",
    "ebv_rows", "welch_bound",
]
