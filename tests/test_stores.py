"""The store contract: every store passes these tests (more stores join the fixture)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask, request
from flask_restful import Api

from flask_restful_async import (
    AsyncResource,
    MemoryStore,
    Progress,
    Task,
    TaskState,
    TaskStore,
    register_async,
)
from flask_restful_async.state import get_state
from flask_restful_async.stores import SQLiteStore
from flask_restful_async.stores.outages import MESSAGE, OutageLog
from flask_restful_async.task import StoredResponse, new_task_id

from .conftest import AppFactory, wait_for
from .services import free_port, require_redis

RESPONSE = StoredResponse(201, [("Content-Type", "application/json"), ("X-A", "b")], b"{}\n")


# A creation time for tasks that must keep their order: recent, since a task still
# queued a day after its creation reads lost.
BASE = time.time() - 3600

# Redis db 15, under a prefix of each test's own, of which every key is deleted after.
CONTRACT_REDIS_URL = "redis://127.0.0.1:6379/15"


@contextlib.contextmanager
def made_store(kind: str, tmp_path: Path) -> t.Iterator[TaskStore]:
    if kind == "memory":
        store: TaskStore = MemoryStore()
    elif kind == "sqlite":
        store = SQLiteStore(str(tmp_path / "tasks.db"))
    else:
        require_redis()
        from flask_restful_async.stores.redis import RedisStore

        store = RedisStore(CONTRACT_REDIS_URL, prefix=f"{{contract-{secrets.token_hex(6)}}}:")
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=30)
    try:
        yield store
    finally:
        if kind == "redis":
            import redis

            with redis.Redis.from_url(CONTRACT_REDIS_URL) as client:
                keys = list(client.scan_iter(match=f"{store.prefix}*"))  # type: ignore[attr-defined]
                if keys:
                    client.delete(*keys)
        store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> t.Iterator[TaskStore]:
    with made_store(request.param, tmp_path) as made:
        made.renew_lease("w")  # the worker the tests start tasks as is alive
        yield made


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> t.Iterator[TaskStore]:
    """The stores that several processes share, and so keep leases."""
    with made_store(request.param, tmp_path) as made:
        yield made


class Echo(AsyncResource):
    def post(self) -> t.Any:
        return {"echo": request.get_json()}


def new_task(**fields: t.Any) -> Task:
    return Task(id=new_task_id(), **fields)


def test_create_then_get_round_trips_every_field(store: TaskStore) -> None:
    task = new_task(
        owner="alice",
        idempotency_key="POST /x k1",
        fingerprint="abc",
        rerun=True,
        endpoint="reports",
        method="POST",
        path="/reports/7",
    )
    assert store.create(task) == task
    found = store.get(task.id)
    assert found == task
    assert found is not task


REQUEST = {"endpoint": "reports", "method": "PATCH", "path": "/reports/%C3%A9 x"}


def made_by(task: Task | None) -> dict[str, str | None]:
    assert task is not None
    return {"endpoint": task.endpoint, "method": task.method, "path": task.path}


def test_every_read_tells_the_request_that_made_the_task(store: TaskStore) -> None:
    store.renew_lease("w")
    task = store.create(new_task(owner="alice", worker="w", **REQUEST), SNAPSHOT)
    assert made_by(store.get(task.id)) == REQUEST
    assert made_by(store.get_owned(task.id, "alice")) == REQUEST
    assert [made_by(each) for each in store.list(owner="alice")] == [REQUEST]
    assert store.hand_back("w", [task.id]) == 1
    (claimed,) = store.claim("w", 1)
    assert made_by(claimed.task) == REQUEST
    assert made_by(store.start(task.id, "w")) == REQUEST
    assert made_by(store.request_cancel(task.id)) == REQUEST
    store.finish(task.id, TaskState.SUCCEEDED, StoredResponse(200, [], b"x" * 4000))
    assert made_by(store.get(task.id)) == REQUEST
    repeat = new_task(owner="bob", idempotency_key="k", **REQUEST)
    store.create(repeat)
    assert made_by(store.create(new_task(owner="bob", idempotency_key="k"))) == REQUEST


def test_a_task_of_unknown_origin_reads_without_it(store: TaskStore) -> None:
    task = store.create(new_task())
    assert made_by(store.get(task.id)) == {"endpoint": None, "method": None, "path": None}
    assert "request" not in task.status_document()


def test_get_many_reads_each_task_as_get_does(store: TaskStore) -> None:
    tasks = [store.create(new_task(owner="alice")) for _ in range(130)]  # two batches
    store.start(tasks[0].id, "w")
    store.finish(tasks[0].id, TaskState.SUCCEEDED, StoredResponse(200, [], b"x" * 4000))
    store.start(tasks[1].id, "w")
    store.set_progress(tasks[1].id, Progress(1, 2))
    store.delete(tasks[2].id)
    ids = [task.id for task in tasks] + [new_task_id()]
    expected = {task.id: store.get(task.id) for task in tasks if store.get(task.id)}
    assert tasks[2].id not in expected
    assert store.get_many(ids) == expected
    assert store.get_many(ids[:3]) == {id_: expected[id_] for id_ in ids[:2]}
    assert store.get_many([]) == {}


def test_get_unknown_is_none(store: TaskStore) -> None:
    assert store.get(new_task_id()) is None


def test_start_moves_queued_to_running_once(store: TaskStore) -> None:
    task = store.create(new_task())
    started = store.start(task.id, "w1")
    assert started is not None
    assert started.state is TaskState.RUNNING
    assert started.worker == "w1"
    assert started.started_at is not None
    assert store.start(task.id, "w2") is None
    assert store.start(new_task_id(), "w1") is None


def test_progress_is_recorded_and_reports_the_cancel_flag(store: TaskStore) -> None:
    task = store.create(new_task())
    store.start(task.id, "w")
    assert store.set_progress(task.id, Progress(1, 4, "a")) is False
    found = store.get(task.id)
    assert found is not None
    assert found.progress == Progress(1, 4, "a")
    store.request_cancel(task.id)
    assert store.set_progress(task.id, Progress(2, 4, "b")) is True
    assert store.cancel_requested(task.id) is True


def test_progress_keeps_the_time_of_its_report(store: TaskStore) -> None:
    # For Retry-After (the rate seen up to the report); not in the status document.
    task = store.create(dataclasses.replace(new_task(), progress=Progress(0, 4, at=1000.25)))
    found = store.get(task.id)
    assert found is not None
    assert found.progress is not None
    assert found.progress.at == 1000.25
    store.start(task.id, "w")
    store.set_progress(task.id, Progress(1, 4, "a", at=1234.5))
    found = store.get(task.id)
    assert found is not None
    assert found.progress is not None
    assert (found.progress, found.progress.at) == (Progress(1, 4, "a"), 1234.5)
    assert found.status_document()["progress"] == {"current": 1, "total": 4, "message": "a"}


def test_finish_records_the_response_and_is_final(store: TaskStore) -> None:
    task = store.create(new_task())
    store.start(task.id, "w")
    store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)
    found = store.get(task.id)
    assert found is not None
    assert found.state is TaskState.SUCCEEDED
    assert found.response == RESPONSE
    assert found.finished_at is not None
    store.finish(task.id, TaskState.FAILED, None)
    again = store.get(task.id)
    assert again is not None
    assert again.state is TaskState.SUCCEEDED


@pytest.mark.parametrize("size", [0, 400, 600, 70_000])
def test_responses_of_every_size_come_back_as_stored_until_they_expire(
    store: TaskStore, size: int
) -> None:
    """Small and large responses alike (SQLite keeps the small ones in the task
    row, the others in a table of their own): read back whole, by owner too, and
    gone with the result's retention."""
    response = StoredResponse(200, [("Content-Type", "application/octet-stream")], b"r" * size)
    task = store.create(new_task(owner="o"))
    store.start(task.id, "w")
    store.finish(task.id, TaskState.SUCCEEDED, response)
    assert (store.get(task.id) or new_task()).response == response
    assert (store.get_owned(task.id, "o") or new_task()).response == response
    assert store.get_owned(task.id, "another") is None
    store.configure(result_ttl=0.05, tombstone_ttl=3600, lease=30)
    time.sleep(0.1)
    store.purge_expired()
    expired = store.get(task.id)
    assert expired is not None
    assert (expired.expired, expired.response) == (True, None)
    store.delete(task.id)
    assert store.get(task.id) is None


