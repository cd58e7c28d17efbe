"""The attention view: the pattern of one layer (tokens on both axes, one head or every head behind a menu),
the heads x layers map of head-type scores (previous-token, induction, duplicate, first-token, self), and
those scores across the growth stages of the run.

Patterns are computed on request, one layer at a time (:func:`workbench.attention.pattern`: the explicit
path beside the fused one, eager attention for Hugging Face families); choosing a head or a score kind
only re-slices. Engine: :mod:`workbench.attention`.
"""
from __future__ import annotations

import numpy as np
import panel as pn
import param

from ...core import checks
from ...residual import attention
from ...figures import attention as afigs
from .base import ModelInput, View, as_monitor

__all__ = ["AttentionView", "attention_job", "pattern_job", "ALL"]

ALL = "all"   # every head (the figure's menu picks one) / every score kind


def _model(subject: ModelInput):
    return subject.one_model("attention")


def _n_layers(subject: ModelInput | None) -> int:
    from ... import hooks, residual

    if subject is None or residual.is_mixture(subject.model):
        return 0
    return int(hooks.adapter(subject.model).n_layers)


def pattern_job(monitor, subject: ModelInput, layer: int) -> dict:
    """The pattern of block ``layer`` on the first prompt (every head)."""
    model = _model(subject)
    as_monitor(monitor).report(0.2, f"attention pattern of layer {layer}")
    p = attention.pattern(model, subject.x[:1], layer, labels=subject.tokens)
    return {"key": subject.key, "layer": layer, "pattern": p.frame()}


def attention_job(monitor, subject: ModelInput, layer: int) -> dict:
    """The pattern of ``layer``, the head-type scores on repeated random tokens (seeded) and, for a run of a
    growth group, the scores of every stage."""
    out = pattern_job(monitor, subject, layer)
    mon = as_monitor(monitor)
    mon.report(0.4, "head-type scores")
    out["scores"] = attention.head_scores(_model(subject))
    out["across"] = None
    if len(subject.stages) > 1:
        models = [(label, m() if callable(m) else m) for label, m in subject.stages]
        out["across"] = attention.head_scores_across(models, monitor=mon)
    return out


