"""Tiny random-init Hugging Face decoders of every family the adapters read (no download), for the tests
of hooks, residual analyses, lenses, attention and tracing.

Per family, ``FAMILIES`` names the model's own modules (decoder layers, final norm, attention output
projection, unembedding) so that references never go through an adapter.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

T_, B_, V_ = 7, 2, 64
COMMON = dict(vocab_size=V_, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)


def _llama_parts(m):
    return m.model.layers, m.model.norm, m.lm_head, lambda layer: layer.self_attn.o_proj


def _neox_parts(m):
    return m.gpt_neox.layers, m.gpt_neox.final_layer_norm, m.get_output_embeddings(), \
        lambda layer: layer.attention.dense


def _phi_parts(m):
    return m.model.layers, m.model.final_layernorm, m.lm_head, lambda layer: layer.self_attn.dense


def _gpt2_parts(m):
    return m.transformer.h, m.transformer.ln_f, m.lm_head, lambda layer: layer.attn.c_proj


# name: (config class, config kwargs, parts, parallel, has separate GPT-2 style Conv1D output projection)
FAMILIES = {
    "gpt2": ("GPT2Config", dict(vocab_size=V_, n_positions=64, n_embd=32, n_layer=3, n_head=4, initializer_range=0.2,
                           bos_token_id=0, eos_token_id=0),
             _gpt2_parts, False),
    "neox_parallel": ("GPTNeoXConfig", dict(COMMON, use_parallel_residual=True), _neox_parts, True),
    "neox_sequential": ("GPTNeoXConfig", dict(COMMON, use_parallel_residual=False), _neox_parts, False),
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2), _llama_parts, False),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2), _llama_parts, False),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2), _llama_parts, False),
    "qwen3": ("Qwen3Config", dict(COMMON, num_key_value_heads=2, head_dim=8), _llama_parts, False),
    "gemma": ("GemmaConfig", dict(COMMON, num_key_value_heads=1, head_dim=8), _llama_parts, False),
    "phi": ("PhiConfig", dict(COMMON), _phi_parts, True),
}
_MODELS: dict = {}


def build(family: str, seed: int = 0):
    """A tiny random-init causal LM of ``family``; norm weights and all biases perturbed."""
    if family not in _MODELS:
        cls, kw, _, _ = FAMILIES[family]
        cfg = getattr(transformers, cls)(**kw)
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or "ln" in name.split(".")[-2] or name.endswith("bias"):
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        _MODELS[family] = model
    return _MODELS[family]


def tokens(seed: int = 0) -> torch.Tensor:
    """Token ids in ``[1, V)``: id 0 is Gemma's padding token, whose embedding row is zero."""
    return torch.randint(1, V_, (B_, T_), generator=torch.Generator().manual_seed(seed))


FAMS = list(FAMILIES)
