"""The hostile student on the Runs page, in a real browser against one served classroom
(tests/classroom_server.py; issue 21, items 4, 5 and 10).

- A forged Tabulator row (``source.data``: another user's run id, ``../..``) and a forged selection, then a
  forged click on the export: the CSV that comes back is the student's own run's, never another's or a
  file outside the store.
- A broken index: the student sees no Rebuild button; unhidden and clicked it changes nothing (no backup,
  the index file as it was) and the page says why; the teacher's click rebuilds it (as a job).
- A run named with live markup, opened by the teacher: plotly draws the name as characters in the plot
  title, with no link and no styled text, and no script runs.
"""
import base64
import time

import pytest
from helpers.classroom_server import browser, get_props, models, set_props, sign_in, start_classroom  # noqa: F401

import workbench as wb
from workbench.io.store import RunStore

pytestmark = [pytest.mark.ui, pytest.mark.timeout(400)]

BOB, OUTSIDE = 424242.5, 31337.25
PAYLOAD = ('<a href="https://evil.example/">link</a><b>bold</b><span style="color:red">red</span>'
           '<img src=x onerror="window.__xss=1">')


def _run(name, value=None):
    ds = wb.data.load("digits")
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=8, n_layers=1,
                                                d_hidden=8))
    run = wb.train(model, ds, wb.TrainConfig(steps=2, eval_every=2, eval_max=16), name=name)
    if value is not None:
        run.metrics = run.metrics.assign(value=value)
    return run


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    r = start_classroom(tmp_path_factory.mktemp("runsroom"))
    store = RunStore(r.home)
    r.ids = {"alice": store.save(_run("alice-run"), owner="alice"),
             "bob": store.save(_run("bob-run", BOB), owner="bob"),
             "payload": store.save(_run(PAYLOAD), owner="alice")}
    (r.home.parent / "metrics.csv").write_text(f"step,split,metric,value\n1,val,loss,{OUTSIDE}\n")
    (r.home / "metrics.csv").write_text(f"step,split,metric,value\n1,val,loss,{OUTSIDE}\n")
    yield r
    r.stop()


_TABLE_JS = """() => {
  for (const doc of Bokeh.documents) for (const m of doc.all_models)
    if (m.source && m.source.data && 'val_acc' in m.source.data && 'run_id' in m.source.data) return m.id;
  return null;
}"""

_FORGE_JS = """([id, forged]) => {
  const m = Bokeh.documents.map(d => d.get_model_by_id(id)).find(x => x != null);
  const data = {};
  for (const [k, v] of Object.entries(m.source.data)) data[k] = Array.from(v);
  data.run_id = data.run_id.map(() => forged);
  if ('owner' in data) data.owner = data.owner.map(() => 'alice');
  m.source.data = data;
  m.source.selected.indices = [0];
}"""


def _open_runs(page):
    page.locator(".bk-tab", has_text="Runs").first.click()
    deadline = time.monotonic() + 60
    while page.evaluate(_TABLE_JS) is None:
        assert time.monotonic() < deadline, "the Runs table never appeared"
        page.wait_for_timeout(250)
    return page.evaluate(_TABLE_JS)


def _export(page, button_id) -> str:
    """Forge a click on the export button; the CSV the server sends back (None when nothing came)."""
    set_props(page, button_id, data="")            # so that the same file sent again is seen
    page.wait_for_timeout(300)
    clicks = get_props(page, button_id, "clicks")["clicks"] or 0
    set_props(page, button_id, clicks=clicks + 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = get_props(page, button_id, "data")["data"]
        if now:
            return base64.b64decode(now.split("base64,", 1)[1]).decode()
        page.wait_for_timeout(200)
    return None


def test_a_forged_row_and_selection_export_only_the_students_own_metrics(room, browser):
    context = browser.new_context()
    try:
        page = sign_in(context, room, "alice")
        table = _open_runs(page)
        button = next(m["id"] for m in models(page, type="FileDownload")
                      if get_props(page, m["id"], "label")["label"] == "Export metrics CSV")
        first = room.ids["payload"]                                          # alice's newest run: her row 0
        own = RunStore(room.home).read_metrics(first).to_csv(index=False)
        for forged in (room.ids["bob"], "../..", "../../..", "../" + room.ids["bob"]):
            page.evaluate(_FORGE_JS, [table, forged])
            deadline = time.monotonic() + 30                                 # the forged selection reached it
            while get_props(page, button, "filename")["filename"] != f"{first}-metrics.csv":
                assert time.monotonic() < deadline, get_props(page, button, "filename")
                page.wait_for_timeout(200)
            csv = _export(page, button)
            assert csv is not None, f"no export came back for {forged!r}: {room.log()[-3000:]}"
            assert str(BOB) not in csv and str(OUTSIDE) not in csv, csv[:300]
            assert csv == own                                                # the server's own row 0: alice's
        assert room.proc.poll() is None
    finally:
        context.close()


def test_the_plot_title_draws_a_markup_name_as_text(room, browser):
    context = browser.new_context()
    try:
        page = sign_in(context, room, "teach")
        _open_runs(page)
        row = page.locator(".tabulator-row", has_text="link").first
        row.click()
        title = page.locator(".js-plotly-plot .gtitle").first
        title.wait_for(timeout=60_000)
        deadline = time.monotonic() + 30
        while "evil.example" not in (title.text_content() or "") and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert title.text_content() == PAYLOAD                              # the characters, tags and all
        assert page.locator(".js-plotly-plot svg a").count() == 0            # no link drawn
        styled = page.evaluate("""() => Array.from(document.querySelectorAll('.js-plotly-plot .gtitle tspan'))
                                  .filter(t => (t.getAttribute('style') || '').match(/bold|red/)).length""")
        assert styled == 0
        assert page.evaluate("window.__xss === undefined")
    finally:
        context.close()


def test_a_student_cannot_rebuild_the_index_and_the_teacher_can(room, browser):
    index = room.home / "index.sqlite"
    index.write_bytes(b"not an sqlite file " * 64)                          # a damaged index
    damaged = index.read_bytes()
    context = browser.new_context()
    try:
        page = sign_in(context, room, "alice")
        _open_runs(page)
        buttons = models(page, type="Button", name=None)
        rebuild = [b for b in buttons if get_props(page, b["id"], "label")["label"] == "Rebuild index"]
        assert rebuild and not any(b["visible"] for b in rebuild)            # hidden from a student
        for b in rebuild:
            set_props(page, b["id"], visible=True)                           # unhidden in the browser ...
        page.get_by_role("button", name="Rebuild index").first.click()       # ... and clicked
        page.wait_for_timeout(3000)
        assert index.read_bytes() == damaged and not list(room.home.glob("index.sqlite.bak-*"))
        assert page.get_by_text("Rebuild index refused").first.is_visible()
        assert room.proc.poll() is None
    finally:
        context.close()
    context = browser.new_context()
    try:
        page = sign_in(context, room, "teach")
        _open_runs(page)
        page.get_by_role("button", name="Rebuild index").first.click()
        deadline = time.monotonic() + 60
        while index.read_bytes() == damaged and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert len(list(room.home.glob("index.sqlite.bak-*"))) == 1
        assert set(RunStore(room.home).list()["run_id"]) == set(room.ids.values())
    finally:
        context.close()
