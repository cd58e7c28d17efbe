"""Depth lab page: which blocks a stored run needs, in which order, how often, and where its depth idles.

Every item of the depth lab on the user's stored runs: layer rankings, pruning (saved as an ordinary run)
and the prune-then-heal curve, execution strategies, oracle depth against k-hop hops, the curse-of-depth
profile, early exit with LayerSkip training and self-speculation, effective depth through a growth group.
Each runs as the page's one background job (loading the run included). No math here: the engine
(``wb.depthlab``, ``wb.earlyexit``) computes, the figure builders draw.
"""
from __future__ import annotations

import dataclasses

import pandas as pd
import panel as pn

from ..core import checks, data, models, monitor
from ..core.progress import TrainProgress
from ..core.training import evaluate
from ..figures import depthlab as figs
from ..io.store import check_run_name
from ..studies import depthlab, earlyexit
from .page import Page
from . import examples as starter
from .session import dataset_from_spec, open_run
from .task import job_monitor
from .text import escape_md
from .widgets import run_options

EXPLANATION = """Growth builds depth; the depth lab asks the opposite questions of a trained run.
**Layer rankings**: Block Influence 1 − E cos(h_l, h_l+1) (ShortGPT), the angular distance arccos(cos(h_l, h_l+n))/π
of every span (Gromov et al.; the heat-map) and our skip effect, with Spearman's ρ between them. **Prune**
removes chosen blocks (the same as skipping them), optionally heals by training what remains, and saves the
result as an ordinary run every page reads; the **prune-then-heal curve** removes more and more blocks by
each ranking. **Execution strategies** (Transformer Layers as Painters): skip, swap, reverse, shuffle,
parallel (the mean of a span's outputs) and loop a span k times. **Oracle depth** (CoLa): per k-hop example
the shortest chain of blocks (skips and repeats) that still answers it, against the number of hops.
**Curse of depth** (Sun et al.): per layer the residual norm, its growth, the in/out cosine, the relative
contribution and ‖J − I‖; compare a Pre-LN run with a LayerNorm-Scaling one (norm "lns"). **Early exit**:
accuracy when stopping after e blocks through the shared head, and for character LMs self-speculation's
acceptance; **LayerSkip** trains the same architecture with rising layer dropout and an early-exit loss.
**Effective depth** (Csordás et al.): where the blocks stop feeding later blocks, D / L, at every stage of
a growth group. Definitions: docs/definitions.md (#block-influence ... #effective-depth, #layerskip)."""

ANALYSES = {"Layer rankings": "rankings", "Prune blocks (save a run)": "prune", "Prune-then-heal curve": "curve",
            "Execution strategies": "strategies", "Oracle depth (k-hop)": "oracle", "Curse of depth": "profile",
            "Early exit": "exit", "LayerSkip training": "layerskip", "Effective depth (growth)": "effective"}
FIGURES = {"rankings": ("rank", "angular"), "prune": ("prune",), "curve": ("curve",), "strategies": ("strategies",),
           "oracle": ("oracle",), "profile": ("profile",), "exit": ("exit",), "layerskip": ("exit",),
           "effective": ("effective",)}
NONE = "(none)"
IGNORE = data.IGNORE

