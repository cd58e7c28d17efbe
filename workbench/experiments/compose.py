"""Compose: a base trained on pooled corpora, one specialist per corpus fine-tuned from it, then the
specialists merged (logit mixtures and weight-space merges) and every model scored on every domain.

One pipeline for the Compose page (its two jobs and "As code" box) and notebooks 05 and 10:
:func:`train` is "base on pooled corpora, then specialists" with :data:`workbench.recipes.COMPOSE`'s
sizes; :func:`compose` builds the chosen merges and evaluates them.

>>> trained = wb.experiments.compose.train(["grammar", "arithmetic"], steps=100)
>>> members = {name: r.model for name, r in trained["specialists"].items()}
"""
from __future__ import annotations

import dataclasses

import pandas as pd

from ..core import checks, recipes
from ..core import monitor as _monitor
from ..core.progress import TrainProgress
from . import _shared

__all__ = ["train", "compose", "as_code", "MIXTURES", "MERGE_NAMES", "WEIGHT_SPACE", "SLERP_TS", "EMBEDDINGS"]

EMBEDDINGS = ("frozen-random", "glyph")   # the substrates a base can be built on
# The mixtures (LogitMixture modes) as code; the weight-space merges are the engine's registry
# (compose.MERGES), each with the options of its own that a choice passes on.
MIXTURES = {
    "logit mean": "wb.compose.LogitMixture(ms)",
    "probability mixture": "wb.compose.LogitMixture(ms, mode='probs')",
    "gated mixture": "wb.compose.LogitMixture(ms).fit_gate(domains, steps=150)",
}
MERGE_OPTIONS = {"task_arithmetic": ("scale",), "ties": ("density", "scale"), "lines": ("beta",),
                 "dare": ("density", "scale"), "dare_ties": ("density", "scale"), "slerp": ("t",),
                 "opcm": ("alpha",)}
SLERP_TS = [0.0, 0.25, 0.5, 0.75, 1.0]   # the t sweep drawn when SLERP is chosen


def _weight_space() -> dict:
    from .. import compose as _compose

    return {method.replace("_", " "): method for method in _compose.MERGES}   # label -> compose.merge method


WEIGHT_SPACE = _weight_space()
MERGE_NAMES = list(MIXTURES) + list(WEIGHT_SPACE)

CODE = """import workbench as wb
from workbench import sampling
from workbench.figures.compose import domain_heatmap
domains = wb.compose.shared_text({corpora!r}, context={context}, corpus_chars={corpus_chars}, seed={seed})
cfg = wb.models.config_for(domains[{first!r}], d_model={d_model}, n_layers={n_layers}, n_heads={n_heads}, d_mlp={d_mlp},
                           embedding={embedding!r}, seed={seed})
base = wb.models.build(cfg)
tc = wb.TrainConfig({base_train})
wb.train(base, wb.compose.concat(domains), tc)
runs = wb.compose.train_specialists(base, domains, wb.TrainConfig({specialist_train}))
members = {{name: run.model for name, run in runs.items()}}
ms = list(members.values())
merges = {{
{merges}}}
table = wb.compose.evaluate(members, merges, domains, max_examples=512, references={{"base": base}})
domain_heatmap(table, "loss")
sampling.sample_text(ms[0], cfg.vocab, prompt="The ", n_chars=200, seed=0)"""


def _options_of(label: str, options: dict) -> dict:
    return {k: options[k] for k in MERGE_OPTIONS.get(WEIGHT_SPACE.get(label, ""), ())}


def merge_code(label: str, options: dict) -> str:
    """The engine call behind a merge choice, as code (``ms``: the specialists, ``base``: their parent)."""
    if label in MIXTURES:
        return MIXTURES[label]
    extra = "".join(f", {k}={v!r}" for k, v in _options_of(label, options).items())
    return f"wb.compose.merge({WEIGHT_SPACE[label]!r}, base, ms{extra})"


