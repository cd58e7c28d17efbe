"""Runs belong to the signed-in user (classroom mode), driven through the pages in Python: two students
and a teacher over one store. A student lists, opens and deletes only their own runs and sees the
teacher's shared runs read-only; nobody deletes another's run; a teacher sees everything; without
sign-in everything is as before."""
import pandas as pd
import pytest

from workbench.io.store import StoreError
from workbench.ui import App
from workbench.ui.session import DataStore, UserStore


@pytest.fixture
def classroom(store, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    apps = {user: App(store=store, user=user) for user in ("alice", "bob", "teach")}
    ids = {}
    for user, app in apps.items():
        page = app.pages["Train"]
        page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = 3, 3
        page.run_name.value = f"{user}-run"
        page.start(wait=True)
        assert page.task.status == "done", page.task.error
        ids[user] = page.last_run_id
    store.share(ids["teach"])
    for app in apps.values():
        app.datastore.refresh()
    return apps, ids


def _listed(app):
    return sorted(app.pages["Runs"].table.value["name"])


def test_each_run_is_saved_with_its_owner(classroom, store):
    _, ids = classroom
    listing = store.list().set_index("run_id")
    assert {user: listing.loc[run_id, "owner"] for user, run_id in ids.items()} == \
        {"alice": "alice", "bob": "bob", "teach": "teach"}
    assert store.read_json(ids["alice"])["owner"] == "alice"


def test_a_student_lists_own_and_shared_runs_only(classroom):
    apps, ids = classroom
    assert _listed(apps["alice"]) == ["alice-run", "teach-run"]
    assert _listed(apps["bob"]) == ["bob-run", "teach-run"]
    assert _listed(apps["teach"]) == ["alice-run", "bob-run", "teach-run"]      # a teacher sees every run
    assert "owner" in apps["alice"].pages["Runs"].table.value and "shared" in apps["alice"].pages["Runs"].table.value
    opts = apps["alice"].pages["Residual stream"].run_select.options              # other pages' pickers too
    values = list(opts.values()) if isinstance(opts, dict) else list(opts)
    assert ids["alice"] in values and ids["teach"] in values and ids["bob"] not in values


def test_a_student_cannot_open_or_delete_another_students_run(classroom, store):
    apps, ids = classroom
    alice = apps["alice"].datastore
    with pytest.raises(StoreError, match="belongs to another user"):
        alice.load(ids["bob"])
    with pytest.raises(StoreError, match="belongs to another user"):
        alice.store.read_json(ids["bob"])
    with pytest.raises(StoreError, match="'alice' cannot delete it"):
        alice.delete(ids["bob"])
    assert ids["bob"] in set(store.list()["run_id"])


def test_a_shared_run_is_read_only_for_students(classroom, store):
    apps, ids = classroom
    runs = apps["alice"].pages["Runs"]
    runs.select(ids["teach"])
    assert runs.delete_button.disabled and runs.read_only_note.visible
    assert "shared by teach" in runs.read_only_note.object
    assert runs.errors.text == "" and runs.plot.object.data                     # it opens: curves drawn
    assert apps["alice"].datastore.load(ids["teach"]).name == "teach-run"
    runs._ask_delete()
    assert not runs.confirm_button.visible
    with pytest.raises(StoreError):
        apps["alice"].datastore.delete(ids["teach"])
    with pytest.raises(StoreError, match="only a teacher can share"):
        apps["alice"].datastore.store.share(ids["alice"])
    assert ids["teach"] in set(store.list()["run_id"])


def test_a_student_deletes_their_own_run_from_the_runs_page(classroom, store):
    apps, ids = classroom
    runs = apps["alice"].pages["Runs"]
    runs.select(ids["alice"])
    assert not runs.delete_button.disabled and not runs.read_only_note.visible
    runs._ask_delete()
    assert runs.confirm_button.visible
    runs.delete_selected()
    assert runs.errors.text == ""
    assert _listed(apps["alice"]) == ["teach-run"]
    assert sorted(store.list()["name"]) == ["bob-run", "teach-run"]


def test_a_teacher_may_delete_any_run(classroom, store):
    apps, ids = classroom
    apps["teach"].datastore.delete(ids["bob"])
    assert sorted(store.list()["name"]) == ["alice-run", "teach-run"]


def test_without_sign_in_everything_is_as_before(classroom, store):
    _, ids = classroom
    laptop = App(store=store)
    assert laptop.datastore.user is None and laptop.datastore.store is store       # the store itself
    assert _listed(laptop) == ["alice-run", "bob-run", "teach-run"]
    laptop.datastore.delete(ids["alice"])
    assert sorted(store.list()["name"]) == ["bob-run", "teach-run"]


def test_a_signed_in_name_is_checked():
    with pytest.raises(ValueError, match="signed-in user must be a user name"):
        DataStore(store=None, user="<script>alert(1)</script>")


def test_the_user_store_view_forwards_the_rest(store):
    view = DataStore(store, user="carol").store
    assert isinstance(view, UserStore) and view.runs_dir == store.runs_dir and view.viewer == "carol"
    assert isinstance(view.broken(), pd.DataFrame)
