"""Issue 21, item 2: on a class server a student's Hub download is offered to that student only, until a
teacher shares it from the Teacher page; a student cannot share, and the browser names only listed rows."""
import os

import panel as pn
import pytest

from workbench import interop, roots
from workbench.ui import teacher
from workbench.ui.session import DataStore
from workbench.ui.residual import ResidualPage


def _snapshot(cache, repo, rev):
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / "c").write_text('{"model_type": "gpt2"}')
    (folder / "blobs" / "w").write_bytes(b"\0" * 8)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    os.symlink("../../blobs/c", snap / "config.json")
    os.symlink("../../blobs/w", snap / "model.safetensors")
    return snap.resolve()


@pytest.fixture
def classroom(store, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    monkeypatch.setenv(roots.ENV, str(tmp_path / "no-other-models"))
    for var in (interop.ALLOW_HUB_ENV, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    snap = _snapshot(roots.hub_cache("alice", store.root), "org/tiny", "abc")
    return store, snap


def _offered(store, user):
    page = ResidualPage(DataStore(store, user=user))
    page.source.value = "Hugging Face model"
    return page, set(page.hf_model.options.values())


def test_a_teacher_shares_a_students_download_with_the_class(classroom, monkeypatch):
    store, snap = classroom
    assert str(snap) in _offered(store, "alice")[1]
    bob, offered = _offered(store, "bob")
    assert str(snap) not in offered
    assert not bob.hub_name.visible                        # Hub names: off until the teacher allows them
    bob.hub_name.value = "org/tiny"                        # a forged value is refused all the same
    bob.analyse(wait=True)
    assert bob.errors.text == interop.HUB_REFUSED

    monkeypatch.setattr(teacher, "current_user", lambda: "teach")
    page = teacher.TeacherPage(DataStore(store, user="teach"))
    panel = page.__panel__()
    assert page.downloads.select in panel.select(pn.widgets.Select)   # shown on the Teacher page
    assert list(page.downloads.select.options) == ["alice · org/tiny @ abc"]
    page.downloads.select.param.update(value="7")          # a key this server never listed
    assert not page.downloads.share_selected() and "pick one of the listed downloads" in page.downloads.errors.text
    page.downloads.select.value = "0"
    assert page.downloads.share_selected()
    shared = (roots.hub_cache(None, store.root) / "models--org--tiny" / "snapshots" / "abc").resolve()
    for user in ("bob", "alice"):
        assert str(shared) in _offered(store, user)[1]
    assert page.downloads.select.options == {} and "org/tiny @ abc" in page.downloads.note.object


def test_a_student_cannot_share(classroom, monkeypatch):
    store, snap = classroom
    monkeypatch.setattr(teacher, "current_user", lambda: "teach")
    page = teacher.TeacherPage(DataStore(store, user="teach"))
    monkeypatch.setattr(teacher, "current_user", lambda: "bob")   # the session is no longer a teacher's
    page.downloads.select.value = "0"
    assert not page.downloads.share_selected()
    assert snap.exists() and str(snap) not in _offered(store, "bob")[1]
    monkeypatch.setattr(teacher, "current_user", lambda: "bob")
    assert teacher.TeacherPage(DataStore(store, user="bob")).downloads is None   # a student's page has none


def test_with_the_teachers_flag_students_may_name_hub_models(classroom, monkeypatch):
    store, _ = classroom
    monkeypatch.setenv(interop.ALLOW_HUB_ENV, "1")
    page, _ = _offered(store, "bob")
    assert page.hub_name.visible
    page.hub_name.value = "org/../x"
    page.analyse(wait=True)
    assert "Hub name must look like 'owner/name'" in page.errors.text
