"""What only the Redis store does: key layout, atomic scripts under load, leases,
TTLs, and behaviour when Redis goes away and comes back.

The shared contract (tests/test_stores.py) runs against RedisStore too; these
tests add what it cannot see. They use database :data:`REDIS_DB` of the Redis on
127.0.0.1:6379 with a random key prefix per test, and delete only their own keys
(other test modules may use the same server at the same time). The outage test
runs a second redis-server of its own on a free loopback port.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import socket
import sys
import threading
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from flask_restful_async import Progress, Task, TaskState
from flask_restful_async.exceptions import StoreUnavailable
from flask_restful_async.stores import redis as redis_store_module
from flask_restful_async.stores.redis import LIST_SCAN, RELEASE_BATCH, RedisStore
from flask_restful_async.task import StoredResponse, new_task_id

from .services import (
    REDIS_HOST,
    REDIS_PORT,
    ReplyCutter,
    free_port,
    redis_server,
    require_redis,
)

#: The database these tests write to (one of services.REDIS_TEST_DBS); they never flush it.
REDIS_DB = 14
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
RESPONSE = StoredResponse(200, [("Content-Type", "application/json")], b'{"ok": true}\n')


def new_task(**fields: t.Any) -> Task:
    return Task(id=new_task_id(), **fields)


def new_prefix() -> str:
    return f"{{restful_async_test_{secrets.token_hex(6)}}}:"


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain client on the test database, to look behind the store's back."""
    require_redis()
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def prefixes(raw: redis.Redis) -> Iterator[Callable[[], str]]:
    """Hands out fresh key prefixes; deletes every key under them afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(new_prefix())
        return made[-1]

    yield make
    for prefix in made:
        keys = list(raw.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            raw.delete(*keys)


@pytest.fixture
def prefix(prefixes: Callable[[], str]) -> str:
    return prefixes()


@pytest.fixture
def store(prefix: str) -> Iterator[RedisStore]:
    made = RedisStore(REDIS_URL, prefix=prefix)
    made.configure(result_ttl=3600, tombstone_ttl=3600, lease=30)
    yield made
    made.close()


def keys_under(raw: redis.Redis, prefix: str) -> set[bytes]:
    return set(raw.scan_iter(match=f"{prefix}*", count=1000))


def join_all(threads: list[threading.Thread], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "threads did not finish in time"


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


# --- construction -------------------------------------------------------------


def test_url_leaves_the_password_out() -> None:
    cases = {
        "redis://user:secret@127.0.0.1:6379/14": "redis://user@127.0.0.1:6379/14",
        "redis://:secret@127.0.0.1:6379/14": "redis://127.0.0.1:6379/14",
        "rediss://127.0.0.1:6380/2": "rediss://127.0.0.1:6380/2",
        "unix:///tmp/redis.sock?db=3&password=secret": "unix:///tmp/redis.sock?db=3",
    }
    for url, shown in cases.items():
        made = RedisStore(url)  # connects lazily: no server needed
        assert made.url == shown
        assert made.shared
        made.close()


def test_an_unknown_url_parameter_is_refused_at_once() -> None:
    # redis-py would take it and fail at the first request, as a 500.
    with pytest.raises(ValueError, match="prefix=") as refused:
        RedisStore("redis://:secret@127.0.0.1:6379/14?prefix=mine")
    assert "secret" not in str(refused.value)
    assert "'prefix'" in str(refused.value)


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    monkeypatch.delitem(sys.modules, "flask_restful_async.stores.redis")
    with pytest.raises(ImportError, match=r"pip install flask-restful-async\[redis\]"):
        importlib.import_module("flask_restful_async.stores.redis")


# --- key layout ---------------------------------------------------------------


def test_prefixes_keep_stores_apart_and_every_key_is_prefixed(
    raw: redis.Redis, prefixes: Callable[[], str]
) -> None:
    prefix_a, prefix_b = prefixes(), prefixes()
    a, b = RedisStore(REDIS_URL, prefix=prefix_a), RedisStore(REDIS_URL, prefix=prefix_b)
    try:
        before = set(raw.scan_iter(count=1000))
        ids: dict[RedisStore, list[str]] = {}
        for made in (a, b):
            made.configure(result_ttl=3600, tombstone_ttl=3600, lease=30)
            made.renew_lease("w")
            done = made.create(new_task(owner="alice", idempotency_key="k", worker="w"))
            made.start(done.id, "w")
            made.set_progress(done.id, Progress(1, 2, "half"))
            made.finish(done.id, TaskState.SUCCEEDED, RESPONSE)
            cancelled = made.create(new_task(owner=None, idempotency_key="k"))
            made.request_cancel(cancelled.id)
            leaving = made.create(new_task(owner="bob", worker="leaving"))
            made.renew_lease("leaving")
            made.release_lease("leaving")
            ids[made] = [done.id, cancelled.id, leaving.id]
        assert a.purge_expired() == 0
        assert b.purge_expired() == 0

        # each store sees only its own tasks, even with the same owner and key
        assert all(a.get(task_id) is None for task_id in ids[b])
        assert all(b.get(task_id) is None for task_id in ids[a])
        assert a.create(new_task(owner=None, idempotency_key="k")).id == ids[a][1]
        assert b.create(new_task(owner=None, idempotency_key="k")).id == ids[b][1]
        assert [task.id for task in a.list(owner=None)] == [ids[a][1]]
        assert [task.id for task in b.list(owner="bob")] == [ids[b][2]]

        written = set(raw.scan_iter(count=1000)) - before
        assert written, "the stores wrote nothing"
        outside = {key for key in written if not key.startswith((b"{restful_async_test_",))}
        assert not outside, f"keys outside the prefixes: {outside}"
        mine_a = {key for key in written if key.startswith(prefix_a.encode())}
        mine_b = {key for key in written if key.startswith(prefix_b.encode())}
        assert mine_a
        assert mine_b
        # every key either store wrote is under its own prefix: nothing else appeared
        # but keys of other tests, which use other random prefixes
        names_a = {key[len(prefix_a) :].split(b":")[0] for key in mine_a}
        assert {b"task", b"owner", b"idem", b"lease", b"expiry"} <= names_a
    finally:
        a.close()
        b.close()


def test_the_default_prefix_is_a_cluster_hash_tag() -> None:
    made = RedisStore(REDIS_URL)
    assert made.prefix == "{restful_async}:"
    made.close()


# --- atomicity ----------------------------------------------------------------


def test_concurrent_idempotent_creates_make_exactly_one_task(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    count = 20
    barrier = threading.Barrier(count, timeout=10)
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def create() -> None:
        task = new_task(owner="alice", idempotency_key="POST /orders k1")
        barrier.wait()
        try:
            found = store.create(task)
        except BaseException as e:  # reported by the main thread
            with lock:
                errors.append(e)
            return
        with lock:
            results.append(found.id)

    threads = [threading.Thread(target=create) for _ in range(count)]
    for thread in threads:
        thread.start()
    join_all(threads)
    assert not errors
    assert len(results) == count
    assert len(set(results)) == 1
    assert raw.zcard(f"{prefix}owner:=alice") == 1
    assert len(keys_under(raw, f"{prefix}task:")) == 1


def test_a_retried_create_of_the_same_task_returns_it(store: RedisStore, raw: redis.Redis) -> None:
    task = new_task(owner="alice", idempotency_key="k")
    assert store.create(task) == task
    assert store.create(task) == task
    assert raw.zcard(f"{store.prefix}owner:=alice") == 1


def test_a_retried_start_returns_the_task_and_a_second_start_does_not(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py retries a call whose connection dropped; the script it runs twice
    # tells "the same call again" (same worker, same clock) from a second start.
    class FrozenClock:
        now = 1_700_000_000.25

        def time(self) -> float:
            return self.now

    clock = FrozenClock()
    task = store.create(new_task())
    monkeypatch.setattr(redis_store_module, "time", clock)
    first = store.start(task.id, "w")
    assert first is not None
    assert first.started_at == clock.now
    assert store.start(task.id, "w") == first
    assert store.start(task.id, "w2") is None
    clock.now += 1
    assert store.start(task.id, "w") is None


def test_a_retried_claim_returns_the_same_tasks_and_takes_no_more(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same token is what a call that redis-py retries sends again.
    monkeypatch.setattr(redis_store_module.secrets, "token_urlsafe", lambda size: "same-call")
    store.renew_lease("taker")
    base = time.time() - 100
    tasks = [store.create(new_task(created_at=base + i), b"snap") for i in range(4)]
    first = store.claim("taker", 2)
    assert [each.task.id for each in first] == [tasks[0].id, tasks[1].id]
    assert store.claim("taker", 2) == first
    monkeypatch.undo()
    assert [each.task.id for each in store.claim("taker", 5)] == [tasks[2].id, tasks[3].id]


@pytest.fixture
def cut(prefix: str) -> Iterator[tuple[RedisStore, ReplyCutter]]:
    """A store that reaches Redis through a :class:`ReplyCutter`, connected (the
    replies to a connection's set-up are cut too, and then nothing is sent)."""
    with ReplyCutter(REDIS_PORT) as cutter:
        made = RedisStore(f"redis://127.0.0.1:{cutter.port}/{REDIS_DB}", prefix=prefix)
        assert made.get(new_task_id()) is None
        yield made, cutter
        made.close()


def test_a_create_whose_reply_is_lost_is_doubtful_and_withdrawn(
    cut: tuple[RedisStore, ReplyCutter], store: RedisStore
) -> None:
    through, cutter = cut
    plain, keyed = new_task(worker="w"), new_task(worker="w", idempotency_key="k")
    for task in (plain, keyed):
        cutter.cutting = True
        with pytest.raises(StoreUnavailable) as caught:
            through.create(task, b"snap")
        assert caught.value.doubtful  # and rightly so: it is there
        found = store.get(task.id)
        assert found is not None
        assert found.state is TaskState.QUEUED
        cutter.cutting = False
        # Connected afresh: a call cut while connecting was never sent, not doubtful.
        assert through.get(new_task_id()) is None
    assert through.withdraw(plain.id)
    assert through.withdraw(keyed.id)
    assert store.get(plain.id) is None
    # Kept for a repeat that may have seen it: queued for any process to claim.
    assert [each.task.id for each in store.claim("other", 5)] == [keyed.id]


def test_a_call_that_never_reached_redis_is_not_doubtful() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5)
    with pytest.raises(StoreUnavailable) as caught:
        store.create(new_task())
    assert not caught.value.doubtful
    store.close()


