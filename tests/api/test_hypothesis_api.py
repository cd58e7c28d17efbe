"""Property tests over the public functions' arguments (issue 10): clear errors, no silent coercion.

Every case varies one argument of one public call (the others fixed to good values) over a wide
mix of values: integers of every size, floats (NaN, inf, 2.0), bools, None, strings, complex
numbers, numpy scalars, lists. Each argument is declared with its kind and range (:class:`Int`,
:class:`Float`, :class:`Bool`, :class:`Choice`), which is the oracle. The model and training configs'
fields and the data options are not declared here: their declarations are generated from the bounds
the engine declares next to each field (:func:`workbench.checks.constraints`,
:func:`workbench.data.option_constraints`), as scikit-learn's ``check_param_validation`` does, so the
test checks that ``validate()`` and ``load()`` enforce exactly what they declare:

- a value outside the declaration (wrong type, a bool or float where an integer is asked, a value
  out of range) must raise ``ValueError`` whose message names the argument -- accepting it would
  be a silent coercion;
- a value inside it must succeed (``strict``, the analysis modules) or, for the config and data
  modules whose options constrain one another (``strict=False``), succeed or raise ``ValueError``
  naming the argument or a related one (e.g. the memory budget);
- nothing else may escape (no TypeError, IndexError or RuntimeError from deep inside torch).

Models and data are tiny and built once per module; the cases are counted and the total
(>= 1000) is checked and printed by the last test.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import math
import numbers
import re

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench import checks, collapse, compose, data, flops, growth, hooks, lmc, permute, residual, sampling

CASES: collections.Counter = collections.Counter()
EXAMPLES = 20          # hypothesis examples per argument
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- argument declarations


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


@dataclasses.dataclass
class Int:
    lo: int | None = None
    hi: int | None = None
    none: bool = False          # None is a valid value
    cheap: int | None = None    # valid values above this are not drawn (they would make the call slow)

    def valid(self, v) -> bool:
        if v is None:
            return self.none
        return (isinstance(v, numbers.Integral) and not _is_bool(v) and (self.lo is None or v >= self.lo)
                and (self.hi is None or v <= self.hi))

    def drawn(self):
        lo = -5 if self.lo is None else self.lo
        edges = [lo - 1, lo, lo + 1] + ([] if self.hi is None else [self.hi, self.hi + 1])
        return st.one_of(st.integers(lo, lo + 4), st.sampled_from(edges), st.floats(lo, lo + 4),
                         st.sampled_from([float(lo), float(lo + 1)]), st.builds(np.int64, st.integers(lo, lo + 3)))

    def expensive(self, v) -> bool:
        return self.valid(v) and v is not None and self.cheap is not None and v > self.cheap


@dataclasses.dataclass
class Float:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    none: bool = False
    hi_open: bool = False

    def valid(self, v) -> bool:
        if v is None:
            return self.none
        if not isinstance(v, numbers.Real) or _is_bool(v) or not math.isfinite(v):
            return False
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def drawn(self):
        lo = -3.0 if self.lo is None else self.lo
        hi = 3.0 if self.hi is None else self.hi
        return st.one_of(st.floats(lo, hi), st.sampled_from([lo, hi, lo - 1e-9, hi + 1e-9, hi + 1]),
                         st.builds(np.float64, st.floats(lo, hi)))

    def expensive(self, v) -> bool:
        return False


@dataclasses.dataclass
class Bool:
    def valid(self, v) -> bool:
        return v is True or v is False

    def drawn(self):
        return st.sampled_from([True, False, 0, 1, "no", "True", np.bool_(True)])

    def expensive(self, v) -> bool:
        return False


@dataclasses.dataclass
class Choice:
    values: tuple
    none: bool = False

    def valid(self, v) -> bool:
        if v is None:
            return self.none
        return isinstance(v, str) and v in self.values

    def drawn(self):
        return st.one_of(st.sampled_from(list(self.values)),
                         st.sampled_from([v.upper() for v in self.values] + [v + " " for v in self.values]))

    def expensive(self, v) -> bool:
        return False


WILD = st.one_of(
    st.integers(-3, 12), st.integers(-(2**70), 2**70), st.sampled_from([2**32 - 1, 2**32, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, float("nan")]),
    st.booleans(), st.none(), st.text(max_size=4), st.sampled_from(["1", "no", "True", "top"]),
    st.complex_numbers(max_magnitude=4, allow_nan=False), st.sampled_from([[1], [], (2,), {"a": 1}]),
    st.builds(np.int64, st.integers(-3, 12)), st.builds(np.float64, st.floats(-3, 12)),
    st.builds(np.bool_, st.booleans()),
)


def values(spec):
    return st.one_of(WILD, spec.drawn()).filter(lambda v: not spec.expensive(v))


def declared(constraint, none: bool = False):
    """The oracle's declaration of a bound the engine declares (an ``Interval``, ``OneOf`` or ``Flag`` of
    :mod:`workbench.checks`): values in and out of range are drawn from the engine's own declaration."""
    if isinstance(constraint, checks.Interval):
        if constraint.kind is int:
            return Int(constraint.lo, constraint.hi, none=none)
        return Float(constraint.lo, constraint.hi, lo_open=constraint.lo_open, hi_open=constraint.hi_open, none=none)
    if isinstance(constraint, checks.OneOf):
        return Choice(tuple(constraint.values), none=none)
    assert isinstance(constraint, checks.Flag), constraint
    return Bool()


