"""The explorers inside a real JupyterLab, offline: Chromium with every request that is not to 127.0.0.1 aborted.

One JupyterLab server (started and stopped here, on a temporary folder with a small notebook that shows every
kind of explorer bound to tiny models) opens the notebook, runs all cells, and the test finds each explorer
drawn, changes a widget, sees the figure change (the kernel recomputed it), and that the page logged no
console error and asked for nothing off this machine. Screenshots go to artifacts/. Marked ``ui``.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.classroom_server import free_port
from helpers.served_app import ROOT, offline_page, wait_for_port

pytestmark = [pytest.mark.ui, pytest.mark.timeout(480)]

ARTIFACTS = ROOT / "artifacts"
TOKEN = "workbench-explorers-test"

# Each cell shows one explorer on a tiny model (seconds on one thread); the first is the one the test drives.
CELLS = [
    "import torch\nimport workbench as wb\n\ntorch.set_num_threads(1)\nwb.ui.extension()   # inline: no network",
    "khop = wb.recipes.KHOP\nds = khop.load_data()\nmodel = wb.models.build(khop.model_config(ds, n_layers=1, d_model=16))\n"
    "schedule = wb.growth.preset('layerwise', 6, start_layers=1, final_layers=3)\n"
    "run = wb.growth.grow(model, ds, schedule, wb.TrainConfig(steps=6, eval_every=3, eval_max=32, batch_size=16))\n"
    "wb.ui.explore(run)",
    "digits = wb.data.load('digits')\ncfg = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=16, d_hidden=16, n_layers=2)\n"
    "a, b = (r.model for r in wb.lmc.train_pair(cfg, digits, seeds=(0, 1), train_config=wb.TrainConfig(steps=30)))\n"
    "wb.ui.explore(a, b, digits, n_alphas=5, max_examples=256)",
    "wb.ui.explore(a, digits.x_train[:256], digits.y_train[:256])",
    "grok = wb.grokking.run(wb.grokking.GrokConfig(p=7, train_fraction=0.5, d_model=8, n_heads=2, d_mlp=16, steps=20,\n"
    "                                               eval_every=10, every=10, n_key=2))\nwb.ui.explore(grok)",
    "text = wb.data.load('text', context=12, corpus_chars=2000)\n"
    "tcfg = wb.models.TransformerConfig(vocab_size=text.vocab_size, context=12, vocab=list(text.vocab), d_model=16,\n"
    "                                   n_layers=2, n_heads=2, d_mlp=32)\n"
    "wb.ui.explore(wb.models.build(tcfg), text.x_val[0])",
]
N_EXPLORERS = len(CELLS) - 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 over a temporary folder holding ``explore.ipynb``; its URL."""
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("jupyterlab")
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "explore.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)   # no news or update toasts over the notebook
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                            "checkForUpdates": False}))
    port = free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
           f"--LabApp.user_settings_dir={root / '.settings'}", f"--LabApp.workspaces_dir={root / '.workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            wait_for_port(port, proc, 120, "JupyterLab")
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {(root / 'server.log').read_text()[-3000:]}") from None
        yield f"http://127.0.0.1:{port}/lab/tree/explore.ipynb?token={TOKEN}"
    finally:
        try:   # the server and the kernels it started (one process group, ours)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def page():
    with offline_page() as pg:
        yield pg


def _idle(page) -> None:
    page.wait_for_selector(".jp-StatusBar-Widget:has-text('Idle')", timeout=180_000)


def _x_title(page) -> str:
    return page.locator(".jp-OutputArea .js-plotly-plot").first.evaluate("el => el.layout.xaxis.title.text")


def test_every_explorer_renders_offline_in_jupyterlab_and_a_widget_recomputes_its_figure(lab, page):
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(lab, timeout=120_000)
    page.wait_for_selector(".jp-Notebook")
    _idle(page)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    page.wait_for_selector(".jp-OutputArea .js-plotly-plot .plot-container", timeout=180_000)
    _idle(page)
    outputs = page.locator(".jp-Cell .jp-OutputArea-output")
    assert outputs.count() >= N_EXPLORERS
    names = ["growth", "connectivity", "collapse", "grokking", "residual"]
    for k, name in enumerate(names, start=1):             # every explorer drew at least one figure
        cell = page.locator(".jp-Notebook .jp-Cell").nth(k)
        cell.locator(".jp-OutputArea").scroll_into_view_if_needed()
        cell.locator(".js-plotly-plot .plot-container >> visible=true").first.wait_for(timeout=60_000)
        assert "Error" not in cell.locator(".jp-OutputArea").inner_text()[:2000]
        cell.evaluate("el => el.scrollIntoView({block: 'start'})")   # its code at the top of the window
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / f"notebook-{name}-explorer.png"))
    first = page.locator(".jp-Notebook .jp-Cell").nth(1)
    first.scroll_into_view_if_needed()
    assert _x_title(page) == "step"
    before = page.locator(".jp-OutputArea .js-plotly-plot").first.evaluate("el => el.data[0].x.slice(-1)[0]")
    first.locator("button", has_text="flops").first.click()   # the growth view's x axis: the kernel redraws
    deadline = time.time() + 60
    while _x_title(page) != "training FLOPs" and time.time() < deadline:
        time.sleep(0.5)
    assert _x_title(page) == "training FLOPs"
    after = page.locator(".jp-OutputArea .js-plotly-plot").first.evaluate("el => el.data[0].x.slice(-1)[0]")
    assert after > before                                     # the same point, now at its FLOPs
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "notebook-growth-explorer-flops.png"))
    assert page.blocked == [], page.blocked[:5]
    assert page.console_errors == [], page.console_errors[:5]
