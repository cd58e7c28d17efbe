"""Hugging Face Gemma (``model_type`` gemma, the first generation).

The Llama layout (:mod:`workbench.adapters.hf_llama`) with two differences:

- the embedding is multiplied by ``sqrt(hidden_size)`` before the first layer (inside the
  embedding module in recent ``transformers``, in ``GemmaModel.forward`` in older ones), so
  ``embed_out`` is the *scaled* embedding, equal to ``blocks.0.resid_pre``;
- ``GemmaRMSNorm`` computes ``x / rms(x) * (1 + w)``: :meth:`GemmaAdapter.frozen_norm` uses the
  gain ``1 + w``.
"""
from __future__ import annotations

import math

import torch

from .. import frozen_norm_of, register_adapter
from .hf_common import HFDecoderAdapter, causal_lm, resolve

__all__ = ["GemmaAdapter", "is_gemma"]


class GemmaAdapter(HFDecoderAdapter):
    """Gemma causal LMs: scaled embedding, RMSNorm with the ``+1`` offset."""

    model_types = ("gemma",)

    def embed_scale(self):
        emb = resolve(self.stack, self.embed)
        if hasattr(emb, "embed_scale"):        # GemmaTextScaledWordEmbedding scales its own output
            return None
        return math.sqrt(self.model.config.hidden_size)

    def frozen_norm(self, final: torch.Tensor):
        """As :meth:`workbench.hooks.Adapter.frozen_norm` with the gain ``1 + w`` of ``GemmaRMSNorm``."""
        return frozen_norm_of(self.final_norm(), final, offset=1.0)


is_gemma = causal_lm(("gemma",), "model", "lm_head")
register_adapter(is_gemma, GemmaAdapter)
