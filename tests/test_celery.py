"""Tasks run by a real Celery worker: ``flask_restful_async.celery``.

The app is ``tests/apps/celery_app.py``. One worker subprocess (``-P threads -c 4``)
per way of making the Celery app (plain ``Celery(...)``, Flask's
``celery_init_app``, ``make_celery``; the end-to-end tests run with each) serves
the module, on a queue of its own; every Redis key (store and broker, db 13) is
under a prefix of the worker's own and deleted afterwards, never flushing. A few
tests run a worker of their own (one thread, the prefork pool, remote control,
RabbitMQ as the broker: a unique queue and exchange, deleted afterwards; a worker
whose module binds no Flask app), and one serves the app with gunicorn to look
inside the web process. Which Flask app a message runs in, and what fails a task
before its handler runs, are tested in process with an eager Celery app. The
snapshot's JSON round trip and the stores' blobs are tested here too (no Celery
needed for them).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, current_app, g
from flask.testing import FlaskClient
from flask_restful import Api

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.snapshot import RequestSnapshot
from flask_restful_async.state import get_state
from flask_restful_async.stores.memory import MemoryStore
from flask_restful_async.stores.sqlite import SQLiteStore

from .apps.celery_app import WIRINGS
from .conftest import run_at_once
from .servers import http, poll_until_done, serve
from .services import (
    REDIS_HOST,
    REDIS_PORT,
    celery_worker,
    delete_redis_keys,
    free_port,
    redis_server,
    require_redis,
    require_service,
)

#: Seconds the worker gets to start and run a first task.
WORKER_READY_TIMEOUT = 20.0

RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}//"
THREADS = ("-P", "threads", "-c", "4")


# -- the snapshot as JSON --------------------------------------------------------------


def test_snapshot_json_round_trip() -> None:
    app = Flask(__name__)
    body = bytes(range(256)) + "naïve ☃".encode()
    with app.test_request_context(
        "/things/7?q=a&q=b",
        method="PUT",
        data=body,
        headers={"X-Echo": "é", "Content-Type": "application/octet-stream"},
    ):
        g.user = {"id": 1, "roles": ["a", "b"]}
        g.ratio = 0.5
        snapshot = RequestSnapshot.capture(body, "put", (7, "x"), {"id": 7, "flag": None})
    again = RequestSnapshot.from_json(snapshot.to_json())
    assert again == snapshot
    assert isinstance(again.args, tuple)
    with again.request_context(app):
        from flask import request

        assert request.get_data() == body
        assert request.args.getlist("q") == ["a", "b"]
        assert request.headers["X-Echo"] == "é"


def test_snapshot_json_drops_g_values_that_are_not_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    snapshot = RequestSnapshot(
        environ={}, body=b"", endpoint="e", method="get", g={"ok": [1], "conn": object()}
    )
    with caplog.at_level(logging.DEBUG, logger="flask_restful_async.snapshot"):
        again = RequestSnapshot.from_json(snapshot.to_json())
    assert again.g == {"ok": [1]}
    assert "g.conn" in caplog.text


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((object(),), {}), ((), {"when": float("nan")}), ((), {"pair": (1, 2)}), ((), {"d": {1: 2}})],
)
def test_snapshot_json_refuses_args_that_are_not_json(
    args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
) -> None:
    snapshot = RequestSnapshot(environ={}, body=b"", endpoint="e", method="get", args=args)
    snapshot.kwargs = kwargs
    with pytest.raises(TypeError, match="not JSON data"):
        snapshot.to_json()


@pytest.mark.parametrize("text", ["[]", '{"v": 99}', '{"v": 1}', '{"v": 1, "environ": {"a": 1}}'])
def test_snapshot_from_json_refuses_other_documents(text: str) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        RequestSnapshot.from_json(text)


# -- a real worker -------------------------------------------------------------------


class Worker(t.NamedTuple):
    prefix: str
    queue: str
    #: The worker's node name (``-n``), for remote control's ``destination``.
    nodename: str
    process: subprocess.Popen[bytes]
    log: t.IO[bytes]

    def output(self, tail: int | None = 4000) -> str:
        """What the worker logged: the last ``tail`` characters, or all of it."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return text if tail is None else text[-tail:]


def delete_keys(prefix: str) -> None:
    delete_redis_keys(13, prefix)


@contextlib.contextmanager
def run_worker(
    pool: tuple[str, ...] = THREADS,
    *,
    loglevel: str = "warning",
    on: tuple[str, str] | None = None,
    **env_extra: str,
) -> Iterator[Worker]:
    """A ``celery worker`` subprocess on a fresh prefix, queue and node name (or on
    the prefix and queue ``on``), its pool options ``pool``; stopped, and the keys
    of a fresh prefix deleted, on exit."""
    require_redis()
    token = secrets.token_hex(6)
    prefix, queue = on or (f"{{restful_async_celery_{token}}}:", f"restful_async_celery_{token}")
    nodename = f"restful_async_celery_{token}@localhost"
    env = {"CELERY_TEST_PREFIX": prefix, "CELERY_TEST_QUEUE": queue, **env_extra}
    options = [*pool, "-n", nodename, "-l", loglevel]
    try:
        with (
            tempfile.TemporaryFile() as log,
            celery_worker("tests.apps.celery_app", queue, options, env, log) as process,
        ):
            yield Worker(prefix, queue, nodename, process, log)
    finally:
        if on is None:
            delete_keys(prefix)