def test_cancel_of_a_queued_task_is_immediate_and_start_then_refuses(store: TaskStore) -> None:
    task = store.create(new_task())
    cancelled = store.request_cancel(task.id)
    assert cancelled is not None
    assert cancelled.state is TaskState.CANCELLED
    assert store.start(task.id, "w") is None


def test_cancel_of_a_running_task_only_sets_the_flag(store: TaskStore) -> None:
    task = store.create(new_task())
    store.start(task.id, "w")
    flagged = store.request_cancel(task.id)
    assert flagged is not None
    assert flagged.state is TaskState.RUNNING
    assert flagged.cancel_requested
    assert store.request_cancel(new_task_id()) is None


def test_delete_forgets(store: TaskStore) -> None:
    task = store.create(new_task())
    store.delete(task.id)
    assert store.get(task.id) is None


def test_the_owner_named_empty_and_no_owner_never_share_a_key(store: TaskStore) -> None:
    # An owner callable may name a caller "": not the anonymous callers.
    anonymous = store.create(new_task(idempotency_key="k"))
    named = store.create(new_task(owner="", idempotency_key="k"))
    assert named.id != anonymous.id
    found = store.get_by_key("", "k")
    assert found is not None
    assert found.id == named.id
    found = store.get_by_key(None, "k")
    assert found is not None
    assert found.id == anonymous.id
    assert store.create(new_task(owner="", idempotency_key="k")).id == named.id


def test_get_by_key_finds_what_a_create_with_the_key_would_return(store: TaskStore) -> None:
    first = store.create(new_task(owner="alice", idempotency_key="k"))
    store.create(new_task(idempotency_key="anonymous"))
    found = store.get_by_key("alice", "k")
    assert found is not None
    assert found.id == first.id
    assert store.get_by_key("bob", "k") is None
    assert store.get_by_key(None, "k") is None
    assert store.get_by_key("alice", "other") is None
    anonymous = store.get_by_key(None, "anonymous")
    assert anonymous is not None
    assert anonymous.owner is None
    store.delete(first.id)
    assert store.get_by_key("alice", "k") is None


def test_a_task_queued_past_queued_ttl_never_starts(store: TaskStore) -> None:
    # It reads lost: a worker that comes to it later must not run it after all.
    stale = store.create(new_task(created_at=time.time() - store.queued_ttl - 60))
    assert store.start(stale.id, "w") is None
    found = store.get(stale.id)
    assert found is not None
    assert found.state is TaskState.LOST


def test_withdraw_forgets_a_queued_task_without_key(store: TaskStore) -> None:
    task = store.create(new_task(owner="alice"), b"snapshot")
    assert store.withdraw(task.id) is True
    assert store.get(task.id) is None
    assert store.list(owner="alice") == []
    assert store.claim("w", 5) == []


def test_withdraw_ends_a_keyed_task_without_snapshot_lost_and_frees_its_key(
    store: TaskStore,
) -> None:
    # A repeat may have been answered 202 with its Location: it must end, not vanish.
    task = store.create(new_task(owner="alice", idempotency_key="k", worker="w"))
    assert store.create(new_task(owner="alice", idempotency_key="k")).id == task.id
    assert store.withdraw(task.id) is True
    ended = store.get(task.id)
    assert ended is not None
    assert ended.state is TaskState.LOST
    assert ended.finished_at is not None
    assert ended.idempotency_key is None
    # The key is free: the client's next try creates a task anew.
    fresh = new_task(owner="alice", idempotency_key="k")
    assert store.create(fresh).id == fresh.id
    assert store.withdraw(task.id) is False  # ended already: nothing more to take back


