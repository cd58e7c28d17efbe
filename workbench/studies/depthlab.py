"""The depth lab: which blocks a residual model needs, in which order, how often, and where its depth idles.

Growth builds depth; this module asks the opposite questions of a trained model.

==============================  ==================================================================
:func:`layer_similarity`        one forward: Block Influence per block and the angular distance of every block span
:func:`rankings`                BI, angular distance and the skip effect as layer rankings, Spearman between them
:func:`prune`                   a new model without some blocks (equals the model with them skipped)
:func:`prune_run`               the same as an ordinary :class:`~workbench.training.Run`, optionally healed
:func:`prune_heal_curve`        accuracy and loss against the fraction removed, per ranking, healed and not
:func:`strategy_sequence`       the block order of an execution strategy (skip, swap, reverse, shuffle, parallel, loop)
:func:`run_sequence`            logits of the model run along any block order
:func:`strategies`              accuracy and loss per strategy and span (one forward each)
:func:`oracle_depth`            per example, the shortest skip/repeat chain of blocks that still answers correctly
:func:`hop_tagged_khop`         k-hop examples of several hop counts in one dataset (a hop-count token first)
:func:`depth_profile`           per layer: residual norm growth, in/out cosine, relative contribution, ||J - I||
:func:`deep_half`               how much of a per-layer measure the deep half of the stack carries
:func:`effective_depth`         the layer where the blocks stop feeding later blocks, and its ratio to L
:func:`width_for_params`        the config of a given depth closest to a parameter budget (depth x width sweeps)
:func:`effective_depth_stages`  that ratio at every stage of a growth group (:func:`group_runs`)
==============================  ==================================================================

Everything that only reads a model works on every model an adapter of :mod:`workbench.hooks` reads
(our Transformers and residual MLPs, the Hugging Face families): blocks run one at a time through
:class:`BlockRunner`, which for a Hugging Face model captures each decoder layer's own extra arguments
(rotary embeddings, masks) in one cheap pass. Removing blocks and healing need a workbench model.
Long functions take ``monitor=None`` (:mod:`workbench.monitor`) and ``seed``; tables are tidy frames.
Early exit (LayerSkip) lives in :mod:`workbench.earlyexit`.

Definitions: ``docs/definitions.md#block-influence``, ``#angular-distance``, ``#layer-rankings``,
``#prune-heal``, ``#execution-strategies``, ``#oracle-depth``, ``#layernorm-scaling``, ``#depth-profile``,
``#effective-depth``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import checks
from ..core import monitor as _monitor
from ..hooks import Adapter, adapter, record
from ..core.data import IGNORE
from ..residual import contributions, depth_score, skip_effects
from ..residual.batch import EPS, _as_batch, _targets, _tokens
from ..core.training import Callback

__all__ = ["STRATEGIES", "RANK_METHODS", "PRUNE_METHODS", "MAX_LOOP", "BlockRunner", "Similarity", "layer_similarity",
           "Rankings", "rankings", "prune", "prune_run", "prune_heal_curve", "strategy_sequence", "sequence_label",
           "run_sequence", "strategies", "Oracle", "oracle_depth", "hop_tagged_khop", "depth_profile", "deep_half",
           "width_for_params", "effective_depth", "effective_depth_stages", "group_runs"]

STRATEGIES = ("skip", "swap", "reverse", "shuffle", "parallel", "loop")
RANK_METHODS = ("block_influence", "angular", "skip")       # importance scores; low = first to remove
PRUNE_METHODS = RANK_METHODS + ("random",)
MAX_LOOP = 16              # largest loop count of the "loop" and "parallel" strategies
EXHAUSTIVE_MAX = 6         # oracle_depth searches every chain up to this depth, greedily beyond
POSITIONS = ("paper", "all", "last")


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
    from ..core.models import ResidualMLP, Transformer

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


# ============================================================================ 1. layer rankings


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
    from ..residual.batch import _mask

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


# ============================================================================ 2. prune and heal


def _native_model(model, name: str = "model"):
    if not _is_native(model):
        raise ValueError(f"{name}: removing blocks needs a workbench model (Transformer or ResidualMLP), got "
                         f"{type(model).__name__}; run_sequence(model, x, order) reads any model with blocks left out")
    return model


def _check_layers(name: str, layers, n_layers: int) -> list[int]:
    """Distinct block indices in ``[0, n_layers - 1]``, sorted."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"{name} must be a list of block indices in [0, {n_layers - 1}], got {layers!r:.80}")
    layers = list(layers)
    out = [checks.check_int(f"{name}[{i}]", v, 0, n_layers - 1) for i, v in enumerate(layers)]
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must list each block once, got {layers}")
    return sorted(out)


def prune(model: nn.Module, layers) -> nn.Module:
    """A new model with blocks ``layers`` removed; ``model`` is unchanged.

    The new model is a deep copy holding the other blocks in order (weights, fade-in gates, frozen flags
    and LayerNorm-Scaling factors as they were), its ``config`` rewritten by ``sync_config``
    (``n_layers``, ``layer_widths``), so :class:`~workbench.store.RunStore` saves and reloads it as any
    model. Its forward equals ``model``'s with those blocks replaced by the identity. Pruning every
    block is refused. ``docs/definitions.md#prune-heal``.
    """
    _native_model(model)
    L = len(model.blocks)
    drop = set(_check_layers("layers", layers, L))
    if L and len(drop) == L:
        raise ValueError(f"layers: pruning every block ({L} of {L}) leaves no residual stack; keep at least one")
    new = copy.deepcopy(model)
    new.blocks = nn.ModuleList(b for i, b in enumerate(new.blocks) if i not in drop)
    new.sync_config()
    return new


def _dataset(dataset, name: str = "dataset"):
    from ..core.data import Dataset, from_spec

    if isinstance(dataset, Dataset):
        return dataset
    if isinstance(dataset, dict):
        return from_spec(dataset)
    raise ValueError(f"{name} must be a workbench.data.Dataset or a dataset spec, got {type(dataset).__name__}")


