"""Where the Residual page's model comes from: a stored run (any growth stage), a model folder under the
model roots, a Hub name, or a logit mixture built on the Compose page in this session.

:class:`ModelSource` holds the choice as params, draws its widgets from them, and turns the choice into
a request (cheap: checked on the event loop, nothing opened) and, in the page's job, into an opened
model (:func:`workbench.interop.open_model` for folders and Hub names). The browser never sends a path:
a folder is a value of :func:`workbench.roots.list_models`, resolved inside the roots or refused with
the one message; a run id is opened by :func:`workbench.ui.session.open_run` (vanished, forged or
another user's: refused naming the field).
"""
from __future__ import annotations

import uuid

import pandas as pd
import panel as pn
import param

from ...core import checks
from ...io import interop, model_roots as roots
from ...runtime import examples
from ..session import DataStore, open_run
from ..widgets import run_options

__all__ = ["ModelSource", "SOURCES", "RUN", "HF", "MIXTURE", "NO_HF_MODELS", "NO_MIXTURE", "plain"]

RUN, HF, MIXTURE = "Stored run", "Hugging Face model", "Compose mixture (this session)"
SOURCES = [RUN, HF, MIXTURE]
NO_HF_MODELS = ("No Hugging Face model folders found in the model roots (`WORKBENCH_MODEL_ROOTS`; by default "
                "the run store and the local Hugging Face cache). Put one there (e.g. "
                "`wb.interop.export_gpt2(model, folder)` in a notebook) and press **Refresh**.")
NO_MIXTURE = ("No mixture in this session yet: build a logit mixture on the **Compose** page first "
              "(*Compose and evaluate* with *logit mean* or *gated mixture*), then come back here.")


def plain(markdown: str) -> str:
    """A Markdown note as a plain error message."""
    return markdown.replace("**", "").replace("`", "").replace("*", "")


