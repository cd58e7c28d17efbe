"""User strings never render as markup in a figure (issue 21, item 10).

Every figure builder of ``workbench.figures`` is fed input whose every string -- titles, run and model
names, tokens, category values, labels -- is a payload of live markup (a link, bold, a styled span, an
image with a handler); the finished figure's JSON is walked and no string may hold a raw ``<`` but the
line break ``<br>`` (and ``<extra>`` in hover templates), while the payload must be there, escaped (so a
builder that drops the string cannot pass). The browser side -- that plotly draws the escaped text as the
characters and makes no link -- is in test_browser_classroom_runs.py.
"""
import html
import importlib
import inspect
import pkgutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import workbench.figures as figures_pkg
from workbench.figures import safe

P = ('<a href="https://evil.example/">link</a><b>bold</b><span style="color:red">red</span>'
     "<img src=x onerror=alert(1)><i>i</i><sup>sup</sup>")
P2 = "<script>alert(2)</script>&amp;<u>u</u>"
MARK = "&lt;a"                # the payload, escaped: plotly draws it as the characters "<a"


def _modules():
    out = []
    for info in pkgutil.iter_modules(figures_pkg.__path__):
        if info.name.startswith("_") or info.name == "safe":
            continue
        out.append(importlib.import_module(f"workbench.figures.{info.name}"))
    return out


