"""Taking over tasks whose process stopped: handed back on a graceful stop, free
after the lease of a process killed hard; run once, by another process, from the
request stored with them.

The first process is a child (started with ``spawn``, not forked: a fork copies
locks that the test's threads may hold) that accepts the tasks and then stops or
dies; the test process is the other one, on the same store."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import threading
import time
import typing as t
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from flask import Flask, current_app, request
from flask.testing import FlaskClient
from flask_restful import Api

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.stores import open_store

from .conftest import wait_done
from .services import delete_redis_keys, require_redis

REDIS_DB = 14
#: Config key set in the child's app only: its handlers sleep as asked, so that
#: tasks are running or waiting when it stops.
CHILD = "TEST_TAKEOVER_CHILD"
#: Seconds a child may take.
CHILD_TIMEOUT = 60


class Work(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        if current_app.config.get(CHILD):
            time.sleep(float(request.args.get("seconds", "0")))
        body = request.get_data()
        return {"pid": os.getpid(), "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


class Rerun(Work):
    rerun_on_crash = True


RELEASE = threading.Event()


class Blocked(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        RELEASE.wait(10)
        return {"pid": os.getpid()}


@pytest.fixture(params=["sqlite", "redis"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> t.Iterator[dict[str, t.Any]]:
    """A shared store for both processes, with a short lease."""
    values: dict[str, t.Any] = {"RESTFUL_ASYNC_LEASE": 1, "RESTFUL_ASYNC_MAX_WORKERS": 1}
    if request.param == "sqlite":
        values["RESTFUL_ASYNC_STORE"] = f"sqlite:///{tmp_path / 'tasks.db'}"
        yield values
        return
    require_redis()
    prefix = f"{{takeover-{secrets.token_hex(6)}}}:"
    values["RESTFUL_ASYNC_STORE"] = f"redis://127.0.0.1:6379/{REDIS_DB}"
    values["RESTFUL_ASYNC_REDIS_PREFIX"] = prefix
    yield values
    delete_redis_keys(REDIS_DB, prefix)


def _app(tmp_path: Path, config: dict[str, t.Any]) -> Flask:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(config)
    api = Api(app)
    register_async(api)
    api.add_resource(Work, "/work")
    api.add_resource(Rerun, "/rerun")
    api.add_resource(Blocked, "/blocked")
    return app


def _in_child(tmp_path: Path, config: dict[str, t.Any], act: str) -> t.Any:
    """Run ``ACTS[act](app, client)`` in a child process on the same store and
    return what it returned; the child then exits (``die``: without exit hooks)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(str(tmp_path), config, act, sender))
    child.start()
    try:
        assert receiver.poll(CHILD_TIMEOUT), "the child did not answer"
        result = receiver.recv()
        child.join(CHILD_TIMEOUT)
        assert child.exitcode == 0
        return result
    finally:
        if child.is_alive():
            child.kill()
            child.join()


def _child(tmp_path: str, config: dict[str, t.Any], act: str, sender: Connection) -> None:
    app = _app(Path(tmp_path), {**config, CHILD: True})
    sender.send(ACTS[act](app, app.test_client()))
    if act.endswith("die"):
        os._exit(0)  # as SIGKILL would: no exit hooks, no hand-back


def _accept_then_stop(app: Flask, client: FlaskClient) -> list[str]:
    """A running task, then two queued behind it (one with a 5 MB body); then a
    graceful stop, as a SIGTERM does it at exit."""
    first = _submit(client, "/work?seconds=0.5")
    _running(client, first)
    queued = [_submit(client, "/work", BIG), _submit(client, "/work", b"small")]
    get_state(app).close(timeout=5)
    return [first, *queued]


def _accept_then_die(app: Flask, client: FlaskClient) -> list[str]:
    running = [_submit(client, "/work?seconds=60"), _submit(client, "/rerun?seconds=60")]
    for location in running:
        _running(client, location)
    return [*running, _submit(client, "/work")]  # queued: both workers are busy


