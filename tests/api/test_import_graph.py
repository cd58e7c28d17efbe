"""The import graph of ``workbench``: no cycles, no Panel below the UI, no plotly below the figures.

Every module of the package is parsed with :mod:`ast` (nothing is imported), and every import
statement counts: at module level, inside functions and methods, inside ``try`` blocks; absolute
(``import workbench.lmc``, ``from workbench.data import IGNORE``) and relative (``from . import
data``, ``from .permute import perm_spec``, ``from ..figures import lmc``), plus
``importlib.import_module`` with a constant name. Imports under ``if TYPE_CHECKING:`` never run
and are left out. Imports whose module name is computed at run time (``import_module(f".{name}")``,
``import_module(SOME_CONSTANT)``, ``pkgutil`` discovery of plugins) cannot be seen statically.

How an import becomes an edge of the graph (the convention of ``grimp`` / import-linter):

- ``import a.b.c`` imports the deepest known module of ``a.b.c``;
- ``from P import n`` imports ``P.n`` when that is a module (a package's ``__init__`` importing its
  submodules with ``from . import x`` counts as importing each ``x``), otherwise ``P`` itself
  (``n`` is then a name defined in ``P``);
- the implicit run of a parent package's ``__init__`` is not an edge: each ``__init__`` is a module
  of the graph and is checked on its own.

Rules (the layers are the data :data:`LAYERS`; ``docs/architecture.md``'s table is made from it):

(a) no cycle between ``workbench`` modules, function-level imports included;
(b) no engine module (everything outside ``workbench/ui/``) and no figure module imports
    ``panel``, ``bokeh`` or ``param``, directly or through other ``workbench`` modules;
(c) no engine module outside ``workbench/figures/`` and ``workbench/ui/`` imports ``plotly``,
    directly or through other ``workbench`` modules;
(d) no figure module imports ``torch``, directly or through other ``workbench`` modules;
(e) every import inside the package points down :data:`LAYERS` or stays in its layer; figures import
    nothing else of the package, and only the UI imports them.

The detector itself is tested on small synthetic packages written to ``tmp_path``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "workbench"
UI_LIBRARIES = ("panel", "bokeh", "param")
PLOT_LIBRARIES = ("plotly",)


# ============================================================================ the detector


@dataclass(frozen=True)
class Edge:
    source: str      # importing module
    target: str      # imported module (a module of the package, or an external dotted name)
    line: int
    scope: str       # "module" or "function"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}, {self.scope}-level)"


def discover(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``package_dir`` (a package's ``__init__``
    is named after the package)."""
    package_dir = Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    """Every import of one module as ``(dotted target, name or None, line, scope)``, relative ones resolved."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[tuple[str, str | None, int, str]] = []

    @property
    def scope(self) -> str:
        return "function" if self.depth else "module"

    def _scoped(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:          # only the else branch runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def _anchor(self, level: int) -> str:
        """The package that ``level`` leading dots refer to."""
        parts = self.package.split(".") if self.package else []
        if level - 1 > len(parts):
            raise ValueError(f"{self.module}: relative import beyond the top-level package")
        return ".".join(parts[:len(parts) - (level - 1)])

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, None, node.lineno, self.scope))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self._anchor(node.level)
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        for alias in node.names:
            self.found.append((base, None if alias.name == "*" else alias.name, node.lineno, self.scope))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            target = node.args[0].value
            if target.startswith("."):
                anchor = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "package"), None)
                if isinstance(anchor, ast.Name) and anchor.id in ("__name__", "__package__"):
                    pkg = self.module if anchor.id == "__name__" else self.package
                    level = len(target) - len(target.lstrip("."))
                    parts = pkg.split(".")
                    rest = target.lstrip(".")
                    target = ".".join(parts[:len(parts) - (level - 1)] + ([rest] if rest else []))
                else:
                    target = None                  # anchor not known statically
            if target:
                self.found.append((target, None, node.lineno, self.scope))
        self.generic_visit(node)


def module_imports(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The imports of one module as edges, resolved against the known ``modules``."""
    collector = _Collector(module, path.name == "__init__.py")
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    edges = []
    for base, name, line, scope in collector.found:
        if name is not None and f"{base}.{name}" in modules:
            target = f"{base}.{name}"              # from P import submodule
        else:
            target = base                          # import a.b.c / from P import name
            parts = target.split(".")
            for k in range(len(parts), 0, -1):     # deepest known module of a dotted name
                if ".".join(parts[:k]) in modules:
                    target = ".".join(parts[:k])
                    break
        edges.append(Edge(module, target, line, scope))
    return list(dict.fromkeys(edges))          # `from P import a, b` of names: one edge


