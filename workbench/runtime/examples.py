"""The starter set: example runs made once, on a fresh store, so that every dashboard page opens on data.

A newcomer who starts the dashboard has no runs yet, and most pages need some: two trained models to
interpolate, a grown model to read, a collapse run, specialists to merge. The starter set is made by the
pipelines the pages run (:mod:`workbench.experiments`, the studies), once, as a job of the server's queue
(``apps/app_hooks.py`` calls :func:`start` when the server starts; about a minute on two cores), and saved
as ordinary runs of the store: owner :data:`OWNER`, marked shared (every signed-in user of a class lists and
opens them, read-only, like a teacher's shared runs) and ``meta["example"] = {"set", "role", "about",
"results"}``. ``results`` holds what a page shows before anyone presses its button (the Connectivity page's
curves, layer-wise barriers and plane; the Unroll page's gap; a sweep and a scaling fit; the collapse
run's head and mixup geometry; the Compose page's table), computed by the same engine calls the pages
make, encoded as plain JSON (:func:`encode`, :func:`decode`).

What is made (:data:`EXAMPLES`): the digits MLP pair (Train, Connectivity, Unroll, Runs, and the stored
Sweeps and Scaling laws results), a k-hop Transformer grown by G_stack (its two stage runs: Grow, Residual
stream, Depth lab), a digits collapse run (Collapse), a base with a grammar and an arithmetic specialist
(Compose) and a small grokking run (Grokking).

Rules. Making them never touches a user's run: it only saves new runs (new ids), and :func:`remove`
deletes only runs whose owner is :data:`OWNER` *and* whose ``run.json`` says they are examples. Two first
starts at once make one set: the work happens under an exclusive lock on ``<store>/examples.lock`` (the
second waits, then finds the set made), and the state file ``<store>/examples.json`` (written atomically
once the set is complete) says ``ready`` or ``removed``. A start killed half-way leaves no state file: the
next one deletes the partial set and makes it again. After :func:`remove` the set stays away (the state
says so) until :func:`restore`. ``WORKBENCH_EXAMPLES=0`` keeps the server from making them at all.

>>> wb.examples.status()          # {"state": "ready", "run_ids": [...], ...}
>>> wb.examples.remove()          # the example runs are deleted; your runs stay
>>> wb.examples.restore()         # made again (about a minute)
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ..core import checks
from ..core import monitor as _monitor
from .classroom import RESERVED_USERS

__all__ = ["OWNER", "SET", "ENV", "EXAMPLES", "Example", "status", "make", "remove", "restore", "start",
           "running", "enabled", "is_example", "example_ids", "results", "encode", "decode"]

OWNER = RESERVED_USERS[0]   # "examples": the owner of every example run (no one signs in under it)
SET = 1                   # the version of the starter set
ENV = "WORKBENCH_EXAMPLES"   # "0" (or off, false, no): the server does not make them at its first start
STATE_FILE = "examples.json"
LOCK_FILE = "examples.lock"
LOCK_WAIT = 900.0         # seconds a second start waits for the first one's set


class Example(NamedTuple):
    role: str
    name: str          # the run name (what every picker shows)
    about: str         # one line: what it is
    pages: tuple       # the pages that open on it


EXAMPLES = (
    Example("pair-a", "example digits MLP seed 0", "a residual MLP (2 blocks, width 128) trained 300 steps on "
            "digits from seed 0", ("Train", "Connectivity", "Unroll & learngene", "Sweeps", "Scaling laws", "Runs")),
    Example("pair-b", "example digits MLP seed 1", "the same MLP from seed 1: the second of the connectivity pair",
            ("Connectivity",)),
    Example("grow-0", "example khop G_stack-stage0", "a 1-block Transformer on 2-hop pointer chasing (stage 0 of "
            "the growth group)", ("Grow", "Depth lab")),
    Example("grow-1", "example khop G_stack-stage1", "the same model stacked to 2 blocks by G_stack and trained on "
            "(stage 1): it solves 2 hops", ("Grow", "Residual stream", "Depth lab", "Start here")),
    Example("collapse", "example digits collapse", "a 3-block MLP trained 30 epochs on digits into the terminal "
            "phase, NC1-NC4 tracked every 2 epochs", ("Collapse",)),
    Example("compose-base", "example compose base", "a 2-block Transformer on grammar and arithmetic text over a "
            "frozen substrate", ("Compose",)),
    Example("compose-grammar", "example specialist grammar", "the base fine-tuned on the grammar corpus",
            ("Compose",)),
    Example("compose-arithmetic", "example specialist arithmetic", "the base fine-tuned on the arithmetic corpus",
            ("Compose",)),
    Example("grokking", "example grokking p23", "a 1-layer Transformer on a + b mod 23 (60% of the pairs) that "
            "memorises, then generalises", ("Grokking",)),
)
_BY_ROLE = {e.role: e for e in EXAMPLES}
_BY_NAME = {e.name: e for e in EXAMPLES}

# The pages' first choices, so that a stored result is what the page computes for its form as it opens.
SWEEP = {"task": "train", "grid": {"d_model": [8, 16]}, "seeds": [0, 1],
         "fixed": {"dataset": "digits", "steps": 20, "n_layers": 1, "d_hidden": 16},
         "metric": "val_acc", "x": "d_model"}
SCALING = {"axis": "width", "values": [4, 8, 16, 32, 64, 128], "dataset": "digits", "steps": 300, "seed": 0,
           "x": "params", "y": "val_loss", "n_heldout": 2, "n_starts": 16, "n_boot": 100}
CONNECTIVITY = {"n_alphas": 25, "resolution": 15, "max_examples": 1024}
UNROLL = {"unit": "block", "finetune": 200, "max_examples": 512}
RANKINGS = {"n": 256, "skip": True, "positions": "paper"}
COLLAPSE = {"epochs": 30, "every": 2, "max_samples": 512}
COMPOSE_MERGES = ["logit mean", "gated mixture", "ties"]
COMPOSE_OPTIONS = {"density": 0.2, "scale": 1.0, "beta": 0.5, "t": 0.5, "alpha": 0.5}
GROK = {"p": 23, "train_fraction": 0.6, "d_model": 32, "n_heads": 4, "d_mlp": 128, "steps": 1200, "eval_every": 50,
        "every": 100}


def enabled() -> bool:
    """Whether the server makes the starter set at its first start (``WORKBENCH_EXAMPLES``, default on)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