class AttentionView(View):
    """Attention of the analysed model: ``layer`` (the pattern's block), ``head`` (``"all"`` or a head index
    as text), ``score_kind`` (``"all"`` or one of :data:`workbench.attention.KINDS`), ``across_kind``: the
    score followed across growth stages."""

    layer = param.Integer(default=0, allow_None=True, doc="the block whose pattern is shown")
    head = param.String(default=ALL, doc="'all' or a head index")
    score_kind = param.String(default=ALL, doc="'all' or one of attention.KINDS")
    across_kind = param.String(default="induction", doc="one of attention.KINDS")

    jobs = {"attention": attention_job, "pattern": pattern_job}
    title = "Attention"

    def __init__(self, host=None, **params):
        super().__init__(host, **params)
        self.layer_input = pn.widgets.IntInput.from_param(self.param.layer, start=0, width=100, name="layer")
        self.head_select = pn.widgets.Select.from_param(self.param.head, options=[ALL], width=100, name="head")
        self.kind_select = pn.widgets.Select.from_param(self.param.score_kind, options=[ALL, *attention.KINDS],
                                                        width=120, name="score")
        self.across_select = pn.widgets.Select.from_param(self.param.across_kind, options=list(attention.KINDS),
                                                          width=120, name="across stages")
        self.button = pn.widgets.Button(label="Patterns and head scores", button_type="primary", width=200)
        self.button.on_click(lambda _: self.run("attention", wait=False))
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.pattern_pane = pn.pane.Plotly(afigs.pattern_figure(None), sizing_mode="stretch_width", height=420)
        self.scores_pane = pn.pane.Plotly(afigs.score_map(None), sizing_mode="stretch_width", height=320)
        self.across_pane = pn.pane.Plotly(afigs.scores_across(None), sizing_mode="stretch_width", height=340,
                                          visible=False)
        self.result: dict | None = None
        self._patterns: dict = {}     # (model key, input, layer) -> pattern frame
        if self.subject is not None:
            self.run("attention")

    def buttons(self) -> list:
        return [self.button]

    def clear(self) -> None:
        """Another model or input: nothing of the old one is shown; the layer choice spans the new model."""
        self.result, self._patterns = None, {}
        with pn.io.hold():
            self.pattern_pane.object = afigs.pattern_figure(None)
            self.scores_pane.object = afigs.score_map(None)
            self.across_pane.visible = False
            self.note.object = ""
            s = self.subject
            n = _n_layers(s)
            if n:
                self.layer_input.end = n - 1
                if not isinstance(self.layer, int) or self.layer >= n:
                    self.layer = 0

    def choices(self, action: str) -> dict:
        return {"layer": checks.check_int("layer", self.layer, 0)}

    def show(self, action: str, result: dict) -> None:
        if action == "attention":
            self.result = result
            self._patterns = {}
        elif self.result is None or self.result["key"] != result["key"]:
            self.result = {**result, "scores": None, "across": None}
        self._patterns[result["layer"]] = result["pattern"]
        heads = sorted(int(h) for h in result["pattern"]["head"].unique())
        with pn.io.hold():
            self.head_select.options = [ALL] + [str(h) for h in heads]
            if self.head not in self.head_select.options:
                self.head = ALL
            self.redraw_pattern()
            if action == "attention":
                self.redraw_scores()

    @param.depends("layer", watch=True)
    def _layer_moved(self) -> None:
        """Another layer: its cached pattern at once, else computed (one forward) when a pattern was shown."""
        if self.result is None or not isinstance(self.layer, int):
            return
        if self.layer in self._patterns:
            self.redraw_pattern()
        else:
            self.run("pattern", wait=False)

    @param.depends("head", watch=True)
    def redraw_pattern(self) -> None:
        frame = self._patterns.get(self.layer)
        if frame is None:
            return
        try:
            head = checks.check_choice("head", self.head, list(self.head_select.options))
        except ValueError as e:
            self.host.refuse(self, e)
            return
        sel = frame if head == ALL else frame[frame["head"] == int(head)]
        self.pattern_pane.object = afigs.pattern_figure(sel)

    @param.depends("score_kind", "across_kind", watch=True)
    def redraw_scores(self) -> None:
        r = self.result
        if r is None or r.get("scores") is None:
            return
        try:
            kind = checks.check_choice("score", self.score_kind, [ALL, *attention.KINDS])
            across = checks.check_choice("across stages", self.across_kind, list(attention.KINDS))
        except ValueError as e:
            self.host.refuse(self, e)
            return
        self.scores_pane.object = afigs.score_map(r["scores"], None if kind == ALL else kind)
        self.across_pane.visible = r.get("across") is not None
        if r.get("across") is not None:
            self.across_pane.object = afigs.scores_across(r["across"], kind=across, column="stage")
        best = r["scores"].loc[r["scores"].groupby("score_kind")["value"].idxmax()]
        self.note.object = "Strongest head of each kind (on repeated random tokens): " + ", ".join(
            f"{row.score_kind} {row.value:.2f} (layer {int(row.layer)}, head {int(row.head)})"
            for row in best.itertuples() if np.isfinite(row.value))

    def code_lines(self) -> list[str]:
        layer = self.layer if isinstance(self.layer, int) else 0
        kind = None if self.score_kind == ALL else self.score_kind
        lines = ["from workbench.figures import attention as attn_figs",
                 f"pat = wb.attention.pattern(model, x[:1], layer={layer}, labels=tokens)   # .weights (H, T, T)",
                 "attn_figs.pattern_figure(pat.frame())",
                 "scores = wb.attention.head_scores(model)   # layer, head, score_kind, value (repeated random tokens)",
                 f"attn_figs.score_map(scores, {kind!r})"]
        if self.result is not None and self.result.get("across") is not None:
            lines += ["# the growth stages: stages = [(stage, store.load(run_id).model) for each stage's run]",
                      "# across = wb.attention.head_scores_across(stages)",
                      f"# attn_figs.scores_across(across, kind={self.across_kind!r})"]
        return lines

    def widgets(self) -> list:
        return [pn.Row(self.layer_input, self.head_select, self.button), pn.Row(self.kind_select, self.across_select)]

    def panels(self) -> list:
        return [*self.widgets(), self.note, self.pattern_pane, self.scores_pane, self.across_pane]