@pytest.fixture(scope="module")
def workers() -> Iterator[t.Callable[[str], Worker]]:
    """The module's workers, one per wiring of the Celery app, each started when a
    test first asks for it."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Worker] = {}

        def get(wiring: str) -> Worker:
            if wiring not in started:
                started[wiring] = stack.enter_context(run_worker(CELERY_TEST_WIRING=wiring))
            return started[wiring]

        yield get


@pytest.fixture
def wiring() -> str:
    """How the Celery app is made (``tests.apps.celery_app.WIRINGS``); a test that
    must pass with each parametrizes this."""
    return "plain"


@pytest.fixture
def worker(workers: t.Callable[[str], Worker], wiring: str) -> Worker:
    return workers(wiring)


@pytest.fixture
def client(worker: Worker, wiring: str) -> Iterator[FlaskClient]:
    """A test client of an in-process instance of the worker's app (same store,
    queue, and way of making the Celery app)."""
    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    app, _, _ = create_app(worker.prefix, worker.queue, wiring=wiring)
    try:
        yield app.test_client()
    finally:
        get_state(app).close()


def poll(client: FlaskClient, worker: Worker, location: str, timeout: float = 10.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(location)
        if response.status_code != 202:
            return response
        if worker.process.poll() is not None:
            pytest.fail(f"the worker exited with {worker.process.returncode}:\n{worker.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{location} still {response.json} after {timeout} s:\n{worker.output()}")
        time.sleep(0.02)


def wait_running(client: FlaskClient, worker: Worker, location: str) -> None:
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while client.get(location).json["state"] != "running":
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.02)


def submit_and_cancel(client: FlaskClient, path: str) -> str:
    """Submit a task that will wait in the queue, cancel it (200): its id."""
    location = submit(client, path, data=b"2")
    response = client.delete(location)
    assert response.status_code == 200, response.get_data()
    assert response.json["state"] == "cancelled"
    return location.rsplit("/", 1)[1]


def submit(client: FlaskClient, path: str, **kwargs: t.Any) -> str:
    response = client.post(path, **kwargs)
    assert response.status_code == 202, response.get_data()
    assert response.json is not None
    assert response.json["state"] == "queued"
    return str(response.headers["Location"])


@pytest.mark.parametrize("wiring", WIRINGS)
def test_worker_runs_the_task_with_the_request_intact(worker: Worker, client: FlaskClient) -> None:
    body = "naïve ☃ " + "x" * 1000
    location = submit(
        client,
        "/echo?a=1&a=2&b=%C3%A9",
        data=body.encode(),
        headers={"X-Echo": "hello", "Content-Type": "text/plain; charset=utf-8"},
    )
    # The first task also proves the worker is up: give it time to start.
    response = poll(client, worker, location, timeout=WORKER_READY_TIMEOUT)
    assert response.status_code == 200, response.get_data()
    result = response.json
    assert result["body"] == body
    assert result["header"] == "hello"
    assert result["args"] == {"a": ["1", "2"], "b": ["é"]}
    assert result["pid"] == worker.process.pid != os.getpid()
    assert response.headers["Cache-Control"] == "no-store"


def test_http_exception_in_the_worker_keeps_its_status(worker: Worker, client: FlaskClient) -> None:
    location = submit(client, "/echo?fail=409", data=b"")
    response = poll(client, worker, location, timeout=WORKER_READY_TIMEOUT)
    assert response.status_code == 409, response.get_data()
    assert response.json["message"] == "failed with 409 as asked"


@pytest.mark.parametrize("wiring", WIRINGS)
def test_progress_is_visible_while_the_worker_runs(worker: Worker, client: FlaskClient) -> None:
    location = submit(client, "/echo?steps=6&step=0.15", data=b"p")
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    seen: list[t.Any] = []
    while True:
        response = client.get(location)
        if response.status_code != 202:
            break
        document = response.json
        if document["state"] == "running" and document["progress"] is not None:
            seen.append(document["progress"])
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.02)
    assert response.status_code == 200, response.get_data()
    assert seen, "no progress was seen while the task ran"
    assert seen[-1]["total"] == 6
    assert seen[-1]["message"] == "stepping"
    assert [p["current"] for p in seen] == sorted(p["current"] for p in seen)


def test_tasks_run_concurrently_in_the_worker(worker: Worker, client: FlaskClient) -> None:
    started = time.monotonic()
    locations = [submit(client, "/echo?steps=4&step=0.25", data=b"c") for _ in range(4)]
    for location in locations:
        assert poll(client, worker, location, timeout=WORKER_READY_TIMEOUT).status_code == 200
    # Four 1-second tasks on four threads: far less than the 4 s they take in a row.
    assert time.monotonic() - started < 3.5


def test_uploaded_files_and_form_fields_reach_the_worker(
    worker: Worker, client: FlaskClient
) -> None:
    content = bytes(range(256)) * 40  # binary, not text
    location = submit(
        client,
        "/echo",
        data={
            "note": ["first", "second"],
            "upload": (io.BytesIO(content), "data.bin", "application/octet-stream"),
        },
        content_type="multipart/form-data",
    )
    response = poll(client, worker, location, timeout=WORKER_READY_TIMEOUT)
    assert response.status_code == 200, response.get_data()
    assert response.json == {
        "form": {"note": ["first", "second"]},
        "files": {
            "upload": {
                "filename": "data.bin",
                "type": "application/octet-stream",
                "sha256": hashlib.sha256(content).hexdigest(),
            }
        },
    }


@pytest.mark.parametrize("wiring", WIRINGS)
def test_cancelling_a_running_task_ends_it_as_cancelled(
    worker: Worker, client: FlaskClient
) -> None:
    location = submit(client, "/echo?steps=100&step=0.05&cancellable=1", data=b"r")
    wait_running(client, worker, location)
    response = client.delete(location)
    assert response.status_code == 202, response.get_data()
    assert response.json["cancel_requested"] is True
    # The handler sees the flag within the check interval and stops long before
    # its 5 s of steps are over.
    response = poll(client, worker, location, timeout=3)
    assert response.status_code == 409, response.get_data()
    assert response.json["state"] == "cancelled"
    assert response.json["progress"]["current"] < 50


@contextlib.contextmanager
def failing_broker(how: str, workdir: Path) -> Iterator[str]:
    """The URL of a broker that takes no message: ``refused`` (nothing listens),
    ``unknown`` (no such transport installed), ``full`` (a Redis of the test's
    own over its ``maxmemory``: it answers, and refuses every write) or
    ``silent`` (connections are taken, and never answered: a broker process
    stopped, a host gone behind NAT)."""
    if how == "silent":
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)  # the system completes the handshakes; nothing reads
            yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        return
    if how != "full":
        yield f"{'redis' if how == 'refused' else 'nosuch'}://127.0.0.1:{free_port()}/0"
        return
    import redis

    port = free_port()
    with redis_server(port, workdir):
        with redis.Redis(host="127.0.0.1", port=port) as client:
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", 1)
        yield f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("how", ["refused", "unknown", "full", "silent"])
def test_a_broker_that_takes_no_message_answers_503_and_leaves_no_task(
    how: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis()
    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    prefix = f"{{restful_async_celery_{secrets.token_hex(6)}}}:"
    with failing_broker(how, tmp_path) as broker_url:
        app, _, store = create_app(prefix, "unused", broker_url=broker_url)
        try:
            started = time.monotonic()
            with caplog.at_level(logging.WARNING, logger=app.logger.name):
                response = app.test_client().post("/echo", data=b"x")
            # Refused: at once; silent: after the publish timeout (2 s).
            assert time.monotonic() - started < 10
            assert response.status_code == 503, response.get_data()
            assert response.headers["Retry-After"] == "1"
            assert response.json == {"message": "The task queue is not available; try again later."}
            assert store.list(owner=None, limit=10) == []
            # The detail is for the server's log, with the task's id.
            (record,) = [r for r in caplog.records if "to the broker" in r.getMessage()]
            assert len(getattr(record, "task_id", "")) >= 22
            assert record.task_id in record.getMessage()
        finally:
            get_state(app).close()
            delete_keys(prefix)


def test_submits_queued_for_a_silent_brokers_connections_answer_within_twice_the_timeout(
    tmp_path: Path,
) -> None:
    """More submits than the pool has connections: those waiting for one give up
    after publish_timeout too, rather than one timeout after another."""
    from celery import Celery

    from flask_restful_async.celery import CeleryExecutor

    class Work(AsyncResource):
        def post(self) -> dict[str, bool]:
            return {"ran": True}

    with failing_broker("silent", tmp_path) as broker_url:
        celery_app = Celery("silent", broker=broker_url)
        celery_app.conf.broker_pool_limit = 2
        app = Flask(__name__, instance_path=str(tmp_path))
        api = Api(app)
        executor = CeleryExecutor(celery_app, publish_timeout=1.0)
        register_async(api, store=f"sqlite:///{tmp_path}/tasks.db", executor=executor)
        api.add_resource(Work, "/work")
        answers: list[tuple[int, float]] = []

        def submit() -> None:
            started = time.monotonic()
            response = app.test_client().post("/work")
            answers.append((response.status_code, time.monotonic() - started))

        try:
            run_at_once(submit, 12, timeout=60)
            assert [code for code, _ in answers] == [503] * 12
            # One timeout after another: 6 s for the last (12 submits, 2 at a time).
            assert max(took for _, took in answers) < 3.5, answers
            assert get_state(app).store.list(owner=None) == []
        finally:
            get_state(app).close()


def test_a_forked_child_does_not_inherit_a_held_publishing_lock() -> None:
    """A thread of the parent making the producer pool at the fork (a first submit)
    leaves the lock held in the child, where no thread would release it."""
    from celery import Celery

    from flask_restful_async.celery import CeleryExecutor

    executor = CeleryExecutor(Celery("fork"))
    with executor._publishing_lock:
        pid = os.fork()
        if pid == 0:  # the child: free to take it
            os._exit(0 if executor._publishing_lock.acquire(timeout=5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_publish_timeout_must_be_above_0() -> None:
    from celery import Celery

    from flask_restful_async.celery import CeleryExecutor

    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="publish_timeout"):
            CeleryExecutor(Celery("bad"), publish_timeout=bad)


def test_a_keyed_submit_the_broker_does_not_take_ends_lost_and_frees_its_key(
    tmp_path: Path,
) -> None:
    """A repeat with the same key may have been answered 202 while the first
    submit waited for the broker: its task ends lost rather than vanish (a 404 at
    that Location), and lets go of the key, so that the client's next try is a
    submit anew rather than that lost task."""
    require_redis()
    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    prefix = f"{{restful_async_celery_{secrets.token_hex(6)}}}:"
    with failing_broker("refused", tmp_path) as broker_url:
        app, _, store = create_app(prefix, "unused", broker_url=broker_url)
        try:
            client = app.test_client()
            for _ in range(2):
                response = client.post("/echo", data=b"x", headers={"Idempotency-Key": "k"})
                assert response.status_code == 503, response.get_data()
            tasks = store.list(owner=None, limit=10)
            assert [task.state for task in tasks] == [TaskState.LOST, TaskState.LOST]
            assert [task.idempotency_key for task in tasks] == [None, None]
        finally:
            get_state(app).close()
            delete_keys(prefix)


def test_the_celery_extra_brings_the_redis_transport() -> None:
    """``pip install flask-restful-async[celery]`` is enough for the documented setup,
    a Redis broker: kombu's Redis transport needs redis-py, which ``celery[redis]``
    brings."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("celery[redis]") for requirement in extras["celery"])