def test_withdraw_queues_a_keyed_task_with_snapshot_for_any_process(store: TaskStore) -> None:
    # Its repeat (answered 202, or still to come) then gets the result of one run.
    task = store.create(new_task(owner="alice", idempotency_key="k", worker="w"), b"snap")
    assert store.withdraw(task.id) is True
    queued = store.get(task.id)
    assert queued is not None
    assert queued.state is TaskState.QUEUED
    assert [(each.task.id, each.snapshot) for each in store.claim("other", 5)] == [
        (task.id, b"snap")
    ]
    assert store.create(new_task(owner="alice", idempotency_key="k")).id == task.id


def test_withdraw_takes_back_a_task_recorded_running_under_the_worker_named(
    store: TaskStore,
) -> None:
    # A submit that runs its task in the request thread records it running.
    started = time.time()
    plain = store.create(new_task(worker="w", state=TaskState.RUNNING, started_at=started))
    keyed = store.create(
        new_task(worker="w", state=TaskState.RUNNING, started_at=started, idempotency_key="k"),
        b"snap",
    )
    assert store.withdraw(plain.id) is False  # not named: left running
    assert store.withdraw(plain.id, running_under="other") is False
    assert store.withdraw(plain.id, running_under="w") is True
    assert store.get(plain.id) is None
    assert store.withdraw(keyed.id, running_under="w") is True
    queued = store.get(keyed.id)
    assert queued is not None
    assert queued.state is TaskState.QUEUED
    assert queued.started_at is None
    assert [each.task.id for each in store.claim("other", 5)] == [keyed.id]


def test_withdraw_ends_cancelled_a_running_task_whose_cancel_was_asked(store: TaskStore) -> None:
    # Queued again, it would never be claimed (claims skip what was cancelled),
    # and the DELETE that asked would never see it end.
    keyed = store.create(
        new_task(
            worker="w",
            state=TaskState.RUNNING,
            started_at=time.time(),
            idempotency_key="k",
        ),
        b"snap",
    )
    asked = store.request_cancel(keyed.id)
    assert asked is not None
    assert asked.cancel_requested
    assert store.withdraw(keyed.id, running_under="w") is True
    ended = store.get(keyed.id)
    assert ended is not None
    assert ended.state is TaskState.CANCELLED


def test_withdraw_leaves_a_started_or_unknown_task_alone(store: TaskStore) -> None:
    task = store.create(new_task(idempotency_key="k"))
    assert store.start(task.id, "w") is not None
    assert store.withdraw(task.id) is False
    running = store.get(task.id)
    assert running is not None
    assert running.state is TaskState.RUNNING
    assert store.create(new_task(idempotency_key="k")).id == task.id
    assert store.withdraw(new_task_id()) is False


def test_idempotency_key_returns_the_existing_task_per_owner(store: TaskStore) -> None:
    first = store.create(new_task(owner="alice", idempotency_key="k"))
    again = store.create(new_task(owner="alice", idempotency_key="k"))
    other_owner = store.create(new_task(owner="bob", idempotency_key="k"))
    assert again.id == first.id
    assert other_owner.id != first.id


def test_list_is_newest_first_owner_scoped_filtered_and_paged(store: TaskStore) -> None:
    mine = []
    for i in range(5):
        mine.append(store.create(new_task(owner="alice", created_at=BASE + i)))
        store.create(new_task(owner="bob", created_at=BASE + 0.5 + i))
    newest = [task.id for task in reversed(mine)]
    assert [task.id for task in store.list(owner="alice", limit=3)] == newest[:3]
    assert [task.id for task in store.list(owner="alice", limit=3, before=newest[2])] == newest[3:]
    store.start(mine[1].id, "w")
    running = store.list(owner="alice", state=TaskState.RUNNING)
    assert [task.id for task in running] == [mine[1].id]
    assert store.list(owner=None) == []


@pytest.mark.parametrize("size", [10, 70_000])
def test_a_list_reads_no_response(store: TaskStore, size: int) -> None:
    # A page of 500 status documents read every task's response (SQLite joined
    # the results table, Redis sent each whole hash): one GET /tasks of results of
    # a few MB cost hundreds of MB of memory, and a list stream read them again
    # at every change.
    response = StoredResponse(200, [("Content-Type", "text/plain")], b"r" * size)
    task = store.create(new_task(owner="alice"))
    assert store.start(task.id, "w") is not None
    assert store.finish(task.id, TaskState.SUCCEEDED, response) is not None
    for listed in (store.list(owner="alice"), store.list_all()):
        assert [found.id for found in listed] == [task.id]
        assert listed[0].state is TaskState.SUCCEEDED
        assert listed[0].finished_at is not None
        assert listed[0].response == StoredResponse(200, [], b"")  # the code alone
    found = store.get(task.id)
    assert found is not None
    assert found.response == response


