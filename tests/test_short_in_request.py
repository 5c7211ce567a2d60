"""Short tasks that a ``Prefer: wait=N`` submit waits for run in its request thread
(``RESTFUL_ASYNC_SHORT_IN_REQUEST``): written to the store once, as they end, unless
a key or a copy for another process has them recorded as running from the start,
or they run past the short wait (recorded as running then); bounded
by ``RESTFUL_ASYNC_MAX_WORKERS`` at once (then by the places of idle workers),
never for a task expected to run longer than the short wait or N, nor once one
of them has run past the short wait."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import typing as t

import pytest
from flask import Flask, request

from flask_restful_async import (
    AsyncResource,
    TaskState,
    current_task,
    deferred,
    lease,
    outbox,
    signals,
    waiting,
)
from flask_restful_async.exceptions import StoreUnavailable
from flask_restful_async.prefer import parse_prefer
from flask_restful_async.state import get_state
from flask_restful_async.stores.sqlite import SQLiteStore
from flask_restful_async.task import Task

from .conftest import AppFactory, wait_done, wait_for

GENEROUS = {"RESTFUL_ASYNC_SHORT_WAIT": 5}
#: A short wait that a test outlasts: a run past it is recorded as running.
QUICK = {"RESTFUL_ASYNC_SHORT_WAIT": 0.3}
WAIT = {"Prefer": "wait=10"}

GATE = threading.Event()
#: The threads handlers ran in, in order.
ran_in: list[int] = []


@pytest.fixture(autouse=True)
def reset() -> t.Iterator[None]:
    GATE.set()
    ran_in.clear()
    yield
    GATE.set()


class Echo(AsyncResource):
    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        return {"json": request.get_json(silent=True), "task": current_task.id}


class Raw(AsyncResource):
    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        return {"stream": request.stream.read().decode(), "data": request.get_data(as_text=True)}


class Gated(AsyncResource):
    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        GATE.wait(10)
        return {"gated": True}


class Patient(AsyncResource):
    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        while not current_task.cancelled:
            time.sleep(0.01)
        current_task.raise_if_cancelled()


def slot_is_free(app: Flask) -> bool:
    """Whether every place for a task in a request thread was given back: with
    MAX_WORKERS 1 and nothing running, two are free (the place of its own, then
    the idle worker's), and not a third."""
    executor = get_state(app).executor
    taken = 0
    while taken < 3 and executor.acquire_now():
        taken += 1
    for _ in range(taken):
        executor.release_now()
    return taken == 2


def in_background(app: Flask, path: str) -> tuple[threading.Thread, list[t.Any]]:
    """A ``Prefer: wait`` POST of ``path`` made in a thread of its own, started:
    its answer lands in the list once the thread is done."""
    answers: list[t.Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(app.test_client().post(path, headers=WAIT))
    )
    thread.start()
    return thread, answers


def running_tasks(app: Flask) -> list[Task]:
    """The tasks the store holds as running (a few at most here)."""
    return get_state(app).store.list(owner=None, state=TaskState.RUNNING, limit=5)


def warm_up(app: Flask, path: str, endpoint: str) -> None:
    """One task of ``path`` run to its end in a task thread, and its run time known."""
    client = app.test_client()
    wait_done(client, client.post(path).headers["Location"])
    state = get_state(app)
    wait_for(lambda: state.run_times.estimate(endpoint, "post") is not None)
    ran_in.clear()


def test_a_quick_task_runs_in_the_request_thread_that_waits_for_it(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store(config=GENEROUS)
    api.add_resource(Echo, "/echo")
    warm_up(app, "/echo", "echo")
    sent: list[tuple[str, TaskState]] = []

    def record(name: str) -> t.Callable[..., None]:
        def receiver(sender: Flask, task: Task, **extra: t.Any) -> None:
            sent.append((name, task.state))

        return receiver

    receivers = [record(name) for name in ("submitted", "started", "finished")]
    signals.task_submitted.connect(receivers[0], sender=app)
    signals.task_started.connect(receivers[1], sender=app)
    signals.task_finished.connect(receivers[2], sender=app)
    client = app.test_client()
    response = client.post("/echo", json={"n": 1}, headers=WAIT)
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "wait=10"
    assert ran_in == [threading.get_ident()]
    task_id = response.json["task"]
    assert response.json["json"] == {"n": 1}
    # As a task thread would have told it, in the same order.
    assert sent == [
        ("submitted", TaskState.RUNNING),
        ("started", TaskState.RUNNING),
        ("finished", TaskState.SUCCEEDED),
    ]
    stored = get_state(app).store.get(task_id)
    assert stored is not None
    assert stored.state is TaskState.SUCCEEDED
    assert stored.started_at is not None
    assert stored.finished_at is not None
    assert stored.created_at <= stored.started_at <= stored.finished_at
    # Its status URL serves the result as for any task.
    status = client.get(f"/tasks/{task_id}")
    assert (status.status_code, status.json["task"]) == (200, task_id)


def test_submits_without_prefer_wait_still_run_in_a_task_thread(make_app: AppFactory) -> None:
    app, api = make_app(config=GENEROUS)
    api.add_resource(Echo, "/echo")
    warm_up(app, "/echo", "echo")
    client = app.test_client()
    for headers in ({}, {"Prefer": "respond-async"}, {"Prefer": "respond-async, wait=0"}):
        response = client.post("/echo", json={}, headers=headers)
        assert response.status_code == 202
        wait_done(client, response.headers["Location"])
    assert len(ran_in) == 3
    assert threading.get_ident() not in ran_in


def test_the_switch_keeps_every_task_in_a_task_thread(make_app: AppFactory) -> None:
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_SHORT_IN_REQUEST": False})
    api.add_resource(Echo, "/echo")
    warm_up(app, "/echo", "echo")
    response = app.test_client().post("/echo", json={}, headers=WAIT)
    assert response.status_code == 200
    assert ran_in
    assert threading.get_ident() not in ran_in


def test_an_unknown_run_time_or_one_longer_than_asked_is_not_run_here(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_SHORT_WAIT": 5})
    api.add_resource(Echo, "/echo")
    state = get_state(app)

    def plan(prefer: str) -> tuple[float, bool]:
        return state.plan_wait("echo", "post", parse_prefer((prefer,)))

    assert plan("wait=2") == (0.0, False)  # never ran here
    state.run_times.record("echo", "post", 3.0)
    assert plan("") == (5.0, False)  # no Prefer: wait
    assert plan("wait=2") == (5.0, False)  # 3 s > 2 s
    assert plan("wait=4") == (5.0, True)
    state.executor.release_now()
    state.run_times.record("echo", "post", 30.0)
    state.run_times.record("echo", "post", 30.0)
    assert plan("wait=20")[1] is False  # above the short wait


def test_beyond_max_workers_a_request_thread_takes_an_idle_workers_place(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Gated, "/gated")
    warm_up(app, "/gated", "gated")
    GATE.clear()
    answers: dict[str, int] = {}

    def submit(name: str) -> threading.Thread:
        def post() -> None:
            answers[name] = app.test_client().post("/gated", headers=WAIT).status_code

        thread = threading.Thread(target=post)
        thread.start()
        return thread

    first = submit("first")
    wait_for(lambda: len(ran_in) == 1)
    # The one place for a task in a request thread is taken: the next takes the
    # place of the pool's idle worker, and runs where it is all the same.
    second = submit("second")
    wait_for(lambda: len(ran_in) == 2)
    assert ran_in == [first.ident, second.ident]
    # No place is left: this one goes to the pool, whose worker's place is taken.
    third = submit("third")
    time.sleep(0.3)
    assert len(ran_in) == 2
    GATE.set()
    for thread in (first, second, third):
        thread.join(10)
    assert len(ran_in) == 3
    assert ran_in[2] != third.ident
    assert answers == {"first": 200, "second": 200, "third": 200}
    # Every place is back.
    assert slot_is_free(app)
    executor = get_state(app).executor
    assert executor.idle(5) == 1  # type: ignore[attr-defined]


def test_one_that_runs_past_the_short_wait_sends_the_next_to_a_task_thread(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_SHORT_WAIT": 0.3})
    api.add_resource(Gated, "/gated")
    warm_up(app, "/gated", "gated")
    GATE.clear()
    stuck = threading.Thread(target=lambda: app.test_client().post("/gated", headers=WAIT))
    stuck.start()
    wait_for(lambda: len(ran_in) == 1)
    assert ran_in == [stuck.ident]
    time.sleep(0.4)  # past the short wait: the estimate counts the run in flight
    state = get_state(app)
    estimate = state.run_times.estimate("gated", "post")
    assert estimate is not None
    assert estimate > 0.3
    response = app.test_client().post("/gated", headers={"Prefer": "wait=1"})
    assert response.status_code == 202  # waited its second in vain, in the request thread
    assert len(ran_in) == 2
    assert ran_in[1] != threading.get_ident()
    GATE.set()
    stuck.join(10)
    wait_done(app.test_client(), response.headers["Location"])


def test_a_cancel_reaches_a_task_running_in_a_request_thread(
    make_app_any_store: AppFactory,
) -> None:
    """Recorded as running once it has run past the short wait (it was expected
    to end sooner): listed from then on, and it can be cancelled."""
    app, api = make_app_any_store(config=QUICK)
    api.add_resource(Patient, "/patient")
    state = get_state(app)
    state.run_times.record("patient", "post", 0.01)
    thread, answers = in_background(app, "/patient")
    wait_for(lambda: len(ran_in) == 1)
    assert ran_in == [thread.ident]
    wait_for(lambda: running_tasks(app) != [])
    running = running_tasks(app)
    assert len(running) == 1
    assert running[0].started_at is not None
    assert time.time() - running[0].started_at >= QUICK["RESTFUL_ASYNC_SHORT_WAIT"]
    cancelled = app.test_client().delete(f"/tasks/{running[0].id}")
    assert cancelled.status_code == 202  # running: the handler is asked to stop
    thread.join(10)
    (answer,) = answers
    assert answer.status_code == 409
    assert answer.json["state"] == "cancelled"


def test_a_store_that_does_not_answer_gives_the_slot_back(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keyed submit records its task before it runs: a store that does not
    answer is a 503, and the place taken for the run is given back."""
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Echo, "/echo")
    warm_up(app, "/echo", "echo")
    state = get_state(app)

    def create(task: Task, snapshot: bytes | None = None) -> Task:
        raise StoreUnavailable("down for a moment", retry_after=2)

    with monkeypatch.context() as patch:
        patch.setattr(state.store, "create", create)
        for attempt in range(3):
            response = app.test_client().post(
                "/echo", json={}, headers={**WAIT, "Idempotency-Key": f"k-{attempt}"}
            )
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "2"
    assert ran_in == []
    assert slot_is_free(app)
    response = app.test_client().post("/echo", json={}, headers=WAIT)
    assert response.status_code == 200
    assert ran_in == [threading.get_ident()]


def test_a_task_that_ends_quickly_is_written_once(
    make_app_any_store: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody can learn its id before it ends: nothing is written before it runs,
    and it is written whole, finished, as it ends."""
    app, api = make_app_any_store(config=GENEROUS)
    api.add_resource(Reporting, "/reporting")
    state = get_state(app)
    state.run_times.record("reporting", "post", 0.01)
    writes: list[str] = []
    for name in ("create", "start", "finish", "set_progress", "create_finished"):
        monkeypatch.setattr(state.store, name, spy(writes, name, getattr(state.store, name)))
    seen: list[list[Task]] = []
    Reporting.look = lambda: seen.append(state.store.list(owner=None, limit=5))
    response = app.test_client().post("/reporting", json={"n": 2}, headers=WAIT)
    assert response.status_code == 200
    assert ran_in == [threading.get_ident()]
    # Nothing before the run: then the whole task (in one statement where the
    # store can, SQLite's; others create and finish it within the call).
    assert writes[0] == "create_finished"
    assert writes in (["create_finished"], ["create_finished", "create", "finish"])
    if isinstance(state.store, SQLiteStore):
        assert writes == ["create_finished"]
    assert seen == [[]]  # not listed while it ran
    task_id = response.json["task"]
    stored = state.store.get(task_id)
    assert stored is not None
    assert stored.state is TaskState.SUCCEEDED
    assert stored.response is not None
    assert stored.response.body == response.data
    assert stored.progress is not None
    assert (stored.progress.current, stored.progress.message) == (2, "second")
    assert stored.started_at is not None
    assert stored.finished_at is not None
    assert stored.created_at <= stored.started_at <= stored.finished_at
    assert stored.worker is not None
    assert (stored.endpoint, stored.method, stored.path) == ("reporting", "POST", "/reporting")
    listed = state.store.list(owner=None, state=TaskState.SUCCEEDED, limit=5)
    assert [task.id for task in listed] == [task_id]
    status = app.test_client().get(f"/tasks/{task_id}")
    assert (status.status_code, status.data) == (200, response.data)


def test_a_large_result_is_written_once_too(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store(config=GENEROUS)
    api.add_resource(Large, "/large")
    state = get_state(app)
    state.run_times.record("large", "post", 0.01)
    response = app.test_client().post("/large", headers=WAIT)
    assert response.status_code == 201
    task_id = response.headers["X-Task"]
    status = app.test_client().get(f"/tasks/{task_id}")
    assert (status.status_code, status.data) == (201, response.data)
    assert status.headers["X-Task"] == task_id


def test_progress_reported_before_the_task_is_recorded_reaches_the_store(
    make_app_any_store: AppFactory,
) -> None:
    """A run past the short wait is recorded as running with the progress its
    handler reported so far; what follows is written as for any task."""
    app, api = make_app_any_store(config=QUICK)
    api.add_resource(Slow, "/slow")
    state = get_state(app)
    state.run_times.record("slow", "post", 0.01)
    GATE.clear()
    thread, answers = in_background(app, "/slow")
    wait_for(lambda: running_tasks(app) != [])
    (running,) = running_tasks(app)
    assert running.progress is not None
    assert running.progress.message == "halfway"
    GATE.set()
    thread.join(10)
    (answer,) = answers
    assert answer.status_code == 200
    ended = state.store.get(running.id)
    assert ended is not None
    assert ended.state is TaskState.SUCCEEDED
    assert ended.progress is not None
    assert ended.progress.message == "done"


def test_a_store_down_at_its_end_still_gives_the_answer(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets the handler's answer; the task is missing from the lists
    (logged), and nothing half-written is left."""
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Echo, "/echo")
    state = get_state(app)
    state.run_times.record("echo", "post", 0.01)

    def down(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise StoreUnavailable("down for a moment", retry_after=2)

    with monkeypatch.context() as patch:
        patch.setattr(state.store, "create_finished", down)
        response = app.test_client().post("/echo", json={"a": 1}, headers=WAIT)
    assert response.status_code == 200
    assert response.json["json"] == {"a": 1}
    assert state.store.get(response.json["task"]) is None
    assert "did not take its record" in caplog.text
    assert slot_is_free(app)


def test_with_result_redirect_a_task_the_store_did_not_take_answers_itself(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a 303 to a result URL that would not find it."""
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_RESULT_REDIRECT": True})
    api.add_resource(Echo, "/echo")
    state = get_state(app)
    state.run_times.record("echo", "post", 0.01)
    stored = app.test_client().post("/echo", json={"a": 1}, headers=WAIT)
    assert stored.status_code == 303  # in the store: its result's URL

    def down(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise StoreUnavailable("down for a moment", retry_after=2)

    with monkeypatch.context() as patch:
        patch.setattr(state.store, "create_finished", down)
        patch.setattr(state.store, "finish", down)  # the outbox's tries
        response = app.test_client().post("/echo", json={"a": 2}, headers=WAIT)
    assert response.status_code == 200
    assert response.json["json"] == {"a": 2}


def test_a_large_answer_is_not_kept_with_the_news_of_its_end(make_app: AppFactory) -> None:
    """Each process keeps the last endings it announced, to spare long-polls a
    read: not the large ones (as for any task), least of all for tasks no one
    waits for."""
    app, api = make_app(config=GENEROUS)
    api.add_resource(Huge, "/huge")
    state = get_state(app)
    state.run_times.record("huge", "post", 0.01)
    response = app.test_client().post("/huge", headers=WAIT)
    assert response.status_code == 200
    assert len(response.data) > outbox.ANNOUNCED_BODY_MAX
    kept = waiting.waiters_for(state.store)._endings
    assert response.json["task"] not in kept


def test_a_run_is_recorded_under_the_name_the_process_has_now(
    make_app_any_store: AppFactory,
) -> None:
    """The name it had at the submit may have been given up since (an outcome the
    store never took), and its lease with it: recorded under that name, the task
    would read lost while it runs."""
    app, api = make_app_any_store(config=QUICK)
    api.add_resource(Slow, "/slow")
    state = get_state(app)
    state.run_times.record("slow", "post", 0.01)
    GATE.clear()
    thread, answers = in_background(app, "/slow")
    wait_for(lambda: bool(state.recorder._runs))  # under way, not recorded yet
    before = lease.worker_id()
    lease._rename()
    assert lease.worker_id() != before
    wait_for(lambda: running_tasks(app) != [])
    (running,) = running_tasks(app)
    assert running.worker == lease.worker_id()
    time.sleep(0.3)
    again = state.store.get(running.id)
    assert again is not None
    assert again.state is TaskState.RUNNING
    GATE.set()
    thread.join(10)
    (answer,) = answers
    assert answer.status_code == 200
    ended = state.store.get(running.id)
    assert ended is not None
    assert ended.state is TaskState.SUCCEEDED


class Huge(AsyncResource):
    def post(self) -> t.Any:
        return {"task": current_task.id, "blob": "x" * (outbox.ANNOUNCED_BODY_MAX + 1)}


def spy(writes: list[str], name: str, method: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    def recorded(*args: t.Any, **kwargs: t.Any) -> t.Any:
        writes.append(name)
        return method(*args, **kwargs)

    return recorded


class Reporting(AsyncResource):
    look: t.ClassVar[t.Callable[[], None]] = staticmethod(lambda: None)

    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        current_task.progress(1, 2, "first")
        type(self).look()
        current_task.progress(2, 2, "second")
        assert not current_task.cancelled
        return {"task": current_task.id}


class Large(AsyncResource):
    def post(self) -> t.Any:
        return {"blob": "x" * 4000}, 201, {"X-Task": current_task.id}


class Slow(AsyncResource):
    def post(self) -> t.Any:
        current_task.progress(1, 2, "halfway")
        GATE.wait(10)
        current_task.progress(2, 2, "done")
        return {"slow": True}


def test_a_repeated_idempotency_key_gives_the_slot_back(make_app: AppFactory) -> None:
    app, api = make_app(config={**GENEROUS, "RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Echo, "/echo")
    warm_up(app, "/echo", "echo")
    client = app.test_client()
    headers = {**WAIT, "Idempotency-Key": "k-1"}
    first = client.post("/echo", json={"a": 1}, headers=headers)
    assert first.status_code == 200
    for _ in range(3):
        again = client.post("/echo", json={"a": 1}, headers=headers)
        assert (again.status_code, again.json) == (200, first.json)
        assert client.post("/echo", json={"a": 2}, headers=headers).status_code == 422
    assert len(ran_in) == 1
    assert slot_is_free(app)


def test_the_handler_reads_the_body_from_the_stream_as_in_a_task_thread(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config=GENEROUS)
    api.add_resource(Raw, "/raw")
    warm_up(app, "/raw", "raw")
    response = app.test_client().post(
        "/raw", data=b"one line\nand another", content_type="text/plain", headers=WAIT
    )
    assert response.status_code == 200
    assert [threading.get_ident()] == ran_in
    assert response.json == {"stream": "one line\nand another", "data": "one line\nand another"}


class Upload(AsyncResource):
    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        return {"field": request.form["field"], "file": request.files["file"].read().decode()}


def test_a_form_runs_from_a_copy_in_a_task_thread(make_app: AppFactory) -> None:
    app, api = make_app(config=GENEROUS)
    api.add_resource(Upload, "/upload")
    state = get_state(app)
    state.run_times.record("upload", "post", 0.01)
    response = app.test_client().post(
        "/upload",
        data={"field": "value", "file": (io.BytesIO(b"contents"), "a.txt")},
        headers=WAIT,
    )
    assert response.status_code == 200
    assert response.json == {"field": "value", "file": "contents"}
    assert len(ran_in) == 1
    assert ran_in[0] != threading.get_ident()


def test_a_form_whose_type_is_written_in_capitals_runs_from_a_copy_too(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config=GENEROUS)
    api.add_resource(Upload, "/upload")
    get_state(app).run_times.record("upload", "post", 0.01)
    response = app.test_client().post(
        "/upload",
        data=b'--b\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        b"contents\r\n--b--\r\n",
        content_type="Multipart/Form-Data; boundary=b",
        headers=WAIT,
    )
    assert response.status_code == 200
    assert response.json == {"field": "value", "file": "contents"}
    assert ran_in[0] != threading.get_ident()


def sniffing(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """A method decorator that reads the start of the body (a magic number, say)."""

    def sniff(*args: t.Any, **kwargs: t.Any) -> t.Any:
        request.stream.read(4)
        return view(*args, **kwargs)

    return sniff


class Sniffed(AsyncResource):
    method_decorators = [sniffing]

    def post(self) -> t.Any:
        ran_in.append(threading.get_ident())
        return {"size": len(request.get_data())}


def test_a_body_a_decorator_read_in_part_reaches_the_handler_whole(make_app: AppFactory) -> None:
    """The live request keeps only what the decorator left: such a task runs from
    its copy, in a task thread."""
    app, api = make_app(config=GENEROUS)
    api.add_resource(Sniffed, "/sniffed")
    get_state(app).run_times.record("sniffed", "post", 0.01)
    response = app.test_client().post(
        "/sniffed", data=b"%PDF" + b"x" * 996, content_type="application/pdf", headers=WAIT
    )
    assert response.status_code == 200
    assert response.json == {"size": 1000}
    assert ran_in[0] != threading.get_ident()


def test_the_thread_that_records_long_runs_ends_when_none_is_left(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config=QUICK)
    api.add_resource(Echo, "/echo")
    get_state(app).run_times.record("echo", "post", 0.01)
    response = app.test_client().post("/echo", json={}, headers=WAIT)
    assert response.status_code == 200

    def recorders() -> list[threading.Thread]:
        return [th for th in threading.enumerate() if th.name == "restful-async-recorder"]

    wait_for(lambda: recorders() == [], timeout=5)


def test_a_forked_child_forgets_the_runs_of_its_parent(make_app: AppFactory) -> None:
    """The parent's runs are its own: a child never records them as running."""
    app, _ = make_app(config=QUICK)
    recorder = get_state(app).recorder
    run = recorder.begin(Task(id="parent-run", state=TaskState.RUNNING, worker="w"))
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                child = recorder.begin(Task(id="child-run", state=TaskState.RUNNING, worker="c"))
                os.write(write, ",".join(sorted(recorder._runs)).encode())
                child.end()
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            seen = pipe.read().decode()
        os.waitpid(pid, 0)
        assert seen == "child-run"
    finally:
        run.end()
        recorder.done(run)


def test_a_recording_that_fails_past_the_store_ends_no_watch(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The thread that records long runs logs what fails and goes on: the next
    long run is recorded all the same."""
    app, api = make_app(config=QUICK)
    api.add_resource(Slow, "/slow")
    state = get_state(app)
    state.run_times.record("slow", "post", 0.01)
    failures = [RuntimeError("a list stream broke")]

    def changed(store: t.Any, task_id: str) -> None:
        if failures:
            raise failures.pop()

    monkeypatch.setattr(deferred.waiting, "changed", changed)
    for _ in range(2):
        GATE.clear()
        thread, answers = in_background(app, "/slow")
        wait_for(lambda: running_tasks(app) != [])
        GATE.set()
        thread.join(10)
        assert answers[0].status_code == 200
    assert "Recording task" in caplog.text
    assert len(state.store.list(owner=None, state=TaskState.SUCCEEDED, limit=5)) == 2


def test_after_a_recording_that_failed_the_outcome_waits_for_the_store(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A recording as running that failed may have taken effect all the same (its
    reply lost): the outcome the store did not take then waits in the outbox,
    under the name that recording used, to end the task if the store has it."""
    caplog.set_level(logging.INFO)
    app, api = make_app(config=QUICK)
    api.add_resource(Slow, "/slow")
    state = get_state(app)
    state.run_times.record("slow", "post", 0.01)

    def down(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise StoreUnavailable("down for a moment", retry_after=2)

    with monkeypatch.context() as patch:
        patch.setattr(state.store, "create", down)
        patch.setattr(state.store, "create_finished", down)
        patch.setattr(state.store, "finish", down)
        GATE.clear()
        thread, answers = in_background(app, "/slow")
        wait_for(lambda: any(run.tried_as for run in list(state.recorder._runs.values())))
        GATE.set()
        thread.join(10)
        (answer,) = answers
        assert answer.status_code == 200
        waiting_here = outbox.existing_outbox(state.store)
        assert waiting_here is not None
        assert len(waiting_here) == 1
    wait_for(lambda: not outbox.existing_outbox(state.store))  # the store never had it
    assert "outcome is not stored: the store has it ended, or never had it" in caplog.text
