"""What a notebook front end needs to show the explorers, and a check that says what is missing.

Panel renders a Viewer inline in JupyterLab through ``pyviz_comms``, whose JupyterLab extension ships in its
wheel; it must be installed where JupyterLab runs (the same environment as the kernel here, or the server's
when they differ). VS Code, Colab and PyCharm render through ``jupyter_bokeh`` instead (``pip install
depth-workbench[notebook]``). :func:`extension` loads what the explorers draw with (the dashboard's own list,
:data:`EXTENSIONS`), inlined so that a notebook opened with no network still draws them; :func:`doctor`
prints the versions, the lab extensions it can see and what to install.
"""
from __future__ import annotations

import json
import os
import sys
from importlib import metadata
from pathlib import Path

__all__ = ["EXTENSIONS", "PACKAGES", "LAB_EXTENSIONS", "extension", "doctor", "front_end"]

EXTENSIONS = ("plotly", "tabulator")   # the Panel extensions the pages and explorers draw with (apps/main.py)
# package -> (why, what to install when missing)
PACKAGES = {
    "panel": ("draws the explorers", "pip install 'panel>=1.7.5'"),
    "bokeh": ("Panel's models in the browser", "pip install bokeh"),
    "param": ("the explorers' choices", "pip install param"),
    "pyviz_comms": ("talks between the kernel and JupyterLab (ships the lab extension)", "pip install pyviz_comms"),
    "plotly": ("the figures", "pip install plotly"),
    "jupyterlab": ("the notebook front end", "pip install 'jupyterlab>=4'"),
    "jupyter_bokeh": ("renders Panel in VS Code, Colab and PyCharm", "pip install 'depth-workbench[notebook]'"),
}
# lab extension folder -> package that ships it
LAB_EXTENSIONS = {"@pyviz/jupyterlab_pyviz": "pyviz_comms", "@bokeh/jupyter_bokeh": "jupyter_bokeh"}
NEEDS_JUPYTER_BOKEH = ("VS Code", "Colab", "PyCharm")


def extension(*extra: str, inline: bool = True, **options) -> None:
    """``pn.extension`` with the dashboard's extensions (:data:`EXTENSIONS`) and ``extra``; ``inline=True`` puts
    the JavaScript and CSS into the notebook, so the explorers draw with no network. Call it once, in an early
    cell, before showing an explorer."""
    import panel as pn

    pn.extension(*EXTENSIONS, *extra, inline=inline, **options)


def front_end(environ=None, modules=None) -> str:
    """The notebook front end this kernel seems to run under: ``VS Code``, ``Colab``, ``PyCharm`` or ``Jupyter``."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "google.colab" in modules:
        return "Colab"
    if "VSCODE_PID" in environ or "VSCODE_CWD" in environ or environ.get("VSCODE_IPC_HOOK_CLI"):
        return "VS Code"
    if "PYCHARM_HOSTED" in environ:
        return "PyCharm"
    return "Jupyter"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _lab_extensions(paths=None) -> dict[str, tuple[str, str] | None]:
    """Each of :data:`LAB_EXTENSIONS`: ``(version, folder)`` where a JupyterLab data directory holds it, else None."""
    if paths is None:
        try:
            from jupyter_core.paths import jupyter_path
            paths = jupyter_path("labextensions")
        except ImportError:
            paths = [str(Path(sys.prefix) / "share" / "jupyter" / "labextensions")]
    found: dict = {name: None for name in LAB_EXTENSIONS}
    for name in LAB_EXTENSIONS:
        for root in paths:
            package = Path(root) / name / "package.json"
            if package.is_file():
                try:
                    version = json.loads(package.read_text()).get("version", "?")
                except (OSError, ValueError):
                    version = "?"
                found[name] = (str(version), str(package.parent))
                break
    return found


def doctor(file=None, paths=None, environ=None, modules=None) -> dict:
    """Print what the notebook front end needs and what is missing; returns the findings.

    Lines: the version of each of :data:`PACKAGES` (or "missing" with the command that installs it), whether
    the JupyterLab data directories this Python sees hold pyviz_comms' and jupyter_bokeh's lab extensions
    (``paths``: those directories, default ``jupyter_core.paths.jupyter_path("labextensions")``), the front
    end it seems to run under, and the problems (``findings["missing"]``: what to do, one line each).
    """
    file = sys.stdout if file is None else file
    versions = {name: _version(name) for name in PACKAGES}
    labs = _lab_extensions(paths)
    where = front_end(environ, modules)
    missing = []
    for name in ("panel", "bokeh", "param", "pyviz_comms", "plotly"):
        if versions[name] is None:
            missing.append(f"{name} is missing ({PACKAGES[name][0]}): {PACKAGES[name][1]}")
    if labs["@pyviz/jupyterlab_pyviz"] is None:
        missing.append("pyviz_comms' JupyterLab extension is not in the JupyterLab environment this Python sees: "
                       "pip install pyviz_comms where JupyterLab runs, then restart JupyterLab")
    if where in NEEDS_JUPYTER_BOKEH and (versions["jupyter_bokeh"] is None or labs["@bokeh/jupyter_bokeh"] is None):
        missing.append(f"{where} renders Panel through jupyter_bokeh: {PACKAGES['jupyter_bokeh'][1]}")
    print("Depth Workbench explorers: what the notebook front end needs", file=file)
    for name, (why, fix) in PACKAGES.items():
        v = versions[name]
        print(f"  {name:<14} {v if v else 'missing':<10} {why}" + ("" if v else f"  ({fix})"), file=file)
    for name, got in labs.items():
        state = f"{got[0]:<10} {got[1]}" if got else "not found"
        print(f"  lab extension {name}: {state}", file=file)
    print(f"  front end: {where}" + (" (needs jupyter_bokeh)" if where in NEEDS_JUPYTER_BOKEH else ""), file=file)
    print("  offline: call wb.ui.extension() (pn.extension(..., inline=True)) once before the first explorer",
          file=file)
    if missing:
        print("What to do:", file=file)
        for line in missing:
            print(f"  - {line}", file=file)
    else:
        print("Nothing missing.", file=file)
    return {"versions": versions, "lab_extensions": labs, "front_end": where, "missing": missing}