def test_a_claim_whose_reply_is_lost_is_learnt_by_the_next_claim(
    cut: tuple[RedisStore, ReplyCutter], store: RedisStore, raw: redis.Redis
) -> None:
    # Without it, the tasks stayed held by a live worker that did not know them
    # (nobody ran them until they read lost, a day later).
    store.renew_lease("taker")
    base = time.time() - 100
    tasks = [store.create(new_task(created_at=base + i), b"snap") for i in range(3)]
    through, cutter = cut
    cutter.cutting = True
    with pytest.raises(StoreUnavailable) as caught:
        through.claim("taker", 2)
    assert caught.value.doubtful
    held = {tasks[0].id.encode(), tasks[1].id.encode()}
    assert raw.smembers(f"{store.prefix}worker:taker") == held
    cutter.cutting = False
    again = through.claim("taker", 5)  # the lost call again: its two tasks, no more
    assert [each.task.id for each in again] == [tasks[0].id, tasks[1].id]
    assert [each.snapshot for each in again] == [b"snap", b"snap"]
    assert [each.task.id for each in through.claim("taker", 5)] == [tasks[2].id]


def test_claim_takes_a_lapsed_workers_tasks_out_of_its_set_in_batches(
    store: RedisStore, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store_module, "ORPHAN_BATCH", 10)
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.2)
    store.renew_lease("dying")
    queued = [store.create(new_task(worker="dying"), b"snap").id for _ in range(15)]
    running = store.create(new_task(worker="dying"), b"snap")
    store.start(running.id, "dying")
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=30)
    store.renew_lease("alive")
    time.sleep(0.5)  # past the 0.2 s lease's hold (0.4 s)
    holders = f"{store.prefix}holders"
    assert raw.smembers(holders) == {b"dying"}
    first = store.claim("alive", 100)  # the first 10 of the lapsed worker's set
    second = store.claim("alive", 100)  # the rest; the lapsed worker is forgotten
    assert sorted(each.task.id for each in first + second) == sorted(queued)
    assert raw.smembers(holders) == {b"alive"}
    assert not raw.exists(f"{store.prefix}worker:dying")
    lost = store.get(running.id)
    assert lost is not None
    assert lost.state is TaskState.LOST
    assert not raw.exists(f"{store.prefix}snapshot:{running.id}")
    assert raw.zcard(f"{store.prefix}unheld") == 0


