"""Dashboard security (issue 10), driven through the pages' widgets in Python, without a server.

Stored and reflected XSS: every pane that puts text into the page as HTML (Markdown, Alert, HTML,
Str, DataFrame) and every widget that renders its labels as HTML (MultiChoice) is scanned for the
payload's raw tag after the payload went in as a run name, an error message or a typed value.
Server files: the text dataset comes by upload, models from the configured roots, stored specs
naming a server path are refused. Robustness: a second start while a job runs is refused with a
visible notice; closing the tab finishes and saves a training run.
"""
import html
import os
import threading

import pandas as pd
import panel as pn
import pytest
from bokeh.document import Document
from panel.io.state import set_curdoc
from panel.pane.markup import HTMLBasePane

import workbench as wb
from workbench import data, interop, roots
from workbench.ui import App
from workbench.experiments import train as train_module
from workbench.ui.session import DataStore
from workbench.ui.task import BUSY, BackgroundTask
from workbench.ui.text import escape_md, text_block
from workbench.ui.widgets import ErrorBox
from workbench.ui.residual import ResidualPage

PAYLOAD = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>window.__xss=1</script>"
TEXT = "the cat sees the moon. a dog finds the river. " * 40   # a small upload (vocabulary of 19 characters)


def _page_html(viewable) -> list[str]:
    """What the browser would put into the page as HTML, pane by pane (the transport encoding undone)."""
    layout = viewable.__panel__() if hasattr(viewable, "__panel__") else viewable
    out = []
    for pane in layout.select(HTMLBasePane):
        out.append(html.unescape(pane._transform_object(pane.object)["object"]))
    for choice in layout.select(pn.widgets.MultiChoice):  # Choices.js renders labels as HTML
        out.extend(choice.labels if hasattr(choice, "labels") else list(choice.options))
    return out


def _assert_no_raw_tag(viewable, *payloads):
    for rendered in _page_html(viewable):
        for p in payloads:
            tag = p[: p.index(" ")] if " " in p else p[:7]  # "<img", "<script"
            assert tag not in rendered, rendered[:300]


def _text_run(name: str, seed: int = 0, steps: int = 2):
    """A small Transformer trained on uploaded text (so its domain name is the run name)."""
    ds = data.load("text", text=TEXT, context=16)
    model = wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                                                 embedding="frozen-random", seed=0))
    run = wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=steps, eval_max=16, seed=seed), name=name)
    return run, ds


def _mlp_run(name: str):
    ds = data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=16, n_layers=1,
                                                d_hidden=16))
    return wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16), name=name)


# ----------------------------------------------------------------------------- helpers


def test_escape_md_shows_exactly_the_text():
    """Rendered by Panel's own Markdown pane, the escaped text is the original characters, no markup."""
    tricky = PAYLOAD + " *bold* [link](javascript:alert(1)) `code` $$x$$ | a | <b>b</b> & &lt; \\ # h"
    pane = pn.pane.Markdown(escape_md(tricky))
    rendered = html.unescape(pane._transform_object(pane.object)["object"])
    assert "<img" not in rendered and "<b>" not in rendered and "<em>" not in rendered
    assert "<a " not in rendered and "<code>" not in rendered
    # strip the paragraph and undo the HTML escaping: the original text comes back
    inner = rendered.strip().removeprefix("<p>").removesuffix("</p>")
    assert html.unescape(inner) == tricky


def test_text_block_escapes_where_panels_str_does_not():
    """pn.pane.Str wraps its text in <pre> without escaping it (Panel 1.x); text_block escapes."""
    raw = pn.pane.Str(PAYLOAD)
    assert "<img" in html.unescape(raw._transform_object(raw.object)["object"])  # why the pages avoid Str
    pane = pn.pane.HTML(text_block(PAYLOAD))
    rendered = html.unescape(pane._transform_object(pane.object)["object"])
    assert "<img" not in rendered and html.escape(PAYLOAD) in rendered


# ----------------------------------------------------------------------------- stored XSS


@pytest.fixture
def payload_store(store):
    """A store holding a Transformer run and an MLP run named with script payloads."""
    run, _ = _text_run(PAYLOAD)
    run2, _ = _text_run(SCRIPT, seed=1)
    store.save(run)
    store.save(run2)
    store.save(_mlp_run(PAYLOAD))
    return store