class _Stop(Callback):
    """A training callback that stops when the monitor is stopped (so a page's Stop ends a heal)."""

    def __init__(self, mon):
        self.mon = mon

    def on_start(self, state):
        if self.mon.stopped:
            state.stop = True

    def on_step(self, state):
        if self.mon.stopped:
            state.stop = True


def prune_run(source, layers, dataset=None, heal=None, name: str | None = None, callbacks=(),
              monitor=None):
    """Remove blocks ``layers`` from a model or a :class:`~workbench.training.Run` and return a new Run.

    ``dataset``: what to evaluate (and heal) on; default the source run's (rebuilt from its spec).
    ``heal``: a :class:`~workbench.training.TrainConfig` for a healing fine-tune of what remains (the whole
    pruned model, with :func:`workbench.train`), or None. The Run's metrics are the heal's (its first rows an
    evaluation right after pruning, at step 0) or that evaluation alone; ``meta`` holds ``removed``,
    ``kept`` (original indices), ``parent`` (the source run id, if stored) and ``healed_steps``. It is an
    ordinary run: ``RunStore.save`` stores it, ``RunStore.load`` rebuilds the same function.
    """
    from ..core import training

    mon = _monitor.resolve(monitor)
    run_in = source if isinstance(source, training.Run) else None
    model = run_in.model if run_in is not None else source
    _native_model(model, "source")
    if dataset is None and run_in is None:
        raise ValueError("dataset is required when the source is a model (a Run knows its own dataset)")
    ds = _dataset(dataset if dataset is not None else run_in.dataset)
    if heal is not None and not isinstance(heal, training.TrainConfig):
        raise ValueError(f"heal must be a TrainConfig or None, got {type(heal).__name__}")
    if name is not None:
        checks.check_str("name", name, 200)
    L = len(model.blocks)
    removed = _check_layers("layers", layers, L)
    pruned = prune(model, removed)
    kept = [i for i in range(L) if i not in set(removed)]
    base_name = name or f"{run_in.name if run_in is not None else ds.name}-pruned"
    meta = {"removed": removed, "kept": kept, "parent": run_in.run_id if run_in is not None else None,
            "n_layers_before": L, "healed_steps": 0}
    eval_max = heal.eval_max if heal is not None else 2048
    rows = [{"step": 0, "split": split, "metric": metric, "value": value}
            for split in ("train", "val") for metric, value in training.evaluate(pruned, ds, split, eval_max).items()]
    start = pd.DataFrame(rows)
    if heal is None:
        cfg = run_in.train_config if run_in is not None else training.TrainConfig()
        return training.Run(model=pruned, train_config=cfg, dataset=ds.spec(), metrics=start, name=base_name,
                            meta=meta)
    healed = training.train(pruned, ds, heal, callbacks=[_Stop(mon), *callbacks], name=base_name)
    healed.metrics = pd.concat([start, healed.metrics], ignore_index=True)
    done = healed.metrics[healed.metrics["split"] == "batch"]
    healed.meta = {**meta, "healed_steps": int(done["step"].max()) if len(done) else 0}
    return healed


def _removal_order(method: str, k: int, ranks: Rankings | None, sim: Similarity | None, L: int,
                   seed: int) -> list[int]:
    """The ``k`` blocks a method removes: the ``k`` least important, Gromov's best span of ``k``, or seeded random."""
    if k == 0:
        return []
    if method == "angular":
        start = sim.best_span(k)
        return list(range(start, start + k))
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(L, generator=g)[:k].tolist())
    return sorted(ranks.order(method)[:k])


def prune_heal_curve(model: nn.Module, dataset, methods=PRUNE_METHODS, fractions=None, heal=None,
                     rank_examples: int = 256, eval_max: int = 2048, seed: int = 0, monitor=None) -> pd.DataFrame:
    """Accuracy and loss against the fraction of blocks removed, per ranking, healed and not.

    For each ``method`` and each ``k = round(f L)`` (``fractions`` in ``[0, 1)``; default every
    ``k = 0 .. L-1``): ``block_influence`` and ``skip`` remove the ``k`` least important blocks of
    :func:`rankings`; ``angular`` removes Gromov et al.'s contiguous span of ``k`` blocks with the smallest
    angular distance ``d(l, k)``; ``random`` a seeded random set. Rankings are measured once, on the first
    ``rank_examples`` validation examples (scored tokens only). Each pruned model is evaluated on the
    validation split (``eval_max`` examples); with ``heal`` (a TrainConfig) a copy is also fine-tuned and
    evaluated (``k = 0``: the model trained as long, the control). Returns ``method, n_removed, fraction,
    removed, healed, acc, loss``; stops early (what is done so far) when the monitor stops.
    ``docs/definitions.md#prune-heal``.
    """
    from ..core import training

    mon = _monitor.resolve(monitor)
    _native_model(model)
    ds = _dataset(dataset)
    methods = list(checks.check_choices("methods", methods, PRUNE_METHODS))
    if heal is not None and not isinstance(heal, training.TrainConfig):
        raise ValueError(f"heal must be a TrainConfig or None, got {type(heal).__name__}")
    rank_examples = checks.check_int("rank_examples", rank_examples, 1, 100_000)
    eval_max = checks.check_int("eval_max", eval_max, 0, None)
    seed = checks.check_seed("seed", seed)
    L = len(model.blocks)
    if L < 2:
        raise ValueError(f"model: a prune curve needs at least 2 blocks, got n_layers = {L}")
    if fractions is None:
        ks = list(range(L))
    else:
        if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
            raise ValueError(f"fractions must be a list of numbers in [0, 1), got {fractions!r:.80}")
        ks = sorted({min(L - 1, round(checks.check_float(f"fractions[{i}]", f, 0.0, 1.0, hi_open=True) * L))
                     for i, f in enumerate(fractions)})
    xr, yr = ds.x_val[:rank_examples], ds.y_val[:rank_examples]
    mask = (yr != IGNORE) if (yr.shape == xr.shape and ds.kind == "sequence") else None
    ranks = rankings(model, xr, y=yr, mask=mask, skip="skip" in methods) \
        if set(methods) & {"block_influence", "skip"} else None
    sim = layer_similarity(model, xr, mask=mask) if "angular" in methods else None
    rows = []
    jobs = [(m, k) for m in methods for k in ks]
    total = len(jobs) * (2 if heal is not None else 1)
    done = 0
    for method, k in jobs:
        if mon.stopped:
            break
        removed = _removal_order(method, k, ranks, sim, L, seed)
        pruned = prune(model, removed)
        label = ",".join(map(str, removed))
        ev = training.evaluate(pruned, ds, "val", eval_max)
        rows.append((method, k, k / L, label, False, ev["acc"], ev["loss"]))
        done += 1
        mon.report(done / total, f"{method}: {k} of {L} removed")
        if heal is not None and not mon.stopped:
            run = training.train(pruned, ds, heal, callbacks=[_Stop(mon)])
            if run.status == "cancelled":
                break
            ev = training.evaluate(pruned, ds, "val", eval_max)
            rows.append((method, k, k / L, label, True, ev["acc"], ev["loss"]))
            done += 1
            mon.report(done / total, f"{method}: {k} of {L} removed, healed")
    return pd.DataFrame(rows, columns=["method", "n_removed", "fraction", "removed", "healed", "acc", "loss"])


