"""The lenses view: the logit, tuned and Jacobian lenses compared per layer (KL to the final output, top-1
agreement, perplexity) and the lens heat-map of the input with its commitment strip.

The tuned lens is trained in the page's job (seeded, with progress and Stop) on the model's training
data, and stored with the run when the model is a stored run (:meth:`workbench.lenses.TunedLens.save_to_run`);
a stored lens is loaded when the model is analysed (:meth:`~workbench.lenses.TunedLens.from_run`; a stale
one is refused and said so). The Jacobian lens is fitted in the job too (training-free). Choosing the
lens or the commitment criterion only re-slices the tables. Engine: :mod:`workbench.lenses`.
"""
from __future__ import annotations

import warnings

import panel as pn
import param

from ...core import checks
from ...residual import lenses
from ...figures import lenses as lfigs
from ..text import escape_md
from .base import ModelInput, View, as_monitor

__all__ = ["LensView", "lens_compare_job", "tuned_lens_job", "jacobian_lens_job", "CRITERIA"]

CRITERIA = {"top1": "top-1", "top3": "top-3", "p50": "p > 0.5"}
MAX_STEPS, MAX_PROMPTS = 5000, 64


def _model(subject: ModelInput):
    return subject.one_model("the lenses")


def _lenses_made(made, subject: ModelInput) -> tuple:
    got = (made or {}).get(subject.key, {})
    return got.get("tuned"), got.get("jacobian")


def lens_compare_job(monitor, subject: ModelInput, made: dict | None = None, load_stored: bool = True,
                     tuned=None, jacobian=None) -> dict:
    """The lens tables of ``subject``: ``compare`` (every lens given, per layer), and for a sequence model
    ``tokens`` (:func:`workbench.lenses.top_tokens`) and ``commitment`` of its first prompt. ``made``:
    ``{model key: {"tuned": lens, "jacobian": lens}}``, the lenses made so far (those of ``subject.key`` are
    used). Without a tuned lens the one stored with the run is loaded (``load_stored``); a stale or unreadable
    one is named in ``note``."""
    model = _model(subject)
    mine = _lenses_made(made, subject)
    tuned = tuned if tuned is not None else mine[0]
    jacobian = jacobian if jacobian is not None else mine[1]
    note = ""
    if tuned is None and load_stored and subject.store is not None and subject.run_id:
        try:
            tuned = lenses.TunedLens.from_run(subject.store, subject.run_id, model=model)
            note = f"tuned lens loaded from run {subject.run_id} ({_trained(tuned)})"
        except ValueError as e:
            if "has no stored lens" not in str(e):
                note = f"the tuned lens stored with this run was not used: {e}"
    as_monitor(monitor).report(0.6, "comparing the lenses")
    out = {"key": subject.key, "tuned": tuned, "jacobian": jacobian, "note": note,
           "compare": lenses.compare(model, subject.x, y=subject.y, tuned=tuned, jacobian=jacobian),
           "tokens": None, "commitment": None, "input_tokens": subject.tokens, "vocab": subject.vocab}
    if subject.sequence:
        first = subject.x[:1]
        out["tokens"] = lenses.top_tokens(model, first, tuned=tuned, jacobian=jacobian)
        out["commitment"] = lenses.commitment(model, first, tuned=tuned, jacobian=jacobian)
    return out


def _trained(lens) -> str:
    info = lens.info
    return (f"{info.get('steps_done', '?')} steps on {info.get('tokens_seen', '?')} tokens, seed {info.get('seed', '?')}"
            + (", fewer tokens than asked" if info.get("short") else ""))


