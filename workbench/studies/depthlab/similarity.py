"""Layer rankings from one forward: Block Influence (Men et al. 2025, ShortGPT) per block and the angular
distance (Gromov et al. 2025) of every block span, with the skip effect as a third ranking and Spearman's
rho between them.

Definitions: ``docs/definitions.md#block-influence``, ``#angular-distance``, ``#layer-rankings``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core import checks
from ...residual import depth_score, skip_effects
from ...residual.batch import EPS, _tokens
from .runner import BlockRunner, _batch_size, _chunks, _inference

# ============================================================================ 1. layer rankings


RANK_METHODS = ("block_influence", "angular", "skip")       # importance scores; low = first to remove
POSITIONS = ("paper", "all", "last")


@dataclass
class Similarity:
    """Result of :func:`layer_similarity`.

    ``influence``: ``layer, block_influence, angular_distance`` per block (``1 - E cos(h_l, h_{l+1})``
    and ``arccos(cos(h_l, h_{l+1})) / pi``); ``angular``: ``start, n, distance`` for every span of ``n``
    blocks ``start .. start+n-1`` (the n x l heat-map), ``distance = E arccos(cos(h_start, h_{start+n})) / pi``.
    """

    influence: pd.DataFrame
    angular: pd.DataFrame
    n_layers: int
    positions: str

    def best_span(self, n: int) -> int:
        """The start of the span of ``n`` blocks with the smallest angular distance (Gromov et al.'s cut)."""
        n = checks.check_int("n", n, 1, self.n_layers)
        sel = self.angular[self.angular["n"] == n]
        return int(sel.sort_values(["distance", "start"]).iloc[0]["start"])


def _check_positions(positions: str) -> str:
    return checks.check_choice("positions", positions, POSITIONS)


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last True position of each row (-1 when none)."""
    T = mask.shape[1]
    idx = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(1).values


def _mask_for(run: BlockRunner, x: torch.Tensor, mask) -> torch.Tensor:
    """``(B, T)`` bool of the tokens that count (all when ``mask`` is None; vector models ``T = 1``)."""
    from ...residual.batch import _mask

    T = x.shape[1] if run.ad.family == "transformer" else 1
    m = _mask(mask, (x.shape[0], T), run.ad.device)
    return torch.ones(x.shape[0], T, dtype=torch.bool, device=run.ad.device) if m is None else m


def _stream(run: BlockRunner, x: torch.Tensor) -> list[torch.Tensor]:
    """``[h_0 .. h_L]`` ``(B, T, C)`` float32: the residual entering each block and the final residual (one forward)."""
    h = run.begin(x)
    hs = [_tokens(h).float()]
    for i in range(run.n_layers):
        h = run.block(i, h)
        hs.append(_tokens(h).float())
    return hs


def layer_similarity(model: nn.Module, x, mask=None, positions: str = "paper",
                     batch_size: int | None = 256) -> Similarity:
    """Block Influence and angular distances of every block span from one forward.

    With ``h_l`` the residual entering block ``l`` (``h_L`` the final residual), per token:

    - Block Influence (Men et al. 2025, ShortGPT): ``BI_l = 1 - E_t cos(h_l, h_{l+1})`` over every token
      (the reference ``sramshetty/ShortGPT`` ``metrics.block_influence``);
    - angular distance (Gromov et al. 2025): ``d(l, n) = E arccos(cos(h_l, h_{l+n})) / pi`` for
      ``n = 1 .. L``, ``l = 0 .. L-n``, on the last token of each example (as ``arcee-ai/PruneMe``: the last
      non-pad token; here the last token inside ``mask``).

    ``positions``: ``"paper"`` (BI over all tokens, angular on the last; default), ``"all"`` or ``"last"``
    (both). ``mask (B, T)`` restricts the tokens (e.g. the scored positions of k-hop). Cosines clamp norms at
    ``EPS``. Returns :class:`Similarity`. ``docs/definitions.md#block-influence``, ``#angular-distance``.
    """
    positions = _check_positions(positions)
    batch_size = _batch_size(batch_size)
    run = BlockRunner(model)
    L = run.n_layers
    if L == 0:
        raise ValueError("model: layer similarity needs at least one block, got n_layers = 0")
    bi_sum = torch.zeros(L, dtype=torch.float64)
    ang_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)         # [l, m]: summed arccos(cos(h_l, h_m)) / pi
    n_all, n_last = 0, 0
    with _inference(run.model):
        x = run.batch(x)
        m_all = _mask_for(run, x, mask)
        for sl in _chunks(len(x), batch_size):
            hs = F.normalize(torch.stack(_stream(run, x[sl])), dim=-1, eps=EPS)     # (L + 1, B, T, C) unit rows
            m = m_all[sl]
            last = _last_index(m)
            at_last = _only(last, m.shape)
            pick_bi = m if positions in ("paper", "all") else at_last
            pick_ang = m if positions == "all" else at_last
            n_all += int(pick_bi.sum())
            n_last += int(pick_ang.sum())
            cos = (hs[:-1] * hs[1:]).sum(-1)                                         # (L, B, T)
            bi_sum += (1 - cos[:, pick_bi]).double().sum(1).cpu()
            u = hs[:, pick_ang]                                                       # (L + 1, S, C)
            gram = torch.einsum("lsc,msc->lms", u, u).clamp(-1, 1)                    # (L + 1, L + 1, S)
            ang_sum += (torch.arccos(gram) / math.pi).double().sum(-1).cpu()
    if n_all == 0 or n_last == 0:
        raise ValueError("mask: no token is selected, so there is nothing to average")
    dist = (ang_sum / n_last).numpy()
    start, n = zip(*[(l, k) for k in range(1, L + 1) for l in range(L - k + 1)])
    start, n = np.array(start), np.array(n)
    angular = pd.DataFrame({"start": start, "n": n, "distance": dist[start, start + n]})
    influence = pd.DataFrame({"layer": np.arange(L), "block_influence": (bi_sum / n_all).numpy(),
                              "angular_distance": dist[np.arange(L), np.arange(L) + 1]})
    return Similarity(influence, angular, L, positions)


def _only(last: torch.Tensor, shape) -> torch.Tensor:
    """A ``(B, T)`` mask with only each row's ``last`` position set."""
    out = torch.zeros(shape, dtype=torch.bool, device=last.device)
    ok = last >= 0
    out[torch.arange(shape[0], device=last.device)[ok], last[ok]] = True
    return out


@dataclass
class Rankings:
    """Result of :func:`rankings`.

    ``table``: ``layer, method, score, rank`` with ``method`` in :data:`RANK_METHODS` (scores: importance;
    ``rank`` 0 = the least important block, the first one a pruning by that ranking removes; ties go to the
    lower layer). ``correlation``: ``method_a, method_b, spearman`` for each pair of methods (NaN when a
    score is constant). ``angular``: the heat-map of :class:`Similarity`. ``depth_score``: the centre of
    mass of the skip effect (:func:`workbench.residual.depth_score`; NaN without ``skip``).
    """

    table: pd.DataFrame
    correlation: pd.DataFrame
    angular: pd.DataFrame
    depth_score: float
    n_layers: int

    def order(self, method: str) -> list[int]:
        """Block indices from least to most important by ``method``."""
        checks.check_choice("method", method, sorted(set(self.table["method"])))
        sel = self.table[self.table["method"] == method].sort_values("rank")
        return [int(v) for v in sel["layer"]]


def _ranks(scores: list[float]) -> list[int]:
    """Rank 0 for the smallest score; ties by position (a stable sort)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    ranks = [0] * len(scores)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def rankings(model: nn.Module, x, y=None, mask=None, skip: bool = True, positions: str = "paper",
             batch_size: int | None = 256) -> Rankings:
    """Rank the blocks by Block Influence, by angular distance and by our skip effect, with Spearman between them.

    Scores (higher = more important): ``block_influence`` (``BI_l``, ShortGPT), ``angular`` (the one-block
    angular distance ``d(l, 1)``, Gromov et al.) from :func:`layer_similarity` (one forward), and ``skip``
    (``l2`` output change of :func:`workbench.residual.skip_effects` with the block skipped: ``L + 1``
    forwards; ``skip=False`` leaves it and the depth score out). ``y``: targets for the skip effects' loss
    (default for sequences: the next token). ``docs/definitions.md#layer-rankings``.
    """
    checks.check_bool("skip", skip)
    sim = layer_similarity(model, x, mask=mask, positions=positions, batch_size=batch_size)
    L = sim.n_layers
    scores = {"block_influence": sim.influence["block_influence"].tolist(),
              "angular": sim.influence["angular_distance"].tolist()}
    dscore = float("nan")
    if skip:
        eff = skip_effects(model, x, y=y, mask=mask, batch_size=batch_size)
        out = eff.output.set_index("skipped")
        scores["skip"] = [float(out.loc[l, "l2"]) for l in range(L)]
        dscore = depth_score(eff)
    rows = []
    for method, s in scores.items():
        rows += [(l, method, float(v), r) for l, (v, r) in enumerate(zip(s, _ranks(s)))]
    table = pd.DataFrame(rows, columns=["layer", "method", "score", "rank"])
    names = list(scores)
    corr = pd.DataFrame([(a, b, _spearman(scores[a], scores[b])) for i, a in enumerate(names) for b in names[i + 1:]],
                        columns=["method_a", "method_b", "spearman"])
    return Rankings(table, corr, sim.angular, dscore, L)