@pytest.mark.parametrize("size", [0, 400, 600, 70_000])
@pytest.mark.parametrize("state", [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED])
def test_a_task_created_finished_reads_as_one_finished_the_usual_way(
    store: TaskStore, size: int, state: TaskState
) -> None:
    """A task run before it was recorded, written once as it ended: read, listed,
    counted and expired as one created, started and finished."""
    store.configure(result_ttl=0.2, tombstone_ttl=30, lease=30)
    response = (
        None
        if state is TaskState.CANCELLED
        else StoredResponse(201, [("Content-Type", "application/octet-stream")], b"r" * size)
    )
    now = time.time()
    task = new_task(owner="o")
    task.state, task.worker, task.response = state, "w", response
    task.started_at, task.finished_at = task.created_at, now
    task.progress = Progress(3, 4, "three")
    task.endpoint, task.method, task.path = "things", "POST", "/things"
    recorded_at = store.create_finished(task)
    assert recorded_at is not None
    assert abs(recorded_at - now) < 5
    found = store.get_owned(task.id, "o")
    assert found is not None
    assert found.state is state
    assert found.response == response
    assert found.progress == Progress(3, 4, "three")
    assert found.started_at == pytest.approx(task.started_at)
    assert found.finished_at is not None
    assert (found.endpoint, found.method, found.path) == ("things", "POST", "/things")
    assert store.get_owned(task.id, "another") is None
    assert [listed.id for listed in store.list(owner="o", state=state, limit=5)] == [task.id]
    assert store.stats().counts[state] == 1
    # Final: a finish, or a cancel, changes nothing.
    assert store.finish(task.id, TaskState.FAILED, None) is None
    cancelled = store.request_cancel(task.id)
    assert cancelled is None or cancelled.state is state
    time.sleep(0.25)
    store.purge_expired()
    tombstone = store.get(task.id)
    assert tombstone is not None
    assert tombstone.expired
    assert tombstone.response is None


def test_creating_finished_ends_a_task_recorded_running_meanwhile_and_only_once(
    store: TaskStore,
) -> None:
    """A call that recorded the task as running may have had its reply lost: the
    task is there, and is ended now. A retried call finds it ended and leaves it."""
    running = new_task(owner="o", worker="w", state=TaskState.RUNNING)
    running.started_at = running.created_at
    store.create(running)
    ended = dataclasses.replace(
        running, state=TaskState.SUCCEEDED, finished_at=time.time(), response=RESPONSE
    )
    assert store.create_finished(ended) is not None
    found = store.get(running.id)
    assert found is not None
    assert (found.state, found.response) == (TaskState.SUCCEEDED, RESPONSE)
    assert store.stats().counts[TaskState.RUNNING] == 0
    assert store.stats().counts[TaskState.SUCCEEDED] == 1
    again = dataclasses.replace(ended, state=TaskState.FAILED, response=None)
    assert store.create_finished(again) is None
    found = store.get(running.id)
    assert found is not None
    assert (found.state, found.response) == (TaskState.SUCCEEDED, RESPONSE)
    assert [task.id for task in store.list(owner="o", limit=5)] == [running.id]


def test_finished_results_become_tombstones_then_disappear(store: TaskStore) -> None:
    store.configure(result_ttl=0.1, tombstone_ttl=0.1, lease=30)
    done = store.create(new_task())
    store.start(done.id, "w")
    store.finish(done.id, TaskState.SUCCEEDED, RESPONSE)
    running = store.create(new_task())
    store.start(running.id, "w")
    queued = store.create(new_task())
    time.sleep(0.15)
    assert store.purge_expired() >= 1
    tombstone = store.get(done.id)
    assert tombstone is not None
    assert tombstone.expired
    assert tombstone.response is None
    time.sleep(0.15)
    store.purge_expired()
    assert store.get(done.id) is None
    for task_id in (running.id, queued.id):
        kept = store.get(task_id)
        assert kept is not None
        assert not kept.expired


def test_racing_finish_and_cancel_lose_no_update(store: TaskStore) -> None:
    tasks = [store.create(new_task()) for _ in range(50)]
    for task in tasks:
        store.start(task.id, "w")

    def finish_all() -> None:
        for task in tasks:
            store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)

    def cancel_all() -> None:
        for task in tasks:
            store.request_cancel(task.id)

    def progress_all() -> None:
        for task in tasks:
            store.set_progress(task.id, Progress(1))

    threads = [threading.Thread(target=f) for f in (finish_all, cancel_all, progress_all)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for task in tasks:
        found = store.get(task.id)
        assert found is not None
        assert found.state is TaskState.SUCCEEDED
        assert found.response == RESPONSE
        assert found.cancel_requested


def test_an_active_task_of_a_worker_without_lease_reads_lost(shared_store: TaskStore) -> None:
    store = shared_store
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.2)
    store.renew_lease("alive")
    store.renew_lease("dying")
    kept = store.create(new_task(worker="alive"))
    queued = store.create(new_task(worker="dying"))
    running = store.create(new_task(worker="dying"))
    store.start(running.id, "dying")
    celery_like = store.create(new_task(worker=None))
    # A renewal holds a lease for store.lease_hold (0.4 s here), past the lease.
    time.sleep(0.25)
    store.renew_lease("alive")
    time.sleep(0.25)
    for task_id in (queued.id, running.id):
        lost = store.get(task_id)
        assert lost is not None
        assert lost.state is TaskState.LOST
        assert lost.finished_at is not None
    for task_id in (kept.id, celery_like.id):
        alive = store.get(task_id)
        assert alive is not None
        assert alive.state is TaskState.QUEUED
    assert [task.id for task in store.list(owner=None, state=TaskState.LOST)] == [
        running.id,
        queued.id,
    ]
    # first outcome wins: a late finish of a lost task changes nothing
    store.finish(running.id, TaskState.SUCCEEDED, RESPONSE)
    late = store.get(running.id)
    assert late is not None
    assert late.state is TaskState.LOST


def test_releasing_a_lease_loses_its_tasks_at_once(shared_store: TaskStore) -> None:
    store = shared_store
    store.renew_lease("leaving")
    task = store.create(new_task(worker="leaving"))
    store.release_lease("leaving")
    lost = store.get(task.id)
    assert lost is not None
    assert lost.state is TaskState.LOST


def test_purge_reclaims_in_batches_and_keeps_active_tasks(store: TaskStore) -> None:
    store.configure(result_ttl=0.05, tombstone_ttl=0.05, lease=30)
    store.renew_lease("w")
    active = store.create(new_task(worker="w"))
    done = []
    for _ in range(30):
        task = store.create(new_task())
        store.start(task.id, "w")
        store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)
        done.append(task)
    time.sleep(0.15)
    store.purge_expired()
    store.purge_expired()
    assert all(store.get(task.id) is None for task in done)
    kept = store.get(active.id)
    assert kept is not None
    assert kept.state is TaskState.QUEUED


