"""Growing models in depth: add a block, stack the trained stack, freeze what is below.

Both model families share the shape ``embed -> blocks -> final_norm -> readout`` (see
:mod:`workbench.models`), so every operator here works on both without special cases.

- :func:`add_layer` inserts one block. ``init="zero"`` keeps the function exactly
  (Net2Net's identity init in residual form: the new block adds 0 to the stream);
  ``"copy"`` duplicates the neighbouring block; ``"random"`` uses the family's normal
  init; ``"fade"`` inserts a freshly initialised block behind a gate ``m`` that ramps
  0 -> 1 over ``fade_steps`` optimizer steps, ``out = m*block(x) + (1-m)*x`` (MSG).
- :func:`stack` is G_stack (Du et al. 2024): the trained stack repeated in order.
- :func:`freeze` / :func:`unfreeze`: frozen parameters have ``requires_grad=False``, so they
  get no gradient, are left out of a fresh optimizer and stay bitwise unchanged.
- :func:`rebuild_optimizer` makes the AdamW for the next stage: the trainable parameters,
  with the optimizer state (Adam moments, step counts) of parameters that existed before.
- :func:`grow_stage` runs one stage of a schedule (operation, freezing, optimizer, training);
  :func:`grow` is the loop over a schedule's stages (saving each, honouring a :class:`GrowControl`).

What differs between the families lives on the model classes (:mod:`workbench.models`): a
block's ``zero_output_()`` per norm placement, its fade-in gate (buffers, so a checkpoint
saved mid-fade reloads with the same function), the model's ``embedding_modules()``. Growth
is validated like a fresh config (field ranges and the memory budget ``WORKBENCH_MAX_MODEL_MB``)
before the model changes. The preset experiments are :data:`workbench.recipes.KHOP` and
:data:`workbench.recipes.TEXT`.

Definitions: ``docs/definitions.md#add-layer``, ``#zero-init``, ``#fade-in``, ``#g-stack``, ``#freeze``,
``#growth-comparison``.
"""
from __future__ import annotations

from .operators import (
    INITS, add_layer, stack, freeze, unfreeze, frozen_layers, block_table, rebuild_optimizer, FadeIn,
    fading_blocks, advance_fades,
)
from .schedule import OPS, PRESETS, khop_baseline, Stage, check_schedule, preset, schedule_depths
from .loop import GrowControl, grow_stage, StageResult, grow
from .natural import (
    CRITERIA, CANDIDATES, natural_score, expansion_candidates, score_candidates, check_criterion, trace_table,
    timeline_table,
)
from .width import WIDEN_INITS, widen, width_table
from .mixture import TemplateLinear, MixtureMLP, MIXTURE_INITS, mixture_grow, fit_mixture
from .comparison import compare, Comparison, depth_sweep, flops_to_reach

__all__ = [
    "INITS", "OPS", "PRESETS", "khop_baseline", "add_layer", "stack", "freeze", "unfreeze", "frozen_layers",
    "block_table", "rebuild_optimizer", "FadeIn", "fading_blocks", "advance_fades", "Stage", "check_schedule",
    "preset", "schedule_depths", "GrowControl", "grow_stage", "StageResult", "grow", "compare", "Comparison",
    "depth_sweep", "flops_to_reach", "WIDEN_INITS", "widen", "width_table", "TemplateLinear", "MixtureMLP",
    "MIXTURE_INITS", "mixture_grow", "fit_mixture", "CRITERIA", "CANDIDATES", "natural_score",
    "expansion_candidates", "score_candidates", "check_criterion", "trace_table", "timeline_table",
]
