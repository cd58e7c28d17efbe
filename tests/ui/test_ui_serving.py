"""What the server does at start and for its sessions: the deferred cards, the warm-up, the debug report."""
import gc

import panel as pn
import pytest
from bokeh.document import Document
from bokeh.models import Spinner
from panel.io.state import set_curdoc

from workbench.io.store import RunStore
from workbench.ui import serving
from workbench.ui.app import App
from workbench.ui.widgets import deferred_card


def _spinners(model) -> int:
    return len(list(model.select({"type": Spinner})))


def test_a_deferred_card_sends_its_content_only_once_opened():
    built = []
    box = pn.widgets.IntInput(name="n", value=3)

    def build():
        built.append(1)
        return [box]

    card = deferred_card(build, title="Advanced")
    doc = Document()
    root = card.get_root(doc)
    assert card.collapsed and card.objects == [] and built == [] and _spinners(root) == 0   # nothing laid out
    card.collapsed = False                                       # the browser opens it: the content arrives
    assert built == [1] and card.objects == [box] and _spinners(root) == 1
    card.collapsed = True
    card.collapsed = False                                       # built once
    assert built == [1] and _spinners(root) == 1
    open_at_once = deferred_card(lambda: [pn.widgets.IntInput(name="m")], title="Open", collapsed=False)
    assert _spinners(open_at_once.get_root(Document())) == 1


def test_a_page_sends_no_advanced_field_until_its_card_is_opened(tmp_path):
    doc = Document()
    with set_curdoc(doc):
        app = App(store=RunStore(tmp_path))
        page = app.show("Train")
        root = page.__panel__().get_root(doc)
    n_fields = len(page.model_widgets) + len(page.dataset_widgets)
    closed = _spinners(root)
    page.advanced_card.collapsed = False
    assert _spinners(root) >= closed + n_fields - 2          # the model's and data's number fields (a few are menus)
    assert page.model_widgets["d_model"]._models              # the page's own widget, now in the document


def test_warm_up_freezes_what_start_up_made_and_builds_a_dashboard(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    try:
        seconds = serving.warm_up()
        assert seconds > 0 and gc.get_freeze_count() > 10_000   # the modules and caches, out of the collector's walk
    finally:
        gc.unfreeze()


def test_the_debug_report_sees_a_dashboard_and_sees_it_go(tmp_path):
    def apps() -> int:
        return serving.debug_report()["objects"]["App"]

    before = apps()
    doc = Document()
    with set_curdoc(doc):
        app = App(store=RunStore(tmp_path))
        view = app.__panel__()
        root = view.get_root(doc)
    report = serving.debug_report()
    assert report["objects"]["App"] == before + 1 and report["objects"]["Page"] >= 1
    assert {"threads", "periodic", "queue", "cache", "panel", "rss_mib"} <= set(report)
    assert any(name == "MainThread" for name in report["threads"])
    serving.discard(view, root)                  # what the end of a served session does
    del app, view, root, doc
    assert apps() == before


@pytest.mark.parametrize("value", ["", "0", "yes"])
def test_the_debug_signal_is_installed_only_when_asked(monkeypatch, value):
    import signal

    installed = []
    monkeypatch.setattr(serving, "_install_debug_signal", lambda: installed.append(1))
    monkeypatch.setenv(serving.DEBUG_ENV, value)
    previous = signal.getsignal(signal.SIGUSR1)
    serving.install()
    assert installed == [] and signal.getsignal(signal.SIGUSR1) == previous
    monkeypatch.setenv(serving.DEBUG_ENV, "1")
    serving.install()
    assert installed == [1]


def test_a_tab_named_in_the_url_opens_that_page_and_a_foreign_name_the_first(tmp_path):
    app = App(store=RunStore(tmp_path), tab="Train")
    titles = list(app.pages)
    assert app.tabs.active == titles.index("Train") and app.pages.built() == ["Train"]
    for foreign in ("Teacher", "<script>", "../etc", ""):      # not a tab of this session
        other = App(store=RunStore(tmp_path), tab=foreign)
        assert other.tabs.active == 0 and other.pages.built() == [titles[0]]