# --- another owner's id tells nothing -------------------------------------------


def test_a_cursor_of_another_owner_lists_as_an_unknown_one(store: TaskStore) -> None:
    older = [store.create(new_task(owner="bob", created_at=BASE + i)) for i in range(3)]
    alices = store.create(new_task(owner="alice", created_at=BASE + 10))
    after_unknown = store.list(owner="bob", before=new_task_id())
    after_foreign = store.list(owner="bob", before=alices.id)
    assert after_foreign == after_unknown == []
    # the owner's own cursor still pages
    assert [t.id for t in store.list(owner="bob", before=older[2].id)] == [
        older[1].id,
        older[0].id,
    ]


def test_get_owned_answers_another_owners_task_as_unknown(store: TaskStore) -> None:
    alices = store.create(new_task(owner="alice"))
    store.start(alices.id, "w")
    store.finish(alices.id, TaskState.SUCCEEDED, RESPONSE)
    anonymous = store.create(new_task(owner=None))
    mine = store.get_owned(alices.id, "alice")
    assert mine is not None
    assert mine.response == RESPONSE
    assert store.get_owned(alices.id, "bob") is None
    assert store.get_owned(alices.id, None) is None
    assert store.get_owned(new_task_id(), "bob") is None
    assert store.get_owned(anonymous.id, "alice") is None
    found = store.get_owned(anonymous.id, None)
    assert found is not None
    assert found.id == anonymous.id


def test_another_owners_large_result_reads_as_fast_as_an_unknown_id(store: TaskStore) -> None:
    """The store compares the owner before it loads the response: a 2 MB result
    costs bob's read nothing (medians of interleaved reads; loading it would take
    ten to a hundred times an unknown id's read)."""
    big = StoredResponse(200, [("Content-Type", "application/octet-stream")], b"x" * 2_000_000)
    alices = store.create(new_task(owner="alice"))
    store.start(alices.id, "w")
    store.finish(alices.id, TaskState.SUCCEEDED, big)
    unknown = new_task_id()
    foreign_times, unknown_times = [], []
    for _ in range(60):
        for task_id, times in ((alices.id, foreign_times), (unknown, unknown_times)):
            started = time.perf_counter()
            assert store.get_owned(task_id, "bob") is None
            times.append(time.perf_counter() - started)
    foreign, unknown_median = statistics.median(foreign_times), statistics.median(unknown_times)
    assert foreign < 3 * unknown_median + 0.0002, (foreign, unknown_median)


# --- a store that fails tells clients nothing of where it lives ---------------------


def failing_store(kind: str, tmp_path: Path) -> tuple[str, list[str]]:
    """A store URL that fails as ``kind`` says, and what must stay out of answers."""
    path = tmp_path / "tasks.db"
    if kind == "redis down":
        port = free_port()  # nothing listens there
        return f"redis://ops-user:s3cret@127.0.0.1:{port}/3", [
            "127.0.0.1",
            str(port),
            "ops-user",
            "s3cret",
            "redis://",
        ]
    if kind == "sqlite other layout":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, response_body BLOB)")
            conn.commit()
    elif kind == "sqlite not a database":
        path.write_bytes(b"not a database at all" * 100)
    else:  # a folder that cannot be made: a file is in the way
        (tmp_path / "a-file").write_text("in the way")
        path = tmp_path / "a-file" / "tasks.db"
    return f"sqlite:///{path}", [str(tmp_path), "tasks.db", "a-file", "sqlite://"]


@pytest.mark.parametrize(
    "kind",
    ["redis down", "sqlite other layout", "sqlite not a database", "sqlite cannot be made"],
)
def test_a_failing_store_answers_a_generic_503_and_logs_the_detail(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, secrets_ = failing_store(kind, tmp_path)
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    api = Api(app)
    register_async(api, store=url, owner=lambda: "alice")
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    try:
        with caplog.at_level(logging.WARNING, logger="flask_restful_async.stores"):
            answers = [
                client.post("/echo", json={"a": 1}),
                client.get("/tasks/" + new_task_id()),
                client.get("/tasks"),
                client.delete("/tasks/" + new_task_id()),
                client.post("/echo", json={"a": 2}),
            ]
    finally:
        get_state(app).close()
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json == {"message": MESSAGE}
        assert int(answer.headers["Retry-After"]) >= 1
        shown = answer.get_data(as_text=True) + str(answer.headers)
        for secret in secrets_:
            assert secret not in shown
    logged = [r for r in caplog.records if r.name == "flask_restful_async.stores"]
    assert logged, "the detail is logged"
    # Five failures of one kind: logged once (rate-limited), naming the store.
    assert len(logged) == 1, [r.getMessage() for r in logged]
    text = logged[0].getMessage()
    assert secrets_[0] in text  # the host or the folder: what an operator needs
    assert "s3cret" not in text  # never a password, even in the log


def test_the_outage_log_counts_what_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    log = OutageLog(interval=0.2)
    with caplog.at_level(logging.WARNING, logger="flask_restful_async.stores"):
        for _ in range(3):
            assert log.unavailable("refused", "detail A").message == MESSAGE
        log.unavailable("timeout", "detail B")  # another kind: logged at once
        time.sleep(0.25)
        log.unavailable("refused", "detail A again")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "detail A",
        "detail B",
        "detail A again (and 2 more like it not logged in 0.2 s)",
    ]