def test_a_snapshot_that_does_not_decode_fails_the_task(
    worker: Worker, client: FlaskClient
) -> None:
    from flask_restful_async.celery import TASK_NAME
    from flask_restful_async.task import Task, new_task_id

    app = client.application
    state = get_state(app)
    task_id = new_task_id()
    state.store.create(Task(id=task_id))
    state.executor.celery_app.send_task(  # type: ignore[attr-defined]
        TASK_NAME,
        args=(task_id, '{"v": 1, "environ": "garbled"}', None),
        kwargs={"flask_app": app.name},
        task_id=task_id,
        queue=worker.queue,
    )
    response = poll(client, worker, f"/tasks/{task_id}", timeout=WORKER_READY_TIMEOUT)
    assert response.status_code == 500, response.get_data()
    assert response.json == {"message": "Internal Server Error"}
    assert f"Task {task_id} failed before its handler ran" in worker.output()


def test_a_worker_without_the_flask_app_hands_the_task_on() -> None:
    """A worker whose module never binds the Flask app cannot reach the task's
    store: it says how to fix it and gives the message back, and a worker that has
    the app runs the task."""
    from .apps.celery_app import create_app

    token = secrets.token_hex(6)
    on = (f"{{restful_async_celery_{token}}}:", f"restful_async_celery_{token}")
    app, _, _ = create_app(*on)
    client = app.test_client()
    try:
        with run_worker(on=on, CELERY_TEST_WIRING="unbound") as unbound:
            location = submit(client, "/echo", data=b"patient")
            deadline = time.monotonic() + WORKER_READY_TIMEOUT
            while "must build the Flask app and call register_async" not in unbound.output():
                assert unbound.process.poll() is None, unbound.output()
                assert time.monotonic() < deadline, unbound.output()
                time.sleep(0.05)
            assert f"Task {location.rsplit('/', 1)[1]} is for the Flask app" in unbound.output()
            assert client.get(location).json["state"] == "queued"
        with run_worker(on=on) as fixed:
            response = poll(client, fixed, location, timeout=WORKER_READY_TIMEOUT)
        assert response.status_code == 200, response.get_data()
        assert response.json["body"] == "patient"
    finally:
        get_state(app).close()
        delete_keys(on[0])


