"""A student's job budget (issue 21, item 9): steps and seconds a student's job may use, set by the teacher.

The queue gives a marked student's jobs its student budget; ``workbench.train`` stops where the step budget
ends (every training in the job counts), a timer stops a job at its time budget; either way the job ends as
a Stop does, with a message naming the budget. Teachers and the laptop have none. The pages refuse a form
asking for more at once, naming the field, and show the message; the Teacher page shows and sets it.
"""
import time

import panel as pn
import pytest

import workbench as wb
from workbench import jobs
from workbench.core.monitor import current
from workbench.ui.session import QUEUE_KEY, DataStore
from workbench.ui.teacher import TeacherPage
from workbench.ui.train import TrainPage


@pytest.fixture
def queue(monkeypatch):
    monkeypatch.delenv(jobs.STUDENT_STEPS_ENV, raising=False)
    monkeypatch.delenv(jobs.STUDENT_SECONDS_ENV, raising=False)
    q = jobs.JobQueue(max_jobs=2, threads=1, executor="threads")
    pn.state.cache[QUEUE_KEY] = q          # where the pages find the server's queue
    yield q
    q.close()


def _digits():
    return wb.data.load("digits")


def _train(steps, eval_every=None):
    ds = _digits()
    model = wb.models.build(wb.models.MLPConfig(d_in=ds.d_in, n_classes=ds.n_classes, d_model=8, n_layers=1,
                                                d_hidden=8))
    return wb.train(model, ds, wb.TrainConfig(steps=steps, eval_every=eval_every or steps, eval_max=16))


def _two_trainings():
    return _train(4), _train(30)


# ----------------------------------------------------------------------------- the budget and its settings


def test_the_student_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(jobs.STUDENT_STEPS_ENV, raising=False)
    monkeypatch.delenv(jobs.STUDENT_SECONDS_ENV, raising=False)
    assert jobs.student_budget() == jobs.Budget(20_000, 1200.0)
    monkeypatch.setenv(jobs.STUDENT_STEPS_ENV, "500")
    monkeypatch.setenv(jobs.STUDENT_SECONDS_ENV, "none")
    assert jobs.student_budget() == jobs.Budget(500, None)
    assert jobs.student_budget().describe() == "500 steps"
    for bad in ("-3", "lots", "1e99"):
        monkeypatch.setenv(jobs.STUDENT_STEPS_ENV, bad)
        with pytest.raises(ValueError, match="WORKBENCH_STUDENT_MAX_STEPS"):
            jobs.student_budget()
    monkeypatch.setenv(jobs.STUDENT_STEPS_ENV, "10")
    monkeypatch.setenv(jobs.STUDENT_SECONDS_ENV, "0.5")
    with pytest.raises(ValueError, match="WORKBENCH_STUDENT_MAX_SECONDS"):
        jobs.student_budget()
    with pytest.raises(ValueError, match="max_steps"):
        jobs.Budget(max_steps=0)


def test_only_marked_students_get_the_budget(queue):
    queue.add_student("alice")
    assert queue.budget_for("alice") == jobs.Budget(20_000, 1200.0)
    assert queue.budget_for("teach") is None and queue.budget_for("session-abc") is None
    queue.set_student_budget(max_steps=5)
    assert queue.budget_for("alice") == jobs.Budget(5, None)
    queue.set_student_budget(None, None)
    assert queue.budget_for("alice") is None                      # no cap at all: no budget


# ----------------------------------------------------------------------------- the queue enforces it


def test_a_students_job_stops_at_the_step_budget_over_every_training_in_it(queue):
    queue.add_student("alice")
    queue.set_student_budget(max_steps=7)
    job = queue.submit(_two_trainings, user="alice", name="two trainings")
    first, second = job.result(120)
    steps = [int(r.metrics.loc[r.metrics["split"] == "batch", "step"].max()) for r in (first, second)]
    assert steps == [4, 3]                                          # 7 steps in all, then stopped
    assert (first.status, second.status) == ("completed", "cancelled")
    assert job.status == "cancelled" and "7 training steps" in job.over_budget and "step budget" in job.over_budget
    assert second.metrics["split"].isin(["val"]).any()               # the final evaluation, as after a Stop
    free = queue.submit(_two_trainings, user="teach", name="a teacher's")   # no budget for a teacher
    assert [r.status for r in free.result(120)] == ["completed", "completed"] and free.over_budget == ""


