"""The Residual stream page: a model source, an input, and the views of :mod:`workbench.ui.residual` in tabs.

The page is the views' host on the dashboard: a view's action (Analyse, a click on the lens heat-map, Train
tuned lens, ...) becomes one job of the page's task, which opens the model (:class:`ModelSource`), builds
the input (:class:`InputPicker`) and calls the view's job function there, never on the event loop; the
result comes back to the view's ``show``. One analysis per (model, input) is cached, so choosing a layer,
a token, a member, a lens or a head only re-slices tables. No math here.
"""
from __future__ import annotations

import io

import panel as pn

from ... import residual
from ...core import checks
from ...io import interop
from ...figures import residual as figs
from ..page import Page
from .. import examples as starter
from .attention import AttentionView
from .base import ModelInput
from .inputs import TYPED, InputPicker
from .interventions import Interventions, sequence_model
from .lenses import LensView, lens_compare_job
from .sources import MIXTURE, RUN, ModelSource
from .stream import Analysis, StreamView, stage_contributions
from .tracing import TracingView

__all__ = ["ResidualPage", "EXPLANATION"]

EXPLANATION = """Each layer adds its attention and MLP outputs to the residual stream. **Relative
contribution** = ||output|| / ||residual it is added to|| (Csordas et al. 2025), with the cosine between
them. The **logit lens** reads every intermediate residual through the final norm and unembedding; the
**skip heat-map** replaces one layer by the identity and measures how much every later layer's
contribution changes. **Direct attribution** splits the chosen token's logit into the parts written by
each component. Pick a layer or a token to focus the views; a growth run can be stepped stage by stage.
A **logit mixture** built on the Compose page has one residual stream per member: pick a member to see its
contributions, lens (against the mixture's output) and skip effects inside the mixture; the attribution
splits the mixture's logit over all members' components, each scaled by the member's weight. A **Hugging Face
model** is picked from the model folders the server offers (`WORKBENCH_MODEL_ROOTS`: by default the run store
and the local Hugging Face cache; a folder with `config.json` and `*.safetensors` weights) or, when the server
is online, named on the Hub; typed text then goes through the model's own tokenizer. GPT-2, Pythia (GPT-NeoX),
Llama, Mistral, Qwen 2/3, Gemma and Phi are read.

**Click a cell of the logit-lens heat-map** (a layer and a token) to intervene there: *erase* replaces that
residual by the mean residual and shows the change downstream and in the output distribution; *skip from here*
replaces the layer by the identity from that token on; *patch* puts the clean run's residual into a corrupt run
(type the corrupt text, same length) and shows how much of the clean answer comes back. **Depth report** runs
every analysis at once (integrated gradients, depth score, erasure, patching, the lenses and attention) and gives
an HTML file to keep; its estimated memory and time are shown before it starts.

The other tabs: **Lenses** compares the logit lens with the **tuned lens** (per-layer affine translators trained
to match the final output; Belrose et al. 2023; trained here, seeded, and stored with the run) and the
**Jacobian lens** (the layer's average Jacobian to the final residual; Gurnee et al. 2026), per layer, and shows
each lens's top token per layer with the **commitment** strip (the layer from which the final prediction stays
on top). **Attention** shows a layer's attention pattern, the head-type scores (previous-token, induction,
duplicate, first-token, self) of every head, and across growth stages. **Causal tracing** noises the subject
tokens and restores one clean state at a time (Meng et al. 2022), and sets **attribution patching** beside exact
patching with their rank correlation (needs the corrupt text)."""

NO_RUN_CODE = """import workbench as wb
# no stored run chosen yet: train or grow one (or pick a Hugging Face model); this box then shows the calls"""
MIXTURE_CODE = """import workbench as wb
# a Compose mixture lives in this browser session only: rebuild it with the Compose page's "As code" box
# (mixture = merges["logit mean"]), then call the same functions on it, e.g.
# wb.residual.logit_attribution(mixture, x)   # members' components x their weights; sums to its logit"""


