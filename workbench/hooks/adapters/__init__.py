"""One adapter per model family; importing this package registers them all with :mod:`workbench.hooks`.

Each module here is one family and registers itself at import with
``hooks.register_adapter(match, factory)``. Hugging Face adapters register a predicate on
``config.model_type`` and a factory string, so ``transformers`` is imported only when such a
model is met. A new family is one new file here plus its tests.
"""
from __future__ import annotations

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
