"""Browser test: serve apps/ and drive it in Chromium. Marked `ui`; `make test` runs it."""
import pytest
from helpers.served_app import ROOT, serve_app, offline_page

pytestmark = [pytest.mark.ui, pytest.mark.timeout(300)]

ARTIFACTS = ROOT / "artifacts"


def _registered_pages() -> list[str]:
    from workbench.ui.page import pages

    return [cls.title for cls in pages()]


PAGES = _registered_pages()  # the page registry (workbench.ui.page), as the app reads it
# pages a session without a signed-in teacher gets no tab for (this server has no sign-in)
TEACHERS_ONLY = {"Teacher"} & set(PAGES)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The served app's run store (WORKBENCH_HOME)."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def model_roots(tmp_path_factory):
    """The served app's model roots (WORKBENCH_MODEL_ROOTS)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def server(home, model_roots):
    with serve_app(home, model_roots, WORKBENCH_THREADS="1") as url:
        yield url


@pytest.fixture(scope="module")
def page():
    with offline_page(timeout_ms=30_000) as pg:
        yield pg


def _open(page, tab: str) -> None:
    page.locator(".bk-tab", has_text=tab).first.click()


def _type(page, label: str, value: str) -> None:
    """Type into the first input whose label contains ``label`` and commit it with Enter."""
    box = page.locator(".bk-input-group", has_text=label).locator("input").first
    box.fill(value)
    box.press("Enter")


def _click(page, button: str) -> None:
    page.locator("button.bk-btn", has_text=button).first.click()


def _open_advanced(page) -> None:
    """Expand the visible tab's collapsed "Advanced" card (its header button)."""
    header = page.locator(".card-header:visible", has_text="Advanced").first
    header.click()
    page.wait_for_timeout(500)


def test_every_page_renders_without_console_errors_with_a_figure_above_the_fold(server, page):
    """Each registered page at 1400 x 1000: a screenshot, and a figure whose top is inside the window."""
    ARTIFACTS.mkdir(exist_ok=True)
    assert page.viewport_size == {"width": 1400, "height": 1000}
    page.goto(server, timeout=120_000)
    page.wait_for_selector("text=Depth Workbench")
    tops = {}
    for title in PAGES:
        if title in TEACHERS_ONLY:
            assert page.locator(".bk-tab", has_text=title).count() == 0, title
            continue
        _open(page, title)
        page.wait_for_selector(".js-plotly-plot:visible")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / f"page-{title.replace(' ', '_').lower()}.png"))
        boxes = [p.bounding_box() for p in page.locator(".js-plotly-plot:visible").all()]
        tops[title] = min(b["y"] for b in boxes if b is not None)
    assert all(top < 1000 for top in tops.values()), tops
    assert page.console_errors == []


def test_short_training_run_draws_a_curve(server, page):
    page.goto(server, timeout=120_000)
    _open(page, "Train")
    _type(page, "steps", "60")
    _click(page, "Train")
    page.wait_for_selector("text=saved as", timeout=120_000)
    page.wait_for_selector(".js-plotly-plot .plot-container")
    n_traces = page.locator(".js-plotly-plot").first.evaluate("el => el.data.length")
    assert n_traces >= 3
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert page.console_errors == []


def test_grow_then_read_the_grown_model_in_the_residual_stream(server, page):
    """Across pages through the store: grow a model on the Grow page, analyse it on Residual stream."""
    page.goto(server, timeout=120_000)
    _open(page, "Grow")
    _type(page, "steps per stage", "20")
    _open_advanced(page)
    _type(page, "final blocks", "3")
    _click(page, "Fill stages from preset")
    _click(page, "Grow")
    page.wait_for_selector("text=stages saved", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "grow-after-run.png"), full_page=True)

    _open(page, "Residual stream")
    page.wait_for_timeout(1000)
    _click(page, "Analyse")
    # the page has switched to the run saved last: the grown model's final stage (3 blocks)
    page.wait_for_selector("text=3 layers; logit lens at the output", timeout=120_000)
    page.wait_for_timeout(1000)
    # the contributions figure now has one trace per sublayer kind at least (attention, MLP)
    n_traces = page.locator(".js-plotly-plot").first.evaluate("el => el.data.length")
    assert n_traces >= 2
    page.screenshot(path=str(ARTIFACTS / "residual-after-grow.png"), full_page=True)
    # the Attention tab was filled by the same analysis: head scores of every stage, a pattern with data
    _open(page, "Attention")
    page.wait_for_selector("text=Strongest head of each kind", timeout=60_000)
    page.wait_for_timeout(1000)
    shown = page.locator(".js-plotly-plot:visible")
    assert shown.count() >= 3 and shown.first.evaluate("el => el.data.length") >= 1
    page.screenshot(path=str(ARTIFACTS / "residual-attention.png"), full_page=True)
    assert page.console_errors == []


