"""Hugging Face Phi (``model_type`` phi: Phi-1, Phi-1.5, Phi-2).

A parallel block with one norm: ``h = input_layernorm(x)``, ``x + self_attn(h) + mlp(h)``
(:attr:`~workbench.hooks.Adapter.parallel`, no ``resid_mid``); the attention's output projection
is ``self_attn.dense``; final ``model.final_layernorm`` (LayerNorm) and ``lm_head`` with a bias.
"""
from __future__ import annotations

from .. import register_adapter
from .hf_common import HFDecoderAdapter, causal_lm

__all__ = ["PhiAdapter", "is_phi"]


class PhiAdapter(HFDecoderAdapter):
    """Phi causal LMs (parallel attention and MLP reading one LayerNorm)."""

    model_types = ("phi",)
    norm = "final_layernorm"
    o_proj = "dense"
    mid_norm = None
    parallel = True

    def _is_parallel(self, cfg) -> bool:
        return True


is_phi = causal_lm(("phi",), "model", "lm_head")
register_adapter(is_phi, PhiAdapter)
