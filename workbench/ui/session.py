"""One browser session: who it is (its user, its queue owner), its runs (:class:`DataStore`), the store as
its user may see it (:class:`UserStore`), the server's job queue, and opening stored runs safely.

A run id or a dataset spec that comes from the browser is never trusted: :func:`open_run` refuses a vanished,
forged or foreign run naming the field, :func:`dataset_from_spec` never reads a server path.
"""
from __future__ import annotations

import os
import re
import threading
import uuid
from typing import Any

import pandas as pd
import panel as pn
import param

from ..core import data
from ..io.store import RunStore, StoreError, check_user
from ..runtime import jobs

__all__ = ["DataStore", "UserStore", "RUN_COLUMNS", "open_run", "dataset_from_spec", "job_queue",
           "session_user", "session_id", "QUEUE_KEY"]


# the columns of RunStore.list(), for an empty listing when the index cannot be read
RUN_COLUMNS = ["run_id", "name", "created", "dataset", "family", "n_layers", "d_model", "steps", "status",
               "val_loss", "val_acc", "group_name", "stage", "parent", "owner", "shared"]


class UserStore:
    """The run store as one signed-in user sees it (classroom mode); everything else is the store's.

    ``save`` records ``owner``; ``list``, ``load``, ``read_json``, ``read_metrics`` and ``delete`` act for
    ``viewer``: a student (``viewer`` = their name) lists and opens their own runs and the shared ones and
    deletes only their own; a teacher (``viewer=None``) sees and deletes every run. Only a teacher shares
    and rebuilds the index. The arguments a caller passes for these (``owner=``, ``user=``) are ignored:
    the session decides. Nothing else of the store is reachable through the view but its locations
    (``root``, ``runs_dir``, ``index_path``) and ``index_error``.
    """

    _FORWARDED = frozenset({"root", "runs_dir", "index_path", "index_error"})

    def __init__(self, store: RunStore, owner: str, viewer: str | None):
        self._store, self.owner, self.viewer = store, owner, viewer

    def save(self, run, name: str | None = None, owner=None) -> str:
        return self._store.save(run, name=name, owner=self.owner)

    def list(self, user=None) -> pd.DataFrame:
        return self._store.list(user=self.viewer)

    def load(self, run_id: str, device=None, *, allow_nonfinite: bool = False, user=None):
        return self._store.load(run_id, device, allow_nonfinite=allow_nonfinite, user=self.viewer)

    def read_json(self, run_id: str) -> dict:
        doc = self._store.read_json(run_id)
        if self.viewer is not None and doc.get("owner") != self.viewer and not doc.get("shared", False):
            raise StoreError(f"run {run_id!r} belongs to another user and is not shared: "
                             f"{self.viewer!r} cannot open it")
        return doc

    def read_metrics(self, run_id: str, user=None) -> pd.DataFrame:
        return self._store.read_metrics(run_id, user=self.viewer)

    def rebuild_index(self) -> dict:
        if self.viewer is not None:
            raise StoreError(f"only a teacher can rebuild the run index; {self.viewer!r} is not one "
                             "(WORKBENCH_TEACHERS)")
        return self._store.rebuild_index()

    def delete(self, run_id: str, user=None) -> None:
        self._store.delete(run_id, user=self.viewer)

    def share(self, run_id: str, shared: bool = True) -> None:
        if self.viewer is not None:
            raise StoreError(f"only a teacher can share runs; {self.viewer!r} is not one (WORKBENCH_TEACHERS)")
        self._store.share(run_id, shared=shared)

    def broken(self) -> pd.DataFrame:
        """Run folders failing validation: their owner cannot be read, so only a teacher sees them."""
        broken = self._store.broken()
        return broken if self.viewer is None else broken.iloc[:0]

    def __getattr__(self, name):
        if name in UserStore._FORWARDED:
            return getattr(self._store, name)
        raise AttributeError(f"a signed-in user's view of the run store has no {name!r}")

    def __repr__(self) -> str:
        return f"UserStore({self._store!r}, owner={self.owner!r}, viewer={self.viewer!r})"


