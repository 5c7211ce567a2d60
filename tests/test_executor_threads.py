"""The thread executor: lazy, bounded, fork-safe, and clean at exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import typing as t

import pytest
from flask import request

from flask_restful_async import AsyncResource, TaskState, ThreadExecutor
from flask_restful_async.lease import worker_id
from flask_restful_async.snapshot import RequestSnapshot
from flask_restful_async.state import get_state
from flask_restful_async.task import Task, new_task_id

from .conftest import AppFactory, wait_done


class Echo(AsyncResource):
    def post(self) -> t.Any:
        return {"json": request.get_json(), "pid": os.getpid()}


def test_no_thread_starts_before_the_first_submit(make_app: AppFactory) -> None:
    app, api = make_app()
    api.add_resource(Echo, "/echo")
    executor = get_state(app).executor
    assert isinstance(executor, ThreadExecutor)
    assert executor.thread_count == 0
    client = app.test_client()
    wait_done(client, client.post("/echo", json=1).headers["Location"])
    assert executor.thread_count == 1


def test_a_pool_warmed_before_fork_works_in_the_child(make_app: AppFactory) -> None:
    app, api = make_app()
    api.add_resource(Echo, "/echo")
    executor = get_state(app).executor
    assert isinstance(executor, ThreadExecutor)
    client = app.test_client()
    wait_done(client, client.post("/echo", json="parent").headers["Location"])
    assert executor.thread_count == 1

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            child = app.test_client()
            location = child.post("/echo", json="child").headers["Location"]
            final = wait_done(child, location, timeout=10)
            ok = final.json == {"json": "child", "pid": os.getpid()}
            code = 0 if ok and executor.thread_count == 1 else 3
        finally:
            os._exit(code)

    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child did not finish its task in time")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    ("store", "waiting"),
    [
        # A shared store: handed back, queued and held by no process, for another to run.
        (None, (TaskState.QUEUED, None)),
        # A store of this process only: nobody else could run them.
        ("memory://", (TaskState.LOST, "held")),
    ],
)
def test_shutdown_hands_waiting_tasks_back_and_lets_running_ones_finish(
    make_app: AppFactory, store: str | None, waiting: tuple[TaskState, str | None]
) -> None:
    started = threading.Event()
    release = threading.Event()

    class Blocked(AsyncResource):
        def post(self) -> t.Any:
            started.set()
            release.wait(10)
            return {"finished": True}

    app, api = make_app(
        store=store, config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 2}
    )
    api.add_resource(Blocked, "/blocked")
    client = app.test_client()
    locations = [client.post("/blocked").headers["Location"] for _ in range(3)]
    assert started.wait(10)
    tasks, executor = get_state(app).store, get_state(app).executor

    stopper = threading.Thread(target=executor.shutdown, kwargs={"timeout": 10})
    stopper.start()
    time.sleep(0.05)
    release.set()
    stopper.join(10)
    assert not stopper.is_alive()

    states = [tasks.get(location.rsplit("/", 1)[1]) for location in locations]
    assert [task.state if task else None for task in states] == [
        TaskState.SUCCEEDED,
        waiting[0],
        waiting[0],
    ]
    assert [task.worker and "held" for task in states[1:] if task] == [waiting[1]] * 2
    assert client.post("/blocked").status_code == 503


@pytest.mark.parametrize("kwargs", [{"max_workers": 0}, {"max_pending": -1}])
def test_sizes_are_validated(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="max_"):
        ThreadExecutor(**kwargs)


def test_a_submit_that_arrives_after_the_shutdown_is_handed_back(make_app: AppFactory) -> None:
    # A request that was accepted (room reserved, task recorded) just before the
    # stop: no worker is left to take it, so it goes back to the store.
    app, api = make_app()
    api.add_resource(Echo, "/echo")
    state = get_state(app)
    client = app.test_client()
    wait_done(client, client.post("/echo", json=0).headers["Location"])
    executor = state.executor
    executor.acquire()
    with app.test_request_context("/echo", method="POST", json=1):
        snapshot = RequestSnapshot.capture(b"1", "post", (), {})
    task = state.store.create(Task(new_task_id(), worker=worker_id()), snapshot.to_bytes())
    executor.shutdown(timeout=5)
    executor.submit(app, task, snapshot)
    stored = state.store.get(task.id)
    assert stored is not None
    assert (stored.state, stored.worker) == (TaskState.QUEUED, None)


def test_taking_over_uses_only_idle_workers_and_reserves_nothing() -> None:
    executor = ThreadExecutor(max_workers=3, max_pending=1)
    executor.acquire()  # a task of its own
    assert executor.idle(64) == 2
    assert executor.idle(1) == 1
    # Looking reserved nothing: the process's own submits still find their room.
    executor.acquire()
    executor.acquire()
    assert executor.idle(64) == 0  # every worker is busy
    executor.acquire()  # the waiting room is for its own submits
    executor.release()
    executor.release()
    assert executor.idle(64) == 1
    executor.shutdown()
    assert executor.idle(64) == 0  # stopping: it takes nothing over


class Overstating(ThreadExecutor):
    """Says every worker is idle: as if this process's own submits took the room
    between a claim's look and its taking."""

    def idle(self, limit: int) -> int:
        return limit


