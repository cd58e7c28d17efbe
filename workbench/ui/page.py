"""The base of every dashboard page, and the registry the app and the browser test read.

A page is one :class:`Page` subclass with a ``title`` (and an ``order``): defining the class registers
it, and :func:`pages` lists every page of ``workbench.ui`` in order. The base holds what every page
has: the data store (a ``param.ClassSelector``), a title and an explanation, the "As code" box (the
engine calls that reproduce the page's figure, from :meth:`Page.as_code`), one background task with
its progress bar and Stop button, the error box, and a notice with a "Rebuild index" button when the
run index cannot be read. Its layout puts the few choices that matter in a side column
(:meth:`Page.side`), the figures next to it, above the fold (:meth:`Page.figures`), and everything
else in a collapsed "Advanced" card (:meth:`Page.advanced`).

Adding a page: a new module in ``workbench/ui`` with ``class MyPage(Page): title = "Mine"; order = 70``
and the four methods; nothing else lists it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

import panel as pn
import param

from .session import DataStore
from .task import BackgroundTask
from .text import code_block, escape_md
from .widgets import ErrorBox, deferred_card

__all__ = ["Page", "REGISTRY", "pages", "IndexNotice"]

REGISTRY: dict[str, type["Page"]] = {}


def pages() -> list[type["Page"]]:
    """Every registered page class, in ``order`` (importing each module of ``workbench.ui`` once)."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{info.name}")
    return sorted(REGISTRY.values(), key=lambda cls: (cls.order, cls.title))


NOT_YOURS_TO_REBUILD = ("Rebuilding the run index is a teacher's action on a classroom server: ask your teacher "
                        "(your runs are safe in their folders; only the listing is affected).")


def _rebuild_job(ctx, store):
    """The page job of "Rebuild index": ``store.rebuild_index()`` (a ``RunStore``, or a teacher's view of it)."""
    ctx.report(message="rebuilding the run index from the run folders")
    return store.rebuild_index()


_rebuild_job.remote = False   # the server's own store, on the server's threads (never shipped to a worker)


class IndexNotice(pn.viewable.Viewer):
    """Shown when the run index is corrupt or foreign: the store's message and a "Rebuild index" button.

    Rebuilding reads every run folder (seconds on a class's store) and holds the store's lock, so it runs
    as a job of the queue (:func:`_rebuild_job`), never in the click handler. It is a teacher's action
    (or the laptop's, without sign-in): a student sees no button, and a click that reaches the server
    anyway (an unhidden button) is refused here, in the action, and again by the student's store view.
    """

    datastore = param.ClassSelector(class_=DataStore)

    def __init__(self, **params):
        super().__init__(**params)
        self.alert = pn.pane.Alert("", alert_type="warning", sizing_mode="stretch_width")
        self.button = pn.widgets.Button(name="Rebuild index", button_type="warning", width=140)
        self.button.on_click(lambda _: self.rebuild())
        self.status = pn.pane.Markdown("", margin=(0, 10))
        self.layout = pn.Column(self.alert, pn.Row(self.button, self.status), visible=False,
                                sizing_mode="stretch_width")
        self.task: BackgroundTask | None = None   # made at the first rebuild (pages are built at every session start)
        self._sync()

    @param.depends("datastore.index_error", watch=True)
    def _sync(self) -> None:
        error = self.datastore.index_error
        allowed = self.datastore.may_rebuild
        self.alert.object = (f"**The run index cannot be read**: {escape_md(error)}"
                             + ("" if allowed else f"\n\n{escape_md(NOT_YOURS_TO_REBUILD)}") if error else "")
        self.button.visible = allowed
        self.layout.visible = bool(error)

    def rebuild(self) -> bool:
        """Start ``RunStore.rebuild_index()`` as a job (then a fresh listing); returns whether it started.
        Refused, with the reason in the notice, for a student and while a rebuild runs; a failure is
        shown in the notice."""
        if not self.datastore.may_rebuild:
            self.alert.object = f"**Rebuild index refused**: {escape_md(NOT_YOURS_TO_REBUILD)}"
            self.layout.visible = True
            return False
        if self.task is None:
            self.task = BackgroundTask(on_done=self._rebuilt, on_session_end="finish",
                                       user=lambda: self.datastore.queue_user, job_name="rebuild index")
            self.task.param.watch(self._task_changed, ["status", "message", "error", "notice"])
        started = self.task.start(_rebuild_job, self.datastore.store)
        self._task_changed()
        return started

    def _task_changed(self, *_) -> None:
        t = self.task
        if t.error:
            self.alert.object = f"**Rebuilding the index failed**: {escape_md(t.error)}"
            self.layout.visible = True
        self.status.object = escape_md(t.status_text()) if t.status in ("running", "error") or t.notice else ""

    def _rebuilt(self, report) -> None:
        self.datastore.refresh()
        self.status.object = escape_md(f"index rebuilt: {len(report['indexed'])} runs, {len(report['broken'])} "
                                       "folder(s) failing validation")

    def __panel__(self):
        return self.layout


