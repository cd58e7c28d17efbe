"""Hugging Face Llama-layout decoders: ``model_type`` llama, mistral, qwen2, qwen3.

``model.model.layers[l]`` = ``input_layernorm -> self_attn (q/k/v/o_proj) -> + ->
post_attention_layernorm -> mlp -> +``; final ``model.model.norm`` (RMSNorm) and ``model.lm_head``.
Grouped-query attention shares keys and values between query heads; the output projection
``o_proj`` still reads one ``head_dim`` slice per *query* head, so ``attn.z`` is
``(B, T, num_attention_heads, head_dim)``. Qwen3's q/k norms sit inside the attention and change
nothing here. See :mod:`workbench.adapters.hf_common` for the hook sites.
"""
from __future__ import annotations

from .. import register_adapter
from .hf_common import HFDecoderAdapter, causal_lm

__all__ = ["LlamaAdapter", "is_llama_like"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LlamaAdapter(HFDecoderAdapter):
    """Llama, Mistral, Qwen2 and Qwen3 causal LMs (sequential pre-RMSNorm blocks)."""

    model_types = MODEL_TYPES


is_llama_like = causal_lm(MODEL_TYPES, "model", "lm_head")
register_adapter(is_llama_like, LlamaAdapter)