def import_graph(package_dir: Path) -> tuple[dict[str, Path], list[Edge]]:
    """All modules of the package and all their imports (internal and external)."""
    modules = discover(package_dir)
    edges = [e for m, p in modules.items() for e in module_imports(m, p, modules)]
    return modules, edges


def _internal(modules, edges) -> dict[str, dict[str, Edge]]:
    """Adjacency ``{source: {target: first edge}}`` between modules of the package."""
    adj: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for e in sorted(edges, key=lambda e: (e.scope != "module", e.line)):
        if e.target in modules and e.target not in adj[e.source]:
            adj[e.source][e.target] = e
    return adj


def _components(adj: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(adj, start: str, members: set[str]) -> list[Edge]:
    """A shortest cycle through ``start`` inside one component, as its edges."""
    paths = {start: []}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w, e in sorted(adj[v].items()):
            if w == start:
                return paths[v] + [e]
            if w in members and w not in paths:
                paths[w] = paths[v] + [e]
                queue.append(w)
    raise AssertionError("not a cycle")  # pragma: no cover


@dataclass
class Cycle:
    modules: list[str]    # the strongly connected component
    edges: list[Edge]     # one concrete cycle through its first module

    def __str__(self) -> str:
        path = " -> ".join([self.edges[0].source] + [e.target for e in self.edges])
        lines = "; ".join(f"{e.source}:{e.line} ({e.scope}-level)" for e in self.edges)
        return f"{path}   [{lines}]   component: {', '.join(self.modules)}"


def find_cycles(modules, edges) -> list[Cycle]:
    """One :class:`Cycle` per strongly connected component with a cycle (self-imports included)."""
    adj = _internal(modules, edges)
    cycles = []
    for comp in _components(adj):
        if len(comp) > 1 or comp[0] in adj[comp[0]]:
            cycles.append(Cycle(comp, _shortest_cycle(adj, comp[0], set(comp))))
    return cycles


def forbidden_imports(modules, edges, sources, libraries) -> list[str]:
    """For every module in ``sources`` that reaches one of ``libraries`` (top-level package names),
    directly or through modules of the package, the shortest import chain that does."""
    adj = _internal(modules, edges)
    external: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in sorted(edges, key=lambda e: e.line):
        if e.target not in modules and e.target.split(".")[0] in libraries:
            external[e.source].append(e)
    found = []
    for src in sorted(sources):
        paths, queue = {src: []}, [src]
        while queue:
            v = queue.pop(0)
            if external[v]:
                chain = paths[v] + [external[v][0]]
                found.append(" -> ".join([src] + [e.target for e in chain]) + "   ["
                             + "; ".join(f"{e.source}:{e.line} ({e.scope}-level)" for e in chain) + "]")
                break
            for w in sorted(adj[v]):
                if w not in paths:
                    paths[w] = paths[v] + [adj[v][w]]
                    queue.append(w)
    return found


# The layers, bottom up (docs/architecture.md's table is generated from this list and checked against it).
# A module may import modules of its own layer and of the layers below; ``figures`` stands apart (pure:
# pandas and plotly only, nothing else of the package); the front door ``workbench`` imports nothing
# statically (its names load on first use).
LAYERS = [
    ("core", ("workbench.core",), "argument checks, datasets, the model families, training, the progress protocol"),
    ("hooks", ("workbench.hooks",), "reading any model: hook points, the adapter registry, one adapter per family"),
    ("io", ("workbench.io",), "the run store, Hugging Face and GPT-2 interop, the model folders the dashboard may open"),
    ("analyses", ("workbench.growth", "workbench.residual", "workbench.lmc", "workbench.collapse",
                  "workbench.compose", "workbench.studies"),
     "growth, the residual stream and its lenses, connectivity, collapse, composition, one-paper studies"),
    ("experiments", ("workbench.experiments",), "the pipelines pages, sweeps, the bench and notebooks share"),
    ("runtime", ("workbench.runtime",), "the job queue (threads or Dask), sweeps, classroom mode and sign-in"),
    ("lessons", ("workbench.lessons",), "lessons that check themselves: exercises, references, class answers"),
    ("ui", ("workbench.ui",), "Panel pages and explorers: widgets and layout, no math"),
]
APART = ("figures", ("workbench.figures",), "pure figure builders: tidy DataFrame -> plotly Figure")


def layer_of(module: str) -> str | None:
    """The layer a module belongs to (``None`` for the front door ``workbench`` itself)."""
    for name, packages, _ in LAYERS + [APART]:
        if any(module == p or module.startswith(p + ".") for p in packages):
            return name
    return None


def _rank(layer: str) -> int:
    return [name for name, _, _ in LAYERS].index(layer)


def layer_violations(modules, edges) -> list[str]:
    """Every internal import that points up the layer order, or out of or into ``figures``."""
    bad = []
    for e in edges:
        if e.target not in modules or e.source == "workbench":
            continue
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is None or dst is None:
            bad.append(f"{e}: every module must belong to a layer (LAYERS)")
        elif src == APART[0]:
            if dst != APART[0]:
                bad.append(f"{e}: figures are pure and import nothing else of the package")
        elif dst == APART[0]:
            if src != "ui":
                bad.append(f"{e}: only the UI draws figures")
        elif _rank(dst) > _rank(src):
            bad.append(f"{e}: {src} may not import {dst} (above it)")
    return bad


def layer_table() -> str:
    """docs/architecture.md's layer table, top layer first."""
    rows = ["| layer | packages | what it holds |", "|---|---|---|"]
    for name, packages, what in list(reversed(LAYERS)) + [APART]:
        rows.append(f"| {name} | {', '.join('`' + p.replace('workbench.', 'workbench/') + '/`' for p in packages)} "
                    f"| {what} |")
    return "\n".join(rows)


def _layer(module: str) -> str:
    """``"ui"``, ``"figures"`` or ``"engine"`` (everything below the UI, the front door included)."""
    layer = layer_of(module)
    return layer if layer in ("ui", "figures") else "engine"


# ============================================================================ the rules, on workbench


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR)


