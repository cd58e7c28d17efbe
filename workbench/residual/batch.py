"""What every residual analysis shares: the model in inference mode, inputs as a batch, next-token
targets, masks, per-token tables, norms and cosines, and reading the residual stream with its final
logits.
"""
from __future__ import annotations

import contextlib
import numbers

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..core import checks
from ..core.data import IGNORE
from ..hooks import Adapter, record

EPS = 1e-6


# ============================================================================ helpers


def _logits(ad: Adapter, x: torch.Tensor) -> torch.Tensor:
    out = ad.forward(x)
    out = getattr(out, "logits", out)
    return out if out.dim() == 3 else out[:, None]


@contextlib.contextmanager
def _inference(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _tensor(name: str, value) -> torch.Tensor:
    """``value`` as a tensor without changing its dtype (lists and numpy arrays keep theirs)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)) or np.isscalar(value):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            pass
    raise ValueError(f"{name} must be a tensor (or an array of numbers), got {type(value).__name__}")


def _facts(ad: Adapter) -> tuple[int | None, int | None, int | None]:
    """``(vocab_size, context, d_in)`` of the model behind ``ad`` (None where it has no such bound)."""
    cfg = getattr(ad.model, "config", None)
    vocab = getattr(cfg, "vocab_size", None) if ad.family == "transformer" else None
    context = (getattr(cfg, "context", None) or getattr(cfg, "n_positions", None)
               or getattr(cfg, "max_position_embeddings", None)) if ad.family == "transformer" else None
    d_in = getattr(cfg, "d_in", None) if ad.family == "mlp" else None
    return vocab, context, d_in


def _out_size(ad: Adapter) -> int:
    """Classes or vocabulary size: the rows of the readout."""
    return int(ad.readout()[0].shape[0])


def _as_batch(ad: Adapter, x, name: str = "x") -> torch.Tensor:
    """Validate and batch the input: token ids ``(B, T)`` in the vocabulary (at most the context) for
    Transformers, real vectors ``(B, d_in)`` for residual MLPs; never rounded or cast across kinds."""
    x = _tensor(name, x)
    vocab, context, d_in = _facts(ad)
    if ad.family == "transformer":
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer token ids for a Transformer (vector inputs belong to an "
                             f"MLP), got dtype {x.dtype}")
        checks.check_tokens(name, x, vocab)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must be token ids (B, T) or (T,) with B, T >= 1, got shape {tuple(x.shape)}")
        if context is not None and x.shape[1] > context:
            raise ValueError(f"{name} must have at most the model's context of {context} positions, got {x.shape[1]}")
        x = x.long()
    else:
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be real floating-point vectors for an MLP (token ids belong to a "
                             f"Transformer), got dtype {x.dtype}")
        checks.check_features(name, x)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[0] < 1 or (d_in is not None and x.shape[1] != d_in):
            want = d_in if d_in is not None else "d_in"
            raise ValueError(f"{name} must be vectors (B, {want}) or ({want},) with B >= 1, got shape {tuple(x.shape)}")
        x = x.float()
    return x.to(ad.device)


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        checks.check_int("batch_size", batch_size, 1)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """Activations as ``(B, T, C)``: vector models get ``T = 1``."""
    return t[:, None] if t.dim() == 2 else t


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.float().norm(dim=-1)


def _rel(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return _norm(num) / _norm(den).clamp_min(EPS)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (_norm(a).clamp_min(EPS) * _norm(b).clamp_min(EPS))


def _chunks(n: int, batch_size: int | None):
    step = n if batch_size is None else batch_size   # validated by the public functions (>= 1)
    for i in range(0, n, max(step, 1)):
        yield slice(i, min(i + step, n))


def next_token_targets(x: torch.Tensor) -> torch.Tensor:
    """Targets for language modelling on ``x`` itself: ``y[:, t] = x[:, t+1]``, last position ignored."""
    y = torch.full_like(x, IGNORE)
    y[:, :-1] = x[:, 1:]
    return y


def _targets(ad: Adapter, x: torch.Tensor, y) -> torch.Tensor | None:
    if y is None:
        return next_token_targets(x) if ad.family == "transformer" else None
    y = checks.check_labels("y", _tensor("y", y), _out_size(ad), ignore=IGNORE)
    if y.dim() == x.dim() - 1 and ad.family == "transformer":
        y = y[None]
    want = tuple(x.shape) if ad.family == "transformer" else (x.shape[0],)
    if tuple(y.shape) != want:
        raise ValueError(f"y must have one target per {'token' if ad.family == 'transformer' else 'example'} "
                         f"of x, shape {want}, got {tuple(y.shape)}")
    return y.to(ad.device).long().reshape(x.shape[0], -1)


def _table(per_token: dict, index_names: list[str], stats: list[str], mask: torch.Tensor | None,
           per_position: bool) -> pd.DataFrame:
    """Average ``{(*index, stat): (N, T) tensor}`` over tokens (or over examples per position).

    NaN entries (e.g. unscored positions of a loss) and tokens outside ``mask`` are left out.
    """
    keys = list(dict.fromkeys(k[:-1] for k in per_token))
    cols = index_names + (["position"] if per_position else []) + stats
    rows = []
    for key in keys:
        means = []
        for stat in stats:
            v = per_token[key + (stat,)].double()
            ok = ~torch.isnan(v)
            if mask is not None:
                ok &= mask
            v0 = torch.where(ok, v, torch.zeros_like(v))
            dims = 0 if per_position else (0, 1)
            means.append((v0.sum(dims) / ok.sum(dims)).tolist())  # 0/0 -> NaN
        if per_position:
            rows.extend((*key, pos, *vals) for pos, vals in enumerate(zip(*means)))
        else:
            rows.append((*key, *means))
    return pd.DataFrame(rows, columns=cols)


def _mask(mask, shape, device) -> torch.Tensor | None:
    if mask is None:
        return None
    m = _tensor("mask", mask)
    if m.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = token counts), got dtype {m.dtype}")
    if m.dim() == 1 and len(shape) == 2 and shape[0] == 1:
        m = m[None]
    if m.numel() != int(np.prod(shape)) or (m.dim() == len(shape) and tuple(m.shape) != tuple(shape)):
        raise ValueError(f"mask must have shape {tuple(shape)} (one entry per token of x), got {tuple(m.shape)}")
    return m.to(device).reshape(shape)


# ============================================================================ depth-efficiency analyses


def _final_logits(ad: Adapter, x: torch.Tensor) -> torch.Tensor:
    return _logits(ad, x)


def _resid_stream(ad: Adapter, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([h_0 .. h_L], logits)``: the residual entering each block and the final residual, ``(B, T, C)``."""
    L = ad.n_layers
    with record(ad, names=["blocks.*.resid_pre", f"blocks.{L - 1}.resid_post"]) as cache:
        logits = _logits(ad, x)
    hs = [_tokens(cache[f"blocks.{l}.resid_pre"]) for l in range(L)] + [_tokens(cache[f"blocks.{L - 1}.resid_post"])]
    return hs, logits


def _need_layers(ad: Adapter, what: str) -> None:
    if ad.n_layers == 0:
        raise ValueError(f"{what} needs a model with at least one block, got n_layers = 0")


def _last_target(target, logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` target ids at the last position: top-1 for ``None``, one id, or one per example."""
    B, V = logits.shape[0], logits.shape[-1]
    if target is None:
        return logits[:, -1].argmax(-1)
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        checks.check_int("target", target, 0, V - 1)
        return torch.full((B,), int(target), device=logits.device, dtype=torch.long)
    tgt = checks.check_tokens("target", _tensor("target", target), V)
    if tgt.dim() != 1 or tgt.shape[0] != B:
        raise ValueError(f"target must be None, one token id in [0, {V - 1}] or one per example (shape ({B},)), "
                         f"got shape {tuple(tgt.shape)}")
    return tgt.to(logits.device).long()