ACTS: dict[str, t.Callable[[Flask, FlaskClient], t.Any]] = {
    "stop": _accept_then_stop,
    "die": _accept_then_die,
}
#: Not random: the child must send the same bytes the test expects.
BIG = hashlib.sha256(b"5 MB").digest() * (5 * 1024 * 1024 // 32)


def _submit(client: FlaskClient, path: str, body: bytes = b"") -> str:
    response = client.post(path, data=body, content_type="application/octet-stream")
    assert response.status_code == 202, response.get_data(as_text=True)
    return str(response.headers["Location"])


def _running(client: FlaskClient, location: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get(location).json["state"] != "running":  # type: ignore[index]
        assert time.monotonic() < deadline, f"{location} did not start"
        time.sleep(0.02)


def test_a_graceful_stop_hands_queued_tasks_over_with_a_5_mb_body_intact(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    first, *queued = _in_child(tmp_path, config, "stop")
    app = _app(tmp_path, config)
    client = app.test_client()
    done = wait_done(client, first)
    assert done.status_code == 200
    assert done.json["pid"] != os.getpid()  # type: ignore[index]
    results = [wait_done(client, location) for location in queued]
    assert [response.status_code for response in results] == [200, 200]
    assert [response.json for response in results] == [
        {"pid": os.getpid(), "size": len(BIG), "sha256": hashlib.sha256(BIG).hexdigest()},
        {"pid": os.getpid(), "size": 5, "sha256": hashlib.sha256(b"small").hexdigest()},
    ]
    get_state(app).close()


def test_a_process_killed_hard_loses_its_running_task_but_not_its_queue(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    config = {**config, "RESTFUL_ASYNC_MAX_WORKERS": 2}
    plain, rerun, queued = _in_child(tmp_path, config, "die")
    app = _app(tmp_path, config)
    client = app.test_client()
    assert wait_done(client, plain).json["state"] == "lost"  # type: ignore[index]
    for location in (rerun, queued):
        done = wait_done(client, location)
        assert done.status_code == 200
        assert done.json["pid"] == os.getpid()  # type: ignore[index]
    get_state(app).close()


def test_a_task_no_process_takes_reads_lost_after_the_queued_ttl(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    location = _in_child(tmp_path, config, "stop")[-1]
    task_id = location.rsplit("/", 1)[-1]
    reader = Flask(__name__, instance_path=str(tmp_path))  # reads, takes nothing over
    reader.config.update(config)
    store = open_store(config["RESTFUL_ASYNC_STORE"], reader)
    store.configure(result_ttl=60, tombstone_ttl=60, lease=1, queued_ttl=1.5)
    try:
        task = store.get(task_id)
        assert task is not None
        assert task.state is TaskState.QUEUED
        time.sleep(1.6)
        task = store.get(task_id)
        assert task is not None
        assert task.state is TaskState.LOST
    finally:
        store.close()


def test_a_long_poll_hears_of_tasks_handed_back_before_the_next_renewal(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    # Another process's hand-back is heard by the long-poll's listener (SQLite: the
    # file changed; Redis: the hand-back publishes).
    config = {
        **config,
        "RESTFUL_ASYNC_LEASE": 30,  # renewals 10 s apart: too late for this test
        "RESTFUL_ASYNC_MAX_WORKERS": 2,
    }
    app = _app(tmp_path, config)
    client = app.test_client()
    RELEASE.clear()
    blocked = _submit(client, "/blocked")
    poll = threading.Thread(target=client.get, args=(blocked + "?wait=10",))
    poll.start()
    try:
        handed_back_at = time.monotonic()
        queued = _in_child(tmp_path, config, "stop")[-1]
        done = wait_done(client, queued, timeout=5)
        assert done.json == {
            "pid": os.getpid(),
            "size": 5,
            "sha256": hashlib.sha256(b"small").hexdigest(),
        }
        assert time.monotonic() - handed_back_at < 5
    finally:
        RELEASE.set()
        poll.join(10)
        get_state(app).close()
