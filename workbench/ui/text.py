"""Untrusted text on a page: escaping for Panel's panes, code and text blocks, short specs, error messages.

Panel's Markdown, Alert, HTML *and Str* panes put their text into the page as HTML (Markdown passes raw
HTML through; Str only wraps it in ``<pre>``; ``<script>`` tags are even re-created so that they run), and
Bokeh's MultiChoice renders its labels as HTML. Every string that can hold user or stored input (run and
dataset names, error and status messages, token labels, sampled text) goes through one of these helpers
before it reaches such a pane (``docs/security.md``). Plain widgets (Select options, TextInput values,
widget names) and Tabulator's default formatter show text as text.
"""
from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["escape_html", "escape_md", "code_block", "text_block", "html_labels", "short_spec", "describe_error"]


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~$:])")


def escape_html(text: Any) -> str:
    """``text`` (any object, via ``str``) as HTML that shows exactly those characters."""
    return html.escape(str(text), quote=True)


def escape_md(text: Any) -> str:
    """``text`` as Markdown that shows exactly those characters: HTML escaped and Markdown syntax neutralised.

    Backslash-escapes Markdown's punctuation (emphasis, links, code, headings, tables, math ``$``,
    autolinks), then HTML-escapes ``& < > " '``; newlines are kept as line breaks.
    """
    escaped = _MD_SPECIAL.sub(r"\\\1", str(text))
    return "  \n".join(html.escape(line, quote=True) for line in escaped.split("\n"))


def code_block(code: str, lang: str = "python") -> str:
    """A fenced Markdown code block that ``code`` cannot close (the fence is longer than any backtick run)."""
    longest = max((len(m) for m in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{code}\n{fence}"


def text_block(text: Any) -> str:
    """HTML for a ``pn.pane.HTML``: ``text`` verbatim in a ``<pre>`` (escaped; never ``pn.pane.Str``, which is not)."""
    return f"<pre style='white-space: pre-wrap'>{escape_html(text)}</pre>"


def html_labels(options: dict) -> dict:
    """``{label: value}`` with the labels HTML-escaped, for widgets that render labels as HTML (MultiChoice)."""
    return {escape_html(label): value for label, value in options.items()}


def short_spec(spec):
    """A dataset spec for display: an uploaded text (up to megabytes) is named by its length, not shown."""
    if not isinstance(spec, dict):
        return spec
    return {k: (f"<{len(v):,} characters>" if k == "text" and isinstance(v, str) else
                [short_spec(p) for p in v] if k == "parts" and isinstance(v, list) else v) for k, v in spec.items()}


def describe_error(exc: BaseException) -> str:
    """An exception as one line for the user: the message of a ValueError or RuntimeError (ours name the
    field), else the type and the message."""
    return str(exc) if isinstance(exc, (ValueError, RuntimeError)) else f"{type(exc).__name__}: {exc}"
