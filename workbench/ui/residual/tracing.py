"""The causal-tracing view: noise the chosen subject tokens and restore one clean state at a time (ROME's
indirect-effect heat-map over (token, layer)), and attribution patching beside exact patching on the same
grid with their rank correlation (needs the corrupt text). Engine: :mod:`workbench.tracing`.
"""
from __future__ import annotations

import numpy as np
import panel as pn
import param

from ...core import checks
from ...residual import tracing
from ...residual.interventions import PATCH_SITES
from ...figures import tracing as tfigs
from ..text import escape_md
from .base import ModelInput, View, as_monitor
from .interventions import NEEDS_CORRUPT, sequence_model

__all__ = ["TracingView", "trace_job", "patching_job"]

MAX_SAMPLES, MAX_WINDOW, MAX_STEPS = 100, 64, 128


def trace_job(monitor, subject: ModelInput, start: int, end: int, kind: str, samples: int, noise: float,
              window: int, seed: int) -> tracing.Trace:
    """Causal tracing of the first prompt with positions ``start <= t < end`` noised."""
    model = sequence_model(subject, "causal tracing")
    return tracing.causal_trace(model, subject.x[:1], subject=(start, end), kind=kind, samples=samples, noise=noise,
                                window=window, seed=seed, labels=subject.tokens, monitor=as_monitor(monitor))


def patching_job(monitor, subject: ModelInput, site: str, steps: int) -> tuple:
    """``(PatchingComparison, tokens)``: exact patching, AtP and AtP-IG at ``site`` on the clean and corrupt text."""
    model = sequence_model(subject, "patching")
    if subject.corrupt is None:
        raise ValueError(NEEDS_CORRUPT.replace("patch needs", "patching needs"))
    comp = tracing.compare_patching(model, subject.x[:1], subject.corrupt, sites=(site,), steps=steps,
                                    monitor=as_monitor(monitor))
    return comp, subject.tokens