HEADER = """import dataclasses
import pandas as pd
import torch
import workbench as wb
"""
LOAD = """run = wb.RunStore().load({run_id!r})
model, ds = run.model.eval(), wb.data.from_spec(run.dataset)
x, y = ds.x_val[:{n}], ds.y_val[:{n}]
mask = {mask}
label = f"{{run.name}} {{run.run_id[-6:]}}"
"""
COMPARE = """other = wb.RunStore().load({cid!r})
ods = wb.data.from_spec(other.dataset)
ox, oy = ods.x_val[:{n}], ods.y_val[:{n}]
other_label = f"{{other.name}} {{other.run_id[-6:]}}"
"""
HEAL = "dataclasses.replace(run.train_config, steps={steps}, eval_every={steps}, eval_max={eval_max})"
CODE = {
    "rankings": """ranks = wb.depthlab.rankings(model, x, y=y, mask=mask, skip={skip}, positions={positions!r})
wb.figures.depthlab.rankings_figure(ranks.table, ranks.correlation)
wb.figures.depthlab.angular_heatmap(ranks.angular)""",
    "prune": """pruned = wb.depthlab.prune_run(run, {layers!r}, dataset=ds, heal={heal}, name={name!r})
pruned_id = wb.RunStore().save(pruned)   # an ordinary run: stored, reloadable, on every page
pruned.metrics.query("split == 'val'")   # step 0: right after pruning; then the healing""",
    "curve": """curve = wb.depthlab.prune_heal_curve(model, ds, methods={methods!r}, heal={heal}, rank_examples={n},
                                     eval_max={eval_max}, seed={seed})
wb.figures.depthlab.prune_heal_figure(curve)""",
    "strategies": """strat = wb.depthlab.strategies(model, x, y, strategies={names!r}, spans={spans!r}, k={k},
                               seed={seed})
wb.figures.depthlab.strategies_figure(strat)""",
    "oracle": """xs, ys, hops = [], [], []
for h in {hops}:   # the run's own hop count from its validation split, others drawn with its options
    d = ds if h == ds.options["hops"] else wb.data.load("khop", **{{**ds.options, "hops": h, "n_train": 10,
        "n_val": {n}, "seed": (ds.options["seed"] + 1000 * h + 1) % 2**31}})
    xs.append(d.x_val[:{n}]); ys.append(d.y_val[:{n}]); hops += [h] * len(xs[-1])
oracle = wb.depthlab.oracle_depth(model, torch.cat(xs), torch.cat(ys), hops=hops, repeat={repeat})
oracle.summary()
wb.figures.depthlab.oracle_histogram(oracle.histogram(), n_layers=len(model.blocks))""",
    "profile": """prof = wb.depthlab.depth_profile(model, x, mask=mask, y=y, n_directions={nd}, seed={seed})
prof = prof.assign(model=label)
{other}wb.depthlab.deep_half(prof[prof["model"] == label])
wb.figures.depthlab.depth_profile_figure(prof)""",
    "exit": """curves = wb.earlyexit.exit_curve(model, x, y).assign(recipe=label)
accept = {accept}
{other}wb.figures.depthlab.exit_curve_figure(curves, accept)""",
    "layerskip": """ls_model = wb.models.build(run.model.config)   # the same architecture and initial weights
config = dataclasses.replace(run.train_config, steps={steps}, eval_every={every})
ls_run = wb.earlyexit.train_layerskip(ls_model, ds, config, p_max={p_max}, exit_scale={exit_scale}, seed={seed},
                                      name=run.name + "-layerskip")
ls_id = wb.RunStore().save(ls_run)
curves = pd.concat([wb.earlyexit.exit_curve(model, x, y).assign(recipe="without: " + label),
                    wb.earlyexit.exit_curve(ls_model, x, y).assign(recipe="LayerSkip")])
wb.figures.depthlab.exit_curve_figure(curves)""",
    "effective": """runs = wb.depthlab.group_runs(wb.RunStore(), {group!r})
ds = wb.data.from_spec(runs[-1].dataset)
x, y = ds.x_val[:{n}], ds.y_val[:{n}]
table = wb.depthlab.effective_depth_stages(runs, x, y=y, mask={mask}, threshold={threshold})
table["val_acc"] = [r.final("acc") for r in runs]
wb.figures.depthlab.effective_depth_figure(table)""",
}
PROFILE_OTHER = """oprof = wb.depthlab.depth_profile(other.model.eval(), ox, mask={omask}, y=oy, n_directions={nd},
                                   seed={seed})
prof = pd.concat([prof, oprof.assign(model=other_label)])
"""
EXIT_OTHER = """ocurve = wb.earlyexit.exit_curve(other.model.eval(), ox, oy)
curves = pd.concat([curves, ocurve.assign(recipe=other_label)])
"""
ACCEPT = ("wb.earlyexit.acceptance_curve(model, ds.x_val[:{prompts}, :{prompt_len}], n_new={n_new}, "
          "n_draft={n_draft}).assign(recipe=label)")


# ============================================================================ jobs (each in the page's task)


def _monitor(ctx, lo: float = 0.05, hi: float = 1.0):
    """The page job's monitor (Stop, the progress bar) for an engine call taking the share ``[lo, hi]``."""
    return monitor.part(job_monitor(ctx, key="progress"), lo, hi - lo)


def _open(ctx, store, run_id, field: str = "stored run"):
    """The stored run (owner-checked; refusals name ``field``), its model in eval mode and its dataset."""
    ctx.report(progress=0.01, message=f"loading the {field}")
    run = open_run(store, run_id, field)
    return run, run.model.eval(), dataset_from_spec(run.dataset)


def _sample(ds, n: int):
    """The first ``n`` validation examples, their targets and the scored tokens (None for vector data)."""
    x, y = ds.x_val[:n], ds.y_val[:n]
    return x, y, (y != IGNORE) if ds.kind == "sequence" else None


def _label(run) -> str:
    return f"{run.name} {run.run_id[-6:]}"


def _heal(run, steps: int, eval_max: int):
    return dataclasses.replace(run.train_config, steps=steps, eval_every=steps, eval_max=eval_max)


def _rankings_job(ctx, store, run_id, o):
    run, model, ds = _open(ctx, store, run_id)
    x, y, mask = _sample(ds, o["n"])
    ctx.report(progress=0.1, message="rankings: one forward" + (" and the skip effects" if o["skip"] else ""))
    ranks = depthlab.rankings(model, x, y=y, mask=mask, skip=o["skip"], positions=o["positions"])
    return {"rankings": ranks.table, "correlation": ranks.correlation, "angular": ranks.angular,
            "depth_score": ranks.depth_score, "name": run.name}


