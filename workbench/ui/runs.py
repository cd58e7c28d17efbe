"""Runs page: the stored runs as a table; curves and config of the selected one; delete; CSV export.

The browser is not trusted with run ids: Panel's Tabulator takes ``value`` (the rows) and ``selection``
from the client even when the table is disabled, so a forged row could name any run id or a path. The
page keeps the listing it showed in ``rows`` (server side) and maps a selection to it by position only,
bounds-checked; every file of a run is read through the session's store view, which checks the id and
the owner (:meth:`workbench.store.RunStore.read_metrics`, ``read_json``)."""
from __future__ import annotations

import io

import pandas as pd
import panel as pn

from ..figures.training import config_table, training_curves
from ..io.store import StoreError
from .text import escape_md, short_spec
from .page import Page
from .examples import ExamplesPanel, example_id

EXPLANATION = """Every run saved by any page or notebook (one directory each: config JSON, safetensors
weights, metrics CSV). Select a row to see its curves and configuration, export its metrics, or
delete it. Signed in to a classroom server, you see your own runs and the runs your teacher shared
(read-only: only their owner deletes a run)."""

CODE = """import workbench as wb
store = wb.RunStore()           # $WORKBENCH_HOME or the user data directory
store.list()                    # this table (store.rebuild_index() if the index is damaged)"""
CODE_RUN = """
run = store.load({run_id!r})    # model, metrics, configs
wb.figures.training.training_curves(run.metrics, title=run.name)"""

_SHOWN = ["name", "dataset", "family", "n_layers", "d_model", "steps", "status", "val_loss", "val_acc", "stage",
          "created", "run_id"]
_CLASSROOM = ["owner", "shared"]   # shown with sign-in on