def test_the_parser_sees_the_package(graph):
    modules, edges = graph
    # discovery found the real package, the __init__ files among it
    assert {"workbench", "workbench.core.models", "workbench.ui", "workbench.ui.app", "workbench.figures",
            "workbench.growth", "workbench.growth.loop"} <= set(modules)
    pairs = {(e.source, e.target) for e in edges}
    # `from .loop import ...` inside growth; `from ..core import checks` across packages
    assert ("workbench.growth", "workbench.growth.loop") in pairs
    assert ("workbench.growth.loop", "workbench.core.checks") in pairs


def test_every_module_belongs_to_a_layer(graph):
    modules, _ = graph
    homeless = sorted(m for m in modules if m != "workbench" and layer_of(m) is None)
    assert not homeless, f"modules outside every layer of LAYERS: {homeless}"


def test_imports_point_down_the_layers(graph):
    bad = layer_violations(*graph)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_front_door_imports_nothing_statically(graph):
    modules, edges = graph
    assert [e for e in edges if e.source == "workbench" and e.target in modules] == []


def test_architecture_doc_shows_the_layer_table():
    doc = (PACKAGE_DIR.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert layer_table() in doc, "docs/architecture.md's layer table differs from LAYERS: paste\n" + layer_table()
    for name, packages, _ in LAYERS + [APART]:
        for p in packages:
            assert (PACKAGE_DIR.parent / p.replace(".", "/")).is_dir(), f"{p} (layer {name}) is not a package"


def test_no_import_cycles(graph):
    cycles = find_cycles(*graph)
    assert not cycles, "import cycles inside workbench:\n" + "\n".join(map(str, cycles))


def test_engine_and_figures_do_not_import_panel(graph):
    modules, edges = graph
    sources = [m for m in modules if _layer(m) in ("engine", "figures")]
    bad = forbidden_imports(modules, edges, sources, UI_LIBRARIES)
    assert not bad, "the engine and the figures must not import panel/bokeh/param:\n" + "\n".join(bad)


def test_engine_does_not_import_plotly(graph):
    modules, edges = graph
    sources = [m for m in modules if _layer(m) == "engine"]
    bad = forbidden_imports(modules, edges, sources, PLOT_LIBRARIES)
    assert not bad, "only workbench.figures and workbench.ui may import plotly:\n" + "\n".join(bad)


def test_figures_do_not_import_torch(graph):
    modules, edges = graph
    sources = [m for m in modules if _layer(m) == "figures"]
    bad = forbidden_imports(modules, edges, sources, ("torch",))
    assert not bad, "figure builders are pure (DataFrame -> plotly) and must not import torch:\n" + "\n".join(bad)


# ============================================================================ the detector, on known answers


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / next(iter(files)).split("/")[0]


def test_detector_finds_a_function_level_cycle(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import helper\n",
        "pkg/b.py": "def helper():\n    from . import a\n    return a\n",
        "pkg/c.py": "import os\nfrom pkg import a\n",
    })
    cycles = find_cycles(*import_graph(pkg))
    assert len(cycles) == 1
    assert cycles[0].modules == ["pkg.a", "pkg.b"]
    assert [(e.source, e.target, e.scope) for e in cycles[0].edges] == [
        ("pkg.a", "pkg.b", "module"), ("pkg.b", "pkg.a", "function")]
    assert "pkg.a -> pkg.b -> pkg.a" in str(cycles[0])