def test_run_names_with_payloads_are_escaped_on_every_page(payload_store):
    app = App(store=payload_store)
    compose = app.pages["Compose"]
    labels = list(compose.specialists.options)
    assert len(labels) == 2 and all("&lt;" in label for label in labels)  # escaped for Choices.js
    assert not any("<img" in label or "<script" in label for label in labels)
    for title, page in app.pages.items():
        _assert_no_raw_tag(page, PAYLOAD, SCRIPT)


def test_composing_payload_named_specialists_renders_them_escaped(payload_store):
    app = App(store=payload_store)
    page = app.pages["Compose"]
    page.specialists.value = list(page.specialists.options.values())
    page.merges.value = ["logit mean"]
    page.run_compose(wait=True)
    assert page.compose_task.status == "done", page.compose_task.error
    assert PAYLOAD in page.result["members"]                   # the name is used, as text
    assert "Residual stream page can now open" in page.message.object
    page.sample_model.value = PAYLOAD
    page.prompt.value = "the "
    page.sample(wait=True)
    assert page.errors.text == ""
    _assert_no_raw_tag(page, PAYLOAD, SCRIPT)
    # the Residual page opens the mixture; its summary names the member
    residual = app.pages["Residual stream"]
    residual.source.value = "Compose mixture (this session)"
    residual.analyse(wait=True)
    assert residual.task.status == "done", residual.task.error
    assert "member 0" in residual.summary.object
    _assert_no_raw_tag(residual, PAYLOAD, SCRIPT)


# ----------------------------------------------------------------------------- reflected XSS


def test_error_box_and_task_status_escape_the_message():
    box = ErrorBox()
    box.show(ValueError(f"khop.layout must be one of ['edges', 'table'], got {PAYLOAD!r}"))
    assert PAYLOAD in box.text                                 # the message itself is unchanged
    _assert_no_raw_tag(box, PAYLOAD)
    assert html.escape(PAYLOAD) in html.unescape(box.html) or "&lt;img" in box.html

    task = BackgroundTask()
    controls = task.controls()

    def fails(ctx):
        ctx.report(message=SCRIPT)
        raise ValueError(PAYLOAD)

    task.run_now(fails)
    assert task.status == "error" and task.error == PAYLOAD
    _assert_no_raw_tag(controls, PAYLOAD)
    task.status, task.error, task.message = "running", "", SCRIPT
    task.busy()
    _assert_no_raw_tag(controls, SCRIPT)


def test_a_typed_payload_echoed_by_the_engine_is_escaped(store):
    app = App(store=store)
    grow = app.pages["Grow"]
    grow.dataset_widgets["layout"].param.update(value=PAYLOAD)  # what a hostile client can send
    grow.start(wait=True)
    assert PAYLOAD in grow.errors.text
    _assert_no_raw_tag(grow, PAYLOAD)
    residual = app.pages["Residual stream"]
    residual.hf_model.options = {PAYLOAD: PAYLOAD}
    residual.source.value = "Hugging Face model"
    residual.hf_model.value = PAYLOAD
    residual.analyse(wait=True)
    assert residual.errors.text == roots.REFUSED
    _assert_no_raw_tag(residual, PAYLOAD)


# ----------------------------------------------------------------------------- server files


def test_no_page_offers_a_server_path_field(store):
    app = App(store=store)
    app.pages["Train"].dataset.value = "text"
    app.pages["Grow"].dataset.value = "text"
    for page in app.pages.values():
        for w in page.__panel__().select(pn.widgets.TextInput):
            if w is getattr(page, "hub_name", None):
                continue   # a Hub name 'owner/name', checked never to name a server place (tests/test_ui_residual_hf.py)
            words = f"{w.name} {w.placeholder}".lower()
            assert "path" not in words and "directory" not in words and "/" not in words, w.name


def test_train_page_trains_on_the_uploaded_bytes(store):
    page = App(store=store).pages["Train"]
    page.dataset.value = "text"
    assert "path" not in page.dataset_widgets and page.upload.file in page.__panel__().select(pn.widgets.FileInput)
    page.upload.file.param.update(value=TEXT.encode("utf-8"), filename="mine.txt")
    page.dataset_widgets["context"].value = 16
    for key, value in {"d_model": 16, "n_heads": 2, "d_mlp": 32, "n_layers": 1}.items():
        page.model_widgets[key].value = value
    page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 3, 3
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    run = store.load(page.last_run_id)
    reference = data.load("text", text=TEXT, context=16)   # the engine on the same characters
    assert run.dataset["text"] == TEXT and "path" not in run.dataset
    assert run.model.config.vocab == list(reference.vocab) == sorted(set(TEXT))
    assert "open('mine.txt'" in page.code.object and TEXT[:40] not in page.code.object