# ============================================================================ 3. execution strategies


def _check_span(n_layers: int, start, n) -> tuple[int, int]:
    if n_layers == 0:
        raise ValueError("model: it has no blocks to reorder, got n_layers = 0")
    start = checks.check_int("start", start, 0, n_layers - 1)
    n = checks.check_int("n", n, 1, None)
    if start + n > n_layers:
        raise ValueError(f"n: the span of {n} blocks from block {start} runs past the last block {n_layers - 1} "
                         f"(n_layers = {n_layers}); n must be at most {n_layers - start}")
    return start, n


def strategy_sequence(n_layers: int, strategy: str, start: int, n: int = 2, k: int = 2, seed: int = 0) -> list:
    """The block order an execution strategy runs, on the span of ``n`` blocks ``start .. start+n-1``.

    - ``skip``: the span left out; ``swap``: blocks ``start`` and ``start+1`` exchanged (``n = 2``);
    - ``reverse``: the span in reverse order; ``shuffle``: the span in a seeded random order other than its
      own (``seed``; an identity draw is drawn again);
    - ``parallel``: every block of the span reads the same input and their outputs are averaged
      (Sun, Pickett et al. 2025, "Transformer Layers as Painters"), repeated ``k`` times (``k = 1``: plain
      parallel; more: looped parallel);
    - ``loop``: the span run ``k`` times in a row.

    Items are block indices; a parallel step is a tuple of indices. ``k`` in ``[1, 16]``. Refused with a
    message naming the argument: a span past the last block, ``swap`` with ``n != 2``, ``reverse``,
    ``shuffle`` or ``parallel`` with ``n < 2``. ``docs/definitions.md#execution-strategies``.
    """
    strategy = checks.check_choice("strategy", strategy, STRATEGIES)
    n_layers = checks.check_int("n_layers", n_layers, 0, 256)
    start, n = _check_span(n_layers, start, n)
    k = checks.check_int("k", k, 1, MAX_LOOP)
    seed = checks.check_seed("seed", seed)
    if strategy == "swap" and n != 2:
        raise ValueError(f"n: swap exchanges two adjacent blocks, so n must be 2, got {n}")
    if strategy in ("reverse", "shuffle", "parallel") and n < 2:
        raise ValueError(f"n: {strategy} needs a span of at least 2 blocks, got {n}")
    before, span, after = list(range(start)), list(range(start, start + n)), list(range(start + n, n_layers))
    if strategy == "skip":
        mid: list = []
    elif strategy in ("swap", "reverse"):
        mid = span[::-1]
    elif strategy == "shuffle":
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=g).tolist()
        while perm == list(range(n)):            # a new order: the identity is drawn again
            perm = torch.randperm(n, generator=g).tolist()
        mid = [span[i] for i in perm]
    elif strategy == "parallel":
        mid = [tuple(span)] * k
    else:
        mid = span * k
    return before + mid + after


def sequence_label(sequence) -> str:
    """A readable block order: ``"0 1 (2|3) 4"`` (a parallel step in parentheses); ``"-"`` for none."""
    parts = ["(" + "|".join(map(str, it)) + ")" if isinstance(it, tuple) else str(it) for it in sequence]
    return " ".join(parts) if parts else "-"


def _check_sequence(sequence, n_layers: int) -> list:
    if isinstance(sequence, (str, bytes)) or not isinstance(sequence, Iterable):
        raise ValueError(f"sequence must be a list of block indices (or tuples of them, run in parallel), "
                         f"got {sequence!r:.80}")
    out = []
    for i, it in enumerate(sequence):
        if isinstance(it, (tuple, list)):
            if not it:
                raise ValueError(f"sequence[{i}]: a parallel step needs at least one block")
            out.append(tuple(checks.check_int(f"sequence[{i}][]", v, 0, n_layers - 1) for v in it))
        else:
            out.append(checks.check_int(f"sequence[{i}]", it, 0, n_layers - 1))
    if len(out) > 16 * 256:
        raise ValueError(f"sequence has {len(out)} steps; at most {16 * 256}")
    return out


def run_sequence(model: nn.Module, x, sequence) -> torch.Tensor:
    """Logits ``(B, T, V)`` (vector models ``(B, K)``) of ``model`` run along ``sequence`` instead of its own order.

    ``sequence``: block indices, each may appear any number of times or not at all; a tuple runs its
    blocks in parallel on the same input and averages their outputs. ``list(range(L))`` is the model's own
    forward. Eval mode, no gradients; ``model`` is not changed. ``docs/definitions.md#execution-strategies``.
    """
    run = BlockRunner(model)
    seq = _check_sequence(sequence, run.n_layers)
    with _inference(run.model):
        xb = run.batch(x)
        out = run.logits(run.run(seq, run.begin(xb)))
    return out if run.ad.family == "transformer" else out[:, 0]


