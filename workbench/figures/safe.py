"""User strings in figures are text, never markup: the one place every figure builder escapes them.

Plotly draws a subset of HTML in nearly every string of a figure -- titles, axis titles, tick and category
labels, legend and trace names, ``text``/``hovertext``, annotations, colour-bar titles -- and in the values
a hover template pulls in (``%{x}``, ``%{text}``, ``%{customdata}``, ``%{meta}``): ``<a href>`` draws a
live link, ``<b>``, ``<i>``, ``<sup>`` and ``<span style>`` restyle the text. Run names, dataset names,
tokens of an uploaded text and grid keys reach figures, so a run named ``<a href=...>`` drew a link in the
teacher's Runs page. Escaping user strings where each builder inserts them would need every builder to
remember every path; instead :func:`builder` runs one pass over each finished figure
(:func:`escape_figure`): every string is HTML-escaped (``&``, ``<``, ``>``; plotly turns the entities back
into the characters when it draws), except the one tag the builders use for layout, ``<br>``, which
stays a line break wherever it appears (in a user string too: a line break is not a link or a style).
Hover templates (``hovertemplate``, ``texttemplate``: written by the builders) keep their ``%{...}``
fields and ``<extra>``/``</extra>`` as well; any other tag in them is escaped like everywhere else.
``layout.template`` (the theme) is left alone.

Every public function of ``workbench.figures`` that returns a figure is decorated with :func:`builder`
(``tests/test_figures_text.py`` checks that and feeds each one payload-named input). A builder that calls
another builder is escaped once, at the outermost call. :func:`text` escapes one string for code that
edits a finished figure (``residual.with_shapes``).
"""
from __future__ import annotations

import contextvars
import functools
import html
import re

import numpy as np
import plotly.graph_objects as go

__all__ = ["builder", "escape_figure", "text", "ALLOWED_TAGS", "TEMPLATE_TAGS"]

ALLOWED_TAGS = ("<br>",)                     # kept wherever it appears
TEMPLATE_TAGS = ("<br>", "<extra>", "</extra>")   # kept in hover and text templates
_SPECIAL = re.compile(r"[&<>]")
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("workbench_figure_builder_depth", default=0)


def _escaped(s: str, tags: tuple[str, ...]) -> str:
    out = html.escape(s, quote=False)
    for tag in tags:
        out = out.replace(html.escape(tag, quote=False), tag)
    return out


def text(s) -> str:
    """``s`` (any object, via ``str``) as figure text that plotly draws as exactly those characters
    (``<br>`` stays a line break)."""
    return _escaped(str(s), ALLOWED_TAGS)


def _walk(value, tags: tuple[str, ...], depth: int = 0):
    """``value`` with every string escaped; the very same object when nothing needed escaping."""
    if isinstance(value, str):
        return _escaped(value, tags) if _SPECIAL.search(value) else value
    if depth > 40:
        return value
    if isinstance(value, dict):
        out = None
        for k, v in value.items():
            if k == "template" and depth == 0:
                continue   # layout.template: the theme, not user text
            new = _walk(v, TEMPLATE_TAGS if isinstance(k, str) and k.endswith("template") else tags, depth + 1)
            if new is not v:
                out = dict(value) if out is None else out
                out[k] = new
        return value if out is None else out
    if isinstance(value, (list, tuple)):
        new = [_walk(v, tags, depth + 1) for v in value]
        if all(a is b for a, b in zip(new, value)):
            return value
        return type(value)(new) if isinstance(value, tuple) else new
    if isinstance(value, np.ndarray) and value.dtype.kind in "OUS":
        flat = value.ravel().tolist()
        new = [_walk(v, tags, depth + 1) for v in flat]
        if all(a is b for a, b in zip(new, flat)):
            return value
        return np.array(new, dtype=object).reshape(value.shape)
    return value


def escape_figure(fig):
    """Escape every string of ``fig`` (see the module docstring). A ``go.Figure`` is changed in place (only
    the properties that held something to escape are set again) and returned; a figure dict (``to_dict()``)
    is returned as a new dict, the input left as it was."""
    if isinstance(fig, dict):
        return _walk(fig, ALLOWED_TAGS)
    if not isinstance(fig, go.Figure):
        return fig
    for trace in fig.data:
        props = trace.to_plotly_json()
        for key, value in props.items():
            new = _walk(value, TEMPLATE_TAGS if key.endswith("template") else ALLOWED_TAGS, 1)
            if new is not value:
                trace[key] = new
    layout = fig.layout.to_plotly_json()
    for key, value in layout.items():
        if key == "template":
            continue
        new = _walk(value, TEMPLATE_TAGS if key.endswith("template") else ALLOWED_TAGS, 1)
        if new is not value:
            fig.layout[key] = new
    return fig


def builder(fn):
    """Decorate a figure builder: the figure it returns goes through :func:`escape_figure` (once: a builder
    called by another builder leaves it to the outer one)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        token = _DEPTH.set(_DEPTH.get() + 1)
        try:
            fig = fn(*args, **kwargs)
        finally:
            _DEPTH.reset(token)
        return escape_figure(fig) if _DEPTH.get() == 0 else fig

    wrapper.escapes_user_text = True
    return wrapper
