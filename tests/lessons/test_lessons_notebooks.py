"""The lesson notebooks themselves: the six beats in every one, the reference nowhere in them, and the same
files in student mode (without ``WORKBENCH_LESSONS_SOLVE``): an unanswered prediction and an unwritten exercise
get their messages and the kernel goes on; a learner who answers everything runs a whole lesson, and their
answers land in their record. (CI mode is nbval over ``notebooks/lessons/``, by ``make test``.)"""
import inspect
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

import workbench as wb

DIR = wb.lessons.notebooks_dir()
LESSONS = list(wb.lessons.LESSONS.values())
GENERIC = {"with torch.no_grad():"}      # a line of the reference that the lesson's own cells also use
BEATS = ("predict", "build", "explore", "measure", "explain", "extend")


def _cells(lesson):
    return json.loads((DIR / lesson.notebook).read_text())["cells"]


def _tagged(cells, beat, kind=None):
    return [c for c in cells if f"lesson-{beat}" in c.get("metadata", {}).get("tags", [])
            and (kind is None or c["cell_type"] == kind)]


def _src(cell):
    return "".join(cell["source"])


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda les: les.name)
def test_a_lesson_has_its_six_beats(lesson):
    cells = _cells(lesson)
    for beat in BEATS:
        assert _tagged(cells, beat, "code"), f"{lesson.notebook}: no {beat} code cell"
    predict = "\n".join(_src(c) for c in _tagged(cells, "predict", "code"))
    assert "my_prediction = None" in predict and f'wb.lessons.predict("{lesson.measured}"' in predict
    for ex in lesson.exercises:
        build = [_src(c) for c in _tagged(cells, "build", "code")]
        assert any(f"def {ex.reference.__name__}(" in s and "raise NotImplementedError" in s for s in build)
        check = [s for s in build if f'wb.lessons.check("{ex.name}"' in s]
        assert len(check) == 1 and check[0].startswith("# NBVAL_CHECK_OUTPUT")
    measure = [_src(c) for c in _tagged(cells, "measure", "code") if "wb.lessons.measure(" in _src(c)]
    assert len(measure) == 1 and measure[0].startswith("# NBVAL_CHECK_OUTPUT")
    assert f'"{lesson.measured}"' in measure[0]
    explorer = [_src(c) for c in _tagged(cells, "explore", "code") if "wb.ui.explore(" in _src(c)]
    assert explorer, f"{lesson.notebook}: no explorer"
    explain = "\n".join(_src(c) for c in _tagged(cells, "explain", "code"))
    assert f'wb.lessons.explain("{lesson.name}"' in explain
    # Extend: the papers named in the text, each beside a ready experiment (a code cell; two papers may share one)
    assert len(_tagged(cells, "extend", "code")) >= 3 and len(lesson.papers) >= 3
    extend_text = "\n".join(_src(c) for c in _tagged(cells, "extend", "markdown"))
    for paper in lesson.papers:
        assert paper.split(",")[0].split(" et al.")[0].split(" and ")[0] in extend_text, paper


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda les: les.name)
def test_the_reference_is_not_in_the_notebook(lesson):
    text = (DIR / lesson.notebook).read_text()
    for ex in lesson.exercises:
        body = inspect.getsource(ex.reference).split('"""')[-1]          # the lines after the docstring
        lines = [ln.strip() for ln in body.splitlines() if len(ln.strip()) > 12 and ln.strip() not in GENERIC]
        assert lines
        assert not [ln for ln in lines if json.dumps(ln)[1:-1] in text], ex.name
    # no outputs from the explorers or the extension cell (they would be megabytes of JavaScript)
    for cell in _cells(lesson):
        for out in cell.get("outputs", []):
            assert "application/vnd.holoviews_exec.v0+json" not in out.get("data", {})


def test_handout_clears_every_output(tmp_path):
    written = wb.lessons.handout(tmp_path / "class")
    assert [p.name for p in written] == sorted(les.notebook for les in LESSONS)
    for path in written:
        doc = json.loads(path.read_text())
        code = [c for c in doc["cells"] if c["cell_type"] == "code"]
        assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)
        lesson = next(les for les in LESSONS if les.notebook == path.name)
        assert [c["source"] for c in doc["cells"]] == [c["source"] for c in _cells(lesson)]