class RunsPage(Page):
    title = "Runs"
    order = 70
    explanation = EXPLANATION
    on_session_end = None  # no background job

    def __init__(self, datastore=None, **params):
        super().__init__(datastore, **params)
        self.table = pn.widgets.Tabulator(pd.DataFrame(columns=_SHOWN), selectable=1, disabled=True,
                                          show_index=False, pagination="local", page_size=12,
                                          sizing_mode="stretch_width", height=380)
        self.refresh_button = pn.widgets.Button(name="Refresh", width=90)
        self.refresh_button.on_click(lambda _: self.datastore.refresh())
        self.delete_button = pn.widgets.Button(name="Delete…", button_type="danger", width=90, disabled=True)
        self.confirm_button = pn.widgets.Button(name="Yes, delete this run", button_type="danger", visible=False)
        self.cancel_button = pn.widgets.Button(name="Keep it", visible=False)
        self.delete_button.on_click(lambda _: self._ask_delete())
        self.confirm_button.on_click(lambda _: self.delete_selected())
        self.cancel_button.on_click(lambda _: self._hide_confirm())
        self.download = pn.widgets.FileDownload(callback=self._metrics_csv, filename="metrics.csv",
                                                label="Export metrics CSV", button_type="default", disabled=True)
        self.read_only_note = pn.pane.Markdown("", visible=False, margin=(0, 10))
        self.broken_note = pn.pane.Markdown("", visible=False, sizing_mode="stretch_width")
        self.broken_view = pn.widgets.Tabulator(pd.DataFrame(columns=["run_id", "path", "problem"]), disabled=True,
                                                show_index=False, visible=False, sizing_mode="stretch_width",
                                                height=160)
        self.plot = pn.pane.Plotly(training_curves(None), sizing_mode="stretch_width", height=340)
        self.config_view = pn.widgets.Tabulator(pd.DataFrame(columns=["field", "value"]), disabled=True,
                                                show_index=False, height=300, width=420)
        self.rows = pd.DataFrame(columns=_SHOWN)   # what the table shows, as the server listed it
        self.examples_panel = ExamplesPanel(datastore=self.datastore)   # Remove / Restore the examples
        self.table.param.watch(self._show_selected, "selection")
        self._refresh_table()

    def on_store_change(self) -> None:
        self._refresh_table()

    @property
    def selected_id(self) -> str | None:
        """The run id of the selected row of the server's own listing (``rows``); None unless exactly one
        row in range is selected (the selection comes from the browser: only its position is used)."""
        sel = self.table.selection
        if not isinstance(sel, list) or len(sel) != 1:
            return None
        i = sel[0]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.rows):
            return None
        return str(self.rows["run_id"].iloc[i])

    def select(self, run_id: str) -> None:
        ids = list(self.rows["run_id"])
        self.table.selection = [ids.index(run_id)]

    def _columns(self) -> list[str]:
        return _SHOWN + (_CLASSROOM if self.datastore.classroom else [])

    def _refresh_table(self) -> None:
        runs = self.datastore.runs
        cols = self._columns()
        if runs is not None and len(runs):
            runs = runs.reindex(columns=cols).reset_index(drop=True)
        self.rows = runs if runs is not None and len(runs) else pd.DataFrame(columns=cols)
        self.table.value = self.rows.copy()   # the browser's copy: may be forged, never read back
        self.table.selection = []
        broken = self.datastore.broken()
        self.broken_view.value = broken
        self.broken_view.visible = self.broken_note.visible = bool(len(broken))
        self.broken_note.object = (f"**{len(broken)} run folder(s) fail validation** and are not listed "
                                   "(shown as text below; fix or remove them, then *Rebuild index*):")
        self._show_selected()

    def _show_selected(self, _=None) -> None:
        run_id = self.selected_id
        self._hide_confirm()
        self.delete_button.disabled = self.download.disabled = run_id is None
        self.read_only_note.visible = False
        if run_id is not None and not self.datastore.can_delete(self._owner(run_id)):
            self.delete_button.disabled = True      # a shared run of someone else: read-only
            self.read_only_note.object = f"shared by {escape_md(self._owner(run_id))}: read-only"
            self.read_only_note.visible = True
        self.errors.clear()
        if run_id is None:
            self.plot.object = training_curves(None)
            self.config_view.value = pd.DataFrame(columns=["field", "value"])
            return
        try:
            doc = self.datastore.store.read_json(run_id)
            metrics = self.datastore.store.read_metrics(run_id)
        except Exception as e:  # a corrupt run must not break the page
            self.errors.show(e)
            return
        self.download.filename = f"{run_id}-metrics.csv"
        self.plot.object = training_curves(metrics, title=doc["name"])
        shown = {k: doc[k] for k in ("model", "train", "dataset", "meta") if k in doc}
        if "dataset" in shown:
            shown["dataset"] = short_spec(shown["dataset"])  # an uploaded text is not printed whole
        self.config_view.value = config_table(shown)
        self.show_code()

    def as_code(self) -> str:
        run_id = self.selected_id
        return CODE + (CODE_RUN.format(run_id=run_id) if run_id else "")

    def _metrics_csv(self):
        """The selected run's metrics as CSV, read through the owner-checked store. Nothing selected (a
        click on the button forged while it is disabled) or a refusal: the error box says why and the
        download is empty."""
        run_id = self.selected_id
        if run_id is None:
            self.errors.show("Export metrics CSV: select one run in the table first")
            return io.StringIO("")
        try:
            metrics = self.datastore.store.read_metrics(run_id)
        except (StoreError, ValueError) as e:
            self.errors.show(f"Export metrics CSV: {e}")
            return io.StringIO("")
        return io.StringIO(metrics.to_csv(index=False))

    def _owner(self, run_id: str):
        rows = self.rows
        if "owner" not in rows:
            return None
        owner = rows.loc[rows["run_id"] == run_id, "owner"]
        return None if owner.empty or pd.isna(owner.iloc[0]) else owner.iloc[0]

    def _ask_delete(self) -> None:
        run_id = self.selected_id
        self.confirm_button.visible = self.cancel_button.visible = (
            run_id is not None and self.datastore.can_delete(self._owner(run_id)))

    def _hide_confirm(self) -> None:
        self.confirm_button.visible = self.cancel_button.visible = False

    def delete_selected(self) -> None:
        run_id = self.selected_id
        self._hide_confirm()
        if run_id is not None:
            try:
                self.datastore.delete(run_id)      # the store refuses another owner's run
            except (StoreError, ValueError) as e:
                self.errors.show(e)

    def show_example(self) -> bool:
        """The example MLP's row selected (its curves and configuration) while nothing is selected."""
        run_id = example_id(self.datastore, "pair-a")
        if run_id is None or self.selected_id is not None or run_id not in list(self.rows["run_id"]):
            return False
        self.select(run_id)
        return True

    def side(self):
        return [self.refresh_button, self.delete_button, self.read_only_note, self.confirm_button, self.cancel_button,
                self.download, pn.pane.Markdown("**The example runs**", margin=(10, 10, 0, 10)), self.examples_panel]

    def figures(self):
        return [self.plot, self.table]

    def below(self):
        return [pn.Row(self.config_view, pn.Column(self.broken_note, self.broken_view, sizing_mode="stretch_width"),
                       sizing_mode="stretch_width")]
