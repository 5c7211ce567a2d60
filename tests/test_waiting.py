"""Long-polling (flask_restful_async.waiting): a wait ends promptly when its task
finishes, in this process or another one, and costs nothing while it blocks.

Redis variants use database :data:`REDIS_DB` of the Redis on 127.0.0.1:6379, each
test under a key prefix of its own whose keys are deleted afterwards (the
database is never flushed); tests that stop a server run a redis-server of their
own on a free loopback port. Cross-process latencies are printed (``pytest -s``)
as ``median`` and ``max`` over the trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
import typing as t
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flask_restful_async import MemoryStore, Task, TaskState, TaskStore, waiting
from flask_restful_async.stores import SQLiteStore
from flask_restful_async.task import StoredResponse, new_task_id
from flask_restful_async.waiting import Waiters, notify, wait_finished, waiters_for

from .services import (
    REDIS_HOST,
    REDIS_PORT,
    free_port,
    redis_server,
    require_redis,
)

#: The Redis database these tests use (one of services.REDIS_TEST_DBS).
REDIS_DB = 12
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
ROOT = Path(__file__).resolve().parent.parent
WORKER = f"waiting-test:{os.getpid()}"
#: A wait must end at most this long after its task finished in another process.
CROSS_PROCESS_BOUND = 0.100
TRIALS = 10


# -- stores ----------------------------------------------------------------------------


@dataclasses.dataclass
class Made:
    """A store of the test's own, and how to open the same tasks again: another
    store object here (``another()``), or in a child process (``child_args``)."""

    kind: str
    store: TaskStore
    where: str = ""
    prefix: str = ""
    others: list[TaskStore] = dataclasses.field(default_factory=list)

    def another(self) -> TaskStore:
        if self.kind == "sqlite":
            other: TaskStore = SQLiteStore(self.where)
        elif self.kind == "redis":
            from flask_restful_async.stores.redis import RedisStore

            other = RedisStore(self.where, prefix=self.prefix)
        else:
            raise AssertionError("a memory store cannot be opened twice")
        self.others.append(other)
        return other

    @property
    def child_args(self) -> list[str]:
        return [self.kind, self.where, self.prefix]


@contextlib.contextmanager
def made_store(kind: str, tmp_path: Path) -> Iterator[Made]:
    if kind == "memory":
        made = Made(kind, MemoryStore())
    elif kind == "sqlite":
        path = str(tmp_path / "tasks.db")
        made = Made(kind, SQLiteStore(path), path)
    else:
        require_redis()
        from flask_restful_async.stores.redis import RedisStore

        prefix = f"{{restful_async_wait_{secrets.token_hex(6)}}}:"
        made = Made(kind, RedisStore(REDIS_URL, prefix=prefix), REDIS_URL, prefix)
    try:
        yield made
    finally:
        waiting.close(made.store)
        for store in [made.store, *made.others]:
            store.close()
        if kind == "redis":
            import redis

            with redis.Redis.from_url(REDIS_URL) as client:
                keys = list(client.scan_iter(match=f"{made.prefix}*", count=1000))
                if keys:
                    client.delete(*keys)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Made]:
    with made_store(request.param, tmp_path) as made:
        yield made


@pytest.fixture(params=["sqlite", "redis"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Made]:
    """The stores that other processes see."""
    with made_store(request.param, tmp_path) as made:
        yield made


def running_task(store: TaskStore) -> Task:
    """A task that runs, as far as the store knows, in a living process."""
    store.renew_lease(WORKER)
    task = store.create(Task(id=new_task_id()))
    started = store.start(task.id, WORKER)
    assert started is not None
    return started


def count_reads(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], Callable[[str], Task | None]]:
    """Record the ids of the store's reads from now on; also the unrecorded read."""
    reads: list[str] = []
    get = store.get

    def counting_get(task_id: str) -> Task | None:
        reads.append(task_id)
        return get(task_id)

    monkeypatch.setattr(store, "get", counting_get)
    return reads, get


def later(delay: float, *actions: Callable[[], object]) -> threading.Thread:
    """Run ``actions`` one after the other in a thread, ``delay`` seconds from now."""

    def run() -> None:
        time.sleep(delay)
        for action in actions:
            action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def listening(waiters: Waiters) -> bool:
    # a call, not the property: mypy would narrow the property after an assert
    return waiters.listening