class DataStore(param.Parameterized):
    """Owns the run store for one browser session; pages read ``runs`` and call ``save``/``load``.

    ``session_models`` holds models that live only in this session and are not in the store
    (e.g. a logit mixture built on the Compose page, for the Residual stream page):
    ``{name: model}``, with what a page needs to feed them in ``session_info[name]``
    (``vocab``, ``members`` (names), ``datasets`` (``{domain: dataset spec}``)). Nothing is
    saved; another browser session has its own DataStore and does not see them.
    """

    runs = param.DataFrame(default=None, doc="RunStore.list() as of the last refresh")
    version = param.Integer(default=0, doc="bumped on every change so pages can watch it")
    index_error = param.String(default="", doc="why the run index is unusable (then ``runs`` is empty)")

    user = param.String(default=None, allow_None=True,
                        doc="the signed-in user (pn.state.user when the page was built; None without sign-in)")

    def __init__(self, store: RunStore | None = None, user: str | None = None, **params):
        if user is None and pn.state.curdoc is not None:
            user = pn.state.user or None
        if user is not None:   # untrusted (a login form, an OAuth provider): never falls back to "no sign-in"
            check_user("signed-in user", user)
        super().__init__(user=user, **params)
        self.raw_store = store if store is not None else RunStore()
        self.session_id = session_id()   # the queue's owner without sign-in
        self.session_models: dict[str, Any] = {}
        self.session_info: dict[str, dict] = {}
        self.refresh()

    @property
    def store(self):
        """The run store as this session's user sees it: the store itself without sign-in; with sign-in a
        :class:`UserStore` (saves owned by the user; a student sees their own and the shared runs, a
        teacher -- named in ``WORKBENCH_TEACHERS`` -- every run)."""
        if self.user is None:
            return self.raw_store
        return UserStore(self.raw_store, self.user, None if self.is_teacher else self.user)

    @property
    def classroom(self) -> bool:
        """Whether sign-in is on (a user is signed in): runs belong to users."""
        return self.user is not None

    @property
    def is_teacher(self) -> bool:
        """Whether the signed-in user is one of ``WORKBENCH_TEACHERS``."""
        from ..runtime import classroom

        return self.user is not None and classroom.is_teacher(self.user)

    def can_delete(self, owner) -> bool:
        """Whether this session may delete a run of ``owner`` (None: saved without sign-in)."""
        return self.user is None or self.is_teacher or owner == self.user

    @property
    def is_student(self) -> bool:
        """Whether this session is a signed-in user who is not a teacher: their jobs have a budget."""
        return self.user is not None and not self.is_teacher

    @property
    def queue_user(self) -> str:
        """Who this session's jobs belong to in the job queue: the signed-in user, else the session. A student
        is marked as one in the server's queue here (``JobQueue.add_student``: their jobs get the teacher's
        budget), so every page and the sweeps, which all submit as this user, are covered."""
        user = self.user or self.session_id
        if self.is_student:
            job_queue().add_student(user)
        return user

    def job_budget(self) -> "jobs.Budget | None":
        """The budget this session's next job gets (a student's: steps and seconds), or None (no cap)."""
        return job_queue().budget_for(self.queue_user)

    def add_session_model(self, name: str, model, **info) -> str:
        """Register ``model`` under ``name`` for this session only (replacing one of that name); bumps ``version``.

        ``info``: keyword metadata kept in ``session_info[name]`` (see the class docstring).
        """
        self.session_models.pop(name, None)  # a replaced model moves to the end: the newest
        self.session_models[name] = model
        self.session_info[name] = dict(info)
        self.version += 1
        return name

    def refresh(self) -> None:
        """Read the run list again. A corrupt or foreign ``index.sqlite`` (:class:`StoreError`) is not
        fatal: ``runs`` becomes empty, ``index_error`` says why and :meth:`rebuild_index` repairs it."""
        try:
            runs, error = self.store.list(), ""
        except StoreError as e:
            runs, error = pd.DataFrame(columns=RUN_COLUMNS), str(e)
        self.runs, self.index_error = runs, error
        self.version += 1

    @property
    def may_rebuild(self) -> bool:
        """Whether this session may rebuild the run index: no sign-in (a laptop), or a teacher."""
        return self.user is None or self.is_teacher

    def rebuild_index(self) -> dict:
        """``RunStore.rebuild_index()`` (the old file is kept aside), then :meth:`refresh`. A teacher's (or the
        laptop's) action: a student gets a StoreError saying so. Slow on a large store: the pages run it
        as a job (:class:`workbench.ui.page.IndexNotice`)."""
        if not self.may_rebuild:
            raise StoreError(f"only a teacher can rebuild the run index; {self.user!r} is not one (WORKBENCH_TEACHERS)")
        report = self.store.rebuild_index()
        self.refresh()
        return report

    def broken(self) -> pd.DataFrame:
        """Run directories that exist but fail validation (``RunStore.broken``)."""
        return self.store.broken()

    def save(self, run, name: str | None = None) -> str:
        run_id = self.store.save(run, name=name)
        self.refresh()
        return run_id

    def load(self, run_id: str):
        return self.store.load(run_id)

    def delete(self, run_id: str) -> None:
        self.store.delete(run_id)
        self.refresh()


