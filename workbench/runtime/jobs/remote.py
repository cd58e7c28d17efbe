"""Jobs on Dask workers that use the server: its run store, and the dashboard's page jobs.

``submit(..., services={"store.save": fn, ...})`` names functions a task may run in the submitting
process (``current().call("store.save", files, name)``). A :class:`RemoteStore` is the server's run store
seen from a worker: runs travel as their files (:func:`workbench.io.store.pack_run`) and the server's store
object saves them (owners stay its business). ``submit(..., local=True)`` runs one job on this process's
threads even on Dask (a job that cannot be shipped: :func:`plan` says why).
"""
from __future__ import annotations

from typing import Any, Callable

from ...core.checks import check_str
from ...core.monitor import current


# ----------------------------------------------------------------------------- the server's store, from a worker


class RemoteStore:
    """A picklable stand-in for the server's run store, for a job that runs on a Dask worker.

    ``save(run, name=None, owner=None) -> run_id`` sends the run's files (:func:`workbench.store.pack_run`:
    safetensors, run.json, metrics.csv; no pickle) to the server's ``"store.save"`` service, which
    saves them in its store (the store's only writer); ``load(run_id)`` and ``read_json(run_id)``
    ask ``"store.load"`` / ``"store.read_json"``. Who owns a saved run and who may open which run
    is the server's store object's business (a ``UserStore`` in classroom mode): ``owner`` and
    ``user`` given here are ignored. :meth:`services` makes the three services for a store object.
    """

    def __init__(self, label: str = "the server's run store"):
        self.label = label
        self._saved: dict[int, tuple[Any, str]] = {}   # id(run) -> (run, run_id): runs saved from this process

    def __getstate__(self):
        return {"label": self.label}

    def __setstate__(self, state):
        self.label, self._saved = state["label"], {}

    def save(self, run, name: str | None = None, owner=None) -> str:
        from ...io.store import pack_run

        if name is not None and not isinstance(name, str):
            raise ValueError(f"name must be a non-empty str or None, got {name!r}")
        run_id = current().call("store.save", pack_run(run), name)
        if not isinstance(run_id, str):
            raise RuntimeError(f"store.save answered {type(run_id).__name__}, not a run id")
        run.run_id = run_id
        self._saved[id(run)] = (run, run_id)
        return run_id

    def saved_id(self, run) -> str | None:
        """The id ``run`` (this very object) was saved under through this stand-in, or None."""
        entry = self._saved.get(id(run))
        return entry[1] if entry is not None and entry[0] is run else None

    def load(self, run_id: str, device=None, *, allow_nonfinite: bool = False, user=None):
        from ...io.store import unpack_run

        check_str("run_id", run_id, 1000)
        if not isinstance(allow_nonfinite, bool):
            raise ValueError(f"allow_nonfinite must be True or False, got {allow_nonfinite!r}")
        run = unpack_run(current().call("store.load", run_id, allow_nonfinite), device,
                         allow_nonfinite=allow_nonfinite)
        run.run_id = run_id
        return run

    def read_json(self, run_id: str) -> dict:
        check_str("run_id", run_id, 1000)
        return current().call("store.read_json", run_id)

    @staticmethod
    def services(store) -> dict[str, Callable]:
        """``{"store.save", "store.load", "store.read_json": function}`` acting on ``store`` (a ``RunStore``
        or ``UserStore``), for ``JobQueue.submit(services=...)``; they do not need a browser session."""
        from ...io.store import pack_run, unpack_run

        def save(files, name=None):
            # what the worker trained, as it trained it (a diverged run's NaN weights are saved, as locally)
            return store.save(unpack_run(files, allow_nonfinite=True), name=name)

        def load(run_id, allow_nonfinite=False):
            return pack_run(store.load(run_id, allow_nonfinite=bool(allow_nonfinite)))

        def read_json(run_id):
            return store.read_json(run_id)

        return {"store.save": save, "store.load": load, "store.read_json": read_json}

    def __repr__(self) -> str:
        return f"RemoteStore({self.label!r})"
