"""An independent reference for weight matching: Git Re-Basin's loop written out by hand.

Nothing here reads :mod:`workbench.permute` or the families' ``perm_axes``: the permutation
spec is written out from the raw ``state_dict`` key names (as Git Re-Basin's
``mlp_permutation_spec`` writes its ``{"Dense_0/kernel": (None, "P_0"), ...}``), every cost
matrix is a written-out sum of matrix products in numpy float64, attention's ``qkv`` is
sliced into its thirds by hand, and the assignments come straight from
``scipy.optimize.linear_sum_assignment(C, maximize=True)``. It is slow on purpose: every
cost matrix is recomputed at every step, from identity permutations, as the published
``weight_matching`` does.

Conventions shared with the workbench (so that the two can be compared, not because the code
is shared): a permutation maps a name to an index vector, ``perm[p][i]`` is the unit of B that
moves to position ``i`` (``permuted = w[perm]`` along that axis); the names are ``res`` (the
residual stream), ``hidden.{i}`` (MLP block i), and for a Transformer ``qk.{i}`` / ``vo.{i}``
(flat vectors over ``d_model`` that keep each head's dimensions together) and ``mlp.{i}``;
coordinate descent visits the units ``res``, then block by block (``hidden.{i}``, or
``heads.{i}`` then ``mlp.{i}``), in an order drawn from ``np.random.default_rng(seed)`` each
sweep.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

GATE_BUFFERS = ("residual_scale", "fade_done", "fade_steps")  # per-block scalars no permutation touches


# ----------------------------------------------------------------------------- the spec, by hand


def _n_blocks(state) -> int:
    ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    assert ids == set(range(len(ids))), f"blocks are not numbered 0..n-1: {sorted(ids)}"
    return len(ids)


def _is_transformer(state) -> bool:
    return "tok_embed.weight" in state


def mlp_axes(state) -> dict[str, tuple]:
    """Which permutation acts on which axis of each ResidualMLP ``state_dict`` key (norm keys only if present)."""
    axes = {"stem.weight": ("res", None), "stem.bias": ("res",)}
    for i in range(_n_blocks(state)):
        b, h = f"blocks.{i}", f"hidden.{i}"
        axes.update({
            f"{b}.pre_norm.weight": ("res",), f"{b}.pre_norm.bias": ("res",),
            f"{b}.fc.weight": (h, "res"), f"{b}.fc.bias": (h,),
            f"{b}.proj.weight": ("res", h), f"{b}.proj.bias": ("res",),
            f"{b}.post_norm.weight": ("res",), f"{b}.post_norm.bias": ("res",),
        })
    axes.update({"final_norm.weight": ("res",), "final_norm.bias": ("res",),
                 "readout.weight": (None, "res"), "readout.bias": (None,)})
    return _present(axes, state)


def transformer_axes(state) -> dict[str, tuple]:
    """The same for a Transformer; ``qkv.{i}`` names the rows of the fused ``[q; k; v]`` projection, i.e.
    ``qk.{i}`` on the first two thirds and ``vo.{i}`` on the last (see :func:`index`)."""
    axes = {"tok_embed.weight": (None, "res"), "pos_embed.weight": (None, "res")}
    for i in range(_n_blocks(state)):
        b = f"blocks.{i}"
        for norm in ("ln1", "ln1_post", "ln2", "ln2_post"):
            axes.update({f"{b}.{norm}.weight": ("res",), f"{b}.{norm}.bias": ("res",)})
        axes.update({
            f"{b}.attn.qkv.weight": (f"qkv.{i}", "res"), f"{b}.attn.qkv.bias": (f"qkv.{i}",),
            f"{b}.attn.proj.weight": ("res", f"vo.{i}"), f"{b}.attn.proj.bias": ("res",),
            f"{b}.mlp.fc.weight": (f"mlp.{i}", "res"), f"{b}.mlp.fc.bias": (f"mlp.{i}",),
            f"{b}.mlp.proj.weight": ("res", f"mlp.{i}"), f"{b}.mlp.proj.bias": ("res",),
        })
    axes.update({"final_norm.weight": ("res",), "final_norm.bias": ("res",), "readout.weight": (None, "res")})
    return _present(axes, state)


def _present(axes: dict, state) -> dict:
    """The spec's keys that the state holds; any other key must be a gate buffer (else the spec is incomplete)."""
    extra = [k for k in state if k not in axes and k.rsplit(".", 1)[-1] not in GATE_BUFFERS]
    if extra:
        raise KeyError(f"the hand-written spec does not cover {extra[:5]}")
    return {k: v for k, v in axes.items() if k in state}


