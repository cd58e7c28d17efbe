"""Residual stream page: what each layer writes, the logit lens, layer skipping and direct attribution.

One analysis (every engine call) runs per (model, input) and is cached on the page; choosing a
layer or a token only re-slices the cached tables and redraws, so it stays fast. No math here.
"""
from __future__ import annotations

import io
import json
import time
import uuid

import pandas as pd
import panel as pn
import torch

from ..core import checks
from ..io import interop, model_roots as roots
from .. import hooks, residual
from ..figures import interventions as ifigs
from ..figures import residual as figs
from .common import dataset_from_spec, escape_md, open_run, run_options
from .page import Page

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
every analysis at once (integrated gradients, depth score, erasure, patching) and gives an HTML file to keep;
its estimated memory and time are shown before it starts."""

NO_RUN_CODE = """import workbench as wb
# no stored run chosen yet: train or grow one (or pick a Hugging Face model); this box then shows the calls"""
MIXTURE_CODE = """import workbench as wb
# a Compose mixture lives in this browser session only: rebuild it with the Compose page's "As code" box
# (mixture = merges["logit mean"]), then call the same functions on it, e.g.
# wb.residual.logit_attribution(mixture, x)   # members' components x their weights; sums to its logit"""
ANALYSIS_CODE = """wb.residual.contributions(model, x)                      # layer, sublayer, rel_norm, cosine
wb.residual.logit_lens(model, x, y=y, per_position={seq})   # layer, (position,) kl_to_final, top1_agree, loss
wb.residual.skip_effects(model, x, y=y).heatmap          # skipped, affected, effect
wb.residual.logit_attribution(model, x{first})           # component -> logit of the predicted token
figs.contributions_figure(wb.residual.contributions(model, x))"""


SOURCES = ["Stored run", "Hugging Face model", "Compose mixture (this session)"]
NO_HF_MODELS = ("No Hugging Face model folders found in the model roots (`WORKBENCH_MODEL_ROOTS`; by default "
                "the run store and the local Hugging Face cache). Put one there (e.g. "
                "`wb.interop.export_gpt2(model, folder)` in a notebook) and press **Refresh**.")
NO_MIXTURE = ("No mixture in this session yet: build a logit mixture on the **Compose** page first "
              "(*Compose and evaluate* with *logit mean* or *gated mixture*), then come back here.")
INPUTS = ["Dataset sample", "Typed text"]
INTERVENTIONS = ["erase", "skip from here", "patch"]
VECTOR_BATCH = 256  # vector datasets: analyse this many validation examples at once


