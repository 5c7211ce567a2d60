"""Prometheus metrics (CONTRACT 6.4): the counters and histograms are receivers of
the task signals, the per-state gauge is read from the store when scraped, and
multi-process mode under gunicorn adds up the workers' counters."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from flask_restful import abort
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from flask_restful_async import AsyncResource, current_task
from flask_restful_async.metrics import store_collector

from .conftest import HELD_RELEASE as RELEASE
from .conftest import HELD_STARTED as STARTED
from .conftest import AppFactory, Held, wait_done, wait_for
from .servers import ROOT, http, poll_until_done, serve

#: Every series of ours, and the labels each may have: never a task id or an owner.
LABELS = {
    "restful_async_tasks_submitted_total": {"endpoint", "method"},
    "restful_async_tasks_finished_total": {"endpoint", "state"},
    "restful_async_tasks_rejected_total": {"reason"},
    "restful_async_task_queued_seconds_bucket": {"endpoint", "le"},
    "restful_async_task_queued_seconds_count": {"endpoint"},
    "restful_async_task_queued_seconds_sum": {"endpoint"},
    "restful_async_task_run_seconds_bucket": {"endpoint", "le"},
    "restful_async_task_run_seconds_count": {"endpoint"},
    "restful_async_task_run_seconds_sum": {"endpoint"},
    "restful_async_tasks": {"state"},
    "restful_async_oldest_queued_seconds": set(),
}


class Report(AsyncResource):
    def post(self) -> t.Any:
        current_task.progress(1, total=1)
        return {"ok": True}, 201


class Broken(AsyncResource):
    def put(self) -> t.Any:
        abort(409, message="no")


pytestmark = pytest.mark.usefixtures("held_tasks")


def value(name: str, **labels: str) -> float:
    """A sample of the default registry (0 while the series does not exist).

    Only the collector of ``name`` is asked: a counter's value never makes the
    store collector read the stores of every app this test process connected.
    """
    return sample(name, labels) or 0.0


def sample(name: str, labels: dict[str, str]) -> float | None:
    for family in REGISTRY.restricted_registry([name]).collect():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def our_samples() -> list[t.Any]:
    return [
        sample
        for family in REGISTRY.collect()
        if family.name.startswith("restful_async_")
        for sample in family.samples
        if not sample.name.endswith("_created")
    ]


def test_tasks_are_counted_by_endpoint_method_and_state(make_app: AppFactory) -> None:
    app, api = make_app(owner=lambda: "alice-the-owner")
    api.add_resource(Report, "/metrics-reports", endpoint="metrics_report")
    api.add_resource(Broken, "/metrics-broken", endpoint="metrics_broken")
    client = app.test_client()
    names = [
        ("restful_async_tasks_submitted_total", {"endpoint": "metrics_report", "method": "POST"}),
        ("restful_async_tasks_submitted_total", {"endpoint": "metrics_broken", "method": "PUT"}),
        (
            "restful_async_tasks_finished_total",
            {"endpoint": "metrics_report", "state": "succeeded"},
        ),
        ("restful_async_tasks_finished_total", {"endpoint": "metrics_broken", "state": "failed"}),
        ("restful_async_task_queued_seconds_count", {"endpoint": "metrics_report"}),
        ("restful_async_task_run_seconds_count", {"endpoint": "metrics_report"}),
        ("restful_async_task_run_seconds_count", {"endpoint": "metrics_broken"}),
    ]
    before = [value(name, **labels) for name, labels in names]
    ids = []
    for method, path, code in [
        ("post", "/metrics-reports", 201),
        ("post", "/metrics-reports", 201),
        ("put", "/metrics-broken", 409),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 202
        ids.append(response.json["id"])
        assert wait_done(client, response.headers["Location"]).status_code == code
    # The outcome is stored before task_finished is sent.
    wait_for(lambda: value(*names[3][:1], **names[3][1]) > before[3])
    after = [value(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 2, 1, 2, 2, 1]
    assert value("restful_async_task_run_seconds_sum", endpoint="metrics_report") > 0

    samples = our_samples()
    assert {sample.name for sample in samples} <= set(LABELS)
    for sample in samples:
        assert set(sample.labels) == LABELS[sample.name], sample
        shown = set(sample.labels.values())
        assert "alice-the-owner" not in shown
        assert not shown & set(ids)


def test_a_rejected_submit_is_counted_by_reason(make_app: AppFactory) -> None:
    app, api = make_app(
        store="memory://",
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 0},
    )
    api.add_resource(Held, "/metrics-held")
    client = app.test_client()
    # Every reason has its series from the start.
    for reason in ("saturated", "store", "broker"):
        assert (
            REGISTRY.get_sample_value("restful_async_tasks_rejected_total", {"reason": reason})
            is not None
        )
    busy = client.post("/metrics-held")
    assert STARTED.wait(10)
    before = value("restful_async_tasks_rejected_total", reason="saturated")
    assert client.post("/metrics-held").status_code == 503
    assert value("restful_async_tasks_rejected_total", reason="saturated") == before + 1
    RELEASE.set()
    assert wait_done(client, busy.headers["Location"]).status_code == 200


def test_two_apps_count_each_their_own_tasks(make_app: AppFactory) -> None:
    first, first_api = make_app(store="memory://")
    second, second_api = make_app(store="memory://", config={"RESTFUL_ASYNC_METRICS": False})
    first_api.add_resource(Report, "/r", endpoint="metrics_first")
    second_api.add_resource(Report, "/r", endpoint="metrics_second")
    for app in (first, second):
        client = app.test_client()
        response = client.post("/r")
        assert wait_done(client, response.headers["Location"]).status_code == 201
    labels = {"method": "POST"}
    assert value("restful_async_tasks_submitted_total", endpoint="metrics_first", **labels) >= 1
    assert value("restful_async_tasks_submitted_total", endpoint="metrics_second", **labels) == 0


def test_metrics_off_or_misconfigured(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_METRICS": False})
    api.add_resource(Report, "/r", endpoint="metrics_off")
    client = app.test_client()
    response = client.post("/r")
    assert wait_done(client, response.headers["Location"]).status_code == 201
    assert value("restful_async_tasks_submitted_total", endpoint="metrics_off", method="POST") == 0
    assert app not in store_collector._apps
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_METRICS must be None"):
        make_app(store="memory://", config={"RESTFUL_ASYNC_METRICS": "perhaps"})
    # As the environment spells it: off.
    app, _ = make_app(store="memory://", config={"RESTFUL_ASYNC_METRICS": "False"})
    assert app not in store_collector._apps


# Another process writes to the SQLite file: a queued task made a minute ago, and
# one that succeeded.
_WRITER = """
import sys, time
from flask_restful_async.stores.sqlite import SQLiteStore
from flask_restful_async.task import Task, TaskState, new_task_id
store = SQLiteStore(sys.argv[1])
store.create(Task(new_task_id(), created_at=time.time() - 60))
done = store.create(Task(new_task_id()))
store.finish(done.id, TaskState.SUCCEEDED)
store.close()
"""


def test_the_gauge_counts_what_another_process_wrote(make_app: AppFactory, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    # Two apps of this process on the file: its tasks are counted once.
    make_app(store=f"sqlite:///{path}")
    make_app(store=f"sqlite:///{path}")

    def gauge(state: str) -> float:
        return value("restful_async_tasks", state=state)

    before = {state: gauge(state) for state in ("queued", "succeeded", "running")}
    subprocess.run([sys.executable, "-c", _WRITER, str(path)], check=True, timeout=30, cwd=ROOT)
    assert gauge("queued") == before["queued"] + 1
    assert gauge("succeeded") == before["succeeded"] + 1
    assert gauge("running") == before["running"]
    assert value("restful_async_oldest_queued_seconds") >= 60


_WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
from flask import Flask
from flask_restful import Api
from flask_restful_async import register_async
from flask_restful_async.signals import task_submitted

app = Flask("plain", instance_path=sys.argv[1])
register_async(Api(app), store="memory://")
print("default:", bool(task_submitted.receivers))

strict = Flask("strict", instance_path=sys.argv[1])
strict.config["RESTFUL_ASYNC_METRICS"] = True
try:
    register_async(Api(strict), store="memory://")
except ImportError as e:
    print("required:", e)
try:
    import flask_restful_async.metrics
except ImportError as e:
    print("import:", e)
"""


def test_without_prometheus_client_the_error_names_the_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PROMETHEUS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "default: False"
    extra = "pip install 'flask-restful-async[metrics]'"
    assert lines[1].startswith("required:")
    assert extra in lines[1]
    assert lines[2].startswith("import:")
    assert extra in lines[2]


def scrape(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``/metrics`` as {sample name: {sorted labels: value}}, each series once."""
    status, _, body = http("GET", base + "/metrics")
    assert status == 200
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found = series.setdefault(sample.name, {})
            assert labels not in found, f"{sample.name}{labels} shown twice"
            found[labels] = sample.value
    return series


def test_gunicorn_workers_add_up_and_the_gauge_is_read_once(tmp_path: Path) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {
        "METRICS_APP_INSTANCE": str(tmp_path / "instance"),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
    }
    with serve("gunicorn-sync", "tests.apps.metrics_app:app", workers=2, env=env) as base:
        pids: set[int] = set()
        submitted = 0
        deadline = time.monotonic() + 30
        # Until both workers have taken submits (each connection goes to either).
        while len(pids) < 2 or submitted < 6:
            assert time.monotonic() < deadline, f"only workers {pids} took submits"
            status, headers, _ = http("POST", base + "/echo")
            assert status == 202
            submitted += 1
            status, _, body = poll_until_done(base, headers["location"])
            assert status == 200
            pids.add(json.loads(body)["pid"])
        for _ in range(4):  # whichever worker answers, the same sums
            series = scrape(base)
            key = (("endpoint", "echo"), ("method", "POST"))
            assert series["restful_async_tasks_submitted_total"][key] == submitted
            finished = series["restful_async_tasks_finished_total"]
            assert finished[(("endpoint", "echo"), ("state", "succeeded"))] == submitted
            runs = series["restful_async_task_run_seconds_count"]
            assert runs[(("endpoint", "echo"),)] == submitted
            assert series["restful_async_tasks"][(("state", "succeeded"),)] == submitted
            assert series["restful_async_tasks"][(("state", "queued"),)] == 0
            assert series["restful_async_oldest_queued_seconds"][()] == 0


def test_one_process_serves_the_default_registry(tmp_path: Path) -> None:
    from flask_restful_async.state import get_state

    from .apps.metrics_app import create_app

    app = create_app(str(tmp_path))
    try:
        client = app.test_client()
        response = client.post("/echo")
        assert wait_done(client, response.headers["Location"]).status_code == 200
        text = client.get("/metrics").get_data(as_text=True)
        assert 'restful_async_tasks_submitted_total{endpoint="echo",method="POST"}' in text
        # (Added up with the stores of any other app this process has connected.)
        assert 'restful_async_tasks{state="succeeded"} ' in text
    finally:
        get_state(app).close()


def test_the_store_collector_serves_from_another_registry(make_app: AppFactory) -> None:
    # As multi-process mode needs: the default registry keeps it too.
    from prometheus_client import CollectorRegistry, generate_latest

    make_app(store="memory://")
    registry = CollectorRegistry()
    registry.register(store_collector)
    text = generate_latest(registry).decode()
    assert 'restful_async_tasks{state="queued"}' in text
    assert "restful_async_oldest_queued_seconds " in text


def test_a_sqlite_file_of_an_earlier_version_gets_what_counting_needs(tmp_path: Path) -> None:
    import sqlite3

    from flask_restful_async.stores.sqlite import SQLiteStore
    from flask_restful_async.task import Task, TaskState, new_task_id

    path = str(tmp_path / "old.db")
    store = SQLiteStore(path)
    done = store.create(Task(new_task_id()))
    store.finish(done.id, TaskState.FAILED)
    store.create(Task(new_task_id()))
    store.close()
    # As the previous version left it: the same layout number, its one index of ends
    # (and a table of counts that a development version kept by triggers).
    with sqlite3.connect(path) as conn:
        for statement in (
            "DROP INDEX tasks_ended",
            "DROP INDEX tasks_open",
            "CREATE INDEX tasks_by_finish ON tasks (finished_at) WHERE finished_at IS NOT NULL",
            "CREATE TABLE ended (state TEXT, bucket INTEGER, n INTEGER)",
            "CREATE TRIGGER ended_update AFTER UPDATE OF finished_at ON tasks"
            " BEGIN INSERT INTO ended VALUES (NEW.state, 0, 1); END",
        ):
            conn.execute(statement)
    conn.close()
    store = SQLiteStore(path)
    try:
        stats = store.stats()
        assert stats.counts[TaskState.FAILED] == 1
        assert stats.counts[TaskState.QUEUED] == 1
        with sqlite3.connect(path) as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        conn.close()
        assert {"tasks_ended", "tasks_open"} <= names
        assert not names & {"tasks_by_finish", "ended", "ended_update"}
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_stats_count_every_state_as_it_reads(kind: str, tmp_path: Path) -> None:
    """What the gauge shows, store by store: counted from the active tasks and the
    ends within the result's retention, whatever reads or purges ran before."""
    from flask_restful_async.task import Task, TaskState, new_task_id

    from .test_stores import made_store

    with made_store(kind, tmp_path) as store:
        store.configure(result_ttl=1.0, tombstone_ttl=3600, lease=30, queued_ttl=60)
        store.renew_lease("w")
        now = time.time()
        oldest = store.create(Task(new_task_id(), created_at=now - 10))
        store.create(Task(new_task_id()))
        store.start(store.create(Task(new_task_id())).id, "w")
        ended = {}
        for state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.LOST):
            ended[state] = store.create(Task(new_task_id()))
            store.finish(ended[state].id, state)
        store.request_cancel(store.create(Task(new_task_id())).id)
        store.create(Task(new_task_id(), created_at=now - 120))  # waited too long: lost
        stats = store.stats()
        assert {state.value: count for state, count in stats.counts.items()} == {
            "queued": 2,
            "running": 1,
            "succeeded": 1,
            "failed": 1,
            "cancelled": 1,
            "lost": 2,
        }
        assert stats.oldest_queued_at == pytest.approx(oldest.created_at)
        store.delete(ended[TaskState.SUCCEEDED].id)
        assert store.stats().counts[TaskState.SUCCEEDED] == 0
        time.sleep(1.1)  # the ends are past the result's retention: no longer live
        counts = store.stats().counts
        # (The task that waited too long reads lost until it is read and recorded so.)
        assert [counts[state] for state in TaskState][:5] == [2, 1, 0, 0, 0]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_stats_count_the_tasks_of_a_worker_gone_in_every_batch(kind: str, tmp_path: Path) -> None:
    """More active tasks than one counting step takes, all of a worker whose lease
    lapsed: each reads lost, and none is counted twice or skipped."""
    from flask_restful_async.task import Task, TaskState, new_task_id

    from .test_stores import made_store

    with made_store(kind, tmp_path) as store:
        store.renew_lease("alive")
        for i in range(1100):
            store.create(Task(new_task_id(), worker="gone" if i % 2 else "alive"))
        if kind == "redis":
            # The lease that creating a task of "gone" took up, lapsed.
            store._client.delete(f"{store.prefix}lease:gone")  # type: ignore[attr-defined]
        counts = store.stats().counts
        assert counts[TaskState.LOST] == 550
        assert counts[TaskState.QUEUED] == 550
        counts = store.stats().counts
        assert counts[TaskState.LOST] == 550
        assert counts[TaskState.QUEUED] == 550


def test_a_waiting_task_that_a_stopping_process_gives_up_ends_lost(make_app: AppFactory) -> None:
    """A store of this process only: nobody else can run what waits at a stop."""
    from flask_restful_async.state import get_state

    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Held, "/metrics-held", endpoint="metrics_given_up")
    client = app.test_client()
    assert client.post("/metrics-held").status_code == 202
    assert STARTED.wait(10)
    before = value("restful_async_tasks_finished_total", endpoint="metrics_given_up", state="lost")
    assert client.post("/metrics-held").status_code == 202  # waits for the one worker
    get_state(app).executor.shutdown(timeout=0.1)
    after = value("restful_async_tasks_finished_total", endpoint="metrics_given_up", state="lost")
    assert after == before + 1


def test_a_start_the_store_never_takes_ends_lost(make_app: AppFactory, tmp_path: Path) -> None:
    """The store stops answering between a submit and its start: after
    4 x RESTFUL_ASYNC_LEASE seconds of trying, the worker gives the task up."""
    import contextlib
    import sqlite3

    from flask_restful_async.stores.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "locked.db"), timeout=0.1)
    app, api = make_app(
        store=store, config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_LEASE": 0.25}
    )
    api.add_resource(Held, "/metrics-held", endpoint="metrics_never_started")
    client = app.test_client()
    assert client.post("/metrics-held").status_code == 202
    assert STARTED.wait(10)

    def lost() -> float:
        return value(
            "restful_async_tasks_finished_total", endpoint="metrics_never_started", state="lost"
        )

    before = lost()
    assert client.post("/metrics-held").status_code == 202  # waits for the one worker
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        try:
            RELEASE.set()  # the first ends (its outcome waits), the second cannot start
            wait_for(lambda: lost() == before + 1, timeout=15)
        finally:
            other.execute("ROLLBACK")


def test_a_task_taken_over_whose_request_cannot_be_read_ends_lost(
    make_app: AppFactory, tmp_path: Path
) -> None:
    from flask_restful_async.state import get_state
    from flask_restful_async.task import Task, TaskState, new_task_id

    app, _ = make_app(store=f"sqlite:///{tmp_path / 'takeover.db'}")
    state = get_state(app)
    assert state.takeover is not None
    # Waiting for any process to take it (held by none), with a request that no
    # version of this library wrote.
    task = Task(new_task_id(), endpoint="metrics_unreadable", method="POST", path="/x")
    state.store.create(task, b"not a request snapshot")
    before = value(
        "restful_async_tasks_finished_total", endpoint="metrics_unreadable", state="lost"
    )
    state.takeover.claim()
    after = value("restful_async_tasks_finished_total", endpoint="metrics_unreadable", state="lost")
    assert after == before + 1
    found = state.store.get(task.id)
    assert found is not None
    assert found.state is TaskState.LOST


def test_with_no_store_read_the_gauges_have_no_sample(make_app: AppFactory) -> None:
    """Zeros would read as an empty queue; no sample lets absent() tell."""
    from prometheus_client import CollectorRegistry, generate_latest

    from flask_restful_async.metrics import TaskStoreCollector

    from .services import free_port

    app, _ = make_app(store=f"redis://127.0.0.1:{free_port()}/12")
    collector = TaskStoreCollector()
    collector.add(app)
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert "# TYPE restful_async_tasks gauge" in text
    assert "restful_async_tasks{" not in text
    assert "\nrestful_async_oldest_queued_seconds " not in text