def _prune_job(ctx, store, run_id, o):
    """Remove the blocks (the engine refuses bad ones before anything changes), heal, then save the run."""
    run, model, ds = _open(ctx, store, run_id)
    mon = _monitor(ctx, 0.1, 0.95)
    heal = _heal(run, o["heal"], o["eval_max"]) if o["heal"] else None
    ctx.report(progress=0.05, message=f"removing blocks {o['layers']}" + (", then healing" if heal else ""))
    pruned = depthlab.prune_run(run, o["layers"], dataset=ds, heal=heal, name=o["name"] or None,
                                callbacks=[TrainProgress(mon, payload=False)] if heal else (), monitor=mon)
    saved = store.save(pruned)
    before = evaluate(model, ds, "val", o["eval_max"])
    m, meta = pruned.metrics, pruned.meta
    val = m[m["split"] == "val"].pivot_table(index="step", columns="metric", values="value").sort_index()
    k, L = len(meta["removed"]), meta["n_layers_before"]
    rows = [(False, 0, before, ""), (False, k, val.iloc[0], str(meta["removed"]))]
    if meta["healed_steps"]:
        rows += [(True, 0, before, ""), (True, k, val.iloc[-1], str(meta["removed"]))]
    points = pd.DataFrame([("chosen blocks", n, n / L, label, healed, float(v["acc"]), float(v["loss"]))
                           for healed, n, v, label in rows],
                          columns=["method", "n_removed", "fraction", "removed", "healed", "acc", "loss"])
    return {"pruned": points, "saved": saved, "saved_name": pruned.name, "meta": meta}


def _curve_job(ctx, store, run_id, o):
    run, model, ds = _open(ctx, store, run_id)
    heal = _heal(run, o["heal"], o["eval_max"]) if o["heal"] else None
    curve = depthlab.prune_heal_curve(model, ds, methods=o["methods"], heal=heal, rank_examples=o["n"],
                                      eval_max=o["eval_max"], seed=o["seed"], monitor=_monitor(ctx))
    return {"curve": curve}


def _strategies_job(ctx, store, run_id, o):
    _, model, ds = _open(ctx, store, run_id)
    x, y, _ = _sample(ds, o["n"])
    table = depthlab.strategies(model, x, y, strategies=o["names"], spans=o["spans"], k=o["k"], seed=o["seed"],
                                monitor=_monitor(ctx))
    return {"strategies": table}


def _khop_by_hops(ds, hops: list[int], n: int):
    """Validation examples of each hop count: the run's own from its split, others drawn with its options."""
    import torch

    xs, ys, hv = [], [], []
    for h in hops:
        d = ds if h == ds.options["hops"] else data.load("khop", **{
            **ds.options, "hops": h, "n_train": 10, "n_val": n, "seed": (ds.options["seed"] + 1000 * h + 1) % 2**31})
        xs.append(d.x_val[:n])
        ys.append(d.y_val[:n])
        hv += [h] * len(xs[-1])
    return torch.cat(xs), torch.cat(ys), hv


def _oracle_job(ctx, store, run_id, o):
    _, model, ds = _open(ctx, store, run_id)
    if ds.name != "khop":
        raise ValueError(f"stored run: oracle depth is read against k-hop hops, and this run was trained on "
                         f"{ds.name!r}; pick a k-hop run")
    hops = o["hops"] or [ds.options["hops"]]
    x, y, hv = _khop_by_hops(ds, hops, o["n"])
    oracle = depthlab.oracle_depth(model, x, y, hops=hv, repeat=o["repeat"], monitor=_monitor(ctx))
    return {"oracle": oracle.histogram(), "summary": oracle.summary(), "method": oracle.method,
            "n_layers": oracle.n_layers}


def _profile_job(ctx, store, run_id, o):
    frames = []
    for j, (rid, field) in enumerate([(run_id, "stored run"), (o["compare"], "compare with")]):
        if rid is None:
            continue
        run, model, ds = _open(ctx, store, rid, field)
        x, y, mask = _sample(ds, o["n"])
        prof = depthlab.depth_profile(model, x, mask=mask, y=y, n_directions=o["nd"], seed=o["seed"],
                                      monitor=_monitor(ctx, 0.5 * j, 0.5 * (j + 1)))
        frames.append(prof.assign(model=_label(run), norm=getattr(model.config, "norm", "")))
    return {"profile": pd.concat(frames, ignore_index=True)}


def _exit_tables(ctx, model, ds, o, lo: float, recipe: str):
    x, y, _ = _sample(ds, o["n"])
    curve = earlyexit.exit_curve(model, x, y).assign(recipe=recipe)
    accept = None
    if ds.name == "text":
        prompts = ds.x_val[:o["prompts"], :o["prompt_len"]]
        accept = earlyexit.acceptance_curve(model, prompts, n_new=o["n_new"], n_draft=o["n_draft"],
                                            monitor=_monitor(ctx, lo, lo + 0.5)).assign(recipe=recipe)
    return curve, accept