def test_a_students_job_stops_at_the_time_budget(queue):
    queue.add_student("bob")
    queue.set_student_budget(max_seconds=1)

    def endless():
        t0 = time.monotonic()
        while not current().stopped and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        return time.monotonic() - t0

    job = queue.submit(endless, user="bob", name="endless")
    took = job.result(60)
    assert took < 30 and job.status == "cancelled"
    assert "time budget" in job.over_budget and "1 s" in job.over_budget
    assert job.to_dict()["budget"] == "1 s" and job.to_dict()["over_budget"] == job.over_budget


def test_a_budget_changed_later_applies_to_later_jobs(queue):
    queue.add_student("alice")
    queue.set_student_budget(max_steps=3)
    early = queue.submit(_train, 10, user="alice")
    queue.set_student_budget(max_steps=8)
    late = queue.submit(_train, 10, user="alice")
    assert int(early.result(120).metrics["step"].max()) == 3
    assert int(late.result(120).metrics["step"].max()) == 8


# ----------------------------------------------------------------------------- pages


def _student_train_page(store, user="alice", steps=20):
    page = TrainPage(DataStore(store, user=user))
    page.train_widgets["steps"].value, page.train_widgets["eval_every"].value = steps, steps
    return page


def test_a_form_over_the_budget_is_refused_at_once_naming_the_field(store, queue, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    page = _student_train_page(store, steps=10_000_000)
    page.start(wait=True)
    assert "steps must be at most 20,000 in all for a student's job" in page.errors.text
    assert "got 10,000,000" in page.errors.text and page.task.job is None and len(store.list()) == 0
    page.run_name.value = "x" * 5000
    page.train_widgets["steps"].value = 10
    page.start(wait=True)
    assert "run name must be at most 200 characters" in page.errors.text and len(store.list()) == 0
    teacher = _student_train_page(store, user="teach", steps=10_000_000)
    teacher.configs()                                                # no budget for a teacher: accepted
    laptop = TrainPage(DataStore(store))
    laptop.train_widgets["steps"].value = 10_000_000
    laptop.configs()                                                 # nor on the laptop


def test_a_students_training_stopped_by_the_time_budget_is_saved_and_says_why(store, queue, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    queue.set_student_budget(max_steps=None, max_seconds=1)
    page = _student_train_page(store, steps=200_000)
    page.train_widgets["eval_every"].value = 100_000
    page.start(wait=True)
    assert page.task.status == "cancelled", page.task.error
    assert "time budget" in page.task.notice and "1 s" in page.task.notice
    assert "time budget" in page.task.status_text()
    listed = store.list()
    assert len(listed) == 1 and listed["owner"].iloc[0] == "alice" and listed["status"].iloc[0] == "cancelled"
    assert 0 < int(listed["steps"].iloc[0]) < 200_000                # what it had, kept


def test_the_teacher_sees_and_sets_the_budget(store, queue, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    page = _teacher_page(store, queue, monkeypatch)
    assert page.budget_steps.value == 20_000 and page.budget_minutes.value == 20
    assert "20,000 steps, 20 min" in page.budget_note.object.replace("\\", "")
    page.budget_steps.value, page.budget_minutes.value = 500, 0.5
    assert page.set_budget() and queue.student_budget == jobs.Budget(500, 30.0)
    page.budget_steps.value = -1
    assert not page.set_budget() and "steps per student job must be a whole number" in page.errors.text
    assert queue.student_budget == jobs.Budget(500, 30.0)            # nothing half-applied
    page.budget_steps.value, page.budget_minutes.value = 0, 0
    assert page.set_budget() and queue.budget_for("alice") is None   # 0: no limit
    # each job's budget is in the table
    queue.set_student_budget(max_steps=1000)
    queue.add_student("alice")
    job = queue.submit(time.sleep, 0.3, user="alice", name="nap")
    page.refresh()
    assert "1,000 steps" in page.jobs_view.object
    job.wait(10)


def _teacher_page(store, queue, monkeypatch):
    import workbench.ui.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "current_user", lambda: "teach")
    return TeacherPage(DataStore(store, user="teach"), queue=queue)


def test_a_student_cannot_set_the_budget(store, queue, monkeypatch):
    import workbench.ui.teacher as teacher_module

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    monkeypatch.setattr(teacher_module, "current_user", lambda: "alice")
    page = TeacherPage(DataStore(store, user="alice"), queue=queue)
    page.budget_steps.value = 10**9
    assert not page.set_budget() and queue.student_budget == jobs.Budget(20_000, 1200.0)


def test_the_step_budget_holds_on_dask_workers(monkeypatch):
    """On Dask the steps are counted on the worker, which tells the server through the job's topic."""
    distributed = pytest.importorskip("distributed")
    monkeypatch.delenv(jobs.STUDENT_STEPS_ENV, raising=False)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    client = distributed.Client(cluster, set_as_default=False)
    try:
        q = jobs.JobQueue(max_jobs=1, executor=jobs.DaskExecutor(client, report_interval=0.0))
        q.add_student("alice")
        q.set_student_budget(max_steps=7)
        job = q.submit(_two_trainings, user="alice", name="two trainings")
        first, second = job.result(120)
        assert [int(r.metrics["step"].max()) for r in (first, second)] == [4, 3]
        deadline = time.monotonic() + 10
        while not job.over_budget and time.monotonic() < deadline:    # the worker's report comes by the topic
            time.sleep(0.02)
        assert "7 training steps" in job.over_budget
        q.close()
    finally:
        client.close()
        cluster.close()


def test_other_pages_refuse_a_form_over_the_budget_naming_the_field(store, queue, monkeypatch):
    from workbench.ui.grokking import GrokkingPage
    from workbench.ui.grow import GrowPage

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    queue.set_student_budget(max_steps=100)
    grok = GrokkingPage(DataStore(store, user="alice"))
    grok.inputs["steps"].value = 101
    grok.train(wait=True)
    assert "steps must be at most 100 in all for a student's job (the teacher's step budget), got 101" \
        in grok.errors.text
    assert grok.task.job is None
    grow = GrowPage(DataStore(store, user="alice"))
    grow.stage_steps.value = 60
    grow.fill_preset()
    grow.start(wait=True)
    assert "steps of the stages must be at most 100" in grow.errors.text and grow.task.job is None
    grok_teacher = GrokkingPage(DataStore(store, user="teach"))
    grok_teacher.inputs["steps"].value = 101
    assert grok_teacher.config().steps == 101


def test_compose_refuses_a_students_stages_over_the_budget(store, queue, monkeypatch):
    from workbench.ui.compose import ComposePage

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    queue.set_student_budget(max_steps=100)
    page = ComposePage(DataStore(store, user="alice"))
    page.train_steps.value = 34
    page.train_two(wait=True)
    assert "steps per stage (x 3 stages) must be at most 100" in page.errors.text and page.train_task.job is None


def test_connectivity_refuses_a_students_pair_over_the_budget(store, queue, monkeypatch):
    from workbench.ui.connectivity import ConnectivityPage

    monkeypatch.setenv("WORKBENCH_TEACHERS", "teach")
    queue.set_student_budget(max_steps=100)
    page = ConnectivityPage(DataStore(store, user="alice"))
    page.pair_steps.value = 60
    page.train_pair(wait=True)
    assert "steps (x 2 models) must be at most 100" in page.errors.text and page.task.job is None