class ModelSource(pn.viewable.Viewer):
    """The model choice of the Residual page: ``source`` (one of :data:`SOURCES`) and, per source, ``run_id``,
    ``hf_choice`` / ``hub_name`` or ``mixture`` (with the ``member`` shown); ``stage`` steps a growth run.

    Widgets are views of the params (``from_param``); visibility follows ``source`` by value. Choices are
    plain strings checked where they are used (:meth:`request`), so a value the page never offered is
    refused with the usual message rather than half-applied. ``stage_chosen`` fires when the user moves
    the stage slider to another run of the growth group (the page then analyses it).
    """

    datastore = param.ClassSelector(class_=DataStore)
    source = param.String(default=RUN, doc="one of SOURCES")
    run_id = param.String(default=None, allow_None=True, doc="the stored run (a value of run_select)")
    hf_choice = param.String(default=None, allow_None=True, doc="a model folder offered by roots.list_models")
    hub_name = param.String(default="", doc="a Hub name owner/name (when the server allows Hub names)")
    mixture = param.String(default=None, allow_None=True, doc="a mixture of this session (DataStore.session_models)")
    member = param.Integer(default=None, allow_None=True, doc="the member of the mixture shown")
    stage = param.String(default=None, allow_None=True, doc="the growth stage's run id (the stage slider)")
    stage_chosen = param.Event(doc="the user moved the stage slider to another run")

    def __init__(self, datastore: DataStore, **params):
        super().__init__(datastore=datastore, **params)
        hf, run = self.param.source.rx() == HF, self.param.source.rx() == RUN
        self.source_buttons = pn.widgets.RadioButtonGroup.from_param(self.param.source, options=SOURCES,
                                                                     orientation="vertical", width=320, name="")
        self.run_select = pn.widgets.Select.from_param(self.param.run_id, options={}, name="run", width=320,
                                                       visible=run)
        # a chooser over the configured model roots: the browser never sends a path (workbench.roots)
        self.hf_model = pn.widgets.Select.from_param(self.param.hf_choice, options={}, width=320, visible=hf,
                                                     name="Hugging Face model (from the model folders)")
        self.hf_refresh = pn.widgets.Button(name="Refresh", width=80, visible=hf)
        self.hf_refresh.on_click(lambda _: self.refresh_models())
        self.hub_input = pn.widgets.TextInput.from_param(self.param.hub_name, placeholder="EleutherAI/pythia-70m",
                                                         width=320, name="or a Hub name (the server must be online)",
                                                         visible=hf.rx.pipe(lambda on: on and self.hub_allowed()))
        self.no_hf_models = pn.pane.Markdown(NO_HF_MODELS, sizing_mode="stretch_width", visible=pn.bind(
            lambda s, options: s == HF and not options, self.param.source, self.hf_model.param.options))
        self.mixture_select = pn.widgets.Select.from_param(self.param.mixture, options=[], width=320,
                                                           name="mixture (built on the Compose page)")
        offered = pn.bind(lambda s, options: s == MIXTURE and bool(options), self.param.source,
                          self.mixture_select.param.options)
        self.mixture_select.visible = offered
        self.member_select = pn.widgets.Select.from_param(self.param.member, options={}, width=200, name="member",
                                                          visible=offered)
        self.no_mixture = pn.pane.Markdown(NO_MIXTURE, sizing_mode="stretch_width", visible=pn.bind(
            lambda s, options: s == MIXTURE and not options, self.param.source, self.mixture_select.param.options))
        self.stage_slider = pn.widgets.DiscreteSlider.from_param(self.param.stage, options={"-": None}, width=300,
                                                                 name="growth stage", visible=False)
        self._hf_listed = False
        self._known_runs: set[str] | None = None   # run ids seen at the last refresh
        self._known_mixtures: list[str] = []
        self._opened: dict = {}      # model key -> interop.OpenModel (opened in the job)
        self._holder = f"residual-page-{uuid.uuid4().hex}"   # who holds a model in the shared cache
        if pn.state.curdoc is not None:
            pn.state.on_session_destroyed(self.release)
        self.refresh()

    # ---------------------------------------------------------------- what is offered
    def refresh(self) -> None:
        """Offer the stored runs again (a run saved since the last look becomes the choice) and the mixtures."""
        options = run_options(self.datastore.runs)
        current = self.run_id
        known, self._known_runs = self._known_runs, set(options.values())
        arriving = set(examples.example_ids(self.datastore.runs).values())   # the starter set: never steals the choice
        new = [rid for rid in options.values() if known is not None and rid not in known and rid not in arriving]
        self.run_select.options = options
        if new:
            self.run_id = new[0]   # a run just saved (e.g. a growth run's last stage): show it
        elif current in options.values():
            self.run_id = current
        elif options:
            self.run_id = next(iter(options.values()))   # newest run
        self._refresh_mixtures()
        self._fill_stages()

    def _refresh_mixtures(self) -> None:
        """Offer the session's mixtures (DataStore.session_models); one just registered becomes the choice."""
        names = list(self.datastore.session_models)
        current = self.mixture
        new = [n for n in names if n not in self._known_mixtures]
        self._known_mixtures = names
        self.mixture_select.options = names
        if names:
            self.mixture = new[-1] if new else (current if current in names else names[-1])
        self._fill_members()

    @param.depends("mixture", watch=True)
    def _fill_members(self) -> None:
        model = self.datastore.session_models.get(self.mixture)
        n = len(model.members) if model is not None else 0
        names = list(self.mixture_info().get("members") or [])[:n]
        names += [f"member {k}" for k in range(len(names), n)]
        options = {f"m{k}: {name}": k for k, name in enumerate(names)}
        self.member_select.options = options
        if self.member not in options.values():
            self.member = 0 if options else None

    def mixture_info(self) -> dict:
        return self.datastore.session_info.get(self.mixture, {})

    def domains(self) -> list[str]:
        """The datasets a chosen mixture's samples come from (empty for other sources)."""
        return list(self.mixture_info().get("datasets") or {}) if self.source == MIXTURE else []

    def member_label(self, k: int) -> str:
        return next((label.split(": ", 1)[-1] for label, v in self.member_select.options.items() if v == k),
                    f"member {k}")

    def refresh_models(self) -> None:
        """List the model folders under the configured roots again (``workbench.roots.list_models``: with
        sign-in, the user's own Hub downloads and the shared ones, not other students')."""
        current = self.hf_choice
        options = {label: str(path) for label, path in
                   roots.list_models(user=self.datastore.user, home=self.home).items()}
        self.hf_model.options = options
        self.hf_choice = current if current in options.values() else next(iter(options.values()), None)
        self._hf_listed = True

    @param.depends("source", watch=True)
    def _first_look(self) -> None:
        if self.source == HF and not self._hf_listed:
            self.refresh_models()   # the first look at the model folders (then on Refresh)
        self._fill_stages()

    # ---------------------------------------------------------------- growth stages
    def group(self) -> pd.DataFrame:
        """The chosen run's growth group (rows of ``datastore.runs`` with a stage, by stage), or no rows."""
        runs = self.datastore.runs
        if runs is None:
            return pd.DataFrame()
        if self.source != RUN or not len(runs) or self.run_id is None:
            return runs.iloc[:0]
        row = runs[runs["run_id"] == self.run_id]
        if not len(row) or pd.isna(row["group_name"].iloc[0]) or row["group_name"].iloc[0] in ("", None):
            return runs.iloc[:0]
        group = runs[(runs["group_name"] == row["group_name"].iloc[0]) & runs["stage"].notna()]
        return group.sort_values("stage")

    @param.depends("run_id", watch=True)
    def _fill_stages(self) -> None:
        """The stage slider shows the chosen run's group; options and value change together, so the slider
        never passes through another stage."""
        group = self.group()
        if len(group) > 1:
            opts = {f"stage {int(r.stage)} ({int(r.n_layers)} layers)": r.run_id for r in group.itertuples()}
            value = self.run_id if self.run_id in opts.values() else next(iter(opts.values()))
            self.stage_slider.param.update(options=opts, value=value)
            self.stage_slider.visible = True
        else:
            self.stage_slider.visible = False

    @param.depends("stage", watch=True)
    def _stage_moved(self) -> None:
        if self.stage and self.stage != self.run_id and self.stage in self.run_select.options.values():
            self.run_id = self.stage
            self.param.trigger("stage_chosen")

    # ---------------------------------------------------------------- the request (on the event loop; nothing opened)
    @property
    def home(self):
        return self.datastore.raw_store.root

    def hub_allowed(self) -> bool:
        return interop.hub_allowed(self.datastore.classroom)

    def request(self) -> dict:
        """The chosen source, checked without opening anything: a folder is resolved inside the roots (or
        refused with the one message), a Hub name checked, a mixture looked up; ``model_key`` names the model."""
        src = checks.check_choice("source", self.source, SOURCES)
        req: dict = {"source": src}
        if src == RUN:
            if not self.run_id:
                raise ValueError("no stored run chosen: train or grow one first (or pick a Hugging Face model)")
            req.update(run_id=self.run_id, model_key=("run", self.run_id))
        elif src == MIXTURE:
            name = self.mixture
            if not name or name not in self.datastore.session_models:
                raise ValueError(plain(NO_MIXTURE))
            model = self.datastore.session_models[name]   # a re-composed mixture of the same name is another model
            req.update(mixture=name, model_key=("session", name, id(model)))
        else:
            hub = (self.hub_name or "").strip()
            if hub:
                interop.check_hub_name(hub)
                if not self.hub_allowed():
                    raise ValueError(interop.HUB_REFUSED)
                req.update(hub=hub, model_key=("hub", hub))
            else:
                if not self.hf_choice:
                    raise ValueError(plain(NO_HF_MODELS))
                path = roots.resolve_model(self.hf_choice, user=self.datastore.user, home=self.home)
                req.update(folder=str(path), model_key=("hf", str(path)))
        return req

    # ---------------------------------------------------------------- opening (in the page's job)
    def open(self, ctx, req: dict) -> interop.OpenModel:
        """The requested model, opened in the job (cached here; Hugging Face models in the server's shared
        cache, :data:`workbench.interop.MODELS`, this page holding one at a time)."""
        key = req["model_key"]
        if req["source"] == MIXTURE:
            model = self.datastore.session_models.get(req["mixture"])
            if model is None or id(model) != key[2]:
                raise ValueError(plain(NO_MIXTURE))
            info = self.datastore.session_info.get(req["mixture"], {})
            datasets = info.get("datasets") or {}
            spec = datasets.get(req.get("domain")) or next(iter(datasets.values()), None)
            vocab = info.get("vocab") or getattr(model.config, "vocab", None)
            return interop.OpenModel(model, vocab, spec, None, key, req["mixture"], 0)
        opened = self._opened.get(key)
        if opened is not None:
            return opened
        if req["source"] == RUN:
            ctx.report(message=f"loading run {req['run_id']}", progress=0.02)
            run = open_run(self.datastore.store, req["run_id"], "run")   # vanished, forged or foreign: refused
            opened = interop.OpenModel(run.model, getattr(run.model.config, "vocab", None), run.dataset, None, key,
                                       run.name, 0)
        else:
            opened = interop.open_model(folder=req.get("folder"), hub=req.get("hub"), user=self.datastore.user,
                                        home=self.home, holder=self._holder, monitor=ctx)
            for k in [k for k in self._opened if k[0] in ("hf", "hub") and k != key]:   # one held at a time
                interop.MODELS.release(self._holder, self._opened.pop(k).key)
        self._opened[key] = opened
        return opened

    def stages(self, req: dict) -> list:
        """``[(stage, function opening that stage's model)]`` of the requested run's growth group (opened in the job)."""
        group = self.group()
        if req["source"] != RUN or len(group) <= 1 or req.get("run_id") not in set(group["run_id"]):
            return []
        store = self.datastore.store
        return [(int(r.stage), lambda rid=r.run_id, s=int(r.stage): open_run(
            store, rid, f"growth stage {s}").model) for r in group.itertuples()]

    def release(self, *_) -> None:
        """The session ended: the shared cache may drop the Hugging Face model this page held."""
        self._opened = {k: v for k, v in self._opened.items() if k[0] not in ("hf", "hub")}
        interop.MODELS.release(self._holder)

    # ---------------------------------------------------------------- as code
    def code_lines(self) -> tuple[list[str], bool | None, bool]:
        """``(lines defining model, vocab, spec (and tokenizer), sequence or None if unknown, has tokenizer)``;
        no lines when nothing is chosen."""
        if self.source == RUN:
            if not self.run_id:
                return [], None, False
            runs = self.datastore.runs
            family = runs.loc[runs["run_id"] == self.run_id, "family"] if runs is not None and len(runs) else []
            sequence = bool(len(family)) and family.iloc[0] == "transformer"
            return ["store = wb.RunStore()  # the dashboard's run store (WORKBENCH_HOME)",
                    f"run = store.load({self.run_id!r})",
                    "model, vocab, spec = run.model, getattr(run.model.config, 'vocab', None), run.dataset"], \
                sequence, False
        if self.source != HF:
            return [], None, False
        hub = (self.hub_name or "").strip()
        if not (self.hf_choice or hub):
            return [], None, False
        try:
            folder = None if hub else roots.resolve_model(self.hf_choice, user=self.datastore.user, home=self.home)
        except ValueError:
            return [], None, False
        if hub:
            return [f"model, tokenizer = wb.interop.load_hf({hub!r})", "vocab, spec = None, None"], True, True
        if (folder / interop.EXPORT_META).is_file():
            return [f"model, meta = wb.interop.load_gpt2(wb.roots.resolve_model({self.hf_choice!r}))",
                    "vocab, spec = meta.get('vocab'), meta.get('dataset')"], True, False
        return [f"model, tokenizer = wb.interop.load_hf(wb.roots.resolve_model({self.hf_choice!r}))",
                "vocab, spec = None, None"], True, True

    def widgets(self) -> list:
        return [self.source_buttons, self.run_select, self.hf_model, self.hf_refresh, self.hub_input,
                self.no_hf_models, self.mixture_select, self.member_select, self.no_mixture]

    def __panel__(self):
        return pn.Column(*self.widgets(), self.stage_slider)