def train(corpora=("grammar", "arithmetic"), *, steps: int | None = None, n_layers: int | None = None,
          embedding: str = "frozen-random", seed: int = 0, monitor=None) -> dict:
    """A base on the pooled ``corpora`` (:func:`workbench.compose.shared_text`, one vocabulary and substrate),
    then one specialist per corpus fine-tuned from it; sizes and rates of :data:`workbench.recipes.COMPOSE`
    (``steps`` per stage and ``n_layers`` override it). Returns ``{"base": Run, "specialists": {corpus: Run}}``.

    ``monitor``: the stages' steps as progress; Stop ends the stage in progress and trains no more
    specialists (those finished are returned).
    """
    from .. import compose as _compose
    from ..core import models
    from ..core.training import train as _train

    r = recipes.COMPOSE
    corpora = list(corpora)
    checks.check_choice("embedding", embedding, EMBEDDINGS)
    seed = checks.check_seed("seed", seed)
    monitor = _monitor.resolve(monitor)
    domains = _compose.shared_text(corpora, context=r.context, corpus_chars=r.corpus_chars, seed=seed)
    config = models.config_for(domains[corpora[0]], **r.model_options(**({} if n_layers is None else
                                                                           {"n_layers": n_layers})),
                               embedding=embedding, seed=seed)
    base = models.build(config)
    tc = r.train_config(steps, seed=seed)
    stages = 1 + len(domains)

    def progress(i: int, label: str) -> TrainProgress:
        return TrainProgress(_monitor.part(monitor, i / stages, 1 / stages), label=f"{label}: step", payload=False)

    base_run = _train(base, _compose.concat(domains), tc, callbacks=[progress(0, "base")], name="compose-base")
    specialists = {}
    if not monitor.stopped:
        ft = dataclasses.replace(tc, lr=r.specialist_lr)
        for i, (name, ds) in enumerate(domains.items()):
            specialists.update(_compose.train_specialists(base, {name: ds}, ft, callbacks=[progress(i + 1, name)]))
            if monitor.stopped:
                break
    monitor.report(1.0, f"done: base and {len(specialists)} specialists", force=True)
    return {"base": base_run, "specialists": specialists}


def compose(members: dict, domains: dict, chosen, options: dict | None = None, *, base=None, monitor=None) -> dict:
    """The ``chosen`` merges (labels of :data:`MERGE_NAMES`) of ``members`` (``{domain: model}``, over one
    substrate), each scored on every domain of ``domains`` (``{domain: Dataset}``).

    ``options``: the merges' knobs (``density``, ``scale``, ``beta``, ``t``, ``alpha``); ``base``: the
    specialists' parent, needed by the weight-space merges (skipped without it). With SLERP chosen (two
    specialists) ``t`` is swept (:data:`SLERP_TS`); with OPCM the specialists are merged one at a time.
    Returns ``{"table", "merges", "skipped", "unfit", "cosines", "sweep", "sequence"}``.
    """
    from .. import compose as _compose

    monitor = _monitor.resolve(monitor)
    options = dict(options or {})
    ms = list(members.values())
    _compose.check_substrate(ms)
    monitor.report(0.2, "building merges")
    skipped, unfit, merges = [], [], {}
    for m in chosen:
        if m in WEIGHT_SPACE and base is None:
            skipped.append(m)
            continue
        if (m == "slerp" and len(ms) != 2) or (m == "model stock" and len(ms) < 2):
            unfit.append(m)
            continue
        if m == "logit mean":
            merges[m] = _compose.LogitMixture(ms)
        elif m == "probability mixture":
            merges[m] = _compose.LogitMixture(ms, mode="probs")
        elif m == "gated mixture":
            merges[m] = _compose.LogitMixture(ms).fit_gate(domains, steps=150)
        else:
            merges[m] = _compose.merge(WEIGHT_SPACE[m], base, ms, **_options_of(m, options))
    _monitor.check(monitor)
    monitor.report(0.5, "evaluating")
    refs = {"base": base} if base is not None else None
    table = _compose.evaluate(members, merges, domains, max_examples=512, references=refs)
    cosines = _compose.task_cosines(base, members) if base is not None else None
    sweep = sequence = None
    if "slerp" in merges:
        monitor.report(0.7, "sweeping SLERP's t")
        sweep = _compose.sweep("slerp", base, ms, domains, "t", SLERP_TS, max_examples=256)
    if "opcm" in merges:
        monitor.report(0.85, "merging the specialists one at a time")
        sequence = pd.concat([_compose.sequential(base, members, m, datasets=domains, max_examples=256,
                                                  alpha=options.get("alpha", 0.5))[1] for m in _compose.SEQUENTIAL],
                             ignore_index=True)
    monitor.report(1.0, f"done: {len(members) + len(merges)} models x {len(domains)} domains", force=True)
    return {"table": table, "merges": merges, "skipped": skipped, "unfit": unfit, "cosines": cosines,
            "sweep": sweep, "sequence": sequence}