def test_upload_that_is_not_text_or_too_large_is_refused(store, monkeypatch):
    page = App(store=store).pages["Train"]
    page.dataset.value = "text"
    page.upload.file.param.update(value=b"\xff\xfe\x00binary", filename="x.bin")
    page.start(wait=True)
    assert "is not UTF-8 text" in page.errors.text and page.task.status == "idle"
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", "0.001")
    page.upload.file.param.update(value=TEXT.encode() * 2, filename="big.txt")
    page.start(wait=True)
    assert "at most 0.001 MB (WORKBENCH_MAX_UPLOAD_MB)" in page.errors.text
    assert page.task.status == "idle" and len(store.list()) == 0


def test_grow_page_grows_on_an_upload(store):
    page = App(store=store).pages["Grow"]
    page.dataset.value = "text"
    page.upload.file.param.update(value=TEXT.encode("utf-8"), filename="mine.txt")
    page.dataset_widgets["context"].value = 16
    page.model_widgets["d_model"].value, page.model_widgets["d_mlp"].value = 16, 32
    page.train_widgets["eval_every"].value, page.train_widgets["eval_max"].value = 2, 16
    page.stage_steps.value, page.final_layers.value = 2, 2
    page.fill_preset()
    page.start(wait=True)
    assert page.task.status == "done", page.task.error
    assert page.last_run.dataset["text"] == TEXT


@pytest.fixture
def path_spec_runs(store, tmp_path):
    """Two runs whose stored dataset spec names a file on the server (a planted or an old run.json)."""
    secret = tmp_path / "secret.txt"
    secret.write_text(TEXT)
    ids = []
    for seed in (0, 1):
        run, ds = _text_run(f"path-run-{seed}", seed=seed)
        run.dataset = {"name": "text", "path": str(secret), "context": 16, "val_fraction": 0.1, "vocab": None,
                       "corpus_chars": 200_000, "seed": 0}
        ids.append(store.save(run))
    assert data.from_spec(store.load(ids[0]).dataset).vocab  # the engine (a notebook) still reads it
    return ids


def test_a_stored_spec_naming_a_server_file_is_refused_on_every_page(store, path_spec_runs):
    app = App(store=store)
    residual = app.pages["Residual stream"]
    residual.run_select.value = path_spec_runs[0]
    residual.analyse(wait=True)
    assert residual.errors.text == data.PATH_REFUSED
    conn = app.pages["Connectivity"]
    conn.run_a.value, conn.run_b.value = path_spec_runs
    conn.compute(wait=True)
    assert conn.task.status == "error" and conn.task.error == data.PATH_REFUSED
    compose = app.pages["Compose"]
    compose.specialists.value = path_spec_runs
    compose.merges.value = ["logit mean"]
    compose.run_compose(wait=True)
    assert compose.compose_task.status == "error" and compose.compose_task.error == data.PATH_REFUSED


def test_residual_page_refuses_models_outside_the_roots_with_one_message(store, tmp_path, monkeypatch):
    run, ds = _text_run("m")
    inside, outside = tmp_path / "models", tmp_path / "elsewhere"
    monkeypatch.setenv("WORKBENCH_MODEL_ROOTS", str(inside))
    good = interop.export_gpt2(run.model, inside / "good", vocab=ds.vocab)
    secret = interop.export_gpt2(run.model, outside / "secret", vocab=ds.vocab)
    os.symlink(secret, inside / "link-out")
    page = ResidualPage(DataStore(store))
    page.source.value = "Hugging Face model"
    assert list(page.hf_model.options.values()) == [str(good.resolve())]  # the planted model, not the link
    forged = [str(secret), str(inside / "link-out"), str(outside / "missing"), "/etc", "/etc/passwd",
              str(inside / ".." / "elsewhere" / "secret")]
    messages = set()
    for value in forged:
        page.hf_model.options = {**page.hf_model.options, value: value}
        page.hf_model.value = value
        page.analyse(wait=True)
        messages.add(page.errors.text)
    assert messages == {roots.REFUSED}
    page.hf_model.value = str(good.resolve())
    page.input_kind.value = "Typed text"
    page.text.value = "the cat"
    page.analyse(wait=True)
    assert page.errors.text == "" and page.analysis.tokens == list("the cat")


