"""Compose page: specialists over one frozen substrate, merged by logits and in weight space."""
from __future__ import annotations

import panel as pn

from .. import compose
from ..core import data, recipes
from ..experiments import compose as experiment
from ..figures.compose import cosine_matrix, domain_heatmap, knob_curve, sequential_curve
from ..compose.sampling import sample_text
from .session import dataset_from_spec, open_run
from .task import BackgroundTask, job_monitor
from .text import escape_md, html_labels, text_block
from .widgets import run_options
from .page import Page
from . import examples as starter

EXPLANATION = """Specialists are Transformers trained on different corpora over **one frozen substrate** (the
same frozen embedding table and vocabulary). The *logit mixture* averages their logits (the Growing
Transformers merge; the gated one learns per-token weights on a small calibration set). Weight-space
merges (linear, task arithmetic, TIES, LiNeS, DARE, SLERP, Model Stock, OPCM) need specialists fine-tuned
from **one base**. The heat-map is each model's validation loss (or accuracy) on each domain: a good merge
is green everywhere, i.e. it beats its parts without forgetting either domain. With a base, the cosine
matrix shows how aligned the task vectors are; with SLERP chosen (two specialists) the page sweeps `t`
from one specialist to the other, and with OPCM chosen it merges the specialists one at a time (in the
order picked) and draws the mean score on the tasks seen so far for OPCM, averaging and task arithmetic."""

MERGE_NAMES = experiment.MERGE_NAMES   # the mixtures, then the engine's weight-space merges (compose.MERGES)


def _train_job(ctx, corpora: list[str], steps: int, n_layers: int, embedding: str, seed: int):
    """Base on the pooled corpora, then one specialist per corpus fine-tuned from it (``experiments.compose.train``)."""
    return experiment.train(corpora, steps=steps, n_layers=n_layers, embedding=embedding, seed=seed,
                            monitor=job_monitor(ctx))


def _sample_job(ctx, model, vocab, prompt: str, n_chars: int, temperature: float, seed: int):
    ctx.report(progress=0.0, message=f"sampling {n_chars} characters")
    return {"sample": sample_text(model, vocab, prompt=prompt, n_chars=n_chars, temperature=temperature, seed=seed)}


def _domain_name(run) -> str:
    spec = run.dataset
    builtin = spec.get("name") == "text" and not spec.get("path") and not spec.get("text")
    return run.meta.get("domain") or (spec.get("corpus") if builtin else None) or run.name


def _compose_job(ctx, store, specialist_ids: list[str], base_id: str | None, chosen: list[str], options: dict):
    if len(specialist_ids) < 1:
        raise ValueError("pick at least one specialist run (or train two)")
    runs = [open_run(store, i, "specialists") for i in specialist_ids]   # vanished, forged, foreign: refused
    if any(r.model.config.family != "transformer" for r in runs):
        raise ValueError("specialists must be Transformer runs")
    names = []
    for r in runs:
        name = _domain_name(r)
        names.append(name if name not in names else f"{name} ({r.run_id[-6:]})")
    members = dict(zip(names, (r.model for r in runs)))
    domains = {}
    for name, r in zip(names, runs):
        domains[name] = dataset_from_spec(r.dataset)  # never a server path
    parents = {r.meta.get("parent") for r in runs}
    base_id = base_id or (parents.pop() if len(parents) == 1 else None)
    base = (open_run(store, base_id, "base for weight-space merges").model
            if base_id and any(m in experiment.WEIGHT_SPACE for m in chosen) else None)
    out = experiment.compose(members, domains, chosen, options, base=base, monitor=job_monitor(ctx))
    done = [m for m in chosen if m in out["merges"]]
    code = experiment.as_code(specialist_ids=specialist_ids, names=names, base_id=base_id if base is not None else None,
                              chosen=done, options=options)
    return {"table": out["table"], "models": {**members, **out["merges"]}, "vocab": list(domains[names[0]].vocab),
            "skipped": out["skipped"], "unfit": out["unfit"], "base_id": base_id, "code": code, "members": names,
            "cosines": out["cosines"], "sweep": out["sweep"], "sequence": out["sequence"],
            "datasets": {name: dict(r.dataset) for name, r in zip(names, runs)}}