# ----------------------------------------------------------------------------- the oracle


def _names(message: str, name: str) -> bool:
    """``name`` appears in ``message`` as a word of its own (``n`` is not named by "an integer")."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) is not None


def check_case(call, name: str, spec, value, strict: bool = True, also: tuple = ()) -> None:
    """Run ``call(value)`` and judge the outcome against ``spec`` (see the module docstring)."""
    ok = spec.valid(value)
    try:
        call(value)
    except ValueError as e:
        msg = str(e)
        if not ok:
            assert _names(msg, name), f"{name}={value!r}: the message does not name {name!r}: {msg}"
            return
        if strict:
            raise AssertionError(f"{name}={value!r} is valid but was refused: {msg}") from e
        assert any(_names(msg, n) for n in (name,) + also), f"{name}={value!r}: unclear refusal: {msg}"
        return
    except Exception as e:  # anything else escaping is a defect
        raise AssertionError(f"{name}={value!r} raised {type(e).__name__} instead of ValueError: {e}") from e
    assert ok, f"{name}={value!r} is invalid but was accepted (silent coercion)"


# ----------------------------------------------------------------------------- tiny models and data, built once

_W: dict = {}


def W() -> dict:
    if _W:
        return _W
    digits = data.load("digits")
    digits = dataclasses.replace(digits, x_train=digits.x_train[:40], y_train=digits.y_train[:40],
                                 x_val=digits.x_val[:20], y_val=digits.y_val[:20])
    khop = data.load("khop", n_train=20, n_val=10, nodes=4, queries=1, hops=1)
    mcfg = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, n_layers=2, d_hidden=8)
    tcfg = wb.models.TransformerConfig(vocab_size=khop.vocab_size, context=khop.seq_len, d_model=8, n_layers=2,
                                       n_heads=2, d_mlp=8)
    mlp_a, mlp_b, mlp_c = (wb.models.build(dataclasses.replace(mcfg, seed=s)).eval() for s in (0, 1, 2))
    tr_a, tr_b = (wb.models.build(dataclasses.replace(tcfg, seed=s)).eval() for s in (0, 1))
    tr_ft = copy.deepcopy(tr_a)                 # "fine-tuned" from tr_a: same init, moved weights
    with torch.no_grad():
        for p in tr_ft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    x_tok = khop.x_val[:3]
    g = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    h = torch.randn(12, 5, generator=g, dtype=torch.float64) + 4.0 * torch.nn.functional.one_hot(y, 5).double()
    curve = lmc.curve(mlp_a, mlp_b, digits, n_alphas=3, splits=("val",), max_examples=8)
    metrics = pd.DataFrame({"step": [0, 1], "split": ["val", "val"], "metric": ["loss", "loss"],
                            "value": [2.0, 1.0], "flops": [0.0, 10.0]})
    _W.update(digits=digits, khop=khop, mlp_a=mlp_a, mlp_b=mlp_b, mlp_c=mlp_c, tr_a=tr_a, tr_b=tr_b, tr_ft=tr_ft,
              x_tok=x_tok, h=h, y=y, barriers=lmc.barrier(curve), metrics=metrics, mcfg=mcfg, tcfg=tcfg)
    return _W


# ----------------------------------------------------------------------------- the targets
# (id, argument name, declaration, call(value), strict, related names accepted in a refusal of a valid value)

SEED = Int(0, 2**32 - 1)
SPLIT = Choice(("train", "val"))


def _residual():
    return [
        ("contributions.batch_size", "batch_size", Int(1, none=True),
         lambda v: residual.contributions(W()["tr_a"], W()["x_tok"], batch_size=v)),
        ("contributions.per_position", "per_position", Bool(),
         lambda v: residual.contributions(W()["mlp_a"], W()["digits"].x_val[:4], per_position=v)),
        ("logit_lens.batch_size", "batch_size", Int(1, none=True),
         lambda v: residual.logit_lens(W()["tr_a"], W()["x_tok"], batch_size=v)),
        ("logit_lens.per_position", "per_position", Bool(),
         lambda v: residual.logit_lens(W()["tr_a"], W()["x_tok"], per_position=v)),
        ("skip_effects.batch_size", "batch_size", Int(1, none=True),
         lambda v: residual.skip_effects(W()["mlp_a"], W()["digits"].x_val[:4], batch_size=v)),
        ("decompose.per_head", "per_head", Bool(), lambda v: residual.decompose(W()["tr_a"], W()["x_tok"], per_head=v)),
        ("logit_attribution.target", "target", Int(0, W()["khop"].vocab_size - 1, none=True),
         lambda v: residual.logit_attribution(W()["tr_a"], W()["x_tok"], target=v)),
        ("adapter.skip.layer", "layer", Int(0, 1),
         lambda v: hooks.adapter(W()["tr_a"]).skip(v).__enter__()),
        ("skip_effects.reduce", "reduce", Choice(("mean", "max")),
         lambda v: residual.skip_effects(W()["tr_a"], W()["x_tok"], reduce=v)),
        ("skip_effects.from_position", "from_position", Int(1, W()["khop"].seq_len - 1, none=True),
         lambda v: residual.skip_effects(W()["tr_a"], W()["x_tok"], from_position=v)),
        ("integrated_gradients.steps", "steps", Int(1, 1024, cheap=3),
         lambda v: residual.integrated_gradients(W()["tr_a"], W()["x_tok"][:1], steps=v)),
        ("patch.site", "site", Choice(("resid_pre", "attn_out", "mlp_out")),
         lambda v: residual.patch(W()["tr_a"], W()["x_tok"][:1], W()["x_tok"][1:2], site=v)),
        ("erase.layer", "layer", Int(0, 1), lambda v: residual.erase(W()["tr_a"], W()["x_tok"], v, 0)),
    ]


def _lmc():
    def d():
        return W()["digits"]

    def a():
        return W()["mlp_a"]

    def b():
        return W()["mlp_b"]

    def c():
        return W()["mlp_c"]
    return [
        ("curve.n_alphas", "n_alphas", Int(2, 1001, cheap=4),
         lambda v: lmc.curve(a(), b(), d(), n_alphas=v, splits=("val",), max_examples=8)),
        ("curve.max_examples", "max_examples", Int(0),
         lambda v: lmc.curve(a(), b(), d(), n_alphas=2, splits=("val",), max_examples=v)),
        ("interpolate.alpha", "alpha", Float(), lambda v: lmc.interpolate(a(), b(), v)),
        ("plane.resolution", "resolution", Int(2, 101, cheap=3),
         lambda v: lmc.plane(a(), b(), c(), d(), resolution=v, max_examples=8)),
        ("plane.margin", "margin", Float(0.0, 10.0),
         lambda v: lmc.plane(a(), b(), c(), d(), resolution=2, margin=v, max_examples=8)),
        ("layerwise.n_alphas", "n_alphas", Int(2, 1001, cheap=3),
         lambda v: lmc.layerwise(a(), b(), d(), n_alphas=v, max_examples=8)),
        ("layerwise.split", "split", SPLIT, lambda v: lmc.layerwise(a(), b(), d(), n_alphas=2, split=v, max_examples=8)),
        ("align.method", "method", Choice(("weights", "activations")),
         lambda v: lmc.align(a(), b(), method=v, data=d(), max_iter=2, max_examples=16)),
        ("align.seed", "seed", SEED, lambda v: lmc.align(a(), b(), seed=v, max_iter=2)),
        ("align.max_iter", "max_iter", Int(1, 10_000, cheap=3), lambda v: lmc.align(a(), b(), max_iter=v)),
        ("repair.alpha", "alpha", Float(0.0, 1.0), lambda v: lmc.repair(a(), b(), v, d(), max_examples=16)),
        ("repair.eps", "eps", Float(0.0, 1.0, lo_open=True),
         lambda v: lmc.repair(a(), b(), 0.5, d(), max_examples=16, eps=v)),
        ("barrier_value.metric", "metric", Choice(("loss", "error")),
         lambda v: lmc.barrier_value(W()["barriers"], "val", metric=v)),
        ("barrier_value.definition", "definition", Choice(("endpoint_mean", "linear")),
         lambda v: lmc.barrier_value(W()["barriers"], "val", definition=v)),
        ("fuse.method", "method", Choice(("vanilla", "emd", "sinkhorn")),
         lambda v: lmc.fuse(a(), b(), method=v, ground="weights")),
        ("fuse.reg", "reg", Float(1e-4, 10.0), lambda v: lmc.fuse(a(), b(), method="sinkhorn", reg=v, ground="weights")),
        ("fuse.ground", "ground", Choice(("activations", "weights")),
         lambda v: lmc.fuse(a(), b(), ground=v, data=d(), max_examples=16)),
        ("layerwise.mode", "mode", Choice(("single", "cumulative")),
         lambda v: lmc.layerwise(a(), b(), d(), n_alphas=2, mode=v, max_examples=8)),
        ("layerwise.base", "base", Choice(("both", "a", "b")),
         lambda v: lmc.layerwise(a(), b(), d(), n_alphas=2, base=v, max_examples=8)),
    ]


def _collapse():
    h, y = (lambda: W()["h"]), (lambda: W()["y"])
    return [
        ("metrics.min_count", "min_count", Int(2, none=True, cheap=4), lambda v: collapse.metrics(h(), y(), min_count=v)),
        ("metrics.n_classes", "n_classes", Int(3, 100_000, none=True, cheap=3),   # the data has 3 classes
         lambda v: collapse.metrics(h(), y(), n_classes=v)),
        ("metrics.global_mean", "global_mean", Choice(("classes", "samples")),
         lambda v: collapse.metrics(h(), y(), global_mean=v)),
        ("metrics.within", "within", Choice(("samples", "classes")), lambda v: collapse.metrics(h(), y(), within=v)),
        ("metrics.divide_by_classes", "divide_by_classes", Bool(),
         lambda v: collapse.metrics(h(), y(), divide_by_classes=v)),
        ("simplex_etf.n_classes", "n_classes", Int(2, 100_000, cheap=16), lambda v: collapse.simplex_etf(v, 16)),
        ("simplex_etf.dim", "dim", Int(3, (1 << 26) // 3, cheap=64), lambda v: collapse.simplex_etf(3, v)),
        ("simplex_etf.seed", "seed", SEED, lambda v: collapse.simplex_etf(3, 4, seed=v)),
        ("simplex_view.n_components", "n_components", Int(1, 4), lambda v: collapse.simplex_view(W()["h"][:4], v)),
        ("imbalanced_counts.minority_ratio", "minority_ratio", Float(0.0, 1.0, lo_open=True),
         lambda v: collapse.imbalanced_counts([10, 10, 10], v, 1)),
        ("imbalanced_counts.n_minority", "n_minority", Int(0, 2), lambda v: collapse.imbalanced_counts([10, 10, 10], 0.5, v)),
        ("track.every", "every", Int(1, 1_000_000), lambda v: collapse.track(every=v)),
        ("track.max_samples", "max_samples", Int(2, 1_000_000), lambda v: collapse.track(max_samples=v)),
        ("track.seed", "seed", SEED, lambda v: collapse.track(seed=v)),
        ("track.layers", "layers", Bool(), lambda v: collapse.track(layers=v)),
        ("MixupLoss.alpha", "alpha", Float(0.0, 100.0, lo_open=True), lambda v: collapse.MixupLoss(v)),
        ("collect.batch_size", "batch_size", Int(1),
         lambda v: collapse.collect(W()["mlp_a"], W()["digits"].x_val[:5], W()["digits"].y_val[:5], batch_size=v)),
    ]


def _compose():
    base, ft = (lambda: W()["tr_a"]), (lambda: W()["tr_ft"])
    return [
        ("ties.density", "density", Float(0.0, 1.0, lo_open=True), lambda v: compose.ties(base(), [ft()], density=v)),
        ("ties.scale", "scale", Float(-100.0, 100.0), lambda v: compose.ties(base(), [ft()], scale=v)),
        ("task_arithmetic.scale", "scale", Float(-100.0, 100.0), lambda v: compose.task_arithmetic(base(), [ft()], v)),
        ("lines.alpha", "alpha", Float(-100.0, 100.0, none=True), lambda v: compose.lines(base(), [ft()], alpha=v)),
        ("lines.beta", "beta", Float(-100.0, 100.0), lambda v: compose.lines(base(), [ft()], beta=v)),
        ("lines.merged", "merged", Choice(("task_arithmetic", "ties")), lambda v: compose.lines(base(), [ft()], merged=v)),
        ("merge.method", "method", Choice(tuple(m for m in compose.MERGES if m != "slerp")),
         lambda v: compose.merge(v, base(), [ft()])),
        ("dare.density", "density", Float(0.0, 1.0, lo_open=True), lambda v: compose.dare(base(), [ft()], density=v)),
        ("dare.rescale", "rescale", Choice(("density", "l1", "none")),
         lambda v: compose.dare(base(), [ft()], rescale=v)),
        ("slerp.t", "t", Float(0.0, 1.0), lambda v: compose.slerp(None, [base(), ft()], t=v)),
        ("LogitMixture.mode", "mode", Choice(("logits", "probs")), lambda v: compose.LogitMixture([base(), ft()], mode=v)),
        ("evaluate.split", "split", SPLIT,
         lambda v: compose.evaluate({"a": base()}, datasets={"k": W()["khop"]}, split=v, max_examples=4)),
        ("evaluate.max_examples", "max_examples", Int(0),
         lambda v: compose.evaluate({"a": base()}, datasets={"k": W()["khop"]}, max_examples=v)),
    ]


def _growth():
    m = lambda: copy.deepcopy(W()["mlp_a"])  # noqa: E731  (growth operators change the model in place)
    return [
        ("add_layer.init", "init", Choice(growth.INITS), lambda v: growth.add_layer(m(), init=v)),
        ("add_layer.fade_steps", "fade_steps", Int(1, 10_000_000), lambda v: growth.add_layer(m(), "fade", fade_steps=v)),
        ("add_layer.seed", "seed", Int(0, 2**32 - 1, none=True), lambda v: growth.add_layer(m(), "random", seed=v)),
        ("stack.factor", "factor", Int(1, 128, cheap=3), lambda v: growth.stack(m(), v)),
        ("widen.factor", "factor", Float(1.0, 64.0, lo_open=True), lambda v: growth.widen(m(), 0, factor=v)),
        ("widen.init", "init", Choice(("zero", "copy", "orthogonal")), lambda v: growth.widen(m(), 0, init=v)),
        ("freeze.below", "below", Int(0, 2), lambda v: growth.freeze(m(), below=v)),
        ("freeze.embed", "embed", Bool(), lambda v: growth.freeze(m(), below=1, embed=v)),
        ("preset.steps", "steps", Int(1, 10_000_000), lambda v: growth.preset("layerwise", v)),
        ("preset.final_layers", "final_layers", Int(1, 256), lambda v: growth.preset("layerwise", final_layers=v)),
        ("preset.freeze_lower", "freeze_lower", Bool(), lambda v: growth.preset("layerwise", freeze_lower=v)),
        ("check_schedule.steps", "steps", Int(1, 10_000_000),
         lambda v: growth.check_schedule([{"op": "train", "steps": v}], 2)),
        ("check_schedule.lr", "lr", Float(0.0, 10.0, lo_open=True, none=True),
         lambda v: growth.check_schedule([{"op": "train", "steps": 5, "lr": v}], 2)),
        ("check_schedule.n", "n", Int(1, 254), lambda v: growth.check_schedule([{"op": "add_layer", "n": v}], 2)),
        ("advance_fades.steps", "steps", Int(0, 10_000_000), lambda v: growth.advance_fades(m(), v)),
        ("flops_to_reach.target", "target", Float(), lambda v: growth.flops_to_reach(W()["metrics"], v)),
        ("flops_to_reach.metric", "metric", Choice(("loss", "acc")),
         lambda v: growth.flops_to_reach(W()["metrics"], 1.0, metric=v)),
    ]


def _permute_sampling_flops():
    t = lambda: W()["tr_a"]  # noqa: E731
    V = W()["khop"].vocab_size
    prompt = torch.tensor([1, 2])
    return [
        ("random_permutation.seed", "seed", SEED, lambda v: permute.random_permutation(t(), v)),
        ("match_weights.max_iter", "max_iter", Int(1, 10_000, cheap=3),
         lambda v: permute.match_weights(W()["mlp_a"], W()["mlp_b"], max_iter=v)),
        ("generate.max_new_tokens", "max_new_tokens", Int(0, 100_000, cheap=4),
         lambda v: sampling.generate(t(), prompt, v)),
        ("generate.temperature", "temperature", Float(0.0, 100.0), lambda v: sampling.generate(t(), prompt, 2, v)),
        ("generate.top_k", "top_k", Int(1, V, none=True), lambda v: sampling.generate(t(), prompt, 2, top_k=v)),
        ("generate.seed", "seed", SEED, lambda v: sampling.generate(t(), prompt, 2, seed=v)),
        ("step_flops.batch_size", "batch_size", Int(1, 100_000_000), lambda v: flops.step_flops(t(), v)),
        ("step_flops.seq_len", "seq_len", Int(1, W()["khop"].seq_len, none=True),
         lambda v: flops.step_flops(t(), 2, seq_len=v)),
        ("examples_seen.steps", "steps", Int(0), lambda v: flops.examples_seen(v, 10, 3)),
        ("examples_seen.n_train", "n_train", Int(1), lambda v: flops.examples_seen(5, v, 3)),
        ("steps_for_budget.budget", "budget", Float(0.0, 1e30), lambda v: flops.steps_for_budget(v, 1.0, 10, 3)),
        ("steps_for_budget.per_example", "per_example", Float(0.0, 1e30, lo_open=True),
         lambda v: flops.steps_for_budget(1e6, v, 10, 3)),
    ]


# The config and data modules: their options constrain one another, so a valid value may be refused
# (by the memory budget, or by a related option) as long as the refusal says why.

def _load(name: str, base: dict, option: str, spec):
    def call(v):
        opts = {**base, option: v}
        if spec.valid(v):
            data.check_options(name, **opts)   # building digits or mnist1d for every case would be slow
        else:
            data.load(name, **opts)            # an invalid option must be refused before any work
    return call


def _data():
    """Every declared option of every dataset (free-text options, a path or a text, have no bound to draw from)."""
    small = {"khop": {"n_train": 20, "n_val": 10}, "text": {"corpus_chars": 1000}}
    documented_none = {("text", "corpus")}   # None means "not given" (load's docstring)
    out = []
    for name in data.names():
        for option, constraint in data.option_constraints(name).items():
            if constraint is None:
                continue
            base = {k: v for k, v in small.get(name, {}).items() if k != option}
            spec = declared(constraint, none=(name, option) in documented_none)
            out.append((f"data.load({name}).{option}", option, spec, _load(name, base, option, spec), False,
                        tuple(data.options_spec(name)) + (name,)))
    return out


def _configs():
    """Every declared field of the model and training configs, read from the configs themselves."""
    calls = {wb.models.MLPConfig: lambda **kw: dataclasses.replace(W()["mcfg"], **kw).validate(),
             wb.models.TransformerConfig: lambda **kw: dataclasses.replace(W()["tcfg"], **kw).validate(),
             wb.TrainConfig: lambda **kw: wb.TrainConfig(**kw).validate()}
    rows = [(f"{cls.__name__}.{field}", field, declared(constraint), functools.partial(_set, call, field))
            for cls, call in calls.items() for field, constraint in checks.constraints(cls).items()]
    # a valid width may divide badly by n_heads or exceed the memory budget, a valid head need more width, a
    # glyph embedding a vocabulary: refused by name, not coerced
    also = ("MB", "memory", "budget", "d_model", "n_heads", "vocab", "classifier")
    return [(i, n, s, c, False, also) for i, n, s, c in rows]


def _set(call, field, value):
    return call(**{field: value})


def _targets():
    strict = [(*row, True, ()) for row in _residual() + _lmc() + _collapse() + _compose() + _growth()
              + _permute_sampling_flops()]
    return strict + _data() + _configs()


@pytest.fixture(scope="module")
def targets():
    return {row[0]: row for row in _targets()}


_ALL_IDS: list[str] = []


def _ids() -> list[str]:
    if not _ALL_IDS:
        _ALL_IDS.extend(row[0] for row in _targets())
    return _ALL_IDS


@pytest.mark.parametrize("target_id", _ids())
def test_argument(target_id, targets):
    tid, name, spec, call, strict, also = targets[target_id]

    @SETTINGS
    @given(values(spec))
    def run(value):
        CASES[tid] += 1
        check_case(call, name, spec, value, strict=strict, also=also)

    run()


def test_the_oracle_catches_coercion_raw_errors_and_unnamed_messages():
    spec = Int(1, 10)
    check_case(lambda v: checks_int(v), "n", spec, 3)                     # valid, accepted
    check_case(lambda v: checks_int(v), "n", spec, 2.0)                   # invalid, refused by name
    for call, value in [(lambda v: int(v), 2.0),                          # silent coercion of a float
                        (lambda v: int(v), True),                         # ... of a bool
                        (lambda v: [][v], 3),                             # a raw IndexError
                        (lambda v: checks_int(v, "m"), 0),                # refused, but names another argument
                        (lambda v: checks_int(v, "n", 5), 3)]:            # a valid value refused
        with pytest.raises(AssertionError):
            check_case(call, "n", spec, value)


def checks_int(v, name="n", lo=1):
    from workbench.core.checks import check_int

    return check_int(name, v, lo, 10)


def test_zz_case_count():
    """The suite ran at least 1000 cases (when run whole); printed for the record."""
    total = sum(CASES.values())
    print(f"\nhypothesis API suite: {total} cases over {len(_ids())} arguments")
    if len(CASES) < len(_ids()):
        pytest.skip(f"only part of the suite ran ({total} cases)")
    assert total >= 1000, total
