"""Running blocks one at a time: :class:`BlockRunner` embeds, runs any block on a residual ``(B, T, d)`` in any
order and reads out, on every model an adapter of :mod:`workbench.hooks` reads (a Hugging Face model's
decoder layers get their own extra arguments, captured in one cheap pass); the scoring helpers the depth
lab and early exit share (targets, tallies of correct tokens and loss, batches).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core import checks
from ...core.data import IGNORE
from ...hooks import Adapter, adapter
from ...residual.batch import _as_batch, _targets, _tokens

# ============================================================================ running blocks one at a time


def _read(model, name: str = "model") -> Adapter:
    """The adapter of ``model``, or a ``ValueError`` naming the argument when it has no residual stack."""
    try:
        return adapter(model)
    except TypeError as e:
        raise ValueError(f"{name}: {type(model).__name__} has no residual stack of blocks the workbench can run "
                         f"block by block ({e})") from None


@contextlib.contextmanager
def _inference(model: nn.Module):
    """Eval mode (switched only when the model is training: toggling walks every module) without gradients."""
    was = model.training
    if was:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was:
            model.train(True)


def _is_native(model) -> bool:
    from ...core.models import ResidualMLP, Transformer

    return isinstance(model, (ResidualMLP, Transformer))


class _Captured(Exception):
    """Raised at the final norm once every decoder layer's arguments are captured (ends the pass early)."""


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class BlockRunner:
    """Runs a residual model's blocks one at a time, in any order: ``h = begin(x)``, ``h = block(i, h)``,
    ``logits(h)``.

    Workbench models: ``begin`` is the model's embedding, ``block`` calls ``model.blocks[i]`` and ``logits``
    is ``readout(final_norm(h))``. Hugging Face models: ``begin`` runs the model once with every decoder
    layer replaced by a pass-through that records the layer's input and extra arguments (rotary
    embeddings, attention masks; the cache is off), stopping at the final norm; the first layer also runs
    for real, so the pass-through answers in the layer's own output format. ``block(i, h)`` then calls
    layer ``i`` with *its* captured arguments. The forwards are restored in ``finally``, also on error.
    Hooks of :func:`workbench.hooks.record` fire as in an ordinary forward.
    """

    def __init__(self, model, name: str = "model"):
        self.ad = _read(model, name)
        self.model = self.ad.model
        self.native = _is_native(self.model)
        self.n_layers = int(self.ad.n_layers)
        self._extra: list | None = None

    def batch(self, x, name: str = "x") -> torch.Tensor:
        """``x`` validated and batched for the model (token ids ``(B, T)`` or vectors ``(B, d_in)``)."""
        return _as_batch(self.ad, x, name)

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        """The residual entering block 0 for a batch from :meth:`batch`: ``(B, T, C)`` (vector models ``(B, C)``)."""
        if self.native:
            return self.model.embed(x)
        if self.n_layers == 0:
            raise ValueError("model: it has no blocks to run")
        blocks = [self.ad.block(i) for i in range(self.n_layers)]
        got: dict[int, tuple] = {}
        fmt: dict = {}

        def passthrough(i, original):
            def forward(*args, **kwargs):
                kw = dict(kwargs)
                h = args[0] if args else kw.pop("hidden_states")
                got[i] = (h, tuple(args[1:]), kw)
                if "tail" not in fmt:
                    out = original(*args, **kwargs)
                    fmt["tail"] = tuple(out[1:]) if isinstance(out, tuple) else None
                return h if fmt["tail"] is None else (h,) + fmt["tail"]
            return forward

        saved = [blk.__dict__.get("forward") for blk in blocks]
        stop = self.ad.final_norm().register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(_Captured()))
        try:
            for i, blk in enumerate(blocks):
                blk.forward = passthrough(i, blk.forward)
            with contextlib.suppress(_Captured):
                cfg = getattr(self.model, "config", None)
                if cfg is not None and hasattr(cfg, "use_cache"):
                    self.model(input_ids=x, use_cache=False)
                else:
                    self.ad.forward(x)
        finally:
            stop.remove()
            for blk, old in zip(blocks, saved):
                if old is None:
                    blk.__dict__.pop("forward", None)
                else:
                    blk.forward = old
        if len(got) != self.n_layers:
            raise ValueError(f"model: {len(got)} of its {self.n_layers} decoder layers ran in a forward; the "
                             "workbench runs blocks one at a time only when each runs once per forward")
        self._extra = [got[i][1:] for i in range(self.n_layers)]
        return got[0][0]

    def block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``i`` applied to the residual ``h`` (after :meth:`begin` of the same batch)."""
        if self.native:
            return self.model.blocks[i](h)
        args, kwargs = self._extra[i]
        return _first(self.ad.block(i)(h, *args, **kwargs))

    def apply(self, item, h: torch.Tensor) -> torch.Tensor:
        """One step of a sequence: a block index, or a tuple of indices run in parallel on ``h`` and averaged."""
        if isinstance(item, tuple):
            return torch.stack([self.block(i, h) for i in item]).mean(0)
        return self.block(item, h)

    def run(self, sequence, h: torch.Tensor) -> torch.Tensor:
        for item in sequence:
            h = self.apply(item, h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output logits ``(B, T, V)`` of a final residual (vector models ``(B, 1, K)``): final norm and readout."""
        out = self.ad.unembed(h)
        return out if out.dim() == 3 else out[:, None]


def _targets_for(run: BlockRunner, x: torch.Tensor, y, need: bool = True) -> torch.Tensor | None:
    """Targets ``(B, T)`` (``IGNORE`` unscored; vector models ``(B, 1)``): ``y``, or the next token of ``x``."""
    tgt = _targets(run.ad, x, y)
    if tgt is None and need:
        raise ValueError("y: a vector model needs labels (one per example) to be scored")
    return tgt


def _tally(run: "BlockRunner", h: torch.Tensor, tgt: torch.Tensor) -> dict:
    """Correct scored tokens, scored tokens and summed loss of a final residual ``h`` against ``tgt`` ``(B, T)``,
    reading out (final norm, readout) only the scored positions."""
    sel = tgt != IGNORE
    logits = run.ad.unembed(_tokens(h)[sel])
    t = tgt[sel]
    right = int((logits.argmax(-1) == t).sum())
    loss = float(F.cross_entropy(logits.float(), t, reduction="sum")) if len(t) else 0.0
    return {"correct": torch.tensor([right]), "scored": torch.tensor([len(t)]), "loss": torch.tensor([loss])}


def _acc_loss(parts: list[dict]) -> tuple[float, float]:
    c = sum(int(p["correct"].sum()) for p in parts)
    n = sum(int(p["scored"].sum()) for p in parts)
    s = sum(float(p["loss"].sum()) for p in parts)
    return (c / n, s / n) if n else (float("nan"), float("nan"))


def _chunks(n: int, batch_size: int | None):
    step = n if batch_size is None else batch_size
    for i in range(0, n, max(step, 1)):
        yield slice(i, min(i + step, n))


def _batch_size(batch_size) -> int | None:
    return None if batch_size is None else checks.check_int("batch_size", batch_size, 1)
