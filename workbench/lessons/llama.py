"""Lesson "llama": how a real-family model uses its depth, on a tiny Llama built from a config (random
weights, no download).

Build: the learner skips one decoder layer of a Hugging Face Llama (the layer passes its input on: the
identity) with a forward hook, and returns the output distribution; checked against the same skip done by
the engine's adapter, which :func:`workbench.residual.skip_effects` uses (Csordás et al. 2025;
``docs/definitions.md#skip-effects``). Measure: the depth score, the centre of mass of the skip effects
over the layers (``#depth-score``).
"""
from __future__ import annotations

import torch

from ..hooks import adapter
from .framework import Case, Exercise, Lesson, Question, fmt, register, tensor_result


def skip_layer(model, x, layer):
    """Output probabilities ``(B, T, V)`` of the Llama ``model`` on tokens ``x`` with decoder layer ``layer``
    replaced by the identity."""
    def identity(module, args, output):
        return args[0]                           # the layer's input, passed on unchanged

    handle = model.model.layers[layer].register_forward_hook(identity)
    try:
        with torch.no_grad():
            return model(input_ids=x).logits.softmax(-1)
    finally:
        handle.remove()                          # the model is whole again afterwards


# (hidden, layers, heads, key-value heads, vocab, batch, tokens, skipped layer)
_SHAPES = [(16, 2, 2, 1, 20, 2, 6, 0), (32, 3, 4, 2, 32, 2, 8, 1), (24, 4, 4, 2, 24, 3, 5, 3), (32, 4, 4, 4, 40, 1, 9, 2)]


def _cases() -> list[Case]:
    return [Case(f"a {n}-layer Llama, hidden size {d}, {b} x {t} tokens, skipping layer {s}",
                 data=dict(hidden=d, layers=n, heads=h, kv=kv, vocab=v, batch=b, tokens=t, skip=s, seed=40 + i))
            for i, (d, n, h, kv, v, b, t, s) in enumerate(_SHAPES)]


def tiny_llama(hidden: int = 32, layers: int = 4, heads: int = 4, kv_heads: int = 2, vocab: int = 64, seed: int = 0):
    """A random ``LlamaForCausalLM`` from a config (no download), in eval mode, seeded."""
    import transformers

    from ..core.models import seeded

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=64)
    with seeded(seed):
        model = transformers.LlamaForCausalLM(config)
    return model.eval()


def _engine_skip(model, x, layer: int) -> torch.Tensor:
    """The engine's skip: the adapter replaces the layer by the identity."""
    ad = adapter(model)
    with torch.no_grad(), ad.skip(layer):
        out = ad.forward(x)
    return getattr(out, "logits", out).softmax(-1).double()


def _hooked(model, x, layer: int, fn) -> torch.Tensor:
    handle = model.model.layers[layer].register_forward_hook(fn)
    try:
        with torch.no_grad():
            return model(input_ids=x).logits.softmax(-1).double()
    finally:
        handle.remove()


def _judge(fn, case: Case) -> str | None:
    c = case.data
    model = tiny_llama(c["hidden"], c["layers"], c["heads"], c["kv"], c["vocab"], c["seed"])
    x = torch.randint(0, c["vocab"], (c["batch"], c["tokens"]), generator=torch.Generator().manual_seed(c["seed"]))
    with torch.no_grad():
        clean = model(input_ids=x).logits.softmax(-1).double()
    L, s, shape = c["layers"], c["skip"], (c["batch"], c["tokens"], c["vocab"])
    raw = fn(model, x.clone(), s)
    got, err = tensor_result(raw, shape)
    if err:
        return err + " (the output probabilities: batch, tokens, vocabulary)"
    with torch.no_grad():
        after = model(input_ids=x).logits.softmax(-1).double()
    if not torch.allclose(after, clean, atol=1e-6):
        return ("after your function returned, the model still computes something else: remove your hook "
                "(handle.remove(), in a finally block so that an error removes it too)")
    if not torch.allclose(got.sum(-1), torch.ones(shape[:2], dtype=torch.float64), atol=1e-4) or (got < 0).any():
        return "your output's rows do not sum to 1: return probabilities (softmax over the vocabulary), not logits"
    want = _engine_skip(model, x, s)
    if torch.allclose(got, want, atol=1e-5):
        return None
    if torch.allclose(got, clean, atol=1e-6):
        return f"your output is the model's own: layer {s} was not skipped (did your hook return its replacement?)"
    for other in range(L):
        if other != s and torch.allclose(got, _engine_skip(model, x, other), atol=1e-5):
            return f"your output is what skipping layer {other} gives, not layer {s}: layers count from 0"
    zero = _hooked(model, x, s, lambda m, a, o: torch.zeros_like(a[0]))
    if torch.allclose(got, zero, atol=1e-5):
        return ("you replaced the layer's output by zeros, which deletes the whole residual stream: skipping a layer "
                "means it passes its input on unchanged (return the hook's input, args[0])")
    diff = float((got - want).abs().max())
    return f"your probabilities differ from the skipped model's by up to {fmt(diff)}"


SKIP_LAYER = Exercise(name="llama.skip_layer", title="Skip one layer of a Llama", params=("model", "x", "layer"),
                      reference=skip_layer, cases=_cases, judge=_judge)

DEPTH_SCORE = Question(
    name="llama.depth_score",
    prompt=("A 4-layer Llama with random weights: skip each layer in turn and weigh each layer by how much the "
            "output changes. Where is the centre of mass (the depth score), from 0 (the first layer does "
            "everything) to 3 (the last)?"),
    low=0.0, high=3.0, ci_answer=1.5, digits=2)

LESSON = register(Lesson(
    name="llama", title="How a Llama uses its depth: skips, the depth score and patching", notebook="06_llama_depth.ipynb",
    questions=(DEPTH_SCORE,), exercises=(SKIP_LAYER,), measured="llama.depth_score",
    papers=("Csordás et al. 2025, Do language models use their depth efficiently?",
            "Gromov et al. 2024, The unreasonable ineffectiveness of the deeper layers",
            "Meng et al. 2022, Locating and editing factual associations in GPT (causal tracing)")))
