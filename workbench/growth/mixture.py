"""MixtureGrowth: a wider layer as a learned mixture of trained templates (Pham et al. 2024).

Definitions: ``docs/definitions.md#mixture-growth``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..core import checks
from ..core import models as _models
from .operators import MAX_STEPS

# ----------------------------------------------------------------------------- MixtureGrowth


class TemplateLinear(nn.Module):
    """A linear layer whose weight is a combination of shared templates: ``W = sum_k coeff[k] T[k]``.

    ``templates`` is a :class:`torch.nn.Parameter` of shape ``(K, out, in)`` shared (by reference) by
    every layer of a :class:`MixtureMLP`; ``coeff`` (``(K,)``) and ``bias`` are the layer's own.
    """

    def __init__(self, templates: nn.Parameter, coeff: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.templates = templates
        self.coeff = nn.Parameter(coeff.clone())
        self.bias = nn.Parameter(bias.clone())

    @property
    def weight(self) -> torch.Tensor:
        return torch.einsum("k,koi->oi", self.coeff, self.templates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class MixtureMLP(nn.Module):
    """MixtureGrowth's template network (Pham et al., WACV 2024), as an MLP classifier:
    ``stem -> relu -> [TemplateLinear -> relu] x n_layers -> readout``.

    The ``n_layers`` hidden-to-hidden layers share one bank of ``n_templates`` templates ``(K, h, h)``;
    each has its own ``K`` coefficients. ``members`` (set by :func:`mixture_grow`) is the number of
    networks the grown one is made of (1 for a trained small network). Definition:
    ``docs/definitions.md#mixture-growth``.
    """

    def __init__(self, d_in: int, n_classes: int, width: int = 32, n_layers: int = 2, n_templates: int = 2,
                 seed: int = 0):
        super().__init__()
        bounds = checks.constraints(_models.MLPConfig)   # the MLP family's bounds on its data
        self.d_in = bounds["d_in"].check("d_in", d_in)
        self.n_classes = bounds["n_classes"].check("n_classes", n_classes)
        self.width = checks.check_int("width", width, 1, 4096)
        self.n_layers = checks.check_int("n_layers", n_layers, 1, 64)
        self.n_templates = checks.check_int("n_templates", n_templates, 1, 64)
        self.members = 1
        with _models.seeded(checks.check_seed("seed", seed)):
            self.stem = nn.Linear(d_in, width)
            bound = 1.0 / math.sqrt(width)
            self.templates = nn.Parameter((torch.rand(n_templates, width, width) * 2 - 1) * bound)
            coeff = torch.randn(n_layers, n_templates) / math.sqrt(n_templates)
            self.layers = nn.ModuleList(
                TemplateLinear(self.templates, coeff[i], (torch.rand(width) * 2 - 1) * bound) for i in range(n_layers))
            self.readout = nn.Linear(width, n_classes)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The hidden activations after the stem and after each template layer."""
        h = torch.relu(self.stem(x))
        out = [h]
        for layer in self.layers:
            h = torch.relu(layer(h))
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.hidden(x)[-1])


MIXTURE_INITS = ("orthogonal", "zero", "random")