def listener_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "restful-async-waiters"}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


# -- in this process ---------------------------------------------------------------------


def test_a_wait_ends_when_another_thread_finishes_the_task_and_notifies(made: Made) -> None:
    store = made.store
    task = running_task(store)
    finished_at: list[float] = []

    def finish() -> None:
        store.finish(task.id, TaskState.SUCCEEDED)
        finished_at.append(time.time())
        notify(store, task.id)

    finishing = later(0.2, finish)
    started = time.monotonic()
    got = wait_finished(store, task.id, 5)
    woke = time.time()
    finishing.join(5)
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    assert 0.15 < time.monotonic() - started < 1
    assert woke - finished_at[0] < 0.05


def test_a_wait_without_news_ends_at_its_timeout_with_the_task_still_running(
    made: Made,
) -> None:
    task = running_task(made.store)
    started = time.monotonic()
    got = wait_finished(made.store, task.id, 0.5)
    elapsed = time.monotonic() - started
    assert got is not None
    assert got.state is TaskState.RUNNING
    assert 0.5 <= elapsed < 0.75


def test_nothing_to_wait_for_answers_at_once(made: Made) -> None:
    store = made.store
    done = running_task(store)
    store.finish(done.id, TaskState.FAILED)
    running = running_task(store)
    started = time.monotonic()
    got = wait_finished(store, done.id, 5)
    assert got is not None
    assert got.state is TaskState.FAILED
    assert wait_finished(store, new_task_id(), 5) is None
    got = wait_finished(store, running.id, 0)
    assert got is not None
    assert got.state is TaskState.RUNNING
    assert time.monotonic() - started < 0.2
    # none of these had to block, so no listener was started for them
    assert not listening(waiters_for(store))


def test_news_of_another_task_does_not_end_a_wait(made: Made) -> None:
    store = made.store
    task, other = running_task(store), running_task(store)

    def finish_other() -> None:
        store.finish(other.id, TaskState.SUCCEEDED)
        notify(store, other.id)

    later(0.1, finish_other)
    later(0.2, lambda: notify(store, new_task_id()))
    started = time.monotonic()
    got = wait_finished(store, task.id, 0.6)
    assert got is not None
    assert got.state is TaskState.RUNNING
    assert time.monotonic() - started >= 0.6