# ============================================================================ the stored results


def _encode_dataclass(obj) -> dict:
    return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _kinds() -> dict:
    """The result classes a stored result may hold, by tag (plain dataclasses of frames and numbers)."""
    from ..lmc.interpolation import Plane
    from ..studies.scaling import PowerLaw

    return {"plane": Plane, "power_law": PowerLaw}


def encode(obj) -> Any:
    """``obj`` as plain JSON data: DataFrames (``{"__frame__": split}``), arrays, numbers, strings, lists,
    dicts with string keys, and the result dataclasses of :func:`_kinds` (tagged). Anything else: ValueError."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, pd.DataFrame):
        return {"__frame__": json.loads(obj.to_json(orient="split", index=False, double_precision=15))}
    if isinstance(obj, np.ndarray):
        return {"__array__": encode(obj.tolist()), "dtype": str(obj.dtype)}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError(f"a stored result's dict keys must be strings, got {list(obj)[:4]}")
        return {k: encode(v) for k, v in obj.items()}
    for tag, cls in _kinds().items():
        if isinstance(obj, cls):
            return {"__kind__": tag, "fields": _encode_dataclass(obj)}
    raise ValueError(f"a stored result cannot hold a {type(obj).__name__}")


def decode(data) -> Any:
    """The objects :func:`encode` wrote (frames, arrays, the tagged dataclasses)."""
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__frame__" in data:
        split = data["__frame__"]
        return pd.DataFrame(split.get("data", []), columns=split.get("columns", []))
    if "__array__" in data:
        return np.asarray(data["__array__"], dtype=data.get("dtype") or None)
    if "__kind__" in data:
        cls = _kinds()[data["__kind__"]]
        return cls(**{k: decode(v) for k, v in data["fields"].items()})
    return {k: decode(v) for k, v in data.items()}


# ============================================================================ finding them


def is_example(doc: dict) -> bool:
    """Whether a run document (``RunStore.read_json``) is an example: owner :data:`OWNER` and the example mark."""
    meta = doc.get("meta") if isinstance(doc, dict) else None
    return doc.get("owner") == OWNER and isinstance(meta, dict) and isinstance(meta.get("example"), dict)


def example_ids(runs: pd.DataFrame | None) -> dict[str, str]:
    """``{role: run_id}`` of the example runs in a listing (``RunStore.list()``, a session's runs), the newest
    of each role; roles not listed are missing."""
    if runs is None or not len(runs) or "owner" not in runs:
        return {}
    rows = runs[(runs["owner"] == OWNER) & runs["name"].isin(list(_BY_NAME))]
    out = {}
    for name, run_id in zip(rows["name"], rows["run_id"]):   # newest first
        out.setdefault(_BY_NAME[name].role, run_id)
    return out


def results(doc: dict) -> dict:
    """The stored page results of an example's run document (decoded), ``{}`` for any other run."""
    if not is_example(doc):
        return {}
    stored = doc["meta"]["example"].get("results") or {}
    return {k: decode(v) for k, v in stored.items()} if isinstance(stored, dict) else {}


def _store(store):
    """A RunStore (or a user's view of one) as given; a path or None (``WORKBENCH_HOME``) opened."""
    from ..io.store import RunStore

    if store is None or isinstance(store, (str, os.PathLike)):
        return RunStore(store)
    return store


def _root(store) -> str:
    """The store's folder (a RunStore, a user's view of one, or a path; None: ``WORKBENCH_HOME``), resolved."""
    from ..io.store import default_home

    if store is None:
        where = default_home()
    elif isinstance(store, (str, os.PathLike)):
        where = store
    else:
        where = store.root   # a RunStore or a user's view of one (a Path's own ``root`` is its anchor: not this)
    return str(Path(where).expanduser().resolve())


def _state_path(store) -> Path:
    return Path(_root(store)) / STATE_FILE


def _read_state(store) -> dict | None:
    try:
        state = json.loads(_state_path(store).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None   # unreadable: treated as absent (the set is made again; leftovers are removed first)
    return state if isinstance(state, dict) and state.get("state") in ("ready", "removed") else None


def _write_state(store, state: dict) -> None:
    from ..io.store.files import atomic_write

    text = json.dumps(state, indent=2)
    atomic_write(_state_path(store), lambda p: Path(p).write_text(text, encoding="utf-8"))


def status(store=None) -> dict:
    """``{"state", "run_ids", "seconds", "made"}``: ``state`` is ``"ready"`` (made; ``run_ids`` those still
    stored), ``"removed"`` (:func:`remove`), ``"making"`` (this process is making them now) or ``"absent"``."""
    store = _store(store)
    state = _read_state(store) or {"state": "absent"}
    job = running(store)
    if job is not None:
        state = {**state, "state": "making", "progress": job.progress, "message": job.message}
    try:
        ids = list(example_ids(store.list()).values())
    except Exception:   # a broken index: the state file still answers
        ids = []
    return {"run_ids": ids, **{k: v for k, v in state.items() if k != "run_ids"}}


# ============================================================================ making them


class _Saver:
    """Saves runs as examples: owner :data:`OWNER`, shared, ``meta["example"]`` with the role and the results;
    the ``save(run)`` a growth run calls for each stage (``on_save(run) -> results`` adds a stage's own)."""

    def __init__(self, store, saved: list, role_of=None, on_save=None):
        self.store, self.saved, self.role_of, self.on_save = store, saved, role_of, on_save

    def save(self, run, role: str | None = None, stored: dict | None = None) -> str:
        role = role or self.role_of(run)
        example = _BY_ROLE[role]
        found = dict(stored or {})
        if self.on_save is not None:
            found.update(self.on_save(run))
        run.meta = {**(run.meta or {}), "example": {"set": SET, "role": role, "about": example.about,
                                                   "results": {k: encode(v) for k, v in found.items()}}}
        run_id = self.store.save(run, name=example.name, owner=OWNER)
        self.saved.append(run_id)
        self.store.share(run_id, True)
        return run_id


def _pair(saver, tiny: bool, monitor):
    """The digits MLP pair, its connectivity analysis and the Unroll page's measures (on A); the Sweeps
    and Scaling laws pages' stored results ride on A too (they have no run of their own)."""
    from ..core import data
    from ..experiments import connectivity
    from ..runtime import sweeps
    from ..studies import learngene, scaling, unroll
    from ..core.progress import TrainProgress
    from ..core.training import TrainConfig

    choices = connectivity.pair_choices("digits")
    train = {**choices["train"], **({"steps": 20, "eval_every": 20} if tiny else {})}
    runs = connectivity.pair("digits", choices["data_options"], choices["model"], train, seeds=(0, 1),
                             monitor=_monitor.part(monitor, 0.0, 0.35))
    _monitor.check(monitor)
    ds = data.from_spec(runs[0].dataset)
    a, b = runs[0].model.eval(), runs[1].model.eval()
    monitor.report(0.35, "the pair's interpolation curves, layer-wise barriers and loss plane")
    c = dict(CONNECTIVITY, **({"n_alphas": 5, "resolution": 3, "max_examples": 128} if tiny else {}))
    analysis = connectivity.analysis(a, b, ds, n_alphas=c["n_alphas"], resolution=c["resolution"],
                                     max_examples=c["max_examples"], monitor=_monitor.part(monitor, 0.35, 0.2))
    _monitor.check(monitor)
    monitor.report(0.55, "unrolling the MLP (gap, fine-tuned copy) and its learngene fit")
    u = dict(UNROLL, **({"finetune": 5, "max_examples": 64} if tiny else {}))
    x, y = ds.split("val")
    gap = unroll.gap(a, x, y, unit=u["unit"], max_examples=u["max_examples"])
    bars = unroll.compare(a, ds, TrainConfig(steps=u["finetune"], lr=1e-3, eval_every=u["finetune"]), unit=u["unit"],
                          callbacks=[TrainProgress(_monitor.part(monitor, 0.55, 0.1), payload=False)])
    r2 = learngene.fit(a).table() if len(a.blocks) >= 2 else None
    _monitor.check(monitor)
    monitor.report(0.65, "a sweep of d_model over two seeds")
    fixed = dict(SWEEP["fixed"], **({"steps": 2} if tiny else {}))
    sweep = sweeps.run(SWEEP["task"], SWEEP["grid"], seeds=SWEEP["seeds"], user=OWNER, **fixed)
    _monitor.check(monitor)
    monitor.report(0.72, "a width sweep and its power-law fit")
    s = dict(SCALING, **({"values": [4, 8, 16, 32, 64], "steps": 3, "n_starts": 2, "n_boot": 0} if tiny else {}))
    table = scaling.sweep(s["axis"], s["values"], dataset=s["dataset"], steps=s["steps"], seed=s["seed"],
                          monitor=_monitor.part(monitor, 0.72, 0.2))
    _monitor.check(monitor)
    xs, ys = table[s["x"]].to_numpy(float), table[s["y"]].to_numpy(float)
    n_heldout = min(s["n_heldout"], len(table) - 4)
    fit = scaling.fit(xs, ys, n_starts=s["n_starts"], n_boot=s["n_boot"], seed=s["seed"])
    ext = scaling.extrapolation(xs, ys, n_heldout=n_heldout, n_starts=s["n_starts"], n_boot=s["n_boot"],
                                seed=s["seed"]) if n_heldout > 0 else None
    stored = {
        "connectivity": analysis,
        "unroll": {"gap": gap, "compare": bars, "r2": r2, "name": _BY_ROLE["pair-a"].name},
        "sweeps": {"table": sweep, **{k: SWEEP[k] for k in ("task", "grid", "seeds", "fixed", "metric", "x")}},
        "scaling": {"table": table, "fit": fit, "extrapolation": ext, "x": s["x"], "y": s["y"],
                    "options": {k: s[k] for k in ("axis", "values", "dataset", "steps", "seed", "n_heldout",
                                                  "n_starts", "n_boot")}},
    }
    saver.save(runs[0], role="pair-a", stored=stored)
    saver.save(runs[1], role="pair-b")


def _rankings(run) -> dict:
    """The Depth lab's first analysis (layer rankings) of a growth stage, as its page computes it."""
    from ..core import data
    from ..studies import depthlab

    ds = data.from_spec(run.dataset)
    n = RANKINGS["n"]
    x, y = ds.x_val[:n], ds.y_val[:n]
    mask = (y != data.IGNORE) if ds.kind == "sequence" else None
    ranks = depthlab.rankings(run.model.eval(), x, y=y, mask=mask, skip=RANKINGS["skip"],
                              positions=RANKINGS["positions"])
    run.model.train()
    return {"depthlab": {"rankings": ranks.table, "correlation": ranks.correlation, "angular": ranks.angular,
                         "depth_score": ranks.depth_score, "kind": "rankings"}}


def _grow(saver, tiny: bool, monitor):
    """The k-hop Transformer grown by G_stack (1 block, stacked to 2), each stage saved with its rankings."""
    from ..core import recipes
    from ..experiments import grow

    r = recipes.KHOP
    steps = 10 if tiny else r.steps_per_stage
    stages = grow.preset("gstack", steps, start_layers=1, final_layers=2)
    train = {"batch_size": r.batch_size, "lr": r.lr, "eval_every": 5 if tiny else r.eval_every,
             "eval_max": 64 if tiny else r.eval_max}
    stage_saver = _Saver(saver.store, saver.saved, role_of=lambda run: f"grow-{run.meta['stage']}",
                         on_save=_rankings)
    grow.run("khop", dict(r.data_options), {**r.model_options(), "n_layers": 1}, train, stages,
             name="example khop G_stack", store=stage_saver, monitor=monitor)


def _collapse(saver, tiny: bool, monitor):
    from ..experiments import collapse

    c = dict(COLLAPSE, **({"epochs": 2, "every": 1, "max_samples": 64} if tiny else {}))
    out = collapse.run("digits", every=c["every"], max_samples=c["max_samples"], epochs=c["epochs"], monitor=monitor)
    saver.save(out["run"], role="collapse", stored={"collapse": {"head": out["head"], "mixup": out["mixup"]}})


def _compose(saver, tiny: bool, monitor):
    """A base and two specialists saved as the Compose page saves them, and its table of the default merges."""
    from ..core import data
    from ..experiments import compose

    trained = compose.train(("grammar", "arithmetic"), steps=5 if tiny else None,
                            monitor=_monitor.part(monitor, 0.0, 0.85))
    _monitor.check(monitor)
    if len(trained["specialists"]) < 2:
        raise _monitor.Stopped("stopped")
    base_run, specialists = trained["base"], trained["specialists"]
    members = {name: run.model for name, run in specialists.items()}
    domains = {name: data.from_spec(run.dataset) for name, run in specialists.items()}
    monitor.report(0.85, "the specialists merged and scored on both domains")
    chosen = ["logit mean", "ties"] if tiny else COMPOSE_MERGES
    out = compose.compose(members, domains, chosen, COMPOSE_OPTIONS, base=base_run.model,
                          monitor=_monitor.part(monitor, 0.85, 0.15))
    parts = base_run.dataset.get("parts", [])
    base_run.meta = {"role": "base", "group": "compose", "trained_on": parts}
    if parts:   # a loadable spec (the first domain), as the Compose page stores its base
        base_run.dataset = dict(parts[0])
    stored = {"compose": {"table": out["table"], "cosines": out["cosines"], "skipped": out["skipped"],
                          "unfit": out["unfit"], "members": list(members), "chosen": chosen}}
    base_id = saver.save(base_run, role="compose-base", stored=stored)
    for name, run in specialists.items():
        run.meta = {**run.meta, "parent": base_id, "group": "compose"}
        saver.save(run, role=f"compose-{name}")


def _grokking(saver, tiny: bool, monitor):
    from ..core.progress import TrainProgress
    from ..studies import grokking

    g = dict(GROK, **({"steps": 20, "eval_every": 10, "every": 10} if tiny else {}))
    run = grokking.run(grokking.GrokConfig(**g), callbacks=[TrainProgress(monitor, payload=False)])
    saver.save(run, role="grokking")


# (what, function, share of the time: measured on two cores)
_STEPS = (("the digits MLP pair, its barriers, a sweep and a scaling fit", _pair, 0.40),
          ("a k-hop Transformer grown by G_stack", _grow, 0.17),
          ("a digits collapse run", _collapse, 0.07),
          ("a base and two specialists to compose", _compose, 0.22),
          ("a grokking run", _grokking, 0.14))


class _Step(_monitor.Context):
    """One step of the set: its share of the progress bar, its messages prefixed with what it makes."""

    def __init__(self, monitor, start: float, span: float, label: str):
        self.inner = _monitor.part(monitor, start, span)
        super().__init__(self.inner.threads, 0.0)
        self.label = label

    @property
    def stopped(self) -> bool:
        return self.inner.stopped

    def report(self, progress=None, message: str = "", payload=None, *, force: bool = False) -> bool:
        text = f"example runs: {self.label}" + (f" ({message})" if message else "")
        return self.inner.report(progress, text, None, force=force)

    def take_steps(self, n: int = 1) -> bool:
        return self.inner.take_steps(n)

    def call(self, service: str, *args):
        return self.inner.call(service, *args)


def _delete_examples(store) -> list[str]:
    """Delete every example run (owner :data:`OWNER` and the example mark in its ``run.json``); nothing else."""
    from ..io.store import StoreError

    deleted = []
    try:
        listed = store.list()
    except StoreError:
        listed = None
    ids = list(listed[listed["owner"] == OWNER]["run_id"]) if listed is not None and len(listed) else []
    for run_id in ids:
        try:
            if is_example(store.read_json(run_id)):
                store.delete(run_id)
                deleted.append(run_id)
        except StoreError:
            continue
    return deleted


def _make_locked(store, tiny: bool, monitor) -> list[str]:
    _delete_examples(store)   # a partial set of a start that was killed
    saved: list[str] = []
    saver = _Saver(store, saved)
    t0 = time.perf_counter()
    done = 0.0
    try:
        for what, fn, share in _STEPS:
            step = _Step(monitor, done, share, what)
            step.report(0.0, force=True)
            fn(saver, tiny, step)
            _monitor.check(monitor)
            done += share
    except BaseException:
        for run_id in saved:   # a stopped or failed set is not left half-made
            try:
                store.delete(run_id)
            except Exception:  # noqa: BLE001 -- best effort; the next start removes leftovers too
                pass
        raise
    seconds = time.perf_counter() - t0
    _write_state(store, {"state": "ready", "set": SET, "run_ids": saved, "seconds": round(seconds, 1),
                         "made": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                         "tiny": bool(tiny)})
    monitor.report(1.0, f"the example runs are ready ({len(saved)} runs, {seconds:.0f} s)", force=True)
    return saved


def _locked(store):
    from ..io.store.index import _file_lock

    return _file_lock(Path(_root(store)) / LOCK_FILE, exclusive=True, timeout=LOCK_WAIT, what="the example runs")


def make(store=None, *, tiny: bool = False, monitor=None) -> list[str]:
    """Make the starter set unless it was made (or removed) before; returns the example run ids stored.

    Safe to call from several processes at once: one makes the set, the others wait for it (up to
    :data:`LOCK_WAIT` s). ``tiny=True``: a few steps of each (tests, a quick look; the figures are then
    not meaningful). ``monitor``: progress, and Stop (the runs made so far are deleted again).
    """
    store = _store(store)
    checks.check_bool("tiny", tiny)
    monitor = _monitor.resolve(monitor)
    if _read_state(store) is None:
        with _locked(store):
            if _read_state(store) is None:   # the first of two starts made it while we waited
                _make_locked(store, tiny, monitor)
    return status(store)["run_ids"]


def restore(store=None, *, tiny: bool = False, monitor=None) -> list[str]:
    """Make the starter set again (after :func:`remove`, or to replace a damaged one); returns the new ids.
    Only example runs are deleted first; a user's runs are never touched."""
    store = _store(store)
    checks.check_bool("tiny", tiny)
    monitor = _monitor.resolve(monitor)
    with _locked(store):
        return _make_locked(store, tiny, monitor)


def remove(store=None) -> list[str]:
    """Delete the example runs (only those) and keep them away until :func:`restore`; returns the ids deleted."""
    store = _store(store)
    with _locked(store):
        deleted = _delete_examples(store)
        _write_state(store, {"state": "removed", "set": SET, "run_ids": [],
                             "removed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    return deleted


# ============================================================================ as a job of the server's queue

_JOBS: dict[str, Any] = {}      # store root -> the job making, restoring or removing its examples
_JOBS_LOCK = threading.Lock()


def running(store=None):
    """The job of this process that is making, restoring or removing ``store``'s examples, or None. Cheap
    (no store is opened): the dashboard's sessions ask it for their progress bar."""
    root = _root(store)
    with _JOBS_LOCK:
        job = _JOBS.get(root)
    return job if job is not None and not job.done else None


def _job(action: str, root: str, tiny: bool):
    from ..io.store import RunStore

    store = RunStore(root)
    if action == "remove":
        return remove(store)
    return (restore if action == "restore" else make)(store, tiny=tiny)


def start(store=None, queue=None, *, action: str = "make", tiny: bool = False):
    """Submit ``action`` (``"make"``: the first start's set, ``"restore"`` or ``"remove"``) on ``store``'s
    examples as a job of ``queue`` (``apps/app_hooks.py`` passes the server's; None: a queue of its own);
    returns the Job, or None when there is nothing to do
    (``"make"`` on a store whose set was made or removed, or with ``WORKBENCH_EXAMPLES=0``) or a job on
    this store is already running. The job runs on this process's threads (it writes the server's store)."""
    checks.check_choice("action", action, ("make", "restore", "remove"))
    if action == "make" and (not enabled() or _read_state(store) is not None):
        return None
    if queue is None:
        from . import jobs

        queue = jobs.JobQueue(threads=None, executor="threads")
    root = _root(store)
    with _JOBS_LOCK:
        job = _JOBS.get(root)
        if job is not None and not job.done:
            return None
        name = {"make": "starter examples", "restore": "restore the examples", "remove": "remove the examples"}[action]
        job = queue.submit(_job, action, root, tiny, user=OWNER, name=name, local=True)
        _JOBS[root] = job
    return job
