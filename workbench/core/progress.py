"""TrainProgress: a monitor (:mod:`workbench.core.monitor`) seen as :func:`workbench.train`'s callbacks.

The one adapter between a training loop and whoever watches it: a dashboard page's job, a sweep's point,
a Dask worker or a notebook. It stops the training when the monitor is stopped (Stop pressed, or a
student's step budget used up: ``train`` itself asks the job before each step) and reports the steps
done; what it sends as the payload is the caller's choice (``payload``).
"""
from __future__ import annotations

from typing import Callable

from .checks import check_int
from .monitor import Context, resolve
from .training import Callback

__all__ = ["TrainProgress"]


class TrainProgress(Callback):
    """Connects :func:`workbench.train` (and the growth and pair trainers) to a monitor: stops the training
    when the monitor is stopped, reports the steps done (``"step 40/300, loss 0.1234"``).

    Steps are counted over every training the callback is given to (the stages of a growth schedule,
    both models of a pair), out of ``total_steps`` (default: the first training's ``config.steps``).
    ``monitor``: the monitor to use (default: :func:`workbench.monitor.current` at each call).

    Payloads: by default each evaluation is sent as ``{"step", "rows": [{split, metric, value}, ...]}``.
    With ``payload`` (a function of the training state), ``payload(state)`` is sent instead at each
    evaluation and every ``every`` steps (the live curves of a page: ``lambda state: list(state.rows)``;
    ``every=None``: at evaluations only);
    ``payload=False``: none (progress and stop only: a stage of a computation that reports its own).
    """

    def __init__(self, monitor: Context | None = None, total_steps: int | None = None, label: str = "step", *,
                 every: int | None = 10, payload: Callable | None = None):
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        if every is not None:
            check_int("every", every, 1)
        if payload is not None and payload is not False and not callable(payload):
            raise ValueError(f"payload must be a function of the training state, None or False, "
                             f"got {type(payload).__name__}")
        if monitor is not None:
            resolve(monitor)   # refuses what is not a monitor, now rather than at the first step
        self.monitor, self.total, self.label = monitor, total_steps, label
        self.every, self.payload = every, payload
        self.steps_done = 0

    def _monitor(self) -> Context:
        return resolve(self.monitor)

    def _progress(self, state=None) -> tuple[float, str]:
        total = max(self.total or 1, 1)
        message = f"{self.label} {self.steps_done}/{total}"
        loss = getattr(state, "loss", None)
        if isinstance(loss, float) and loss == loss:   # not before the first step (NaN)
            message += f", loss {loss:.4f}"
        return min(1.0, self.steps_done / total), message

    def on_start(self, state) -> None:
        if self.total is None:
            self.total = state.config.steps
        if self._monitor().stopped:
            state.stop = True

    def on_step(self, state) -> None:
        self.steps_done += 1
        monitor = self._monitor()
        if monitor.stopped:
            state.stop = True
            return
        if callable(self.payload) and self.every is not None and self.steps_done % self.every == 0:
            monitor.report(*self._progress(state), self.payload(state))
        else:
            monitor.report(*self._progress(state))

    def on_eval(self, state, rows) -> None:
        if self.payload is False:
            return
        if self.payload is not None:
            payload = self.payload(state)
        else:
            payload = {"step": int(state.step), "rows": [{"split": str(r["split"]), "metric": str(r["metric"]),
                                                          "value": float(r["value"])} for r in rows]}
        self._monitor().report(*self._progress(state), payload, force=True)