def state_axes(state) -> dict[str, tuple]:
    return transformer_axes(state) if _is_transformer(state) else mlp_axes(state)


def sizes(state) -> dict[str, int]:
    """perm name -> number of units, read off the weight shapes."""
    L = _n_blocks(state)
    if _is_transformer(state):
        out = {"res": state["tok_embed.weight"].shape[1]}
        for i in range(L):
            out[f"qk.{i}"] = out[f"vo.{i}"] = state[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3
            out[f"mlp.{i}"] = state[f"blocks.{i}.mlp.fc.weight"].shape[0]
        return out
    return {"res": state["stem.weight"].shape[0], **{f"hidden.{i}": state[f"blocks.{i}.fc.weight"].shape[0]
                                                     for i in range(L)}}


def index(perm: dict, name: str):
    """The index vector of one axis name: a permutation, or for ``qkv.{i}`` the three thirds by hand."""
    m = re.fullmatch(r"qkv\.(\d+)", name)
    if m is None:
        return perm[name]
    qk, vo = perm[f"qk.{m[1]}"], perm[f"vo.{m[1]}"]
    d = len(qk)
    if isinstance(qk, torch.Tensor):
        return torch.cat([qk, d + qk, 2 * d + vo])
    return np.concatenate([qk, d + qk, 2 * d + vo])


def permute_state(state: dict, perm: dict) -> dict:
    """Every key of ``state`` (torch tensors or numpy arrays) indexed by ``perm`` along the axes of the hand spec."""
    axes = state_axes(state)
    out = {}
    for k, w in state.items():
        for axis, p in enumerate(axes.get(k, ())):
            if p is not None:
                idx = index(perm, p)
                w = w.index_select(axis, idx) if isinstance(w, torch.Tensor) else np.take(w, idx, axis=axis)
        out[k] = w
    return out


def permute_model(model, perm: dict):
    """A copy of ``model`` with its weights permuted by hand (torch indexing on the state dict)."""
    perm = {p: torch.as_tensor(v, dtype=torch.long) for p, v in perm.items()}
    out = copy.deepcopy(model)
    out.load_state_dict(permute_state({k: v.detach().clone() for k, v in model.state_dict().items()}, perm))
    return out


def random_perm(state, n_heads: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random permutation by hand: every unit shuffled; for attention, whole heads shuffled (the same
    head order for ``qk`` and ``vo``) and the dimensions inside each head shuffled on their own."""
    g = torch.Generator().manual_seed(seed)
    perm = {p: torch.randperm(n, generator=g) for p, n in sizes(state).items() if not p.startswith(("qk.", "vo."))}
    for i in range(_n_blocks(state)) if _is_transformer(state) else ():
        d = sizes(state)[f"qk.{i}"]
        D = d // n_heads
        heads = torch.randperm(n_heads, generator=g)
        for p in (f"qk.{i}", f"vo.{i}"):
            perm[p] = torch.cat([heads[h] * D + torch.randperm(D, generator=g) for h in range(n_heads)])
    return perm


# ----------------------------------------------------------------------------- cost matrices, written out


def _outer(A, B, key):
    return np.outer(A[key], B[key]) if key in A else 0.0


def _qkv(W, d):
    """The q, k, v thirds of a fused projection (rows), by hand."""
    return W[:d], W[d:2 * d], W[2 * d:3 * d]


def _cost_mlp(A, B, perm, p, L):
    """Cost of one ResidualMLP permutation: ``C[i, j]`` sums A's weights at unit i times B's at unit j,
    B's other axes permuted."""
    pr = perm["res"]
    if p.startswith("hidden."):
        b = f"blocks.{p.split('.')[1]}"
        fc, proj = f"{b}.fc.weight", f"{b}.proj.weight"
        return A[fc] @ B[fc][:, pr].T + _outer(A, B, f"{b}.fc.bias") + A[proj].T @ B[proj][pr, :]
    C = A["stem.weight"] @ B["stem.weight"].T + np.outer(A["stem.bias"], B["stem.bias"])
    for i in range(L):
        b, ph = f"blocks.{i}", perm[f"hidden.{i}"]
        C = C + _outer(A, B, f"{b}.pre_norm.weight") + _outer(A, B, f"{b}.pre_norm.bias")
        C = C + A[f"{b}.fc.weight"].T @ B[f"{b}.fc.weight"][ph, :]
        C = C + A[f"{b}.proj.weight"] @ B[f"{b}.proj.weight"][:, ph].T + np.outer(A[f"{b}.proj.bias"],
                                                                                  B[f"{b}.proj.bias"])
        C = C + _outer(A, B, f"{b}.post_norm.weight") + _outer(A, B, f"{b}.post_norm.bias")
    C = C + _outer(A, B, "final_norm.weight") + _outer(A, B, "final_norm.bias")
    return C + A["readout.weight"].T @ B["readout.weight"]


def _cost_transformer(A, B, perm, p, L):
    """Cost of one Transformer permutation (``res``, ``qk.i``, ``vo.i`` or ``mlp.i``)."""
    pr = perm["res"]
    d = len(pr)
    if p == "res":
        C = A["tok_embed.weight"].T @ B["tok_embed.weight"] + A["pos_embed.weight"].T @ B["pos_embed.weight"]
        for i in range(L):
            b, pqk, pvo, pm = f"blocks.{i}", perm[f"qk.{i}"], perm[f"vo.{i}"], perm[f"mlp.{i}"]
            qa, ka, va = _qkv(A[f"{b}.attn.qkv.weight"], d)
            qb, kb, vb = _qkv(B[f"{b}.attn.qkv.weight"], d)
            C = C + _outer(A, B, f"{b}.ln1.weight") + _outer(A, B, f"{b}.ln1.bias")
            C = C + qa.T @ qb[pqk, :] + ka.T @ kb[pqk, :] + va.T @ vb[pvo, :]
            C = C + A[f"{b}.attn.proj.weight"] @ B[f"{b}.attn.proj.weight"][:, pvo].T
            C = C + np.outer(A[f"{b}.attn.proj.bias"], B[f"{b}.attn.proj.bias"])
            C = C + _outer(A, B, f"{b}.ln1_post.weight") + _outer(A, B, f"{b}.ln1_post.bias")
            C = C + _outer(A, B, f"{b}.ln2.weight") + _outer(A, B, f"{b}.ln2.bias")
            C = C + A[f"{b}.mlp.fc.weight"].T @ B[f"{b}.mlp.fc.weight"][pm, :]
            C = C + A[f"{b}.mlp.proj.weight"] @ B[f"{b}.mlp.proj.weight"][:, pm].T
            C = C + np.outer(A[f"{b}.mlp.proj.bias"], B[f"{b}.mlp.proj.bias"])
            C = C + _outer(A, B, f"{b}.ln2_post.weight") + _outer(A, B, f"{b}.ln2_post.bias")
        C = C + _outer(A, B, "final_norm.weight") + _outer(A, B, "final_norm.bias")
        return C + A["readout.weight"].T @ B["readout.weight"]
    kind, i = p.split(".")
    b = f"blocks.{i}"
    if kind == "mlp":
        fc, proj = f"{b}.mlp.fc.weight", f"{b}.mlp.proj.weight"
        return A[fc] @ B[fc][:, pr].T + _outer(A, B, f"{b}.mlp.fc.bias") + A[proj].T @ B[proj][pr, :]
    qa, ka, va = _qkv(A[f"{b}.attn.qkv.weight"], d)
    qb, kb, vb = _qkv(B[f"{b}.attn.qkv.weight"], d)
    bqa, bka, bva = _qkv(A[f"{b}.attn.qkv.bias"], d)
    bqb, bkb, bvb = _qkv(B[f"{b}.attn.qkv.bias"], d)
    if kind == "qk":
        return qa @ qb[:, pr].T + np.outer(bqa, bqb) + ka @ kb[:, pr].T + np.outer(bka, bkb)
    assert kind == "vo", p
    proj = f"{b}.attn.proj.weight"
    return va @ vb[:, pr].T + np.outer(bva, bvb) + A[proj].T @ B[proj][pr, :]


# ----------------------------------------------------------------------------- solving


def _lsa(C: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(C, maximize=True)
    assert np.array_equal(rows, np.arange(len(C)))
    return cols


def _solve_heads(c_qk: np.ndarray, c_vo: np.ndarray, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole heads, then dimensions inside each head: for every head pair (h of A, g of B) the best
    within-head matchings of the qk block and of the vo block; the head assignment maximises their sum."""
    D = len(c_qk) // n_heads
    score = np.zeros((n_heads, n_heads))
    inner = {}
    for h in range(n_heads):
        for g in range(n_heads):
            bq = c_qk[h * D:(h + 1) * D, g * D:(g + 1) * D]
            bv = c_vo[h * D:(h + 1) * D, g * D:(g + 1) * D]
            cq, cv = _lsa(bq), _lsa(bv)
            score[h, g] = bq[np.arange(D), cq].sum() + bv[np.arange(D), cv].sum()
            inner[h, g] = (cq, cv)
    head = _lsa(score)
    p_qk = np.concatenate([head[h] * D + inner[h, head[h]][0] for h in range(n_heads)])
    p_vo = np.concatenate([head[h] * D + inner[h, head[h]][1] for h in range(n_heads)])
    return p_qk, p_vo


def _gain(C: np.ndarray, p: np.ndarray) -> float:
    """``<C, P>`` for the permutation matrix with ones at ``(i, p[i])``."""
    return float(C[np.arange(len(p)), p].sum())


def _numpy_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}


def weight_matching(model_a, model_b, n_heads: int | None = None, seed: int = 0,
                    max_iter: int = 100) -> dict[str, torch.Tensor]:
    """Git Re-Basin's ``weight_matching``: identity start; each sweep visits the units in a random order and
    replaces each by the maximum-weight assignment of its cost (recomputed from scratch); stop after a sweep
    in which no unit improved its own term by more than 1e-12. ``n_heads``: the Transformer's heads."""
    A, B = _numpy_state(model_a), _numpy_state(model_b)
    L, transformer = _n_blocks(A), _is_transformer(A)
    if transformer and not n_heads:
        raise ValueError("a Transformer needs n_heads")
    perm = {p: np.arange(n) for p, n in sizes(A).items()}
    units = ["res"] + [u for i in range(L) for u in ((f"heads.{i}", f"mlp.{i}") if transformer else (f"hidden.{i}",))]
    cost = _cost_transformer if transformer else _cost_mlp
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        progress = False
        for ui in rng.permutation(len(units)):
            u = units[ui]
            if u.startswith("heads."):
                i = u.split(".")[1]
                c_qk, c_vo = cost(A, B, perm, f"qk.{i}", L), cost(A, B, perm, f"vo.{i}", L)
                new_qk, new_vo = _solve_heads(c_qk, c_vo, n_heads)
                old = _gain(c_qk, perm[f"qk.{i}"]) + _gain(c_vo, perm[f"vo.{i}"])
                new = _gain(c_qk, new_qk) + _gain(c_vo, new_vo)
                perm[f"qk.{i}"], perm[f"vo.{i}"] = new_qk, new_vo
            else:
                C = cost(A, B, perm, u, L)
                ci = _lsa(C)
                old, new = _gain(C, perm[u]), _gain(C, ci)
                perm[u] = ci
            progress = progress or new > old + 1e-12
        if not progress:
            break
    return {p: torch.as_tensor(v, dtype=torch.long) for p, v in perm.items()}


def objective(model_a, model_b, perm: dict) -> float:
    """``sum over every permuted key of <W_a, P W_b>`` in float64 (B permuted with the hand spec, numpy)."""
    A, B = _numpy_state(model_a), _numpy_state(model_b)
    axes = state_axes(A)
    Bp = permute_state(B, {p: np.asarray(v) for p, v in perm.items()})
    return float(sum(np.vdot(A[k], Bp[k]) for k in axes))