def test_submit_refuses_view_args_that_are_not_json() -> None:
    from flask_restful_async.celery import CeleryExecutor
    from flask_restful_async.snapshot import RequestSnapshot as Snapshot

    from .apps.celery_app import create_app

    app, celery_app, store = create_app("{unused}:", "unused")
    executor = CeleryExecutor(celery_app)
    snapshot = Snapshot(environ={}, body=b"", endpoint="echo", method="post", args=(object(),))

    taken_back: list[str] = []
    store.withdraw = lambda task_id, **_: taken_back.append(task_id) is None  # type: ignore[method-assign]

    class FakeTask:
        id = "t" * 22

    with pytest.raises(TypeError, match="not JSON data"):
        executor.submit(app, FakeTask(), snapshot)  # type: ignore[arg-type]
    assert taken_back == ["t" * 22]


@pytest.mark.parametrize("wiring", ["plain", "make_celery"])
def test_killed_worker_task_is_lost_within_the_lease(wiring: str) -> None:
    from flask_restful_async.lease import worker_id
    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    lease = 1.0
    with run_worker(CELERY_TEST_LEASE=str(lease), CELERY_TEST_WIRING=wiring) as doomed:
        app, _, store = create_app(doomed.prefix, doomed.queue, wiring=wiring)
        try:
            client = app.test_client()
            location = submit(client, "/echo?steps=200&step=0.1", data=b"k")
            task_id = location.rsplit("/", 1)[1]
            deadline = time.monotonic() + WORKER_READY_TIMEOUT
            while (response := client.get(location)).json["state"] != "running":
                assert time.monotonic() < deadline, doomed.output()
                time.sleep(0.02)
            task = store.get(task_id)
            assert task is not None
            assert task.worker is not None
            # The worker process took the task under its own name and lease.
            assert f":{doomed.process.pid}:" in task.worker
            assert task.worker != worker_id()
            os.killpg(doomed.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            doomed.process.wait(timeout=10)
            while (response := client.get(location)).status_code == 202:
                assert time.monotonic() - killed_at < lease + 3, response.json
                time.sleep(0.05)
            assert response.status_code == 500, response.get_data()
            assert response.json["state"] == "lost"
        finally:
            get_state(app).close()


# -- the web process -----------------------------------------------------------------


def test_the_web_process_never_runs_a_handler(worker: Worker) -> None:
    """Served by gunicorn, the app only submits: every handler runs in the worker,
    and the web process never imports the module that runs handlers."""
    env = {"CELERY_TEST_PREFIX": worker.prefix, "CELERY_TEST_QUEUE": worker.queue}
    # One gunicorn worker: the process that answers /probe is the one that
    # took every submit and every poll.
    with serve("gunicorn-gthread", "tests.apps.celery_app:flask_app", env=env, workers=1) as base:

        def probe() -> dict[str, t.Any]:
            status, _, body = http("GET", base + "/probe")
            assert status == 200, body
            return t.cast("dict[str, t.Any]", json.loads(body))

        before = probe()
        text = "naïve ☃ body"
        large = os.urandom(300 * 1024)  # above the message limit: through the store
        submits = [
            ("/echo?a=1", text.encode(), {"Content-Type": "text/plain; charset=utf-8"}),
            ("/echo?fail=409", b"", {}),
            ("/echo?steps=2&step=0.05", b"", {}),
            ("/echo?digest=1", large, {"Content-Type": "application/octet-stream"}),
        ]
        locations = []
        for path, body, headers in submits:
            status, answer, content = http("POST", base + path, body=body, headers=headers)
            assert status == 202, content
            locations.append(answer["location"])
        results = []
        for location in locations:
            status, _, content = poll_until_done(base, location, timeout=WORKER_READY_TIMEOUT)
            results.append((status, json.loads(content)))
        after = probe()

    assert [status for status, _ in results] == [200, 409, 200, 200], results
    (_, echoed), (_, failed), (_, stepped), (_, digested) = results
    assert echoed["body"] == text
    assert echoed["args"] == {"a": ["1"]}
    assert failed == {"message": "failed with 409 as asked"}
    assert digested == {"sha256": hashlib.sha256(large).hexdigest(), "length": len(large)}
    web_pid = before["pid"]
    assert after["pid"] == web_pid, "the gunicorn worker was replaced during the test"
    assert web_pid not in (os.getpid(), worker.process.pid)
    assert echoed["pid"] == stepped["pid"] == worker.process.pid
    assert before["handler_runs"] == after["handler_runs"] == 0
    # The probe sees the package's modules (so the check below can fail) ...
    assert {"flask_restful_async.celery", "flask_restful_async.resource"} <= set(after["modules"])
    # ... and the runner is not among them, before or after the tasks.
    assert "flask_restful_async.runner" not in before["modules"]
    assert "flask_restful_async.runner" not in after["modules"], after["modules"]


# -- the stores' blobs -----------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
def blob_store(request: pytest.FixtureRequest, tmp_path: t.Any) -> Iterator[t.Any]:
    from flask_restful_async.stores.memory import MemoryStore
    from flask_restful_async.stores.redis import RedisStore
    from flask_restful_async.stores.sqlite import SQLiteStore

    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        sqlite_store = SQLiteStore(str(tmp_path / "tasks.db"))
        yield sqlite_store
        sqlite_store.close()
    else:
        require_redis()
        prefix = f"{{restful_async_celery_{secrets.token_hex(6)}}}:"
        store = RedisStore(f"redis://{REDIS_HOST}:{REDIS_PORT}/13", prefix=prefix)
        try:
            yield store
        finally:
            store.close()
            delete_keys(prefix)


def test_blobs_are_taken_once_and_expire(blob_store: t.Any) -> None:
    data = bytes(range(256)) * 10
    blob_store.put_blob("a", data, 60)
    blob_store.put_blob("b", b"old", 60)
    blob_store.put_blob("b", b"", 60)
    assert blob_store.take_blob("a") == data
    assert blob_store.take_blob("a") is None
    assert blob_store.take_blob("b") == b""
    assert blob_store.take_blob("never") is None
    blob_store.put_blob("brief", b"x", 0.05)
    time.sleep(0.1)
    blob_store.purge_expired()
    assert blob_store.take_blob("brief") is None


# -- large bodies, cancelling, other pools and brokers ---------------------------------


def test_large_body_goes_through_the_store(
    worker: Worker, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    from flask_restful_async.celery import DEFAULT_MAX_MESSAGE_BODY
    from flask_restful_async.state import get_state

    assert client.application.config.get("CELERY_MAX_MESSAGE_BODY") is None
    executor = get_state(client.application).executor
    sent: list[tuple[t.Any, ...]] = []
    apply_async = executor._task.apply_async  # type: ignore[attr-defined]

    def spy(args: tuple[t.Any, ...], **options: t.Any) -> t.Any:
        sent.append(args)
        return apply_async(args=args, **options)

    monkeypatch.setattr(executor._task, "apply_async", spy)  # type: ignore[attr-defined]
    body = os.urandom(2 * 1024 * 1024)
    location = submit(
        client, "/echo?digest=1", data=body, headers={"Content-Type": "application/octet-stream"}
    )
    task_id = location.rsplit("/", 1)[1]
    (args,) = sent
    assert args[0] == task_id
    assert args[2] == task_id
    assert len(args[1].encode()) < 300 * 1024
    assert RequestSnapshot.from_json(args[1]).body == b""
    response = poll(client, worker, location, timeout=WORKER_READY_TIMEOUT)
    assert response.status_code == 200, response.get_data()
    assert response.json == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}
    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13) as r:
        assert not r.exists(f"{worker.prefix}blob:{task_id}")
    # At the limit, the body still travels in the message.
    small = os.urandom(DEFAULT_MAX_MESSAGE_BODY)
    location = submit(client, "/echo?digest=1", data=small)
    assert sent[1][2] is None
    assert RequestSnapshot.from_json(sent[1][1]).body == small
    response = poll(client, worker, location)
    assert response.json["sha256"] == hashlib.sha256(small).hexdigest()


