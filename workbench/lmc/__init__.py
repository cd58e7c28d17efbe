"""Linear mode connectivity: interpolation curves, barriers, alignment, REPAIR, layer-wise LMC, instability.

``theta(alpha) = (1 - alpha) theta_A + alpha theta_B``. Curves are evaluated for all alphas
at once: the parameters are stacked along a leading axis and run through one module with
``torch.func.functional_call`` (under ``torch.vmap`` on GPUs; no model is rebuilt).
Our models normalise with LayerNorm only (per-example statistics, no running buffers),
so an interpolated model needs no statistics reset; BatchNorm models are refused.

Barriers (``barrier``) follow both public definitions (Git Re-Basin's endpoint mean and
Entezari/Frankle's linear one), on loss and on error. Alignment (``align``) permutes B
onto A with :mod:`workbench.permute`. ``repair`` is REPAIR (Jordan et al. 2022) adapted
to LayerNorm models; ``layerwise`` interpolates one group of parameters at a time
(Adilova et al. 2023); ``instability`` is Frankle et al.'s (2020) spawning experiment;
``plane`` evaluates the loss over the plane through three models.
"""
from __future__ import annotations

from .interpolation import curve, barrier, barrier_value, interpolate, plane, Plane, evaluate_params, Cancelled
from .alignment import align, repair, compare
from .layers import layerwise, layerwise_curves, layer_groups, barrier_estimate
from .fusion import fuse, transport_maps, fusion_curve
from .pairs import instability, train_pair
from .permute import check_same_architecture  # noqa: F401 (lmc.check_same_architecture, as before)

__all__ = [
    "curve", "barrier", "barrier_value", "interpolate", "align", "repair", "compare", "layerwise",
    "layerwise_curves", "layer_groups", "fuse", "transport_maps", "fusion_curve", "barrier_estimate",
    "instability", "plane", "Plane", "train_pair", "evaluate_params", "Cancelled",
]
