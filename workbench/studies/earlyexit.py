"""Early exit: LayerSkip's training recipe, the exit-layer accuracy curve and self-speculative decoding.

==============================  ==================================================================
:func:`dropout_rates`           LayerSkip's layer-dropout rate per block, rising with depth
:class:`LayerSkipLoss`          a ``loss_fn`` for :func:`workbench.train`: layer dropout plus the early-exit loss
:func:`train_layerskip`         :func:`workbench.train` with that loss (the recipe)
:func:`exit_curve`              accuracy and loss when the model stops after ``e`` blocks (shared head)
:func:`speculate`               greedy self-speculative decoding of one prompt: draft with ``E`` blocks, verify with all
:func:`acceptance_curve`        acceptance rate (and tokens per verifying forward) against the exit layer
==============================  ==================================================================

Elhoushi et al. (2024), "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding". An
early exit after ``e`` blocks reads the residual ``h_e`` through the model's own final norm and readout
(the shared head, as LayerSkip; the logit lens of :mod:`workbench.residual`). Training needs a workbench
model; the curves and decoding read any model :class:`workbench.depthlab.BlockRunner` runs (the Hugging
Face families too). ``docs/definitions.md#layerskip``, ``#self-speculation``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core import monitor as _monitor
from .depthlab.pruning import _Stop
from .depthlab.runner import BlockRunner, _acc_loss, _chunks, _inference, _is_native, _tally, _targets_for
from ..residual.batch import _facts
from ..core.training import loss_and_correct

__all__ = ["dropout_rates", "LayerSkipLoss", "train_layerskip", "exit_curve", "SpecResult", "speculate",
           "acceptance_curve"]

MAX_NEW = 4096


def dropout_rates(n_layers: int, p_max: float) -> list[float]:
    """LayerSkip's layer-dropout rate of block ``l`` (0-based): ``p_l = p_max (exp(l ln 2 / (L - 1)) - 1)``.

    0 at the first block, ``p_max`` at the last, rising exponentially (the paper's ``D(l)``, without its
    time curriculum: ``S(t) = 1``). One block: ``[0]``. ``docs/definitions.md#layerskip``.
    """
    n_layers = checks.check_int("n_layers", n_layers, 0, 256)
    p_max = checks.check_float("p_max", p_max, 0.0, 1.0, hi_open=True)
    if n_layers <= 1:
        return [0.0] * n_layers
    return [p_max * (math.exp(l * math.log(2) / (n_layers - 1)) - 1) for l in range(n_layers)]


class LayerSkipLoss:
    """LayerSkip's training loss as a ``loss_fn(model, x, y)`` for :func:`workbench.train` (workbench models).

    Forward with layer dropout: each example skips block ``l`` (its residual passes unchanged) with
    probability ``p_l`` of :func:`dropout_rates` (seeded, drawn per example and block). Early-exit loss
    with a rotation (LayerSkip's Hugging Face recipe): call ``t`` exits early after ``e = 1 + (t mod (L-1))``
    blocks and the loss is ``(s CE(head(h_e)) + CE(head(h_L))) / (1 + s)``, ``head`` the shared final norm
    and readout, ``s = exit_scale``; one block: the last exit only. In eval mode (``model.training`` False)
    nothing is dropped. ``docs/definitions.md#layerskip``.
    """

    def __init__(self, p_max: float = 0.1, exit_scale: float = 1.0, seed: int = 0):
        self.p_max = checks.check_float("p_max", p_max, 0.0, 1.0, hi_open=True)
        self.exit_scale = checks.check_float("exit_scale", exit_scale, 0.0, 100.0)
        self.seed = checks.check_seed("seed", seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step = 0

    def exit_layer(self, n_layers: int) -> int:
        """The early exit of the current call (blocks run before it); ``n_layers`` for a one-block model."""
        return n_layers if n_layers < 2 else 1 + self.step % (n_layers - 1)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not _is_native(model):
            raise ValueError(f"model: the LayerSkip loss trains a workbench model, got {type(model).__name__}")
        L = len(model.blocks)
        e = self.exit_layer(L)
        rates = dropout_rates(L, self.p_max)
        h = model.embed(x)
        exit_h = h if e == 0 else None
        for l, block in enumerate(model.blocks):
            out = block(h)
            if model.training:   # one draw per example and block, every block (the stream does not depend on p)
                drop = (torch.rand(h.shape[0], generator=self.generator) < rates[l]).to(h.device)
                h = torch.where(drop.view(-1, *([1] * (h.dim() - 1))), h, out)
            else:
                h = out
            if l + 1 == e:
                exit_h = h
        self.step += 1
        last = loss_and_correct(model.unembed(h), y)[0]
        if e >= L or self.exit_scale == 0:
            return last
        early = loss_and_correct(model.unembed(exit_h), y)[0]
        return (self.exit_scale * early + last) / (1 + self.exit_scale)


def train_layerskip(model: nn.Module, dataset, config=None, p_max: float = 0.1, exit_scale: float = 1.0,
                    seed: int = 0, callbacks=(), name: str | None = None, monitor=None):
    """Train a workbench model in place with the LayerSkip recipe (:class:`LayerSkipLoss`); returns the Run.

    Everything else is :func:`workbench.train` (evaluation reports the plain loss of the full model).
    ``run.meta["layerskip"]`` records ``p_max``, ``exit_scale``, ``seed`` and the rotation.
    """
    from ..core.training import train

    if not _is_native(model):
        raise ValueError(f"model: train_layerskip trains a workbench model, got {type(model).__name__}")
    mon = _monitor.resolve(monitor)
    loss = LayerSkipLoss(p_max, exit_scale, seed)
    run = train(model, dataset, config, callbacks=[_Stop(mon), *callbacks], loss_fn=loss, name=name)
    run.meta = {**run.meta, "layerskip": {"p_max": loss.p_max, "exit_scale": loss.exit_scale, "seed": loss.seed,
                                          "curriculum": "rotation", "dropout": "exp(l ln2/(L-1)) - 1"}}
    return run


def exit_curve(model: nn.Module, x, y=None, batch_size: int | None = 256) -> pd.DataFrame:
    """Accuracy and loss of the model stopped after ``e`` blocks, ``e = 0 .. L``, through its own head.

    ``exit = e`` reads ``h_e`` (``e = 0``: the embeddings; ``e = L``: the model's output) with the final
    norm and readout. ``y``: targets ``(B, T)`` with ``IGNORE`` (default for sequences: the next token) or
    labels ``(B,)``. One forward. Returns ``exit, acc, loss``. ``docs/definitions.md#layerskip``.
    """
    run = BlockRunner(model)
    L = run.n_layers
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)
    parts: dict = {e: [] for e in range(L + 1)}
    with _inference(run.model):
        xb = run.batch(x)
        tgt = _targets_for(run, xb, y)
        for sl in _chunks(len(xb), batch_size):
            h = run.begin(xb[sl])
            for e in range(L + 1):
                if e:
                    h = run.block(e - 1, h)
                parts[e].append(_tally(run, h, tgt[sl]))
    rows = [(e, *_acc_loss(parts[e])) for e in range(L + 1)]
    return pd.DataFrame(rows, columns=["exit", "acc", "loss"])


@dataclass
class SpecResult:
    """One prompt decoded by :func:`speculate`: ``tokens`` the new token ids; ``drafted`` and ``accepted``
    draft tokens; ``verifications`` full-model forwards; ``draft_forwards`` early-exit forwards."""

    tokens: list = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    draft_forwards: int = 0

    @property
    def acceptance(self) -> float:
        """``accepted / drafted`` (NaN when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else float("nan")


def _next_tokens(run: BlockRunner, seq: torch.Tensor, n_blocks: int, last: int) -> torch.Tensor:
    """Greedy next tokens at the ``last`` final positions of ``seq`` ``(1, T)``, reading ``h`` after ``n_blocks``."""
    h = run.run(range(n_blocks), run.begin(seq))
    return run.logits(h)[0, -last:].argmax(-1)


def _check_prompt(run: BlockRunner, prompt, n_new: int) -> torch.Tensor:
    p = run.batch(prompt, "prompt")
    if p.shape[0] != 1:
        raise ValueError(f"prompt must be one sequence of token ids (T,) or (1, T), got shape {tuple(p.shape)}")
    context = _facts(run.ad)[1]
    if context is not None and p.shape[1] + n_new > context:
        raise ValueError(f"n_new: the prompt's {p.shape[1]} tokens plus {n_new} new ones exceed the model's context "
                         f"of {context}; n_new must be at most {context - p.shape[1]}")
    return p


def speculate(model: nn.Module, prompt, exit_layer: int, n_new: int = 32, n_draft: int = 4) -> SpecResult:
    """Greedy self-speculative decoding (LayerSkip's ``self_speculation_generator``) of one prompt.

    Each round drafts ``k = min(n_draft, n_new - done - 1)`` tokens greedily with the first ``exit_layer``
    blocks and the shared head, then runs the full model once on the sequence plus the draft: the longest
    prefix of the draft that equals the full model's greedy tokens is accepted, plus one token of the full
    model. The output equals plain greedy decoding with the full model. ``prompt`` plus ``n_new`` tokens
    must fit the context (no key/value cache: every forward reads the whole sequence).
    ``docs/definitions.md#self-speculation``.
    """
    run = BlockRunner(model)
    L = run.n_layers
    exit_layer = checks.check_int("exit_layer", exit_layer, 1, max(L, 1))
    n_new = checks.check_int("n_new", n_new, 1, MAX_NEW)
    n_draft = checks.check_int("n_draft", n_draft, 1, 64)
    res = SpecResult()
    with _inference(run.model):
        seq = _check_prompt(run, prompt, n_new)
        while len(res.tokens) < n_new:
            k = min(n_draft, n_new - len(res.tokens) - 1)
            draft = seq
            for _ in range(k):
                nxt = _next_tokens(run, draft, exit_layer, 1)
                draft = torch.cat([draft, nxt[None]], 1)
                res.draft_forwards += 1
            verified = _next_tokens(run, draft, L, k + 1)             # (k + 1,): the full model's greedy tokens
            res.verifications += 1
            proposed = draft[0, seq.shape[1]:]
            match = int((proposed == verified[:k]).long().cumprod(0).sum()) if k else 0
            take = torch.cat([proposed[:match], verified[match:match + 1]])
            res.tokens += take.tolist()
            res.drafted += k
            res.accepted += match
            seq = torch.cat([seq, take[None]], 1)
    res.tokens = res.tokens[:n_new]
    return res


def _greedy(run: BlockRunner, prompt: torch.Tensor, n_new: int) -> list[int]:
    seq, out = prompt, []
    for _ in range(n_new):
        nxt = _next_tokens(run, seq, run.n_layers, 1)
        out.append(int(nxt[0]))
        seq = torch.cat([seq, nxt[None]], 1)
    return out


def acceptance_curve(model: nn.Module, prompts, exits=None, n_new: int = 24, n_draft: int = 4,
                     check: bool = True, monitor=None) -> pd.DataFrame:
    """Self-speculative decoding's acceptance rate against the exit layer, over ``prompts``.

    ``prompts``: token ids ``(P, T)`` (or a list of ``(T,)`` sequences); ``exits``: exit layers (default
    ``1 .. L``). Per exit: ``acceptance = accepted / drafted`` summed over prompts, ``tokens_per_verify``
    (new tokens per full-model forward: 1 without speculation), and with ``check`` ``matches_greedy``
    (every prompt's output equals plain greedy decoding with the full model). Returns ``exit, acceptance,
    accepted, drafted, tokens_per_verify, matches_greedy``. ``docs/definitions.md#self-speculation``.
    """
    mon = _monitor.resolve(monitor)
    run = BlockRunner(model)
    L = run.n_layers
    checks.check_bool("check", check)
    if L == 0:
        raise ValueError("model: self-speculation needs at least one block, got n_layers = 0")
    exits = list(range(1, L + 1)) if exits is None else [checks.check_int("exits[]", e, 1, L) for e in exits]
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        plist = list(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts:
        plist = list(prompts)
    else:
        raise ValueError("prompts must be token ids (P, T) or a non-empty list of (T,) sequences")
    with _inference(run.model):
        plist = [_check_prompt(run, p, checks.check_int("n_new", n_new, 1, MAX_NEW)) for p in plist]
        greedy = [_greedy(run, p, n_new) for p in plist] if check else None
    rows = []
    for j, e in enumerate(exits):
        if mon.stopped:
            break
        acc = drafted = verifs = 0
        same = True
        for i, p in enumerate(plist):
            r = speculate(model, p, e, n_new, n_draft)
            acc, drafted, verifs = acc + r.accepted, drafted + r.drafted, verifs + r.verifications
            if check:
                same = same and r.tokens == greedy[i]
        rows.append((e, acc / drafted if drafted else float("nan"), acc, drafted, len(plist) * n_new / verifs,
                     same if check else None))
        mon.report((j + 1) / len(exits), f"exit {e}")
    return pd.DataFrame(rows, columns=["exit", "acceptance", "accepted", "drafted", "tokens_per_verify",
                                       "matches_greedy"])