def _default_spans(strategy: str, L: int) -> list[tuple[int, int]]:
    if strategy == "swap":
        return [(s, 2) for s in range(L - 1)]
    lo = 1 if strategy in ("skip", "loop") else 2
    return [(s, n) for n in range(lo, L + 1) for s in range(L - n + 1)]


def strategies(model: nn.Module, x, y=None, strategies=STRATEGIES, spans=None, k: int = 2, seed: int = 0,
               batch_size: int | None = 256, monitor=None) -> pd.DataFrame:
    """Accuracy and loss of ``model`` run under each execution strategy on each span: one forward each.

    ``spans``: ``(start, n)`` pairs (default: for ``swap`` every adjacent pair, for ``skip``/``loop`` every
    span, for the others every span of at least 2 blocks; spans a strategy cannot take are left out of the
    default, refused when given). ``y``: targets ``(B, T)`` with ``IGNORE`` at unscored positions (default
    for sequences: the next token), labels ``(B,)`` for vector models. The first row is the model's own
    order (``strategy = "full"``). Returns ``strategy, start, n, k, order, length, acc, loss`` (``length``:
    block applications, a parallel step counting its blocks). ``docs/definitions.md#execution-strategies``.
    """
    mon = _monitor.resolve(monitor)
    run = BlockRunner(model)
    L = run.n_layers
    names = list(checks.check_choices("strategies", strategies, STRATEGIES))
    k = checks.check_int("k", k, 1, MAX_LOOP)
    seed = checks.check_seed("seed", seed)
    batch_size = _batch_size(batch_size)
    if L == 0:
        raise ValueError("model: it has no blocks to reorder, got n_layers = 0")
    plan = [("full", 0, L, 1, list(range(L)))]
    for s in names:
        if spans is None:
            chosen = _default_spans(s, L)
        else:
            if isinstance(spans, (str, bytes)) or not isinstance(spans, Iterable):
                raise ValueError(f"spans must be a list of (start, n) pairs, got {spans!r:.80}")
            chosen = []
            for i, sp in enumerate(spans):
                if not isinstance(sp, (tuple, list)) or len(sp) != 2:
                    raise ValueError(f"spans[{i}] must be a (start, n) pair, got {sp!r:.80}")
                chosen.append((sp[0], sp[1]))
        for start, n in chosen:
            kk = k if s in ("loop", "parallel") else 1
            plan.append((s, int(start), int(n), kk, strategy_sequence(L, s, start, n, kk, seed)))
    rows = []
    with _inference(run.model):
        xb = run.batch(x)
        tgt = _targets_for(run, xb, y)
        chunks = list(_chunks(len(xb), batch_size))
        starts = [run.begin(xb[sl]) for sl in chunks] if len(chunks) == 1 else None
        for j, (s, start, n, kk, seq) in enumerate(plan):
            if mon.stopped:
                break
            parts = []
            for c, sl in enumerate(chunks):
                h0 = starts[c] if starts is not None else run.begin(xb[sl])
                parts.append(_tally(run, run.run(seq, h0), tgt[sl]))
            acc, loss = _acc_loss(parts)
            length = sum(len(it) if isinstance(it, tuple) else 1 for it in seq)
            rows.append((s, start, n, kk, sequence_label(seq), length, acc, loss))
            mon.report((j + 1) / len(plan), f"{s} {start}..{start + n - 1}")
    return pd.DataFrame(rows, columns=["strategy", "start", "n", "k", "order", "length", "acc", "loss"])


# ============================================================================ 4. oracle depth per example


@dataclass
class Oracle:
    """Result of :func:`oracle_depth`.

    ``examples``: one row per example: ``example, hops, full_correct, oracle_length, chain`` (``oracle_length``
    NaN and ``chain`` empty when no chain of the search space answers it). ``method``: ``"exhaustive"`` or
    ``"greedy"``; ``n_chains``: chains evaluated; ``n_layers``: ``L``.
    """

    examples: pd.DataFrame
    method: str
    n_chains: int
    n_layers: int

    def histogram(self) -> pd.DataFrame:
        """``hops, oracle_length, count, share`` (share within the hop count; ``oracle_length`` -1: no chain)."""
        df = self.examples.assign(oracle_length=self.examples["oracle_length"].fillna(-1).astype(int))
        out = df.groupby(["hops", "oracle_length"]).size().rename("count").reset_index()
        out["share"] = out["count"] / out.groupby("hops")["count"].transform("sum")
        return out

    def summary(self) -> pd.DataFrame:
        """Per hop count: ``n, full_acc, mean_oracle_length, shorter_share`` (share of the examples the full
        model answers that a shorter chain also answers) and ``fixed_share`` (share of those it gets wrong
        that some chain answers): CoLa's two claims."""
        rows = []
        for hops, g in self.examples.groupby("hops"):
            right, wrong = g[g["full_correct"]], g[~g["full_correct"]]
            rows.append((hops, len(g), float(g["full_correct"].mean()), float(g["oracle_length"].mean()),
                         float((right["oracle_length"] < self.n_layers).mean()) if len(right) else float("nan"),
                         float(wrong["oracle_length"].notna().mean()) if len(wrong) else float("nan")))
        return pd.DataFrame(rows, columns=["hops", "n", "full_acc", "mean_oracle_length", "shorter_share",
                                           "fixed_share"])


