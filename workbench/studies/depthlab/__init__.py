"""The depth lab: which blocks a residual model needs, in which order, how often, and where its depth idles.

Growth builds depth; this package asks the opposite questions of a trained model.

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

Files: ``runner`` (:class:`BlockRunner` and the scoring helpers early exit shares), ``similarity`` (Block
Influence, angular distance, rankings), ``pruning`` (prune and heal), ``execution`` (execution strategies),
``oracle`` (oracle depth, hop-tagged k-hop), ``profile`` (the curse of depth), ``effective`` (effective depth,
width for a parameter budget, growth groups).
"""
from __future__ import annotations

from .runner import BlockRunner
from .similarity import RANK_METHODS, Similarity, layer_similarity, Rankings, rankings
from .pruning import PRUNE_METHODS, prune, prune_run, prune_heal_curve
from .execution import STRATEGIES, MAX_LOOP, strategy_sequence, sequence_label, run_sequence, strategies
from .oracle import Oracle, oracle_depth, hop_tagged_khop
from .profile import depth_profile, deep_half
from .effective import width_for_params, effective_depth, effective_depth_stages, group_runs
from .oracle import EXHAUSTIVE_MAX  # noqa: F401 (depthlab.EXHAUSTIVE_MAX, as before)
from .similarity import POSITIONS  # noqa: F401 (depthlab.POSITIONS, as before)

__all__ = [
    "STRATEGIES", "RANK_METHODS", "PRUNE_METHODS", "MAX_LOOP", "BlockRunner", "Similarity",
    "layer_similarity", "Rankings", "rankings", "prune", "prune_run", "prune_heal_curve", "strategy_sequence",
    "sequence_label", "run_sequence", "strategies", "Oracle", "oracle_depth", "hop_tagged_khop",
    "depth_profile", "deep_half", "width_for_params", "effective_depth", "effective_depth_stages",
    "group_runs",
]
