"""Depth Workbench: grow models, read their residual stream, measure connectivity and collapse.

>>> import workbench as wb
>>> ds = wb.data.load("digits")
>>> model = wb.models.build(wb.models.MLPConfig(d_in=64, n_classes=10))
>>> run = wb.train(model, ds, wb.TrainConfig(steps=200))

``import workbench`` imports nothing else: every name below loads its module on first use, so the
command-line tools (``python -m workbench.classroom credentials ...``) start without torch. The
folders are the layers (``docs/architecture.md``): ``core`` (checks, data, models, training),
``hooks``, ``io``, the analyses (``growth``, ``residual``, ``lmc``, ``collapse``, ``compose``,
``studies``), ``experiments``, ``runtime``, ``lessons``, ``figures`` and ``ui``. :data:`NAMES` maps each public
name to where it lives; the old flat module paths (``workbench.data``, ``workbench.permute`` ...)
still import, as the modules they moved to.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

__version__ = "0.1.0"

# name -> "module" (a submodule) or "module:attribute"
NAMES = {
    # objects
    "train": "workbench.core.training:train",
    "evaluate": "workbench.core.training:evaluate",
    "TrainConfig": "workbench.core.training:TrainConfig",
    "Run": "workbench.core.training:Run",
    "Callback": "workbench.core.training:Callback",
    "ProgressBar": "workbench.core.training:ProgressBar",
    "StopOnEvent": "workbench.core.training:StopOnEvent",
    "RunStore": "workbench.io.store:RunStore",
    "StoreError": "workbench.io.store:StoreError",
    # the layers
    "core": "workbench.core",
    "io": "workbench.io",
    "studies": "workbench.studies",
    "experiments": "workbench.experiments",
    "runtime": "workbench.runtime",
    "ui": "workbench.ui",
    # modules, by the names notebooks use
    "checks": "workbench.core.checks",
    "data": "workbench.core.data",
    "models": "workbench.core.models",
    "flops": "workbench.core.flops",
    "training": "workbench.core.training",
    "monitor": "workbench.core.monitor",
    "hooks": "workbench.hooks",
    "adapters": "workbench.hooks.adapters",
    "store": "workbench.io.store",
    "interop": "workbench.io.interop",
    "roots": "workbench.io.model_roots",
    "growth": "workbench.growth",
    "residual": "workbench.residual",
    "lmc": "workbench.lmc",
    "permute": "workbench.lmc.permute",
    "collapse": "workbench.collapse",
    "compose": "workbench.compose",
    "sampling": "workbench.compose.sampling",
    "unroll": "workbench.studies.unroll",
    "learngene": "workbench.studies.learngene",
    "grokking": "workbench.studies.grokking",
    "scaling": "workbench.studies.scaling",
    "recipes": "workbench.core.recipes",
    "jobs": "workbench.runtime.jobs",
    "sweeps": "workbench.runtime.sweeps",
    "classroom": "workbench.runtime.classroom",
    "examples": "workbench.runtime.examples",
    "lenses": "workbench.residual.lenses",
    "attention": "workbench.residual.attention",
    "tracing": "workbench.residual.tracing",
    "depthlab": "workbench.studies.depthlab",
    "earlyexit": "workbench.studies.earlyexit",
    "auth": "workbench.runtime.auth",
    "lessons": "workbench.lessons",
    "figures": "workbench.figures",
}
# old flat module paths -> where they live now (``import workbench.data`` keeps working)
MOVED = {f"workbench.{name}": where for name, where in NAMES.items()
         if ":" not in where and where != f"workbench.{name}"}

__all__ = sorted(NAMES)


def __getattr__(name: str):
    where = NAMES.get(name)
    if where is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    module, _, attr = where.partition(":")
    value = importlib.import_module(module)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(NAMES))


class _MovedSpec(importlib.machinery.ModuleSpec):
    """An old path's spec: ``parent`` is the new module's package, so ``python -m`` runs it with working
    relative imports."""

    def __init__(self, name: str, target: str):
        super().__init__(name, _MovedLoader(target))
        self._parent = target.rpartition(".")[0]

    @property
    def parent(self):
        return self._parent


class _MovedLoader(importlib.abc.Loader):
    """Loads an old path as the module it moved to: the same module object, not a copy."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec   # the import system set it to the old path's spec

    def get_code(self, fullname):   # python -m workbench.classroom
        return importlib.util.find_spec(self.target).loader.get_code(self.target)

    def is_package(self, fullname):
        return importlib.util.find_spec(self.target).submodule_search_locations is not None


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = max((o for o in MOVED if fullname == o or fullname.startswith(o + ".")), key=len, default=None)
        return None if old is None else _MovedSpec(fullname, MOVED[old] + fullname[len(old):])


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())