def _compose_code(specialist_ids: list[str], names: list[str], base_id: str | None, chosen: list[str],
                  options: dict) -> str:
    lines = ["import workbench as wb", "from workbench.figures.compose import domain_heatmap",
             "store = wb.RunStore()", f"runs = [store.load(i) for i in {list(specialist_ids)!r}]",
             f"names = {list(names)!r}",
             "members = {n: r.model for n, r in zip(names, runs)}",
             "domains = {n: wb.data.from_spec(r.dataset) for n, r in zip(names, runs)}",
             "ms = list(members.values())"]
    weight_space = [m for m in chosen if m in WEIGHT_SPACE]
    if weight_space:
        lines.append(f"base = store.load({base_id!r}).model")
    lines.append("merges = {")
    lines += [f"    {m!r}: {merge_code(m, options)}," for m in chosen]
    lines.append("}")
    refs = ", references={'base': base}" if weight_space else ""
    lines += [f"table = wb.compose.evaluate(members, merges, domains, max_examples=512{refs})",
              "wb.compose.summary(table)", "domain_heatmap(table, 'loss')"]
    if weight_space:
        lines += ["cosines = wb.compose.task_cosines(base, members)"]
    if "slerp" in chosen:
        lines += [f"sweep = wb.compose.sweep('slerp', base, ms, domains, 't', {SLERP_TS!r}, max_examples=256)"]
    if "opcm" in chosen:
        lines += ["import pandas as pd",
                  "sequence = pd.concat([wb.compose.sequential(base, members, m, datasets=domains, max_examples=256, "
                  f"alpha={options.get('alpha', 0.5)!r})[1] for m in wb.compose.SEQUENTIAL], ignore_index=True)"]
    return "\n".join(lines)


def as_code(*, specialist_ids=None, names=None, base_id: str | None = None, chosen=(), options: dict | None = None,
            corpora=("grammar", "arithmetic"), steps: int | None = None, n_layers: int | None = None,
            embedding: str = "frozen-random", seed: int = 0) -> str:
    """The notebook code of :func:`compose` on stored runs (``specialist_ids`` and their domain ``names``,
    ``base_id``: the merges that were built), or, without runs, of :func:`train` followed by the ``chosen``
    merges (``corpora``, ``steps``, ``n_layers``, ``embedding``, ``seed``)."""
    options = dict(options or {})
    if specialist_ids:
        return _compose_code(list(specialist_ids), list(names or []), base_id, list(chosen), options)
    r = recipes.COMPOSE
    corpora = list(corpora)
    steps = r.steps if steps is None else steps
    base_train = dataclasses.asdict(r.train_config(steps, seed=seed))
    shown = ("steps", "batch_size", "lr", "eval_every", "eval_max", "seed")
    merges = "".join(f"    {m!r}: {merge_code(m, options)},\n" for m in chosen)
    return CODE.format(corpora=corpora, first=corpora[0], context=r.context, corpus_chars=r.corpus_chars,
                       seed=seed, **r.model_options(**({} if n_layers is None else {"n_layers": n_layers})),
                       embedding=embedding, merges=merges,
                       base_train=_shared.kwargs({k: base_train[k] for k in shown}),
                       specialist_train=_shared.kwargs({k: (r.specialist_lr if k == "lr" else base_train[k])
                                                        for k in shown}))
