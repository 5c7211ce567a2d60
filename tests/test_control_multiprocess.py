"""Task control across processes: a real gunicorn server and an in-test app on one store.

The server (``tests/apps/tasks_app.py`` under ``gunicorn -k gthread``) runs the
tasks; the in-test app, made in this process on the same store (SQLite in a
temporary instance folder, or Redis under a key prefix of the test's own), sends
the ``DELETE``: the cancel flag only reaches the handler through the store.
``POST /jobs/sleep`` checks it every 50 ms (``current_task.raise_if_cancelled()``).

Every wait is bounded; on the way out each test cancels what it started, closes
the in-test app and stops the server, whatever happened.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_restful_async.state import get_state

from .apps.tasks_app import create_app
from .servers import Response, http, serve
from .test_multiprocess import APP, SERVER, Store, close_app, redis_store, task_id

JSON_HEADERS = {"Content-Type": "application/json"}
#: The handler sees a DELETE within 50 ms (its check interval) plus a store read; the
#: bound leaves room for a slow machine, polling every POLL_INTERVAL.
CANCEL_BOUND = 1.0
POLL_INTERVAL = 0.01
#: A task that must still be running when the test ends it (it is always cancelled).
LONG = "/jobs/sleep?seconds=10"


@dataclasses.dataclass
class Rig:
    """A gunicorn server and an in-test app on one store."""

    base: str
    app: Flask
    client: FlaskClient
    #: Status URLs to cancel on the way out (a no-op for finished tasks).
    started: list[str]

    def submit(self, path: str, document: t.Any = None) -> str:
        """POST to the server; check the 202 and return the ``Location``."""
        status, headers, data = http(
            "POST", self.base + path, body=json.dumps(document).encode(), headers=JSON_HEADERS
        )
        assert status == 202, (status, data)
        location = headers["location"]
        assert location.startswith("/tasks/"), location
        self.started.append(location)
        return location

    def get(self, location: str, timeout: float = 10) -> Response:
        """GET the status URL on the server."""
        return http("GET", self.base + location, timeout=timeout)

    def wait_until(self, location: str, state: str, timeout: float = 10) -> dict[str, t.Any]:
        """Poll the server until the task is ``state`` (still answering 202)."""
        deadline = time.monotonic() + timeout
        while True:
            status, _, data = self.get(location)
            document = json.loads(data)
            assert status == 202, (status, document)
            if document["state"] == state:
                return t.cast(dict[str, t.Any], document)
            if time.monotonic() > deadline:
                raise AssertionError(f"{location} not {state} after {timeout} s: {document}")
            time.sleep(POLL_INTERVAL)

    def wait_finished(self, location: str, timeout: float = 10) -> tuple[Response, float]:
        """Poll the server until it stops answering 202: the answer, and when it came."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.get(location)
            if response[0] != 202:
                return response, time.monotonic()
            if time.monotonic() > deadline:
                raise AssertionError(f"{location} still 202 after {timeout} s: {response[2]!r}")
            time.sleep(POLL_INTERVAL)

    def cancel_started(self) -> None:
        # Best effort, so that the server stops at once rather than after its
        # graceful timeout; a failure here must not hide the test's own.
        for location in self.started:
            with contextlib.suppress(Exception):
                self.client.delete(location)


RigFactory = t.Callable[..., Rig]