def _exit_job(ctx, store, run_id, o):
    curves, accepts = [], []
    for j, (rid, field) in enumerate([(run_id, "stored run"), (o["compare"], "compare with")]):
        if rid is not None:
            run, model, ds = _open(ctx, store, rid, field)
            c, a = _exit_tables(ctx, model, ds, o, 0.5 * j, _label(run))
            curves.append(c)
            accepts += [a] if a is not None else []
    return {"exit": pd.concat(curves, ignore_index=True),
            "accept": pd.concat(accepts, ignore_index=True) if accepts else None}


def _layerskip_job(ctx, store, run_id, o):
    """Train the run's architecture from its initial weights with the LayerSkip recipe, save it, compare exits."""
    run, model, ds = _open(ctx, store, run_id)
    mon = _monitor(ctx, 0.02, 0.9)
    ls_model = models.build(run.model.config)
    config = dataclasses.replace(run.train_config, steps=o["steps"], eval_every=min(run.train_config.eval_every,
                                                                                     o["steps"]))
    ctx.report(progress=0.02, message="LayerSkip training")
    ls_run = earlyexit.train_layerskip(ls_model, ds, config, p_max=o["p_max"], exit_scale=o["exit_scale"],
                                       seed=o["seed"], callbacks=[TrainProgress(mon, payload=False)],
                                       name=run.name + "-layerskip",
                                       monitor=mon)
    saved = store.save(ls_run)   # kept also when stopped (what was trained, its status says so)
    ctx.report(progress=0.92, message="exit curves")
    x, y, _ = _sample(ds, o["n"])
    curves = pd.concat([earlyexit.exit_curve(model, x, y).assign(recipe="without: " + _label(run)),
                        earlyexit.exit_curve(ls_model.eval(), x, y).assign(recipe="LayerSkip")], ignore_index=True)
    done = ls_run.metrics[ls_run.metrics["split"] == "batch"]["step"]
    return {"exit": curves, "accept": None, "saved": saved, "saved_name": ls_run.name,
            "trained": int(done.max()) if len(done) else 0}


def _effective_job(ctx, store, group, o):
    """Effective depth at every stage of the group: the stage runs the listing named, each opened owner-checked."""
    runs = []
    for i, rid in enumerate(o["run_ids"]):
        ctx.report(progress=0.3 * i / len(o["run_ids"]), message=f"loading stage {i + 1} of {group}")
        runs.append(open_run(store, rid, "growth group"))
    ds = dataset_from_spec(runs[-1].dataset)
    x, y, mask = _sample(ds, o["n"])
    table = depthlab.effective_depth_stages(runs, x, y=y, mask=mask, threshold=o["threshold"],
                                            monitor=_monitor(ctx, 0.3, 1.0))
    table["val_acc"] = [r.final("acc") for r in runs][:len(table)]
    return {"effective": table}


def analysis_job(ctx, key: str, store, target, o: dict) -> dict:
    """The page's job: analysis ``key`` on the stored run (or growth group) ``target``; its tables under ``kind``."""
    return {"kind": key, **JOBS[key](ctx, store, target, o)}


JOBS = {"rankings": _rankings_job, "prune": _prune_job, "curve": _curve_job, "strategies": _strategies_job,
        "oracle": _oracle_job, "profile": _profile_job, "exit": _exit_job, "layerskip": _layerskip_job,
        "effective": _effective_job}


def parse_ints(field: str, text) -> list[int]:
    """Whole numbers separated by commas or spaces (``field`` named when one is not)."""
    if not isinstance(text, str) or len(text) > 2000:
        raise ValueError(f"{field} must be whole numbers separated by commas (e.g. 1, 2), at most 2000 characters")
    out = []
    for tok in text.replace(",", " ").split():
        try:
            out.append(int(tok))
        except ValueError:
            raise ValueError(f"{field} must be whole numbers separated by commas (e.g. 1, 2), "
                             f"got {tok[:40]!r}") from None
    return out


# ============================================================================ the page