class ResidualPage(Page):
    """Choose a stored run (any growth stage), a Hugging Face model or a session mixture, and an input; the
    views (stream, lenses, attention, tracing) read them. The widgets of the parts are also attributes of the
    page under their old names (``source``, ``run_select``, ``layer``, ...)."""

    title = "Residual stream"
    order = 30
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.model_source = ModelSource(self.datastore)
        self.inputs = InputPicker()
        self.stream = StreamView(host=self)
        self.interventions = Interventions(host=self, stream=self.stream)
        self.lenses = LensView(host=self)
        self.attention = AttentionView(host=self)
        self.tracing = TracingView(host=self)
        self.views = [self.stream, self.interventions, self.lenses, self.attention, self.tracing]
        self._view_of = {action: v for v in self.views for action in v.jobs}
        for view in self.views:
            view.prelude = self.prelude
        ms, inp, st, iv = self.model_source, self.inputs, self.stream, self.interventions
        # the widgets under the page's names (tests, the browser test and the bench drive them)
        self.source, self.run_select, self.hf_model, self.hf_refresh = (ms.source_buttons, ms.run_select, ms.hf_model,
                                                                        ms.hf_refresh)
        self.hub_name, self.no_hf_models, self.mixture_select = ms.hub_input, ms.no_hf_models, ms.mixture_select
        self.member, self.no_mixture, self.stage = ms.member_select, ms.no_mixture, ms.stage_slider
        self.input_kind, self.sample, self.text = inp.kind_buttons, inp.sample_input, inp.text_input
        self.corrupt_text, self.domain = inp.corrupt_input, inp.domain_select
        self.layer, self.position, self.lens_metric = st.layer_slider, st.position_slider, st.metric_select
        self.summary, self.contrib_pane, self.position_pane, self.lens_pane = (st.summary, st.contrib_pane,
                                                                              st.position_pane, st.lens_pane)
        self.skip_pane, self.skip_out_pane, self.attr_pane, self.stages_pane = (st.skip_pane, st.skip_out_pane,
                                                                                st.attr_pane, st.stages_pane)
        self.intervention, self.intervene_button = iv.kind_buttons, iv.button
        self.intervene_note, self.intervene_pane, self.intervene_out_pane = iv.note, iv.pane, iv.out_pane
        self.analyse_button = pn.widgets.Button(label="Analyse", button_type="primary", width=100)
        self.analyse_button.on_click(lambda _: self.analyse())
        self.report_button = pn.widgets.Button(label="Depth report", button_type="primary", width=120)
        self.report_button.on_click(lambda _: self.run_report())
        self.report_file = pn.widgets.FileDownload(label="Download the report (HTML)", filename="depth_report.html",
                                                   visible=False, width=260, embed=False)
        self.estimate_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.report_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.ig_pane = pn.pane.Plotly(figs.ig_heatmap(None), sizing_mode="stretch_width", height=340)
        self.report_patch_pane = pn.pane.Plotly(figs.patch_heatmap(None), sizing_mode="stretch_width", height=340)
        self.report = None                   # the last DepthReport
        self._cache: dict = {}               # (model key, input key) -> Analysis
        self._stage_stats: dict = {}         # (group run ids, input key) -> contributions per stage
        self._shown: tuple | None = None     # (model key, input key) the views show
        st.member_label = ms.member_label
        # wiring: each line one dependency, no watcher calls another
        pn.bind(self._offer_domains, ms.param.source, ms.param.mixture, watch=True)
        pn.bind(self._member_chosen, ms.param.member, watch=True)
        pn.bind(self._stage_chosen, ms.param.stage_chosen, watch=True)
        pn.bind(self._clicked, st.param.clicked, watch=True)
        self._offer_domains(ms.source, ms.mixture)

    # ---------------------------------------------------------------- wiring
    def _offer_domains(self, source, mixture) -> None:
        self.inputs.domains = self.model_source.domains()

    def _member_chosen(self, member) -> None:
        if self.model_source.source != MIXTURE or self.stream.analysis is None:
            return
        try:   # a member the page never offered is refused with the usual message
            checks.check_choice("member", member, list(self.model_source.member_select.options.values()))
        except ValueError as e:
            self.errors.show(e)
            self.model_source.member = self.stream.analysis.member   # the member shown stays the choice
            return
        self.stream.select_member(member)

    def _stage_chosen(self, _=None) -> None:
        if self.stream.analysis is not None:
            self.analyse()

    def _clicked(self, _=None) -> None:
        self.intervene()

    def on_store_change(self) -> None:
        self.model_source.refresh()
        self._offer_domains(None, None)

    def show_example(self) -> bool:
        """The grown example (its last stage, the stage slider over both) chosen and analysed: the page's own
        Analyse, as a job (a second or two on two cores), since an analysis is not stored."""
        run_id = starter.example_id(self.datastore, "grow-1")
        ms = self.model_source
        if run_id is None or not self.fresh() or self.stream.analysis is not None or ms.source != RUN \
                or run_id not in ms.run_select.options.values():
            return False
        ms.run_id = run_id
        self.analyse()
        self.show_note(starter.note("grow-1", "It is analysed on validation examples of its task; pick a layer or "
                                              "a token, click the lens heat-map to intervene, or choose your own "
                                              "run and press **Analyse**."))
        return True

    # ---------------------------------------------------------------- the old names of the parts' state
    @property
    def analysis(self) -> Analysis | None:
        return self.stream.analysis

    @property
    def last_intervention(self):
        return self.interventions.last

    @property
    def last_redraw_ms(self) -> float:
        return self.stream.last_redraw_ms

    @property
    def _holder(self) -> str:
        return self.model_source._holder

    # ---------------------------------------------------------------- the views' host
    def run(self, view, action: str, wait: bool = False) -> bool:
        """Start a view's ``action`` as the page's job (refused while one runs; a bad choice is named at once)."""
        return self._start(action, wait, view.choices)

    def refuse(self, view, error: Exception) -> None:
        self.errors.show(error)

    def _start(self, action: str, wait: bool, choices=None) -> bool:
        req = self.read_form(lambda: {**self.model_source.request(), **self.inputs.request(),
                                      "choices": choices(action) if choices is not None else {}})
        if req is None:
            return False
        if action == "analysis":
            self.show_code()
        return self.start_task(self._job, action, req, wait=wait)

    def analyse(self, wait: bool = False) -> None:
        """Open the model and build the input in the page's job, then run every analysis (cached per model and
        input); refused while one runs."""
        self._start("analysis", wait)

    def intervene(self, wait: bool = False) -> None:
        """Erase, skip or patch the chosen (layer, token) and show the change downstream and at the output."""
        self.interventions.run("intervention", wait=wait)

    def run_report(self, wait: bool = False) -> None:
        """Every depth analysis at once on the chosen input, as a background job; then an HTML file to keep."""
        self._start("report", wait, lambda _: {"made": self.lenses.made, "layer": checks.check_int(
            "attention layer", self.attention.layer, 0)})

    # ---------------------------------------------------------------- the job: open, build the input, run
    def _subject(self, ctx, opened, req: dict, action: str) -> ModelInput:
        subject = self.inputs.build(opened, req, corrupt=action != "analysis")
        subject.stages = self.model_source.stages(req) if action in ("analysis", "attention") else []
        if req["source"] == RUN:
            subject.store, subject.run_id = self.datastore.store, req["run_id"]
        return subject

    def _job(self, ctx, action: str, req: dict):
        """Every model load, dataset build and analysis of the page happens here, in the page's job."""
        try:
            opened = self.model_source.open(ctx, req)
        except interop.Stopped as e:
            ctx.report(message=f"stopped: the model was not opened ({e})")
            return "stopped", None
        lock = opened.lock   # a shared model runs one analysis at a time (hooks live on its modules)
        while not lock.acquire(timeout=0.2):
            if ctx.stopped:
                ctx.report(message="stopped while another session was analysing the same model")
                return "stopped", None
        try:
            subject = self._subject(ctx, opened, req, action)
            key = (req["model_key"], req["input_key"])
            if action == "analysis":
                return action, key, subject, self._analysis_job(ctx, subject, req)
            if action in ("intervention", "report"):
                sequence_model(subject, "an intervention" if action == "intervention" else "the depth report")
                self._report_estimate(ctx, subject.model, subject.x)
            if action == "report":
                return action, key, subject, _report_job(ctx, subject, **req["choices"])
            return action, key, subject, self._view_of[action].jobs[action](ctx, subject, **req["choices"])
        finally:
            lock.release()

    def _analysis_job(self, ctx, subject: ModelInput, req: dict) -> dict:
        self._report_estimate(ctx, subject.model, subject.x)
        ctx.report(message="analysing", progress=0.1)
        cache_key = (req["model_key"], req["input_key"])
        analysis = self._cache.get(cache_key) or Analysis(subject.model, subject.x, subject.tokens, subject.vocab,
                                                          subject.y)
        stages = None
        if len(subject.stages) > 1:
            gkey = (tuple(self.model_source.group()["run_id"]), req["input_key"])
            stages = self._stage_stats.get(gkey)
            if stages is None:
                stages = stage_contributions(ctx, subject.stages, subject.x)
                self._stage_stats[gkey] = stages
        out = {"stream": (analysis, stages), "lenses": None, "attention": None, "notes": []}
        if not analysis.mixture:
            for name, fn in (("lenses", lambda: lens_compare_job(ctx, subject, self.lenses.made)),
                             ("attention", lambda: self.attention.jobs["attention"](ctx, subject, 0))):
                if name == "attention" and not analysis.sequence:
                    continue
                try:
                    out[name] = fn()
                except ValueError as e:   # e.g. a family without attention weights: the stream is still shown
                    out["notes"].append(f"{name}: {e}")
        return out

    def _report_estimate(self, ctx, model, x) -> None:
        """The depth report's estimated memory and time for this input, sent before anything long starts."""
        if residual.is_mixture(model) or not ModelInput(model, x).sequence:
            ctx.report({"estimate": ""})
            return
        est = residual.estimate(model, int(x.numel()), "report")
        ctx.report({"estimate": f"Depth report on these {int(x.numel())} tokens: about {est['bytes'] / 2**20:.0f} MB "
                                f"above the model and {est['seconds']:.1f} s ({est['forwards']:.0f} forwards)."})

    # ---------------------------------------------------------------- results
    def on_update(self, payload) -> None:
        if isinstance(payload, dict) and "estimate" in payload:
            self.estimate_note.object = payload["estimate"]

    def on_done(self, result) -> None:
        if result[0] == "stopped":
            return
        action, key, subject, value = result
        self.task.message = ""   # the status line then says "done"
        if key != self._shown or action == "analysis":
            self._bind(key, subject)
        if action == "analysis":
            analysis, stages = value["stream"]
            self._cache[key] = analysis
            self.stream.show_stages(stages)
            if self.model_source.source == MIXTURE:
                analysis.select_member(self.model_source.member or 0)
            if self.stream.analysis is analysis:
                self.stream.draw()
            else:
                self.stream.analysis = analysis
            if value["lenses"] is not None:
                self.lenses.show("lenses", value["lenses"])
            if value["attention"] is not None:
                self.attention.show("attention", value["attention"])
            return
        if action == "report":
            self._report_done(value)
            return
        self._view_of[action].show(action, value)

    def _bind(self, key, subject: ModelInput) -> None:
        """The views now read ``subject``; a new (model, input) clears what they showed of the old one."""
        changed = key != self._shown
        self._shown = key
        for view in self.views:
            view.subject = subject
        if changed:
            for view in (self.lenses, self.attention, self.tracing):
                view.clear()

    # ---------------------------------------------------------------- the depth report
    def _report_done(self, value) -> None:
        rep, tokens, html = value
        self.report = rep
        with pn.io.hold():
            self.ig_pane.object = figs.ig_heatmap(rep.ig, tokens)
            self.report_patch_pane.object = figs.patch_heatmap(rep.patching if len(rep.patching) else None, tokens)
            self.report_file.file = io.BytesIO(html.encode("utf-8"))
            self.report_file.visible = True
            self.report_note.object = (
                f"**Depth report**: {rep.n_layers} layers, depth score {rep.depth_score:.2f} (centre of mass of the "
                f"skip effect on the output); lenses ({', '.join(dict.fromkeys(rep.lenses['lens']))}), commitment, "
                f"head-type scores and the attention of layer {rep.attention_layer} are in the file. "
                + ("" if len(rep.patching) else "Type a corrupt text of the same length to add patching."))

    # ---------------------------------------------------------------- layout and code
    def prelude(self) -> list[str]:
        """The lines that define ``model``, ``x``, ``y``, ``tokens``, ``vocab`` and ``x_corrupt`` for the views' code."""
        lines, sequence, tokenizer = self.model_source.code_lines()
        if not lines:
            raise ValueError("choose a model first")
        sequence = True if sequence is None else sequence
        out = ["import torch", "import workbench as wb", "from workbench.figures import residual as figs", *lines,
               *self.inputs.code_lines(sequence, tokenizer)]
        corrupt = self.inputs.corrupt if self.inputs.kind == TYPED else ""
        if not corrupt:
            out.append("x_corrupt = None   # patching: type a corrupt text of the same length")
        elif tokenizer:
            out.append(f"x_corrupt = torch.tensor([tokenizer({corrupt!r})['input_ids']])")
        else:
            out.append(f"x_corrupt = (wb.data.dataset.encode_text({corrupt!r}, vocab)[None] if vocab else "
                       f"torch.tensor([[int(t) for t in {corrupt!r}.split()]]))")
        return out

    def as_code(self) -> str:
        """The engine calls for the chosen model and input (a stored run or model folder; a mixture: a note)."""
        if self.model_source.source == MIXTURE:
            return MIXTURE_CODE
        try:
            prelude = self.prelude()
        except ValueError:
            return NO_RUN_CODE
        sequence = self.model_source.code_lines()[1] is not False
        return "\n".join(prelude + self.stream.code_lines() + (self.interventions.code_lines() if sequence else []))

    def side(self):
        ms, inp = self.model_source, self.inputs
        return [*ms.widgets(), *inp.widgets(), ms.stage_slider, self.analyse_button, *self.stream.focus_widgets(),
                *self.interventions.widgets(), self.report_button, self.report_file, self.estimate_note]

    def figures(self):
        stream = pn.Column(*self.stream.panels(), *self.interventions.panels(), self.report_note,
                           pn.Row(self.ig_pane, self.report_patch_pane, sizing_mode="stretch_width"),
                           sizing_mode="stretch_width")
        tabs = [(self.stream.title, stream)] + [(v.title, pn.Column(*v.panels(), v.code_card,
                                                                     sizing_mode="stretch_width"))
                                                for v in (self.lenses, self.attention, self.tracing)]
        self.tabs = pn.Tabs(*tabs, dynamic=True, sizing_mode="stretch_width")
        for v in (self.lenses, self.attention, self.tracing):
            v.show_code()
        return [self.tabs]

    def run_buttons(self):
        return [self.analyse_button, self.interventions.button, self.report_button, *self.lenses.buttons(),
                *self.attention.buttons(), *self.tracing.buttons()]

    def show_code(self, code: str | None = None) -> None:
        super().show_code(code)
        for v in (self.lenses, self.attention, self.tracing):
            v.show_code()


def _report_job(ctx, subject: ModelInput, made: dict | None = None, layer: int = 0):
    """``(DepthReport, tokens, HTML)``: every analysis at once, with the tuned lens made for this model (if any)
    and the attention pattern of ``layer``."""
    ctx.report(message="depth report: every analysis", progress=0.05)
    tuned = (made or {}).get(subject.key, {}).get("tuned")
    rep = residual.report(subject.model, subject.x, corrupt=subject.corrupt, tuned=tuned, attention_layer=layer,
                          labels=subject.tokens)
    return rep, subject.tokens, figs.depth_report_html(rep, subject.tokens, subject.vocab)