def test_other_redis_errors_propagate(store: RedisStore, raw: redis.Redis) -> None:
    task_id = new_task_id()
    raw.set(f"{store.prefix}task:{task_id}", "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.get(task_id)


def test_a_server_failing_over_is_an_outage(tmp_path: Path) -> None:
    """A master demoted to a replica answers writes READONLY; a replica cut off
    from its master (replica-serve-stale-data no) answers MASTERDOWN: a 503 while
    it lasts, not a 500, and a task's outcome waits in the outbox instead of
    ending it lost."""
    require_redis()
    port = free_port()
    with redis_server(port, tmp_path):
        server = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        made = RedisStore(f"redis://127.0.0.1:{port}/0", prefix=new_prefix())
        try:
            made.create(new_task())
            server.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # no master
            with pytest.raises(StoreUnavailable):
                made.create(new_task())
            server.config_set("replica-serve-stale-data", "no")
            with pytest.raises(StoreUnavailable):
                made.get(new_task_id())
            server.execute_command("REPLICAOF", "NO", "ONE")  # the failover is over
            assert made.create(new_task()).state is TaskState.QUEUED
        finally:
            made.close()
            server.close()


def test_a_server_that_does_not_speak_redis_is_an_outage() -> None:
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.05)

        def answer() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:  # the timeout: look at stop again
                    continue
                with conn, contextlib.suppress(OSError):
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        made = RedisStore(f"redis://127.0.0.1:{listener.getsockname()[1]}/0", prefix=new_prefix())
        try:
            with pytest.raises(StoreUnavailable):
                made.get(new_task_id())
        finally:
            made.close()
            stop.set()
            thread.join(5)
    assert not thread.is_alive()