class DepthLabPage(Page):
    """Pick a stored run and an analysis; one Run button starts it as the page's job."""

    title = "Depth lab"
    order = 35
    explanation = EXPLANATION

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        W = pn.widgets
        self.run = W.Select(name="stored run", width=320)
        self.analysis = W.Select(name="analysis", options=dict(ANALYSES), value="rankings", width=320)
        self.skip = W.Checkbox(name="with the skip-effect ranking (L + 1 forwards)", value=True)
        self.blocks = W.TextInput(name="blocks to remove (e.g. 1, 2)", value="", width=200)
        self.heal = W.IntInput(name="heal steps (0: none)", value=0, width=130)
        self.save_name = W.TextInput(name="save as (empty: <run>-pruned)", value="", width=300)
        self.methods = W.MultiChoice(name="rankings", options=list(depthlab.PRUNE_METHODS),
                                     value=list(depthlab.PRUNE_METHODS), width=300)
        self.curve_heal = W.IntInput(name="heal steps per point (0: none)", value=0, width=180)
        self.strategies = W.MultiChoice(name="strategies", options=list(depthlab.STRATEGIES),
                                        value=list(depthlab.STRATEGIES), width=300)
        self.every_span = W.Checkbox(name="every span each strategy takes", value=True)
        self.start = W.IntInput(name="span start", value=0, width=90)
        self.span_n = W.IntInput(name="blocks in the span (n)", value=2, width=140)
        self.loop_k = W.IntInput(name="loop count k", value=2, width=90)   # unbounded here: the engine says [1, 16]
        self.hops = W.TextInput(name="hop counts (empty: the run's own)", value="", width=220)
        self.repeat = W.Checkbox(name="chains may repeat a block", value=True)
        self.compare = W.Select(name="compare with", width=320)
        self.prompts = W.IntInput(name="prompts", value=4, width=80)
        self.n_new = W.IntInput(name="new tokens", value=16, width=90)
        self.ls_steps = W.IntInput(name="LayerSkip steps", value=300, width=110)
        self.p_max = W.FloatInput(name="p_max", value=0.2, width=80)
        self.exit_scale = W.FloatInput(name="exit loss scale", value=1.0, width=100)
        self.group = W.Select(name="growth group", width=320)
        self.threshold = W.FloatInput(name="threshold", value=0.5, width=90)
        # advanced
        self.examples = W.IntInput(name="validation examples", value=256, width=140)
        self.eval_max = W.IntInput(name="examples per evaluation", value=512, width=160)
        self.seed = W.IntInput(name="seed", value=0, width=90)
        self.positions = W.Select(name="positions", options=["paper", "all", "last"], value="paper", width=100)
        self.n_directions = W.IntInput(name="||J - I|| directions", value=4, width=140)
        self.prompt_len = W.IntInput(name="prompt tokens", value=8, width=110)
        self.n_draft = W.IntInput(name="draft tokens per round", value=4, width=150)
        self.run_button = W.Button(name="Run", button_type="primary", width=120)
        self.run_button.on_click(lambda _: self.start_analysis())
        knobs = {
            "rankings": [self.skip], "prune": [self.blocks, self.heal, self.save_name],
            "curve": [self.methods, self.curve_heal],
            "strategies": [self.strategies, self.every_span, pn.Row(self.start, self.span_n, self.loop_k)],
            "oracle": [self.hops, self.repeat], "profile": [],
            "exit": [pn.Row(self.prompts, self.n_new)],
            "layerskip": [self.ls_steps, pn.Row(self.p_max, self.exit_scale)],
            "effective": [self.group, self.threshold]}
        self.option_boxes = {k: pn.Column(*v) for k, v in knobs.items()}
        self.compare_box = pn.Column(self.compare)   # shared by the curse of depth and early exit
        self.status = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.notes: dict[str, str] = {}
        plot = lambda fig, h: pn.pane.Plotly(fig, sizing_mode="stretch_width", height=h)
        self.plots = {"rank": plot(figs.rankings_figure(None), 340), "angular": plot(figs.angular_heatmap(None), 360),
                      "prune": plot(figs.prune_heal_figure(None), 380),
                      "curve": plot(figs.prune_heal_figure(None), 380),
                      "strategies": plot(figs.strategies_figure(None), 380),
                      "oracle": plot(figs.oracle_histogram(None), 340),
                      "profile": plot(figs.depth_profile_figure(None), 600),
                      "exit": plot(figs.exit_curve_figure(None), 340),
                      "effective": plot(figs.effective_depth_figure(None), 320)}
        self.results: dict = {}
        self.analysis.param.watch(lambda _: self._sync(), "value")
        self.run.param.watch(self._follow_run, "value")
        self._refresh_runs()
        self._sync()

    # ---------------------------------------------------------------- layout
    def side(self):
        return [self.run, self.analysis, self.compare_box, *self.option_boxes.values(), self.run_button]

    def figures(self):
        return [self.status, *self.plots.values()]

    def advanced(self):
        return [pn.Row(self.examples, self.eval_max, self.seed, self.positions),
                pn.Row(self.n_directions, self.prompt_len, self.n_draft)]

    def run_buttons(self):
        return [self.run_button]

    def _sync(self) -> None:
        key = self.analysis.value
        for k, box in self.option_boxes.items():
            box.visible = k == key
        self.compare_box.visible = key in ("profile", "exit")
        self.run.visible = key != "effective"
        shown = set(FIGURES.get(key, ()))
        for name, pane in self.plots.items():
            pane.visible = name in shown
        self.status.object = self.notes.get(key, "")
        self.show_code()

    def _follow_run(self, event) -> None:
        """LayerSkip trains as long as the chosen run was trained (like for like), until the user sets it."""
        runs = self.datastore.runs
        old = runs[runs["run_id"] == event.old]["steps"] if event.old and runs is not None and len(runs) else []
        new = runs[runs["run_id"] == event.new]["steps"] if event.new and runs is not None and len(runs) else []
        if len(new) and pd.notna(new.iloc[0]) and (not len(old) or self.ls_steps.value == old.iloc[0]
                                                   or self.ls_steps.value == 300):
            self.ls_steps.value = int(new.iloc[0])

    def on_store_change(self) -> None:
        self._refresh_runs()

    def _refresh_runs(self) -> None:
        runs = self.datastore.runs
        options = run_options(runs)
        for select, extra in ((self.run, {}), (self.compare, {NONE: NONE})):
            current = select.value
            select.options = {**extra, **options}
            if current in select.options.values():
                select.value = current
            elif select.options:
                select.value = next(iter(select.options.values()))
        groups = sorted({str(g) for g in runs["group_name"] if isinstance(g, str) and g}) \
            if runs is not None and len(runs) else []
        self.group.options = groups
        if self.group.value not in groups:
            self.group.value = groups[0] if groups else None

    # ---------------------------------------------------------------- choices
    def _listed(self, run_id, field: str = "stored run") -> dict:
        """The listing's row of a stored run (``n_layers``, ``dataset``, ``family``): the form is checked from it,
        the job opens the run itself (owner-checked)."""
        runs = self.datastore.runs
        rows = runs[runs["run_id"] == run_id] if runs is not None and len(runs) else []
        if not len(rows):
            raise ValueError(f"{field}: pick one of your runs (train or grow one first)" if not run_id else
                             f"{field}: it is no longer listed; pick another")
        return rows.iloc[0].to_dict()

    def _int(self, label, widget, lo, hi=None) -> int:
        return checks.check_int(label, widget.value, lo, hi)

    def choices(self) -> tuple[str, str | None, dict]:
        """``(analysis, run id or group, options)`` from the form, checked; ValueError naming the field."""
        key = checks.check_choice("analysis", self.analysis.value, ANALYSES.values())
        o = {"n": self._int("validation examples", self.examples, 1, 100_000),
             "seed": checks.check_seed("seed", self.seed.value)}
        if key == "effective":
            if not self.group.value:
                raise ValueError("growth group: none among your runs; grow a model on the Grow page first")
            o["threshold"] = checks.check_float("threshold", self.threshold.value, 0, 1, lo_open=True, hi_open=True)
            runs = self.datastore.runs   # the stages as listed (what group_runs selects), opened in the job
            stages = runs[(runs["group_name"] == self.group.value) & runs["stage"].notna()].sort_values("stage")
            if not len(stages):
                raise ValueError(f"growth group: no stored run belongs to {str(self.group.value)[:80]!r} any more")
            o["run_ids"] = list(stages["run_id"])
            return key, self.group.value, o
        row = self._listed(self.run.value)
        L = int(row["n_layers"])
        o["sequence"] = row["family"] == "transformer"
        if key == "rankings":
            o.update(skip=bool(self.skip.value),
                     positions=checks.check_choice("positions", self.positions.value, ["paper", "all", "last"]))
        elif key in ("prune", "curve"):
            o["eval_max"] = self._int("examples per evaluation", self.eval_max, 1, 100_000)
            if key == "prune":
                o["layers"] = parse_ints("blocks to remove", self.blocks.value)
                if not o["layers"]:
                    raise ValueError("blocks to remove: name at least one block, e.g. 1")
                o["heal"] = self._int("heal steps", self.heal, 0, 1_000_000)
                o["name"] = check_run_name(self.save_name.value, "save as") if self.save_name.value else ""
                self.check_steps(o["heal"], "heal steps")
            else:
                o["methods"] = checks.check_choices("rankings", list(self.methods.value), depthlab.PRUNE_METHODS)
                o["heal"] = self._int("heal steps per point", self.curve_heal, 0, 1_000_000)
                self.check_steps(o["heal"] * len(o["methods"]) * max(L, 1), "heal steps per point")
        elif key == "strategies":
            names = checks.check_choices("strategies", list(self.strategies.value), depthlab.STRATEGIES)
            start, n, k = self.start.value, self.span_n.value, self.loop_k.value
            spans = None if self.every_span.value else [(start, n)]
            for s in (names if spans else ["skip"]):   # the engine's own refusals, before anything runs
                depthlab.strategy_sequence(L, s, *(spans[0] if spans else (0, 1)), k, o["seed"])
            o.update(names=names, spans=spans, k=k)
        elif key == "oracle":
            if row["dataset"] != "khop":
                raise ValueError(f"stored run: oracle depth is read against k-hop hops, and this run was trained on "
                                 f"{str(row['dataset'])[:40]!r}; pick a k-hop run (train one on khop)")
            hops = parse_ints("hop counts", self.hops.value)
            o.update(hops=[checks.check_int(f"hop counts: value {i + 1}", h, 1, 8) for i, h in enumerate(hops)],
                     repeat=bool(self.repeat.value))
            if len(set(hops)) != len(hops):
                raise ValueError(f"hop counts must be distinct, got {hops}")
        elif key in ("profile", "exit"):
            o["compare"] = None if self.compare.value in (None, NONE) else self.compare.value
            if o["compare"] is not None:
                self._listed(o["compare"], "compare with")
            o["nd"] = self._int("||J - I|| directions", self.n_directions, 0, 64)
            o.update(prompts=self._int("prompts", self.prompts, 1, 64),
                     n_new=self._int("new tokens", self.n_new, 1, 512),
                     prompt_len=self._int("prompt tokens", self.prompt_len, 1, 4096),
                     n_draft=self._int("draft tokens per round", self.n_draft, 1, 64))
        elif key == "layerskip":
            o.update(steps=self._int("LayerSkip steps", self.ls_steps, 1, 1_000_000),
                     p_max=checks.check_float("p_max", self.p_max.value, 0, 1, hi_open=True),
                     exit_scale=checks.check_float("exit loss scale", self.exit_scale.value, 0, 100))
            self.check_steps(o["steps"], "LayerSkip steps")
        return key, self.run.value, o

    def as_code(self) -> str:
        key = self.analysis.value
        if key == "effective" and not self.group.value:
            return "import workbench as wb\n# no growth group yet: grow a model on the Grow page first"
        if key != "effective" and not self.run.value:
            return "import workbench as wb\n# no stored run yet: train or grow one; this box then shows the calls"
        key, target, o = self.choices()
        runs = self.datastore.runs
        if key == "effective":
            seq = (runs[runs["group_name"] == target]["family"] == "transformer").any()
            return HEADER + CODE["effective"].format(group=target, mask="y != -100" if seq else "None", **o)
        code = HEADER + LOAD.format(run_id=target, n=o["n"], mask="y != -100" if o["sequence"] else "None")
        heal = HEAL.format(steps=o["heal"], eval_max=o["eval_max"]) if o.get("heal") else "None"
        if key == "prune":
            return code + CODE["prune"].format(layers=o["layers"], heal=heal, name=o["name"] or None)
        if key == "curve":
            return code + CODE["curve"].format(**{**o, "heal": heal})
        if key == "oracle":
            hops = repr(o["hops"]) if o["hops"] else "[ds.options['hops']]"
            return code + CODE["oracle"].format(**{**o, "hops": hops})
        if key in ("profile", "exit"):
            other = ""
            if o["compare"] is not None:
                omask = "oy != -100" if self._listed(o["compare"])["family"] == "transformer" else "None"
                other = COMPARE.format(cid=o["compare"], n=o["n"]) + (
                    PROFILE_OTHER.format(omask=omask, **o) if key == "profile" else EXIT_OTHER)
            text = key == "exit" and self._listed(target)["dataset"] == "text"
            return code + CODE[key].format(other=other, accept=ACCEPT.format(**o) if text else "None", **o)
        if key == "layerskip":
            return code + CODE["layerskip"].format(every=f"min(run.train_config.eval_every, {o['steps']})", **o)
        return code + CODE[key].format(**o)

    # ---------------------------------------------------------------- actions
    def start_analysis(self, wait: bool = False) -> None:
        """Check the form and start the chosen analysis as the page's job (``wait=True``: for tests)."""
        got = self.read_form(self.choices)
        if got is None:
            return
        key, target, o = got
        self.results = {}
        self.notes[key] = ""
        self._sync()
        self.start_task(analysis_job, key, self.datastore.store, target, o, wait=wait)

    # ---------------------------------------------------------------- results
    def show_example(self) -> bool:
        """The grown example's layer rankings, stored with it (what Run computes for it with these choices)."""
        run_id, stored = starter.stored(self.datastore, "grow-1", "depthlab")
        if stored is None or self.results or not self.fresh() or run_id not in self.run.options.values():
            return False
        self.run.value = run_id
        self.analysis.value = "rankings"
        self.show(stored)
        self.show_note(starter.note("grow-1", "Its layer rankings are drawn (stored with it); pick another run or "
                                              "analysis and press **Run**."))
        return True

    def show(self, payload: dict) -> None:
        if "kind" not in payload:   # a progress report: the bar and the status line say it
            return
        self.results = dict(payload)
        key, note = self.analysis.value, ""
        if "rankings" in payload:
            self.plots["rank"].object = figs.rankings_figure(payload["rankings"], payload["correlation"])
            self.plots["angular"].object = figs.angular_heatmap(payload["angular"])
            t = payload["rankings"]
            first = ", ".join(f"{m} {int(g.sort_values('rank')['layer'].iloc[0])}" for m, g in t.groupby("method"))
            note = f"first block to remove by each ranking: {first}; depth score {payload['depth_score']:.2f}."
        if "pruned" in payload:
            p, meta = payload["pruned"], payload["meta"]
            self.plots["prune"].object = figs.prune_heal_figure(p, title="The chosen blocks removed (dashed: healed)")
            note = (f"saved **{escape_md(payload['saved_name'])}** ({payload['saved'][-6:]}): blocks "
                    f"{meta['removed']} of {meta['n_layers_before']} removed; validation accuracy "
                    f"{p['acc'].iloc[0]:.3f} before, {p['acc'].iloc[1]:.3f} right after"
                    + (f", {p['acc'].iloc[-1]:.3f} after {meta['healed_steps']} healing steps" if meta["healed_steps"]
                       else "") + ". It is an ordinary run: every page lists it.")
        if "curve" in payload:
            self.plots["curve"].object = figs.prune_heal_figure(payload["curve"])
            t = payload["curve"]
            top = t[t["n_removed"] == t["n_removed"].max()] if len(t) else t
            note = (f"validation accuracy with {int(top['n_removed'].iloc[0])} blocks removed: " + ", ".join(
                f"{r.method}{' healed' if r.healed else ''} {r.acc:.3f}" for r in top.itertuples())) if len(t) else ""
        if "strategies" in payload:
            t = payload["strategies"]
            self.plots["strategies"].object = figs.strategies_figure(t)
            worst = t.iloc[1:].sort_values("acc").head(1)
            note = f"own order: accuracy {t['acc'].iloc[0]:.3f}" + "".join(
                f"; most harmful: {r.strategy} on blocks {r.start}..{r.start + r.n - 1} ({r.acc:.3f})"
                for r in worst.itertuples())
        if "oracle" in payload:
            self.plots["oracle"].object = figs.oracle_histogram(payload["oracle"], n_layers=payload["n_layers"])
            note = self._oracle_note(payload["summary"], payload["n_layers"], payload["method"])
        if "profile" in payload:
            self.plots["profile"].object = figs.depth_profile_figure(payload["profile"])
            note = "; ".join(self._half_note(name, g) for name, g in payload["profile"].groupby("model", sort=False))
        if "exit" in payload:
            self.plots["exit"].object = figs.exit_curve_figure(payload["exit"], payload.get("accept"))
            parts = [f"{escape_md(r)}: exit 1 accuracy {g.sort_values('exit')['acc'].iloc[min(1, len(g) - 1)]:.3f}, "
                     f"full {g.sort_values('exit')['acc'].iloc[-1]:.3f}" for r, g in payload["exit"].groupby("recipe")]
            note = "; ".join(parts) + ("" if payload.get("accept") is not None or "saved" in payload else
                                       ". Self-speculation's acceptance is drawn for character LMs (text runs) only.")
            if "saved" in payload:
                note = (f"saved **{escape_md(payload['saved_name'])}** ({payload['saved'][-6:]}) after "
                        f"{payload['trained']} LayerSkip steps. " + note)
        if "effective" in payload:
            t = payload["effective"]
            self.plots["effective"].object = figs.effective_depth_figure(t)
            note = "D / L by stage: " + ", ".join(f"stage {s} ({n} blocks): " + ("n/a" if pd.isna(r) else f"{r:.2f}")
                                                  for s, n, r in zip(t["stage"], t["n_layers"], t["ratio"]))
        kind = payload.get("kind", key)
        self.notes[kind] = note
        if kind == key:
            self.status.object = note
        if "saved" in payload:
            self.datastore.refresh()

    @staticmethod
    def _oracle_note(summary: pd.DataFrame, L: int, method: str) -> str:
        pct = lambda v: "n/a" if pd.isna(v) else f"{v:.0%}"
        rows = [f"{int(r.hops)} hops: mean oracle length {r.mean_oracle_length:.2f} of {L} blocks, full-model "
                f"accuracy {r.full_acc:.2f}, a shorter chain for {pct(r.shorter_share)} of those it answers, some "
                f"chain for {pct(r.fixed_share)} of those it misses" for r in summary.itertuples()]
        grows = len(summary) > 1 and summary["mean_oracle_length"].is_monotonic_increasing
        what = ("Harder examples (more hops) need longer chains: the model spends its depth on difficulty"
                if grows else "The chains show how much depth the examples need; with one hop count (or no rise "
                "with hops) they do not show how depth tracks difficulty: add hop counts")
        return f"{'; '.join(rows)} ({method} search). {what}."

    @staticmethod
    def _half_note(name: str, profile: pd.DataFrame) -> str:
        half = depthlab.deep_half(profile).set_index("metric")["deep_share"]
        share = ", ".join(f"{m} {v:.0%}" for m, v in half.items())
        return f"{escape_md(name)} (norm {escape_md(profile['norm'].iloc[0])}): deep half carries {share}"
