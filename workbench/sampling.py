"""Text generation from any sequence model or mixture, reproducible for a seed.

>>> tokens = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, seed=0)
>>> sample_text(model, dataset.vocab, prompt="The cat", n_chars=200, seed=0)

Works for every model that maps tokens ``(B, T)`` to logits ``(B, T, V)`` and has
``config.context`` (our Transformer, :class:`workbench.compose.LogitMixture`). Sampling draws
from a CPU ``torch.Generator`` seeded with ``seed``, so the same seed gives the same text on CPU
and CUDA whenever the probabilities agree; the global RNG is never touched.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["generate", "sample_text"]


@torch.no_grad()
def generate(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0) -> torch.Tensor:
    """Extend ``prompt`` (token ids ``(T,)`` or ``(B, T)``, ``T >= 1``) by ``max_new_tokens`` sampled tokens.

    Each step feeds the last ``config.context`` tokens. ``temperature=0`` is greedy (argmax);
    ``top_k`` keeps the k most likely tokens. Returns the prompt and the new tokens, same rank
    as ``prompt``, on the CPU.
    """
    context = getattr(getattr(model, "config", None), "context", None)
    if context is None:
        raise ValueError("generate needs a sequence model with config.context (a Transformer or a mixture of them)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    squeeze = prompt.dim() == 1
    tokens = prompt.reshape(1, -1) if squeeze else prompt
    if tokens.shape[-1] < 1:
        raise ValueError("the prompt needs at least one token")
    tokens = tokens.long().cpu()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -context:].to(device))[:, -1, :].float().cpu()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits.double(), dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            tokens = torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokens[0] if squeeze else tokens


def sample_text(model: nn.Module, vocab, prompt: str = "", n_chars: int = 200, temperature: float = 0.8,
                top_k: int | None = None, seed: int = 0) -> str:
    """Sample ``n_chars`` tokens after ``prompt`` and return prompt + continuation as text.

    ``vocab``: the token strings (``dataset.vocab`` or ``model.config.vocab``) or a Dataset.
    An empty prompt starts from a newline (or the first token if there is none), which is
    not part of the returned text. Prompt characters outside the vocabulary raise ``ValueError``.
    """
    vocab = list(getattr(vocab, "vocab", vocab) or [])
    if not vocab:
        raise ValueError("sample_text needs the vocabulary (token strings)")
    index = {t: i for i, t in enumerate(vocab)}
    unknown = sorted({c for c in prompt if c not in index})
    if unknown:
        raise ValueError(f"prompt: characters not in the vocabulary: {unknown[:10]}")
    start = [index[c] for c in prompt] if prompt else [index.get("\n", 0)]
    out = generate(model, torch.tensor(start), n_chars, temperature, top_k, seed)
    return prompt + "".join(vocab[int(t)] for t in out[len(start):])