def test_a_take_run_again_finds_its_blob_and_no_other_take_does(
    store: RedisStore, raw: redis.Redis
) -> None:
    """A take whose reply was lost runs again (the same call): it must find the
    bytes. Another take finds nothing: a blob is taken once."""
    store.put_blob("body", b"the request body", 60)
    name = f"{store.prefix}blob:body"
    keys, args = [name, f"{name}:taken:a-call"], [redis_store_module.TAKEN_BLOB_MS]
    assert store._lane.call(store._take_blob, keys, args) == b"the request body"
    assert not raw.exists(name)
    assert store._lane.call(store._take_blob, keys, args) == b"the request body"
    assert 0 < raw.pttl(keys[1]) <= 60_000
    assert store.take_blob("body") is None
    assert store.take_blob("never put") is None
    # A caller that tries its take again under one name (a Celery worker through
    # an outage) finds the bytes; any other take does not.
    store.put_blob("again", b"bytes", 60)
    assert store.take_blob("again", call="one") == b"bytes"
    assert store.take_blob("again", call="one") == b"bytes"
    assert store.take_blob("again", call="two") is None


# --- encoding -----------------------------------------------------------------


def test_every_field_round_trips_exactly(store: RedisStore) -> None:
    store.renew_lease("w:1")
    response = StoredResponse(
        207, [("X-Ünïcode", "ä ☃"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], bytes(range(256))
    )
    task = new_task(
        owner="ö:wner",
        idempotency_key="PUT /x/ü k",
        fingerprint="f" * 64,
        created_at=time.time(),
        started_at=time.time() + 0.000_001,
        finished_at=None,
        progress=Progress(0.1 + 0.2, None, "héllo\nworld"),
        cancel_requested=True,
        rerun=True,
        worker="w:1",
    )
    assert store.create(task) == task
    assert store.get(task.id) == task
    store.start(task.id, "w:1")  # queued -> running
    store.set_progress(task.id, Progress(3, 7))
    store.finish(task.id, TaskState.FAILED, response)
    found = store.get(task.id)
    assert found is not None
    assert found.response == response
    assert found.progress == Progress(3, 7)
    assert found.state is TaskState.FAILED
    assert found.cancel_requested


def test_owners_and_keys_do_not_collide(store: RedisStore) -> None:
    pairs = [(None, "k"), ("", "k"), ("a:b", "c"), ("a", "b:c"), ("-", "k"), ("=1:a", "k")]
    ids = {store.create(new_task(owner=owner, idempotency_key=key)).id for owner, key in pairs}
    assert len(ids) == len(pairs)
    for owner, _ in pairs:
        assert len(store.list(owner=owner)) == 1


# --- listing ------------------------------------------------------------------


def test_list_pages_through_ties_in_a_fixed_order(store: RedisStore) -> None:
    tied = [store.create(new_task(owner="o", created_at=1000.0)).id for _ in range(7)]
    newer = store.create(new_task(owner="o", created_at=2000.0)).id
    older = store.create(new_task(owner="o", created_at=10.0)).id
    expected = [newer, *sorted(tied, reverse=True), older]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):
        page = store.list(owner="o", limit=2, before=cursor)
        if not page:
            break
        seen += [task.id for task in page]
        cursor = page[-1].id
    assert seen == expected
    assert store.list(owner="o", before=new_task_id()) == []