def _run(cells, env, monkeypatch, allow_errors=True):
    for key in ("WORKBENCH_LESSONS_SOLVE", "WORKBENCH_LESSONS_TEACHER", "WORKBENCH_TEACHERS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=allow_errors,
                   resources={"metadata": {"path": str(DIR)}}).execute()
    return ["".join(o.get("text", "") + o.get("evalue", "") for o in c.outputs) for c in nb.cells]


def test_student_mode_without_answers_gets_messages_and_the_kernel_survives(tmp_path, monkeypatch):
    """Every lesson's Predict, Build and check cells as a student who has not answered yet, in one kernel."""
    cells = ["import torch\nimport workbench as wb\ntorch.set_num_threads(1)"]
    marks = []
    for lesson in LESSONS:
        nb = _cells(lesson)
        for beat in ("predict", "build"):
            for c in _tagged(nb, beat, "code"):
                marks.append((lesson.name, beat, len(cells)))
                cells.append(_src(c))
        cells.append(f'wb.lessons.teacher_view("{lesson.name}")')
        marks.append((lesson.name, "teacher", len(cells) - 1))
    cells.append("print('the kernel is alive')")
    out = _run(cells, {"WORKBENCH_HOME": str(tmp_path / "home"), "WORKBENCH_USER": "student1"}, monkeypatch)
    assert out[-1].strip() == "the kernel is alive"
    for name, beat, i in marks:
        src = cells[i]
        if beat == "predict":
            assert "commit your prediction first" in out[i], (name, out[i])
        elif "wb.lessons.check(" in src:
            assert f"{name}." in out[i] and "not yet" in out[i] and "not written yet" in out[i], (name, out[i])
        elif beat == "teacher":
            assert out[i].strip() == "This cell shows teachers the reference solutions and the class's answers."
    joined = "\n".join(out)
    for lesson in LESSONS:
        for ex in lesson.exercises:
            assert inspect.getsource(ex.reference).splitlines()[-1].strip() not in joined
    record = json.loads((tmp_path / "home" / "lessons" / "student1.json").read_text())
    checks = {k: v for les in record["lessons"].values() for k, v in les.get("checks", {}).items()}
    assert len(checks) == len(LESSONS) and not any(v["passed"] for v in checks.values())


def test_a_student_who_answers_runs_the_whole_lesson(tmp_path, monkeypatch):
    """Connectivity as a student: a prediction, a right function typed in, an explanation. The numbers are the
    CI run's (stored in the notebook) and the answers land in the student's record."""
    lesson = wb.lessons.lesson("connectivity")
    nb = _cells(lesson)
    monkeypatch.setenv("WORKBENCH_LESSONS_TEACHER", "1")
    solution = wb.lessons.reference("connectivity.match_layer")
    cells, stored = [], {}
    for c in nb:
        if c["cell_type"] != "code" or "lesson-extend" in c["metadata"].get("tags", []):
            continue
        src = _src(c)
        if "def match_layer(" in src:
            src = "from scipy.optimize import linear_sum_assignment\nimport numpy as np\n" + solution
        src = src.replace("my_prediction = None", "my_prediction = 0.3")
        src = src.replace('my_explanation = ""', 'my_explanation = "The units were found in another order."')
        if src.startswith("# NBVAL_CHECK_OUTPUT"):
            stored[len(cells)] = "".join("".join(o.get("text", "")) for o in c["outputs"])
        cells.append(src)
    out = _run(cells, {"WORKBENCH_HOME": str(tmp_path / "home"), "WORKBENCH_USER": "student2"}, monkeypatch,
               allow_errors=False)
    for i, expected in stored.items():
        if "wb.lessons.measure(" in cells[i]:
            assert out[i].splitlines()[0] == expected.splitlines()[0]
            assert "you predicted 0.30" in out[i]
        else:
            assert out[i] == expected, (cells[i], out[i])
    record = json.loads((tmp_path / "home" / "lessons" / "student2.json").read_text())["lessons"]["connectivity"]
    assert record["predictions"]["connectivity.barrier_left"]["value"] == 0.3
    assert record["checks"]["connectivity.match_layer"]["passed"] is True
    assert record["measures"]["connectivity.barrier_left"]["value"] == float(stored_value(stored, cells))
    assert record["explanations"]["connectivity"]["text"] == "The units were found in another order."
    assert os.stat(tmp_path / "home" / "lessons" / "student2.json").st_mode & 0o777 == 0o640


def stored_value(stored, cells):
    (i,) = [i for i in stored if "wb.lessons.measure(" in cells[i]]
    return stored[i].splitlines()[0].rsplit(": ", 1)[1]
