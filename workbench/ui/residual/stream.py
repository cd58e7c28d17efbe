"""The residual stream view: what each layer writes, the logit lens heat-map, skip effects, direct
attribution, and growth stages side by side.

One :class:`Analysis` (every engine call) is made per (model, input); choosing a layer, a token, the lens
metric or a mixture's member only re-slices its tables and patches the cached figure dicts, so it stays
fast. :class:`StreamView` draws it; a click on a lens heat-map cell sets the layer and the token and
fires ``clicked`` (the page intervenes there).
"""
from __future__ import annotations

import time

import pandas as pd
import panel as pn
import param

from ... import hooks, residual
from ...figures import residual as figs
from ..text import escape_md
from .base import ModelInput, View, as_monitor

__all__ = ["Analysis", "StreamView", "analysis_job", "ANALYSIS_CODE"]

ANALYSIS_CODE = """wb.residual.contributions(model, x)                      # layer, sublayer, rel_norm, cosine
wb.residual.logit_lens(model, x, y=y, per_position={seq})   # layer, (position,) kl_to_final, top1_agree, loss
wb.residual.skip_effects(model, x, y=y).heatmap          # skipped, affected, effect
wb.residual.logit_attribution(model, x{first})           # component -> logit of the predicted token
figs.contributions_figure(wb.residual.contributions(model, x))"""


class Analysis:
    """Everything the stream view shows for one (model, input); tables only, no tensors kept.

    For a logit mixture the engine's tables carry a ``member`` column; :meth:`select_member`
    re-slices them so that ``contrib``, ``lens``, ``skip``, ... describe one member (inside the
    mixture), while ``attribution`` keeps every member's components.
    """

    def __init__(self, model, x, tokens: list[str] | None, vocab: list[str] | None, y=None):
        self.tokens, self.vocab = tokens, vocab
        self.mixture = residual.is_mixture(model)
        self.n_members = len(model.members) if self.mixture else 1
        first = model.members[0] if self.mixture else model
        self.sequence = hooks.adapter(first).family == "transformer"
        self.n_layers = hooks.adapter(model).n_layers if not self.mixture else 0
        self.member = None
        self.contrib = residual.contributions(model, x)
        self.contrib_pos = residual.contributions(model, x, per_position=True) if self.sequence else None
        self.lens = residual.logit_lens(model, x, y=y)
        self.lens_pos = residual.logit_lens(model, x, y=y, per_position=True) if self.sequence else None
        self.skip = residual.skip_effects(model, x, y=y)
        self.attribution = residual.logit_attribution(model, x[:1] if not self.sequence else x)
        self.n_positions = int(x.shape[-1]) if self.sequence else 1
        # slices for fast selection: per position the attribution bars, per layer the position curves
        self.attr_at = {int(p): (g["component"].tolist(), g["attribution"].tolist(), int(g["target"].iloc[0]))
                        for p, g in self.attribution[self.attribution["batch"] == 0].groupby("position")}
        if self.mixture:
            self._all = {"contrib": self.contrib, "contrib_pos": self.contrib_pos, "lens": self.lens,
                         "lens_pos": self.lens_pos, "skip": self.skip}
            self.select_member(0)
        else:
            self._index()

    def select_member(self, k: int) -> None:
        """Show member ``k`` of a mixture (re-slices the cached tables; no forward pass)."""
        if not self.mixture:
            return
        if not 0 <= k < self.n_members:
            raise ValueError(f"member must be in [0, {self.n_members - 1}], got {k}")

        def pick(df):
            return None if df is None else df[df["member"] == k].drop(columns="member").reset_index(drop=True)
        a = self._all
        self.member = k
        self.contrib, self.contrib_pos = pick(a["contrib"]), pick(a["contrib_pos"])
        self.lens, self.lens_pos = pick(a["lens"]), pick(a["lens_pos"])
        self.skip = a["skip"].member(k)
        self.n_layers = self.skip.n_layers
        self._index()

    def _index(self) -> None:
        self.sublayers = [s for s in ("attn", "mlp", "layer") if s in set(self.contrib["sublayer"])]
        self.by_layer = {}
        if self.contrib_pos is not None:
            for (layer, sub), g in self.contrib_pos.groupby(["layer", "sublayer"]):
                self.by_layer.setdefault(int(layer), {})[sub] = g.sort_values("position")["rel_norm"].tolist()

    def target_label(self, position: int) -> str:
        t = self.attr_at.get(position, ([], [], 0))[2]
        return self.vocab[t] if self.vocab and 0 <= t < len(self.vocab) else str(t)


def stage_contributions(monitor, stages: list, x) -> pd.DataFrame | None:
    """``contributions`` of every growth stage ``(stage, model or a function opening it)`` on ``x``, with a
    ``stage`` column (the stages done when stopped)."""
    mon = as_monitor(monitor)
    frames = []
    for k, (label, model) in enumerate(stages):
        if mon.stopped:
            break
        mon.report(0.2 + 0.8 * k / len(stages), f"stage {label}")
        m = model() if callable(model) else model
        frames.append(residual.contributions(m, x).assign(stage=label))
    return pd.concat(frames, ignore_index=True) if frames else None