def test_a_blocked_wait_reads_nothing_and_holds_no_connection(
    made: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = made.store
    task = running_task(store)
    reads = []
    get = store.get

    def counting_get(task_id: str) -> Task | None:
        reads.append(time.monotonic())
        return get(task_id)

    monkeypatch.setattr(store, "get", counting_get)
    waiter = later(0, lambda: wait_finished(store, task.id, 1.0))
    wait_until(lambda: waiters_for(store).waiting == 1)
    time.sleep(0.5)  # blocked by now
    if isinstance(store, SQLiteStore):
        # the waiter's connection (one per thread, kept) has no transaction open
        assert not any(conn.in_transaction for conn in store._connections)
    elif made.kind == "redis":
        # the request thread holds none of the pool's connections (the listener
        # holds one, its subscription; the scripts' free ones wait for a call)
        pool = store._client.connection_pool  # type: ignore[attr-defined]
        assert len(pool._in_use_connections) == 1 + store._lane.free  # type: ignore[attr-defined]
    waiter.join(5)
    assert not waiter.is_alive()
    # one read before blocking, one more when the listener started; nothing else
    assert 1 <= len(reads) <= 3, reads


def test_a_read_made_after_a_ticket_is_not_made_again(
    made: Made, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = made.store
    task = running_task(store)
    waiters = waiters_for(store)
    # the listener (of a shared store) runs already, so that its start is no news
    warm = running_task(store)
    warming = later(0, lambda: wait_finished(store, warm.id, 5))
    wait_until(lambda: waiters.waiting == 1 and (listening(waiters) or not store.shared))
    store.finish(warm.id, TaskState.SUCCEEDED)
    notify(store, warm.id)
    warming.join(5)
    time.sleep(0.1)  # the listener's own notice of that finish has come in

    reads, _ = count_reads(store, monkeypatch)
    ticket = waiting.ticket(store)
    as_read = store.get(task.id)
    later(0.2, lambda: (store.finish(task.id, TaskState.SUCCEEDED), notify(store, task.id)))
    got = wait_finished(store, task.id, 5, read=(ticket, as_read))
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    # the caller's read, then one after the finish: none at the start of the wait
    assert reads.count(task.id) == 2


def test_news_between_a_ticket_and_the_wait_is_not_missed(made: Made) -> None:
    store = made.store
    task = running_task(store)
    ticket = waiting.ticket(store)
    as_read = store.get(task.id)
    store.finish(task.id, TaskState.SUCCEEDED)
    notify(store, task.id)
    started = time.monotonic()
    got = wait_finished(store, task.id, 5, read=(ticket, as_read))
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    assert time.monotonic() - started < 0.5


def test_fifty_waits_on_fifty_tasks_each_end_with_their_own(made: Made) -> None:
    store = made.store
    count = 50
    tasks = [running_task(store) for _ in range(count)]
    results: dict[str, tuple[Task | None, float]] = {}

    def wait(task_id: str) -> None:
        results[task_id] = (wait_finished(store, task_id, 20), time.time())

    threads = [threading.Thread(target=wait, args=(task.id,)) for task in tasks]
    for thread in threads:
        thread.start()
    wait_until(lambda: waiters_for(store).waiting == count)
    order = [task.id for task in tasks]
    random.shuffle(order)
    finished_at: dict[str, float] = {}
    states = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
    for i, task_id in enumerate(order):
        store.finish(task_id, states[i % 3])
        finished_at[task_id] = time.time()
        if made.kind == "memory":  # the shared stores tell by themselves
            notify(store, task_id)
        time.sleep(0.002)
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    lags = []
    for i, task_id in enumerate(order):
        got, woke = results[task_id]
        assert got is not None
        assert got.id == task_id
        assert got.state is states[i % 3]
        lags.append(woke - finished_at[task_id])
    print(f"\n{made.kind}: {count} waits, lag median {statistics.median(lags) * 1000:.1f} ms,"
          f" max {max(lags) * 1000:.1f} ms")  # fmt: skip
    assert max(lags) < 0.5


def test_the_memory_store_needs_no_listener() -> None:
    store = MemoryStore()
    task = running_task(store)
    before = listener_threads()
    later(0.1, lambda: store.finish(task.id, TaskState.SUCCEEDED), lambda: notify(store, task.id))
    got = wait_finished(store, task.id, 5)
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    assert listener_threads() == before
    assert not listening(waiters_for(store))


def test_the_listener_stops_when_idle_or_closed_and_starts_again(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    waiters = Waiters(store, linger=0.2)
    try:
        task = running_task(store)
        before = listener_threads()
        assert waiters.wait_finished(task.id, 0.05) is not None
        assert listening(waiters)
        (first,) = listener_threads() - before
        first.join(2)  # nobody waits: it stops after linger
        assert not first.is_alive()
        assert not listening(waiters)
        # the next wait starts another, and close() stops it at once
        assert waiters.wait_finished(task.id, 0.05) is not None
        (second,) = listener_threads() - before
        waiters.close()
        assert not second.is_alive()
        assert not listening(waiters)
        # and a wait after close() is served as before
        later(0.1, lambda: store.finish(task.id, TaskState.SUCCEEDED))
        got = waiters.wait_finished(task.id, 5)
        assert got is not None
        assert got.state is TaskState.SUCCEEDED
    finally:
        waiters.close()
        store.close()


def test_a_cancel_through_another_connection_ends_a_wait(shared: Made) -> None:
    store = shared.store
    task = store.create(Task(id=new_task_id()))  # queued: a cancel ends it
    cancelled_at: list[float] = []
    other = shared.another()

    def cancel() -> None:
        other.request_cancel(task.id)
        cancelled_at.append(time.time())

    canceller = later(0.2, cancel)
    got = wait_finished(store, task.id, 5)
    woke = time.time()
    canceller.join(5)
    assert got is not None
    assert got.state is TaskState.CANCELLED
    assert woke - cancelled_at[0] < CROSS_PROCESS_BOUND


@pytest.mark.parametrize("size", [100, 10_000])
def test_a_redis_finish_announces_a_small_response_with_its_id(
    tmp_path: Path, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flask_restful_async.stores.redis import ANNOUNCED_RESPONSE_MAX

    with made_store("redis", tmp_path) as made:
        store, other = made.store, made.another()
        other.renew_lease(WORKER)
        task = other.create(Task(id=new_task_id(), owner="alice"))
        started = other.start(task.id, WORKER)
        assert started is not None
        response = StoredResponse(201, [("Content-Type", "text/plain"), ("X-A", "b")], b"x" * size)
        reads, get = count_reads(store, monkeypatch)
        finishing = later(0.3, lambda: other.finish(task.id, TaskState.SUCCEEDED, response))
        got = wait_finished(store, task.id, 5)
        finishing.join(5)
        assert got == get(task.id)  # as a read gives it, to the last field
        assert got is not None
        assert got.response == response
        assert got.owner == "alice"
        # the first read, one when the listener came up; one more for a large body
        announced = size <= ANNOUNCED_RESPONSE_MAX
        assert reads.count(task.id) == (2 if announced else 3)


@pytest.mark.parametrize(
    "data",
    [b"\0", b"id\0succeeded\0", b"id\0nope\0" + b"1.0\x00200\x00[]\x00", b"a\0b\0c\0d\0e\0f"],
)
def test_a_garbled_announcement_is_news_of_some_task(data: bytes) -> None:
    from flask_restful_async.stores.redis import _announce

    calls: list[tuple[str | None, object]] = []
    _announce(lambda task_id, ending=None: calls.append((task_id, ending)), data)
    assert calls == [(None, None)]


def test_an_ending_announced_before_a_wait_spares_its_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flask_restful_async.stores.base import Ending

    store = MemoryStore()
    waiters = Waiters(store, remembered=2)
    task = running_task(store)
    ticket = waiters.ticket()
    response = StoredResponse(200, [("Content-Type", "text/plain")], b"done")
    store.finish(task.id, TaskState.SUCCEEDED, response)
    finished = store.get(task.id)
    assert finished is not None
    assert finished.finished_at is not None
    waiters.notify(task.id, Ending(TaskState.SUCCEEDED, finished.finished_at, response))
    reads, _ = count_reads(store, monkeypatch)
    got = waiters.wait_finished(task.id, 5, read=(ticket, task))
    assert got == finished
    assert reads == []
    # a later notice without an ending makes the next wait read again
    waiters.notify(task.id)
    assert waiters.wait_finished(task.id, 5, read=(ticket, task)) == finished
    assert reads == [task.id]
    # and only the last `remembered` endings are kept
    ending = Ending(TaskState.SUCCEEDED, finished.finished_at, response)
    for other in ("a", "b", task.id):
        waiters.notify(other, ending)
    waiters.notify("c", ending)
    reads.clear()
    waiters.wait_finished(task.id, 5, read=(ticket, task))
    assert reads == []
    waiters.notify("d", ending)
    waiters.notify("e", ending)
    waiters.wait_finished(task.id, 5, read=(ticket, task))
    assert reads == [task.id]


def test_news_of_other_tasks_since_a_ticket_costs_no_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flask_restful_async.stores.base import Ending

    store = MemoryStore()
    waiters = Waiters(store)
    task = running_task(store)
    ticket = waiters.ticket()
    for other in ("a", "b", "c"):
        waiters.notify(other)
    reads, _ = count_reads(store, monkeypatch)
    response = StoredResponse(200, [], b"done")
    ending = Ending(TaskState.SUCCEEDED, time.time(), response)
    ender = later(0.05, lambda: waiters.notify(task.id, ending))
    got = waiters.wait_finished(task.id, 5, read=(ticket, task))
    ender.join(5)
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    assert reads == []  # nothing read: not at the start, not at the end


@pytest.mark.parametrize("news", ["all", "forgotten"])
def test_news_that_may_concern_a_task_since_its_ticket_is_read(
    news: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiting, "REMEMBERED_NEWS", 2)
    store = MemoryStore()
    waiters = Waiters(store)
    task = running_task(store)
    ticket = waiters.ticket()
    store.finish(task.id, TaskState.SUCCEEDED)
    if news == "all":
        waiters.notify(None)
    else:
        # news of this very task, then more than are remembered of others
        waiters.notify(task.id)
        for other in ("a", "b"):
            waiters.notify(other)
    reads, _ = count_reads(store, monkeypatch)
    got = waiters.wait_finished(task.id, 5, read=(ticket, task))
    assert got is not None
    assert got.state is TaskState.SUCCEEDED
    assert reads == [task.id]


def test_a_wait_that_does_not_listen_hears_only_of_its_own_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "deaf.db"))
    try:
        waiters = Waiters(store)
        task = running_task(store)
        reads, _ = count_reads(store, monkeypatch)
        # news of every task (as SQLite's listener gives it) does not wake it;
        # news of its own task does
        ender = later(
            0.1,
            lambda: waiters.notify(None),
            lambda: store.finish(task.id, TaskState.SUCCEEDED),
            lambda: waiters.notify(task.id),
        )
        got = waiters.wait_finished(task.id, 5, read=(waiters.ticket(), task), listen=False)
        ender.join(5)
        assert got is not None
        assert got.state is TaskState.SUCCEEDED
        assert reads == [task.id]
        assert not waiters.listening  # a shared store, but nothing listened
    finally:
        waiters.close()
        store.close()


# -- across processes --------------------------------------------------------------------

# argv: kind, where, prefix. Reads "<task id> <delay>" lines, finishes each task
# after the delay, and prints time.time() just after the store said it was done.
_FINISHER = """\
import sys, time
kind, where, prefix = sys.argv[1:4]
if kind == "sqlite":
    from flask_restful_async.stores.sqlite import SQLiteStore
    store = SQLiteStore(where)
else:
    from flask_restful_async.stores.redis import RedisStore
    store = RedisStore(where, prefix=prefix)
from flask_restful_async.task import TaskState
store.get("0" * 22)  # connected before the first trial
print("ready", flush=True)
for line in sys.stdin:
    task_id, delay = line.split()
    time.sleep(float(delay))
    store.finish(task_id, TaskState.SUCCEEDED)
    print(repr(time.time()), flush=True)
store.close()
"""


@contextlib.contextmanager
def finisher(made: Made) -> Iterator[subprocess.Popen[str]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", _FINISHER, *made.child_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == "ready\n"
        yield process
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()


def test_a_wait_ends_within_100ms_of_a_finish_in_another_process(shared: Made) -> None:
    store = shared.store
    lags = []
    before = listener_threads()
    with finisher(shared) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        for _ in range(TRIALS):
            task = running_task(store)
            child.stdin.write(f"{task.id} {random.uniform(0.1, 0.2):.3f}\n")
            child.stdin.flush()
            got = wait_finished(store, task.id, 5)
            woke = time.time()
            finished_at = float(child.stdout.readline())
            assert got is not None
            assert got.state is TaskState.SUCCEEDED
            lags.append(woke - finished_at)
    median, worst = statistics.median(lags), max(lags)
    print(f"\n{shared.kind}: cross-process wake-up over {TRIALS} trials:"
          f" median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")  # fmt: skip
    assert worst < CROSS_PROCESS_BOUND
    # one listener served all the trials, and closing stops it
    (listener,) = listener_threads() - before
    waiting.close(store)
    assert not listener.is_alive()
    assert not listening(waiters_for(store))


def test_a_forked_child_waits_with_a_listener_of_its_own(shared: Made) -> None:
    store = shared.store
    # the parent listens already: the child must not rely on that thread
    warm = running_task(store)
    waiters_for(store).wait_finished(warm.id, 0.05)
    assert listening(waiters_for(store))
    task = running_task(store)
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a process with threads; this child
        # only uses what the package resets after a fork.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        code = 1
        try:
            os.close(read_end)
            got = wait_finished(store, task.id, 5)
            woke = time.time()
            state = got.state.value if got is not None else "none"
            os.write(write_end, f"{state} {woke!r} {listening(waiters_for(store))}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        time.sleep(0.3)
        store.finish(task.id, TaskState.SUCCEEDED)
        finished_at = time.time()
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    state, child_woke, child_listening = report.split()
    assert state == "succeeded"
    assert child_listening == "True"
    assert float(child_woke) - finished_at < CROSS_PROCESS_BOUND
    # the parent's listener is unharmed
    assert listening(waiters_for(store))


# -- Redis going away, Redis ACLs ----------------------------------------------------------


def test_the_redis_listener_gets_over_a_restart(tmp_path: Path) -> None:
    import redis

    from flask_restful_async.stores.redis import RedisStore

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    store, other = RedisStore(url), RedisStore(url)
    waiters = Waiters(store, recheck=60)  # only a notification can end this wait
    results: list[Task | None] = []
    reads: list[str] = []
    get = store.get

    def counting_get(task_id: str) -> Task | None:
        reads.append(task_id)
        return get(task_id)

    store.get = counting_get  # type: ignore[method-assign]
    try:
        with redis_server(port, tmp_path) as server:
            task = running_task(store)
            waiter = later(0, lambda: results.append(waiters.wait_finished(task.id, 20)))
            # read once, then again when the listener said it had subscribed: only
            # now is the wait blocked (a read while Redis is down would raise)
            wait_until(lambda: len(reads) == 2)
            time.sleep(0.05)
            with redis.Redis(port=port) as raw, contextlib.suppress(redis.ConnectionError):
                raw.shutdown(save=True)
            server.wait(timeout=10)
        time.sleep(0.3)  # the listener finds nobody there
        with redis_server(port, tmp_path):
            restarted = time.time()
            other.finish(task.id, TaskState.SUCCEEDED)
            waiter.join(10)
            woke = time.time()
            assert results
            got = results[0]
            assert got is not None
            assert got.state is TaskState.SUCCEEDED
            # the listener subscribed again (with backoff of at most 2 s) and said
            # so, and the wait read the task again
            assert woke - restarted < 3
            assert listening(waiters)
            with redis.Redis(port=port) as raw:
                channel = f"{store.prefix}finished"
                wait_until(lambda: raw.pubsub_numsub(channel)[0][1] == 1)
    finally:
        waiters.close()
        store.close()
        other.close()


def test_a_redis_user_without_channel_rights_still_finishes_tasks(tmp_path: Path) -> None:
    import redis

    from flask_restful_async.stores.redis import RedisStore

    port = free_port()
    with redis_server(port, tmp_path), redis.Redis(port=port) as admin:
        admin.execute_command(
            "ACL", "SETUSER", "tasks", "on", ">pw", "~*", "+@all", "resetchannels"
        )
        store = RedisStore(f"redis://tasks:pw@127.0.0.1:{port}/0")
        try:
            task = running_task(store)
            # the script's PUBLISH is refused, the rest of it is not
            store.finish(task.id, TaskState.SUCCEEDED)
            got = store.get(task.id)
            assert got is not None
            assert got.state is TaskState.SUCCEEDED
            assert admin.ttl(f"{store.prefix}task:{task.id}") > 0
            # and a wait (no subscription allowed: only its own reads) still works
            second = running_task(store)
            later(
                0.1,
                lambda: store.finish(second.id, TaskState.FAILED),
                lambda: notify(store, second.id),
            )
            got = wait_finished(store, second.id, 5)
            assert got is not None
            assert got.state is TaskState.FAILED
        finally:
            waiters_for(store).close()
            store.close()


class ListensTheOldWay(SQLiteStore):
    """A custom store written before ``listen`` took ``changes=``."""

    def listen(self, on_change: t.Any, stop: t.Any) -> None:  # type: ignore[override]
        super().listen(on_change, stop)


def test_a_store_whose_listen_takes_no_changes_is_told_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class OldStore(SQLiteStore):
        def listen(self, on_change: t.Any, stop: t.Any) -> None:  # type: ignore[override]
            super().listen(on_change, stop)

    stores = [OldStore(str(tmp_path / "tasks.db")) for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="flask_restful_async.waiting"):
            # Each start of a listener asks again: the log says it once.
            assert not any([waiting._takes_changes(store) for store in stores * 2])
        assert caplog.text.count("OldStore.listen() takes no changes= keyword") == 1
    finally:
        for store in stores:
            store.close()


def test_a_store_whose_listen_takes_no_changes_still_wakes_waits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "tasks.db")
    store, other = ListensTheOldWay(path), SQLiteStore(path)
    waiters = Waiters(store)
    try:
        task = running_task(other)
        finished_at: list[float] = []

        def finish() -> None:
            other.finish(task.id, TaskState.SUCCEEDED)  # another connection: no notify
            finished_at.append(time.time())

        finisher = later(0.3, finish)
        got = waiters.wait_finished(task.id, 5)
        woke = time.time()
        finisher.join(5)
        assert got is not None
        assert got.state is TaskState.SUCCEEDED
        assert woke - finished_at[0] < CROSS_PROCESS_BOUND
        assert "Listening to" not in caplog.text
        assert "ListensTheOldWay.listen() takes no changes= keyword" in caplog.text
    finally:
        waiters.close()
        store.close()
        other.close()