class TracingView(View):
    """Causal tracing and attribution patching of the analysed model's first prompt: ``subject_tokens``
    ``(first, last)`` positions noised (inclusive), ``kind`` of state restored (``resid``, ``mlp``, ``attn``),
    ``samples`` noisy copies, ``noise`` (times the embeddings' std), ``window`` (blocks restored together
    for mlp/attn), ``seed``; ``site`` and ``steps`` of the patching comparison."""

    subject_tokens = param.Range(default=(0, 0), doc="first and last position of the subject (inclusive)")
    kind = param.String(default="resid", doc="one of tracing.TRACE_KINDS")
    samples = param.Integer(default=10, allow_None=True)
    noise = param.Number(default=3.0, allow_None=True)
    window = param.Integer(default=10, allow_None=True)
    seed = param.Integer(default=0, allow_None=True)
    site = param.String(default="resid_pre", doc="one of PATCH_SITES")
    steps = param.Integer(default=16, allow_None=True, doc="integrated-gradient steps of AtP-IG")

    jobs = {"trace": trace_job, "patching": patching_job}
    title = "Causal tracing"

    def __init__(self, host=None, **params):
        super().__init__(host, **params)
        self.subject_slider = pn.widgets.IntRangeSlider.from_param(self.param.subject_tokens, start=0, end=1, step=1,
                                                                   width=300, name="subject tokens (positions)")
        self.subject_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.kind_buttons = pn.widgets.RadioButtonGroup.from_param(self.param.kind, options=list(tracing.TRACE_KINDS),
                                                                   name="")
        self.samples_input = pn.widgets.IntInput.from_param(self.param.samples, start=1, end=MAX_SAMPLES, width=90,
                                                            name="samples")
        self.noise_input = pn.widgets.FloatInput.from_param(self.param.noise, start=0.0, width=90, name="noise x std")
        self.window_input = pn.widgets.IntInput.from_param(self.param.window, start=1, end=MAX_WINDOW, width=90,
                                                           name="window")
        self.seed_input = pn.widgets.IntInput.from_param(self.param.seed, start=0, width=90, name="seed")
        self.trace_button = pn.widgets.Button(label="Causal trace", button_type="primary", width=140)
        self.trace_button.on_click(lambda _: self.run("trace", wait=False))
        self.site_select = pn.widgets.Select.from_param(self.param.site, options=list(PATCH_SITES), width=120,
                                                        name="site")
        self.steps_input = pn.widgets.IntInput.from_param(self.param.steps, start=1, end=MAX_STEPS, width=90,
                                                          name="IG steps")
        self.patch_button = pn.widgets.Button(label="Exact and attribution patching", width=230)
        self.patch_button.on_click(lambda _: self.run("patching", wait=False))
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.trace_pane = pn.pane.Plotly(tfigs.trace_heatmap(None), sizing_mode="stretch_width", height=380)
        self.patch_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.patch_pane = pn.pane.Plotly(tfigs.patching_comparison(None), sizing_mode="stretch_width", height=360)
        self.trace: tracing.Trace | None = None
        self.comparison: tracing.PatchingComparison | None = None
        if self.subject is not None:
            self.reset()

    def buttons(self) -> list:
        return [self.trace_button, self.patch_button]

    def clear(self) -> None:
        """Another model or input: nothing of the old one is shown."""
        self.trace = self.comparison = None
        with pn.io.hold():
            self.trace_pane.object = tfigs.trace_heatmap(None)
            self.patch_pane.object = tfigs.patching_comparison(None)
            self.note.object = self.patch_note.object = ""
        self.reset()

    def reset(self) -> None:
        """A new input: the subject slider spans its positions (default: the middle third)."""
        s = self.subject
        if s is None or not s.sequence:
            return
        T = int(s.x.shape[-1])
        with pn.io.hold():
            self.subject_slider.end = max(T - 1, 1)
            first, last = self.subject_tokens
            if not (0 <= first <= last < T):
                first, last = T // 3, max(T // 3, 2 * T // 3 - 1)
            self.subject_tokens = (first, last)
            self._name_subject()

    @param.depends("subject_tokens", watch=True)
    def _name_subject(self) -> None:
        s = self.subject
        if s is None or s.tokens is None:
            return
        first, last = (int(v) for v in self.subject_tokens)
        shown = "".join(s.tokens[first:last + 1]) if all(len(t) == 1 for t in s.tokens) else \
            " ".join(s.tokens[first:last + 1])
        self.subject_note.object = f"subject: *{escape_md(shown)}* (positions {first} to {last})"

    def choices(self, action: str) -> dict:
        if action == "patching":
            return {"site": checks.check_choice("site", self.site, list(PATCH_SITES)),
                    "steps": checks.check_int("IG steps", self.steps, 1, MAX_STEPS)}
        first, last = self.subject_tokens
        first = checks.check_int("subject tokens (first)", first, 0)
        last = checks.check_int("subject tokens (last)", last, first)
        return {"start": first, "end": last + 1, "kind": checks.check_choice("kind", self.kind, list(tracing.TRACE_KINDS)),
                "samples": checks.check_int("samples", self.samples, 1, MAX_SAMPLES),
                "noise": checks.check_float("noise", self.noise, 0.0, 100.0),
                "window": checks.check_int("window", self.window, 1, MAX_WINDOW),
                "seed": checks.check_seed("seed", self.seed)}

    def show(self, action: str, result) -> None:
        if action == "trace":
            tr = result
            self.trace = tr
            answer = self.subject.token(tr.answer) if self.subject is not None else str(tr.answer)
            self.trace_pane.object = tfigs.trace_heatmap(tr.frame(), tokens=tr.tokens, subject=tr.subject, answer=answer)
            best = tr.effects.loc[tr.effects["effect"].idxmax()] if len(tr.effects) else None
            self.note.object = (
                f"p({escape_md(answer)}): clean {tr.clean:.3f}, subject noised {tr.corrupt:.3f}"
                + ("" if best is None else f"; the strongest restore: layer {int(best.layer)}, token "
                   f"{int(best.position)} (indirect effect {best.effect:+.3f})"))
            return
        comp, tokens = result
        self.comparison = comp
        self.patch_pane.object = tfigs.patching_comparison(comp.grid, comp.correlation, tokens=tokens)
        rho = {r.method: r.spearman for r in comp.correlation.itertuples() if np.isfinite(r.spearman)}
        self.patch_note.object = ("Rank correlation with exact patching (Spearman): "
                                  + ", ".join(f"{m} {v:.3f}" for m, v in rho.items()) if rho else
                                  "Rank correlation with exact patching: undefined (a constant grid)")

    def code_lines(self) -> list[str]:
        first, last = (int(v) for v in self.subject_tokens)
        return ["from workbench.figures import tracing as trace_figs",
                f"tr = wb.tracing.causal_trace(model, x[:1], subject=({first}, {last + 1}), kind={self.kind!r}, "
                f"samples={self.samples}, noise={self.noise}, window={self.window}, seed={self.seed}, labels=tokens)",
                "trace_figs.trace_heatmap(tr.frame(), tokens=tr.tokens, subject=tr.subject)",
                "if x_corrupt is not None:   # exact patching beside AtP and AtP-IG, with their rank correlation",
                f"    comp = wb.tracing.compare_patching(model, x[:1], x_corrupt, sites=({self.site!r},), "
                f"steps={self.steps})",
                "    print(comp.correlation)   # site, method, spearman, pvalue, n",
                "    trace_figs.patching_comparison(comp.grid, comp.correlation, tokens=tokens)"]

    def widgets(self) -> list:
        return [pn.Row(self.subject_slider, self.kind_buttons), self.subject_note,
                pn.Row(self.samples_input, self.noise_input, self.window_input, self.seed_input, self.trace_button)]

    def panels(self) -> list:
        return [*self.widgets(), self.note, self.trace_pane,
                pn.Row(self.site_select, self.steps_input, self.patch_button), self.patch_note, self.patch_pane]
