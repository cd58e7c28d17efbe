"""Interventions at one (layer, token) of the residual stream: erase it, skip the layer from that token on,
or patch the clean run's residual into a corrupt run; the change downstream and at the output.

The (layer, token) is the stream view's focus (a click on its lens heat-map sets it and intervenes).
"""
from __future__ import annotations

import panel as pn
import param

from ...core import checks
from ... import residual
from ...figures import interventions as ifigs
from ...figures import residual as figs
from .base import ModelInput, View, as_monitor
from .stream import StreamView

__all__ = ["Interventions", "INTERVENTIONS", "intervention_job", "NEEDS_CORRUPT"]

INTERVENTIONS = ["erase", "skip from here", "patch"]
NEEDS_CORRUPT = ("patch needs a corrupt input: choose 'Typed text' and type the corrupt text (same number of "
                 "tokens)")


def sequence_model(subject: ModelInput, what: str):
    """The one sequence model of ``subject`` (a mixture or a vector model is refused, saying why)."""
    model = subject.one_model(what)
    if not subject.sequence:
        raise ValueError(f"{what} needs a sequence model (token positions); this is a vector model")
    return model


def intervention_job(monitor, subject: ModelInput, kind: str, layer: int, position: int):
    """``(kind, layer, position, tokens, result)``: ``residual.erase`` (an :class:`~workbench.residual.Erasure`),
    the skip of ``layer`` from ``position`` on (``(heat-map rows, output rows)``) or ``residual.patch``."""
    model = sequence_model(subject, "an intervention")
    x = subject.x
    as_monitor(monitor).report(0.1, f"{kind} at layer {layer}, token {position}")
    if kind == "erase":
        result = residual.erase(model, x, layer, position)
    elif kind == "skip from here":
        sk = residual.skip_effects(model, x, from_position=position)
        heat = sk.heatmap[sk.heatmap["skipped"] == layer].reset_index(drop=True)
        out = sk.output[sk.output["skipped"] == layer].reset_index(drop=True)
        result = (heat, out.assign(position=position))
    else:
        if subject.corrupt is None:
            raise ValueError(NEEDS_CORRUPT)
        result = residual.patch(model, x, subject.corrupt)
    return kind, layer, position, subject.tokens, result


class Interventions(View):
    """Erase, skip or patch at the stream view's (layer, token): ``kind`` is one of :data:`INTERVENTIONS`."""

    stream = param.ClassSelector(class_=StreamView, doc="whose layer and position are the focus")
    kind = param.String(default=INTERVENTIONS[0], doc="one of INTERVENTIONS")

    jobs = {"intervention": intervention_job}
    title = "Interventions"

    def __init__(self, host=None, **params):
        super().__init__(host, **params)
        self.kind_buttons = pn.widgets.RadioButtonGroup.from_param(self.param.kind, options=INTERVENTIONS,
                                                                   name="intervention")
        self.button = pn.widgets.Button(label="Intervene at (layer, token)", width=200)
        self.button.on_click(lambda _: self.run("intervention", wait=False))
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.pane = pn.pane.Plotly(figs.erasure_heatmap(None), sizing_mode="stretch_width", height=340)
        self.out_pane = pn.pane.Plotly(ifigs.output_change_figure(None), sizing_mode="stretch_width", height=340)
        self.last = None    # (kind, layer, position, result)

    def choices(self, action: str) -> dict:
        return {"kind": checks.check_choice("intervention", self.kind, INTERVENTIONS),
                "layer": checks.check_int("layer", self.stream.layer, 0),
                "position": checks.check_int("token position", self.stream.position, 0)}

    def show(self, action: str, result) -> None:
        kind, layer, pos, tokens, result = result
        self.last = (kind, layer, pos, result)
        with pn.io.hold():
            if kind == "erase":
                self.pane.object = figs.erasure_heatmap(result.residual, tokens)
                self.out_pane.object = ifigs.output_change_figure(
                    result.output, tokens, title=f"Output change after erasing layer {layer}, token {pos}")
                worst = result.output.loc[result.output["kl"].idxmax()]
                self.note.object = (
                    f"**Erased** the residual entering layer {layer} at token {pos} (replaced by the mean residual): "
                    f"largest output change at token {int(worst.position)}, KL {worst.kl:.3f}.")
            elif kind == "skip from here":
                heat, out = result
                self.pane.object = figs.skip_heatmap(heat, None)
                self.out_pane.object = ifigs.output_change_figure(
                    out, tokens, title=f"Output change with layer {layer} skipped from token {pos} on")
                self.note.object = (
                    f"**Skipped** layer {layer} from token {pos} on: later layers' contributions change by up to "
                    f"{heat['effect'].max() if len(heat) else 0.0:.3f} (relative); output KL up to "
                    f"{out['kl'].max():.3f}.")
            else:
                self.pane.object = figs.with_shapes(figs.patch_heatmap(result, tokens).to_dict(),
                                                    [figs.cell_box(pos, layer)])
                self.out_pane.object = ifigs.output_change_figure(None)
                cell = result[(result["layer"] == layer) & (result["position"] == pos)]["recovery"]
                at = f"{float(cell.iloc[0]):.2f}" if len(cell) else "n/a"
                self.note.object = (
                    f"**Patched** the clean residual into the corrupt run: recovery at layer {layer}, token {pos} "
                    f"= {at} (1: the clean answer fully back; 0: no effect).")

    def code_lines(self) -> list[str]:
        layer, pos = int(self.stream.layer), int(self.stream.position)
        if self.kind == "erase":
            return [f"er = wb.residual.erase(model, x, {layer}, {pos})   # .residual: layer x position change; "
                    ".output: KL per position",
                    "figs.erasure_heatmap(er.residual, tokens)"]
        if self.kind == "skip from here":
            return [f"sk = wb.residual.skip_effects(model, x, from_position={pos})",
                    f"sk.output[sk.output.skipped == {layer}]   # output change with layer {layer} skipped"]
        return ["if x_corrupt is not None:   # patch the clean residual into the corrupt run",
                "    table = wb.residual.patch(model, x, x_corrupt)   # layer, position, recovery",
                "    figs.patch_heatmap(table, tokens)"]

    def widgets(self) -> list:
        return [self.kind_buttons, self.button]

    def panels(self) -> list:
        return [self.note, pn.Row(self.pane, self.out_pane, sizing_mode="stretch_width")]