def test_claimed_tasks_without_room_go_back_to_the_store(make_app: AppFactory) -> None:
    app, api = make_app(executor=Overstating(max_workers=1, max_pending=0))
    api.add_resource(Echo, "/echo")
    state = get_state(app)
    assert state.takeover is not None
    with app.test_request_context("/echo", method="POST", json=1):
        snapshot = RequestSnapshot.capture(b"1", "post", (), {})
    orphans = [Task(new_task_id(), worker="gone:1:0") for _ in range(3)]
    for task in orphans:
        state.store.create(task, snapshot.to_bytes())
    state.store.hand_back("gone:1:0", [task.id for task in orphans])
    # Claims are made under a live lease, as the lease keeper makes them (its
    # thread is not started here: this test makes the claims itself).
    state.store.renew_lease(worker_id())

    assert state.takeover.claim() == 1  # room for one: the others go back
    found = [state.store.get(task.id) for task in orphans]
    waiting = [task for task in found if task is not None and task.state is TaskState.QUEUED]
    assert len(waiting) >= 2
    assert all(task.worker is None for task in waiting[-2:])
    # Handed back, not held by this live process: the next looks take them.
    deadline = time.monotonic() + 10
    while not all((state.store.get(task.id) or task).state.finished for task in orphans):
        assert time.monotonic() < deadline, "the handed-back tasks were not taken again"
        state.takeover.claim()
        time.sleep(0.01)
    assert {t.state for t in map(state.store.get, [task.id for task in orphans]) if t} == {
        TaskState.SUCCEEDED
    }


class Exits(AsyncResource):
    """A handler that raises what is no Exception."""

    def post(self) -> t.Any:
        if request.args.get("how") == "cancelled":
            raise asyncio.CancelledError
        sys.exit(3)


def test_a_handler_raising_past_exception_ends_its_task_and_not_the_worker(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Exits, "/exits")
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    for how in ("exit", "cancelled"):
        failed = wait_done(client, client.post(f"/exits?how={how}").headers["Location"])
        assert failed.status_code == 500
    # The one worker is still there to run the next task.
    done = wait_done(client, client.post("/echo", json={"n": 1}).headers["Location"])
    assert done.status_code == 200
    assert "raised past its handler; the worker goes on" in caplog.text


def test_a_submit_no_worker_thread_can_take_is_refused_and_leaves_no_task(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's thread limit: the task was queued with no worker to run it.
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 2})
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    start = threading.Thread.start

    def refused(thread: threading.Thread) -> None:
        if thread.name.startswith("restful-async-") and thread.name[-1].isdigit():
            raise RuntimeError("can't start new thread")
        start(thread)

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", refused)
        response = client.post("/echo", json={"n": 1})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert get_state(app).store.list(owner=None) == []
    # With a worker there, a thread that cannot start only means a wait.
    done = wait_done(client, client.post("/echo", json={"n": 2}).headers["Location"])
    assert done.status_code == 200
    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", refused)
        location = client.post("/echo", json={"n": 3}).headers["Location"]
    assert wait_done(client, location).json["json"] == {"n": 3}
