"""Lesson "growth": a new block that keeps the function (zero init), and G_stack against scratch on FLOPs.

Build: the learner makes a freshly initialised pre-LN Transformer block add exactly 0 to the residual
stream, as :func:`workbench.growth.add_layer` does with ``init="zero"`` (``docs/definitions.md#zero-init``):
zero its two output projections, weights and biases, and nothing else, so the block still learns.
Measure: the FLOPs G_stack (Du et al. 2024) needs to reach the from-scratch model's final validation
loss, as a fraction of scratch's (:func:`workbench.growth.compare`, ``#growth-comparison``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import models
from .framework import Case, Exercise, Lesson, Question, fmt, register

# the parameters that write into the stream, in the order a message names them
_OUTPUTS = {"attn.proj.weight": "attention output projection", "attn.proj.bias": "attention output projection's bias",
            "mlp.proj.weight": "MLP output projection", "mlp.proj.bias": "MLP output projection's bias"}


def zero_new_block(block):
    """Make ``block`` (a fresh pre-LN Transformer block) add exactly 0 to the residual stream, in place."""
    with torch.no_grad():
        for proj in (block.attn.proj, block.mlp.proj):
            proj.weight.zero_()
            proj.bias.zero_()


# (d_model, n_heads, d_mlp, blocks before, insertion position)
_SHAPES = [(16, 2, 32, 1, 1), (24, 4, 48, 2, 1), (32, 4, 64, 3, 0), (16, 1, 40, 2, 2), (24, 2, 64, 3, 3)]


def _cases() -> list[Case]:
    return [Case(f"a {n}-block Transformer, d_model {d}, the new block inserted at layer {pos}",
                 data=dict(d_model=d, n_heads=h, d_mlp=m, n_layers=n, position=pos, seed=i))
            for i, (d, h, m, n, pos) in enumerate(_SHAPES)]


def _fresh(case: Case):
    """The case's model, its inputs and a fresh block (nonzero biases, as most initialisations give)."""
    c = case.data
    cfg = models.TransformerConfig(vocab_size=13, context=10, d_model=c["d_model"], n_layers=c["n_layers"],
                                   n_heads=c["n_heads"], d_mlp=c["d_mlp"], seed=c["seed"])
    model = models.build(cfg).eval()
    gen = torch.Generator().manual_seed(100 + c["seed"])
    x = torch.randint(0, 13, (3, 10), generator=gen)
    with models.seeded(200 + c["seed"]):
        block = model.new_block()
        with torch.no_grad():
            for p in block.parameters():
                if p.dim() == 1 and not torch.all(p == 1):   # biases (LayerNorm gains stay 1)
                    p.normal_(0.0, 0.02)
    return model, x, block


def _judge(fn, case: Case) -> str | None:
    model, x, block = _fresh(case)
    init = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    out = fn(block)
    if isinstance(out, torch.nn.Module) and out is not block:
        block = out
    elif out is not None and out is not block:
        return (f"your function returned a {type(out).__name__}: change the block you are given in place "
                f"(and return nothing)")
    pos = case.data["position"]
    model.blocks.insert(pos, block)
    model.sync_config()
    with torch.no_grad():
        after = model(x)
    change = float((after - before).abs().max())
    params = dict(block.named_parameters())
    if change > 1e-6:
        left = [k for k in _OUTPUTS if k in params and bool(params[k].detach().abs().max() > 0)]
        where = f"the output changed by {fmt(change)} with the block inserted at layer {pos}"
        if left:
            also = [_OUTPUTS[k] for k in left[1:]]
            return (f"your new block's {_OUTPUTS[left[0]]} ({left[0]}) is not zero: {where}"
                    + (f"; nor is its {', '.join(also)}" if also else "")
                    + ". A pre-LN block writes to the stream only through those two projections")
        return f"your new block is not function preserving: {where}, though its output projections are zero"
    # it must still learn: a gradient reaches both output projections
    model.train()
    logits = model(x)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    for name in ("attn.proj.weight", "mlp.proj.weight"):
        p = params.get(name)
        if p is None or not p.requires_grad:
            return f"your new block adds 0 but cannot learn: its {name} no longer requires a gradient"
        if p.grad is None or float(p.grad.abs().max()) == 0.0:
            zeroed = [k for k, v in block.state_dict().items() if k not in _OUTPUTS and k in init
                      and bool(v.abs().max() == 0) and bool(init[k].abs().max() > 0)]
            extra = f" you also zeroed {', '.join(zeroed)}, so" if zeroed else ""
            return (f"your new block adds 0 but can never learn:{extra} no gradient reaches its {name}. "
                    f"Zero only the two output projections (weights and biases) and keep the rest of the fresh init")
    return None


ZERO_BLOCK = Exercise(
    name="growth.zero_block", title="A new block that keeps the function", params=("block",),
    reference=zero_new_block, cases=_cases, judge=_judge)

FLOPS_RATIO = Question(
    name="growth.flops_ratio",
    prompt=("G_stack trains 1 block, stacks it into 2 and trains on; scratch trains 2 blocks from the start on "
            "the same FLOP budget. What fraction of scratch's FLOPs does G_stack need to reach scratch's final "
            "validation loss? (1: the same; below 1: G_stack is cheaper)"),
    low=0.0, high=2.0, ci_answer=1.0, digits=2)

LESSON = register(Lesson(
    name="growth", title="Growing deeper without changing the function", notebook="01_growth.ipynb",
    questions=(FLOPS_RATIO,), exercises=(ZERO_BLOCK,), measured="growth.flops_ratio",
    papers=("Chen, Goodfellow and Shlens 2016, Net2Net (function-preserving growth)",
            "Du et al. 2024, Stacking your Transformers (G_stack)",
            "Yao et al. 2024, Masked structural growth (fade-in)")))
