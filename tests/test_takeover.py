"""Taking over tasks whose process stopped: handed back on a graceful stop, free
after the lease of a process killed hard; run once, by another process, from the
request stored with them.

The first process is a forked child that accepts the tasks and then stops (or
dies); the test process is the other one, on the same store."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from flask_restful import Api

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.stores import open_store

from .conftest import wait_done
from .services import delete_redis_keys, require_redis

REDIS_DB = 14
#: The test process: handlers block only in the forked child, which then stops.
PARENT = os.getpid()


class Work(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        if os.getpid() != PARENT:
            time.sleep(float(request.args.get("seconds", "0")))
        body = request.get_data()
        return {"pid": os.getpid(), "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


class Rerun(Work):
    rerun_on_crash = True


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
    return app


def _in_child(
    tmp_path: Path, config: dict[str, t.Any], act: t.Callable[[Flask, FlaskClient], t.Any]
) -> t.Any:
    """Run ``act(app, client)`` in a forked child, which then ends as ``act`` leaves
    it (``os._exit``: no exit hooks); return what ``act`` returned (JSON data)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            app = _app(tmp_path, config)
            result = act(app, app.test_client())
            os.write(write, json.dumps(result).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


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
    big = secrets.token_bytes(5 * 1024 * 1024)

    def accept_then_stop(app: Flask, client: FlaskClient) -> list[str]:
        first = _submit(client, "/work?seconds=0.5")
        _running(client, first)
        queued = [_submit(client, "/work", big), _submit(client, "/work", b"small")]
        get_state(app).close(timeout=5)  # what a SIGTERM does at exit
        return [first, *queued]

    first, *queued = _in_child(tmp_path, config, accept_then_stop)
    app = _app(tmp_path, config)
    client = app.test_client()
    done = wait_done(client, first)
    assert done.status_code == 200
    assert done.json["pid"] != PARENT
    results = [wait_done(client, location) for location in queued]
    assert [response.status_code for response in results] == [200, 200]
    assert [response.json for response in results] == [
        {"pid": PARENT, "size": len(big), "sha256": hashlib.sha256(big).hexdigest()},
        {"pid": PARENT, "size": 5, "sha256": hashlib.sha256(b"small").hexdigest()},
    ]
    get_state(app).close()


def test_a_process_killed_hard_loses_its_running_task_but_not_its_queue(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    config = {**config, "RESTFUL_ASYNC_MAX_WORKERS": 2}

    def accept_then_die(app: Flask, client: FlaskClient) -> list[str]:
        running = [_submit(client, "/work?seconds=60"), _submit(client, "/rerun?seconds=60")]
        for location in running:
            _running(client, location)
        return [*running, _submit(client, "/work")]  # queued: both workers are busy

    plain, rerun, queued = _in_child(tmp_path, config, accept_then_die)
    app = _app(tmp_path, config)
    client = app.test_client()
    assert wait_done(client, plain).json["state"] == "lost"  # type: ignore[index]
    for location in (rerun, queued):
        done = wait_done(client, location)
        assert done.status_code == 200
        assert done.json["pid"] == PARENT
    get_state(app).close()


def test_a_task_no_process_takes_reads_lost_after_the_queued_ttl(
    tmp_path: Path, config: dict[str, t.Any]
) -> None:
    def accept_then_stop(app: Flask, client: FlaskClient) -> str:
        _running(client, _submit(client, "/work?seconds=0.5"))
        queued = _submit(client, "/work")
        get_state(app).close(timeout=5)
        return queued

    location = _in_child(tmp_path, config, accept_then_stop)
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