def analysis_job(monitor, subject: ModelInput, cached: Analysis | None = None, stages: bool = True):
    """``(Analysis, stage contributions or None)`` of ``subject`` (``cached``: the analysis made before)."""
    as_monitor(monitor).report(0.1, "analysing")
    analysis = cached or Analysis(subject.model, subject.x, subject.tokens, subject.vocab, subject.y)
    frames = stage_contributions(monitor, subject.stages, subject.x) if stages and len(subject.stages) > 1 else None
    return analysis, frames


class StreamView(View):
    """The residual stream of one analysed (model, input): contributions, the lens heat-map (click a cell
    to intervene there), position curves, skip effects, attribution and the growth stages.

    ``layer`` and ``position`` are the focus; ``lens_metric`` what the lens heat-map shows. Alone in a
    notebook: ``StreamView(subject=ModelInput.of(model, x))`` analyses at once.
    """

    analysis = param.ClassSelector(class_=Analysis, allow_None=True, doc="what is shown")
    layer = param.Integer(default=0, doc="the layer in focus")
    position = param.Integer(default=0, doc="the token position in focus")
    lens_metric = param.Selector(default="kl_to_final", objects=list(figs._LENS_TITLES))
    clicked = param.Event(doc="a lens heat-map cell (a layer and a token) was clicked")

    jobs = {"analysis": analysis_job}
    title = "Stream"

    def __init__(self, host=None, **params):
        super().__init__(host, **params)
        self.layer_slider = pn.widgets.IntSlider.from_param(self.param.layer, start=0, end=1, width=260,
                                                            disabled=True, name="layer")
        self.position_slider = pn.widgets.IntSlider.from_param(self.param.position, start=0, end=1, width=260,
                                                               disabled=True, name="token position")
        self.metric_select = pn.widgets.Select.from_param(self.param.lens_metric, width=150, name="lens shows")
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.contrib_pane = pn.pane.Plotly(figs.contributions_figure(None), sizing_mode="stretch_width", height=340)
        self.position_pane = pn.pane.Plotly(figs.position_figure(None, 0), sizing_mode="stretch_width", height=300)
        self.lens_pane = pn.pane.Plotly(figs.lens_heatmap(None), sizing_mode="stretch_width", height=340)
        self.skip_pane = pn.pane.Plotly(figs.skip_heatmap(None), sizing_mode="stretch_width", height=340)
        self.skip_out_pane = pn.pane.Plotly(figs.skip_output_figure(None), sizing_mode="stretch_width", height=300)
        self.attr_pane = pn.pane.Plotly(figs.attribution_figure(None), sizing_mode="stretch_width", height=380)
        self.stages_pane = pn.pane.Plotly(figs.stages_figure(None), sizing_mode="stretch_width", height=320,
                                          visible=False)
        self.last_redraw_ms = 0.0
        self.member_label = lambda k: f"member {k}"
        self._figs: dict = {}
        self._lens_figs: dict = {}
        pn.bind(self._lens_clicked, self.lens_pane.param.click_data, watch=True)
        if self.subject is not None and self.analysis is None:
            self.run("analysis")

    # ---------------------------------------------------------------- results
    def show(self, action: str, result) -> None:
        analysis, stages = result
        self.show_stages(stages)
        self.analysis = analysis

    def show_stages(self, stages: pd.DataFrame | None) -> None:
        self.stages_pane.visible = stages is not None
        if stages is not None:
            self.stages_pane.object = figs.stages_figure(stages)

    @param.depends("analysis", watch=True)
    def _analysed(self) -> None:
        if self.analysis is not None:
            self.draw()

    def select_member(self, k) -> None:
        """Another member of the analysed mixture: re-slice the cached tables and redraw (no forward pass)."""
        a = self.analysis
        if a is not None and a.mixture and k is not None and 0 <= k < a.n_members:
            a.select_member(k)
            self.draw()

    def draw(self) -> None:
        """Bounds of the sliders, the figures and the summary for the analysis (and its chosen member)."""
        analysis = self.analysis
        L = analysis.n_layers
        with pn.io.hold():
            self.layer_slider.end = max(L - 1, 1)
            self.layer = min(self.layer, max(L - 1, 0))
            self.layer_slider.disabled = L == 0
            self.position_slider.end = max(analysis.n_positions - 1, 1)
            self.position = min(self.position, analysis.n_positions - 1)
            self.position_slider.disabled = not analysis.sequence
            self.skip_out_pane.object = figs.skip_output_figure(analysis.skip.output)
            self._build_figures()
            self.redraw("all")
        last = analysis.lens.iloc[-1] if len(analysis.lens) else None
        if last is None:
            self.summary.object = ""
        elif analysis.mixture:
            self.summary.object = (
                f"Mixture of {analysis.n_members} members; member {analysis.member} "
                f"(*{escape_md(self.member_label(analysis.member))}*): {L} layers. Its own output against the "
                f"mixture's: KL {last.kl_to_final:.3f}, top-1 agreement {last.top1_agree:.2f}, loss {last.loss:.3f}. "
                "The attribution shows every member's components, scaled by the member's weight.")
        else:
            self.summary.object = f"{L} layers; logit lens at the output: loss {last.loss:.3f}"

    def _build_figures(self) -> None:
        """Full figures once per analysis, kept as dicts that :meth:`redraw` patches."""
        a = self.analysis
        self._figs = {
            "contrib": figs.contributions_figure(a.contrib).to_dict(),
            "skip": figs.skip_heatmap(a.skip.heatmap, a.n_layers).to_dict(),
            "attr": figs.attribution_figure(a.attribution, position=0, target_label=a.target_label(0)).to_dict(),
        }
        if a.sequence and a.n_layers:
            self._figs["position"] = figs.position_figure(a.contrib_pos, 0, a.tokens).to_dict()
        self._lens_figs = {}

    def _lens_fig(self, metric: str) -> dict:
        if metric not in self._lens_figs:
            a = self.analysis
            self._lens_figs[metric] = figs.lens_heatmap(a.lens_pos, metric, a.tokens).to_dict()
        return self._lens_figs[metric]

    @param.depends("layer", watch=True)
    def _layer_moved(self) -> None:
        self.redraw("layer")

    @param.depends("position", "lens_metric", watch=True)
    def _position_moved(self) -> None:
        self.redraw("position")

    def redraw(self, what: str) -> None:
        """Re-slice the cached tables for the chosen layer / token and patch the figures (no forward pass)."""
        a = self.analysis
        if a is None or not self._figs:
            return
        t0 = time.perf_counter()
        layer = self.layer if a.n_layers else None
        pos = self.position if a.sequence else 0
        f = self._figs
        with pn.io.hold():
            if what in ("all", "layer") and layer is not None:
                self.contrib_pane.object = figs.with_shapes(f["contrib"], [
                    figs.layer_band(layer, "x", "y domain"), figs.layer_band(layer, "x2", "y2 domain")])
                self.skip_pane.object = figs.with_shapes(f["skip"], [figs.row_box(layer, a.n_layers)])
            elif what == "all":
                self.contrib_pane.object, self.skip_pane.object = f["contrib"], f["skip"]
            if a.sequence and layer is not None:
                curves = a.by_layer.get(layer, {})
                pos_fig = figs.with_traces(f["position"], [{"y": curves.get(s, [])} for s in a.sublayers])
                self.position_pane.object = figs.with_shapes(
                    pos_fig, [figs.layer_band(pos, "x", "y domain")],
                    title=f"Layer {layer}: relative contribution at each position")
                self.lens_pane.object = figs.with_shapes(self._lens_fig(self.lens_metric),
                                                         [figs.cell_box(pos, layer)])
            if what in ("all", "position"):
                comps, values, _ = a.attr_at.get(pos, ([], [], 0))
                bars = figs.with_traces(f["attr"], [{
                    "x": values, "y": comps, "marker": {"color": ["#d62728" if v < 0 else "#1f77b4" for v in values]}}])
                whose = "the mixture's logit for " if a.mixture else ""
                self.attr_pane.object = figs.with_shapes(
                    bars, [],
                    title=f"Direct logit attribution to {whose}{a.target_label(pos)!r} at position {pos} "
                          f"(sum = logit {sum(values):.2f})")
        self.last_redraw_ms = 1000 * (time.perf_counter() - t0)

    def _lens_clicked(self, click) -> None:
        """A click on the logit-lens heat-map: that cell's layer and token become the focus, then ``clicked``."""
        points = (click or {}).get("points") or []
        a = self.analysis
        if not points or a is None or not a.sequence:
            return
        pt = points[0]
        number = pt.get("pointNumber")
        if isinstance(number, (list, tuple)) and len(number) == 2:
            layer, pos = int(number[0]), int(number[1])
        else:
            try:
                layer, pos = int(pt.get("y")), int(pt.get("x"))
            except (TypeError, ValueError):
                return
        if not (0 <= layer < max(a.n_layers, 1) and 0 <= pos < a.n_positions):
            return   # the lens' last row is the output, not a layer to intervene on
        with pn.io.hold():
            self.param.update(layer=layer, position=pos)
        self.param.trigger("clicked")

    # ---------------------------------------------------------------- layout and code
    def code_lines(self) -> list[str]:
        sequence = self.analysis.sequence if self.analysis is not None else (
            self.subject.sequence if self.subject is not None else True)
        return [ANALYSIS_CODE.format(seq=sequence, first="" if sequence else "[:1]")]

    def focus_widgets(self) -> list:
        return [self.layer_slider, self.position_slider, self.metric_select]

    def panels(self) -> list:
        return [self.summary, self.contrib_pane, self.stages_pane,
                pn.Row(self.lens_pane, self.attr_pane, sizing_mode="stretch_width"), self.position_pane,
                pn.Row(self.skip_pane, self.skip_out_pane, sizing_mode="stretch_width")]

    def __panel__(self):
        if self.standalone:
            self.show_code()
            return pn.Column(self.errors, pn.Row(*self.focus_widgets()), *self.panels(), self.code_card,
                             sizing_mode="stretch_width")
        return super().__panel__()