def _example_correct(run: BlockRunner, h: torch.Tensor, sel: torch.Tensor, tgt_sel: torch.Tensor,
                     owner: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` bool: every scored token of each example right, reading only the scored positions of ``h``."""
    flat = _tokens(h)[sel]                                   # (S, C) scored positions
    logits = run.ad.unembed(flat)
    wrong = (logits.argmax(-1) != tgt_sel).long()
    bad = torch.zeros(n, dtype=torch.long, device=h.device).index_add_(0, owner, wrong)
    return bad == 0


def _chain_str(chain) -> str:
    return " ".join(map(str, chain))


def oracle_depth(model: nn.Module, x, y=None, hops=None, repeat: bool = True, exhaustive_max: int = EXHAUSTIVE_MAX,
                 monitor=None) -> Oracle:
    """Per example, the shortest chain of blocks that still answers it correctly (after CoLa, Li et al. 2025).

    Search space (``L`` blocks): chains ``c = (0^{m_0}, 1^{m_1}, ..., (L-1)^{m_{L-1}})``, block ``l`` run
    ``m_l`` times in a row, ``m_l`` in ``{0, 1, 2}`` (skipped, once, repeated once; ``repeat=False``: ``{0, 1}``),
    blocks in their own order: ``3^L`` chains (``2^L``), lengths ``0 .. 2L``. An example is answered when
    every scored token's argmax is its target. Its oracle length is the smallest ``|c|`` of a chain that
    answers it (the chain: the first such in the order skip < once < twice, block 0 deciding first).

    ``L <= exhaustive_max`` (6): every chain, depth first, sharing prefixes (``3^L - 1`` block applications
    for all examples at once). Deeper: greedy. Examples the full chain gets wrong first try each one-repeat
    chain (the first that answers wins, else no chain); then, repeatedly, each example moves to the first
    chain with one step of its current chain deleted that still answers it, until none does. The greedy
    length is an upper bound of the oracle's.

    ``y``: targets ``(B, T)`` with ``IGNORE`` (default for sequences: next token) or labels ``(B,)``.
    ``hops``: ``(B,)`` difficulty per example for the histogram (default 0). Returns :class:`Oracle`.
    ``docs/definitions.md#oracle-depth``.
    """
    mon = _monitor.resolve(monitor)
    checks.check_bool("repeat", repeat)
    exhaustive_max = checks.check_int("exhaustive_max", exhaustive_max, 0, 10)
    run = BlockRunner(model)
    L = run.n_layers
    with _inference(run.model):
        xb = run.batch(x)
        tgt = _targets_for(run, xb, y)
        N = len(xb)
        hv = np.zeros(N, dtype=int) if hops is None else np.asarray(hops)
        if hv.shape != (N,):
            raise ValueError(f"hops must have one value per example, shape ({N},), got {tuple(hv.shape)}")
        scored = tgt != IGNORE
        has = scored.any(1)
        if L <= exhaustive_max:
            best, chains, n_chains = _exhaustive(run, xb, tgt, repeat, mon)
            method = "exhaustive"
        else:
            best, chains, n_chains = _greedy(run, xb, tgt, repeat, mon)
            method = "greedy"
        full = _example_correct_batch(run, xb, tgt, list(range(L)))
    length = [float(len(c)) if c is not None else float("nan") for c in chains]
    df = pd.DataFrame({"example": np.arange(N), "hops": hv, "full_correct": full.cpu().numpy(),
                       "oracle_length": length, "chain": [_chain_str(c) if c is not None else "" for c in chains]})
    df = df[has.cpu().numpy()].reset_index(drop=True)
    return Oracle(df, method, n_chains, L)


def _scored_parts(tgt: torch.Tensor):
    sel = tgt != IGNORE
    owner = torch.arange(tgt.shape[0], device=tgt.device)[:, None].expand_as(tgt)[sel]
    return sel, tgt[sel], owner


def _example_correct_batch(run: BlockRunner, xb, tgt, chain) -> torch.Tensor:
    sel, ts, owner = _scored_parts(tgt)
    return _example_correct(run, run.run(chain, run.begin(xb)), sel, ts, owner, len(xb))


def _exhaustive(run: BlockRunner, xb, tgt, repeat: bool, mon):
    """Depth-first over the multiplicities ``m_0, m_1, ...`` (skip first), sharing prefixes. A subtree whose
    chain is already as long as every remaining example's best is cut, and only the examples a subtree
    can still improve (best > its prefix length) are carried into it, so solved examples cost nothing."""
    L, N = run.n_layers, len(xb)
    best = torch.full((N,), 10**9, dtype=torch.long)
    found: list = [None] * N
    total = (3 if repeat else 2) ** L
    count = [0]

    def leaf(h, idx, chain):
        sel, ts, owner = _scored_parts(tgt[idx])
        ok = _example_correct(run, h, sel, ts, owner, len(idx)).cpu()
        better = ok & (best[idx] > len(chain))
        for i in idx[better].tolist():
            best[i] = len(chain)
            found[i] = list(chain)

    def dfs(l, h, idx, extra, chain):
        if mon.stopped:
            return
        keep = best[idx] > len(chain)
        if not bool(keep.any()):
            count[0] += (3 if repeat else 2) ** (L - l)
            return
        if not bool(keep.all()):
            idx, h = idx[keep], h[keep.to(h.device)]
            if not run.native:
                run.begin(xb[idx.to(xb.device)])
                extra = run._extra
        if l == L:
            leaf(h, idx, chain)
            count[0] += 1
            mon.report(min(1.0, count[0] / total), f"{count[0]} of {total} chains")
            return
        dfs(l + 1, h, idx, extra, chain)
        run._extra = extra
        h1 = run.block(l, h)
        dfs(l + 1, h1, idx, extra, chain + [l])
        if repeat:
            run._extra = extra
            h2 = run.block(l, h1)
            dfs(l + 1, h2, idx, extra, chain + [l, l])

    h0 = run.begin(xb)
    dfs(0, h0, torch.arange(N), run._extra, [])
    return best, found, count[0]


def _greedy(run: BlockRunner, xb, tgt, repeat: bool, mon):
    L, N = run.n_layers, len(xb)
    full = list(range(L))
    n_chains = [0]

    def answers(idx: list[int], chain) -> torch.Tensor:
        n_chains[0] += 1
        return _example_correct_batch(run, xb[idx], tgt[idx], chain)

    current: list = [None] * N
    ok = answers(list(range(N)), full)
    for i in ok.nonzero().flatten().tolist():
        current[i] = full
    wrong = [i for i in range(N) if current[i] is None]
    if repeat and wrong:
        for l in range(L):
            if not wrong or mon.stopped:
                break
            chain = full[:l + 1] + [l] + full[l + 1:]
            got = answers(wrong, chain)
            for i, g in zip(list(wrong), got.tolist()):
                if g:
                    current[i] = chain
            wrong = [i for i in wrong if current[i] is None]
    active = {i for i in range(N) if current[i] is not None}
    rounds = 0
    while active and not mon.stopped:
        groups: dict = {}
        for i in active:
            groups.setdefault(tuple(current[i]), []).append(i)
        moved = set()
        for chain, idx in groups.items():
            chain = list(chain)
            pending = list(idx)
            tried = set()
            for j in range(len(chain)):
                cand = chain[:j] + chain[j + 1:]
                if tuple(cand) in tried or not pending:
                    continue
                tried.add(tuple(cand))
                got = answers(pending, cand)
                for i, g in zip(list(pending), got.tolist()):
                    if g:
                        current[i] = cand
                        moved.add(i)
                pending = [i for i in pending if i not in moved]
        active = moved
        rounds += 1
        mon.report(min(1.0, rounds / (2 * L)), f"greedy round {rounds}")
    best = torch.tensor([len(c) if c is not None else 10**9 for c in current])
    return best, current, n_chains[0]


def hop_tagged_khop(hops=(1, 2, 3), nodes: int = 8, queries: int = 1, n_train: int = 6000, n_val: int = 256,
                    seed: int = 0):
    """k-hop pointer chasing (table layout) with several hop counts in one dataset: ``(dataset, val_hops)``.

    Each sequence starts with a token naming its hop count (``"#1"``, ``"#2"``, ...), then the table layout of
    :func:`workbench.data.load` ``("khop", layout="table")``; the hop counts alternate (example ``i`` has
    ``hops[i % len(hops)]``), each drawn from its own seed. ``val_hops`` ``(n_val,)`` is the hop count of each
    validation example (the difficulty axis of :func:`oracle_depth`). The dataset is built here, not by
    ``data.load``, so its runs are not meant for the run store. ``docs/definitions.md#oracle-depth``.
    """
    from ..core.data import Dataset, load

    if isinstance(hops, (str, bytes)) or not isinstance(hops, Iterable):
        raise ValueError(f"hops must be a list of hop counts, got {hops!r:.80}")
    hops = [checks.check_int(f"hops[{i}]", h, 1, 8) for i, h in enumerate(hops)]
    if not hops or len(set(hops)) != len(hops):
        raise ValueError(f"hops must list distinct hop counts, got {hops}")
    n_train = checks.check_int("n_train", n_train, len(hops), 1_000_000)
    n_val = checks.check_int("n_val", n_val, len(hops), 100_000)
    seed = checks.check_seed("seed", seed)
    K = len(hops)
    parts = [load("khop", hops=h, nodes=nodes, queries=queries, layout="table", n_train=max(10, -(-n_train // K)),
                  n_val=max(10, -(-n_val // K)), seed=seed + 1000 * j) for j, h in enumerate(hops)]
    base = parts[0]
    vocab = list(base.vocab) + [f"#{h}" for h in hops]

    def merge(split: str, n: int):
        xs, ys = [], []
        for j, p in enumerate(parts):
            x, y = p.split(split)
            tag = torch.full((len(x), 1), len(base.vocab) + j, dtype=x.dtype)
            xs.append(torch.cat([tag, x], 1))
            ys.append(torch.cat([torch.full((len(y), 1), IGNORE, dtype=y.dtype), y], 1))
        # interleave: example i comes from part i % K
        x = torch.stack(xs, 1).reshape(-1, xs[0].shape[1])[:n]
        y = torch.stack(ys, 1).reshape(-1, ys[0].shape[1])[:n]
        return x, y

    x_tr, y_tr = merge("train", n_train)
    x_va, y_va = merge("val", n_val)
    val_hops = np.array([hops[i % K] for i in range(n_val)])
    ds = Dataset("khop", "sequence", x_tr, y_tr, x_va, y_va, len(vocab),
                 f"k-hop pointer chasing (table layout, {nodes} nodes) with hop counts {hops} tagged by a first token: "
                 f"{n_train} train / {n_val} val sequences of length {x_tr.shape[1]}", vocab,
                 {"hops_tagged": hops, "nodes": nodes, "queries": queries, "n_train": n_train, "n_val": n_val,
                  "seed": seed})
    return ds, val_hops


# ============================================================================ 5. the curse of depth


def _jac_dev(run: BlockRunner, l: int, h: torch.Tensor, n_directions: int, g: torch.Generator) -> torch.Tensor:
    """``(n_directions, B)`` of ``||(J_l - I) v||^2`` for random unit ``v`` per example (over all its positions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    shape = h.shape
    for _ in range(n_directions):
        v = torch.randn(shape, generator=g, dtype=torch.float32).to(device=h.device, dtype=h.dtype)
        flat = v.reshape(shape[0], -1)
        v = (flat / flat.norm(dim=1, keepdim=True).clamp_min(EPS)).reshape(shape)
        with sdpa_kernel([SDPBackend.MATH]):
            _, jv = torch.func.jvp(lambda t: run.block(l, t), (h,), (v,))
        out.append((jv - v).float().reshape(shape[0], -1).pow(2).sum(1))
    return torch.stack(out)


def depth_profile(model: nn.Module, x, mask=None, n_directions: int = 4, skip: bool = True, y=None, seed: int = 0,
                  batch_size: int | None = 256, monitor=None) -> pd.DataFrame:
    """Per layer: the measures of the curse of depth (Sun et al. 2025).

    With ``h_l`` the residual entering block ``l`` (``h_L`` final), per token, averaged over tokens
    (``mask`` restricts them):

    - ``resid_norm``: ``||h_l||`` for ``l = 0 .. L`` (the variance growth of Pre-LN);
    - ``norm_growth``: ``||h_{l+1}|| / ||h_l||``; ``cos_in_out``: ``cos(h_l, h_{l+1})`` (= ``1 - BI_l``);
    - ``rel_norm``: our relative contribution ``||h_{l+1} - h_l|| / ||h_l||``
      (:func:`workbench.residual.contributions`, sublayer ``layer``);
    - ``jac_dev``: ``sqrt(E ||(J_l - I) v||^2)`` over ``n_directions`` seeded random directions ``v`` per
      example, uniform on the unit sphere of the example's whole ``(T, C)`` residual, ``J_l`` the block's
      Jacobian at ``h_l`` (``torch.func.jvp``, attention on the math kernel): an estimate of
      ``||J_l - I||_F / sqrt(T C)``, 0 for a block that adds a constant, small for a block near the identity
      (all positions, ``mask`` not applied);
    - ``skip_l2`` (``skip=True``): the output change when the block is skipped (``l2`` of
      :func:`workbench.residual.skip_effects`), how much the output still needs the block.

    Returns ``layer, metric, value``; a stopped monitor ends it early with the rows measured so far.
    ``docs/definitions.md#depth-profile``.
    """
    mon = _monitor.resolve(monitor)
    n_directions = checks.check_int("n_directions", n_directions, 0, 256)
    checks.check_bool("skip", skip)
    seed = checks.check_seed("seed", seed)
    batch_size = _batch_size(batch_size)
    run = BlockRunner(model)
    L = run.n_layers
    if L == 0:
        raise ValueError("model: a depth profile needs at least one block, got n_layers = 0")
    g = torch.Generator().manual_seed(seed)
    sums: dict = {}
    count, jcount = 0, 0

    def add(key, v):
        sums[key] = sums.get(key, 0.0) + float(v)

    with _inference(run.model):
        xb = run.batch(x)
        m_all = _mask_for(run, xb, mask)
        for sl in _chunks(len(xb), batch_size):
            m = m_all[sl]
            h = run.begin(xb[sl])
            hs = [h]
            for i in range(L):
                hs.append(run.block(i, hs[-1]))
            norms = [_tokens(t).float().norm(dim=-1) for t in hs]
            count += int(m.sum())
            for l in range(L + 1):
                add((l, "resid_norm"), norms[l][m].double().sum())
            for l in range(L):
                a, b = _tokens(hs[l]).float(), _tokens(hs[l + 1]).float()
                add((l, "norm_growth"), (norms[l + 1] / norms[l].clamp_min(EPS))[m].double().sum())
                cos = (a * b).sum(-1) / (norms[l].clamp_min(EPS) * norms[l + 1].clamp_min(EPS))
                add((l, "cos_in_out"), cos[m].double().sum())
            if n_directions and not mon.stopped:
                jcount += n_directions * (sl.stop - sl.start)
                for l in range(L):
                    if mon.stopped:
                        break
                    add((l, "jac_dev"), _jac_dev(run, l, hs[l], n_directions, g).double().sum())
                    mon.report((l + 1) / (L + 2), f"||J - I|| of block {l}")
    if count == 0:
        raise ValueError("mask: no token is selected, so there is nothing to average")
    rows = []
    for (l, metric), v in sums.items():
        if metric == "jac_dev":
            rows.append((l, metric, math.sqrt(v / jcount)))
        else:
            rows.append((l, metric, v / count))
    if not mon.stopped:
        contrib = contributions(model, x, mask=mask, batch_size=batch_size)
        contrib = contrib[contrib["sublayer"] == "layer"]
        rows += [(int(r.layer), "rel_norm", float(r.rel_norm)) for r in contrib.itertuples()]
        mon.report((L + 1) / (L + 2), "relative contributions")
    if skip and not mon.stopped:
        eff = skip_effects(model, x, y=y, mask=mask, batch_size=batch_size)
        rows += [(int(r.skipped), "skip_l2", float(r.l2)) for r in eff.output.itertuples()]
    order = {"resid_norm": 0, "norm_growth": 1, "cos_in_out": 2, "rel_norm": 3, "jac_dev": 4, "skip_l2": 5}
    df = pd.DataFrame(rows, columns=["layer", "metric", "value"])
    return df.sort_values(["metric", "layer"], key=lambda c: c.map(order) if c.name == "metric" else c,
                          ignore_index=True)


def deep_half(profile: pd.DataFrame, metrics=("rel_norm", "jac_dev", "skip_l2")) -> pd.DataFrame:
    """How much of each per-layer measure the deep half carries: ``metric, shallow, deep, deep_share``.

    ``shallow``/``deep``: the mean over blocks ``l < L/2`` and ``l >= L/2`` (the middle block of an odd
    stack counts as deep); ``deep_share = sum_deep / sum_all``. An idle deep half (the curse of depth) has
    a small ``deep_share`` of ``skip_l2``, ``rel_norm`` and ``jac_dev``. ``profile``: :func:`depth_profile`.
    """
    if not isinstance(profile, pd.DataFrame) or not {"layer", "metric", "value"} <= set(profile.columns):
        raise ValueError("profile must be a depth_profile table (columns layer, metric, value)")
    blocks = profile[profile["metric"] == "rel_norm"]["layer"]
    L = int(blocks.max()) + 1 if len(blocks) else int(profile["layer"].max())
    rows = []
    for metric in metrics:
        sel = profile[(profile["metric"] == metric) & (profile["layer"] < L)]
        if not len(sel):
            continue
        deep = sel["layer"] >= L / 2 - 1e-9 if L % 2 == 0 else sel["layer"] >= (L - 1) / 2
        v = sel["value"].clip(lower=0)
        total = float(v.sum())
        rows.append((metric, float(sel[~deep]["value"].mean()) if (~deep).any() else float("nan"),
                     float(sel[deep]["value"].mean()), float(v[deep].sum()) / total if total > 0 else float("nan")))
    return pd.DataFrame(rows, columns=["metric", "shallow", "deep", "deep_share"])


# ============================================================================ 7. effective depth


def width_for_params(dataset, n_layers: int, params: int, mlp_ratio: int = 2, **overrides):
    """The model config for ``dataset`` with ``n_layers`` blocks whose parameter count is closest to ``params``.

    The width ``d_model`` (a multiple of ``n_heads`` for Transformers, default 2 heads) is searched in
    ``[1, 1024]``; the MLP width is ``mlp_ratio * d_model`` (``d_mlp`` or ``d_hidden``). For a depth x
    width sweep at fixed parameters (Petty et al. 2024). ``overrides`` set other config fields.
    """
    from ..core.models import config_for, family_of

    n_layers = checks.check_int("n_layers", n_layers, 1, 256)
    params = checks.check_int("params", params, 1, 10**10)
    mlp_ratio = checks.check_int("mlp_ratio", mlp_ratio, 1, 64)
    seq = family_of(dataset).name == "transformer"
    heads = checks.check_int("n_heads", overrides.pop("n_heads", 2), 1, 256) if seq else 1
    best = None
    for d in range(heads, 1025, heads):
        size = {"d_mlp": mlp_ratio * d, "n_heads": heads} if seq else {"d_hidden": mlp_ratio * d}
        cfg = config_for(dataset, n_layers=n_layers, d_model=d, **size, **overrides)
        gap = abs(cfg.param_count() - params)
        if best is None or gap < best[0]:
            best = (gap, cfg)
        elif cfg.param_count() > params:
            break
    return best[1]


def _effective(heatmap: pd.DataFrame, L: int, threshold: float) -> dict:
    future = [0.0] * L
    for r in heatmap.itertuples():
        s = int(r.skipped)
        if np.isfinite(r.effect):
            future[s] = max(future[s], float(r.effect))
    peak = max(future) if future else 0.0
    if L < 2 or peak <= 0:
        return {"effective_depth": float("nan"), "ratio": float("nan"), "n_layers": L, "peak_layer": -1,
                "future_effect": future}
    s_star = int(np.argmax(future))
    d = next(s for s in range(s_star + 1, L + 1) if s == L or future[s] < threshold * peak)
    return {"effective_depth": float(d), "ratio": d / L, "n_layers": L, "peak_layer": s_star,
            "future_effect": future}


def effective_depth(model: nn.Module, x=None, y=None, mask=None, threshold: float = 0.5, effects=None,
                    batch_size: int | None = 256) -> dict:
    """The effective depth ``D`` of a model and its ratio ``D / L`` (after Csordas et al. 2025; Hu et al. 2025).

    From the skip heat-map of :func:`workbench.residual.skip_effects` (``E[s, l]``: mean relative change of
    block ``l``'s contribution when block ``s`` is skipped), the future effect of block ``s`` is
    ``F_s = max_{l > s} E[s, l]`` (``F_{L-1} = 0``: nothing follows it). With ``s* = argmax F``, the drop
    begins at ``D = min{s > s* : F_s < threshold F_{s*}}`` (``threshold`` 0.5): blocks ``0 .. D-1`` feed the
    computation of later blocks, blocks from ``D`` on mostly write to the output. ``ratio = D / L``; NaN for
    ``L < 2`` or when no block affects a later one. ``effects``: a :class:`~workbench.residual.SkipEffects`
    already computed (then ``x`` is not needed). Returns ``{effective_depth, ratio, n_layers, peak_layer,
    future_effect}``. ``docs/definitions.md#effective-depth``.
    """
    from ..residual.skip import SkipEffects

    threshold = checks.check_float("threshold", threshold, 0.0, 1.0, lo_open=True, hi_open=True)
    if effects is None:
        if x is None:
            raise ValueError("x is required when no effects are given")
        effects = skip_effects(model, x, y=y, mask=mask, batch_size=batch_size)
    if not isinstance(effects, SkipEffects) or effects.member_layers is not None:
        raise ValueError("effects must be the SkipEffects of one model (not a mixture's)")
    return _effective(effects.heatmap, effects.n_layers, threshold)


def group_runs(store, group: str, device=None) -> list:
    """The runs of a growth group (``grow(..., store=, group=)``), loaded from ``store`` in stage order."""
    checks.check_str("group", group, 200)
    listed = store.list()
    sel = listed[(listed["group_name"] == group) & listed["stage"].notna()]
    if not len(sel):
        raise ValueError(f"group: no stored run belongs to growth group {group!r}")
    sel = sel.sort_values("stage")
    return [store.load(rid, device=device) for rid in sel["run_id"]]


def effective_depth_stages(runs, x, y=None, mask=None, threshold: float = 0.5, monitor=None) -> pd.DataFrame:
    """The effective depth at every growth stage: ``stage, run_id, n_layers, effective_depth, ratio, peak_layer``.

    ``runs``: the stage runs of a growth group (:func:`group_runs`; each a Run whose model is that stage's,
    as loaded from the store) or models; the stage is ``run.meta["stage"]`` (else the position). The same
    ``x`` (and ``mask``) is read by every stage. ``docs/definitions.md#effective-depth``.
    """
    mon = _monitor.resolve(monitor)
    if isinstance(runs, (str, bytes)) or not isinstance(runs, Iterable):
        raise ValueError(f"runs must be a list of runs (or models), got {type(runs).__name__}")
    runs = list(runs)
    rows = []
    for i, r in enumerate(runs):
        if mon.stopped:
            break
        model = getattr(r, "model", r)
        meta = getattr(r, "meta", {}) or {}
        stage = meta.get("stage", i)
        L = len(getattr(model, "blocks", [])) if _is_native(model) else _read(model, f"runs[{i}]").n_layers
        res = effective_depth(model, x, y=y, mask=mask, threshold=threshold) if L >= 1 else \
            {"effective_depth": float("nan"), "ratio": float("nan"), "peak_layer": -1}
        rows.append((stage, getattr(r, "run_id", None), L, res["effective_depth"], res["ratio"], res["peak_layer"]))
        mon.report((i + 1) / len(runs), f"stage {stage}: {L} blocks")
    return pd.DataFrame(rows, columns=["stage", "run_id", "n_layers", "effective_depth", "ratio", "peak_layer"])
