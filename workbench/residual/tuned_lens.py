"""The tuned lens (Belrose et al. 2023): per-layer affine translators ``h + A_l h + b_l``, zero-initialised
(so an untrained tuned lens is the logit lens), trained to minimise ``KL(final || lens_l)``.

Definitions: ``docs/definitions.md#tuned-lens``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from ..hooks import adapter
from .batch import (
    _as_batch,
    _need_layers,
    _resid_stream,
)
from .lens_files import _StoredLens, fingerprint

# ============================================================================ tuned lens


class TunedLens(nn.Module, _StoredLens):
    """Per-layer affine translators of the tuned lens (Belrose et al. 2023).

    ``translators[l]`` is an ``nn.Linear(C, C)`` (``A_l``, ``b_l``) for layers ``0 .. L-1``; layer ``L``
    needs none. ``transform(h, l) = h + A_l h + b_l``, added residually as in the reference code so that
    weight decay pulls towards the identity. New translators are zero, so an untrained tuned lens is
    exactly the logit lens. ``TunedLens(model)`` makes one for ``model`` (float32, on its device);
    :func:`train_tuned_lens` trains it. ``info`` records how it was trained (saved with it).
    See ``docs/definitions.md#tuned-lens``.
    """

    kind = "tuned"

    def __init__(self, model):
        super().__init__()
        ad = adapter(model)
        _need_layers(ad, "a tuned lens")
        self.model_facts = fingerprint(ad)
        C = self.model_facts["d_model"]
        self.translators = nn.ModuleList(nn.Linear(C, C) for _ in range(ad.n_layers))
        with torch.no_grad():
            for t in self.translators:
                t.weight.zero_()
                t.bias.zero_()
        self.info: dict = {"trained": False}
        self.to(ad.device)

    @property
    def n_layers(self) -> int:
        return len(self.translators)

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``h + A_l h + b_l`` for ``h (..., C)`` entering ``layer`` (``layer = L``: ``h`` itself), in ``h``'s dtype."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        if layer == self.n_layers:
            return h
        t = self.translators[layer]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def matrix(self, layer: int) -> torch.Tensor:
        """The linear part ``I + A_l`` ``(C, C)`` of the translator of ``layer`` (identity at ``L``)."""
        layer = checks.check_int("layer", layer, 0, self.n_layers)
        C = self.model_facts["d_model"]
        eye = torch.eye(C)
        return eye if layer == self.n_layers else eye + self.translators[layer].weight.detach().float().cpu()

    def _tensors(self):
        return {k: v for k, v in self.state_dict().items()}

    def _to(self, device):
        return self.to(device)

    @classmethod
    def _from_stored(cls, facts, info, tensors, where):
        lens = cls.__new__(cls)
        nn.Module.__init__(lens)
        L, C = int(facts["n_layers"]), int(facts["d_model"])
        lens.model_facts = dict(facts)
        lens.translators = nn.ModuleList(nn.Linear(C, C) for _ in range(L))
        want = {f"translators.{l}.{p}": ((C, C) if p == "weight" else (C,)) for l in range(L) for p in ("weight", "bias")}
        if set(tensors) != set(want):
            raise ValueError(f"{where}: tensors {sorted(set(tensors) ^ set(want))[:4]} do not fit a tuned lens of "
                             f"{L} layers")
        for k, shape in want.items():
            if tuple(tensors[k].shape) != shape:
                raise ValueError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, expected {shape}")
        lens.load_state_dict(tensors)
        lens.info = dict(info)
        return lens

    def __repr__(self) -> str:
        return (f"TunedLens(n_layers={self.n_layers}, d_model={self.model_facts['d_model']}, "
                f"trained={self.info.get('trained', False)})")


@dataclass
class TunedLensFit:
    """Result of :func:`train_tuned_lens`.

    ``history``: tidy ``step, layer, kl`` (mean KL(final || lens) of each training batch, before the
    step). ``tokens_asked = steps x batch_size x T``; ``tokens_seen``: tokens actually trained on;
    ``short``: fewer than asked (the data ran out, or Stop), also warned when it happens.
    """

    lens: TunedLens
    history: pd.DataFrame
    steps_asked: int
    steps_done: int
    tokens_asked: int
    tokens_seen: int
    stopped: bool

    @property
    def short(self) -> bool:
        return self.tokens_seen < self.tokens_asked

    def frame(self) -> pd.DataFrame:
        return self.history


def train_tuned_lens(model, x, steps: int = 250, batch_size: int = 32, lr_scale: float = 1.0,
                     momentum: float = 0.9, weight_decay: float = 1e-3, max_passes: int = 1, seed: int = 0,
                     lens: TunedLens | None = None, monitor=None) -> TunedLensFit:
    """Train a tuned lens on the frozen ``model``'s activations on ``x`` (Belrose et al. 2023).

    Loss per step: ``sum_l mean_tokens KL(p_final || p_lens,l)`` over layers ``0 .. L-1``, at the same
    position (the reference's ``token_shift = 0``). Optimiser as in the reference code: SGD with Nesterov
    momentum ``momentum``, learning rate ``lr_scale * (1 - momentum)``, weight decay ``weight_decay``, the
    rate decayed linearly to 0 over ``steps``, gradients clipped to norm 1. The model's weights never
    receive gradients.

    ``x``: token ids ``(N, T)`` (at most the context) or vectors ``(N, d_in)`` for a residual MLP.
    Batches of ``batch_size`` sequences are drawn in a seeded random order, each sequence once per pass,
    at most ``max_passes`` passes: when the data runs out before ``steps`` steps, training ends there
    with a warning and ``short`` set in the result (and in ``lens.info``), never silently. ``lens``:
    continue training this lens (default: a new zero lens). ``monitor``: progress and Stop
    (:mod:`workbench.monitor`); a stopped training returns the lens so far, also flagged.
    Returns a :class:`TunedLensFit`. See ``docs/definitions.md#tuned-lens``.
    """
    ad = adapter(model)
    _need_layers(ad, "train_tuned_lens")
    steps = checks.check_int("steps", steps, 1, 10**7)
    batch_size = checks.check_int("batch_size", batch_size, 1, 2**20)
    lr_scale = checks.check_float("lr_scale", lr_scale, 0.0, 100.0, lo_open=True)
    momentum = checks.check_float("momentum", momentum, 0.0, 1.0, hi_open=True)
    weight_decay = checks.check_float("weight_decay", weight_decay, 0.0, 1.0)
    max_passes = checks.check_int("max_passes", max_passes, 1, 10**6)
    seed = checks.check_seed("seed", seed)
    mon = _monitor.resolve(monitor)
    x = _as_batch(ad, x)
    if lens is None:
        lens = TunedLens(ad)
    elif not isinstance(lens, TunedLens):
        raise ValueError(f"lens must be a TunedLens or None, got {type(lens).__name__}")
    else:
        lens.check_model(ad)
        lens.to(ad.device)
    N = len(x)
    T = x.shape[1] if ad.family == "transformer" else 1
    L = ad.n_layers
    g = torch.Generator().manual_seed(seed)
    passes = min(max_passes, -(-steps * batch_size // N))           # only the passes the steps can use
    batches = torch.cat([torch.randperm(N, generator=g) for _ in range(passes)]).split(batch_size)
    runnable = min(steps, len(batches))
    params = list(lens.parameters())
    opt = torch.optim.SGD(params, lr=lr_scale * (1 - momentum), momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    rows: list[tuple[int, int, float]] = []
    seen = 0
    done = 0
    stopped = False
    was = ad.model.training
    ad.model.eval()
    try:
        for step in range(runnable):
            if mon.stopped:
                stopped = True
                break
            xb = x[batches[step].to(x.device)]
            with torch.no_grad():
                hs, logits = _resid_stream(ad, xb)
                logp_final = logits.float().log_softmax(-1)
                p_final = logp_final.exp()
            with torch.enable_grad():
                kls = []
                for l in range(L):
                    logp = ad.unembed(lens.transform(hs[l], l)).float().log_softmax(-1)
                    kls.append((p_final * (logp_final - logp)).sum(-1).mean())
                grads = torch.autograd.grad(torch.stack(kls).sum(), params)
            for p, gr in zip(params, grads):
                p.grad = gr
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            kls = [k.detach() for k in kls]
            rows.extend((step, l, float(k)) for l, k in enumerate(kls))
            seen += len(xb) * T
            done = step + 1
            mon.report(done / steps, f"tuned lens: step {done}/{steps}, mean KL {float(torch.stack(kls).mean()):.4f}")
    finally:
        ad.model.train(was)
    asked = steps * batch_size * T
    history = pd.DataFrame(rows, columns=["step", "layer", "kl"])
    last = history[history.step == done - 1]["kl"].mean() if done else float("nan")
    lens.info = {"trained": True, "steps_asked": steps, "steps_done": done, "tokens_asked": asked,
                 "tokens_seen": seen, "short": seen < asked, "stopped": stopped, "seed": seed,
                 "batch_size": batch_size, "lr_scale": lr_scale, "momentum": momentum,
                 "weight_decay": weight_decay, "max_passes": max_passes, "final_train_kl": float(last)}
    if seen < asked:
        why = ("stopped" if stopped else
               f"the data ran out ({N} sequences x {max_passes} pass{'es' if max_passes > 1 else ''})")
        msg = (f"tuned lens trained on {seen} of the {asked} tokens asked ({done} of {steps} steps): {why}"
               + ("" if stopped else "; pass more data or raise max_passes"))
        warnings.warn(msg, UserWarning, stacklevel=2)
        mon.report(None, msg, force=True)
    return TunedLensFit(lens, history, steps, done, asked, seen, stopped)