class Page(pn.viewable.Viewer):
    """One dashboard page over the session's :class:`DataStore`.

    Subclasses set ``title``, ``order`` and ``explanation`` and implement :meth:`side`, :meth:`figures`,
    :meth:`advanced` and :meth:`as_code`; the task's results arrive in :meth:`on_update` and
    :meth:`on_done`, store changes in :meth:`on_store_change`. ``on_session_end`` is the task's
    (``"stop"``, or ``"finish"`` for jobs that save their result in the worker), ``None`` for a page
    without a background task.
    """

    datastore = param.ClassSelector(class_=DataStore, doc="the session's runs")
    task = param.ClassSelector(class_=BackgroundTask, allow_None=True, doc="the page's background job")

    title: ClassVar[str] = ""
    order: ClassVar[int] = 100
    explanation: ClassVar[str] = ""
    on_session_end: ClassVar[str | None] = "stop"
    side_width: ClassVar[int] = 340

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("title"):
            REGISTRY[cls.title] = cls

    def __init__(self, datastore: DataStore | None = None, **params):
        datastore = datastore if datastore is not None else DataStore()
        task = (BackgroundTask(on_update=self._task_update, on_done=self._task_done,
                               on_session_end=self.on_session_end, user=lambda: self.datastore.queue_user,
                               job_name=self.title, student=lambda: self.datastore.is_student)
                if self.on_session_end else None)
        super().__init__(datastore=datastore, task=task, **params)
        self.errors = ErrorBox()
        self.code = pn.pane.Markdown("", sizing_mode="stretch_width")
        self.index_notice = IndexNotice(datastore=datastore)
        self.example_note = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width",
                                          margin=(0, 10, 5, 10))
        self.showing_example = False   # the figures show a starter example (workbench.ui.examples)
        self._layout = None

    # ---------------------------------------------------------------- to implement
    def side(self) -> list:
        """The few choices that matter (data or task, preset, the main knob) and the Run button."""
        return []

    def figures(self) -> list:
        """The figures (and the result line), shown next to the side column."""
        return []

    def advanced(self) -> list:
        """Everything else, in the collapsed "Advanced" card."""
        return []

    def below(self) -> list:
        """Further results under the figures (tables, samples)."""
        return []

    def run_buttons(self) -> list:
        """Buttons disabled while the task runs."""
        return []

    def as_code(self) -> str:
        """The engine calls that reproduce the page's figure for the current choices."""
        return "import workbench as wb"

    def on_update(self, payload) -> None:
        """A progress payload of the task; by default a dict goes to :meth:`show`."""
        if isinstance(payload, dict):
            self.show(payload)

    def on_done(self, result) -> None:
        """The task's result; by default a dict goes to :meth:`show`."""
        if isinstance(result, dict):
            self.show(result)

    def show(self, payload: dict) -> None:
        """Draw a job's partial or final results (pages whose jobs send dicts)."""

    def on_status(self, status: str) -> None:
        pass

    @classmethod
    def shown_to(cls, datastore: DataStore) -> bool:
        """Whether the session of ``datastore`` gets this page as a tab (every page; the Teacher page: teachers)."""
        return True

    def show_example(self) -> bool:
        """Draw a starter example (:mod:`workbench.ui.examples`: preselect its run, show its stored result) when
        the page has nothing of its own to show yet; returns whether it did. Called when the page is first
        laid out and, until it shows one, whenever the session's runs change (the examples arrive)."""
        return False

    def fresh(self) -> bool:
        """Whether the page has started nothing of its own yet (its task never ran): an example may be shown."""
        return self.task is None or self.task.status == "idle"

    def show_note(self, text: str) -> None:
        """The line above the figures while they show an example ("" hides it)."""
        self.example_note.object = text
        self.example_note.visible = bool(text)

    def on_store_change(self) -> None:
        pass

    # ---------------------------------------------------------------- wiring (once, here)
    def _task_update(self, payload) -> None:
        self.on_update(payload)

    def _task_done(self, result) -> None:
        self.on_done(result)

    @param.depends("task.status", watch=True)
    def _status_changed(self) -> None:
        running = self.task is not None and self.task.status == "running"
        for button in self.run_buttons():
            button.disabled = running
        if self.task is not None and self.task.status == "error" and self.task.error:
            self.errors.show(self.task.error)   # a refusal found in the job (a vanished run, a model) is shown as one
        if running and self.showing_example:   # the user's own job replaces the example
            self.showing_example = False
            self.show_note("")
        self.on_status(self.task.status if self.task is not None else "idle")

    @param.depends("datastore.version", watch=True)
    def _store_changed(self) -> None:
        self.on_store_change()
        if self._layout is not None:
            self._try_example()

    def _try_example(self) -> None:
        if self.showing_example:
            return
        try:
            self.showing_example = bool(self.show_example())
        except Exception as e:  # noqa: BLE001 -- an unreadable example must not break the page
            self.showing_example = False
            self.show_note("")
            self.errors.show(f"the example could not be shown: {e}")

    def read_form(self, read):
        """The start prologue of every Run button: ``read()`` (the form's validated values, never None), or
        None when the page's job is still running or a field is out of range -- the error box then names
        the field and its allowed range (``read`` raises ValueError or TypeError saying so)."""
        if self.task is not None and self.task.busy():
            return None
        self.errors.clear()
        try:
            return read()
        except (ValueError, TypeError) as e:
            self.errors.show(e)
            return None

    def check_steps(self, steps, field: str = "steps") -> None:
        """Refuse a form asking for more training steps than this session's job budget (a student's on a class
        server; ``steps``: what the job would train in all): ValueError naming ``field``, for the error box.
        Without a budget, or when ``steps`` is not a number yet (the form's own check says so), nothing."""
        budget = self.datastore.job_budget()
        if budget is None or budget.max_steps is None or isinstance(steps, bool) or not isinstance(steps, int):
            return
        if steps > budget.max_steps:
            raise ValueError(f"{field} must be at most {budget.max_steps:,} in all for a student's job (the teacher's "
                             f"step budget), got {steps:,}")

    def start_task(self, fn, *args, wait: bool = False) -> bool:
        """Start ``fn(ctx, *args)`` on the page's task (``wait=True``: synchronously, for tests)."""
        return (self.task.run_now if wait else self.task.start)(fn, *args)

    def show_code(self, code: str | None = None) -> None:
        """Put ``code`` (by default :meth:`as_code` of the current choices) into the "As code" box."""
        if code is None:
            try:
                code = self.as_code()
            except (ValueError, TypeError) as e:  # a field out of range: the box says which
                code = f"# fix the form first: {e}"
        self.code.object = code_block(code.strip())

    # ---------------------------------------------------------------- layout
    def controls(self) -> list:
        return [self.task.controls()] if self.task is not None else []

    def __panel__(self):
        if self._layout is None:
            self.show_code()
            side = pn.Column(*self.side(), *self.controls(), width=self.side_width, margin=(0, 10, 0, 0))
            main = pn.Column(
                self.index_notice, self.errors, self.example_note, *self.figures(),
                sizing_mode="stretch_width")
            # both cards start collapsed: their content is laid out when first opened (deferred_card)
            self.advanced_card = deferred_card(self.advanced, title="Advanced", sizing_mode="stretch_width",
                                               css_classes=["wb-advanced"])
            about = pn.pane.Markdown(self.explanation, sizing_mode="stretch_width")
            self.code_card = deferred_card(lambda: [self.code], sizing_mode="stretch_width",
                                           title="As code (run this in a notebook to get the same figure)")
            self._layout = pn.Column(
                pn.pane.Markdown(f"## {escape_md(self.title)}", margin=(0, 10)),
                pn.Row(side, main, sizing_mode="stretch_width"),
                *self.below(), self.advanced_card, about, self.code_card,
                sizing_mode="stretch_width")
            self._try_example()
        return self._layout
