"""Issue 21, item 1: no click builds a dataset or opens a model on the server's event loop.

Every page action that needs data or a model is pressed here; ``data.load`` (what every dataset build
goes through), ``RunStore.load`` and the Hugging Face loaders record the thread they ran on. The test
thread plays the event loop: none of them may run on it, and a form is checked from the options alone
(``data.shape_of``), so an oversized dataset is refused without being built.
"""
import threading

import pytest

import workbench as wb
from workbench import data, interop
from workbench.io.interop import opening
from workbench.io.store import RunStore
from workbench.ui.session import DataStore
from workbench.ui.connectivity import ConnectivityPage
from workbench.ui.grow import GrowPage
from workbench.ui.residual import ResidualPage
from workbench.ui.train import TrainPage
from workbench.ui.unroll import UnrollPage

from helpers.growpage import small


@pytest.fixture
def calls(monkeypatch):
    """``[(what, thread)]`` of every dataset build, stored-run load and Hugging Face load."""
    seen = []

    def watch(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append((name, threading.current_thread()))
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    watch(data, "load")
    watch(RunStore, "load")
    watch(interop, "load_hf")
    watch(interop, "load_gpt2")
    watch(opening, "load_hf")      # open_model calls the loaders by their own module's names
    watch(opening, "load_gpt2")
    return seen


def _on_loop(calls):
    loop = threading.current_thread()
    return [name for name, thread in calls if thread is loop]


def _mlp_runs(store, n=2):
    ds = wb.data.load("digits")
    cfg = wb.models.MLPConfig(d_in=64, n_classes=10, d_model=8, d_hidden=8, n_layers=1)
    tc = wb.TrainConfig(steps=2, eval_every=2, eval_max=32)
    return [store.save(r) for r in wb.lmc.train_pair(cfg, ds, seeds=tuple(range(n)), train_config=tc)]


def test_train_and_grow_build_their_data_in_the_job(store, calls):
    train = TrainPage(DataStore(store))
    train.dataset.value = "khop"
    for key, value in {"n_train": 40, "n_val": 20, "nodes": 6}.items():
        train.dataset_widgets[key].value = value
    for key, value in {"d_model": 8, "n_heads": 2, "d_mlp": 16, "n_layers": 1}.items():
        train.model_widgets[key].value = value
    train.train_widgets["steps"].value, train.train_widgets["eval_every"].value = 2, 2
    train.start(wait=True)
    assert train.task.status == "done", train.task.error
    assert train.last_run.model.config.vocab_size == data.shape_of("khop", nodes=6).vocab_size
    grow = GrowPage(DataStore(store))
    small(grow, steps=2)
    grow.final_layers.value = 2
    grow.fill_preset()
    grow.start(wait=True)
    assert grow.task.status == "done", grow.task.error
    assert calls and _on_loop(calls) == []


def test_an_oversized_dataset_is_refused_from_its_options_without_being_built(store, calls):
    """khop with n_train = 1,000,000 froze the server 4.45 s at the click: now the form's check names the bad
    field from the options alone and nothing is generated."""
    train = TrainPage(DataStore(store))
    train.dataset.value = "khop"
    train.dataset_widgets["n_train"].value = 1_000_000
    train.model_widgets["d_model"].value = 0
    train.start(wait=True)
    assert train.errors.text.startswith("d_model must be an integer") and train.task.status == "idle"
    train.model_widgets["d_model"].value = 64
    train.dataset_widgets["nodes"].value, train.dataset_widgets["n_val"].value = 52, 100_000
    train.start(wait=True)
    assert "(WORKBENCH_MAX_DATA_MB)" in train.errors.text and train.task.status == "idle"
    grow = GrowPage(DataStore(store))
    grow.dataset_widgets["n_train"].value = 1_000_000
    grow.model_widgets["d_model"].value = 31                         # not divisible by the 2 heads
    grow.start(wait=True)
    assert "d_model (31) must be divisible by n_heads (2)" in grow.errors.text and grow.task.status == "idle"
    assert calls == []


def test_connectivity_and_unroll_open_stored_runs_in_the_job(store, calls):
    ids = _mlp_runs(store)
    del calls[:]                                                     # the test's own set-up
    conn = ConnectivityPage(DataStore(store))
    conn.run_a.value, conn.run_b.value = ids
    conn.n_alphas.value, conn.resolution.value, conn.max_examples.value = 3, 3, 32
    conn.compute(wait=True)
    assert conn.task.status == "done", conn.task.error
    conn.pair_width.value, conn.pair_layers.value, conn.pair_steps.value = 8, 1, 2
    conn.train_pair(wait=True)
    assert conn.task.status == "done", conn.task.error
    unroll = UnrollPage(DataStore(store))
    unroll.run.value = ids[0]
    unroll.finetune.value, unroll.max_examples.value = 2, 32
    unroll.analyse(wait=True)
    assert unroll.task.status == "done", unroll.task.error
    assert {"load"} <= {name for name, _ in calls} and _on_loop(calls) == []


def test_the_residual_page_opens_runs_and_model_folders_in_the_job(store, calls, tmp_path, monkeypatch):
    ds = data.load("text", context=8, corpus_chars=2000)
    cfg = wb.models.config_for(ds, d_model=16, n_layers=1, n_heads=2, d_mlp=32)
    run = wb.train(wb.models.build(cfg), ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16))
    run_id = store.save(run)
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(tmp_path / "models"))
    interop.export_gpt2(run.model, tmp_path / "models" / "m", vocab=ds.vocab, dataset=ds.spec())
    del calls[:]
    page = ResidualPage(DataStore(store))
    page.run_select.value = run_id
    page.analyse(wait=True)
    assert page.task.status == "done", page.task.error
    page.intervene(wait=True)
    assert page.task.status == "done", page.task.error
    page.source.value = "Hugging Face model"
    page.analyse(wait=True)
    assert page.task.status == "done", page.task.error
    assert {"load", "load_gpt2"} <= {name for name, _ in calls} and _on_loop(calls) == []
    interop.MODELS.release(page._holder)