def _builders():
    """Every public function of every figures module that returns a plotly figure."""
    found = {}
    for mod in _modules():
        for name, fn in vars(mod).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != mod.__name__:
                continue
            ret = inspect.signature(inspect.unwrap(fn)).return_annotation
            if ret in (go.Figure, "go.Figure"):
                found[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = fn
    return found


def _strings(value, key="", out=None):
    out = [] if out is None else out
    if isinstance(value, str):
        out.append((key, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            if k == "template" and key == "layout":
                continue
            _strings(v, str(k), out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, key, out)
    elif isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        for v in value.ravel().tolist():
            _strings(v, key, out)
    return out


def raw_markup(fig) -> list[str]:
    """Strings of the figure holding a tag plotly would draw (all but ``<br>``; ``<extra>`` in templates)."""
    d = fig if isinstance(fig, dict) else fig.to_dict()
    bad = []
    for key, s in _strings({"data": d.get("data", []), "layout": d.get("layout", {})}):
        rest = s.replace("<br>", "")
        if key.endswith("template"):
            rest = rest.replace("<extra>", "").replace("</extra>", "")
        if "<" in rest:
            bad.append(f"{key}: {s[:160]}")
    return bad


# ----------------------------------------------------------------------------- payload inputs, one per builder


def _frame(**cols):
    return pd.DataFrame(cols)


def _inputs():
    metrics = pd.DataFrame([{"step": s, "split": sp, "metric": m, "value": v, "stage": st, "op": P,
                             "n_layers": 1 + st, "flops": 1e6 * s, "method": meth}
                            for st, s in ((0, 1), (0, 2), (1, 3), (1, 4)) for sp in ("batch", "train", "val")
                            for m, v in (("loss", 1.0 / s), ("acc", 0.1 * s)) for meth in ("grown", P)])
    collapse = pd.DataFrame([{"epoch": e, "site": "features", "metric": m, "value": 0.5 / (e + 1), "label": lab,
                              "layer": 0} for e in range(3) for lab in (P, "b")
                             for m in ("nc1", "nc2", "nc3", "nc4", "train_acc", "minority_cos")])
    layers = pd.DataFrame([{"epoch": e, "site": P, "metric": "nc1", "value": 1.0 / (1 + l), "layer": l}
                           for e in range(2) for l in range(3)])
    plane = SimpleNamespace(grid=pd.DataFrame([{"x": x, "y": y, "loss": x + y} for x in (0, 1) for y in (0, 1)]),
                            points=_frame(x=[0, 1], y=[0, 1], name=[P, P2]), split=P)
    lw = pd.DataFrame([{"metric": "loss", "definition": "linear", "base": "A", "group": g, "barrier": 0.1,
                        "direction": d, "alignment": P, "alpha": a, "loss": 0.5}
                       for g in (P, "blocks.1") for d in ("single", "from input") for a in (0.0, 0.5)])
    est = _frame(group=[P, "all"], estimate=[0.1, 0.2], midpoint=[0.1, 0.2], alignment=[P, P])
    residual = pd.DataFrame([{"layer": l, "sublayer": s, "rel_norm": 0.3, "cosine": 0.1, "position": p, "stage": 0,
                              "kl_to_final": 0.2, "top1_agree": 0.5, "attribution": 0.1, "recovery": 0.3,
                              "rel_change": 0.2} for l in range(2) for s in ("attn", "mlp") for p in range(2)])
    sweep = pd.DataFrame([{"point": i, "d_model": w, "seed": s, "metric": m, "value": 0.1 * w + s,
                           "status": "done", "alignment": al, "epoch": w, "method": al, "label": al}
                          for i, (w, s, al) in enumerate((w, s, al) for w in (8, 16) for s in (0, 1)
                                                         for al in (P, "weights"))
                          for m in ("loss_barrier", "nc1", "flops_to_target", "acc")])
    tokens = [P, P2, "c"]
    return {
        "training.training_curves": lambda f: f(metrics, title=P),
        "growth.growth_curves": lambda f: f(metrics, title=P),
        "growth.block_strip": lambda f: f(_frame(layer=[0, 1, 0], part=["embed", "block", "head"], params=[10, 20, 5],
                                                 trainable_params=[10, 0, 5], frozen=[False, True, False],
                                                 gate=[1.0, 0.5, 1.0]), title=P),
        "growth.compare_curves": lambda f: f(metrics, target_loss=0.5, title=P),
        "growth.depth_sweep_figure": lambda f: f(_frame(metric=["acc"] * 2, split=["val"] * 2, task=[P, P2],
                                                        depth=[1, 2], value=[0.5, 0.6]), title=P),
        "growth.glyph_grid": lambda f: f(np.zeros((2, 3, 3)), [P, P2], title=P),
        "growth.eta_trace": lambda f: f(_frame(step=[1, 2], candidate=[P, P2], op=[P, "widen"], eta=[1.0, 2.0],
                                               eta_new=[2.0, 3.0], eta_ratio=[2.0, 1.5], accepted=[True, False]),
                                        tau=2.0, title=P),
        "growth.width_depth_timeline": lambda f: f(_frame(stage=[0, 1], op=[P, P2], step=[0, 5], n_layers=[1, 2],
                                                          width=[8, 16]), title=P),
        "interventions.output_change_figure": lambda f: f(_frame(position=[0, 1], kl=[0.1, 0.2], l2=[0.1, 0.3]),
                                                          tokens, title=P),
        "learngene.r2_bars": lambda f: f(_frame(param=[P, P2], r2=[0.9, 0.5], numel=[10, 20]), title=P),
        "learngene.expansion_curves": lambda f: f(_frame(init=["learngene", "random"], metric=["acc", "acc"],
                                                         depth=[2, 2], value=[0.5, 0.4]), title=P),
        "lmc.connectivity_curves": lambda f: f(_frame(method=[P, P], split=["val", "train"], alpha=[0.0, 1.0],
                                                      loss=[1.0, 2.0], acc=[0.5, 0.4]), title=P),
        "lmc.layerwise_bars": lambda f: f(lw.assign(base=P), title=P),
        "lmc.instability_plot": lambda f: f(_frame(spawn_step=[0, 10], error_barrier=[0.1, 0.0],
                                                   loss_barrier=[0.3, 0.1]), title=P),
        "lmc.plane_contour": lambda f: f(plane, title=""),
        "lmc.transport_map": lambda f: f([[0.5, 0.5], [0.5, 0.5]], name=P),
        "lmc.fusion_vs_reg": lambda f: f(_frame(method=["sinkhorn", "sinkhorn", "emd"], reg=[0.1, 1.0, 0.0],
                                                loss=[1.0, 2.0, 1.5]), title=P),
        "lmc.layerwise_heatmap": lambda f: f(lw, title=""),
        "lmc.cumulative_barriers": lambda f: f(lw, est, title=""),
        "residual.contributions_figure": lambda f: f(residual, title=P),
        "residual.stages_figure": lambda f: f(residual, title=P),
        "residual.position_figure": lambda f: f(residual, layer=0, tokens=tokens),
        "residual.lens_heatmap": lambda f: f(residual.drop_duplicates(["layer", "position"]), tokens=tokens),
        "residual.skip_heatmap": lambda f: f(_frame(skipped=[0, 0], affected=[0, 1], effect=[0.1, 0.2]), title=P),
        "residual.skip_output_figure": lambda f: f(_frame(skipped=[0, 1], kl=[0.1, 0.2], l2=[0.1, 0.1],
                                                          top1_changed=[0.0, 0.5]), title=P),
        "residual.attribution_figure": lambda f: f(_frame(position=[0, 0], batch=[0, 0], target=[1, 1],
                                                          attribution=[0.5, -0.2], component=[P, P2]),
                                                   target_label=P),
        "residual.ig_heatmap": lambda f: f(residual, tokens=tokens, title=P),
        "residual.depth_difficulty_figure": lambda f: f(_frame(difficulty=[P, P2], depth_score=[1.0, 2.0]), title=P),
        "residual.layer_map_heatmap": lambda f: f(_frame(layer_a=[0, 1], layer_b=[0, 1], rel_error=[0.1, 0.2]),
                                                  title=P),
        "residual.patch_heatmap": lambda f: f(residual, tokens=tokens, site=P),
        "residual.erasure_heatmap": lambda f: f(residual, tokens=tokens, title=P),
        "residual.lens_layers_figure": lambda f: f(_frame(layer=[0, 1], kl_to_final=[0.1, 0.2], top1_agree=[0.5, 1]),
                                                   title=P),
        "scaling.power_law": lambda f: f([1, 2, 4], [3.0, 2.0, 1.5], xlabel=P, ylabel=P2, title=P),
        "sweeps.metric_plot": lambda f: f(sweep, "d_model", "acc", color="label", title=P),
        "sweeps.barrier_vs_width": lambda f: f(sweep.drop(columns=["label", "method", "epoch"])),
        "sweeps.nc_vs_epochs": lambda f: f(sweep.drop(columns=["d_model", "alignment", "method"]), color="label"),
        "sweeps.flops_to_loss": lambda f: f(sweep.drop(columns=["label", "alignment", "epoch"]), "d_model"),
        "unroll.gap_curve": lambda f: f(_frame(metric=["gap", "acc_deep"], depth=[1, 1], value=[0.1, 0.9]), title=P),
        "unroll.compare_bars": lambda f: f(_frame(metric=["acc", "loss"], model=[P, P2], value=[0.5, 1.0]), title=P),
        "unroll.layout_bars": lambda f: f(_frame(metric=["loss"] * 2, layout=["sequential", "parallel"],
                                                 value=[1.0, 1.1]), title=P),
        "compose.domain_heatmap": lambda f: f(_frame(model=[P, P2], role=["specialist", "merge"], domain=[P2, P],
                                                     metric=["loss", "loss"], value=[1.0, 2.0])),
        "compose.gate_weights": lambda f: f(_frame(position=[0, 0, 1], token=[P, P, P2], member=[P, P2, P],
                                                   weight=[0.5, 0.5, 1.0])),
        "compose.cosine_matrix": lambda f: f(_frame(a=[P, P, P2, P2], b=[P, P2, P, P2], cosine=[1, 0.1, 0.1, 1])),
        "compose.knob_curve": lambda f: f(_frame(metric=["acc"] * 2, knob=[P, P], domain=[P2, P2], x=[0, 1],
                                                 value=[0.5, 0.6])),
        "compose.sequential_curve": lambda f: f(_frame(method=[P, P2], n_tasks=[1, 2], task=[P, P], metric=["acc"] * 2,
                                                       value=[0.5, 0.6])),
        "grokking.loss_curves": lambda f: f(metrics, phases={"memorised": 2, "cleanup": 3, "grokked": 4, "end": 5},
                                            title=P),
        "grokking.fourier_heatmap": lambda f: f(_frame(split=["measure"] * 2, metric=["fourier_1", "fourier_2"],
                                                       step=[1, 1], value=[0.1, 0.2]), title=P),
        "grokking.measure_curves": lambda f: f(_frame(split=["measure", "train"], metric=["restricted_loss", "loss"],
                                                      step=[1, 1], value=[0.1, 0.2]), title=P),
        "grokking.threshold_curve": lambda f: f(_frame(ratio=[1.0, 3.0], test_acc=[0.1, 0.9], train_acc=[1, 1]),
                                                reported={2.75: 0.5}, title=P),
        "collapse.nc_curves": lambda f: f(collapse, title=P),
        "collapse.layer_curves": lambda f: f(layers, title=P),
        "collapse.minority_curve": lambda f: f(collapse, title=P),
        "collapse.simplex_3d": lambda f: f(_frame(kind=["means", "means", "simplex", "simplex"], **{"class": [0, 1, 0, 1]},
                                                  pc1=[0, 1, 0, 1], pc2=[0, 1, 0, 1], pc3=[0, 1, 0, 1]),
                                           class_names=[P, P2], title=P),
        "collapse.gram_heatmaps": lambda f: f({"gram": np.eye(2), "ideal": np.eye(2), "classifier_cos": np.eye(2)},
                                              title=P),
        "collapse.head_gram_heatmaps": lambda f: f({"kind": P, "gram": np.eye(2), "target": np.eye(2), "error": 0.1,
                                                    "max_abs_cos": 0.2, "threshold": None}),
        "attention.pattern_figure": lambda f: f(_frame(layer=[0] * 3, head=[0] * 3, query=[0, 1, 1], key=[0, 0, 1],
                                                       query_token=[P, P2, P2], key_token=[P, P, P2],
                                                       weight=[1.0, 0.5, 0.5])),
        "attention.score_map": lambda f: f(_frame(layer=[0, 0], head=[0, 1], score_kind=[P, P], value=[0.1, 0.9])),
        "attention.scores_across": lambda f: f(_frame(layer=[0, 0], head=[0, 1], score_kind=["induction"] * 2,
                                                      value=[0.1, 0.9], stage=[P, P2])),
        "layout.empty": lambda f: f(P),
        "lenses.lens_comparison_figure": lambda f: f(_frame(lens=[P, P], layer=[0, 1], kl_to_final=[0.2, 0.1],
                                                            top1_agree=[0.5, 1.0]), title=P),
        "lenses.lens_token_heatmap": lambda f: f(_frame(lens=["logit"] * 2, batch=[0, 0], layer=[0, 1], position=[0, 0],
                                                        prob=[0.5, 0.9], token=[0, 1], final_token=[1, 1]),
                                                 vocab=[P, P2], input_tokens=[P]),
        "lenses.lens_diagnostics_figure": lambda f: f(_frame(lens=[P, P], layer=[0, 1], topk_agree=[0.5, 0.6],
                                                             kurtosis=[1.0, 2.0], autocorr=[0.1, 0.2],
                                                             eff_dim=[3.0, 4.0]), title=P),
        "tracing.trace_heatmap": lambda f: f(_frame(position=[0, 1], layer=[0, 0], prob=[0.1, 0.5], effect=[0.0, 0.4],
                                                    kind=["resid"] * 2, clean=[0.9] * 2, corrupt=[0.1] * 2),
                                             tokens=[P, P2], subject=(0, 1), answer=P),
        "tracing.patching_comparison": lambda f: f(_frame(site=[P] * 2, method=["exact", "atp"], layer=[0, 0],
                                                          position=[0, 0], recovery=[0.5, 0.4]), tokens=[P]),
        "collapse.mixup_geometry": lambda f: f(_frame(pair_kind=["cross", "same", "classifier"], x=[0.1, 0.2, 1.0],
                                                      y=[0.1, 0.3, 1.0], class_a=[0, 1, 0], class_b=[1, 1, 0],
                                                      lam=[0.5, 0.5, 0.0]), title=P),
    }


BUILDERS = _builders()
INPUTS = _inputs()


def test_every_builder_escapes_user_text():
    """Each public figure builder goes through the one escaping pass (safe.builder)."""
    missing = [name for name, fn in BUILDERS.items() if not getattr(fn, "escapes_user_text", False)]
    assert not missing, f"decorate these with workbench.figures.safe.builder: {missing}"
    assert len(BUILDERS) >= 55


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_payload_named_input_draws_no_markup(name):
    fn = BUILDERS[name]
    if name in INPUTS:
        fig = INPUTS[name](fn)
    else:   # a builder added later without an entry here: at least its empty figure with a payload title
        fig = fn(None, title=P)
    assert isinstance(fig, go.Figure)
    assert not raw_markup(fig), raw_markup(fig)
    text = fig.to_json()
    assert MARK in text, f"{name}: the payload never reached the figure"


def test_every_payload_entry_names_a_builder():
    """No stale entry above (a builder without one is still checked, through its empty figure's title)."""
    assert not sorted(set(INPUTS) - set(BUILDERS)), sorted(set(INPUTS) - set(BUILDERS))


def test_the_payload_is_text_escaped_exactly_once():
    """A builder calling another builder escapes once: plotly draws the characters, not ``&amp;lt;``."""
    fig = BUILDERS["sweeps.barrier_vs_width"](
        pd.DataFrame([{"point": 0, "d_model": 8, "seed": 0, "metric": "loss_barrier", "value": 0.1, "status": "done",
                       "alignment": P}]))
    names = [t.name for t in fig.data]
    assert f"alignment = {html.escape(P, quote=False)}" in names
    assert not any("&amp;lt;" in n for n in names)


def test_line_breaks_and_hover_templates_keep_working():
    fig = go.Figure(go.Scatter(x=[P], y=[1], name="a<br>b", hovertemplate="%{x}<br>%{y}<extra>" + P + "</extra>"))
    safe.escape_figure(fig)
    assert fig.data[0].name == "a<br>b"
    assert fig.data[0].hovertemplate.startswith("%{x}<br>%{y}<extra>&lt;a href") and \
        fig.data[0].hovertemplate.endswith("</extra>")
    assert list(fig.data[0].x) == [html.escape(P, quote=False)]


def test_figure_dicts_edited_after_the_builder_are_escaped_too():
    from workbench.figures import residual as figs

    base = figs.contributions_figure(pd.DataFrame({"layer": [0], "sublayer": ["attn"], "rel_norm": [0.1],
                                                   "cosine": [0.2]})).to_dict()
    shaped = figs.with_shapes(base, [figs.layer_band(0)], title=f"Direct logit attribution to {P!r}")
    traced = figs.with_traces(base, [{"y": [0.3], "text": [P]}])
    assert not raw_markup(shaped) and MARK in shaped["layout"]["title"]["text"]
    assert not raw_markup(traced) and traced["data"][0]["text"] == [html.escape(P, quote=False)]


def test_the_depth_report_page_holds_no_payload_markup():
    from workbench.figures import residual as figs

    rep = SimpleNamespace(contributions=pd.DataFrame(), lens=pd.DataFrame(), skip=pd.DataFrame(),
                          skip_output=pd.DataFrame(), ig=pd.DataFrame({"layer": [0], "position": [0],
                                                                       "attribution": [0.1]}),
                          erasure=pd.DataFrame(), patching=pd.DataFrame(), depth_vs_difficulty=pd.DataFrame(),
                          depth_score=1.0, n_layers=1, title=P)
    page = figs.depth_report_html(rep, tokens=[P])
    assert P not in page and "<h1>" + html.escape(P) + "</h1>" in page           # the title, escaped as HTML
    assert "0:&lt;a href=" in page                                                # the token, as figure text
