"""The Jacobian lens (Gurnee et al. 2026): ``J_l``, the average Jacobian of later residuals with respect to
layer ``l``'s, read out as ``W_U norm(J_l h_l)``; the logit lens is ``J = I``. Training-free.

Definitions: ``docs/definitions.md#jacobian-lens``.
"""
from __future__ import annotations

import contextlib

import torch

from ..core import checks
from ..core import monitor as _monitor
from ..hooks import Adapter, adapter
from .batch import (
    _as_batch,
    _logits,
    _need_layers,
    _tokens,
)
from .lens_files import _StoredLens, fingerprint
from .skip import _replace_input, _replace_output

# ============================================================================ Jacobian lens


class JacobianLens(_StoredLens):
    """Per-layer averaged Jacobians ``J_l (C, C)`` of the final residual with respect to ``h_l``
    (Gurnee et al. 2026), for layers ``0 .. L-1``; layer ``L`` is the identity.

    ``transport(h, l) = J_l h`` (float32); the lens reads ``W_U norm(J_l h_l)``. Rows of ``J_l`` are
    output dimensions (the final residual), columns input dimensions (``h_l``), as in the reference
    code. ``info``: ``n_prompts``, ``skip_first``, ``stopped``. See ``docs/definitions.md#jacobian-lens``.
    """

    kind = "jacobian"

    def __init__(self, jacobians: torch.Tensor, model_facts: dict, info: dict | None = None):
        self.jacobians = jacobians.detach().float()
        self.model_facts = dict(model_facts)
        self.info = dict(info or {})
        self._on: dict = {}

    @property
    def n_layers(self) -> int:
        return int(self.jacobians.shape[0])

    @property
    def n_prompts(self) -> int:
        return int(self.info.get("n_prompts", 0))

    def transport(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``J_l h`` for ``h (..., C)`` entering ``layer`` (float32; ``layer = L``: ``h`` itself)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        if layer == self.n_layers:
            return h.float()
        key = (layer, h.device)
        if key not in self._on:
            self._on[key] = self.jacobians[layer].to(h.device)
        return h.float() @ self._on[key].T

    def matrix(self, layer: int) -> torch.Tensor:
        """``J_l`` ``(C, C)`` (identity at ``L``)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        return torch.eye(self.jacobians.shape[-1]) if layer == self.n_layers else self.jacobians[layer].cpu()

    def _tensors(self):
        return {"jacobians": self.jacobians}

    @classmethod
    def _from_stored(cls, facts, info, tensors, where):
        L, C = int(facts["n_layers"]), int(facts["d_model"])
        J = tensors.get("jacobians")
        if set(tensors) != {"jacobians"} or J is None or tuple(J.shape) != (L, C, C):
            raise ValueError(f"{where}: expected one tensor 'jacobians' of shape {(L, C, C)}, got "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
        return cls(J, facts, info)

    def __repr__(self) -> str:
        return (f"JacobianLens(n_layers={self.n_layers}, d_model={self.jacobians.shape[-1]}, "
                f"n_prompts={self.n_prompts})")


def _prompt_jacobians(ad: Adapter, x1: torch.Tensor, positions: torch.Tensor, dim_batch: int) -> torch.Tensor:
    """``(L, C, C)``: ``J_l[i, j] = (1/|P|) sum_{t in P} sum_{t' in P} d h_final[t', i] / d h_l[t, j]`` for one
    prompt ``x1 (1, ...)``; one forward of ``dim_batch`` copies, then one backward per ``dim_batch`` output
    dimensions with a one-hot cotangent (the reference's estimator)."""
    L = ad.n_layers
    xb = x1.expand(dim_batch, *x1.shape[1:])
    got: dict = {}

    def root(h):
        got[0] = h.detach().requires_grad_(True)
        return got[0]

    def keep(l):
        def fn(h):
            got[l] = h
            return h
        return fn

    def final(h, out):
        got["final"] = out
        return out
    with contextlib.ExitStack() as stack, torch.enable_grad():
        stack.enter_context(_replace_input(ad.block(0), root))
        for l in range(1, L):
            stack.enter_context(_replace_input(ad.block(l), keep(l)))
        stack.enter_context(_replace_output(ad.block(L - 1), final))
        _logits(ad, xb)
    out = got["final"]
    sources = [got[l] for l in range(L)]
    out_t = _tokens(out)
    C = out_t.shape[-1]
    J = torch.zeros(L, C, C, dtype=torch.float64)
    cot = torch.zeros_like(out_t)
    rows = torch.arange(dim_batch, device=out.device)
    n_passes = -(-C // dim_batch)
    for k in range(n_passes):
        d0, n = k * dim_batch, min(dim_batch, C - k * dim_batch)
        cot.zero_()
        cot[rows[:n, None], positions[None, :], d0 + rows[:n, None]] = 1.0
        grads = torch.autograd.grad(out, sources, grad_outputs=cot.reshape(out.shape), retain_graph=k < n_passes - 1,
                                    allow_unused=True)
        for l, gr in enumerate(grads):
            if gr is not None:
                J[l, d0:d0 + n] = _tokens(gr)[:n][:, positions].double().mean(1).cpu()
    return J


def fit_jacobian_lens(model, prompts, skip_first: int = 0, dim_batch: int | None = None,
                      monitor=None) -> JacobianLens:
    """Fit a Jacobian lens (Gurnee et al. 2026): ``J_l`` averaged over the prompts, every layer ``0 .. L-1``.

    Per prompt, with ``P = {skip_first, ..., T-1}``: ``J_l = (1/|P|) sum_{t in P} sum_{t' in P}
    d h_final,t' / d h_l,t``, ``h_l`` the residual entering block ``l`` and ``h_final`` the last block's
    output before the final norm; then the mean over prompts. Training-free: one forward of ``dim_batch``
    copies of the prompt and ``ceil(C / dim_batch)`` backward passes per prompt (``dim_batch`` default
    ``C``: one). Differences from the reference code: our layer ``l`` is the residual *entering* block
    ``l`` (theirs: leaving it), and the last position is kept (the estimate needs no next token).

    ``prompts``: token ids ``(N, T)`` (``skip_first < T``; the reference skips 16 positions of long
    prompts, our contexts are short: default 0) or vectors ``(N, d_in)`` for a residual MLP (one
    position). ``monitor``: progress per prompt and Stop (the lens of the prompts done so far, at least
    one; ``info["stopped"]``). See ``docs/definitions.md#jacobian-lens``.
    """
    ad = adapter(model)
    _need_layers(ad, "fit_jacobian_lens")
    mon = _monitor.resolve(monitor)
    was = ad.model.training
    ad.model.eval()
    try:
        x = _as_batch(ad, prompts, "prompts")
        T = x.shape[1] if ad.family == "transformer" else 1
        skip_first = checks.check_int("skip_first", skip_first, 0, T - 1)
        facts = fingerprint(ad)
        C = facts["d_model"]
        dim_batch = C if dim_batch is None else checks.check_int("dim_batch", dim_batch, 1, C)
        positions = torch.arange(skip_first, T, device=ad.device)
        total = torch.zeros(ad.n_layers, C, C, dtype=torch.float64)
        done = 0
        stopped = False
        for i in range(len(x)):
            total += _prompt_jacobians(ad, x[i:i + 1], positions, dim_batch)
            done += 1
            mon.report(done / len(x), f"Jacobian lens: prompt {done}/{len(x)}")
            if mon.stopped and done < len(x):
                stopped = True
                break
    finally:
        ad.model.train(was)
    info = {"n_prompts": done, "skip_first": skip_first, "positions": T - skip_first, "stopped": stopped,
            "dim_batch": dim_batch}
    return JacobianLens((total / done).float(), facts, info)