_SERVER_PATH = re.compile(r"(?<![\w.])/[^\s:'\"]+")


def open_run(store, run_id, field: str):
    """The stored run ``run_id`` for a page's job (``store.load``, owner-checked). A run id that vanished, was
    forged or is another user's is refused as a ``ValueError`` naming the ``field`` (e.g. "model A") with
    the store's reason, server paths left out."""
    try:
        return store.load(run_id)
    except StoreError as e:
        raise ValueError(f"{field}: {_SERVER_PATH.sub('(the run store)', str(e))}") from None


def dataset_from_spec(spec: dict) -> "data.Dataset":
    """Rebuild a stored run's dataset for the dashboard: never from a server path.

    ``data.from_spec(spec, allow_path=False)``: a spec naming a file (``path``) is refused, since the
    browser must not make the server read its files (text comes by upload and is stored in the spec).
    """
    return data.from_spec(spec, allow_path=False)


QUEUE_KEY = "workbench.queue"   # pn.state.cache key of the server's JobQueue (apps/app_hooks.py)
_DEFAULT_QUEUE: "jobs.JobQueue | None" = None
_DEFAULT_LOCK = threading.Lock()


def job_queue() -> "jobs.JobQueue":
    """The queue every page's long computation goes through.

    Served: the server's one queue (``pn.state.cache[QUEUE_KEY]``, made by ``apps/app_hooks.py``).
    Without a server (tests, notebooks): a module-level default queue made on first use, on threads
    (settings from the environment; torch threads per job: ``WORKBENCH_THREADS``, else the process's
    current ``torch.get_num_threads()``, so a notebook's own setting is kept).
    """
    served = pn.state.cache.get(QUEUE_KEY)
    if served is not None and not served.closed:
        return served
    global _DEFAULT_QUEUE
    with _DEFAULT_LOCK:
        if _DEFAULT_QUEUE is None or _DEFAULT_QUEUE.closed:
            threads = None
            if not os.environ.get("WORKBENCH_THREADS", "").strip():
                import torch

                threads = torch.get_num_threads()
            _DEFAULT_QUEUE = jobs.JobQueue(threads=threads, executor="threads")
        return _DEFAULT_QUEUE


def session_user() -> str:
    """Who owns this session's jobs in the queue: the signed-in user, else the browser session's id.

    Outside a session (tests, notebooks): ``"local-<random>"``, new at each call.
    """
    user = pn.state.user if pn.state.curdoc is not None else None
    return str(user) if user else session_id()


def session_id() -> str:
    """``"session-<id>"`` of the browser session; outside one ``"local-<random>"``, new at each call."""
    ctx = getattr(pn.state.curdoc, "session_context", None) if pn.state.curdoc is not None else None
    sid = getattr(ctx, "id", None)
    return f"session-{sid}" if sid else f"local-{uuid.uuid4().hex[:12]}"
