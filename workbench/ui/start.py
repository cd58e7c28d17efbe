"""Start here: the tab a newcomer lands on. What each page measures in one line, which page to open first,
the example runs every page opens on (made once, at the first start, by :mod:`workbench.runtime.examples`),
with their progress bar while they are made and the buttons that remove and restore them."""
from __future__ import annotations

import copy
import threading

import panel as pn

from ..figures.growth import growth_curves
from ..runtime import examples as engine_examples
from . import examples
from .page import Page, pages
from .text import escape_md

EXPLANATION = """The workbench measures how neural networks build and use depth. Every page opens on one
of the example runs made at the first start (about a minute on two cores, once; they are ordinary runs
owned by *examples*, and the *Runs* page lists them next to yours). A page's Run button then computes
the same figure for your choices and your runs. Each page has an "As code" box with the engine calls that
reproduce its figure in a notebook (`make serve` and JupyterLab share the run store)."""

WHERE_TO_START = """### Where to start

1. **Grow**: a model grown in depth while it trains (the example: a k-hop Transformer, 1 block stacked to
   2 by G_stack, which then solves 2-hop questions).
2. **Residual stream**: what each block of that grown model writes into the stream, the logit lens, and
   what erasing a block's write changes downstream.
3. **Connectivity**, **Collapse**, **Compose**: each opens on its example; then press its Run button.
4. **Train** a model of your own: every page lists it next to the examples.
"""

# What each page measures, in one line (the Start page's table; a page missing here gets the first sentence
# of its explanation).
LINES = {
    "Train": "one model trained on a dataset: loss and accuracy curves, saved to the run store",
    "Grow": "a model grown in depth while it trains (layer-wise, G_stack, the natural criterion): loss against "
            "steps and FLOPs, which blocks are frozen",
    "Residual stream": "what each block writes into the residual stream, the logit lens, direct attribution, "
                       "skipping or erasing a block; tuned lenses, attention, causal tracing",
    "Depth lab": "which blocks a trained model needs: layer rankings, pruning and healing, execution orders, "
                 "oracle depth, the curse of depth, early exit, effective depth",
    "Connectivity": "whether two trained models are linearly connected: the loss barrier before and after "
                    "aligning their units, layer by layer, on a plane",
    "Collapse": "neural collapse (NC1-NC4) while a classifier trains into the terminal phase; class means "
                "against the simplex, per layer",
    "Compose": "specialists on one frozen substrate merged by their logits or their weights, scored on every "
               "domain",
    "Sweeps": "one task at every point of a grid (times the seeds): a tidy table and a metric against a key",
    "Scaling laws": "a power law fitted to a width, depth or data sweep, and how well its small end predicts "
                    "the largest points",
    "Unroll & learngene": "how far a residual stack is from its first-order (parallel) model, and how linear "
                          "in depth its weights are",
    "Grokking": "modular addition memorised, then generalised: loss curves and the progress measures",
    "Runs": "every stored run: its curves and configuration, export, delete; remove or restore the examples",
    "Teacher": "(classroom mode, teachers) the class's jobs, shared runs, the students' budget, the lessons",
}


_FIGURES: dict[str, dict] = {}   # the tab's figure as plotly JSON, by example run id ("" before there is one)
_FIGURES_LOCK = threading.Lock()
EMPTY_TITLE = "The example grown model (when the examples are made)"
EXAMPLE_TITLE = "The example: a k-hop Transformer grown by G_stack (stage boundary dotted)"


def _figure(key: str, build) -> dict:
    """The figure for ``key``, built once per process (every session lands on this tab: building it took ~40 ms
    of the server's one thread per session); each caller gets its own copy."""
    with _FIGURES_LOCK:
        fig = _FIGURES.get(key)
    if fig is None:
        fig = build().to_dict()
        with _FIGURES_LOCK:
            if len(_FIGURES) > 16:
                _FIGURES.clear()
            _FIGURES[key] = fig
    return copy.deepcopy(fig)


def page_line(cls) -> str:
    """What the page ``cls`` measures, in one line."""
    if cls.title in LINES:
        return LINES[cls.title]
    first = " ".join(cls.explanation.split()).split(". ")[0]
    return first.rstrip(".")


class StartPage(Page):
    """Where to start, what each page measures, the example runs (their progress, Remove and Restore)."""

    title = "Start here"
    order = 0
    explanation = EXPLANATION
    on_session_end = None   # no job of its own (the examples' job is the server's)

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.where = pn.pane.Markdown(WHERE_TO_START, sizing_mode="stretch_width")
        self.examples_panel = examples.ExamplesPanel(datastore=self.datastore)
        self.plot = pn.pane.Plotly(None, sizing_mode="stretch_width", height=330)   # drawn when laid out
        self.caption = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.pages_table = pn.pane.Markdown(self._pages_markdown(), sizing_mode="stretch_width")
        self.examples_list = pn.pane.Markdown(self._examples_markdown(), sizing_mode="stretch_width")

    def _pages_markdown(self) -> str:
        rows = [f"| **{escape_md(cls.title)}** | {escape_md(page_line(cls))} |"
                for cls in pages() if cls is not StartPage and cls.shown_to(self.datastore)]
        return "| Page | What it measures |\n|---|---|\n" + "\n".join(rows)

    def _examples_markdown(self) -> str:
        items = [f"- *{escape_md(e.name)}*: {escape_md(e.about)} ({escape_md(', '.join(e.pages))})"
                 for e in engine_examples.EXAMPLES]
        return "**The example runs** (owner *examples*; the pages that open on each):\n\n" + "\n".join(items)

    def side(self):
        return [self.where, pn.pane.Markdown("### The example runs", margin=(0, 10)), self.examples_panel]

    def figures(self):
        return [self.plot, self.caption, self.pages_table, self.examples_list]

    def as_code(self) -> str:
        return ("import workbench as wb\n"
                "wb.examples.status()        # the example runs: ready, removed or being made\n"
                "# wb.examples.remove()      # delete them (your runs stay)\n"
                "# wb.examples.restore()     # make them again (about a minute)")

    def __panel__(self):
        layout = super().__panel__()   # shows the example, if there is one
        if self.plot.object is None:
            self.plot.object = _figure("", lambda: growth_curves(None, title=EMPTY_TITLE))
        return layout

    def show_example(self) -> bool:
        run_id = examples.example_id(self.datastore, "grow-1")
        if run_id is None:
            return False
        store = self.datastore.store

        def build():
            metrics = store.read_metrics(run_id)   # the evaluations (the per-step batch loss is the Grow page's)
            return growth_curves(metrics[metrics["split"] != "batch"], title=EXAMPLE_TITLE)

        self.plot.object = _figure(run_id, build)
        self.caption.object = ("Loss and accuracy of the example grown model: one block trained, then stacked to two "
                               "(G_stack) and trained on. Open **Grow** to move through its stages, **Residual "
                               "stream** to read what each block writes.")
        return True