def test_list_finds_sparse_matches_beyond_one_scan(store: RedisStore) -> None:
    store.renew_lease("w")
    total = 2 * LIST_SCAN + 50
    base = time.time() - 3600  # recent: a task queued past queued_ttl never starts
    ids = [store.create(new_task(created_at=base + i)).id for i in range(total)]
    running = [ids[3], ids[LIST_SCAN + 7], ids[total - 2]]
    for task_id in running:
        store.start(task_id, "w")
    found = store.list(owner=None, state=TaskState.RUNNING)
    assert [task.id for task in found] == list(reversed(running))
    assert [task.id for task in store.list(owner=None, limit=total + 10)] == ids[::-1]
    assert len(store.list(owner=None, limit=LIST_SCAN + 1)) == LIST_SCAN + 1


def test_list_skips_and_prunes_tasks_redis_has_forgotten(
    store: RedisStore, raw: redis.Redis
) -> None:
    kept = store.create(new_task(owner="o", created_at=1.0))
    gone = store.create(new_task(owner="o", created_at=2.0))
    raw.delete(f"{store.prefix}task:{gone.id}")  # as an eviction would
    assert [task.id for task in store.list(owner="o")] == [kept.id]
    assert raw.zrange(f"{store.prefix}owner:=o", 0, -1) == [kept.id.encode()]


# --- leases -------------------------------------------------------------------


def test_a_lapsed_lease_reads_lost_and_is_recorded(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    lease = 0.3
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=lease)
    store.renew_lease("dying")
    renewed_at = time.monotonic()
    store.renew_lease("alive")
    dying = store.create(new_task(worker="dying"))
    store.start(dying.id, "dying")
    alive = store.create(new_task(worker="alive"))
    store.start(alive.id, "alive")
    unowned = store.create(new_task(worker=None))

    first = store.get(dying.id)
    assert first is not None
    assert first.state is TaskState.RUNNING
    lost_after = None
    hold = store.lease_hold  # what a renewal keeps a lease for: more than the lease
    deadline = renewed_at + hold + 1.0
    while time.monotonic() < deadline:
        store.renew_lease("alive")
        found = store.get(dying.id)
        assert found is not None
        if found.state is TaskState.LOST:
            lost_after = time.monotonic() - renewed_at
            break
        time.sleep(0.02)
    assert lost_after is not None, "the task never read as lost"
    assert hold - 0.05 <= lost_after <= hold + 0.5

    # recorded, not just computed: another store object and Redis itself agree
    other = RedisStore(REDIS_URL, prefix=prefix)
    try:
        again = other.get(dying.id)
        assert again is not None
        assert again.state is TaskState.LOST
        assert again.finished_at is not None
    finally:
        other.close()
    assert raw.hget(f"{prefix}task:{dying.id}", "state") == b"lost"
    assert raw.pttl(f"{prefix}task:{dying.id}") > 0  # a finished task expires

    kept = store.get(alive.id)
    assert kept is not None
    assert kept.state is TaskState.RUNNING
    never_lost = store.get(unowned.id)
    assert never_lost is not None
    assert never_lost.state is TaskState.QUEUED


