"""Training FLOPs counted from the architecture (and from what is frozen).

The formula counts matrix multiplications only, as FLOPs = 2 x multiply-adds, the way
``torch.utils.flop_counter.FlopCounterMode`` does (norms, activations, softmax, embedding
look-ups and the optimizer update are left out; they are a few percent at these sizes).
For a batch of ``n`` rows (``n = B`` examples for the MLP, ``n = B*T`` tokens for the
Transformer):

- every ``Linear(d_in -> d_out)``: forward ``2 n d_in d_out``; backward adds
  ``2 n d_in d_out`` for the gradient of its input **if the input requires a gradient**
  (some trainable parameter lies upstream) and ``2 n d_in d_out`` for the gradient of its
  weight **if the weight is trainable**;
- causal self-attention (scores ``QK^T`` and ``AV``, counted over the full ``T x T`` square
  as the math kernel computes it): forward ``4 B T^2 d_model``, backward twice that when
  its inputs require a gradient.

So a fully trainable model costs ~3x its forward pass per step, and freezing the lower
blocks saves their whole backward pass (nothing below them needs a gradient) plus the
weight gradients of frozen layers above. Evaluation passes are not counted: these are
*training* FLOPs, the x-axis for comparing a grown model with one trained from scratch.
``tests/test_growth.py`` checks the count against ``FlopCounterMode``.

Definitions: ``docs/definitions.md#flops``.
"""
from __future__ import annotations

import math

import torch.nn as nn

from . import checks

MAX_BATCH = 100_000_000

__all__ = ["step_flops", "flops_per_example", "forward_flops", "examples_seen", "steps_for_budget"]


def _trainable(*modules) -> bool:
    return any(p.requires_grad for m in modules if m is not None for p in m.parameters())


class _Count:
    """The counter a model's ``count_flops(c)`` fills (each family walks its own modules, see
    :mod:`workbench.models`): ``n = batch * seq_len`` rows through every linear layer."""

    def __init__(self, batch: int, seq_len: int = 1):
        self.batch, self.seq_len = batch, seq_len
        self.n, self.fwd, self.bwd = batch * seq_len, 0, 0

    @staticmethod
    def trainable(*modules) -> bool:
        return _trainable(*modules)

    def linear(self, lin: nn.Linear, input_rg: bool) -> bool:
        f = 2 * self.n * lin.in_features * lin.out_features
        self.fwd += f
        if input_rg:
            self.bwd += f
        if lin.weight.requires_grad:
            self.bwd += f
        return input_rg or _trainable(lin)

    def norm(self, module: nn.Module, input_rg: bool) -> bool:
        return input_rg or _trainable(module)

    def attention(self, d_model: int, input_rg: bool) -> bool:
        """Scores ``QK^T`` and ``AV`` over the full ``T x T`` square: ``4 B T^2 d_model`` forward."""
        core = 4 * self.batch * self.seq_len * self.seq_len * d_model
        self.fwd += core
        if input_rg:
            self.bwd += 2 * core
        return input_rg


def step_flops(model: nn.Module, batch_size: int = 1, seq_len: int | None = None) -> dict[str, int]:
    """``{"forward", "backward", "total"}`` FLOPs of one training step on ``batch_size`` examples.

    ``seq_len`` (Transformers) defaults to the model's context. Reflects the current depth
    and the current ``requires_grad`` flags. The model counts itself (``model.count_flops``).
    """
    checks.check_int("batch_size", batch_size, 1, MAX_BATCH)
    checks.check_model("model", model)   # the families count themselves (count_flops)
    context = model.max_seq_len   # None: no sequence axis (vector models)
    if seq_len is not None:
        checks.check_int("seq_len", seq_len, 1, context)
    c = _Count(batch_size, (seq_len or context) if context is not None else 1)
    model.count_flops(c)
    return {"forward": c.fwd, "backward": c.bwd, "total": c.fwd + c.bwd}


def flops_per_example(model: nn.Module, seq_len: int | None = None) -> int:
    """Training FLOPs per example (all terms are linear in the batch size)."""
    return step_flops(model, 1, seq_len)["total"]


def forward_flops(model: nn.Module, batch_size: int = 1, seq_len: int | None = None) -> int:
    """Forward-pass FLOPs (e.g. for evaluation cost)."""
    return step_flops(model, batch_size, seq_len)["forward"]


def examples_seen(steps: int, n_train: int, batch_size: int) -> int:
    """Examples consumed by the first ``steps`` steps of ``wb.train``.

    ``wb.train`` shuffles each epoch and keeps a short last batch, so an epoch is
    ``ceil(n_train / batch_size)`` steps and exactly ``n_train`` examples.
    """
    checks.check_int("steps", steps, 0)
    checks.check_int("n_train", n_train, 1)
    checks.check_int("batch_size", batch_size, 1)
    bs = min(batch_size, n_train)
    per_epoch = math.ceil(n_train / bs)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n_train + rest * bs


def steps_for_budget(budget: float, per_example: float, n_train: int, batch_size: int) -> int:
    """Fewest steps whose training FLOPs reach ``budget`` (at least 1)."""
    checks.check_float("budget", budget, 0.0, 1e30)
    checks.check_float("per_example", per_example, 0.0, 1e30, lo_open=True)
    checks.check_int("n_train", n_train, 1)
    checks.check_int("batch_size", batch_size, 1)
    lo, hi = 1, 1
    while examples_seen(hi, n_train, batch_size) * per_example < budget:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if examples_seen(mid, n_train, batch_size) * per_example >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo
