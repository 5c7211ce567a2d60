"""Signals (CONTRACT 6.3): ``flask_restful_async.signals``, sent with the app as
sender, in the process and thread where each event happens; receivers that raise
are logged and change nothing."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from blinker import NamedSignal
from flask import Flask
from flask_restful import abort

from flask_restful_async import AsyncResource, Task, TaskState, current_task, signals
from flask_restful_async.state import get_state
from flask_restful_async.stores.sqlite import SQLiteStore
from flask_restful_async.task import new_task_id

from .conftest import HELD_RELEASE as RELEASE
from .conftest import HELD_STARTED as STARTED
from .conftest import AppFactory, Held, wait_done, wait_for
from .services import free_port, require_redis


class Report(AsyncResource):
    def post(self, report_id: str) -> t.Any:
        for i in range(2):
            current_task.progress(i + 1, total=2, message="crunching")
        return {"report": report_id}, 201


class Broken(AsyncResource):
    def post(self) -> t.Any:
        raise RuntimeError("the handler broke")


class Refused(AsyncResource):
    def put(self) -> t.Any:
        abort(409, message="no")


pytestmark = pytest.mark.usefixtures("held_tasks")


class Sent(t.NamedTuple):
    signal: str
    sender: t.Any
    thread: int
    task: Task | None
    reason: str | None


ALL = (
    signals.task_submitted,
    signals.task_started,
    signals.task_progress,
    signals.task_finished,
    signals.task_rejected,
)


@contextlib.contextmanager
def recording(app: Flask, *chosen: NamedSignal) -> Iterator[list[Sent]]:
    """Every signal of ``chosen`` (all by default) that ``app`` sends, in order."""
    sent: list[Sent] = []
    lock = threading.Lock()

    def receiver(name: str) -> t.Callable[..., None]:
        def record(sender: t.Any, *, task: Task | None = None, reason: str | None = None) -> None:
            with lock:
                sent.append(Sent(name, sender, threading.get_ident(), task, reason))

        return record

    with contextlib.ExitStack() as stack:
        for signal in chosen or ALL:
            stack.enter_context(signal.connected_to(receiver(signal.name), sender=app))
        yield sent


def names(sent: list[Sent]) -> list[str]:
    return [each.signal for each in sent]


def test_a_task_sends_each_event_of_its_life_where_it_happens(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store()
    api.add_resource(Report, "/reports/<report_id>")
    client = app.test_client()
    with recording(app) as sent:
        response = client.post("/reports/7")
        assert response.status_code == 202
        task_id = response.json["id"]
        assert wait_done(client, response.headers["Location"]).status_code == 201
        wait_for(lambda: "task-finished" in names(sent))
    assert sorted(names(sent)) == sorted(
        ["task-submitted", "task-started", "task-progress", "task-progress", "task-finished"]
    )
    by_name = {each.signal: each for each in sent}
    for each in sent:
        assert each.sender is app  # the app object, never the current_app proxy
        assert type(each.sender) is Flask
        assert isinstance(each.task, Task)
        assert each.task.id == task_id
        assert (each.task.endpoint, each.task.method, each.task.path) == (
            "report",
            "POST",
            "/reports/7",
        )
        assert each.reason is None
    submitted = by_name["task-submitted"]
    assert submitted.thread == threading.get_ident()  # the request thread
    assert submitted.task is not None
    assert submitted.task.state is TaskState.QUEUED
    workers = {each.thread for each in sent if each.signal != "task-submitted"}
    assert len(workers) == 1
    assert threading.get_ident() not in workers
    started = by_name["task-started"].task
    assert started is not None
    assert started.state is TaskState.RUNNING
    assert started.started_at is not None
    progress = [each.task.progress for each in sent if each.signal == "task-progress"]
    assert [(p.current, p.total, p.message) for p in progress if p] == [
        (1, 2, "crunching"),
        (2, 2, "crunching"),
    ]
    assert names(sent).index("task-started") < names(sent).index("task-progress")
    # The worker's own, in order; task-submitted may come after any of them (it is
    # sent once the worker has the task, which may have run it meanwhile).
    assert [name for name in names(sent) if name != "task-submitted"][-1] == "task-finished"
    finished = by_name["task-finished"].task
    assert finished is not None
    assert finished.state is TaskState.SUCCEEDED
    assert finished.finished_at is not None
    assert finished.response is not None
    assert finished.response.status == 201
    assert finished.progress is not None
    assert finished.progress.current == 2


@pytest.mark.parametrize(
    ("path", "method", "state", "status"),
    [("/broken", "post", TaskState.FAILED, 500), ("/refused", "put", TaskState.FAILED, 409)],
)
def test_finished_tells_how_the_task_ended(
    make_app: AppFactory, path: str, method: str, state: TaskState, status: int
) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Broken, "/broken")
    api.add_resource(Refused, "/refused")
    client = app.test_client()
    with recording(app, signals.task_finished) as sent:
        response = getattr(client, method)(path)
        assert wait_done(client, response.headers["Location"]).status_code == status
        wait_for(lambda: len(sent) == 1)
    (finished,) = sent
    assert finished.task is not None
    assert finished.task.state is state
    assert finished.task.method == method.upper()
    assert finished.task.response is not None
    assert finished.task.response.status == status


def test_a_task_cancelled_while_running_finishes_cancelled(make_app: AppFactory) -> None:
    class Patient(AsyncResource):
        def post(self) -> t.Any:
            STARTED.set()
            while True:
                current_task.raise_if_cancelled()
                time.sleep(0.01)

    app, api = make_app(store="memory://")
    api.add_resource(Patient, "/patient")
    client = app.test_client()
    with recording(app, signals.task_finished) as sent:
        location = client.post("/patient").headers["Location"]
        assert STARTED.wait(10)
        assert client.delete(location).status_code == 202
        assert wait_done(client, location).status_code == 409
        wait_for(lambda: len(sent) == 1)
    assert sent[0].task is not None
    assert sent[0].task.state is TaskState.CANCELLED


def test_a_queued_task_cancelled_by_delete_finishes_where_it_was_deleted(
    make_app: AppFactory,
) -> None:
    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Held, "/held")
    client = app.test_client()
    client.post("/held")
    assert STARTED.wait(10)
    with recording(app, signals.task_finished) as sent:
        location = client.post("/held").headers["Location"]
        assert client.delete(location).status_code == 200
    [finished] = sent
    assert finished.thread == threading.get_ident()  # the DELETE's request thread
    assert finished.task is not None
    assert finished.task.state is TaskState.CANCELLED
    assert finished.task.id == location.rsplit("/", 1)[1]


def test_an_idempotent_repeat_sends_nothing(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Report, "/reports/<report_id>")
    client = app.test_client()
    headers = {"Idempotency-Key": "k1"}
    first = client.post("/reports/1", headers=headers)
    wait_done(client, first.headers["Location"])
    with recording(app) as sent:
        again = client.post("/reports/1", headers=headers)
        assert again.headers["Location"] == first.headers["Location"]
    assert sent == []


def test_a_saturated_submit_sends_rejected_and_no_task(make_app: AppFactory) -> None:
    app, api = make_app(
        store="memory://",
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 0},
    )
    api.add_resource(Held, "/held")
    client = app.test_client()
    busy = client.post("/held")
    assert busy.status_code == 202
    assert STARTED.wait(10)
    with recording(app) as sent:
        response = client.post("/held")
    assert response.status_code == 503
    assert [(each.signal, each.reason, each.task) for each in sent] == [
        ("task-rejected", "saturated", None)
    ]
    assert sent[0].sender is app
    RELEASE.set()
    assert wait_done(client, busy.headers["Location"]).status_code == 200


@contextlib.contextmanager
def failing_store(kind: str, tmp_path: Path) -> Iterator[t.Any]:
    """A store that does not answer: a Redis where nothing listens, or a SQLite
    file that another connection holds locked."""
    if kind == "redis down":
        yield f"redis://127.0.0.1:{free_port()}/12"
        return
    store = SQLiteStore(str(tmp_path / "locked.db"), timeout=0.2)
    store.get(new_task_id())  # the file and its tables exist
    with contextlib.closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield store
        finally:
            other.execute("ROLLBACK")


@pytest.mark.parametrize("kind", ["redis down", "sqlite locked"])
def test_a_store_that_does_not_answer_sends_rejected(
    make_app: AppFactory, kind: str, tmp_path: Path
) -> None:
    with failing_store(kind, tmp_path) as store:
        app, api = make_app(store=store)
        api.add_resource(Report, "/reports/<report_id>")
        with recording(app) as sent:
            response = app.test_client().post("/reports/1")
        assert response.status_code == 503, response.get_data()
    assert [(each.signal, each.reason, each.task) for each in sent] == [
        ("task-rejected", "store", None)
    ]


def test_a_broker_that_takes_no_message_sends_rejected(make_app: AppFactory) -> None:
    require_redis()
    from .apps.celery_app import create_app
    from .test_celery import delete_keys

    prefix = f"{{restful_async_signals_{secrets.token_hex(6)}}}:"
    broker_url = f"redis://127.0.0.1:{free_port()}/0"
    app, _, store = create_app(prefix, "unused", broker_url=broker_url)
    try:
        with recording(app) as sent:
            response = app.test_client().post("/echo", data=b"x")
        assert response.status_code == 503, response.get_data()
        assert [(each.signal, each.reason, each.task) for each in sent] == [
            ("task-rejected", "broker", None)
        ]
        assert store.list(owner=None, limit=10) == []
    finally:
        get_state(app).close()
        delete_keys(prefix)


def test_a_receiver_that_raises_is_logged_and_changes_nothing(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Report, "/reports/<report_id>")
    client = app.test_client()

    def explode(sender: Flask, **kwargs: t.Any) -> None:
        raise RuntimeError("a receiver broke")

    with contextlib.ExitStack() as stack:
        for signal in ALL:
            stack.enter_context(signal.connected_to(explode, sender=app))
        # A receiver connected after the one that raises still hears every event.
        sent = stack.enter_context(recording(app))
        with caplog.at_level(logging.ERROR, logger=app.logger.name):
            response = client.post("/reports/3")
            assert response.status_code == 202
            final = wait_done(client, response.headers["Location"])
            wait_for(lambda: "task-finished" in names(sent))
    assert final.status_code == 201
    assert final.json == {"report": "3"}
    assert len(sent) == 5
    task_id = response.json["id"]
    raised = [r for r in caplog.records if "A receiver of the signal" in r.getMessage()]
    assert {r.getMessage().split()[5] for r in raised} == {
        "task-submitted",
        "task-started",
        "task-progress",
        "task-finished",
    }
    assert all(getattr(r, "task_id", None) == task_id for r in raised)
    assert all(r.exc_info is not None for r in raised)


def test_a_raising_receiver_of_rejected_keeps_the_503(make_app: AppFactory) -> None:
    app, api = make_app(
        store="memory://",
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 0},
    )
    api.add_resource(Held, "/held")
    client = app.test_client()
    assert client.post("/held").status_code == 202
    assert STARTED.wait(10)

    def explode(sender: Flask, **kwargs: t.Any) -> None:
        raise RuntimeError("a receiver broke")

    with signals.task_rejected.connected_to(explode, sender=app):
        response = client.post("/held")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1


def test_signals_of_another_app_are_not_heard(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://")
    other, other_api = make_app(store="memory://")
    for each in (api, other_api):
        each.add_resource(Report, "/reports/<report_id>")
    with recording(app) as sent:
        response = other.test_client().post("/reports/1")
        wait_done(other.test_client(), response.headers["Location"])
    assert sent == []


# -- Celery: started, progress and finished come from the worker process ------------


def test_a_celery_worker_sends_started_progress_and_finished(tmp_path: Path) -> None:
    require_redis()
    from .apps.celery_app import SIGNALS_ENV, create_app
    from .test_celery import poll, run_worker

    log = tmp_path / "signals.jsonl"
    log.touch()
    with run_worker(**{SIGNALS_ENV: str(log)}) as worker:
        app, _, _ = create_app(worker.prefix, worker.queue)
        client = app.test_client()
        try:
            with recording(app) as sent:
                response = client.post("/echo?steps=2&step=0.01", data=b"x")
                assert response.status_code == 202
                final = poll(client, worker, response.headers["Location"], timeout=30)
            assert final.status_code == 200, final.get_data()
            task_id = response.json["id"]

            def lines() -> list[dict[str, t.Any]]:
                text = log.read_text(encoding="utf-8")
                return [json.loads(line) for line in text.splitlines()]

            wait_for(lambda: any(each["signal"] == "finished" for each in lines()))
        finally:
            get_state(app).close()
    # In this process: the submit only.
    assert names(sent) == ["task-submitted"]
    # In the worker: the rest, from the process that ran the handler.
    heard = lines()
    assert [each["signal"] for each in heard] == ["started", "progress", "progress", "finished"]
    worker_pid = final.json["pid"]
    assert worker_pid != os.getpid()
    for each in heard:
        assert each["id"] == task_id
        assert each["pid"] == worker_pid
        assert each["sender"] == app.name
        assert (each["method"], each["path"]) == ("POST", "/echo")
    assert [each["state"] for each in heard] == ["running", "running", "running", "succeeded"]


@pytest.mark.usefixtures("held_tasks")
def test_a_task_cancelled_while_it_waited_is_told_finished_once_at_a_stop(
    make_app: AppFactory,
) -> None:
    # The stop ended it lost again (the store kept it cancelled), and told so:
    # the metrics counted it twice.
    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Held, "/held")
    client = app.test_client()
    finished: list[tuple[str, TaskState]] = []

    def told(sender: Flask, task: Task) -> None:
        finished.append((task.id, task.state))

    with signals.task_finished.connected_to(told, app):
        client.post("/held")
        assert STARTED.wait(10)
        waiting = client.post("/held").json["id"]
        assert client.delete(f"/tasks/{waiting}").status_code == 200
        RELEASE.set()
        get_state(app).close()
    assert [state for task_id, state in finished if task_id == waiting] == [TaskState.CANCELLED]