def tuned_lens_job(monitor, subject: ModelInput, steps: int, seed: int, made: dict | None = None) -> dict:
    """Train a tuned lens on ``subject.training()`` (seeded; progress and Stop), store it with the run when the
    model is a stored run, then the lens tables. A lens trained on fewer tokens than asked says so."""
    model = _model(subject)
    mon = as_monitor(monitor)
    data = subject.training()
    with warnings.catch_warnings():   # a short fit is reported in the note, not on the server's stderr
        warnings.simplefilter("ignore", UserWarning)
        fit = lenses.train_tuned_lens(model, data, steps=steps, batch_size=min(32, len(data)), max_passes=100,
                                      seed=seed, monitor=mon)
    notes = [f"tuned lens trained: {fit.steps_done} of {steps} steps on {fit.tokens_seen} tokens (seed {seed})"]
    if fit.short:
        notes.append(f"fewer tokens than asked ({fit.tokens_seen} of {fit.tokens_asked}): "
                     + ("stopped" if fit.stopped else "the data ran out"))
    if subject.store is not None and subject.run_id and not fit.stopped:
        try:
            fit.lens.save_to_run(subject.store, subject.run_id)
            notes.append(f"stored with run {subject.run_id}")
        except (ValueError, OSError) as e:
            notes.append(f"not stored with the run: {e}")
    out = lens_compare_job(monitor, subject, made, load_stored=False, tuned=fit.lens)
    out["note"] = "; ".join(notes)
    out["history"] = fit.history
    return out


def jacobian_lens_job(monitor, subject: ModelInput, prompts: int, made: dict | None = None) -> dict:
    """Fit a Jacobian lens on up to ``prompts`` prompts of the training data (progress and Stop), then the
    lens tables."""
    model = _model(subject)
    data = subject.training()[:prompts]
    J = lenses.fit_jacobian_lens(model, data, monitor=as_monitor(monitor))
    out = lens_compare_job(monitor, subject, made, load_stored=False, jacobian=J)
    out["note"] = (f"Jacobian lens fitted on {J.n_prompts} prompt{'s' * (J.n_prompts != 1)}"
                   + (" (stopped early)" if J.info.get("stopped") else ""))
    return out


