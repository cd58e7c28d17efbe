"""Compose page: specialists over one frozen substrate, merged by logits and in weight space."""
from __future__ import annotations

import dataclasses

import panel as pn

from .. import compose, data, models
from ..figures.compose import domain_heatmap
from ..sampling import sample_text
from ..training import TrainConfig
from .common import (BackgroundTask, ErrorBox, code_block, dataset_from_spec, escape_md, html_labels, page_header,
                     run_options, text_block)

EXPLANATION = """Specialists are Transformers trained on different corpora over **one frozen substrate** (the
same frozen embedding table and vocabulary). The *logit mixture* averages their logits (the Growing
Transformers merge; the gated one learns per-token weights on a small calibration set). Weight-space
merges (linear, task arithmetic, TIES, LiNeS) need specialists fine-tuned from **one base**. The heat-map
is each model's validation loss (or accuracy) on each domain: a good merge is green everywhere, i.e.
it beats its parts without forgetting either domain."""

CODE = """import workbench as wb
from workbench import sampling
from workbench.figures.compose import domain_heatmap
domains = wb.compose.shared_text(["grammar", "arithmetic"], context=32, corpus_chars=20_000)
cfg = wb.models.config_for(domains["grammar"], d_model=64, n_layers=2, embedding="frozen-random")
base = wb.models.build(cfg)
wb.train(base, wb.compose.concat(domains), wb.TrainConfig(steps=150, batch_size=32, lr=3e-3))
runs = wb.compose.train_specialists(base, domains, wb.TrainConfig(steps=150, batch_size=32, lr=1e-3))
members = {name: run.model for name, run in runs.items()}
merges = {"logit mean": wb.compose.LogitMixture(list(members.values())),
          "TIES": wb.compose.ties(base, list(members.values()), density=0.2)}
table = wb.compose.evaluate(members, merges, domains)
domain_heatmap(table, "loss")
sampling.sample_text(merges["logit mean"], cfg.vocab, prompt="The ", n_chars=200, seed=0)"""

# the engine call behind each merge choice, as code (``ms``: the specialists, ``base``: their parent)
MERGE_CODE = {
    "logit mean": "wb.compose.LogitMixture(ms)",
    "probability mixture": "wb.compose.LogitMixture(ms, mode='probs')",
    "gated mixture": "wb.compose.LogitMixture(ms).fit_gate(domains, steps=150)",
    "linear": "wb.compose.linear(ms, base=base)",
    "task arithmetic": "wb.compose.task_arithmetic(base, ms, scale={scale!r})",
    "TIES": "wb.compose.ties(base, ms, density={density!r}, scale={scale!r})",
    "LiNeS": "wb.compose.lines(base, ms, beta={beta!r})",
}


def _code_for(specialist_ids: list[str], names: list[str], base_id: str | None, chosen: list[str],
              options: dict) -> str:
    """The notebook calls that rebuild the page's table and heat-map from the stored runs."""
    lines = ["import workbench as wb", "from workbench.figures.compose import domain_heatmap",
             "store = wb.RunStore()", f"runs = [store.load(i) for i in {specialist_ids!r}]",
             f"names = {names!r}",
             "members = {n: r.model for n, r in zip(names, runs)}",
             "domains = {n: wb.data.from_spec(r.dataset) for n, r in zip(names, runs)}",
             "ms = list(members.values())"]
    weight_space = [m for m in chosen if m in _WEIGHT_SPACE]
    if weight_space:
        lines.append(f"base = store.load({base_id!r}).model")
    lines.append("merges = {")
    lines += [f"    {m!r}: {MERGE_CODE[m].format(**options)}," for m in chosen]
    lines.append("}")
    refs = ", references={'base': base}" if weight_space else ""
    lines += [f"table = wb.compose.evaluate(members, merges, domains, max_examples=512{refs})",
              "wb.compose.summary(table)", "domain_heatmap(table, 'loss')"]
    return "\n".join(lines)


MERGE_NAMES = ["logit mean", "probability mixture", "gated mixture", "linear", "task arithmetic", "TIES", "LiNeS"]
_WEIGHT_SPACE = {"linear", "task arithmetic", "TIES", "LiNeS"}


