"""The short soak (``bench/bench_soak.py`` runs 200): sessions that open the dashboard, train a few steps and
close give back what they made.

One ``panel serve apps/`` on 127.0.0.1 with the debug report on SIGUSR1 (the server's own count, after a
collection, of live documents, sessions, pages, tasks, periodic callbacks, threads, queue entries and
``pn.state`` caches). After a warm-up wave, 10 sessions in two waves of 5 (one per wave in Chromium, the
others Bokeh websocket clients) each train and save a run; once they are closed and discarded nothing they
made is left and the server's resident set is back near the baseline.
"""
import pytest

from bench import bench_soak

pytestmark = [pytest.mark.ui, pytest.mark.timeout(900)]


def test_ten_sessions_open_train_close_and_leave_nothing_behind():
    result = bench_soak.soak(n=10, wave=5, browsers_per_wave=1, max_seconds=600)
    assert result["errors"] == [] and result["opened"] == 10 and len(result["times"]) == 10
    assert result["runs"] >= 10 + 5                                 # every session's run saved (and the warm-up's)
    assert bench_soak.leftovers(result["baseline"], result["after"]) == []
    baseline, after = result["baseline"]["rss_mib"], result["after"]["rss_mib"]
    assert after <= 1.15 * baseline, (baseline, after)               # the bench's bound is 1.1 over 200 sessions


def test_the_leftover_check_names_what_outlived_its_session():
    """The comparison the soak rests on: a construction where a page, a thread and a queue entry were left."""
    base = {"objects": {"Page": 3, "Document": 1}, "threads": ["MainThread"], "periodic": 0, "scheduled": [],
            "queue": {"jobs": 0, "listeners": 1}, "cache": {"queue": 1}, "panel": {"_views": 2}, "sessions": 0}
    after = {**base, "objects": {"Page": 5, "Document": 1}, "threads": ["MainThread", "job-7"],
             "queue": {"jobs": 1, "listeners": 1}}
    left = bench_soak.leftovers(base, after)
    assert left[0] == "2 Page object(s)" and any("job-7" in line for line in left)
    assert any(line.startswith("queue jobs 0 -> 1") for line in left) and len(left) == 3
    assert bench_soak.leftovers(base, base) == []
    assert bench_soak.leftovers(base, {**base, "scheduled": ["5617_gc.collect"]}) == []   # Panel's own, one a process
    assert bench_soak.leftovers(base, {**base, "scheduled": ["poll-7"]}) == ["scheduled tasks [] -> ['poll-7']"]