def test_a_lost_large_body_fails_only_a_queued_task() -> None:
    from flask_restful_async.celery import _BODY_LOST, _end_queued
    from flask_restful_async.state import get_state
    from flask_restful_async.task import Task, TaskState, new_task_id

    from .apps.celery_app import create_app

    app, _, _ = create_app("{unused}:", "unused")
    store = get_state(app).store = MemoryStore()
    queued, cancelled = new_task_id(), new_task_id()
    for task_id in (queued, cancelled):
        store.create(Task(id=task_id))
    store.request_cancel(cancelled)
    for task_id in (queued, cancelled):
        _end_queued(app, task_id, _BODY_LOST)
    failed = store.get(queued)
    assert failed is not None
    assert failed.state is TaskState.FAILED
    assert failed.response is not None
    assert failed.response.status == 500
    assert b"body of this task was lost" in failed.response.body
    still = store.get(cancelled)
    assert still is not None
    assert still.state is TaskState.CANCELLED


def test_cancelled_queued_task_never_runs(caplog: pytest.LogCaptureFixture) -> None:
    import redis

    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    with run_worker(pool=("-P", "threads", "-c", "1")) as single:
        app, _, store = create_app(single.prefix, single.queue)
        try:
            client = app.test_client()
            busy = submit(client, "/echo?steps=10&step=0.1&mark=busy", data=b"1")
            wait_running(client, single, busy)
            task_id = submit_and_cancel(client, "/echo?mark=waiting")
            with caplog.at_level(logging.WARNING):
                get_state(app).executor.cancel(app, task_id)
            assert "Could not revoke" not in caplog.text
            # One thread, first come first served: once a later task has run, the
            # cancelled one's message has been dealt with.
            after = submit(client, "/echo?mark=after", data=b"3")
            assert poll(client, single, busy).status_code == 200
            assert poll(client, single, after).status_code == 200
            task = store.get(task_id)
            assert task is not None
            assert task.state.value == "cancelled"
            assert task.started_at is None
            with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13) as r:
                assert r.exists(f"{single.prefix}ran:busy", f"{single.prefix}ran:after") == 2
                assert not r.exists(f"{single.prefix}ran:waiting")
        finally:
            get_state(app).close()