@pytest.fixture(params=["sqlite", "redis"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RigFactory]:
    """``rig(workers=, threads=, **config)``: a server and an in-test app on a fresh store.

    ``config`` goes to the server only (as ``FLASK_`` variables); the in-test app
    has the default configuration.
    """
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            store = Store("sqlite", tmp_path / "instance")
        else:
            store = stack.enter_context(redis_store(tmp_path / "instance"))
        made = False

        def start(*, workers: int = 1, threads: int = 4, **config: t.Any) -> Rig:
            nonlocal made
            assert not made, "one rig per test"
            made = True
            env = store.server_env(**config)
            base = stack.enter_context(
                serve(SERVER, APP, env=env, workers=workers, threads=threads)
            )
            app = create_app(str(store.instance), **store.config())
            stack.callback(close_app, app)
            made_rig = Rig(base, app, app.test_client(), [])
            stack.callback(made_rig.cancel_started)
            return made_rig

        yield start


def assert_cancelled(response: Response) -> dict[str, t.Any]:
    status, headers, data = response
    document = json.loads(data)
    assert status == 409, (status, document)
    assert document["state"] == "cancelled", document
    assert headers["cache-control"] == "no-store"
    return t.cast(dict[str, t.Any], document)


# -- 1. DELETE in one process, the task running (or queued) in another ---------------


def test_a_delete_elsewhere_cancels_a_running_task_promptly(rig: RigFactory) -> None:
    r = rig(workers=2, threads=4)
    location = r.submit(LONG)
    r.wait_until(location, "running")

    sent_wall, sent = time.time(), time.monotonic()
    response = r.client.delete(location)
    assert response.status_code == 202, response.get_data()
    document = response.json
    assert document is not None
    assert document["cancel_requested"] is True
    assert document["state"] == "running"

    final, seen = r.wait_finished(location)
    latency = seen - sent
    assert_cancelled(final)
    task = get_state(r.app).store.get(task_id(location))
    assert task is not None
    assert task.finished_at is not None
    assert task.started_at is not None
    ended = task.finished_at - sent_wall
    print(
        f"cancelled {ended * 1000:.0f} ms after the DELETE was sent (seen by polling the"
        f" server after {latency * 1000:.0f} ms)"
    )
    assert latency < CANCEL_BOUND, latency
    # And so it reads in this process too.
    here = r.client.get(location)
    assert here.status_code == 409
    assert here.json is not None
    assert here.json["state"] == "cancelled"


def test_a_delete_elsewhere_cancels_a_queued_task_before_it_runs(rig: RigFactory) -> None:
    r = rig(workers=1, threads=4, RESTFUL_ASYNC_MAX_WORKERS=1)
    first = r.submit(LONG)
    r.wait_until(first, "running")
    second = r.submit(LONG)
    r.wait_until(second, "queued")

    response = r.client.delete(second)
    assert response.status_code == 200, response.get_data()
    document = response.json
    assert document is not None
    assert document["state"] == "cancelled"
    assert document["started_at"] is None

    # Free the only worker: it takes the queue in order, so once an echo submitted
    # afterwards has run, the cancelled task has been passed over.
    assert r.client.delete(first).status_code == 202
    final, _ = r.wait_finished(first)
    assert_cancelled(final)
    after = r.submit("/jobs/echo", {"after": "the cancelled one"})
    status, _, data = r.wait_finished(after)[0]
    assert status == 200, data
    assert json.loads(data)["echo"] == {"after": "the cancelled one"}

    document = assert_cancelled(r.get(second))
    assert document["started_at"] is None
    assert document["progress"] is None  # the handler reports progress at once
    task = get_state(r.app).store.get(task_id(second))
    assert task is not None
    assert task.started_at is None


# -- 2. one Idempotency-Key, 20 identical submits at once, two processes ------------

SUBMITTERS = 20
KEYS = 5  # rounds, each with a key of its own: more chances to meet a race


def wait_for_workers(base: str, workers: int, timeout: float = 10) -> None:
    """Until ``GET /pid`` has answered from ``workers`` processes: a worker still
    booting takes no connections, and the submits would then all meet in one."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids) < workers:
        assert time.monotonic() < deadline, f"only {len(pids)} workers answered in {timeout} s"
        status, _, data = http("GET", base + "/pid")
        assert status == 200, data
        pids.add(json.loads(data)["pid"])


def test_concurrent_identical_submits_with_one_key_make_one_task(rig: RigFactory) -> None:
    r = rig(workers=2, threads=8)
    wait_for_workers(r.base, 2)
    body = json.dumps({"order": 42, "text": "naïve ☃"}).encode()

    for round_ in range(KEYS):
        key = f"order-42-{round_}"
        barrier = threading.Barrier(SUBMITTERS, timeout=10)

        def submit_one(key: str = key, barrier: threading.Barrier = barrier) -> Response:
            headers = {**JSON_HEADERS, "Idempotency-Key": key}
            barrier.wait()
            return http("POST", r.base + "/jobs/echo", body=body, headers=headers)

        with concurrent.futures.ThreadPoolExecutor(SUBMITTERS) as pool:
            futures = [pool.submit(submit_one) for _ in range(SUBMITTERS)]
            answers = [future.result(timeout=20) for future in futures]
        statuses = [status for status, _, _ in answers]
        assert statuses == [202] * SUBMITTERS, [a for a in answers if a[0] != 202][:3]
        locations = {headers["location"] for _, headers, _ in answers}
        assert len(locations) == 1, locations
        (location,) = locations
        r.started.append(location)

        # The store (fresh for this test) holds one task per key so far, this
        # key's being the one all the submits answered with.
        ids = [task.id for task in get_state(r.app).store.list(owner=None)]
        assert sorted(ids) == sorted(task_id(started) for started in r.started), ids

    other = json.dumps({"order": 43}).encode()
    headers = {**JSON_HEADERS, "Idempotency-Key": "order-42-0"}
    status, response_headers, data = http(
        "POST", r.base + "/jobs/echo", body=other, headers=headers
    )
    assert status == 422, (status, data)
    assert response_headers["content-type"].startswith("application/json")
    document = json.loads(data)
    assert isinstance(document.get("message"), str), document
    assert "location" not in response_headers
    assert len(get_state(r.app).store.list(owner=None)) == KEYS, "the 422 created a task"


# -- 3. a long-poll on the server, the DELETE from this process ----------------------


def test_a_long_poll_answers_409_promptly_when_the_task_is_cancelled_elsewhere(
    rig: RigFactory,
) -> None:
    r = rig(workers=2, threads=8)
    location = r.submit(LONG)
    r.wait_until(location, "running")

    def long_poll() -> tuple[Response, float]:
        response = r.get(f"{location}?wait=10", timeout=15)
        return response, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        polling = pool.submit(long_poll)
        time.sleep(0.5)  # long enough for the request to be waiting on the server
        assert not polling.done(), polling.result()
        sent = time.monotonic()
        assert r.client.delete(location).status_code == 202
        response, answered = polling.result(timeout=15)

    latency = answered - sent
    print(
        f"long-poll answered {latency * 1000:.0f} ms after the DELETE"
        f" ({answered - started:.2f} s after it was sent)"
    )
    assert_cancelled(response)
    assert latency < CANCEL_BOUND, latency
