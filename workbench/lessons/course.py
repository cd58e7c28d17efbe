"""The course: every lesson, in the order the notebooks in ``notebooks/lessons/`` take them."""
from __future__ import annotations

from . import collapse, connectivity, grokking, growth, llama, residual  # noqa: F401  (each registers its lesson)

ORDER = ("growth", "residual", "connectivity", "collapse", "grokking", "llama")
