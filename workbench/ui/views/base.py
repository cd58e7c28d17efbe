"""What every explorer shares: choices as params, checked before they apply, and one redraw per change.

An explorer is a ``pn.viewable.Viewer`` that a dashboard page embeds as its figure area and that a
notebook shows on its own, bound to the notebook's objects (``wb.ui.explore``). Its choices are params
(set them in code, ``view.stage = 2``, or through its widgets); each change is checked with the
:mod:`workbench.core.checks` helpers against what the view offers. A value it never offered (a forged widget
value, a typo in code) is refused: the error box names the field and its allowed values, the param goes
back to the last accepted value, and the figures stay as they were. An accepted change calls
:meth:`Explorer.update` once (a batch of params set together is one update), which recomputes only what the
change needs; ``seconds`` is how long that took.
"""
from __future__ import annotations

import time
from typing import ClassVar

import panel as pn

from ..widgets import ErrorBox

__all__ = ["Explorer"]


class Explorer(pn.viewable.Viewer):
    """Base of the explorers: ``choices`` names the params that redraw; :meth:`check` refuses values not
    offered (``ValueError`` naming the field), :meth:`update` redraws for the current choices."""

    title: ClassVar[str] = ""
    choices: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params):
        super().__init__(**params)
        self.errors = ErrorBox()
        self.seconds = 0.0              # the last update's wall time
        self._accepted = {name: getattr(self, name) for name in self.choices}
        self._reverting = False
        if self.choices:
            self.param.watch(self._changed, list(self.choices))

    # ---------------------------------------------------------------- to implement
    def check(self) -> None:
        """Raise ``ValueError`` (a :mod:`~workbench.core.checks` message naming the field) when a choice is
        not one the view offers."""

    def update(self, changed: set[str]) -> None:
        """Recompute what ``changed`` needs and redraw."""

    # ---------------------------------------------------------------- wiring
    def _changed(self, *events) -> None:
        if self._reverting:
            return
        names = {e.name for e in events}
        try:
            self.check()
        except (ValueError, TypeError) as e:
            self._revert(names)
            self.errors.show(e)
            return
        self.refresh(names)

    def refresh(self, changed: set[str] | None = None) -> bool:
        """Run :meth:`update` for ``changed`` (default: every choice); an engine refusal goes to the error box
        and the choices go back. Returns whether it applied."""
        names = set(self.choices) if changed is None else set(changed)
        t0 = time.perf_counter()
        try:
            with pn.io.hold():
                self.update(names)
        except (ValueError, TypeError) as e:
            self._revert(names)
            self.errors.show(e)
            return False
        self.seconds = time.perf_counter() - t0
        self.errors.clear()
        self._accepted.update({name: getattr(self, name) for name in self.choices})
        return True

    def _revert(self, names) -> None:
        back = {n: self._accepted[n] for n in names if n in self._accepted and getattr(self, n) != self._accepted[n]}
        if back:
            self._reverting = True
            try:
                self.param.update(**back)
            finally:
                self._reverting = False

    def offered(self, name: str, widget) -> list:
        """The values ``widget`` offers (its options' values), for :meth:`check`."""
        options = widget.options
        return list(options.values()) if isinstance(options, dict) else list(options)