def test_revoke_reaches_a_worker_that_listens_to_remote_control() -> None:
    """A worker with remote control drops a cancelled queued task's message itself,
    without the store having to refuse it."""
    import redis

    from flask_restful_async.celery import TASK_NAME
    from flask_restful_async.state import get_state

    from .apps.celery_app import create_app

    # One thread and a prefetch of one: while the first task runs (unacknowledged,
    # as acks_late leaves it), the second message stays in the broker, so the
    # worker receives it only after the revoke.
    pool = ("-P", "threads", "-c", "1", "--prefetch-multiplier", "1")
    with run_worker(pool, loglevel="info", CELERY_TEST_REMOTE_CONTROL="1") as listening:
        app, celery_app, store = create_app(listening.prefix, listening.queue)
        destination = [listening.nodename]
        release = f"{listening.prefix}release:busy"
        try:
            # A revoke is a broadcast: only a worker already listening hears it.
            deadline = time.monotonic() + WORKER_READY_TIMEOUT
            while not celery_app.control.ping(destination=destination, timeout=0.5):
                assert listening.process.poll() is None, listening.output()
                assert time.monotonic() < deadline, listening.output()
            client = app.test_client()
            busy = submit(client, "/echo?mark=busy&hold=busy", data=b"1")
            wait_running(client, listening, busy)
            task_id = submit_and_cancel(client, "/echo?mark=waiting")

            deadline = time.monotonic() + 5
            while True:
                revoked = celery_app.control.inspect(destination=destination, timeout=1).revoked()
                if task_id in (revoked or {}).get(listening.nodename, []):
                    break
                assert time.monotonic() < deadline, (revoked, listening.output())
            with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13) as r:
                r.rpush(release, "go")
            after = submit(client, "/echo?mark=after", data=b"3")
            assert poll(client, listening, busy).status_code == 200
            assert poll(client, listening, after).status_code == 200
            # The worker took the message after the one before it, and dropped it.
            log = listening.output(tail=None)
            assert f"Discarding revoked task: {TASK_NAME}[{task_id}]" in log, log[-4000:]
            task = store.get(task_id)
            assert task is not None
            assert task.state.value == "cancelled"
            assert task.started_at is None
            with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13) as r:
                assert r.exists(f"{listening.prefix}ran:busy", f"{listening.prefix}ran:after") == 2
                assert not r.exists(f"{listening.prefix}ran:waiting")
        finally:
            # Whatever failed, the held task ends now rather than at its timeout.
            with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13) as r:
                r.rpush(release, "go")
            get_state(app).close()
            celery_app.close()