class ComposePage(Page):
    """Pick (or train) specialists, choose merges, see the model x domain table, sample text."""

    title = "Compose"
    order = 60
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        # specialists and base
        self.specialists = pn.widgets.MultiChoice(name="specialists (Transformer runs)", options={}, width=320)
        self.base = pn.widgets.Select(name="base for weight-space merges", options={}, width=320)
        # train two
        corpora = list(data.CORPORA)
        self.corpus_a = pn.widgets.Select(name="corpus A", options=corpora, value="grammar", width=120)
        self.corpus_b = pn.widgets.Select(name="corpus B", options=corpora, value="arithmetic", width=120)
        self.train_steps = pn.widgets.IntInput(name="steps per stage", value=recipes.COMPOSE.steps, start=1,
                                               end=100_000, width=120)
        self.n_layers = pn.widgets.IntInput(name="n_layers", value=recipes.COMPOSE.n_layers, start=1, end=12, width=90)
        self.embedding = pn.widgets.Select(name="substrate", options=list(experiment.EMBEDDINGS),
                                           value=experiment.EMBEDDINGS[0], width=130)
        self.train_button = pn.widgets.Button(name="Train base + two specialists", button_type="default")
        self.train_button.on_click(lambda _: self.train_two())
        # merges
        self.merges = pn.widgets.CheckBoxGroup(name="merges", options=MERGE_NAMES,
                                               value=["logit mean", "gated mixture", "ties"], inline=False)
        self.density = pn.widgets.FloatInput(name="TIES / DARE density", value=0.2, start=0.01, end=1.0, step=0.05,
                                             width=130)
        self.t = pn.widgets.FloatInput(name="SLERP t", value=0.5, start=0.0, end=1.0, step=0.05, width=100)
        self.alpha = pn.widgets.FloatInput(name="OPCM alpha", value=0.5, start=0.0, end=0.99, step=0.05, width=100)
        self.scale = pn.widgets.FloatInput(name="task-vector scale", value=1.0, start=0.0, end=3.0, step=0.1,
                                           width=120)
        self.beta = pn.widgets.FloatInput(name="LiNeS beta", value=0.5, start=0.0, end=2.0, step=0.1, width=110)
        self.compose_button = pn.widgets.Button(name="Compose and evaluate", button_type="primary")
        self.compose_button.on_click(lambda _: self.run_compose())
        self.metric = pn.widgets.RadioButtonGroup(name="metric", options=["loss", "acc"], value="loss")
        self.metric.param.watch(self._draw, "value")
        # outputs
        self.message = pn.pane.Markdown("")
        self.heatmap = pn.pane.Plotly(domain_heatmap(None), sizing_mode="stretch_width", height=380)
        self.summary = pn.pane.DataFrame(None, index=False, sizing_mode="stretch_width")
        self.cosines = pn.pane.Plotly(cosine_matrix(None), sizing_mode="stretch_width", height=340)
        self.knob_plot = pn.pane.Plotly(knob_curve(None), sizing_mode="stretch_width", height=320)
        self.sequence_plot = pn.pane.Plotly(sequential_curve(None), sizing_mode="stretch_width", height=320)
        # sampling
        self.sample_model = pn.widgets.Select(name="sample from", options=[], width=220)
        self.prompt = pn.widgets.TextInput(name="prompt", value="", placeholder="(start of a line)", width=220)
        self.n_chars = pn.widgets.IntInput(name="characters", value=200, start=1, end=5000, width=100)
        self.temperature = pn.widgets.FloatInput(name="temperature", value=0.8, start=0.0, end=5.0, step=0.1,
                                                 width=100)
        self.seed = pn.widgets.IntInput(name="seed", value=0, start=0, width=90)
        self.sample_button = pn.widgets.Button(name="Sample", button_type="default", disabled=True)
        self.sample_button.on_click(lambda _: self.sample())
        self.sample_out = pn.pane.HTML("", sizing_mode="stretch_width")  # text_block: the sample escaped
        # state
        self.result: dict | None = None
        self.example: dict | None = None   # the example's stored table (shown until the first composition)
        self.compose_task = self.task  # the page's task composes; training the specialists has its own
        self.train_task = BackgroundTask(on_done=self._on_trained, user=lambda: self.datastore.queue_user,
                                         job_name="Compose: train specialists")
        self.train_task.param.watch(self._train_status, "status")
        self._refresh_options()

    def _train_status(self, event) -> None:
        self.train_button.disabled = event.new == "running"

    def on_done(self, result) -> None:
        if isinstance(result, dict) and "sample" in result:
            self.sample_out.object = text_block(result["sample"])
        else:
            self._on_composed(result)

    def on_store_change(self) -> None:
        self._refresh_options()

    def side(self):
        return [self.specialists, self.base, pn.pane.Markdown("**Merges**", margin=(0, 10)), self.merges,
                self.compose_button]

    def figures(self):
        return [self.message, self.metric, self.heatmap, self.summary, self.cosines,
                pn.Row(self.knob_plot, self.sequence_plot, sizing_mode="stretch_width")]

    def below(self):
        return [pn.pane.Markdown("**Sample text**", margin=(0, 10)),
                pn.Row(self.sample_model, self.prompt, self.n_chars, self.temperature, self.seed, self.sample_button),
                self.sample_out]

    def advanced(self):
        return [pn.Row(self.density, self.scale, self.beta, self.t, self.alpha),
                pn.pane.Markdown("**No specialists stored? Train a base and two**", margin=(0, 10)),
                pn.Row(self.corpus_a, self.corpus_b, self.train_steps, self.n_layers, self.embedding),
                pn.Row(self.train_button, self.train_task.controls())]

    def run_buttons(self):
        return [self.compose_button, self.sample_button]

    def _options(self) -> dict:
        return {"density": self.density.value, "scale": self.scale.value, "beta": self.beta.value,
                "t": self.t.value, "alpha": self.alpha.value}

    def as_code(self) -> str:
        if self.result is not None:
            return self.result["code"]
        return experiment.as_code(corpora=[self.corpus_a.value, self.corpus_b.value], steps=self.train_steps.value,
                                  n_layers=self.n_layers.value, embedding=self.embedding.value,
                                  seed=self.seed.value or 0, chosen=list(self.merges.value), options=self._options())

    # ---------------------------------------------------------------- options
    def _refresh_options(self) -> None:
        opts = run_options(self.datastore.runs, family="transformer")
        keep = [v for v in self.specialists.value if v in opts.values()]
        self.specialists.options = html_labels(opts)  # MultiChoice renders its labels as HTML: run names escaped
        self.specialists.value = keep
        base_value = self.base.value
        self.base.options = {"(the specialists' parent run)": "", **opts}
        self.base.value = base_value if base_value in self.base.options.values() else ""

    # ---------------------------------------------------------------- actions
    def train_two(self, wait: bool = False) -> None:
        """Train a base on both corpora, then one specialist per corpus from it; save all three.

        Refused, with a notice next to the progress bar, while they train.
        """
        if self.train_task.busy():
            return
        self.errors.clear()
        corpora = [self.corpus_a.value, self.corpus_b.value]
        if corpora[0] == corpora[1]:
            self.errors.show("corpus A and corpus B must differ")
            return
        if not isinstance(self.train_steps.value, int) or self.train_steps.value < 1:
            self.errors.show(f"steps per stage must be an integer >= 1, got {self.train_steps.value!r}")
            return
        try:   # a base and two specialists: three stages against a student's job budget
            self.check_steps(3 * self.train_steps.value, "steps per stage (x 3 stages)")
        except ValueError as e:
            self.errors.show(e)
            return
        args = (corpora, self.train_steps.value, self.n_layers.value, self.embedding.value, self.seed.value or 0)
        (self.train_task.run_now if wait else self.train_task.start)(_train_job, *args)

    def _on_trained(self, result) -> None:
        base_run = result["base"]
        parts = base_run.dataset.get("parts", [])
        base_run.meta = {"role": "base", "group": "compose", "trained_on": parts}
        if parts:  # store a loadable spec (the first domain) for pages that draw samples from a run's data
            base_run.dataset = dict(parts[0])
        base_id = self.datastore.save(base_run)
        ids = []
        for run in result["specialists"].values():
            run.meta = {**run.meta, "parent": base_id, "group": "compose"}
            ids.append(self.datastore.save(run))
        self.specialists.value = ids
        self.base.value = base_id
        self.message.object = (f"Saved base {escape_md(base_id)} and {len(ids)} specialists; "
                               "press *Compose and evaluate*.")

    def run_compose(self, wait: bool = False) -> None:
        """Build the chosen merges and evaluate every model on every domain; refused while it runs."""
        if self.compose_task.busy():
            return
        self.errors.clear()
        ids = list(self.specialists.value)
        if not ids:
            self.errors.show("pick at least one specialist run (or train two)")
            return
        options = self._options()
        for key, lo, hi in (("density", 0.0, 1.0), ("scale", 0.0, 10.0), ("beta", 0.0, 10.0), ("t", 0.0, 1.0),
                            ("alpha", 0.0, 0.99)):
            v = options[key]
            if v is None or not (lo < v <= hi if key == "density" else lo <= v <= hi):
                self.errors.show(f"{key} must be a number in {'(' if key == 'density' else '['}{lo}, {hi}], got {v!r}")
                return
        args = (self.datastore.store, ids, self.base.value or None, list(self.merges.value), options)
        self.start_task(_compose_job, *args, wait=wait)

    def _on_composed(self, result) -> None:
        self.result = result
        self.show_code(result["code"])
        self._draw()
        self.sample_model.options = list(result["models"])
        self.sample_button.disabled = False
        notes = []
        if result["skipped"]:
            notes.append(f"Skipped {escape_md(', '.join(result['skipped']))}: weight-space merges need a base run "
                         "(the specialists have no common parent; pick one).")
        if result.get("unfit"):
            notes.append(f"Skipped {escape_md(', '.join(result['unfit']))}: SLERP interpolates between exactly two "
                         "specialists and Model Stock needs at least two.")
        registered = self._register_mixtures(result)
        if registered:
            notes.append(f"The Residual stream page can now open {', '.join(f'*{escape_md(n)}*' for n in registered)} "
                         "(source *Compose mixture (this session)*).")
        self.message.object = " ".join(notes)

    def _register_mixtures(self, result) -> list[str]:
        """Offer every logit-averaging mixture to the other pages of this session (DataStore.session_models).

        Probability mixtures are not offered: direct attribution and the logit lens need mode='logits'.
        """
        names = []
        for merge, model in result["models"].items():
            if isinstance(model, compose.LogitMixture) and model.mode == "logits" and merge not in result["members"]:
                name = f"mixture: {merge} ({' + '.join(result['members'])})"
                self.datastore.add_session_model(name, model, vocab=result["vocab"], members=result["members"],
                                                 datasets=result["datasets"])
                names.append(name)
        return names

    def show_example(self) -> bool:
        """The example specialists and base chosen, with the table of the default merges stored with the base."""
        base_id, stored = starter.stored(self.datastore, "compose-base", "compose")
        ids = starter.example_ids(self.datastore)
        members = [ids.get(f"compose-{name}") for name in (stored or {}).get("members", [])]
        if stored is None or not members or None in members or self.result is not None or not self.fresh() \
                or not self.train_task.status == "idle":
            return False
        self.specialists.value = members
        self.base.value = base_id
        self.merges.value = [m for m in stored["chosen"] if m in MERGE_NAMES]
        self.example = stored
        self._draw()
        self.show_note(starter.note("compose-base", "With its grammar and arithmetic specialists: the table is the "
                                                    "stored result of *Compose and evaluate* for these merges; press "
                                                    "it to compose them yourself (and to sample text)."))
        return True

    def _draw(self, _=None) -> None:
        result = self.result if self.result is not None else self.example
        if result is None:
            return
        table = result["table"]
        self.heatmap.object = domain_heatmap(table, self.metric.value)
        self.summary.object = compose.summary(table).round(4)
        self.cosines.object = cosine_matrix(result.get("cosines"))
        self.knob_plot.object = knob_curve(result.get("sweep"), self.metric.value)
        self.sequence_plot.object = sequential_curve(result.get("sequence"), self.metric.value)

    def sample(self, wait: bool = False) -> None:
        """Sample text from the chosen model in the page's job (thousands of forward passes: never at the click)."""
        def read():
            if self.result is None or self.sample_model.value not in self.result["models"]:
                raise ValueError("compose first, then pick a model to sample from")
            return (self.result["models"][self.sample_model.value], self.result["vocab"], self.prompt.value,
                    self.n_chars.value, self.temperature.value, self.seed.value or 0)

        args = self.read_form(read)
        if args is not None:
            self.start_task(_sample_job, *args, wait=wait)
