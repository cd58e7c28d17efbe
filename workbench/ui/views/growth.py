"""Growth stages of one grown model: loss and accuracy against steps or training FLOPs with the stage
boundaries, the model as a strip of blocks (frozen ones grey) at a chosen stage, and depth and width as the
run grew.

Bound to a grown Run (``workbench.growth.grow``'s, whose ``meta["stages"]`` logs every stage) or to the stage
runs of a growth group (``store`` entries of one ``group``, as the Grow page saves them); a page that is
growing hands it the live curves and strip (:meth:`GrowthView.show_live`). Choosing a stage or the x axis
re-slices what is held: nothing is trained or run again. Definitions: ``docs/definitions.md#growth``.
"""
from __future__ import annotations

import pandas as pd
import panel as pn
import param

from ...core import checks
from ... import growth
from ...figures.growth import block_strip, growth_curves, width_depth_timeline
from ..text import escape_md
from .base import Explorer

__all__ = ["GrowthView", "is_grown"]

AXES = ("step", "flops")


def is_grown(run) -> bool:
    """Whether ``run`` is a stage of a growth run (its meta names a growth group)."""
    meta = getattr(run, "meta", None)
    return isinstance(meta, dict) and "group" in meta and "stage" in meta


class GrowthView(Explorer):
    """Curves, block strip and depth/width timeline of a grown model; ``stage`` in focus, ``x`` the axis."""

    x = param.String(default="step", doc="the curves' x axis: step or flops")
    stage = param.Integer(default=0, doc="the growth stage in focus")

    title = "Growth stages"
    choices = ("x", "stage")

    def __init__(self, runs=None, **params):
        super().__init__(**params)
        self.metrics: pd.DataFrame | None = None
        self.stages: list[dict] = []       # per stage: stage, op, n_layers, blocks (block table), start, end
        self.timeline: pd.DataFrame | None = None
        self.x_axis = pn.widgets.RadioButtonGroup.from_param(self.param.x, options=list(AXES), name="x axis")
        self.stage_slider = pn.widgets.IntSlider(name="stage", start=0, end=1, value=0, width=260, disabled=True)
        self.stage_slider.param.watch(lambda e: setattr(self, "stage", e.new), "value")
        self.param.watch(lambda e: setattr(self.stage_slider, "value", e.new)
                         if 0 <= e.new < len(self.stages) else None, "stage")
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.curves_pane = pn.pane.Plotly(growth_curves(None), sizing_mode="stretch_width", height=360)
        self.strip_pane = pn.pane.Plotly(block_strip(None), sizing_mode="stretch_width", height=160)
        self.timeline_pane = pn.pane.Plotly(width_depth_timeline(None), sizing_mode="stretch_width", height=310)
        if runs is not None:
            self.show_runs(runs)

    # ---------------------------------------------------------------- results
    def show_runs(self, runs) -> None:
        """A grown Run (its stage log), or the stage runs of one growth group (in any order)."""
        runs = [runs] if not isinstance(runs, (list, tuple)) else list(runs)
        if not runs or not all(is_grown(r) for r in runs):
            raise ValueError("runs must be a grown Run (wb.growth.grow's) or the stage runs of one growth group "
                             "(their meta names the group and the stage)")
        groups = {r.meta["group"] for r in runs}
        if len(groups) > 1:
            raise ValueError(f"runs must belong to one growth group, got {len(groups)}: {sorted(groups)[:3]}")
        runs = sorted(runs, key=lambda r: r.meta["stage"])
        last = runs[-1]
        if len(runs) == 1 and last.meta.get("stages"):
            stages = self._from_log(last)
        else:
            stages = [self._from_stage_run(r) for r in runs]
        self.metrics, self.stages = last.metrics, stages
        self.timeline = growth.timeline_table(last) if len(runs) == 1 and last.meta.get("stages") else pd.DataFrame(
            [{"stage": s["stage"], "op": s["op"], "step": s["start"], "n_layers": s["n_layers"], "width": s["width"]}
             for s in stages])
        with pn.io.hold():
            self.stage_slider.end = max(len(stages) - 1, 1)
            self.stage_slider.disabled = len(stages) < 2
            self._reverting = True
            try:
                self.stage = len(stages) - 1
            finally:
                self._reverting = False
            self._accepted["stage"] = self.stage
            self.draw()

    @staticmethod
    def _from_log(run) -> list[dict]:
        """Stages from a grown Run's log; the blocks of stage k are the final model's first ``n_layers`` blocks
        with that stage's frozen flags (the final model's parameter counts)."""
        final = growth.block_table(run.model)
        out = []
        for e in run.meta["stages"]:
            n, frozen = e["n_layers"], list(e.get("frozen") or [])
            blocks = final[(final["part"] != "block") | (final["layer"] < n)].copy()
            blocks.loc[blocks["part"] == "head", "layer"] = n
            is_block = blocks["part"] == "block"
            flags = [bool(frozen[int(i)]) if int(i) < len(frozen) else False for i in blocks.loc[is_block, "layer"]]
            blocks.loc[is_block, "frozen"] = flags
            blocks.loc[is_block, "trainable_params"] = [0 if f else p for f, p in
                                                        zip(flags, blocks.loc[is_block, "params"])]
            end = int(e.get("end_step", 0))
            out.append({"stage": int(e["stage"]), "op": e["op"], "n_layers": n, "blocks": blocks,
                        "start": end - int(e.get("steps_done", 0)), "end": end,
                        "width": int(sum(e.get("widths") or []))})
        return out

    @staticmethod
    def _from_stage_run(run) -> dict:
        m = run.metrics
        own = m[m["stage"] == run.meta["stage"]] if "stage" in m else m
        blocks = growth.block_table(run.model)
        return {"stage": int(run.meta["stage"]), "op": run.meta.get("op", "train"),
                "n_layers": int((blocks["part"] == "block").sum()), "blocks": blocks,
                "start": int(own["step"].min()) if len(own) else 0, "end": int(own["step"].max()) if len(own) else 0,
                "width": int(growth.width_table(run.model)["width"].sum())}

    def show_live(self, metrics: pd.DataFrame | None, blocks: pd.DataFrame | None = None) -> None:
        """Curves and the strip of a model that is growing now (the page's payloads); no stages to choose yet."""
        self.metrics, self.stages, self.timeline = metrics, [], None
        self.stage_slider.disabled = True
        with pn.io.hold():
            self.curves_pane.object = growth_curves(metrics, x=self.x)
            if blocks is not None:
                self.strip_pane.object = block_strip(blocks)

    # ---------------------------------------------------------------- choices
    def check(self) -> None:
        checks.check_choice("x axis", self.x, AXES)
        if self.stages:
            checks.check_int("stage", self.stage, 0, len(self.stages) - 1)

    def update(self, changed: set[str]) -> None:
        if self.stages:
            self.draw()
        else:
            self.curves_pane.object = growth_curves(self.metrics, x=self.x)

    def at_stage(self, stage: int | None = None) -> dict:
        """Stage ``stage`` (default the focus): ``stage, op, n_layers, frozen`` (blocks), ``start``, ``end`` and the
        last ``val_loss`` and ``val_acc`` evaluated in it (NaN when none was)."""
        if not self.stages:
            raise ValueError("no stages yet: give the view a grown Run or the stage runs of a growth group")
        k = checks.check_int("stage", self.stage if stage is None else stage, 0, len(self.stages) - 1)
        s = self.stages[k]
        b = s["blocks"]
        out = {k2: s[k2] for k2 in ("stage", "op", "n_layers", "start", "end")}
        out["frozen"] = int(b[b["part"] == "block"]["frozen"].sum())
        m = self.metrics
        for metric in ("loss", "acc"):
            sel = m[(m["split"] == "val") & (m["metric"] == metric) & (m["step"] <= s["end"])] if m is not None else []
            out[f"val_{metric}"] = float(sel.sort_values("step")["value"].iloc[-1]) if len(sel) else float("nan")
        return out

    def draw(self) -> None:
        s = self.stages[self.stage] if self.stages else None
        fig = growth_curves(self.metrics, x=self.x)
        if s is not None and self.metrics is not None and len(self.metrics):
            span = self.metrics[(self.metrics["step"] >= s["start"]) & (self.metrics["step"] <= s["end"])]
            if len(span) and self.x in span:
                for col in (1, 2):
                    fig.add_vrect(x0=float(span[self.x].min()), x1=float(span[self.x].max()), fillcolor="#ff7f0e",
                                  opacity=0.08, line_width=0, row=1, col=col)
        self.curves_pane.object = fig
        if s is not None:
            self.strip_pane.object = block_strip(s["blocks"], title=f"stage {s['stage']} ({s['op']}): "
                                                                    f"{s['n_layers']} blocks, frozen ones grey")
            self.timeline_pane.object = width_depth_timeline(self.timeline)
            a = self.at_stage()
            self.summary.object = escape_md(
                f"stage {a['stage']} of {len(self.stages) - 1} ({a['op']}): {a['n_layers']} blocks, {a['frozen']} "
                f"frozen, steps {a['start']}-{a['end']}; val loss {a['val_loss']:.4f}, val acc {a['val_acc']:.3f}")

    # ---------------------------------------------------------------- layout
    def widgets(self) -> list:
        return [self.stage_slider, pn.pane.Markdown("x axis:", margin=(8, 5)), self.x_axis]

    def __panel__(self):
        return pn.Column(self.errors, pn.Row(*self.widgets()), self.summary, self.curves_pane, self.strip_pane,
                         self.timeline_pane, sizing_mode="stretch_width")
