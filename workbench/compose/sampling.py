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

from ..core import checks

MAX_NEW_TOKENS = 100_000

__all__ = ["generate", "sample_text"]


def _vocab_size(model: nn.Module) -> int:
    cfg = model.config
    size = getattr(cfg, "vocab_size", None)
    if size is None:
        raise ValueError("model: generate needs a sequence model with config.vocab_size")
    return int(size)


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
    checks.check_int("max_new_tokens", max_new_tokens, 0, MAX_NEW_TOKENS)
    checks.check_float("temperature", temperature, 0.0, 100.0)
    seed = checks.check_seed("seed", seed)
    vocab_size = _vocab_size(model)
    if top_k is not None:
        checks.check_int("top_k", top_k, 1, vocab_size)
    checks.check_tokens("prompt", prompt, vocab_size)
    squeeze = prompt.dim() == 1
    tokens = prompt.reshape(1, -1) if squeeze else prompt
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[-1] < 1:
        raise ValueError(f"prompt must be token ids (T,) or (B, T) with at least one token, got shape "
                         f"{tuple(prompt.shape)}")
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
    checks.check_str("prompt", prompt, 100_000)
    checks.check_int("n_chars", n_chars, 0, MAX_NEW_TOKENS)
    vocab = getattr(vocab, "vocab", vocab)
    if isinstance(vocab, str) or not isinstance(vocab, (list, tuple)) or not vocab:
        raise ValueError("vocab: sample_text needs the vocabulary (a list of token strings, or a Dataset)")
    vocab = list(vocab)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is not None and len(vocab) != size:
        raise ValueError(f"vocab lists {len(vocab)} tokens; the model's vocab_size is {size}")
    index = {t: i for i, t in enumerate(vocab)}
    unknown = sorted({c for c in prompt if c not in index})
    if unknown:
        raise ValueError(f"prompt: characters not in the vocabulary: {unknown[:10]}")
    start = [index[c] for c in prompt] if prompt else [index.get("\n", 0)]
    out = generate(model, torch.tensor(start), n_chars, temperature, top_k, seed)
    return prompt + "".join(vocab[int(t)] for t in out[len(start):])
