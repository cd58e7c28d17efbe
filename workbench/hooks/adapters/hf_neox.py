"""Hugging Face GPT-NeoX / Pythia (``model_type`` gpt_neox).

``model.gpt_neox.layers[l]``: ``input_layernorm -> attention (dense = output projection)`` and
``post_attention_layernorm -> mlp``; final ``gpt_neox.final_layer_norm`` (LayerNorm) and the
unembedding ``model.embed_out`` (``model.lm_head`` since transformers 5). With ``config.use_parallel_residual`` (Pythia's default) both
read the block input: ``resid_post = resid_pre + attn_out + mlp_out`` and the adapter is
:attr:`~workbench.hooks.Adapter.parallel` (no ``resid_mid``); otherwise the block is sequential
and ``resid_mid`` is the input of ``post_attention_layernorm``.
"""
from __future__ import annotations

from .. import register_adapter
from .hf_common import HFDecoderAdapter, causal_lm

__all__ = ["NeoXAdapter", "is_neox"]


class NeoXAdapter(HFDecoderAdapter):
    """GPT-NeoX causal LMs, parallel or sequential residual."""

    model_types = ("gpt_neox",)
    base = "gpt_neox"
    embed = "embed_in"
    norm = "final_layer_norm"
    head = ("embed_out", "lm_head")   # embed_out before transformers 5, lm_head since
    attn = "attention"
    o_proj = "dense"

    def _is_parallel(self, cfg) -> bool:
        return bool(getattr(cfg, "use_parallel_residual", True))


is_neox = causal_lm(("gpt_neox",), "gpt_neox", ("embed_out", "lm_head"))
register_adapter(is_neox, NeoXAdapter)