def test_release_lease_loses_every_active_task_of_that_worker_only(store: RedisStore) -> None:
    store.renew_lease("leaving")
    store.renew_lease("staying")
    mine = [store.create(new_task(worker="leaving")).id for _ in range(RELEASE_BATCH + 10)]
    store.start(mine[0], "leaving")
    finished = store.create(new_task(worker="leaving"))
    store.start(finished.id, "leaving")
    store.finish(finished.id, TaskState.SUCCEEDED, RESPONSE)
    other = store.create(new_task(worker="staying"))
    store.release_lease("leaving")
    for task_id in mine:
        found = store.get(task_id)
        assert found is not None
        assert found.state is TaskState.LOST, task_id
    done = store.get(finished.id)
    assert done is not None
    assert done.state is TaskState.SUCCEEDED
    kept = store.get(other.id)
    assert kept is not None
    assert kept.state is TaskState.QUEUED


# --- retention ----------------------------------------------------------------


def test_a_finished_task_expires_in_redis_tombstone_first(
    store: RedisStore, raw: redis.Redis, prefix: str
) -> None:
    store.configure(result_ttl=0.2, tombstone_ttl=0.2, lease=30)
    store.renew_lease("w")
    task = store.create(new_task(owner="o", idempotency_key="k", worker="w"))
    task_key = f"{prefix}task:{task.id}"
    idempotency_key = f"{prefix}idem:=1:o:k"
    assert raw.pttl(task_key) == -1
    store.start(task.id, "w")
    assert raw.pttl(task_key) == -1
    assert raw.pttl(idempotency_key) == -1
    store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)
    finished_at = time.monotonic()
    assert 0 < raw.pttl(task_key) <= 400
    assert 0 < raw.pttl(idempotency_key) <= 400

    sleep_until(finished_at + 0.27)
    tombstone = store.get(task.id)
    assert tombstone is not None
    assert tombstone.expired
    assert tombstone.response is None
    assert tombstone.progress is None
    assert store.list(owner="o") == []
    # a tombstone does not hold its idempotency key
    assert store.create(new_task(owner="o", idempotency_key="k")).id != task.id

    sleep_until(finished_at + 0.45)
    assert store.get(task.id) is None
    assert not raw.exists(task_key)
    assert store.purge_expired() >= 1  # prunes the index entry Redis left behind
    assert raw.zscore(f"{prefix}owner:=o", task.id) is None


def test_purge_drops_expired_results_but_keeps_the_tombstone(
    store: RedisStore, raw: redis.Redis
) -> None:
    store.renew_lease("w")
    task = store.create(new_task())
    store.start(task.id, "w")
    store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)
    active = store.create(new_task(worker="w"))
    assert store.purge_expired() == 0
    assert store.purge_expired(now=time.time() + 3600 + 1) == 1
    assert raw.hget(f"{store.prefix}task:{task.id}", "body") is None
    tombstone = store.get(task.id)
    assert tombstone is not None
    assert tombstone.expired
    assert tombstone.response is None
    kept = store.get(active.id)
    assert kept is not None
    assert kept.state is TaskState.QUEUED


def test_delete_forgets_the_task_its_index_entry_and_its_key(
    store: RedisStore, raw: redis.Redis
) -> None:
    first = store.create(new_task(owner="o", idempotency_key="k"))
    store.delete(first.id)
    assert store.get(first.id) is None
    assert raw.zcard(f"{store.prefix}owner:=o") == 0
    assert store.create(new_task(owner="o", idempotency_key="k")).id != first.id
    store.delete(new_task_id())  # unknown: nothing to do


# --- Redis going away ---------------------------------------------------------