def test_cancel_with_the_broker_down_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    from flask_restful_async.celery import CeleryExecutor

    from .apps.celery_app import create_app

    prefix = f"{{restful_async_celery_{secrets.token_hex(6)}}}:"
    app, celery_app, store = create_app(
        prefix, "unused", broker_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    try:
        # A large body waiting for the worker goes with the cancel: a revoked
        # message is dropped unseen, and the body stayed for a day.
        store.put_blob("t" * 22, b"a large body", 3600)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            CeleryExecutor(celery_app).cancel(app, "t" * 22)
        assert time.monotonic() - started < 10
        assert "Could not revoke the message of task " + "t" * 22 in caplog.text
        assert store.take_blob("t" * 22) is None
    finally:
        delete_keys(prefix)


def echo_round_trip(worker: Worker, broker_url: str | None = None) -> list[int]:
    """Two echo tasks at once through ``worker``; the pids that ran them."""
    from flask_restful_async.state import get_state

    from .apps.celery_app import REDIS_URL, create_app

    app, _, _ = create_app(worker.prefix, worker.queue, broker_url or REDIS_URL)
    try:
        client = app.test_client()
        locations = [
            submit(client, f"/echo?steps=8&step=0.25&n={n}", data=f"body {n}".encode())
            for n in range(2)
        ]
        pids = []
        for n, location in enumerate(locations):
            response = poll(client, worker, location, timeout=WORKER_READY_TIMEOUT)
            assert response.status_code == 200, response.get_data()
            assert response.json["body"] == f"body {n}"
            assert response.json["args"] == {"steps": ["8"], "step": ["0.25"], "n": [str(n)]}
            pids.append(response.json["pid"])
        return pids
    finally:
        get_state(app).close()


def test_prefork_pool_keeps_leases_in_its_children() -> None:
    # Tasks of 2 s with a lease of 1 s: they finish only if each child renews.
    with run_worker(pool=("-P", "prefork", "-c", "2"), CELERY_TEST_LEASE="1.0") as forked:
        pids = echo_round_trip(forked)
    assert forked.process.pid not in pids
    assert os.getpid() not in pids


def delete_rabbitmq_queue(name: str) -> None:
    from kombu import Connection

    with Connection(RABBITMQ_URL, connect_timeout=5) as connection:
        channel = connection.channel()
        channel.queue_delete(name)
        channel.exchange_delete(name)


def test_rabbitmq_as_the_broker() -> None:
    require_service("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
    require_redis()
    queue = None
    try:
        with run_worker(CELERY_TEST_BROKER=RABBITMQ_URL) as rabbit:
            queue = rabbit.queue
            pids = echo_round_trip(rabbit, RABBITMQ_URL)
        assert pids == [rabbit.process.pid] * 2
    finally:
        if queue is not None:
            delete_rabbitmq_queue(queue)


# -- which Flask app, and failures before the handler (in process, eager Celery) -------


class Which(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return {"app": current_app.name, "n": current_app.config["N"]}


def eager_celery() -> t.Any:
    """A plain Celery app that runs each task at once, in the thread that sends it."""
    from celery import Celery

    celery_app = Celery("eager", broker="memory://")
    celery_app.conf.update(task_always_eager=True)
    return celery_app


@pytest.fixture
def make_celery_app(tmp_path: Path) -> Iterator[t.Callable[..., Flask]]:
    """Flask apps with ``/which``, each on a SQLite store of its own and the given
    Celery app; closed afterwards."""
    from flask_restful_async.celery import CeleryExecutor

    made: list[Flask] = []

    def make(name: str, celery_app: t.Any, store: t.Any = None) -> Flask:
        n = len(made)
        app = Flask(name, instance_path=str(tmp_path / f"instance{n}"))
        app.config["N"] = n
        api = Api(app)
        register_async(
            api,
            store=store or f"sqlite:///{tmp_path}/tasks{n}.db",
            executor=CeleryExecutor(celery_app),
            owner=lambda: None,
        )
        api.add_resource(Which, "/which")
        made.append(app)
        return app

    yield make
    for app in made:
        get_state(app).close()


def test_each_task_runs_in_the_flask_app_that_accepted_it(
    make_celery_app: t.Callable[..., Flask],
) -> None:
    """One Celery app, several Flask apps in one process (as a test suite makes
    them): each message runs in its own app, the last one made of its name."""
    celery_app = eager_celery()
    _, beta, alpha = (make_celery_app(name, celery_app) for name in ("alpha", "beta", "alpha"))
    for app in (beta, alpha):
        client = app.test_client()
        response = client.post("/which")
        assert response.status_code == 202, response.get_data()
        response = client.get(response.headers["Location"])
        assert response.status_code == 200, response.get_data()
        assert response.json == {"app": app.name, "n": app.config["N"]}


def send_message(
    app: Flask, celery_app: t.Any, snapshot_json: str | None = None, **kw: t.Any
) -> str:
    """Record a task in ``app``'s store and run its message, as a worker would: its id."""
    from flask_restful_async.celery import TASK_NAME
    from flask_restful_async.task import Task, new_task_id

    if snapshot_json is None:
        with app.test_request_context("/which", method="POST"):
            snapshot_json = RequestSnapshot.capture(b"", "post", (), {}).to_json()
    task_id = new_task_id()
    get_state(app).store.create(Task(id=task_id))
    celery_app.tasks[TASK_NAME].apply(args=(task_id, snapshot_json, None), kwargs=kw)
    return task_id


def test_a_message_for_another_app_name_runs_in_the_only_app_bound(
    make_celery_app: t.Callable[..., Flask],
) -> None:
    celery_app = eager_celery()
    app = make_celery_app("alpha", celery_app)
    for kwargs in ({"flask_app": "renamed"}, {}):
        task_id = send_message(app, celery_app, **kwargs)
        response = app.test_client().get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.get_data()
        assert response.json["app"] == "alpha"


def test_a_task_its_store_does_not_know_is_logged_as_a_store_not_shared(
    make_celery_app: t.Callable[..., Flask], caplog: pytest.LogCaptureFixture
) -> None:
    """A web process and a worker on SQLite files of different hosts: the worker's
    store has never heard of the task."""
    from flask_restful_async.celery import TASK_NAME

    celery_app = eager_celery()
    app = make_celery_app("alpha", celery_app)
    with app.test_request_context("/which", method="POST"):
        snapshot_json = RequestSnapshot.capture(b"", "post", (), {}).to_json()
    with caplog.at_level(logging.ERROR, logger=app.logger.name):
        celery_app.tasks[TASK_NAME].apply(args=("u" * 22, snapshot_json, None))
    (record,) = caplog.records
    assert record.task_id == "u" * 22  # type: ignore[attr-defined]
    assert "do not share the store" in record.getMessage()
    assert "sqlite:/// store works only when both run on one host" in record.getMessage()


class FailingLease(SQLiteStore):
    """A real SQLite store whose lease writes fail with ``error``."""

    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(path)
        self.error = error
        self.tries = 0

    def renew_lease(self, worker: str) -> None:
        self.tries += 1
        raise self.error


@pytest.mark.parametrize("failure", ["snapshot", "store", "other"])
def test_a_failure_before_the_handler_fails_the_task(
    failure: str,
    make_celery_app: t.Callable[..., Flask],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever keeps a worker from running the handler ends the task ``failed``:
    500 JSON at the status URL, the error logged with the task id. A store that
    fails is tried again in the worker first (here for a fraction of a second)."""
    from flask_restful_async import celery as celery_module
    from flask_restful_async.exceptions import StoreUnavailable

    monkeypatch.setattr(celery_module, "LEASE_RETRY_DELAY", 0.01)

    celery_app = eager_celery()
    store = None
    if failure != "snapshot":
        error = StoreUnavailable("down") if failure == "store" else RuntimeError("boom")
        store = FailingLease(str(tmp_path / "failing.db"), error)
    app = make_celery_app("alpha", celery_app, store)
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        task_id = send_message(app, celery_app, "{not json" if failure == "snapshot" else None)
    response = app.test_client().get(f"/tasks/{task_id}")
    assert response.status_code == 500, response.get_data()
    assert response.json == {"message": "Internal Server Error"}
    if failure != "snapshot":
        assert store is not None
        assert store.tries > 1  # tried again: an error reply may pass too
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == app.logger.name
    assert record.task_id == task_id  # type: ignore[attr-defined]
    assert "failed before its handler ran" in record.getMessage()


def test_memory_store_is_refused_for_celery_workers(tmp_path: Path) -> None:
    from flask_restful_async.celery import CeleryExecutor

    celery_app = eager_celery()
    for store in ("memory://", MemoryStore()):
        api = Api(Flask("memory"))
        with pytest.raises(ValueError, match=r"redis://.*sqlite:///"):
            register_async(api, store=store, executor=CeleryExecutor(celery_app))
    api = Api(Flask("sqlite", instance_path=str(tmp_path)))
    register_async(api, store="sqlite:///tasks.db", executor=CeleryExecutor(celery_app))
    get_state(api.app).close()
