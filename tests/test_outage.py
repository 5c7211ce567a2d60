"""A 202 is a promise, also through a store outage: no task stays queued or
running for ever, no handler dies of a progress report, progress is coalesced.

Outages are real: a private redis-server stopped (``SHUTDOWN SAVE``) and started
again on the same port with its data; a SQLite file whose write lock another
connection holds (``BEGIN EXCLUSIVE``, as a long writer, a backup or a stuck
process would), which needs no privileges and so runs everywhere; and, where
the tests may mount a tmpfs (root), a SQLite file on a full disk. Stores that
count or refuse some writes are subclasses of the real ones.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, current_app, request
from flask.testing import FlaskClient

from flask_restful_async import AsyncResource, MemoryStore, current_task, lease, outbox
from flask_restful_async.exceptions import StoreUnavailable
from flask_restful_async.state import get_state
from flask_restful_async.stores.base import TaskStore
from flask_restful_async.stores.outages import MESSAGE
from flask_restful_async.stores.sqlite import SQLiteStore
from flask_restful_async.task import Progress, StoredResponse, Task, TaskState, new_task_id

from .conftest import AppFactory, run_at_once, wait_done, wait_for
from .services import (
    ReplyCutter,
    RestartableRedis,
    free_port,
    redis_server,
    require_redis,
    services_required,
)

#: Seconds of the lease in these tests: outcomes are given up after 4 of them.
LEASE = 1


class Gated(AsyncResource):
    """Reports progress, waits for its gate (``?gate=name``), reports again, checks
    for cancellation, returns its name."""

    def post(self) -> dict[str, t.Any]:
        gate = current_app.config["GATES"][request.args["gate"]]
        current_task.progress(1, total=3, message="before")
        gate["started"].set()
        assert gate["go"].wait(20)
        current_task.progress(2, total=3, message="during")
        current_task.raise_if_cancelled()
        return {"gate": request.args["gate"], "done": True}


def gate() -> dict[str, threading.Event]:
    return {"started": threading.Event(), "go": threading.Event()}


class Outage:
    """A store, and a way to make it stop answering writes and answer again."""

    store: TaskStore

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError


class SQLiteLocked(Outage):
    def __init__(self, path: Path) -> None:
        # A short busy timeout: a write waits this long for the lock, then the
        # store reports itself unavailable.
        self.store = SQLiteStore(str(path), timeout=0.1)
        self.path = path
        self._holder: sqlite3.Connection | None = None

    def down(self) -> None:
        self.store.get("x" * 22)  # the file exists, with its layout
        self._holder = sqlite3.connect(self.path, isolation_level=None)
        self._holder.execute("BEGIN EXCLUSIVE")

    def up(self) -> None:
        assert self._holder is not None
        self._holder.execute("ROLLBACK")
        self._holder.close()
        self._holder = None


class SQLiteDiskFull(Outage):
    """The file on a tmpfs of 1 MiB of its own, which a filler file fills: a
    real full disk. Needs the right to mount (root); skipped otherwise."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        self.folder = folder
        self.store = SQLiteStore(str(folder / "tasks.db"), timeout=0.1)

    def down(self) -> None:
        self.store.get("x" * 22)  # the file exists, with its layout
        fd = os.open(self.folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            assert fill(fd) == errno.ENOSPC
        finally:
            os.close(fd)

    def up(self) -> None:
        os.remove(self.folder / "filler")

    def unmount(self) -> None:
        self.store.close()
        # Lazy: the app's connections may still be open until it is closed.
        subprocess.run(["umount", "-l", str(self.folder)], check=False)


def fill(fd: int) -> int | None:
    """Write to ``fd`` until the disk is full; the errno that stopped it."""
    while True:
        try:
            os.write(fd, b"\0" * 4096)
        except OSError as e:
            return e.errno


class RedisStopped(Outage):
    def __init__(self, server: RestartableRedis) -> None:
        from flask_restful_async.stores.redis import RedisStore

        self.server = server
        self.store = RedisStore(server.url, socket_timeout=0.5)

    def down(self) -> None:
        self.server.stop()

    def up(self) -> None:
        self.server.start()


@pytest.fixture(params=["sqlite-locked", "sqlite-disk-full", "redis"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    if request.param == "sqlite-locked":
        yield SQLiteLocked(tmp_path / "tasks.db")
        return
    if request.param == "sqlite-disk-full":
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        full = SQLiteDiskFull(tmp_path / "small-disk")
        try:
            yield full
        finally:
            full.unmount()
        return
    if shutil.which("redis-server") is None:
        if services_required():
            pytest.fail("redis-server is not installed, and RESTFUL_ASYNC_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    with RestartableRedis(free_port(), tmp_path) as server:
        yield RedisStopped(server)


def submit(client: FlaskClient, path: str) -> str:
    response = client.post(path)
    assert response.status_code == 202, response.get_data()
    return str(response.headers["Location"])


def gated_app(make_app: AppFactory, store: TaskStore, **config: t.Any) -> tuple[t.Any, dict]:
    gates: dict[str, dict[str, threading.Event]] = {"a": gate(), "b": gate()}
    app, api = make_app(
        store=store,
        config={
            "RESTFUL_ASYNC_LEASE": LEASE,
            "RESTFUL_ASYNC_MAX_WORKERS": 1,
            "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0,
            "GATES": gates,
            **config,
        },
    )
    api.add_resource(Gated, "/gated")
    return app, gates


def test_a_store_outage_ends_every_task_and_kills_no_handler(
    make_app: AppFactory, outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    """A runs and reports progress, checks for cancellation and finishes while the
    store is down; B (waiting for the one worker) starts while it is down. Both
    end succeeded once the store is back (within the lease: a longer outage makes
    the lease lapse, and the tasks lost)."""
    app, gates = gated_app(make_app, outage.store, RESTFUL_ASYNC_LEASE=4)
    client = app.test_client()
    first = submit(client, "/gated?gate=a")
    assert gates["a"]["started"].wait(10)
    gates["b"]["go"].set()
    second = submit(client, "/gated?gate=b")
    outage.down()
    try:
        gates["a"]["go"].set()
        time.sleep(1.0)  # A's progress, cancel check and outcome fail; B's start too
    finally:
        outage.up()
    for location, name in ((first, "a"), (second, "b")):
        response = wait_done(client, location, timeout=10)
        assert response.status_code == 200, response.get_data()
        assert response.json == {"gate": name, "done": True}
    # Each of the three writes did meet the outage.
    logged = caplog.text
    assert f"Progress of task {first.rsplit('/', 1)[1]} could not be stored" in logged
    assert f"The outcome of task {first.rsplit('/', 1)[1]} waits for the store" in logged
    assert f"Task {second.rsplit('/', 1)[1]} cannot start yet" in logged


class FinishRefused(SQLiteStore):
    """Takes every write but the outcome of the tasks named in ``refused``, as a
    full disk takes a small write and refuses a large one."""

    refused: set[str]

    def finish(self, task_id: str, state: TaskState, response: t.Any = None) -> float | None:
        if task_id in self.refused:
            raise StoreUnavailable("The task store is not available: database or disk is full")
        return super().finish(task_id, state, response)


def test_an_outcome_given_up_reads_lost_and_the_process_goes_on(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """The lease renews fine, the outcome never lands: after the bound, the
    process gives up its lease for that task, which reads lost; new tasks run."""
    store = FinishRefused(str(tmp_path / "tasks.db"))
    store.refused = set()
    app, gates = gated_app(make_app, store)
    client = app.test_client()
    first = submit(client, "/gated?gate=a")
    assert gates["a"]["started"].wait(10)
    store.refused.add(first.rsplit("/", 1)[1])
    gates["a"]["go"].set()
    started = time.monotonic()
    response = wait_done(client, first, timeout=4 * LEASE + 5)
    assert response.status_code == 500, response.get_data()
    assert response.json is not None
    assert response.json["state"] == "lost"
    assert time.monotonic() - started >= 4 * LEASE - 0.5  # retried for the whole bound
    # The process goes on under a new name, whose lease it renews: a task that
    # runs for several leases still reads running, then succeeds.
    second = submit(client, "/gated?gate=b")
    assert gates["b"]["started"].wait(10)
    time.sleep(3 * LEASE)
    running = client.get(second)
    assert running.status_code == 202, running.get_data()
    gates["b"]["go"].set()
    response = wait_done(client, second, timeout=10)
    assert response.status_code == 200, response.get_data()


class ResponseRefused(SQLiteStore):
    """Refuses every response, as Redis past its maxmemory refuses a large write
    (an error that is no outage: trying again would not help)."""

    def finish(self, task_id: str, state: TaskState, response: t.Any = None) -> float | None:
        if response is not None:
            raise sqlite3.DataError("string or blob too big")
        return super().finish(task_id, state, response)


def test_an_outcome_the_store_refuses_ends_the_task_lost(
    make_app: AppFactory, tmp_path: Path
) -> None:
    store = ResponseRefused(str(tmp_path / "tasks.db"))
    app, gates = gated_app(make_app, store)
    for name in ("a", "b"):
        gates[name]["go"].set()
    client = app.test_client()
    # Twice: the worker thread that ran the first is still there to run the second.
    for name in ("a", "b"):
        response = wait_done(client, submit(client, f"/gated?gate={name}"))
        assert response.status_code == 500, response.get_data()
        assert response.json is not None
        assert response.json["state"] == "lost"


class StartReplyLost(SQLiteStore):
    """The first start takes effect, and its reply is lost."""

    lost_replies = 0

    def start(self, task_id: str, worker: str) -> t.Any:
        started = super().start(task_id, worker)
        if self.lost_replies == 0:
            self.lost_replies += 1
            raise StoreUnavailable("The task store is not available: connection reset")
        return started


def test_a_start_whose_reply_was_lost_runs_the_task(make_app: AppFactory, tmp_path: Path) -> None:
    store = StartReplyLost(str(tmp_path / "tasks.db"))
    app, gates = gated_app(make_app, store)
    gates["a"]["go"].set()
    client = app.test_client()
    response = wait_done(client, submit(client, "/gated?gate=a"))
    assert response.status_code == 200, response.get_data()
    assert response.json == {"gate": "a", "done": True}
    assert store.lost_replies == 1


class StartRefusedOnce(SQLiteStore):
    """The first start meets an error reply that passes (Redis out of memory)."""

    refused = 0

    def start(self, task_id: str, worker: str) -> t.Any:
        if self.refused == 0:
            self.refused += 1
            raise RuntimeError("OOM command not allowed when used memory > 'maxmemory'")
        return super().start(task_id, worker)


def test_a_start_the_store_refuses_once_is_tried_again(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It escaped, and ended the worker thread, leaving the task queued.
    store = StartRefusedOnce(str(tmp_path / "tasks.db"))
    app, gates = gated_app(make_app, store)
    gates["a"]["go"].set()
    client = app.test_client()
    response = wait_done(client, submit(client, "/gated?gate=a"))
    assert response.status_code == 200, response.get_data()
    assert store.refused == 1
    assert "cannot start yet, trying again: RuntimeError" in caplog.text


def test_the_lease_thread_does_not_spin_while_the_store_fails(make_app: AppFactory) -> None:
    # A wake-up (a task done, news of the store) during an outage made it loop
    # without pause until the store answered again.
    class Failing(MemoryStore):
        shared = True
        down = False
        refused = 0

        def renew_lease(self, worker: str) -> None:
            if self.down:
                self.refused += 1
                raise StoreUnavailable("The task store is not available: down")

    store = Failing()
    app, _ = make_app(store=store, config={"RESTFUL_ASYNC_LEASE": LEASE})
    lease = get_state(app).lease
    assert lease is not None
    lease.start()
    store.down = True
    wait_for(lambda: store.refused >= 1)
    thread = next(each for each in threading.enumerate() if each.name == "restful-async-lease")
    lease.wake()
    before = _thread_cpu(thread)
    time.sleep(0.5)
    assert _thread_cpu(thread) - before < 0.1


def _thread_cpu(thread: threading.Thread) -> float:
    """Seconds of CPU ``thread`` used so far (Linux)."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WithdrawRefusedTwice(MemoryStore):
    """Answers its first two withdrawals with an error reply (Redis BUSY)."""

    refused = 0

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        if self.refused < 2:
            self.refused += 1
            raise RuntimeError("BUSY Redis is busy running a script")
        return super().withdraw(task_id, running_under=running_under)


class FinishRefusedTwice(MemoryStore):
    """Refuses its first two finishes with an error reply (Redis out of memory)."""

    refused = 0

    def finish(self, task_id: str, state: TaskState, response: t.Any = None) -> t.Any:
        if self.refused < 2:
            self.refused += 1
            raise RuntimeError("OOM command not allowed when used memory > 'maxmemory'")
        return super().finish(task_id, state, response)


def test_an_outcome_refused_for_a_moment_is_written_and_gives_up_no_lease() -> None:
    # Given up at the second refusal, it gave up the lease of every task of the
    # process: a moment of Redis out of memory made all of them read lost.
    store = FinishRefusedTwice()
    task = store.create(Task(id=new_task_id(), worker="w"))
    assert store.start(task.id, "w") is not None
    response = StoredResponse(200, [], b"{}")
    logger = logging.getLogger("test.finish")
    outbox.finish(store, task.id, TaskState.SUCCEEDED, response, "w", logger)
    ended = lambda: store.get(task.id)  # noqa: E731
    wait_for(lambda: (found := ended()) is not None and found.state.finished)
    assert store.refused == 2
    assert outbox.outbox_for(store).given_up() == set()
    # With its response: a refusal that passed within a lease costs it nothing.
    found = ended()
    assert found is not None
    assert (found.state, found.response) == (TaskState.SUCCEEDED, response)


class FinishRefusedWithResponse(MemoryStore):
    """Refuses every finish that has a response, as a store refuses a value
    larger than it takes."""

    refused = 0

    def finish(self, task_id: str, state: TaskState, response: t.Any = None) -> t.Any:
        if response is not None:
            self.refused += 1
            raise RuntimeError("ERR string exceeds maximum allowed size")
        return super().finish(task_id, state, response)


def test_an_outcome_refused_for_a_lease_is_written_without_its_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FinishRefusedWithResponse()
    store.configure(result_ttl=60, tombstone_ttl=60, lease=LEASE)
    task = store.create(Task(id=new_task_id(), worker="w"))
    assert store.start(task.id, "w") is not None
    logger = logging.getLogger("test.finish")
    started = time.monotonic()
    response = StoredResponse(200, [], b"{}")
    outbox.finish(store, task.id, TaskState.SUCCEEDED, response, "w", logger)
    wait_for(lambda: (found := store.get(task.id)) is not None and found.state.finished)
    assert time.monotonic() - started >= LEASE - 0.1  # kept its response a lease long
    assert store.refused >= 2
    found = store.get(task.id)
    assert found is not None
    assert (found.state, found.response) == (TaskState.LOST, None)
    assert f"refused the outcome of task {task.id} for 1 s" in caplog.text
    assert outbox.outbox_for(store).given_up() == set()


def test_a_withdrawal_the_store_refuses_is_tried_again_not_given_up() -> None:
    # Given up, the 503'd task stayed queued, and a stop let another process run it.
    store = WithdrawRefusedTwice()
    task = store.create(Task(id=new_task_id(), worker="w"), b"snapshot")
    logger = logging.getLogger("test.withdraw")
    outbox.withdraw(store, task.id, logger)
    wait_for(lambda: store.get(task.id) is None)
    assert store.refused == 2


class ProgressRefused(SQLiteStore):
    error: type[Exception] = StoreUnavailable

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        raise self.error("The task store is not available: no answer")


@pytest.mark.parametrize("error", [StoreUnavailable, RuntimeError])
def test_a_failing_progress_write_never_kills_the_handler(
    make_app: AppFactory, tmp_path: Path, error: type[Exception]
) -> None:
    store = ProgressRefused(str(tmp_path / "tasks.db"))
    store.error = error
    app, gates = gated_app(make_app, store)
    gates["a"]["go"].set()
    client = app.test_client()
    response = wait_done(client, submit(client, "/gated?gate=a"))
    assert response.status_code == 200, response.get_data()
    assert response.json == {"gate": "a", "done": True}


# -- coalescing ------------------------------------------------------------------------


class CountingProgress(SQLiteStore):
    """Counts progress writes, and notes what each wrote."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.written: list[Progress] = []

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        self.written.append(progress)
        return super().set_progress(task_id, progress)


class Rows(AsyncResource):
    """Reports progress per row for ``?seconds=S``, then waits for its gate."""

    def post(self) -> dict[str, t.Any]:
        gates = current_app.config["GATES"]
        deadline = time.monotonic() + float(request.args["seconds"])
        row = 0
        while time.monotonic() < deadline:
            row += 1
            current_task.progress(row, message="rows")
        gates["reported"]["row"] = row
        gates["reported"]["event"].set()
        assert gates["go"].wait(20)
        return {"rows": row}


def test_progress_is_coalesced_and_the_latest_lands_without_another_call(
    make_app: AppFactory, tmp_path: Path
) -> None:
    store = CountingProgress(str(tmp_path / "tasks.db"))
    gates: dict[str, t.Any] = {"reported": {"event": threading.Event()}, "go": threading.Event()}
    app, api = make_app(
        store=store, config={"GATES": gates, "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0.25}
    )
    api.add_resource(Rows, "/rows")
    client = app.test_client()
    location = submit(client, "/rows?seconds=1.0")
    task_id = location.rsplit("/", 1)[1]
    try:
        assert gates["reported"]["event"].wait(10)
        reported_at = time.monotonic()
        last = gates["reported"]["row"]
        assert last > 1000, "the loop should report far more often than it writes"
        # 1 s at one write per 0.25 s: 4 or 5, plus the first at once.
        assert len(store.written) <= 6, len(store.written)

        def landed() -> bool:
            task = store.get(task_id)
            return task is not None and task.progress == Progress(last, None, "rows")

        wait_for(landed, timeout=1.0)
        assert time.monotonic() - reported_at < 1.0
        assert len(store.written) <= 7
    finally:
        gates["go"].set()
    response = wait_done(client, location)
    assert response.status_code == 200
    assert response.json == {"rows": last}


class Twice(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        current_task.progress(1, total=2)
        current_task.progress(2, total=2, message="last")
        return {"ok": True}


def test_the_latest_progress_is_written_before_the_outcome(
    make_app: AppFactory, tmp_path: Path
) -> None:
    store = CountingProgress(str(tmp_path / "tasks.db"))
    # An interval far longer than the task: only the finish can flush the report.
    app, api = make_app(store=store, config={"RESTFUL_ASYNC_PROGRESS_INTERVAL": 60})
    api.add_resource(Twice, "/twice")
    client = app.test_client()
    location = submit(client, "/twice")
    assert wait_done(client, location).status_code == 200
    task = store.get(location.rsplit("/", 1)[1])
    assert task is not None
    assert task.state is TaskState.SUCCEEDED
    assert task.progress == Progress(2, 2, "last")
    assert store.written == [Progress(1, 2, None), Progress(2, 2, "last")]


def test_outcomes_still_waiting_at_close_make_their_tasks_lost(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """A process that stops with an outcome unwritten releases its lease: the task
    reads lost, not running."""
    store = FinishRefused(str(tmp_path / "tasks.db"))
    store.refused = set()
    app, gates = gated_app(make_app, store, RESTFUL_ASYNC_LEASE=30)
    client = app.test_client()
    location = submit(client, "/gated?gate=a")
    assert gates["a"]["started"].wait(10)
    task_id = location.rsplit("/", 1)[1]
    store.refused.add(task_id)
    gates["a"]["go"].set()
    wait_for(lambda: _outbox_holds(store, task_id))
    get_state(app).close()
    box = outbox.existing_outbox(store)
    assert box is not None
    assert len(box) == 0, "released: nothing left to retry"
    reader = SQLiteStore(str(tmp_path / "tasks.db"))
    try:
        task = reader.get(task_id)
        assert task is not None
        assert task.state is TaskState.LOST
    finally:
        reader.close()


def test_the_outbox_keeps_a_bounded_number_of_response_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the bound, the oldest waiting outcomes lose their response: they end
    lost, the newer ones as they ended."""
    monkeypatch.setattr(outbox, "MAX_BYTES", 100)
    store = FinishRefused(str(tmp_path / "tasks.db"))
    store.refused = set()
    store.renew_lease("w")
    ids = []
    for _ in range(3):
        task = store.create(Task(id=new_task_id()))
        assert store.start(task.id, "w") is not None
        store.refused.add(task.id)
        ids.append(task.id)
    box = outbox.outbox_for(store)
    logger = logging.getLogger(__name__)
    for task_id in ids:
        outbox.finish(
            store, task_id, TaskState.SUCCEEDED, StoredResponse(200, [], b"x" * 40), "w", logger
        )
    assert len(box) == 3
    store.refused.clear()
    wait_for(lambda: len(box) == 0)
    states = [store.get(task_id) for task_id in ids]
    assert [task.state if task else None for task in states] == [
        TaskState.LOST,
        TaskState.SUCCEEDED,
        TaskState.SUCCEEDED,
    ]
    store.close()


def _outbox_holds(store: TaskStore, task_id: str) -> bool:
    found = outbox.existing_outbox(store)
    return found is not None and len(found) == 1


@pytest.mark.parametrize("interval", [-1, "half", None, True, float("inf")])
def test_a_wrong_progress_interval_is_refused_at_setup(
    make_app: AppFactory, interval: object
) -> None:
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_PROGRESS_INTERVAL must be"):
        make_app(config={"RESTFUL_ASYNC_PROGRESS_INTERVAL": interval})


def in_request_app(make_app: AppFactory, outage: Outage) -> tuple[t.Any, dict]:
    """A gated app whose ``Prefer: wait`` submits run their task in the request
    thread: its run time is known to be short."""
    app, gates = gated_app(
        make_app,
        outage.store,
        RESTFUL_ASYNC_LEASE=4,
        RESTFUL_ASYNC_SHORT_WAIT=5,
        RESTFUL_ASYNC_SHORT_IN_REQUEST=True,
    )
    get_state(app).run_times.record("gated", "post", 0.01)
    return app, gates


def test_a_task_run_in_its_request_thread_keeps_its_promise_through_an_outage(
    make_app: AppFactory, outage: Outage
) -> None:
    """A short ``Prefer: wait`` task runs in the request thread (see
    test_short_in_request); one with an idempotency key is recorded as running
    before it runs. It ends while the store is down: its outcome waits in the
    outbox, and the submit, still within its wait, answers with it once the store
    is back and has taken it. A keyed submit made while the store is down gets
    503, and leaves the request-thread slot free."""
    app, gates = in_request_app(make_app, outage)
    state = get_state(app)
    answers = []
    keyed = {"Prefer": "wait=10", "Idempotency-Key": "a"}
    here = threading.Thread(
        target=lambda: answers.append(app.test_client().post("/gated?gate=a", headers=keyed))
    )
    here.start()
    assert gates["a"]["started"].wait(10)
    outage.down()
    try:
        refused = app.test_client().post(
            "/gated?gate=b", headers={"Prefer": "wait=10", "Idempotency-Key": "b"}
        )
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert not gates["b"]["started"].is_set()
        gates["a"]["go"].set()
        wait_for(lambda: len(outbox.existing_outbox(state.store) or ()) == 1)
    finally:
        outage.up()
    here.join(15)
    (answer,) = answers
    assert answer.status_code == 200, answer.get_data()
    assert answer.json == {"gate": "a", "done": True}
    assert answer.headers["Preference-Applied"] == "wait=10"
    assert state.executor.acquire_now()
    state.executor.release_now()


def test_a_task_written_as_it_ends_answers_its_client_through_an_outage(
    make_app: AppFactory, outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a key, a task run in its request thread is written to the store only
    as it ends (no one can learn its id before): it needs no store to run, so a
    submit made while the store is down runs too. Each client gets the handler's
    answer; what the store did not take is missing from the task lists (logged),
    and nothing half-written is left behind."""
    app, gates = in_request_app(make_app, outage)
    state = get_state(app)
    answers: dict[str, t.Any] = {}
    wait = {"Prefer": "wait=10"}

    def call(name: str) -> None:
        answers[name] = app.test_client().post(f"/gated?gate={name}", headers=wait)

    here = threading.Thread(target=call, args=("a",))
    here.start()
    assert gates["a"]["started"].wait(10)
    outage.down()
    try:
        during = threading.Thread(target=call, args=("b",))
        during.start()
        assert gates["b"]["started"].wait(10)  # it runs: nothing to write first
        gates["a"]["go"].set()
        gates["b"]["go"].set()
        here.join(15)
        during.join(15)
        # The store cannot have them: nothing waits for it (the outbox's room and
        # its giving up of worker names are for the tasks it holds).
        assert len(outbox.existing_outbox(state.store) or ()) == 0
    finally:
        outage.up()
    for name in ("a", "b"):
        assert answers[name].status_code == 200, answers[name].get_data()
        assert answers[name].json == {"gate": name, "done": True}
    assert state.store.list(owner=None, limit=10) == []
    assert caplog.text.count("did not take its record") == 2
    assert state.executor.acquire_now()
    state.executor.release_now()


class Quick(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return {"done": True, "thread": threading.get_ident()}


def test_a_store_that_stalls_does_not_turn_tasks_run_in_the_request_away(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """A store that stalls (here a SQLite file another connection holds locked,
    waited for up to its busy timeout) makes each such run's final write last
    that long. Counted in the run-time estimate, it made the endpoint look slow
    after a few: the next submits went through the store, and answered 503."""
    path = tmp_path / "tasks.db"
    store = SQLiteStore(str(path), timeout=0.6)
    config = {"RESTFUL_ASYNC_SHORT_WAIT": 0.2, "RESTFUL_ASYNC_SHORT_IN_REQUEST": True}
    app, api = make_app(store=store, config=config)
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    assert client.get("/tasks/" + "a" * 22).status_code == 404  # the file, the lease
    get_state(app).run_times.record("quick", "post", 0.01)
    wait = {"Prefer": "wait=5"}
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        codes = [client.post("/quick", headers=wait).status_code for _ in range(4)]
        # Nor while one waits in its final write, longer than the short wait: it
        # counted as a run still under way.
        first: list[int] = []
        writing = threading.Thread(
            target=lambda: first.append(app.test_client().post("/quick", headers=wait).status_code)
        )
        writing.start()
        time.sleep(0.35)
        codes.append(client.post("/quick", headers=wait).status_code)
        writing.join(10)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert codes == [200] * 5
    assert first == [200]
    estimate = get_state(app).run_times.estimate("quick", "post")
    assert estimate is not None
    assert estimate < 0.2


def test_a_submit_whose_create_reply_is_lost_leaves_no_task(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis ran the create, its reply was cut: the submit answers 503, and the
    task it wrote is taken back once Redis answers (it waited, held by this
    process, until it read lost a day later). A keyed one is queued for any
    process instead, and runs once: a repeat may have been given its Location.
    One recorded running, to run in the request thread, is taken back too."""
    pytest.importorskip("redis")
    require_redis()
    import redis

    from flask_restful_async.stores.redis import RedisStore

    prefix = f"{{outage-{new_task_id()}}}:"
    url = "redis://127.0.0.1:6379/12"
    with ReplyCutter(6379) as cutter:
        through = RedisStore(f"redis://127.0.0.1:{cutter.port}/12", prefix=prefix)
        direct = RedisStore(url, prefix=prefix)
        config = {"RESTFUL_ASYNC_LEASE": 3, "RESTFUL_ASYNC_SHORT_WAIT": 5}
        app, api = make_app(store=through, config=config)
        try:
            api.add_resource(Quick, "/quick")
            client = app.test_client()
            done = wait_done(client, submit(client, "/quick"))
            assert done.status_code == 200
            # Its run time is recorded just after its outcome: known, a Prefer:
            # wait submit runs in its request thread.
            wait_for(lambda: get_state(app).run_times.estimate("quick", "post") is not None)
            here = client.post("/quick", headers={"Prefer": "wait=5"})
            assert here.json == {"done": True, "thread": threading.get_ident()}  # in-request
            # In the request thread: with a key, recorded running before it runs
            # (without one it is written only as it ends, and needs no create).
            in_request = {"Prefer": "wait=5", "Idempotency-Key": "p"}
            for headers in ({}, in_request, {"Idempotency-Key": "k"}):
                assert through.get(new_task_id()) is None  # connected
                cutter.cutting = True
                response = client.post("/quick", headers=headers)
                cutter.cutting = False
                assert response.status_code == 503, (headers, response.get_data())
                assert response.headers["Retry-After"] == "1"
            # The keyed one; the one for the request thread, which has no copy of
            # its request for another process to run it: lost, its key let go;
            # here, done.
            ended = [TaskState.SUCCEEDED, TaskState.LOST, TaskState.SUCCEEDED, TaskState.SUCCEEDED]
            states = lambda: [task.state for task in direct.list(owner=None)]  # noqa: E731
            wait_for(lambda: states() == ended)
            keyed = direct.list(owner=None)[0]  # newest first
            assert keyed.idempotency_key is not None
            again = client.post("/quick", headers={"Idempotency-Key": "k"})
            assert again.status_code == 202
            assert again.headers["Location"].endswith(keyed.id)
            assert "is taken back once the store answers" in caplog.text
        finally:
            get_state(app).close()
            direct.close()
            with redis.Redis.from_url(url) as raw:
                keys = list(raw.scan_iter(match=f"{prefix}*"))
                if keys:
                    raw.delete(*keys)


class MaintainRefused(SQLiteStore):
    """A store whose housekeeping fails every time; counts the looks for tasks to
    take over."""

    claims = 0

    def maintain(self) -> None:
        raise RuntimeError("the purge is refused")

    def claim(self, worker: str, limit: int) -> t.Any:
        self.claims += 1
        return super().claim(worker, limit)


def test_housekeeping_that_fails_stops_neither_takeover_nor_renewal(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It did both: the look for tasks to take over came only after housekeeping,
    # and its failure passed for a failed renewal (renewed every half second,
    # logged as failing and working again at each).
    store = MaintainRefused(str(tmp_path / "tasks.db"))
    app, api = make_app(store=store, config={"RESTFUL_ASYNC_LEASE": 1})
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    assert wait_done(client, submit(client, "/quick")).status_code == 200  # the lease runs
    looks = store.claims
    wait_for(lambda: store.claims >= looks + 3, timeout=5)  # one per third of a lease
    assert caplog.text.count("housekeeping failed") == 1
    assert "Could not renew the task lease" not in caplog.text


class Unreachable(MemoryStore):
    """Takes leases, but neither an outcome nor a withdrawal: down for those."""

    def finish(self, task_id: str, state: TaskState, response: t.Any = None) -> t.Any:
        raise self.unavailable("down", "no answer")

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        raise self.unavailable("down", "no answer")


def test_what_a_process_leaves_unwritten_at_exit_is_logged_for_what_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A withdrawal left behind is no lost task: the task its 503 refused may run.
    # The log said "those tasks read as lost" of both kinds alike.
    monkeypatch.setattr(lease, "EXIT_DRAIN_TIMEOUT", 0.2)
    store = Unreachable()
    app = Flask(__name__)
    keeper = lease.LeaseKeeper(app, store)
    keeper.ensure()
    refused = store.create(Task(id=new_task_id(), worker="w"), b"snapshot")
    running = store.create(Task(id=new_task_id(), worker="w"))
    assert store.start(running.id, "w") is not None
    logger = logging.getLogger("test.exit")
    outbox.withdraw(store, refused.id, logger, now=False)
    outbox.finish(
        store, running.id, TaskState.SUCCEEDED, StoredResponse(200, [], b"{}"), "w", logger
    )
    keeper.release()
    assert "1 task outcomes could not be stored before exit" in caplog.text
    assert (
        f"Task {refused.id}, whose submit was answered 503, could not be taken back before exit"
        in caplog.text
    )
    assert len(outbox.outbox_for(store)) == 0


def test_a_task_started_as_the_store_comes_back_does_not_read_lost(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """An outage longer than the lease's hold leaves this process's lease lapsed in
    the store. A task that starts once the store answers, before the renewal
    thread's next try, runs under the renewed lease: a poll in between must not
    find it under a lapsed one and record it lost while its handler runs."""
    outage = SQLiteLocked(tmp_path / "tasks.db")
    app, gates = gated_app(make_app, outage.store)
    client = app.test_client()
    submit(client, "/gated?gate=a")
    assert gates["a"]["started"].wait(10)
    second = submit(client, "/gated?gate=b")  # waits for the one task thread
    outage.down()
    time.sleep(outage.store.lease_hold + 0.5)
    outage.up()
    gates["a"]["go"].set()  # the thread is free: it starts the second task
    assert gates["b"]["started"].wait(10)
    response = client.get(second)
    assert response.status_code == 202, response.get_data()
    assert response.json["state"] == "running"
    gates["b"]["go"].set()
    assert wait_done(client, second).status_code == 200


def test_a_redis_store_past_its_maxmemory_answers_503_and_keeps_every_outcome(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past maxmemory (noeviction), Redis refuses every write with an error reply:
    a submit answers 503 with Retry-After (it answered 500), a request that needs
    no task is served (the lease taken at a process's first request made every
    route 500), and an outcome refused meanwhile lands once Redis takes writes."""
    require_redis()
    import redis

    from flask_restful_async.stores.redis import RedisStore

    port = free_port()
    with redis_server(port, tmp_path):
        server = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        app, gates = gated_app(make_app, RedisStore(f"redis://127.0.0.1:{port}/0"))
        app.add_url_rule("/ping", "ping", lambda: "pong")
        client = app.test_client()
        server.config_set("maxmemory-policy", "noeviction")
        server.config_set("maxmemory", 1)
        try:
            assert client.get("/ping").status_code == 200  # this process's first request
            for headers in ({}, {"Idempotency-Key": "k"}, {"Prefer": "wait=2"}):
                refused = client.post("/gated?gate=a", headers=headers)
                assert refused.status_code == 503, refused.get_data()
                assert refused.headers["Retry-After"] == "1"
                assert refused.json == {"message": MESSAGE}
            server.config_set("maxmemory", 0)
            location = submit(client, "/gated?gate=a")
            assert gates["a"]["started"].wait(10)
            server.config_set("maxmemory", 1)
            with caplog.at_level(logging.ERROR):
                gates["a"]["go"].set()  # its outcome comes while Redis refuses writes
                wait_for(lambda: "The store refused the outcome of task" in caplog.text)
            server.config_set("maxmemory", 0)
            response = wait_done(client, location)
            assert response.status_code == 200, response.get_data()
            assert response.json == {"gate": "a", "done": True}
            store = get_state(app).store
            assert [task.state for task in store.list(owner=None)] == [TaskState.SUCCEEDED]
        finally:
            server.config_set("maxmemory", 0)
            server.close()


def test_submits_that_renew_the_lease_in_an_outage_each_fail_in_the_stores_time(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """A lease a lease old is renewed by the submit itself: while the store stays
    down, the submits at once each get their 503 in the store's timeout, not one
    timeout after another (they queued on the keeper's lock)."""
    path = tmp_path / "tasks.db"
    app, _ = gated_app(make_app, SQLiteStore(str(path), timeout=0.3))
    client = app.test_client()
    client.get("/tasks")  # a first request: the lease is taken
    keeper = get_state(app).lease
    assert keeper is not None
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    keeper._live_until = -math.inf  # as after a lease with no renewal through
    answers: list[tuple[int, float]] = []

    def post() -> None:
        started = time.monotonic()
        status = app.test_client().post("/gated?gate=a").status_code
        answers.append((status, time.monotonic() - started))

    try:
        run_at_once(post, 8)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [status for status, _ in answers] == [503] * 8
    assert max(took for _, took in answers) < 1.2, answers  # one after another: 2.4 s


class RenewalReplyLost(SQLiteStore):
    """A renewal that went through, its reply lost (a doubtful outage)."""

    lost = False

    def renew_lease(self, worker: str) -> None:
        super().renew_lease(worker)
        if self.lost:
            raise StoreUnavailable("The task store is not available", doubtful=True)


def test_a_submit_whose_lease_renewal_lost_its_reply_takes_back_no_task(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """The renewal comes before the task's write: a 503 of its lost reply wrote no
    task, and nothing is to be taken back (a withdrawal waits until the store
    answers, and at exit is logged as a task that may run)."""
    store = RenewalReplyLost(str(tmp_path / "tasks.db"))
    app, _ = gated_app(make_app, store)
    client = app.test_client()
    client.get("/tasks")
    keeper = get_state(app).lease
    assert keeper is not None
    store.lost = True
    keeper._live_until = -math.inf
    assert client.post("/gated?gate=a").status_code == 503
    found = outbox.existing_outbox(store)
    assert found is None or found.withdrawals() == []
    assert store.list(owner=None) == []