# ----------------------------------------------------------------------------- a second start (item 7)


def _starts(app):
    """Each page's start handlers and the task each one runs on."""
    p = app.pages
    return [(p["Train"].start, p["Train"].task), (p["Grow"].start, p["Grow"].task),
            (p["Residual stream"].analyse, p["Residual stream"].task),
            (p["Connectivity"].compute, p["Connectivity"].task),
            (p["Connectivity"].train_pair, p["Connectivity"].task),
            (p["Connectivity"].run_instability, p["Connectivity"].task),
            (p["Collapse"].train, p["Collapse"].task),
            (p["Compose"].train_two, p["Compose"].train_task),
            (p["Compose"].run_compose, p["Compose"].compose_task)]


def test_a_second_start_while_running_is_refused_with_a_visible_notice(store):
    app = App(store=store)
    for start, task in _starts(app):
        controls = task.controls()
        task.status = "running"  # a job is in flight
        job = task.job
        start()                  # the double click: no exception, nothing new started
        assert task.job is job and task.notice == BUSY, start
        rendered = " ".join(_page_html(controls))
        assert "still running" in rendered, start
        task.status = "idle"


def test_double_click_on_train_starts_one_run(store, monkeypatch):
    gate = threading.Event()
    real_train = train_module.train_model

    def gated(*args, **kwargs):
        gate.wait(60)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_model", gated)
    page = App(store=store).pages["Train"]
    page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 5, 5
    page.start()
    page.start()  # refused
    assert page.task.notice == BUSY and page.errors.text == ""
    gate.set()
    page.task.join(60)
    assert page.task.status == "done", page.task.error
    assert len(store.list()) == 1 and page.task.notice == ""


# ----------------------------------------------------------------------------- closing the tab (item 16)


def _close_tab(doc: Document) -> None:
    """What the server does when the browser tab goes away: the document's session-destroyed callbacks."""
    for callback in list(doc.session_destroyed_callbacks):
        callback(None)


def test_closing_the_tab_finishes_and_saves_the_training_run(store, monkeypatch):
    gate = threading.Event()
    real_train = train_module.train_model

    def gated(*args, **kwargs):
        gate.wait(60)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_model", gated)
    doc = Document()
    with set_curdoc(doc):  # the page is built in a session, as when served
        app = App(store=store)
    page = app.pages["Train"]
    page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 30, 10
    page.run_name.value = "closed-tab"
    page.start()
    _close_tab(doc)           # the tab is closed while the run trains
    gate.set()
    page.task.wait(120)
    listing = store.list()
    assert list(listing["name"]) == ["closed-tab"]
    assert listing.loc[0, "status"] == "completed" and listing.loc[0, "steps"] == 30  # finished, not stopped
    assert page.last_run is None  # saved by the worker: the page's on_done never ran (no session)
    assert page.task._queue.empty()  # nothing left queued for a session that is gone


def test_closing_the_tab_finishes_every_stage_of_a_growth_run(store):
    doc = Document()
    with set_curdoc(doc):
        app = App(store=store)
    page = app.pages["Grow"]
    page.stage_steps.value, page.final_layers.value = 5, 3
    page.train_widgets["eval_every"].value = 5
    page.fill_preset()
    stages = len(page.stages.value)
    _close_tab(doc)           # closed before the run (the worker must finish the whole schedule anyway)
    page.start()
    page.task.wait(300)
    assert len(store.list()) == stages and page.last_run is None
    assert sorted(store.list()["stage"].tolist()) == list(range(stages))


def test_closing_the_tab_stops_an_analysis(store):
    doc = Document()
    with set_curdoc(doc):
        app = App(store=store)
    task = app.pages["Connectivity"].task
    seen = []
    started = threading.Event()

    def analysis(ctx):
        started.set()
        ctx.stop_event.wait(60)
        seen.append(ctx.stopped)
        return pd.DataFrame()

    task.start(analysis)
    started.wait(60)
    _close_tab(doc)
    task.wait(60)
    assert seen == [True] and task.orphaned


def test_runs_page_shows_an_uploaded_text_by_its_length(store):
    run, _ = _text_run("uploaded")
    run_id = store.save(run)
    page = App(store=store).pages["Runs"]
    page.select(run_id)
    values = page.config_view.value["value"].astype(str)
    assert TEXT[:40] not in " ".join(values)
    assert f"<{len(TEXT):,} characters>" in " ".join(values)