def test_the_list_after_another_owners_id_answers_as_after_an_unknown_one(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Echo, "/echo")
    client = app.test_client()

    def submit(user: str) -> str:
        location = str(client.post("/echo", json=1, headers={"X-User": user}).headers["Location"])
        wait_for(lambda: client.get(location, headers={"X-User": user}).status_code == 200)
        return location.rsplit("/", 1)[1]

    submit("bob")
    submit("bob")
    alices = submit("alice")
    as_bob = {"X-User": "bob"}
    after_foreign = client.get(f"/tasks?cursor={alices}", headers=as_bob)
    after_unknown = client.get(f"/tasks?cursor={new_task_id()}", headers=as_bob)
    assert after_foreign.status_code == after_unknown.status_code == 200
    assert after_foreign.get_data() == after_unknown.get_data()
    assert after_foreign.json == {"tasks": [], "next": None}


# --- a task no worker takes ---------------------------------------------------------


def test_a_task_no_worker_started_within_queued_ttl_reads_lost(store: TaskStore) -> None:
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=30, queued_ttl=60)
    long_ago = time.time() - 61
    stale = store.create(new_task(owner="o", created_at=long_ago))
    stale_held = store.create(new_task(owner="o", created_at=long_ago - 1, worker="w"))
    running = store.create(
        new_task(
            owner="o",
            created_at=long_ago - 2,
            state=TaskState.RUNNING,
            started_at=long_ago,
            worker="w",
        )
    )  # started in time (in its request thread): it runs on
    fresh = store.create(new_task(owner="o"))
    # Listed by the state they read as, before any read of their own.
    assert [t.id for t in store.list(owner="o", state=TaskState.QUEUED)] == [fresh.id]
    lost = store.list(owner="o", state=TaskState.LOST)
    assert {t.id for t in lost} == {stale.id, stale_held.id}
    for task_id in (stale.id, stale_held.id):
        found = store.get(task_id)
        assert found is not None
        assert found.state is TaskState.LOST
        assert found.finished_at is not None
    # Recorded so: no worker starts it any more, and it stays lost.
    assert store.start(stale.id, "w") is None
    assert store.request_cancel(stale.id) is not None
    again = store.get(stale.id)
    assert again is not None
    assert again.state is TaskState.LOST
    for task_id, state in ((running.id, TaskState.RUNNING), (fresh.id, TaskState.QUEUED)):
        kept = store.get(task_id)
        assert kept is not None
        assert kept.state is state


# --- the queue of record: snapshots, claims, hand-backs -----------------------------

# A request snapshot as the submit stores it: opaque bytes, every byte value.
SNAPSHOT = b'{"v": 1}\n' + bytes(range(256)) * 6


def stored_snapshots(store: TaskStore) -> int:
    """How many snapshots the store keeps, read behind its back."""
    if isinstance(store, MemoryStore):
        return len(store._snapshots)
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as conn:
            query = "SELECT count(*) FROM tasks WHERE snapshot IS NOT NULL"
            return int(conn.execute(query).fetchone()[0])
    import redis

    with redis.Redis.from_url(CONTRACT_REDIS_URL) as client:
        return len(list(client.scan_iter(match=f"{store.prefix}snapshot:*")))  # type: ignore[attr-defined]


def test_handed_back_tasks_are_claimed_once_oldest_first_with_their_snapshots(
    store: TaskStore,
) -> None:
    for worker in ("taker", "late"):
        store.renew_lease(worker)
    tasks = {
        i: store.create(new_task(worker="w", created_at=BASE + i), SNAPSHOT + bytes([i]))
        for i in (2, 0, 1)
    }
    ids = [task.id for task in tasks.values()]
    assert store.claim("taker", 10) == []  # their holder is alive
    assert store.hand_back("w", [*ids, new_task_id()]) == 3
    assert store.hand_back("w", ids) == 0  # no longer held by w
    first = store.claim("taker", 2)
    assert [each.task.id for each in first] == [tasks[0].id, tasks[1].id]
    assert [each.snapshot for each in first] == [SNAPSHOT + b"\x00", SNAPSHOT + b"\x01"]
    for each in first:
        assert each.task.state is TaskState.QUEUED
        assert each.task.worker == "taker"
    second = store.claim("late", 5)
    assert [(each.task.id, each.snapshot) for each in second] == [(tasks[2].id, SNAPSHOT + b"\x02")]
    assert store.claim("late", 5) == []
    held = store.get(tasks[0].id)
    assert held is not None
    assert (held.state, held.worker) == (TaskState.QUEUED, "taker")
    started = store.start(tasks[0].id, "taker")
    assert started is not None
    assert started.state is TaskState.RUNNING
    with pytest.raises(ValueError, match="1 or more"):
        store.claim("taker", 0)


def test_claim_takes_only_queued_tasks_with_a_snapshot_in_time(store: TaskStore) -> None:
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=30, queued_ttl=60)
    store.renew_lease("w")
    claimable = store.create(new_task(worker="w"), SNAPSHOT)
    without_snapshot = store.create(new_task(worker="w"))
    cancelled = store.create(new_task(worker="w"), SNAPSHOT)
    store.request_cancel(cancelled.id)
    running = store.create(new_task(worker="w", rerun=True), SNAPSHOT)
    store.start(running.id, "w")
    stale = store.create(new_task(worker="w", created_at=time.time() - 61), SNAPSHOT)
    ids = [claimable.id, without_snapshot.id, cancelled.id, running.id, stale.id]
    assert store.hand_back("w", ids) == 3  # the queued ones, stale included
    assert [each.task.id for each in store.claim("w", 10)] == [claimable.id]
    lost = store.get(stale.id)
    assert lost is not None
    assert lost.state is TaskState.LOST
    kept = store.get(without_snapshot.id)
    assert kept is not None
    assert (kept.state, kept.worker) == (TaskState.QUEUED, None)


def test_hand_back_gives_up_only_the_workers_own_queued_tasks(store: TaskStore) -> None:
    store.renew_lease("other")
    mine = store.create(new_task(worker="w"), SNAPSHOT)
    mine_running = store.create(new_task(worker="w"), SNAPSHOT)
    store.start(mine_running.id, "w")
    theirs = store.create(new_task(worker="other"), SNAPSHOT)
    assert store.hand_back("w", [mine.id, mine_running.id, theirs.id]) == 1
    assert store.hand_back("w", []) == 0
    assert [each.task.id for each in store.claim("other", 10)] == [mine.id]