class Analysis:
    """Everything the page shows for one (model, input); tables only, no tensors kept.

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


class ResidualPage(Page):
    """Choose a stored run (any growth stage) or a local Hugging Face GPT-2 directory, and an input."""

    title = "Residual stream"
    order = 30
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.source = pn.widgets.RadioButtonGroup(options=SOURCES, value=SOURCES[0], orientation="vertical",
                                                  width=320)
        self.run_select = pn.widgets.Select(label="run", options={}, width=320)
        # a chooser over the configured model roots: the browser never sends a path (workbench.roots)
        self.hf_model = pn.widgets.Select(label="Hugging Face model (from the model folders)", options={},
                                          width=320, visible=False)
        self.hf_refresh = pn.widgets.Button(name="Refresh", width=80, visible=False)
        self.hub_name = pn.widgets.TextInput(name="or a Hub name (the server must be online)",
                                             placeholder="EleutherAI/pythia-70m", width=320, visible=False)
        self.hf_refresh.on_click(lambda _: self.refresh_models())
        self.no_hf_models = pn.pane.Markdown(NO_HF_MODELS, visible=False, sizing_mode="stretch_width")
        self._hf_listed = False
        self.mixture_select = pn.widgets.Select(label="mixture (built on the Compose page)", options=[], width=320,
                                                visible=False)
        self.member = pn.widgets.Select(label="member", options={}, width=200, visible=False)
        self.domain = pn.widgets.Select(label="samples from", options=[], width=160, visible=False)
        self.no_mixture = pn.pane.Markdown(NO_MIXTURE, visible=False, sizing_mode="stretch_width")
        self.input_kind = pn.widgets.RadioButtonGroup(options=INPUTS, value=INPUTS[0])
        self.sample = pn.widgets.IntInput(label="sample (validation split)", value=0, start=0, width=170)
        self.text = pn.widgets.TextInput(label="text (characters of the vocabulary, or token ids '3 1 4')",
                                         placeholder="The cat sees the moon.", width=320, visible=False)
        self.corrupt_text = pn.widgets.TextInput(name="corrupt text (for patching; same number of tokens)",
                                                 width=320, visible=False)
        self.analyse_button = pn.widgets.Button(label="Analyse", button_type="primary", width=100)
        self.analyse_button.on_click(lambda _: self.analyse())
        self.report_button = pn.widgets.Button(label="Depth report", button_type="primary", width=120)
        self.report_button.on_click(lambda _: self.run_report())
        self.report_file = pn.widgets.FileDownload(label="Download the report (HTML)", filename="depth_report.html",
                                                   visible=False, width=260, embed=False)
        self.intervention = pn.widgets.RadioButtonGroup(name="intervention", options=INTERVENTIONS,
                                                        value=INTERVENTIONS[0])
        self.intervene_button = pn.widgets.Button(label="Intervene at (layer, token)", width=200)
        self.intervene_button.on_click(lambda _: self.intervene())
        self.estimate_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.stage = pn.widgets.DiscreteSlider(label="growth stage", options={"-": None}, visible=False, width=300)
        self.layer = pn.widgets.IntSlider(label="layer", start=0, end=1, value=0, width=260, disabled=True)
        self.position = pn.widgets.IntSlider(label="token position", start=0, end=1, value=0, width=260,
                                             disabled=True)
        self.lens_metric = pn.widgets.Select(label="lens shows", options=list(figs._LENS_TITLES), width=150)
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.contrib_pane = pn.pane.Plotly(figs.contributions_figure(None), sizing_mode="stretch_width", height=340)
        self.position_pane = pn.pane.Plotly(figs.position_figure(None, 0), sizing_mode="stretch_width", height=300)
        self.lens_pane = pn.pane.Plotly(figs.lens_heatmap(None), sizing_mode="stretch_width", height=340)
        self.skip_pane = pn.pane.Plotly(figs.skip_heatmap(None), sizing_mode="stretch_width", height=340)
        self.skip_out_pane = pn.pane.Plotly(figs.skip_output_figure(None), sizing_mode="stretch_width", height=300)
        self.attr_pane = pn.pane.Plotly(figs.attribution_figure(None), sizing_mode="stretch_width", height=380)
        self.stages_pane = pn.pane.Plotly(figs.stages_figure(None), sizing_mode="stretch_width", height=320,
                                          visible=False)
        self.intervene_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.intervene_pane = pn.pane.Plotly(figs.erasure_heatmap(None), sizing_mode="stretch_width", height=340)
        self.intervene_out_pane = pn.pane.Plotly(ifigs.output_change_figure(None), sizing_mode="stretch_width",
                                                 height=340)
        self.report_note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.ig_pane = pn.pane.Plotly(figs.ig_heatmap(None), sizing_mode="stretch_width", height=340)
        self.report_patch_pane = pn.pane.Plotly(figs.patch_heatmap(None), sizing_mode="stretch_width", height=340)
        self.report = None                   # the last DepthReport
        self.last_intervention = None        # (kind, layer, position, result)
        self.analysis: Analysis | None = None
        self.last_redraw_ms = 0.0
        self._cache: dict = {}       # (model key, input key) -> Analysis
        self._opened: dict = {}      # model key -> interop.OpenModel (opened in the job)
        self._holder = f"residual-page-{uuid.uuid4().hex}"   # who holds a model in the shared cache
        self._datasets: dict = {}    # dataset spec json -> Dataset
        self._stage_stats: dict = {}  # (group, input key) -> DataFrame with a stage column
        self._known_runs: set[str] | None = None  # run ids seen at the last refresh
        self._syncing_stages = False  # the stage slider is being refilled (not a user's choice)
        self._known_mixtures: list[str] = []
        self.source.param.watch(self._sync_visibility, "value")
        self.input_kind.param.watch(self._sync_visibility, "value")
        self.run_select.param.watch(self._sync_stages, "value")
        self.mixture_select.param.watch(self._sync_members, "value")
        self.member.param.watch(self._member_changed, "value")
        self.stage.param.watch(self._stage_changed, "value")
        self.layer.param.watch(self._layer_changed, "value")
        self.position.param.watch(self._position_changed, "value")
        self.lens_metric.param.watch(self._position_changed, "value")
        self.lens_pane.param.watch(self._lens_clicked, "click_data")
        if pn.state.curdoc is not None:
            pn.state.on_session_destroyed(self._release_models)
        self._refresh_runs()

    def _layer_changed(self, _=None) -> None:
        self._redraw("layer")

    def _position_changed(self, _=None) -> None:
        self._redraw("position")

    def on_store_change(self) -> None:
        self._refresh_runs()

    def on_done(self, result) -> None:
        kind, value = result
        if kind == "stopped":
            return
        if kind == "analysis":
            self._on_done(value)
        elif kind == "report":
            self._report_done(value)
        else:
            self._intervention_done(value)

    def side(self):
        return [self.source, self.run_select, self.hf_model, self.hf_refresh, self.hub_name, self.no_hf_models,
                self.mixture_select, self.member, self.no_mixture, self.input_kind, self.domain, self.sample, self.text,
                self.corrupt_text, self.stage, self.analyse_button, self.layer, self.position, self.lens_metric,
                self.intervention, self.intervene_button, self.report_button, self.report_file, self.estimate_note]

    def figures(self):
        return [self.summary, self.contrib_pane, self.stages_pane,
                pn.Row(self.lens_pane, self.attr_pane, sizing_mode="stretch_width"), self.position_pane,
                pn.Row(self.skip_pane, self.skip_out_pane, sizing_mode="stretch_width"),
                self.intervene_note, pn.Row(self.intervene_pane, self.intervene_out_pane, sizing_mode="stretch_width"),
                self.report_note, pn.Row(self.ig_pane, self.report_patch_pane, sizing_mode="stretch_width")]

    def run_buttons(self):
        return [self.analyse_button, self.intervene_button, self.report_button]

    def as_code(self) -> str:
        """The engine calls for the chosen model and input (a stored run or model folder; a mixture: a note)."""
        src = self.source.value
        lines = ["import torch", "import workbench as wb", "from workbench.figures import residual as figs"]
        if src == SOURCES[2]:
            return MIXTURE_CODE
        if src == SOURCES[0]:
            run_id = self.run_select.value
            if not run_id:
                return NO_RUN_CODE
            runs = self.datastore.runs
            family = runs.loc[runs["run_id"] == run_id, "family"]
            sequence = bool(len(family)) and family.iloc[0] == "transformer"
            lines += [f"run = wb.RunStore().load({run_id!r})",
                      "model, vocab, spec = run.model, getattr(run.model.config, 'vocab', None), run.dataset"]
        else:
            hub = (self.hub_name.value or "").strip()
            if not (self.hf_model.value or hub):
                return NO_RUN_CODE
            sequence = True
            try:
                folder = None if hub else roots.resolve_model(self.hf_model.value, user=self.datastore.user,
                                                              home=self._home())
            except ValueError:
                return NO_RUN_CODE
            if hub:
                lines += [f"model, tokenizer = wb.interop.load_hf({hub!r})", "vocab, spec = None, None"]
            elif (folder / interop.EXPORT_META).is_file():
                lines += [f"model, meta = wb.interop.load_gpt2(wb.roots.resolve_model({self.hf_model.value!r}))",
                          "vocab, spec = meta.get('vocab'), meta.get('dataset')"]
            else:
                lines += [f"model, tokenizer = wb.interop.load_hf(wb.roots.resolve_model({self.hf_model.value!r}))",
                          "vocab, spec = None, None"]
                if self.input_kind.value == INPUTS[1]:
                    lines += [f"x, y = torch.tensor([tokenizer({self.text.value!r})['input_ids']]), None"]
                    lines.append(ANALYSIS_CODE.format(seq=True, first=""))
                    return "\n".join(lines)
        if self.input_kind.value == INPUTS[1]:
            lines += [f"text = {self.text.value!r}",
                      "ids = [vocab.index(c) for c in text] if vocab else [int(t) for t in text.split()]",
                      "x, y = torch.tensor([ids]), None"]
        else:
            i = int(self.sample.value or 0)
            lines += ["ds = wb.data.from_spec(spec)", "x_val, y_val = ds.split('val')"]
            if sequence:
                # a text window's targets are its own next tokens (y=None), as on the page
                lines += [f"x, y = x_val[{i}:{i + 1}], (None if ds.name == 'text' else y_val[{i}:{i + 1}])"]
            else:
                lines += [f"start = min({i}, max(len(x_val) - {VECTOR_BATCH}, 0))",
                          f"x, y = x_val[start:start + {VECTOR_BATCH}], y_val[start:start + {VECTOR_BATCH}]"]
        lines.append(ANALYSIS_CODE.format(seq=sequence, first="" if sequence else "[:1]"))
        return "\n".join(lines)

    # ---------------------------------------------------------------- choices
    def _refresh_runs(self) -> None:
        options = run_options(self.datastore.runs)
        current = self.run_select.value
        known, self._known_runs = self._known_runs, set(options.values())
        new = [rid for rid in options.values() if known is not None and rid not in known]
        self.run_select.options = options
        if new:
            self.run_select.value = new[0]  # a run just saved (e.g. a growth run's last stage): show it
        elif current in options.values():
            self.run_select.value = current
        elif options:
            self.run_select.value = next(iter(options.values()))  # newest run
        self._refresh_mixtures()
        self._sync_stages()

    def _refresh_mixtures(self) -> None:
        """Offer the session's mixtures (DataStore.session_models); one just registered becomes the choice."""
        names = list(self.datastore.session_models)
        current = self.mixture_select.value
        new = [n for n in names if n not in self._known_mixtures]
        self._known_mixtures = names
        self.mixture_select.options = names
        if names:
            self.mixture_select.value = new[-1] if new else (current if current in names else names[-1])
        self._sync_members()
        self._sync_visibility()

    def _sync_members(self, _=None) -> None:
        info = self.datastore.session_info.get(self.mixture_select.value, {})
        model = self.datastore.session_models.get(self.mixture_select.value)
        n = len(model.members) if model is not None else 0
        names = list(info.get("members") or [])[:n]
        names += [f"member {k}" for k in range(len(names), n)]
        self.member.options = {f"m{k}: {name}": k for k, name in enumerate(names)}
        self.domain.options = list(info.get("datasets") or {})

    def refresh_models(self) -> None:
        """List the model folders under the configured roots again (``workbench.roots.list_models``: with
        sign-in, the user's own Hub downloads and the shared ones, not other students')."""
        current = self.hf_model.value
        options = {label: str(path) for label, path in
                   roots.list_models(user=self.datastore.user, home=self._home()).items()}
        self.hf_model.options = options
        self.hf_model.value = current if current in options.values() else next(iter(options.values()), None)
        self._hf_listed = True
        self._sync_visibility()

    def _sync_visibility(self, _=None) -> None:
        hf, mix = self.source.value == SOURCES[1], self.source.value == SOURCES[2]
        if hf and not self._hf_listed:
            self.refresh_models()  # the first look at the model folders (then on Refresh)
            return
        self.run_select.visible = self.source.value == SOURCES[0]
        self.hf_model.visible = self.hf_refresh.visible = hf
        self.hub_name.visible = hf and self._hub_allowed()   # on a class server only when the teacher allows it
        self.no_hf_models.visible = hf and not self.hf_model.options
        has_mixtures = bool(self.mixture_select.options)
        self.mixture_select.visible = self.member.visible = mix and has_mixtures
        self.no_mixture.visible = mix and not has_mixtures
        typed = self.input_kind.value == INPUTS[1]
        self.text.visible, self.sample.visible = typed, not typed
        self.corrupt_text.visible = typed
        self.domain.visible = mix and has_mixtures and not typed
        self._sync_stages()

    def _member_changed(self, _=None) -> None:
        """Another member of the analysed mixture: re-slice the cached tables and redraw (no forward pass)."""
        a = self.analysis
        if a is not None and a.mixture and self.member.value is not None and self.member.value < a.n_members \
                and self.source.value == SOURCES[2]:
            self._show(a)

    def _group_runs(self) -> pd.DataFrame:
        runs = self.datastore.runs
        run_id = self.run_select.value
        if self.source.value != SOURCES[0] or runs is None or not len(runs) or run_id is None:
            return runs.iloc[:0] if runs is not None else pd.DataFrame()
        row = runs[runs["run_id"] == run_id]
        if not len(row) or pd.isna(row["group_name"].iloc[0]) or row["group_name"].iloc[0] in ("", None):
            return runs.iloc[:0]
        group = runs[(runs["group_name"] == row["group_name"].iloc[0]) & runs["stage"].notna()]
        return group.sort_values("stage")

    def _sync_stages(self, _=None) -> None:
        group = self._group_runs()
        if len(group) > 1:
            opts = {f"stage {int(r.stage)} ({int(r.n_layers)} layers)": r.run_id for r in group.itertuples()}
            self._syncing_stages = True   # new options reset the slider to stage 0: not the user's choice
            try:
                self.stage.options = opts
                if self.run_select.value in opts.values():
                    self.stage.value = self.run_select.value
            finally:
                self._syncing_stages = False
            self.stage.visible = True
        else:
            self.stage.visible = False

    def _stage_changed(self, event) -> None:
        if self._syncing_stages:
            return
        if event.new and event.new != self.run_select.value and event.new in self.run_select.options.values():
            self.run_select.value = event.new
            if self.analysis is not None:
                self.analyse()

    # ---------------------------------------------------------------- the request (read at the click; nothing opened)
    def _home(self):
        return self.datastore.raw_store.root

    def _hub_allowed(self) -> bool:
        return interop.hub_allowed(self.datastore.classroom)

    def _request(self) -> dict:
        """What the form asks for, checked without opening a model or building data (cheap, on the event loop):
        the source and its choice (a folder is resolved inside the roots, or refused with the one message),
        the input and the keys under which analyses are cached."""
        src = self.source.value
        req = {"source": src, "input": self.input_kind.value, "text": self.text.value or "",
               "corrupt": self.corrupt_text.value or "", "sample": checks.check_int("sample", self.sample.value or 0, 0)}
        if src == SOURCES[0]:
            run_id = self.run_select.value
            if not run_id:
                raise ValueError("no stored run chosen: train or grow one first (or pick a Hugging Face model)")
            req.update(run_id=run_id, model_key=("run", run_id))
        elif src == SOURCES[2]:
            name = self.mixture_select.value
            if not name or name not in self.datastore.session_models:
                raise ValueError(NO_MIXTURE.replace("**", "").replace("*", ""))
            model = self.datastore.session_models[name]   # a re-composed mixture of the same name is another model
            req.update(mixture=name, domain=self.domain.value, model_key=("session", name, id(model)))
        else:
            hub = (self.hub_name.value or "").strip()
            if hub:
                interop.check_hub_name(hub)
                if not self._hub_allowed():
                    raise ValueError(interop.HUB_REFUSED)
                req.update(hub=hub, model_key=("hub", hub))
            else:
                choice = self.hf_model.value
                if not choice:
                    raise ValueError(NO_HF_MODELS.replace("**", "").replace("`", ""))
                path = roots.resolve_model(choice, user=self.datastore.user, home=self._home())  # or the one refusal
                req.update(folder=str(path), model_key=("hf", str(path)))
        if req["input"] == INPUTS[1]:
            if not req["text"]:
                raise ValueError("type some text (or choose a dataset sample)")
            req["input_key"] = ("text", req["text"])
        else:
            req["input_key"] = ("sample", req.get("domain"), req["sample"])
        return req

    # ---------------------------------------------------------------- opening (in the page's job)
    def _dataset(self, spec: dict):
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._datasets:
            self._datasets[key] = dataset_from_spec(spec)  # never a server path
        return self._datasets[key]

    def _open(self, ctx, req) -> interop.OpenModel:
        """The chosen model, opened in the job (cached on the page; Hugging Face models in the server's shared
        cache, :data:`workbench.interop.MODELS`, this page holding one at a time)."""
        key = req["model_key"]
        if req["source"] == SOURCES[2]:
            model = self.datastore.session_models.get(req["mixture"])
            if model is None or id(model) != key[2]:
                raise ValueError(NO_MIXTURE.replace("**", "").replace("*", ""))
            info = self.datastore.session_info.get(req["mixture"], {})
            datasets = info.get("datasets") or {}
            spec = datasets.get(req["domain"]) or next(iter(datasets.values()), None)
            vocab = info.get("vocab") or getattr(model.config, "vocab", None)
            return interop.OpenModel(model, vocab, spec, None, key, req["mixture"], 0)
        opened = self._opened.get(key)
        if opened is not None:
            return opened
        if req["source"] == SOURCES[0]:
            ctx.report(message=f"loading run {req['run_id']}", progress=0.02)
            run = open_run(self.datastore.store, req["run_id"], "run")   # vanished, forged or foreign: refused
            opened = interop.OpenModel(run.model, getattr(run.model.config, "vocab", None), run.dataset, None, key,
                                       run.name, 0)
        else:
            opened = interop.open_model(folder=req.get("folder"), hub=req.get("hub"), user=self.datastore.user,
                                        home=self._home(), holder=self._holder, monitor=ctx)
            for k in [k for k in self._opened if k[0] in ("hf", "hub") and k != key]:   # one held at a time
                interop.MODELS.release(self._holder, self._opened.pop(k).key)
        self._opened[key] = opened
        return opened

    def _release_models(self, *_) -> None:
        """The session ended: the shared cache may drop the Hugging Face model this page held."""
        self._opened = {k: v for k, v in self._opened.items() if k[0] not in ("hf", "hub")}
        interop.MODELS.release(self._holder)

    def _encode_text(self, text: str, vocab, tokenizer, field: str = "text") -> list[int]:
        if tokenizer is not None:
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                raise ValueError(f"{field}: the tokenizer gives no tokens for this text")
            return ids
        return _encode(text, vocab)

    def _input(self, opened: interop.OpenModel, req: dict):
        """``(input key, x, tokens, y)`` for the chosen input (in the job: a dataset is built here)."""
        model, vocab, spec = opened.model, opened.vocab, opened.dataset
        single = model.members[0] if residual.is_mixture(model) else model
        sequence = hooks.adapter(single).family == "transformer"
        if req["input"] == INPUTS[1]:
            if not sequence:
                raise ValueError("typed text needs a sequence model; vector models take dataset samples")
            text = req["text"]
            ids = self._encode_text(text, vocab, opened.tokenizer)
            n_vocab = int(model.config.vocab_size)
            if any(not 0 <= i < n_vocab for i in ids):
                raise ValueError(f"token ids must be in [0, {n_vocab - 1}]")
            context = _context(model)
            if len(ids) > context:
                raise ValueError(f"the text has {len(ids)} tokens; this model's context is {context}")
            tokens = [vocab[i] for i in ids] if vocab else [str(i) for i in ids]
            return req["input_key"], torch.tensor([ids]), tokens, None
        if not spec:
            raise ValueError("this model has no dataset recorded; type text (or token ids) instead")
        ds = self._dataset(spec)
        x_val, y_val = ds.split("val")
        i = req["sample"]
        if sequence:
            if not 0 <= i < len(x_val):
                raise ValueError(f"sample must be in [0, {len(x_val) - 1}], got {i}")
            x = x_val[i:i + 1]
            tokens = [ds.vocab[int(t)] for t in x[0]] if ds.vocab else None
            y = y_val[i:i + 1]
            if ds.name == "text":
                y = None  # next-token targets of the window itself
            return req["input_key"], x, tokens, y
        start = min(max(i, 0), max(len(x_val) - VECTOR_BATCH, 0))
        return req["input_key"], x_val[start:start + VECTOR_BATCH], None, y_val[start:start + VECTOR_BATCH]

    def _sequence_input(self, opened: interop.OpenModel, req: dict, what: str):
        """``(model, x, tokens, x_corrupt or None)`` of the chosen single sequence model and input."""
        model = opened.model
        if residual.is_mixture(model):
            raise ValueError(f"{what} reads one model: choose a stored run or a Hugging Face model, not a mixture")
        if hooks.adapter(model).family != "transformer":
            raise ValueError(f"{what} needs a sequence model (token positions); this is a vector model")
        _, x, tokens, _ = self._input(opened, req)
        corrupt = None
        if req["input"] == INPUTS[1] and req["corrupt"]:
            ids = self._encode_text(req["corrupt"], opened.vocab, opened.tokenizer, "corrupt text")
            if len(ids) != x.shape[1]:
                raise ValueError(f"corrupt text must have as many tokens as the text ({x.shape[1]}), got {len(ids)}")
            n_vocab = int(model.config.vocab_size)
            if any(not 0 <= i < n_vocab for i in ids):
                raise ValueError(f"corrupt text: token ids must be in [0, {n_vocab - 1}]")
            corrupt = torch.tensor([ids])
        return model, x, tokens, corrupt

    # ---------------------------------------------------------------- the job: open, then analyse / intervene / report
    def _job(self, ctx, action: str, req: dict):
        """Every model load, dataset build and analysis of the page happens here, in the page's job."""
        try:
            opened = self._open(ctx, req)
        except interop.Stopped:
            ctx.report(message="stopped: the model was not opened")
            return "stopped", None
        lock = opened.lock   # a shared model runs one analysis at a time (hooks live on its modules)
        while not lock.acquire(timeout=0.2):
            if ctx.stopped:
                ctx.report(message="stopped while another session was analysing the same model")
                return "stopped", None
        try:
            if action == "analysis":
                return "analysis", self._analysis_job(ctx, opened, req)
            what = "an intervention" if action == "intervention" else "the depth report"
            model, x, tokens, corrupt = self._sequence_input(opened, req, what)
            if action == "intervention" and req["kind"] == "patch" and corrupt is None:
                raise ValueError("patch needs a corrupt input: choose 'Typed text' and type the corrupt text "
                                 "(same number of tokens)")
            self._report_estimate(ctx, model, x)
            if action == "intervention":
                return _intervention_job(ctx, req["kind"], model, x, tokens, corrupt, req["layer"], req["position"])
            return _report_job(ctx, model, x, tokens, corrupt)
        finally:
            lock.release()

    def _report_estimate(self, ctx, model, x) -> None:
        """The depth report's estimated memory and time for this input, sent before anything long starts."""
        if residual.is_mixture(model) or hooks.adapter(model).family != "transformer":
            ctx.report({"estimate": ""})
            return
        est = residual.estimate(model, int(x.numel()), "report")
        ctx.report({"estimate": f"Depth report on these {int(x.numel())} tokens: about {est['bytes'] / 2**20:.0f} MB "
                                f"above the model and {est['seconds']:.1f} s ({est['forwards']:.0f} forwards)."})

    def on_update(self, payload) -> None:
        if isinstance(payload, dict) and "estimate" in payload:
            self.estimate_note.object = payload["estimate"]

    # ---------------------------------------------------------------- analysis
    def _start(self, action: str, wait: bool, extra=None) -> None:
        """Read the form (and ``extra()``, more fields) and start the page's job (refused while it runs; a bad
        choice is named at once)."""
        req = self.read_form(lambda: {**self._request(), **(extra() if extra is not None else {})})
        if req is None:
            return
        if action == "analysis":
            req["group"] = self._group_runs()
            cache_key = (req["model_key"], req["input_key"])
            group = req["group"]
            if cache_key in self._cache and (len(group) <= 1 or
                                             (tuple(group["run_id"]), req["input_key"]) in self._stage_stats):
                self._on_done((cache_key, self._cache[cache_key], None))
                return
            self.show_code()
        self.start_task(self._job, action, req, wait=wait)

    def analyse(self, wait: bool = False) -> None:
        """Open the model and build the input in the page's job, then run every analysis (cached per model and
        input); refused while one runs."""
        self._start("analysis", wait)

    def _analysis_job(self, ctx, opened, req):
        input_key, x, tokens, y = self._input(opened, req)
        self._report_estimate(ctx, opened.model, x)
        ctx.report(message="analysing", progress=0.1)
        cache_key = (req["model_key"], input_key)
        analysis = self._cache.get(cache_key) or Analysis(opened.model, x, tokens, opened.vocab, y)
        stages, group = None, req["group"]
        if len(group) > 1:
            gkey = (tuple(group["run_id"]), input_key)
            stages = self._stage_stats.get(gkey)
            if stages is None:
                frames = []
                for k, r in enumerate(group.itertuples()):
                    if ctx.stopped:
                        break
                    ctx.report(message=f"stage {int(r.stage)}", progress=0.2 + 0.8 * k / len(group))
                    m = open_run(self.datastore.store, r.run_id, f"growth stage {int(r.stage)}").model
                    frames.append(residual.contributions(m, x).assign(stage=int(r.stage)))
                stages = pd.concat(frames, ignore_index=True) if frames else None
                self._stage_stats[gkey] = stages
        return cache_key, analysis, stages

    # ---------------------------------------------------------------- interventions and the depth report
    def _lens_clicked(self, event) -> None:
        """A click on the logit-lens heat-map: that cell's layer and token become the choice, then intervene."""
        points = (event.new or {}).get("points") or []
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
            self.layer.value, self.position.value = layer, pos
        self.intervene()

    def intervene(self, wait: bool = False) -> None:
        """Erase, skip or patch the chosen (layer, token) and show the change downstream and at the output."""
        self._start("intervention", wait, lambda: {
            "kind": checks.check_choice("intervention", self.intervention.value, INTERVENTIONS),
            "layer": checks.check_int("layer", self.layer.value, 0), "position": checks.check_int(
                "token position", self.position.value, 0)})

    def _intervention_done(self, value) -> None:
        kind, layer, pos, tokens, result = value
        self.last_intervention = (kind, layer, pos, result)
        self.task.message = ""
        with pn.io.hold():
            if kind == "erase":
                self.intervene_pane.object = figs.erasure_heatmap(result.residual, tokens)
                self.intervene_out_pane.object = ifigs.output_change_figure(
                    result.output, tokens, title=f"Output change after erasing layer {layer}, token {pos}")
                worst = result.output.loc[result.output["kl"].idxmax()]
                self.intervene_note.object = (
                    f"**Erased** the residual entering layer {layer} at token {pos} (replaced by the mean residual): "
                    f"largest output change at token {int(worst.position)}, KL {worst.kl:.3f}.")
            elif kind == "skip from here":
                heat, out = result
                self.intervene_pane.object = figs.skip_heatmap(heat, None)
                self.intervene_out_pane.object = ifigs.output_change_figure(
                    out, tokens, title=f"Output change with layer {layer} skipped from token {pos} on")
                self.intervene_note.object = (
                    f"**Skipped** layer {layer} from token {pos} on: later layers' contributions change by up to "
                    f"{heat['effect'].max() if len(heat) else 0.0:.3f} (relative); output KL up to "
                    f"{out['kl'].max():.3f}.")
            else:
                self.intervene_pane.object = figs.with_shapes(figs.patch_heatmap(result, tokens).to_dict(),
                                                              [figs.cell_box(pos, layer)])
                self.intervene_out_pane.object = ifigs.output_change_figure(None)
                cell = result[(result["layer"] == layer) & (result["position"] == pos)]["recovery"]
                at = f"{float(cell.iloc[0]):.2f}" if len(cell) else "n/a"
                self.intervene_note.object = (
                    f"**Patched** the clean residual into the corrupt run: recovery at layer {layer}, token {pos} "
                    f"= {at} (1: the clean answer fully back; 0: no effect).")

    def run_report(self, wait: bool = False) -> None:
        """Every depth analysis at once on the chosen input, as a background job; then an HTML file to keep."""
        self._start("report", wait)

    def _report_done(self, value) -> None:
        rep, tokens, html = value
        self.report = rep
        self.task.message = ""
        with pn.io.hold():
            self.ig_pane.object = figs.ig_heatmap(rep.ig, tokens)
            self.report_patch_pane.object = figs.patch_heatmap(rep.patching if len(rep.patching) else None, tokens)
            self.report_file.file = io.BytesIO(html.encode("utf-8"))
            self.report_file.visible = True
            self.report_note.object = (
                f"**Depth report**: {rep.n_layers} layers, depth score {rep.depth_score:.2f} (centre of mass of the "
                f"skip effect on the output). " + ("" if len(rep.patching) else
                                                  "Type a corrupt text of the same length to add patching."))

    def _on_done(self, result) -> None:
        cache_key, analysis, stages = result
        self.task.message = ""  # the status line then says "done"
        self._cache[cache_key] = analysis
        self.analysis = analysis
        if stages is None and len(self._group_runs()) > 1:
            stages = self._stage_stats.get((tuple(self._group_runs()["run_id"]), cache_key[1]))
        self.stages_pane.visible = stages is not None
        if stages is not None:
            self.stages_pane.object = figs.stages_figure(stages)
        self._show(analysis)

    def _show(self, analysis: Analysis) -> None:
        """Bounds of the sliders, the figures and the summary for an analysis (and the chosen member)."""
        if analysis.mixture:
            analysis.select_member(self.member.value or 0)
        L = analysis.n_layers
        with pn.io.hold():
            self.layer.end = max(L - 1, 1)
            self.layer.value = min(self.layer.value, max(L - 1, 0))
            self.layer.disabled = L == 0
            self.position.end = max(analysis.n_positions - 1, 1)
            self.position.value = min(self.position.value, analysis.n_positions - 1)
            self.position.disabled = not analysis.sequence
            self.skip_out_pane.object = figs.skip_output_figure(analysis.skip.output)
            self._build_figures()
            self._redraw("all")
        last = analysis.lens.iloc[-1] if len(analysis.lens) else None
        if last is None:
            self.summary.object = ""
        elif analysis.mixture:
            self.summary.object = (
                f"Mixture of {analysis.n_members} members; member {analysis.member} "
                f"(*{escape_md(self._member_label(analysis.member))}*): {L} layers. Its own output against the mixture's: "
                f"KL {last.kl_to_final:.3f}, top-1 agreement {last.top1_agree:.2f}, loss {last.loss:.3f}. "
                "The attribution shows every member's components, scaled by the member's weight.")
        else:
            self.summary.object = f"{L} layers; logit lens at the output: loss {last.loss:.3f}"

    def _member_label(self, k: int) -> str:
        return next((label.split(": ", 1)[-1] for label, v in self.member.options.items() if v == k), f"member {k}")

    def _build_figures(self) -> None:
        """Full figures once per analysis, kept as dicts that :meth:`_redraw` patches."""
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

    def _redraw(self, what: str) -> None:
        """Re-slice the cached tables for the chosen layer / token and patch the figures (no forward pass)."""
        a = self.analysis
        if a is None:
            return
        t0 = time.perf_counter()
        layer = self.layer.value if a.n_layers else None
        pos = self.position.value if a.sequence else 0
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
                self.lens_pane.object = figs.with_shapes(self._lens_fig(self.lens_metric.value),
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


def _intervention_job(ctx, kind, model, x, tokens, corrupt, layer, pos):
    ctx.report(message=f"{kind} at layer {layer}, token {pos}", progress=0.1)
    if kind == "erase":
        result = residual.erase(model, x, layer, pos)
    elif kind == "skip from here":
        sk = residual.skip_effects(model, x, from_position=pos)
        heat = sk.heatmap[sk.heatmap["skipped"] == layer].reset_index(drop=True)
        out = sk.output[sk.output["skipped"] == layer].reset_index(drop=True)
        result = (heat, out.assign(position=pos))
    else:
        result = residual.patch(model, x, corrupt)
    return "intervention", (kind, layer, pos, tokens, result)


def _report_job(ctx, model, x, tokens, corrupt):
    ctx.report(message="depth report: every analysis", progress=0.05)
    rep = residual.report(model, x, corrupt=corrupt)
    return "report", (rep, tokens, figs.depth_report_html(rep, tokens))


def _context(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "context", None) or getattr(cfg, "n_positions", None)
               or getattr(cfg, "max_position_embeddings"))


def _encode(text: str, vocab: list[str] | None) -> list[int]:
    """Characters of the vocabulary, or whitespace-separated token ids when there is no vocabulary."""
    if vocab:
        index = {t: i for i, t in enumerate(vocab)}
        unknown = sorted({c for c in text if c not in index})
        if not unknown:
            return [index[c] for c in text]
        if not all(p.isdigit() for p in text.split()):
            raise ValueError(f"characters not in the model's vocabulary: {unknown[:10]}")
    parts = text.split()
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError("this model has no vocabulary: type token ids separated by spaces, e.g. '3 1 4'")
    return [int(p) for p in parts]