def test_detector_counts_init_importing_submodules(tmp_path):
    # __init__ imports c with `from . import c`; c imports a *name* of the package: pkg -> pkg.c -> pkg
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from . import c\nVALUE = 1\n",
        "pkg/c.py": "from pkg import VALUE\n",
    })
    cycles = find_cycles(*import_graph(pkg))
    assert [c.modules for c in cycles] == [["pkg", "pkg.c"]]


def test_detector_passes_an_acyclic_package(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from . import a, b\nfrom .sub import m\n",
        "pkg/a.py": "import numpy as np\n",
        "pkg/b.py": "from .a import np\n\ndef f():\n    from pkg.sub.m import g\n    return g\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/m.py": "from .. import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from pkg import b\n\ndef g():\n    import pkg.a\n",
    })
    modules, edges = import_graph(pkg)
    assert find_cycles(modules, edges) == []
    pairs = {(e.source, e.target) for e in edges}
    assert {("pkg", "pkg.a"), ("pkg", "pkg.b"), ("pkg", "pkg.sub.m"), ("pkg.b", "pkg.a"),
            ("pkg.b", "pkg.sub.m"), ("pkg.sub.m", "pkg.a")} <= pairs
    assert ("pkg.sub.m", "pkg.b") not in pairs          # under TYPE_CHECKING: never runs
    # the TYPE_CHECKING import, if it counted, would close pkg.b -> pkg.sub.m -> pkg.b
    with_type_checking = edges + [Edge("pkg.sub.m", "pkg.b", 4, "module")]
    assert [c.modules for c in find_cycles(modules, with_type_checking)] == [["pkg.b", "pkg.sub.m"]]


def test_detector_resolves_import_module_and_self_imports(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "import importlib\nlazy = importlib.import_module('.a', __name__)\n",
        "pkg/a.py": "import pkg.a\n",
    })
    modules, edges = import_graph(pkg)
    assert ("pkg", "pkg.a") in {(e.source, e.target) for e in edges}
    assert [c.modules for c in find_cycles(modules, edges)] == [["pkg.a"]]


def test_detector_finds_forbidden_imports_through_other_modules(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/engine.py": "def plot():\n    from .view import show\n    return show\n",
        "pkg/clean.py": "import numpy\n",
        "pkg/view.py": "import panel as pn\nfrom plotly import graph_objects\n",
    })
    modules, edges = import_graph(pkg)
    bad = forbidden_imports(modules, edges, ["pkg.engine", "pkg.clean"], ("panel",))
    assert len(bad) == 1 and bad[0].startswith("pkg.engine -> pkg.view -> panel")
    assert "pkg.engine:2 (function-level)" in bad[0]
    assert forbidden_imports(modules, edges, ["pkg.clean"], ("panel", "plotly")) == []
    assert len(forbidden_imports(modules, edges, ["pkg.view"], ("plotly",))) == 1


def test_layers():
    assert _layer("workbench") == "engine"
    assert _layer("workbench.lmc") == "engine"
    assert _layer("workbench.figures") == "figures"
    assert _layer("workbench.figures.lmc") == "figures"
    assert _layer("workbench.ui.app") == "ui"
    assert layer_of("workbench.core.models") == "core" and layer_of("workbench.corelike") is None


def test_layer_rule_on_known_answers():
    modules = {m: None for m in ("workbench", "workbench.core.data", "workbench.io.store", "workbench.ui.app",
                                 "workbench.figures.lmc", "workbench.growth.loop")}
    edges = [Edge("workbench.io.store", "workbench.core.data", 1, "module"),      # down: fine
             Edge("workbench.core.data", "workbench.io.store", 2, "function"),    # up: refused
             Edge("workbench.growth.loop", "workbench.figures.lmc", 3, "module"),  # the engine draws: refused
             Edge("workbench.figures.lmc", "workbench.core.data", 4, "module"),   # figures impure: refused
             Edge("workbench.ui.app", "workbench.figures.lmc", 5, "module")]      # the UI draws: fine
    bad = layer_violations(modules, edges)
    assert len(bad) == 3
    assert "core may not import io" in bad[0] and "only the UI draws" in bad[1] and "figures are pure" in bad[2]
