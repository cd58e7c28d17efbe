"""Skipping layers: the skipped x affected heat-map and the output change per skipped layer, computed from
cached block inputs (one suffix per skipped layer), and the depth score and its relation to task
difficulty.

Definitions: ``docs/definitions.md#skip-effects``, ``#local-skip``, ``#depth-score``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..hooks import Adapter, adapter, record
from .batch import (
    IGNORE,
    _as_batch,
    _check_batch_size,
    _chunks,
    _inference,
    _logits,
    _mask,
    _rel,
    _targets,
    _tensor,
    _tokens,
)
from .mixtures import _mixture_batch, _mixture_parts, _with_member, is_mixture

# ============================================================================ layer skipping


@dataclass
class SkipEffects:
    """Result of :func:`skip_effects`.

    ``heatmap``: ``skipped, affected, effect`` for every ``affected > skipped``, effect =
    mean over tokens of ``||d_l - d~_l|| / ||d_l||`` where ``d_l`` is layer ``l``'s whole-layer
    contribution ``y_l - x_l`` and ``d~_l`` the same with layer ``skipped`` replaced by the
    identity (mean, or max with ``reduce="max"``). ``output``: ``skipped, kl, l2, top1_changed, loss,
    loss_change`` per skipped layer: KL(p || p_skipped) of the output distribution,
    ``l2 = ||p - p_skipped||_2``, share of tokens whose top-1 changes, and
    the loss with the layer skipped and its change (NaN without targets).

    For a logit mixture both tables start with a ``member`` column, ``n_layers`` is the deepest
    member's depth and ``member_layers[k]`` member ``k``'s; :meth:`member` gives one member's
    result in the single-model form.
    """

    heatmap: pd.DataFrame
    output: pd.DataFrame
    n_layers: int = 0
    member_layers: list[int] | None = None

    def member(self, k: int) -> "SkipEffects":
        """Member ``k``'s rows of a mixture's result, without the ``member`` column."""
        if self.member_layers is None:
            raise ValueError("not a mixture's result: it has no members")
        checks.check_int("member", k, 0, len(self.member_layers) - 1)

        def pick(df):
            return df[df["member"] == k].drop(columns="member").reset_index(drop=True)
        return SkipEffects(pick(self.heatmap), pick(self.output), self.member_layers[k])

    def matrix(self, member: int | None = None) -> np.ndarray:
        """``(L, L)`` array ``[skipped, affected]`` (NaN where ``affected <= skipped``); a mixture needs ``member``."""
        if self.member_layers is not None:
            if member is None:
                raise ValueError("a mixture's skip effects have one matrix per member: pass member=k")
            return self.member(member).matrix()
        m = np.full((self.n_layers, self.n_layers), np.nan)
        for r in self.heatmap.itertuples():
            m[int(r.skipped), int(r.affected)] = r.effect
        return m


def skip_effects(model: nn.Module, x, y=None, mask=None, batch_size: int | None = 256, reduce: str = "mean",
                 from_position: int | None = None, local: bool = False) -> SkipEffects:
    """Skip each layer in turn (identity) and measure how later layers and the output change.

    Definitions as in Csordas et al. (2025); see :class:`SkipEffects` and
    ``docs/definitions.md#skip-effects``. ``y``: targets for the loss (default for sequences: the
    next token of ``x``). ``mask`` restricts the token reduction. ``reduce``: ``"mean"`` or
    ``"max"`` over tokens (the paper's figures use the max). ``from_position`` (``1 .. T-1``):
    the skipped layer is the identity only at positions ``>= from_position`` (never at the first
    token) and the reduction runs over those positions (earlier ones cannot change).
    ``local=True``: remove only the skipped layer's own contribution ``d_s`` from the residual that
    each later layer reads, every later layer computed on the *original* stream minus ``d_s``, so
    the effect on layer ``l`` is its direct dependence on ``d_s`` (not mediated by layers between);
    the output columns then compare ``unembed(h_L - d_s)`` with the output.
    Output columns: ``skipped, kl, l2, top1_changed, loss, loss_change`` with ``l2`` =
    ``||softmax - softmax'||_2`` per token. Cost: one base forward, then per skipped layer ``s`` only the
    blocks after ``s`` and the readout (the blocks before ``s`` replay the base forward's outputs): at
    most L + 1 forwards, about ``L / 2`` block passes fewer.

    For a :class:`~workbench.compose.LogitMixture` (either mode), each member's layers are
    skipped in turn inside the mixture: the heat-map is within that member's residual stream and
    the output columns measure the change of the *mixture's* distribution. Both tables get a
    leading ``member`` column (see :class:`SkipEffects`). ``local`` is refused for mixtures.
    """
    _check_batch_size(batch_size)
    checks.check_choice("reduce", reduce, ["mean", "max"])
    checks.check_bool("local", local)
    if from_position is not None:
        checks.check_int("from_position", from_position, 1)
    if is_mixture(model):
        if local:
            raise ValueError("local=True needs a single model; pass one of the mixture's .members")
        ads = [adapter(m) for m in model.members]
        heats, outs = [], []
        with _inference(model):
            xb = _mixture_batch(ads, x)
            yy = _targets(ads[0], xb, y)
            for k, ad in enumerate(ads):
                res = _skip(ad, lambda xs: _mixture_parts(model, xs)[0], xb, yy, mask, batch_size, reduce,
                            from_position, False)
                heats.append(_with_member(res.heatmap, k))
                outs.append(_with_member(res.output, k))
        layers = [ad.n_layers for ad in ads]
        return SkipEffects(pd.concat(heats, ignore_index=True), pd.concat(outs, ignore_index=True),
                           max(layers), layers)
    ad = adapter(model)
    with _inference(ad.model):
        x = _as_batch(ad, x)
        return _skip(ad, lambda xs: _logits(ad, xs), x, _targets(ad, x, y), mask, batch_size, reduce,
                     from_position, local)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_first(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


def _block_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _replace_input(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Feed ``block`` ``fn(its input)`` instead of its input (positional or ``hidden_states``)."""
    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs
    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _replace_output(block: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Replace ``block``'s (first) output by ``fn(input, output)``."""
    def post(module, args, kwargs, output):
        return _with_first(output, fn(_block_input(args, kwargs), _first(output)))
    h = block.register_forward_hook(post, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _block_outputs(ad: Adapter):
    """``{layer: output}``: every block's whole output (tensor or tuple, as the model returns it) of the
    forwards run inside the context; what :func:`_cached_blocks` replays."""
    outs: dict = {}
    handles = []
    try:
        for l in range(ad.n_layers):
            handles.append(ad.block(l).register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o)))
        yield outs
    finally:
        for h in handles:
            h.remove()


def _distinct_blocks(ad: Adapter) -> bool:
    """Whether every layer is its own module (a block object used twice cannot be replayed per layer)."""
    return len({id(ad.block(l)) for l in range(ad.n_layers)}) == ad.n_layers


@contextlib.contextmanager
def _cached_blocks(ad: Adapter, outputs: dict):
    """Blocks that do not run: block ``l`` returns ``outputs[l](input)`` instead of computing.

    A block whose input is what it was in a recorded forward returns that forward's output
    (:func:`_block_outputs`), so an intervention at layer ``s`` runs only the blocks after ``s``
    (the prefix of the network is the same; its residuals are cached, not recomputed). The block's
    hooks still fire, on the replayed output. The instance's own ``forward`` is restored on exit."""
    saved = {}
    try:
        for l, make in outputs.items():
            block = ad.block(l)
            saved[l] = block.__dict__.get("forward")

            def stub(*args, make=make, **kwargs):
                return make(_block_input(args, kwargs))
            block.forward = stub
        yield
    finally:
        for l, old in saved.items():
            block = ad.block(l)
            if old is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


class _Stop(Exception):
    """Raised by a hook to end a forward whose remaining modules are not needed."""


def _run_blocks(ad: Adapter, forward: Callable[[torch.Tensor], object], x: torch.Tensor) -> torch.Tensor:
    """Run ``forward(x)`` up to the end of the last block and return the final residual (not detached);
    the final norm and readout do not run. Hooks registered before the call fire as usual."""
    final = []

    def stop(module, args, output):
        final.append(_first(output))
        raise _Stop
    h = ad.block(ad.n_layers - 1).register_forward_hook(stop)
    try:
        forward(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not final:
        raise RuntimeError(f"the forward of {type(ad.model).__name__} never ran its last block")
    return _tokens(final[0])


def _readout_is_unembed(ad: Adapter, final: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``ad.unembed`` of the final residual gives the model's own logits on this input (then
    an analysis may read out only the positions it needs); False for a head that does more (e.g. a
    logit soft-cap the adapter does not know)."""
    got = ad.unembed(final).float()
    want = logits.float()
    if got.shape != want.shape:
        return False
    tol = 64 * torch.finfo(logits.dtype).eps * (1.0 + float(want.abs().max()))
    return bool(((got - want).abs() <= tol).all())


def _skip_layer(ad: Adapter, layer: int, from_position: int | None):
    """Block ``layer`` as the identity (at positions ``>= from_position`` when given)."""
    if from_position is None:
        return ad.skip(layer)

    def keep_early(h, out):
        out = out.clone()
        out[:, from_position:] = h[:, from_position:]
        return out
    return _replace_output(ad.block(layer), keep_early)


def _skipped_output(cached, from_position: int | None):
    """Replayed output of a skipped block: its input (the identity), at positions ``>= from_position``
    only when given (earlier positions keep the block's recorded output)."""
    def make(h):
        if from_position is None:
            return _with_first(cached, h)
        out = _first(cached).clone()
        out[:, from_position:] = h[:, from_position:]
        return _with_first(cached, out)
    return make


def _reduce(v: torch.Tensor, mask: torch.Tensor | None, how: str) -> float:
    return _masked_mean(v, mask) if how == "mean" else _masked_max(v, mask)


def _masked_max(v: torch.Tensor, mask: torch.Tensor | None) -> float:
    v = v.double()
    ok = ~torch.isnan(v)
    if mask is not None:
        ok &= mask
    return float(torch.where(ok, v, torch.full_like(v, -float("inf"))).max()) if ok.any() else float("nan")


OUT_CHUNK = 1 << 20   # elements per CPU thread of the (rows, V) output block compared at once (cache-sized)


def _out_base(base: torch.Tensor, tgt: torch.Tensor | None) -> dict:
    """What every skipped run is compared with, once per batch: the base log-probabilities and
    probabilities ``(N, V)`` (``N = B T``), their top-1 ids ``(N,)``, the targets and the loss ``(B, T)``."""
    shape, V = base.shape[:2], base.shape[-1]
    logp = base.float().log_softmax(-1)
    return {"shape": shape, "logp": logp.reshape(-1, V), "p": logp.exp().reshape(-1, V),
            "top": logp.argmax(-1).reshape(-1), "tgt": None if tgt is None else tgt.reshape(-1),
            "loss": _token_loss(logp, tgt)}


def _out_effects(base: dict, logits: torch.Tensor) -> dict:
    """Per token ``(B, T)``: ``kl`` = KL(p || q), ``l2`` = ``||p - q||_2``, ``top1_changed`` and ``loss`` of
    ``q = softmax(logits)`` against the base output ``p`` (:func:`_out_base`), and ``base_loss``.

    On the CPU formed ``OUT_CHUNK`` elements per thread at a time, so that the temporaries of each
    operation stay in cache (the same per-row formulas; elsewhere in one block)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    N, dev = z.shape[0], z.device
    rows = max(1, OUT_CHUNK * torch.get_num_threads() // V) if dev.type == "cpu" else max(N, 1)
    kl, l2 = torch.empty(N, device=dev), torch.empty(N, device=dev)
    changed, loss = torch.empty(N, device=dev), torch.full((N,), float("nan"), device=dev)
    tgt = base["tgt"]
    for r0 in range(0, N, rows):
        r = slice(r0, min(r0 + rows, N))
        logq = z[r].float().log_softmax(-1)
        p = base["p"][r]
        kl[r] = torch.sub(base["logp"][r], logq).mul_(p).sum(-1)
        changed[r] = (logq.argmax(-1) != base["top"][r]).float()
        if tgt is not None:
            loss[r] = F.nll_loss(logq, tgt[r], ignore_index=IGNORE, reduction="none")
        l2[r] = logq.exp_().sub_(p).norm(dim=-1)
    if tgt is not None:
        loss = torch.where(tgt == IGNORE, torch.full_like(loss, float("nan")), loss)
    shape = base["shape"]
    return {"kl": kl.reshape(shape), "l2": l2.reshape(shape), "top1_changed": changed.reshape(shape),
            "loss": loss.reshape(shape), "base_loss": base["loss"]}


def _skip(ad: Adapter, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, yy, mask,
          batch_size: int | None, reduce: str = "mean", from_position: int | None = None,
          local: bool = False) -> SkipEffects:
    """Skip each of ``ad``'s layers; ``forward(x)`` gives the output logits ``(B, T, V)`` to compare
    (the model's own, or a mixture's that runs ``ad``'s model inside it).

    Cost: the base forward, then for skipped layer ``s`` only the blocks after ``s`` and the readout
    (blocks ``< s`` replay the base forward's outputs: :func:`_cached_blocks`); ``local`` runs no
    readout (its output is ``unembed(h_L - d_s)``) and no forward at all for the last layer."""
    L = ad.n_layers
    effects: dict = {}
    outs: dict = {}
    T = x.shape[1] if ad.family == "transformer" else 1
    if from_position is not None:
        if ad.family != "transformer":
            raise ValueError("from_position needs a sequence model (token positions); this model takes vectors")
        checks.check_int("from_position", from_position, 1, T - 1)
    m = _mask(mask, (x.shape[0], T), ad.device)
    if from_position is not None:
        late = torch.zeros(x.shape[0], T, dtype=torch.bool, device=ad.device)
        late[:, from_position:] = True
        m = late if m is None else (m & late)
    names = ["blocks.*.resid_pre", "blocks.*.resid_post"]
    replay = L > 0 and _distinct_blocks(ad)
    own_skip = type(ad).skip is not Adapter.skip      # an adapter's own skip is used as it is
    for sl in _chunks(len(x), batch_size):
        if L == 0:
            break
        with record(ad, names=names) as cache, _block_outputs(ad) as block_out:
            base = forward(x[sl])
        pre = [cache[f"blocks.{l}.resid_pre"] for l in range(L)]
        final = cache[f"blocks.{L - 1}.resid_post"]
        d = [_tokens(cache[f"blocks.{l}.resid_post"]).float() - _tokens(pre[l]).float() for l in range(L)]
        raw_d = [cache[f"blocks.{l}.resid_post"] - pre[l] for l in range(L)]
        tgt = None if yy is None else yy[sl].reshape(base.shape[:2])
        compare = _out_base(base, tgt)
        del base
        for s in range(L):
            with contextlib.ExitStack() as stack:
                cache = stack.enter_context(record(ad, names=names, layers=range(s + 1, L)))
                if local:
                    ds = raw_d[s]
                    if from_position is not None:
                        ds = ds.clone()
                        ds[:, :from_position] = 0
                    for l in range(s + 1, L):
                        stack.enter_context(_replace_input(ad.block(l), lambda h, l=l, ds=ds: pre[l] - ds))
                    if s + 1 < L:    # blocks 0 .. s: their outputs are replaced before anyone reads them
                        if replay:
                            stack.enter_context(_cached_blocks(
                                ad, {l: (lambda h, o=block_out[l]: o) for l in range(s + 1)}))
                        _run_blocks(ad, forward, x[sl])
                else:
                    if replay:
                        prefix = {l: (lambda h, o=block_out[l]: o) for l in range(s)}
                        if own_skip and from_position is None:
                            stack.enter_context(_skip_layer(ad, s, None))
                        else:
                            prefix[s] = _skipped_output(block_out[s], from_position)
                        stack.enter_context(_cached_blocks(ad, prefix))
                    else:
                        stack.enter_context(_skip_layer(ad, s, from_position))
                    skipped = forward(x[sl])
                for l in range(s + 1, L):
                    dt = _tokens(cache[f"blocks.{l}.resid_post"]).float() - _tokens(cache[f"blocks.{l}.resid_pre"]).float()
                    effects.setdefault((s, l), []).append(_rel(d[l] - dt, d[l]))
            if local:
                skipped = ad.unembed(final - ds)
                skipped = skipped if skipped.dim() == 3 else skipped[:, None]
            for stat, v in _out_effects(compare, skipped).items():
                outs.setdefault((s, stat), []).append(v)
            del skipped
    heat = [{"skipped": s, "affected": l, "effect": _reduce(torch.cat(v), m, reduce)} for (s, l), v in effects.items()]
    rows = {}
    for (s, stat), v in outs.items():
        rows.setdefault(s, {"skipped": s})[stat] = _reduce(torch.cat(v), m, reduce)
    out = pd.DataFrame(list(rows.values()), columns=["skipped", "kl", "l2", "top1_changed", "loss", "base_loss"])
    out["loss_change"] = out["loss"] - out["base_loss"]
    out = out.drop(columns="base_loss")
    return SkipEffects(pd.DataFrame(heat, columns=["skipped", "affected", "effect"]), out, L)




def _token_loss(logp: torch.Tensor, tgt: torch.Tensor | None) -> torch.Tensor:
    if tgt is None:
        return torch.full(logp.shape[:2], float("nan"), device=logp.device)
    loss = F.nll_loss(logp.reshape(-1, logp.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                      reduction="none").reshape(tgt.shape)
    return torch.where(tgt == IGNORE, torch.full_like(loss, float("nan")), loss)


def _masked_mean(v: torch.Tensor, mask: torch.Tensor | None) -> float:
    v = v.double()
    ok = ~torch.isnan(v)
    if mask is not None:
        ok &= mask
    return float(torch.where(ok, v, torch.zeros_like(v)).sum() / ok.sum()) if ok.any() else float("nan")


def depth_score(effects, x=None, metric: str = "l2", **skip_kwargs) -> float:
    """Centre of mass ``sum_l l m_l / sum_l m_l`` of the skip effect on the output (layers ``0 .. L-1``).

    ``effects``: a :class:`SkipEffects`, its ``output`` table, or a model (then ``x`` is required and
    :func:`skip_effects` runs with ``skip_kwargs``). ``metric``: ``"l2"`` (default: the paper's
    ``||softmax - softmax'||_2``) or ``"kl"``. NaN when every effect is 0 --
    ``docs/definitions.md#depth-score``.
    """
    checks.check_choice("metric", metric, ["l2", "kl"])
    if isinstance(effects, SkipEffects):
        out = effects.output
    elif isinstance(effects, pd.DataFrame):
        out = effects
    else:
        if x is None:
            raise ValueError("x is required when depth_score is given a model")
        out = skip_effects(effects, x, **skip_kwargs).output
    if "member" in out.columns:
        raise ValueError("a mixture's skip effects have one depth score per member: pass effects.member(k)")
    missing = {"skipped", metric} - set(out.columns)
    if missing:
        raise ValueError(f"effects must have columns skipped and {metric}, missing {sorted(missing)}")
    m = out[metric].to_numpy(dtype=float).clip(min=0)
    l = out["skipped"].to_numpy(dtype=float)
    return float((l * m).sum() / m.sum()) if m.sum() > 0 else float("nan")


def depth_vs_difficulty(model: nn.Module, sets: dict, metric: str = "l2", max_examples: int = 64,
                        reduce: str = "mean", batch_size: int | None = 256) -> pd.DataFrame:
    """Depth score per problem set: ``difficulty, n_examples, depth_score`` (one row per entry of ``sets``).

    ``sets``: ``{difficulty: inputs}``, inputs a token batch ``(B, T)`` or a
    :class:`workbench.data.Dataset` (its validation split; the token average is restricted to the
    scored positions ``y_val != IGNORE``), e.g. ``{h: wb.data.load("khop", hops=h) for h in (1, 2, 3)}``
    or modadd sets of growing ``p``. ``max_examples`` caps each set (first examples).
    """
    if not isinstance(sets, dict) or not sets:
        raise ValueError(f"sets must be a non-empty dict {{difficulty: inputs}}, got {type(sets).__name__}")
    checks.check_int("max_examples", max_examples, 1)
    rows = []
    for diff, inputs in sets.items():
        mask = None
        if hasattr(inputs, "x_val") and hasattr(inputs, "y_val"):
            xs, ys = inputs.x_val[:max_examples], inputs.y_val[:max_examples]
            mask = (ys != IGNORE) if ys.shape == xs.shape else None
        else:
            xs = _tensor(f"sets[{diff!r}]", inputs)[:max_examples]
        res = skip_effects(model, xs, mask=mask, reduce=reduce, batch_size=batch_size)
        rows.append((diff, int(len(xs)), depth_score(res, metric=metric)))
    return pd.DataFrame(rows, columns=["difficulty", "n_examples", "depth_score"])