# ----------------------------------------------------------------------------- script payloads (issue 10)
XSS = '<img src=x onerror="window.__xss=1">'
SCRIPT = "<script>window.__xss=1</script>"
SVG = '<svg onload="window.__xss=1">'
TEXT = "the cat sees the moon. a dog finds the river. " * 40


@pytest.fixture(scope="module")
def planted(home, model_roots):
    """Runs named with script payloads in the served store, and a model folder so named in the model roots."""
    import workbench as wb

    ds = wb.data.load("text", text=TEXT, context=16)
    store = wb.RunStore(home)
    runs = []
    for seed, name in ((0, XSS), (1, SVG)):  # one frozen substrate (same init seed), two training seeds
        model = wb.models.build(wb.models.config_for(ds, d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                                                     embedding="frozen-random", seed=0))
        runs.append(wb.train(model, ds, wb.TrainConfig(steps=3, eval_every=3, eval_max=16, seed=seed), name=name))
        store.save(runs[-1])
    wb.interop.export_gpt2(runs[0].model, model_roots / XSS, vocab=ds.vocab, dataset=ds.spec())
    return store


def _no_script_ran(page, where: str) -> None:
    assert page.evaluate("window.__xss") is None, f"a payload's script ran ({where})"


def _fill_every_text_field(page, value: str) -> None:
    for box in page.locator("input[type=text]:visible").all():
        try:
            box.fill(value, timeout=2000)
            box.press("Enter", timeout=2000)
        except Exception:  # a disabled or read-only box
            pass


def test_script_payloads_in_names_and_fields_never_run(server, page, planted):
    """Stored payloads (run names, a model folder's name, an uploaded file's name) and typed ones, on every tab."""
    page.goto(server, timeout=120_000)
    page.wait_for_selector("text=Depth Workbench")
    for title in PAGES:
        if title in TEACHERS_ONLY:   # no tab without a signed-in teacher
            continue
        _open(page, title)
        page.wait_for_timeout(1200)
        _no_script_ran(page, f"opening {title}")
        _open_advanced(page)  # the fields there too
        _fill_every_text_field(page, XSS)
        page.wait_for_timeout(500)
        _no_script_ran(page, f"typing into {title}")

    # Train on an uploaded file whose name is a payload, under a payload run name
    page.goto(server, timeout=120_000)
    _open(page, "Train")
    page.locator(".bk-input-group", has_text="dataset").locator("select").first.select_option("text")
    page.wait_for_timeout(800)
    page.locator("input[type=file]").first.set_input_files(
        files=[{"name": f"{XSS}.txt", "mimeType": "text/plain", "buffer": TEXT.encode()}])
    page.wait_for_timeout(800)
    _type(page, "steps", "6")
    _open_advanced(page)
    _type(page, "context", "16")
    _type(page, "eval_every", "3")
    _type(page, "run name", SCRIPT)
    _click(page, "Train")
    page.wait_for_selector("text=saved as", timeout=120_000)
    _no_script_ran(page, "training on the upload")

    # the new run's curves on the Runs page (its name is the figure's title)
    _open(page, "Runs")
    page.wait_for_timeout(1000)
    page.locator(".tabulator-row", has_text="window.__xss").first.click()
    page.wait_for_timeout(1500)
    _no_script_ran(page, "the Runs page")

    # Compose the two payload-named specialists: their names appear in the messages, table and heat-map
    _open(page, "Compose")
    page.wait_for_timeout(1000)
    choices = page.locator(".choices").first
    for marker in ("onerror", "onload"):  # the two planted specialists (one substrate)
        choices.click()
        page.locator(".choices__list--dropdown .choices__item--selectable", has_text=marker).first.click()
        page.wait_for_timeout(300)
    page.keyboard.press("Escape")
    _click(page, "Compose and evaluate")
    try:
        page.wait_for_selector("text=can now open", timeout=180_000)
    finally:
        page.screenshot(path=str(ARTIFACTS / "xss-compose.png"), full_page=True)
    _click(page, "Sample")
    page.wait_for_timeout(1500)
    _no_script_ran(page, "composing")

    # the mixture and the payload-named model folder on the Residual stream page
    _open(page, "Residual stream")
    page.wait_for_timeout(800)
    page.locator(".bk-btn", has_text="Compose mixture").first.click()
    _click(page, "Analyse")
    page.wait_for_selector("text=Mixture of 2 members", timeout=120_000)
    _no_script_ran(page, "analysing the mixture")
    page.locator(".bk-btn", has_text="Hugging Face model").first.click()
    page.wait_for_timeout(800)
    _click(page, "Analyse")
    page.wait_for_selector("text=logit lens at the output", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "xss-residual.png"), full_page=True)
    _no_script_ran(page, "the Hugging Face model")

    for title in set(PAGES) - TEACHERS_ONLY:  # every tab once more, now that the store holds every payload
        _open(page, title)
        page.wait_for_timeout(800)
    _no_script_ran(page, "revisiting every tab")
