"""The project stands alone: every ``docs/definitions.md#anchor`` cited exists, nothing cites the steering notes."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("workbench", "docs", "notebooks", "bench", "apps") for p in (ROOT / d).rglob("*")
           if p.suffix in {".py", ".md", ".ipynb"}] + [ROOT / "README.md"]


def _anchors() -> set[str]:
    text = (ROOT / "docs" / "definitions.md").read_text()
    return set(re.findall(r'<a id="([^"]+)"', text))


def test_definition_anchors_exist():
    anchors = _anchors()
    assert len(anchors) > 20
    cited = {(p.relative_to(ROOT), a) for p in SOURCES for a in re.findall(r"definitions\.md#([A-Za-z0-9_-]+)", p.read_text())}
    assert cited, "the code cites no definition"
    missing = sorted((str(p), a) for p, a in cited if a not in anchors)
    assert not missing, f"cited anchors missing from docs/definitions.md: {missing}"


def test_nothing_cites_the_steering_notes():
    hits = [str(p.relative_to(ROOT)) for p in SOURCES if "REFERENCES.md" in p.read_text()]
    assert not hits, f"cite docs/definitions.md instead of REFERENCES.md in {hits}"