def test_the_snapshot_goes_when_the_task_starts_ends_or_is_deleted(store: TaskStore) -> None:
    started = store.create(new_task(worker="w"), SNAPSHOT)
    rerun = store.create(new_task(worker="w", rerun=True), SNAPSHOT)
    finished = store.create(new_task(worker="w"), SNAPSHOT)
    cancelled = store.create(new_task(worker="w"), SNAPSHOT)
    deleted = store.create(new_task(worker="w"), SNAPSHOT)
    store.create(new_task(worker="w"))
    assert stored_snapshots(store) == 5
    store.start(started.id, "w")
    store.start(rerun.id, "w")  # kept until it ends, in case its worker dies
    assert stored_snapshots(store) == 4
    store.finish(finished.id, TaskState.SUCCEEDED, RESPONSE)
    store.request_cancel(cancelled.id)
    store.delete(deleted.id)
    assert stored_snapshots(store) == 1
    store.request_cancel(rerun.id)  # a running task's cancel is a request only
    assert stored_snapshots(store) == 1
    store.finish(rerun.id, TaskState.CANCELLED)
    assert stored_snapshots(store) == 0


def test_an_idempotent_repeat_records_no_snapshot(store: TaskStore) -> None:
    first = store.create(new_task(owner="a", idempotency_key="k", worker="w"), SNAPSHOT)
    again = store.create(new_task(owner="a", idempotency_key="k", worker="w"), b"another")
    assert again.id == first.id
    assert stored_snapshots(store) == 1
    store.hand_back("w", [first.id])
    assert [each.snapshot for each in store.claim("w", 5)] == [SNAPSHOT]


def test_a_lease_outlives_a_store_outage_shorter_than_the_lease(
    shared_store: TaskStore,
) -> None:
    # Renewed every third of a lease, a lease ran out one lease after its last
    # renewal: a store that did not answer for two thirds of a lease (no renewal
    # got through) let a live process's lease lapse, and the first read once it
    # answered again ended that process's running tasks lost (and queued its
    # rerun_on_crash ones for another process, which ran them a second time).
    store = shared_store
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.6)
    store.renew_lease("w")
    running = store.create(new_task(worker="w"))
    assert store.start(running.id, "w") is not None
    rerun = store.create(new_task(worker="w", rerun=True), SNAPSHOT)
    assert store.start(rerun.id, "w") is not None
    # The next renewal was due a third of a lease on, when the store stopped
    # answering for most of a lease: the first read after finds them running.
    time.sleep(0.2 + 0.55)
    for task in (running, rerun):
        found = store.get(task.id)
        assert found is not None
        assert found.state is TaskState.RUNNING
    assert store.claim("other", 10) == []
    store.renew_lease("w")  # the renewal that follows the outage
    assert store.lease_hold == pytest.approx(0.6 + 0.2 + 0.4)


def test_a_lapsed_holders_tasks_are_claimable_lost_or_queued_again(
    shared_store: TaskStore,
) -> None:
    store = shared_store
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.2)
    store.renew_lease("alive")
    store.renew_lease("dying")
    queued = store.create(new_task(worker="dying", created_at=BASE), SNAPSHOT + b"q")
    queued_plain = store.create(new_task(worker="dying", created_at=BASE + 1))
    running = store.create(new_task(worker="dying", created_at=BASE + 2), SNAPSHOT)
    rerun = store.create(new_task(worker="dying", created_at=BASE + 3, rerun=True), SNAPSHOT + b"r")
    rerun_cancelled = store.create(
        new_task(worker="dying", created_at=BASE + 4, rerun=True), SNAPSHOT
    )
    for task in (running, rerun, rerun_cancelled):
        store.start(task.id, "dying")
        store.set_progress(task.id, Progress(1, 2))
    store.request_cancel(rerun_cancelled.id)
    time.sleep(0.25)  # held for store.lease_hold (0.4 s here)
    store.renew_lease("alive")
    time.sleep(0.25)
    # Listed by the state they read as, before any read of their own.
    listed = {
        state: {task.id for task in store.list(owner=None, state=state)}
        for state in (TaskState.QUEUED, TaskState.RUNNING, TaskState.LOST, TaskState.CANCELLED)
    }
    assert listed == {
        TaskState.QUEUED: {queued.id, rerun.id},
        TaskState.RUNNING: set(),
        TaskState.LOST: {queued_plain.id, running.id},
        TaskState.CANCELLED: {rerun_cancelled.id},
    }
    states = {}
    for task in (queued, queued_plain, running, rerun, rerun_cancelled):
        found = store.get(task.id)
        assert found is not None
        states[task.id] = found.state
    assert states == {
        queued.id: TaskState.QUEUED,
        queued_plain.id: TaskState.LOST,
        running.id: TaskState.LOST,
        rerun.id: TaskState.QUEUED,
        rerun_cancelled.id: TaskState.CANCELLED,
    }
    again = store.get(rerun.id)
    assert again is not None
    assert (again.worker, again.started_at, again.progress) == (None, None, None)
    claimed = store.claim("alive", 10)
    assert [(each.task.id, each.snapshot) for each in claimed] == [
        (queued.id, SNAPSHOT + b"q"),
        (rerun.id, SNAPSHOT + b"r"),
    ]
    restarted = store.start(rerun.id, "alive")
    assert restarted is not None
    assert (restarted.state, restarted.worker) == (TaskState.RUNNING, "alive")
    assert stored_snapshots(store) == 2  # the queued one's and the rerun one's