def _train_job(ctx, corpora: list[str], steps: int, n_layers: int, embedding: str, seed: int):
    """Base on the pooled corpora, then one specialist per corpus fine-tuned from it."""
    from ..training import Callback, train

    class Report(Callback):
        def __init__(self, stage, offset):
            self.stage, self.offset = stage, offset

        def on_step(self, state):
            if ctx.stopped:
                state.stop = True
            elif state.step % 10 == 0:
                done = self.offset + state.step / steps
                ctx.report(None, progress=done / (1 + len(corpora)),
                           message=f"{self.stage}: step {state.step}/{steps}, loss {state.loss:.3f}")

    domains = compose.shared_text(corpora, context=32, corpus_chars=20_000, seed=seed)
    cfg = models.config_for(domains[corpora[0]], d_model=64, n_layers=n_layers, n_heads=4, d_mlp=256,
                            embedding=embedding, seed=seed)
    base = models.build(cfg)
    tc = TrainConfig(steps=steps, batch_size=32, lr=3e-3, eval_every=max(steps // 2, 1), eval_max=256, seed=seed)
    base_run = train(base, compose.concat(domains), tc, callbacks=[Report("base", 0)], name="compose-base")
    if ctx.stopped:
        return {"base": base_run, "specialists": {}}
    specialists = {}
    for i, (name, ds) in enumerate(domains.items()):
        ft = dataclasses.replace(tc, lr=1e-3)
        specialists.update(compose.train_specialists(base, {name: ds}, ft, callbacks=[Report(name, i + 1)]))
        if ctx.stopped:
            break
    ctx.report(None, progress=1.0, message=f"done: base and {len(specialists)} specialists")
    return {"base": base_run, "specialists": specialists}


def _domain_name(run) -> str:
    spec = run.dataset
    builtin = spec.get("name") == "text" and not spec.get("path") and not spec.get("text")
    return run.meta.get("domain") or (spec.get("corpus") if builtin else None) or run.name


def _compose_job(ctx, store, specialist_ids: list[str], base_id: str | None, chosen: list[str], options: dict):
    if len(specialist_ids) < 1:
        raise ValueError("pick at least one specialist run (or train two)")
    runs = [store.load(i) for i in specialist_ids]
    if any(r.model.config.family != "transformer" for r in runs):
        raise ValueError("specialists must be Transformer runs")
    names = []
    for r in runs:
        name = _domain_name(r)
        names.append(name if name not in names else f"{name} ({r.run_id[-6:]})")
    members = dict(zip(names, (r.model for r in runs)))
    compose.check_substrate(list(members.values()))
    domains = {}
    for name, r in zip(names, runs):
        domains[name] = dataset_from_spec(r.dataset)  # never a server path
    ctx.report(None, progress=0.2, message="building merges")
    parents = {r.meta.get("parent") for r in runs}
    base_id = base_id or (parents.pop() if len(parents) == 1 else None)
    base = store.load(base_id).model if base_id and any(m in _WEIGHT_SPACE for m in chosen) else None
    ms, skipped = list(members.values()), []
    merges = {}
    for m in chosen:
        if m in _WEIGHT_SPACE and base is None:
            skipped.append(m)
            continue
        if m == "logit mean":
            merges[m] = compose.LogitMixture(ms)
        elif m == "probability mixture":
            merges[m] = compose.LogitMixture(ms, mode="probs")
        elif m == "gated mixture":
            merges[m] = compose.LogitMixture(ms).fit_gate(domains, steps=150)
        elif m == "linear":
            merges[m] = compose.linear(ms, base=base)
        elif m == "task arithmetic":
            merges[m] = compose.task_arithmetic(base, ms, scale=options["scale"])
        elif m == "TIES":
            merges[m] = compose.ties(base, ms, density=options["density"], scale=options["scale"])
        elif m == "LiNeS":
            merges[m] = compose.lines(base, ms, beta=options["beta"])
    ctx.report(None, progress=0.5, message="evaluating")
    refs = {"base": base} if base is not None else None
    table = compose.evaluate(members, merges, domains, max_examples=512, references=refs)
    ctx.report(None, progress=1.0, message=f"done: {len(members) + len(merges)} models x {len(domains)} domains")
    done = [m for m in chosen if m in merges]
    code = _code_for(specialist_ids, names, base_id if base is not None else None, done, options)
    return {"table": table, "models": {**members, **merges}, "vocab": list(domains[names[0]].vocab),
            "skipped": skipped, "base_id": base_id, "code": code, "members": names,
            "datasets": {name: dict(r.dataset) for name, r in zip(names, runs)}}


class ComposePage(pn.viewable.Viewer):
    """Pick (or train) specialists, choose merges, see the model x domain table, sample text."""

    def __init__(self, datastore, **params):
        super().__init__(**params)
        self.datastore = datastore
        # specialists and base
        self.specialists = pn.widgets.MultiChoice(name="specialists (Transformer runs)", options={}, width=520)
        self.base = pn.widgets.Select(name="base for weight-space merges", options={}, width=520)
        # train two
        corpora = list(data.CORPORA)
        self.corpus_a = pn.widgets.Select(name="corpus A", options=corpora, value="grammar", width=120)
        self.corpus_b = pn.widgets.Select(name="corpus B", options=corpora, value="arithmetic", width=120)
        self.train_steps = pn.widgets.IntInput(name="steps per stage", value=150, start=1, end=100_000, width=120)
        self.n_layers = pn.widgets.IntInput(name="n_layers", value=2, start=1, end=12, width=90)
        self.embedding = pn.widgets.Select(name="substrate", options=["frozen-random", "glyph"],
                                           value="frozen-random", width=130)
        self.train_button = pn.widgets.Button(name="Train base + two specialists", button_type="default")
        self.train_button.on_click(lambda _: self.train_two())
        # merges
        self.merges = pn.widgets.CheckBoxGroup(name="merges", options=MERGE_NAMES,
                                               value=["logit mean", "gated mixture", "TIES"], inline=True)
        self.density = pn.widgets.FloatInput(name="TIES density", value=0.2, start=0.01, end=1.0, step=0.05, width=110)
        self.scale = pn.widgets.FloatInput(name="task-vector scale", value=1.0, start=0.0, end=3.0, step=0.1,
                                           width=120)
        self.beta = pn.widgets.FloatInput(name="LiNeS beta", value=0.5, start=0.0, end=2.0, step=0.1, width=110)
        self.compose_button = pn.widgets.Button(name="Compose and evaluate", button_type="primary")
        self.compose_button.on_click(lambda _: self.run_compose())
        self.metric = pn.widgets.RadioButtonGroup(name="metric", options=["loss", "acc"], value="loss")
        self.metric.param.watch(lambda _: self._draw(), "value")
        # outputs
        self.errors = ErrorBox()
        self.message = pn.pane.Markdown("")
        self.heatmap = pn.pane.Plotly(domain_heatmap(None), sizing_mode="stretch_width", height=380)
        self.summary = pn.pane.DataFrame(None, index=False, sizing_mode="stretch_width")
        self.code = pn.pane.Markdown("", sizing_mode="stretch_width")
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
        self.train_task = BackgroundTask(on_done=self._on_trained)
        self.compose_task = BackgroundTask(on_done=self._on_composed)
        for task, button in ((self.train_task, self.train_button), (self.compose_task, self.compose_button)):
            task.param.watch(lambda e, b=button: setattr(b, "disabled", e.new == "running"), "status")
        self.datastore.param.watch(lambda _: self._refresh_options(), "version")
        self._refresh_options()

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
        options = {"density": self.density.value, "scale": self.scale.value, "beta": self.beta.value}
        for key, lo, hi in (("density", 0.0, 1.0), ("scale", 0.0, 10.0), ("beta", 0.0, 10.0)):
            v = options[key]
            if v is None or not (lo < v <= hi if key == "density" else lo <= v <= hi):
                self.errors.show(f"{key} must be a number in {'(' if key == 'density' else '['}{lo}, {hi}], got {v!r}")
                return
        args = (self.datastore.store, ids, self.base.value or None, list(self.merges.value), options)
        (self.compose_task.run_now if wait else self.compose_task.start)(_compose_job, *args)

    def _on_composed(self, result) -> None:
        self.result = result
        self.code.object = code_block(result["code"])
        self._draw()
        self.sample_model.options = list(result["models"])
        self.sample_button.disabled = False
        notes = []
        if result["skipped"]:
            notes.append(f"Skipped {escape_md(', '.join(result['skipped']))}: weight-space merges need a base run "
                         "(the specialists have no common parent; pick one).")
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

    def _draw(self) -> None:
        if self.result is None:
            return
        table = self.result["table"]
        self.heatmap.object = domain_heatmap(table, self.metric.value)
        self.summary.object = compose.summary(table).round(4)

    def sample(self) -> None:
        self.errors.clear()
        if self.result is None or self.sample_model.value not in self.result["models"]:
            self.errors.show("compose first, then pick a model to sample from")
            return
        try:
            text = sample_text(self.result["models"][self.sample_model.value], self.result["vocab"],
                               prompt=self.prompt.value, n_chars=self.n_chars.value,
                               temperature=self.temperature.value, seed=self.seed.value or 0)
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return
        self.sample_out.object = text_block(text)

    def __panel__(self):
        return pn.Column(
            page_header("Compose", EXPLANATION, CODE),
            pn.pane.Markdown("**Specialists** (pick from the store, or train two)", margin=(0, 10)),
            pn.Row(self.specialists, self.base),
            pn.Row(self.corpus_a, self.corpus_b, self.train_steps, self.n_layers, self.embedding),
            pn.Row(self.train_button, self.train_task.controls()),
            pn.pane.Markdown("**Merges**", margin=(0, 10)), self.merges,
            pn.Row(self.density, self.scale, self.beta),
            pn.Row(self.compose_button, self.compose_task.controls()),
            self.errors, self.message, self.metric, self.heatmap, self.summary,
            pn.pane.Markdown("**Sample text**", margin=(0, 10)),
            pn.Row(self.sample_model, self.prompt, self.n_chars, self.temperature, self.seed, self.sample_button),
            self.sample_out, self.code,
            sizing_mode="stretch_width",
        )
