"""Offline datasets behind one type, :class:`Dataset`.

``load(name, **options)`` builds a dataset deterministically from its options (a
``seed`` among them) without touching the network or any global RNG:

- ``digits``: scikit-learn's bundled 8x8 digits (1797), standardised with train statistics.
- ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (4000 train / 1000 val).
- ``khop``: k-hop pointer chasing; the answer needs ``hops`` sequential look-ups.
- ``modadd``: ``a + b mod p`` (the grokking task of Power et al. 2022).
- ``text``: character-level language modelling of a given text (``text=`` the content, as
  the dashboard's upload sends it, or ``path=`` a file a notebook user reads) or of a
  built-in corpus (``corpus="grammar"``, ``"arithmetic"`` or ``"code"``); at most
  ``WORKBENCH_MAX_UPLOAD_MB`` (default 2) MB of text.

Vector datasets hold ``x (N, d_in) float32`` and ``y (N,) int64``. Sequence datasets hold
``x (N, T) int64`` tokens and ``y (N, T) int64`` targets, ``IGNORE = -100`` where a position
is not scored (khop and modadd score only the answer positions).

Every option is checked (type, range) with a message naming it; ``None`` is accepted only
where it is a documented value (the ``text`` dataset's ``path``, ``text``, ``vocab`` and
``corpus``: "not given"). :meth:`Dataset.spec` is JSON-ready and never names a server path
(a text read from a file stores its content); :func:`from_spec` rebuilds a dataset from it.

Definitions of the tasks: ``docs/definitions.md#datasets`` (``#khop``, ``#modadd``, ``#mnist1d``).
"""
from __future__ import annotations

from .dataset import Dataset, Shape, IGNORE
from .options import load, check_options, names, options_spec, option_constraints, kind_of, shape_of
from .specs import from_spec, check_spec
from .text import grammar_corpus, CORPORA, max_text_bytes

# read as attributes of the package by other modules and tests (not part of the public surface)
from .sequence import KHOP_LAYOUTS  # noqa: F401
from .specs import PATH_REFUSED  # noqa: F401
from .text import _PIECES, arithmetic_corpus, code_corpus  # noqa: F401

__all__ = [
    "Dataset", "Shape", "load", "from_spec", "check_spec", "check_options", "names", "options_spec",
    "option_constraints", "kind_of", "shape_of", "IGNORE", "grammar_corpus", "CORPORA", "max_text_bytes",
]