def test_a_lapsed_holders_tasks_are_settled_by_a_claim_without_any_read(
    shared_store: TaskStore,
) -> None:
    """Nobody polls them: the next claim still requeues the rerun task (and runs
    it again), and records the others as lost or cancelled."""
    store = shared_store
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.2)
    store.renew_lease("dying")
    queued = store.create(new_task(worker="dying", created_at=BASE), SNAPSHOT + b"q")
    plain = store.create(new_task(worker="dying", created_at=BASE + 1))
    running = store.create(new_task(worker="dying", created_at=BASE + 2), SNAPSHOT)
    rerun = store.create(new_task(worker="dying", created_at=BASE + 3, rerun=True), SNAPSHOT)
    rerun_cancelled = store.create(
        new_task(worker="dying", created_at=BASE + 4, rerun=True), SNAPSHOT
    )
    for task in (running, rerun, rerun_cancelled):
        store.start(task.id, "dying")
    store.request_cancel(rerun_cancelled.id)
    time.sleep(0.5)  # past store.lease_hold (0.4 s here)
    store.renew_lease("alive")
    claimed = store.claim("alive", 10)
    assert [each.task.id for each in claimed] == [queued.id, rerun.id]
    ended = {
        state: {task.id for task in store.list(owner=None, state=state)}
        for state in (TaskState.LOST, TaskState.CANCELLED)
    }
    assert ended == {
        TaskState.LOST: {plain.id, running.id},
        TaskState.CANCELLED: {rerun_cancelled.id},
    }
    again = store.start(rerun.id, "alive")
    assert again is not None
    assert (again.state, again.worker) == (TaskState.RUNNING, "alive")


def test_a_released_lease_makes_its_queued_tasks_claimable_at_once(
    shared_store: TaskStore,
) -> None:
    store = shared_store
    store.renew_lease("leaving")
    store.renew_lease("staying")
    task = store.create(new_task(worker="leaving"), SNAPSHOT)
    assert store.claim("staying", 5) == []
    store.release_lease("leaving")
    assert [each.task.id for each in store.claim("staying", 5)] == [task.id]
    # The new holder is alive: nobody else takes it.
    assert store.claim("another", 5) == []


def test_two_processes_claim_each_orphaned_task_exactly_once(
    shared_store: TaskStore, tmp_path: Path
) -> None:
    """1,000 tasks of a worker that died; two processes (tests/apps/claimer.py)
    claim at the same moment, in small batches, until nothing is left."""
    store = shared_store
    # Their worker held a lease, as a submitting process does; it lapses before
    # the claims.
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=1.0)
    store.renew_lease("gone")
    orphans = {store.create(new_task(worker="gone"), SNAPSHOT).id for _ in range(1000)}
    if isinstance(store, SQLiteStore):
        url, prefix = f"sqlite:///{store.path}", ""
    else:
        url, prefix = CONTRACT_REDIS_URL, store.prefix  # type: ignore[attr-defined]
    start_at = str(time.time() + 3.0)
    claimers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.apps.claimer", url, prefix, f"claimer-{i}", start_at],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for i in range(2)
    ]
    claimed: list[list[str]] = []
    try:
        for claimer in claimers:
            out, _ = claimer.communicate(timeout=60)
            assert claimer.returncode == 0
            claimed.append(out.split())
    finally:
        for claimer in claimers:
            if claimer.poll() is None:
                claimer.kill()
                claimer.wait()
    assert all(claimed), "both processes took part"
    assert len(claimed[0]) + len(claimed[1]) == len(orphans)
    assert set(claimed[0]) | set(claimed[1]) == orphans
    for worker, ids in (("claimer-0", claimed[0][:20]), ("claimer-1", claimed[1][:20])):
        for task_id in ids:
            found = store.get(task_id)
            assert found is not None
            assert found.worker == worker


def test_tasks_of_a_worker_that_is_gone_count_as_they_read(shared_store: TaskStore) -> None:
    """What operators count and list (the CLI's stats and list) follows the reading
    rules for a worker that is gone."""
    store = shared_store
    lost = Task(new_task_id(), owner="carol", worker="gone-1")
    claimable = Task(new_task_id(), owner="carol", worker="gone-2")
    store.create(lost)
    store.start(lost.id, "gone-1")
    store.create(claimable, b"a snapshot another process could run")
    for worker in ("gone-1", "gone-2"):
        store.release_lease(worker)
    stats = store.stats()
    assert stats.counts[TaskState.LOST] == 1
    assert stats.counts[TaskState.QUEUED] == 1
    assert stats.counts[TaskState.RUNNING] == 0
    assert stats.oldest_queued_at == pytest.approx(claimable.created_at)
    assert store.owner_stats("carol") == stats
    assert [task.id for task in store.list_all(state=TaskState.LOST)] == [lost.id]
    assert [task.id for task in store.list_all(state=TaskState.QUEUED)] == [claimable.id]


def test_owner_stats_count_one_owner_only(store: TaskStore) -> None:
    """The dashboard's counts for a caller who sees only their own tasks."""
    for owner, count in (("alice", 2), (None, 1), ("bob", 3)):
        for _ in range(count):
            store.create(Task(new_task_id(), owner=owner, worker="w"))
    running = Task(new_task_id(), owner="alice", worker="w")
    store.create(running)
    store.start(running.id, "w")
    done = Task(new_task_id(), owner="alice", worker="w")
    store.create(done)
    store.finish(done.id, TaskState.SUCCEEDED, RESPONSE)
    alice = store.owner_stats("alice")
    assert alice.counts[TaskState.QUEUED] == 2
    assert alice.counts[TaskState.RUNNING] == 1
    assert alice.counts[TaskState.SUCCEEDED] == 1
    assert sum(alice.counts.values()) == 4
    assert alice.oldest_queued_at is not None
    # The base class's default, from list(), for stores that do not count themselves.
    assert TaskStore.owner_stats(store, "alice") == alice
    assert store.owner_stats(None).counts[TaskState.QUEUED] == 1
    assert sum(store.owner_stats("nobody").counts.values()) == 0
    assert store.owner_stats("nobody").oldest_queued_at is None