def assert_unavailable_within(bound: float, call: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < bound, f"took {elapsed:.2f}s to give up"
    assert isinstance(raised.value.__cause__, redis.ConnectionError | redis.TimeoutError)
    assert raised.value.retry_after >= 1


def test_a_down_server_is_unavailable_quickly_and_the_store_recovers(tmp_path: Path) -> None:
    port = free_port()
    made = RedisStore(f"redis://127.0.0.1:{port}/0")
    try:
        with redis_server(port, tmp_path) as server:
            before = made.create(new_task(owner="o"))
            assert made.get(before.id) == before
            server.kill()
            server.wait(timeout=10)
            assert_unavailable_within(3.0, lambda: made.create(new_task(owner="o")))
            assert_unavailable_within(3.0, lambda: made.get(before.id))
            assert_unavailable_within(3.0, lambda: made.list(owner="o"))
        with redis_server(port, tmp_path):
            # the pooled connections are dead and the scripts unknown to the new
            # server: the same store object gets past both
            after = made.create(new_task(owner="o"))
            assert made.get(after.id) == after
            assert [task.id for task in made.list(owner="o")] == [after.id]
    finally:
        made.close()


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    # A listening socket that never accepts: connecting works (the kernel queues
    # it), replies never come. The store gives up after socket_timeout, once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        made = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
        try:
            assert_unavailable_within(1.5, lambda: made.get(new_task_id()))
        finally:
            made.close()


def test_close_then_use_again(store: RedisStore) -> None:
    task = store.create(new_task())
    store.close()
    assert store.get(task.id) == task


# --- the scripts' connections (stores/redislane.py) -----------------------------


def lane_sockets(store: RedisStore) -> list[str]:
    """``ip:port`` of each free connection of the store's scripts, as the server names it."""
    free = list(store._lane._free)  # type: ignore[attr-defined]
    sockets = [each._sock.getsockname() for each in free if each._sock is not None]
    return [f"{host}:{port}" for host, port in sockets]


def test_a_call_holds_a_connection_only_while_it_runs(store: RedisStore) -> None:
    task = store.create(new_task())
    barrier = threading.Barrier(4)

    def poll() -> None:
        barrier.wait(5)
        for _ in range(20):
            assert store.get(task.id) == task

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for thread in threads:
        thread.start()
    join_all(threads)
    # every connection the threads used is free again, none is lost to a thread
    pool = store._client.connection_pool  # type: ignore[attr-defined]
    assert 1 <= store._lane.free == len(pool._in_use_connections)  # type: ignore[attr-defined]


def test_connections_the_server_dropped_are_replaced_within_the_call(
    store: RedisStore, raw: redis.Redis
) -> None:
    task = store.create(new_task())
    barrier = threading.Barrier(3)

    def poll() -> None:
        barrier.wait(5)
        store.get(task.id)

    threads = [threading.Thread(target=poll) for _ in range(3)]
    for thread in threads:
        thread.start()
    join_all(threads)
    addresses = lane_sockets(store)
    assert addresses
    for address in addresses:
        raw.client_kill(address)
    # the first free connection fails; the call is retried on a new one
    assert store.get(task.id) == task
    assert store.get(task.id) == task


def test_an_error_reply_leaves_the_connection_in_step(store: RedisStore, raw: redis.Redis) -> None:
    task = store.create(new_task())
    wrong = new_task_id()
    raw.set(f"{store.prefix}task:{wrong}", "not a hash")
    before = lane_sockets(store)
    for _ in range(3):
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            store.get(wrong)
        assert store.get(task.id) == task
    assert lane_sockets(store) == before  # the same connection, never closed


def test_a_forked_child_uses_connections_of_its_own(store: RedisStore) -> None:
    tasks = [store.create(new_task()) for _ in range(3)]
    assert store.get(tasks[0].id) == tasks[0]  # a free connection the child inherits
    inherited = set(lane_sockets(store))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(read)
            answers = all(store.get(task.id) == task for task in tasks * 5)
            if answers and not inherited & set(lane_sockets(store)):
                code = 0
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.read(read, 1) == b"\x00"
    finally:
        os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    # had the child used the parent's socket, replies would now be out of step
    for task in tasks * 5:
        assert store.get(task.id) == task


def test_a_task_created_finished_again_is_kept_once(store: RedisStore) -> None:
    """The script that writes a task run before it was recorded, sent again (as
    redis-py does when the reply of the first was lost), changes nothing."""
    task = Task(id=new_task_id(), owner="o", worker="w", state=TaskState.SUCCEEDED)
    task.started_at = task.finished_at = task.created_at
    task.response = StoredResponse(200, [("Content-Type", "application/json")], b"{}\n")
    store.create_finished(task)
    first = store.get(task.id)
    store.create_finished(task)
    assert store.get(task.id) == first
    assert store.stats().counts[TaskState.SUCCEEDED] == 1
    assert [listed.id for listed in store.list(owner="o", limit=5)] == [task.id]
