"""What each layer writes into the residual stream.

Every function takes a model and an input batch and works on every model an adapter of
:mod:`workbench.hooks` reads: both model families of :mod:`workbench.models` and a Hugging Face
``GPT2LMHeadModel`` (:mod:`workbench.adapters.hf_gpt2` maps GPT-2's modules onto the same hook names):

==========================  ==================================================================
:func:`record`              context manager caching hook-point activations (detached)
:func:`contributions`       relative contribution norm and cosine per layer and sublayer
:func:`decompose`           the final residual as a sum of labelled components
:func:`logit_attribution`   direct logit attribution of each component to a target token
:func:`logit_lens`          per layer: KL to the final distribution, top-1 agreement, loss
:func:`skip_effects`        skipped x affected layer heat-map and output change per skip
:func:`integrated_gradients` per-layer IG (sequence-mean baseline): layer x position table
:func:`depth_score`         centre of mass of the skip effect on the output; :func:`depth_vs_difficulty`
:func:`erase`               token erasure (mean residual) and its downstream change
:func:`layer_map`           linear maps between the layers of two models, relative error per pair
:func:`patch`               activation patching: recovery per layer and position
:func:`estimate`            rough bytes and seconds of an analysis before it runs
:func:`report`              all of them at once: :class:`DepthReport` (as one HTML file: ``figures.residual.save_depth_report``)
==========================  ==================================================================

Hook names follow :mod:`workbench.models` (TransformerLens style): ``embed_out``,
``pos_embed_out``, ``blocks.{l}.resid_pre``, ``blocks.{l}.attn_out``, ``blocks.{l}.resid_mid``,
``blocks.{l}.mlp_out``, ``blocks.{l}.resid_post`` (``blocks.{l}.block_out`` in residual MLPs),
``features`` (final-norm output), plus ``blocks.{l}.attn.z``: the per-head attention outputs
``(B, T, H, D)`` entering the output projection (used for per-head decompositions).

Hooking lives in :mod:`workbench.hooks` (``wb.hooks.record``, ``wb.hooks.adapter``); the old aliases
``wb.residual.record``, ``adapter``, ``sites`` and ``ActivationCache`` still resolve, with a
DeprecationWarning.

Definitions (Csordas et al. 2025, "Do Language Models Use Their Depth Efficiently?"), per
token and then averaged over tokens, with ``x_l`` the residual entering layer ``l``, ``a_l``
its attention output, ``m_l`` its MLP output and ``y_l`` the residual leaving it:

- attention: ``||a_l|| / ||x_l||`` and ``cos(a_l, x_l)``
- MLP: ``||m_l|| / ||x_l + a_l||`` and ``cos(m_l, x_l + a_l)``
- whole layer: ``||y_l - x_l|| / ||x_l||`` and ``cos(y_l - x_l, x_l)``

Logit mixtures (:class:`workbench.compose.LogitMixture`) have one residual stream per member.
:func:`contributions`, :func:`logit_attribution`, :func:`logit_lens` and :func:`skip_effects` take a
mixture directly and return the same tables with a ``member`` column (member index ``k``), measured
inside the mixture: attribution scales each member's components by its weight, the lens and the
skip effects compare with the mixture's output distribution. See :func:`is_mixture`.

Norm denominators are clamped at ``EPS = 1e-6``. All functions run in eval mode without
gradients (the model's mode is restored afterwards) on the model's own device.

Definitions: ``docs/definitions.md#relative-contribution``, ``#decomposition``, ``#logit-attribution``,
``#logit-lens``, ``#skip-effects``, ``#local-skip``, ``#parallel-blocks``, ``#residual-memory``,
``#integrated-gradients``, ``#depth-score``, ``#erasure``, ``#layer-map``, ``#patching``.
"""
from __future__ import annotations

from .batch import EPS, next_token_targets
from .contributions import Decomposition, contributions, decompose, logit_attribution
from .interventions import integrated_gradients, Erasure, erase, layer_map, patch, PATCH_SITES
from .lens import logit_lens
from .mixtures import is_mixture
from .report import estimate, DepthReport, report
from .skip import SkipEffects, skip_effects, depth_score, depth_vs_difficulty

__all__ = [
    "EPS", "Decomposition", "SkipEffects", "contributions", "decompose", "logit_attribution", "logit_lens",
    "skip_effects", "next_token_targets", "is_mixture", "integrated_gradients", "depth_score",
    "depth_vs_difficulty", "Erasure", "erase", "layer_map", "patch", "PATCH_SITES", "estimate", "DepthReport", "report",
]


_MOVED_TO_HOOKS = ("record", "adapter", "sites", "ActivationCache")


def __getattr__(name: str):
    if name in _MOVED_TO_HOOKS:
        import warnings

        from .. import hooks

        warnings.warn(f"workbench.residual.{name} is workbench.hooks.{name}; the residual alias will go",
                      DeprecationWarning, stacklevel=2)
        return getattr(hooks, name)
    raise AttributeError(f"module 'workbench.residual' has no attribute {name!r}")