def mixture_grow(members, init: str = "orthogonal", *, seed: int = 0) -> MixtureMLP:
    """Grow ``m >= 2`` trained :class:`MixtureMLP` members (same shape) into one of ``m`` times the width.

    The grown template bank is the members' templates placed on the block diagonal: template ``k`` of
    member ``a`` becomes a ``(m h, m h)`` template that is ``T_a[k]`` in block ``(a, a)`` and also, shifted,
    in every off-diagonal block ``(a, b)``: the grown layer's weight has the members' own combinations
    on the diagonal and **new combinations of the learned templates** in the off-diagonal blocks. The new
    coefficients are

    - ``"orthogonal"`` (default): random, orthogonal to the layer's existing coefficient vectors
      (in the pooled template space), scaled to their mean norm;
    - ``"zero"``: zero, so the grown network computes the members side by side exactly: its hidden
      units are the members' units concatenated and its logits the mean of the members' logits;
    - ``"random"``: N(0, 1/K).

    The stem's rows and the readout's columns are the members' (readout divided by ``m``).
    Definition: ``docs/definitions.md#mixture-growth``.
    """
    checks.check_choice("init", init, MIXTURE_INITS)
    seed = checks.check_seed("seed", seed)
    if isinstance(members, MixtureMLP) or not isinstance(members, (list, tuple)) or len(members) < 2 \
            or not all(isinstance(m, MixtureMLP) for m in members):
        raise ValueError("members must be a list of at least 2 MixtureMLP networks")
    if len(members) > 16:
        raise ValueError(f"members must list at most 16 networks, got {len(members)}")
    a0 = members[0]
    shape = (a0.d_in, a0.n_classes, a0.width, a0.n_layers, a0.n_templates)
    for i, mb in enumerate(members):
        if (mb.d_in, mb.n_classes, mb.width, mb.n_layers, mb.n_templates) != shape:
            raise ValueError(f"members[{i}] has (d_in, n_classes, width, n_layers, n_templates) = "
                             f"{(mb.d_in, mb.n_classes, mb.width, mb.n_layers, mb.n_templates)}, members[0] {shape}")
    m, h, L, K = len(members), a0.width, a0.n_layers, a0.n_templates
    KK = m * K                               # pooled templates: member a's k-th is index a*K + k
    H = m * h
    if H > 4096:
        raise ValueError(f"the grown width would be {H}; at most 4096")
    gen = torch.Generator().manual_seed(seed)
    grown = MixtureMLP(a0.d_in, a0.n_classes, H, L, 1, seed=seed).to(a0.templates.device)   # the members' device
    with torch.no_grad():
        # templates: pooled template (a, k) placed in every block (r, c) whose coefficient picks it;
        # a block-structured bank (m*m*KK templates would be needed in general), so the grown network
        # keeps one coefficient vector per (layer, block): W[l][r, c] = sum_j C[l, r, c, j] T_j
        T = torch.stack([t for mb in members for t in mb.templates.detach()])           # (KK, h, h)
        C = torch.zeros(L, m, m, KK, dtype=T.dtype, device=T.device)
        for a, mb in enumerate(members):
            for l, layer in enumerate(mb.layers):
                C[l, a, a, a * K:(a + 1) * K] = layer.coeff.detach()
        for l in range(L):
            old = torch.stack([C[l, a, a] for a in range(m)])                            # (m, KK)
            scale = old.norm(dim=1).mean()
            for r in range(m):
                for c in range(m):
                    if r == c or init == "zero":
                        continue
                    if init == "random":
                        C[l, r, c] = torch.randn(KK, generator=gen, dtype=torch.float64).to(T) / math.sqrt(KK)
                        continue
                    prev = [C[l, a, a] for a in range(m)] + [C[l, rr, cc] for rr in range(m) for cc in range(m)
                                                            if rr != cc and C[l, rr, cc].abs().sum() > 0]
                    v = torch.randn(KK, generator=gen, dtype=torch.float64).to(T.device)   # the CPU stream
                    q, _ = torch.linalg.qr(torch.stack(prev).double().T)                 # orthonormal basis of old
                    if q.shape[1] < KK:
                        v = v - q @ (q.T @ v)
                    C[l, r, c] = (v / v.norm().clamp_min(1e-12) * scale.double()).to(T.dtype)
        grown.members = m
        grown.templates = nn.Parameter(T.clone())
        grown.n_templates = KK
        grown.block_coeff = nn.Parameter(C)                                             # (L, m, m, KK)
        grown.stem.weight.copy_(torch.cat([mb.stem.weight for mb in members], 0))
        grown.stem.bias.copy_(torch.cat([mb.stem.bias for mb in members], 0))
        grown.readout.weight.copy_(torch.cat([mb.readout.weight for mb in members], 1) / m)
        grown.readout.bias.copy_(sum(mb.readout.bias for mb in members) / m)
        grown.layers = nn.ModuleList(
            _BlockTemplateLinear(grown, l, torch.cat([mb.layers[l].bias for mb in members], 0)) for l in range(L))
    return grown


class _BlockTemplateLinear(nn.Module):
    """Layer ``l`` of a grown :class:`MixtureMLP`: block ``(r, c)`` of its weight is
    ``sum_j block_coeff[l, r, c, j] templates[j]`` (the members' combinations on the diagonal)."""

    def __init__(self, net: MixtureMLP, l: int, bias: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_net", net)   # not a submodule (no cycle); the net owns templates/coeffs
        self.l = l
        self.bias = nn.Parameter(bias.clone())

    @property
    def coeff(self) -> torch.Tensor:
        return self._net.block_coeff[self.l]

    @property
    def weight(self) -> torch.Tensor:
        blocks = torch.einsum("rcj,joi->rcoi", self._net.block_coeff[self.l], self._net.templates)  # (m, m, h, h)
        m, _, h, _ = blocks.shape
        return blocks.permute(0, 2, 1, 3).reshape(m * h, m * h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def fit_mixture(model: MixtureMLP, x: torch.Tensor, y: torch.Tensor, steps: int = 200, lr: float = 1e-2,
                batch_size: int = 64, seed: int = 0) -> list[float]:
    """Train a :class:`MixtureMLP` with AdamW on ``(x, y)`` for ``steps`` minibatch steps; returns the losses."""
    checks.check_int("steps", steps, 1, MAX_STEPS)
    checks.check_float("lr", lr, 0.0, 10.0, lo_open=True)
    checks.check_int("batch_size", batch_size, 1, 100_000)
    checks.check_features("x", x)
    if x.dim() != 2 or x.shape[1] != model.d_in or y.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, {model.d_in}) features and y (N,) labels, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    checks.check_labels("y", y, model.n_classes)
    gen = torch.Generator().manual_seed(checks.check_seed("seed", seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
