"""The interpolation and barrier view of two models: loss and error along the straight line from A to B,
before and after aligning B's units to A's, and the barriers of each curve.

Bound to two models and their data (``ConnectivityView(model_a, model_b, dataset)``, or two stored Runs) it
computes the curves itself, one alignment method at a time: choosing another method computes only that
curve (``workbench.lmc.compare`` for that method), another number of alphas recomputes the methods shown,
and the split only re-slices. The Connectivity page embeds the same view unbound and hands it the curves its
job computed (:meth:`ConnectivityView.show_curves`). Definitions: ``docs/definitions.md#barrier``.
"""
from __future__ import annotations

import pandas as pd
import panel as pn
import param

from ...core import checks
from ... import lmc
from ...figures import lmc as figs
from ...lmc.interpolation import METHODS
from .base import Explorer

__all__ = ["ConnectivityView", "SPLITS", "ALPHAS"]

SPLITS = ("both", "val", "train")
ALPHAS = (3, 51)          # the alphas slider's range (odd numbers keep alpha = 0.5 on the grid)
METHOD_LABELS = {"none": "no alignment", "weights": "weight matching", "activations": "activation matching",
                 "repair": "REPAIR"}


class ConnectivityView(Explorer):
    """Interpolation curves (loss and error against alpha) and the barrier table of two models.

    ``methods``: the alignments drawn (``none``, ``weights``, ``activations``, ``repair``); ``split``: the
    curves of ``val``, ``train`` or ``both`` (the table shows ``val`` for ``both``); ``n_alphas``: points
    on the line (bound views only). :meth:`barrier` reads one number of the table.
    """

    methods = param.List(default=["none", "weights"], doc="the alignment methods drawn")
    split = param.String(default="both", doc="the split drawn")
    n_alphas = param.Integer(default=11, doc="points on the line from A to B")

    title = "Interpolation and barriers"
    choices = ("methods", "split", "n_alphas")

    def __init__(self, model_a=None, model_b=None, dataset=None, max_examples: int = 512, seed: int = 0, **params):
        super().__init__(**params)
        self.model_a, self.model_b, self.dataset = model_a, model_b, dataset
        if (model_a is None) != (model_b is None) or (model_a is not None and dataset is None):
            raise ValueError("give both models and their dataset (ConnectivityView(model_a, model_b, dataset)), "
                             "or none (a page hands it the curves)")
        if model_a is not None:
            lmc.check_same_architecture(model_a, model_b)
            self.max_examples = checks.check_int("max_examples", max_examples, 0, 1_000_000)
            self.seed = checks.check_seed("seed", seed)
        self.curves: pd.DataFrame | None = None     # every computed curve (method, alpha, split, loss, acc, error)
        self.method_select = pn.widgets.CheckButtonGroup.from_param(self.param.methods, options=dict(
            (label, m) for m, label in METHOD_LABELS.items()), name="alignment")
        self.split_select = pn.widgets.RadioButtonGroup.from_param(self.param.split, options=list(SPLITS),
                                                                   name="split")
        self.alpha_slider = pn.widgets.IntSlider.from_param(self.param.n_alphas, start=ALPHAS[0], end=ALPHAS[1], step=2,
                                                            name="alphas", width=200, visible=self.bound)
        self.curves_pane = pn.pane.Plotly(figs.connectivity_curves(None), sizing_mode="stretch_width", height=400)
        self.table = pn.pane.DataFrame(None, sizing_mode="stretch_width", index=False)
        if self.bound:
            self.check()
            self.update(set(self.choices))

    @property
    def bound(self) -> bool:
        """Whether the view computes its own curves (bound to two models)."""
        return self.model_a is not None

    # ---------------------------------------------------------------- choices
    def check(self) -> None:
        checks.check_choices("alignment", self.methods, METHODS)
        checks.check_choice("split", self.split, SPLITS)
        if self.bound:
            checks.check_int("alphas", self.n_alphas, *ALPHAS)
            if self.n_alphas % 2 == 0:
                raise ValueError(f"alphas must be odd (alpha = 0.5 on the grid), got {self.n_alphas}")

    def update(self, changed: set[str]) -> None:
        if self.bound and ("n_alphas" in changed or self._missing()):
            self._compute(changed)
        self.draw()

    def _missing(self) -> list[str]:
        have = set() if self.curves is None else set(self.curves["method"])
        return [m for m in self.methods if m not in have]

    def _compute(self, changed: set[str]) -> None:
        """The curves of the chosen methods not computed yet at this number of alphas (all of them when it
        changed); activation matching is computed once and shared by ``activations`` and ``repair``."""
        if "n_alphas" in changed or self.curves is None or self.curves["alpha"].nunique() != self.n_alphas:
            self.curves = None
        todo = self._missing()
        if not todo:
            return
        new = lmc.compare(self.model_a, self.model_b, self.dataset, n_alphas=self.n_alphas, methods=todo,
                          max_examples=self.max_examples, seed=self.seed)
        self.curves = new if self.curves is None else pd.concat([self.curves, new], ignore_index=True)

    # ---------------------------------------------------------------- results
    def show_curves(self, curves: pd.DataFrame | None) -> None:
        """Draw curves computed elsewhere (the page's job): every method in them is offered and shown."""
        self.curves = curves
        if curves is not None and len(curves):
            got = list(dict.fromkeys(curves["method"])) if "method" in curves else ["none"]
            self._reverting = True
            try:
                self.methods = got
            finally:
                self._reverting = False
            self._accepted["methods"] = got
        self.draw()

    def shown(self) -> pd.DataFrame | None:
        """The curves drawn: the chosen methods and split."""
        c = self.curves
        if c is None or not len(c):
            return None
        if "method" in c:
            c = c[c["method"].isin(self.methods)]
        return c if self.split == "both" else c[c["split"] == self.split]

    def barriers(self) -> pd.DataFrame | None:
        """:func:`workbench.lmc.barrier` of the chosen methods' curves (both splits)."""
        c = self.curves
        if c is None or not len(c):
            return None
        return lmc.barrier(c[c["method"].isin(self.methods)] if "method" in c else c)

    def barrier(self, method: str = "none", metric: str = "loss", definition: str = "linear") -> float:
        """One barrier of the table: ``method``'s ``metric`` barrier on the split shown (``val`` for both)."""
        table = self.barriers()
        if table is None:
            raise ValueError("no curves yet: bind the view to two models or hand it curves")
        checks.check_choice("method", method, list(self.methods))
        where = {"method": method} if "method" in table else {}
        return lmc.barrier_value(table, self._table_split(), metric, definition, **where)

    def _table_split(self) -> str:
        return "val" if self.split == "both" else self.split

    def draw(self) -> None:
        shown = self.shown()
        self.curves_pane.object = figs.connectivity_curves(shown)
        table = self.barriers()
        self.table.object = None if table is None else figs.barrier_table(table, split=self._table_split())

    # ---------------------------------------------------------------- layout
    def widgets(self) -> list:
        return [self.method_select, self.split_select] + ([self.alpha_slider] if self.bound else [])

    def __panel__(self):
        return pn.Column(self.errors, pn.Row(*self.widgets()), self.curves_pane,
                         pn.pane.Markdown("**Barriers**: loss and error, both definitions; peak alpha of the "
                                          "linear ones.", margin=(0, 10)),
                         self.table, sizing_mode="stretch_width")