class LensView(View):
    """The lenses of the analysed model: ``lens`` (whose heat-map is shown: ``logit`` and the lenses made
    so far), ``criterion`` (the commitment strip: ``top1``, ``top3``, ``p50``); ``steps`` and ``seed`` of a
    tuned-lens fit, ``prompts`` of a Jacobian-lens fit."""

    lens = param.String(default="logit", doc="the lens of the heat-map: logit, tuned or jacobian")
    criterion = param.String(default="top1", doc="one of CRITERIA")
    steps = param.Integer(default=250, allow_None=True, doc="tuned-lens training steps")
    seed = param.Integer(default=0, allow_None=True, doc="tuned-lens seed (batch order)")
    prompts = param.Integer(default=8, allow_None=True, doc="prompts averaged by the Jacobian lens")

    jobs = {"lenses": lens_compare_job, "tuned": tuned_lens_job, "jacobian": jacobian_lens_job}
    title = "Lenses"

    def __init__(self, host=None, **params):
        super().__init__(host, **params)
        self.lens_select = pn.widgets.RadioButtonGroup.from_param(self.param.lens, options=["logit"], name="")
        self.criterion_select = pn.widgets.Select.from_param(self.param.criterion, options={v: k for k, v in
                                                                                           CRITERIA.items()},
                                                             name="commitment", width=120)
        self.steps_input = pn.widgets.IntInput.from_param(self.param.steps, start=1, end=MAX_STEPS, width=110,
                                                          name="steps")
        self.seed_input = pn.widgets.IntInput.from_param(self.param.seed, start=0, width=90, name="seed")
        self.prompts_input = pn.widgets.IntInput.from_param(self.param.prompts, start=1, end=MAX_PROMPTS, width=110,
                                                            name="prompts")
        self.train_button = pn.widgets.Button(label="Train tuned lens", button_type="primary", width=150)
        self.train_button.on_click(lambda _: self.run("tuned", wait=False))
        self.jacobian_button = pn.widgets.Button(label="Fit Jacobian lens", width=150)
        self.jacobian_button.on_click(lambda _: self.run("jacobian", wait=False))
        self.compare_button = pn.widgets.Button(label="Compare lenses", width=130)
        self.compare_button.on_click(lambda _: self.run("lenses", wait=False))
        self.note = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.compare_pane = pn.pane.Plotly(lfigs.lens_comparison_figure(None), sizing_mode="stretch_width", height=340)
        self.heat_pane = pn.pane.Plotly(lfigs.lens_token_heatmap(None), sizing_mode="stretch_width", height=380)
        self.result: dict | None = None
        self.made: dict = {}     # model key -> {"tuned": TunedLens, "jacobian": JacobianLens}
        if self.subject is not None:
            self.run("lenses")

    def buttons(self) -> list:
        return [self.train_button, self.jacobian_button, self.compare_button]

    def clear(self) -> None:
        """Another model or input: nothing of the old one is shown (the lenses made are kept per model)."""
        self.result = None
        with pn.io.hold():
            self.lens_select.options = ["logit"]
            self.lens = "logit"
            self.compare_pane.object = lfigs.lens_comparison_figure(None)
            self.heat_pane.object = lfigs.lens_token_heatmap(None)
            self.note.object = ""

    def choices(self, action: str) -> dict:
        if action == "tuned":
            return {"steps": checks.check_int("steps", self.steps, 1, MAX_STEPS),
                    "seed": checks.check_seed("seed", self.seed), "made": self.made}
        if action == "jacobian":
            return {"prompts": checks.check_int("prompts", self.prompts, 1, MAX_PROMPTS), "made": self.made}
        return {"made": self.made}

    def show(self, action: str, result: dict) -> None:
        made = self.made.setdefault(result["key"], {})
        for name in ("tuned", "jacobian"):
            if result.get(name) is not None:
                made[name] = result[name]
        self.result = result
        offered = [name for name in lenses.LENSES if name == "logit" or result.get(name) is not None]
        with pn.io.hold():
            self.lens_select.options = offered
            self.lens = action if action in offered else (self.lens if self.lens in offered else "logit")
            self.compare_pane.object = lfigs.lens_comparison_figure(result["compare"], perplexity=True)
            self.note.object = escape_md(result.get("note") or "")
            self.redraw()

    @param.depends("lens", "criterion", watch=True)
    def redraw(self) -> None:
        """The heat-map of the chosen lens and criterion from the cached tables (no engine call); a lens or
        criterion the view never offered is refused naming the field."""
        r = self.result
        if r is None or r.get("tokens") is None:
            self.heat_pane.object = lfigs.lens_token_heatmap(None)
            return
        try:
            lens = checks.check_choice("lens", self.lens, list(self.lens_select.options))
            criterion = checks.check_choice("commitment", self.criterion, list(CRITERIA))
        except ValueError as e:
            self.host.refuse(self, e)
            return
        self.heat_pane.object = lfigs.lens_token_heatmap(
            r["tokens"], r["commitment"], lens=lens, criterion=criterion, vocab=r.get("vocab"),
            input_tokens=r.get("input_tokens"),
            title=f"{lens} lens: top-1 token per layer (outlined: the final prediction); commitment "
                  f"({CRITERIA[criterion]}) under")

    def code_lines(self) -> list[str]:
        steps = self.steps if isinstance(self.steps, int) else 250
        seed = self.seed if isinstance(self.seed, int) else 0
        prompts = self.prompts if isinstance(self.prompts, int) else 8
        return [
            "from workbench.figures import lenses as lens_figs",
            f"fit = wb.lenses.train_tuned_lens(model, x_train, steps={steps}, batch_size=min(32, len(x_train)), "
            f"max_passes=100, seed={seed})",
            "print('fewer tokens than asked:', fit.short, fit.tokens_seen, 'of', fit.tokens_asked)",
            "# fit.lens.save_to_run(store, run.run_id); later wb.lenses.TunedLens.from_run(store, run.run_id)",
            f"J = wb.lenses.fit_jacobian_lens(model, x_train[:{prompts}])",
            "table = wb.lenses.compare(model, x, y=y, tuned=fit.lens, jacobian=J)   # lens, layer, kl_to_final, "
            "top1_agree, perplexity",
            "lens_figs.lens_comparison_figure(table, perplexity=True)",
            "tops = wb.lenses.top_tokens(model, x[:1], tuned=fit.lens, jacobian=J)",
            "commits = wb.lenses.commitment(model, x[:1], tuned=fit.lens, jacobian=J)",
            f"lens_figs.lens_token_heatmap(tops, commits, lens={self.lens!r}, criterion={self.criterion!r}, "
            "vocab=vocab, input_tokens=tokens)",
        ]

    def widgets(self) -> list:
        return [pn.Row(self.steps_input, self.seed_input, self.train_button),
                pn.Row(self.prompts_input, self.jacobian_button, self.compare_button)]

    def panels(self) -> list:
        return [*self.widgets(), self.note, self.compare_pane,
                pn.Row(self.lens_select, self.criterion_select), self.heat_pane]
