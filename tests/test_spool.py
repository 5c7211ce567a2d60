"""The SQLite store's snapshot spool: append-only segment files beside the database."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import typing as t
from pathlib import Path

import pytest

from flask_restful_async import StoreUnavailable, TaskState
from flask_restful_async.stores import SQLiteStore
from flask_restful_async.stores import spool as spool_module
from flask_restful_async.stores.spool import SUFFIX, SnapshotSpool, owner_tag
from flask_restful_async.task import Task, new_task_id


def segments(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(SUFFIX))


def test_appends_read_back_in_any_process_order(tmp_path: Path) -> None:
    spool = SnapshotSpool(str(tmp_path / "spool"))
    data = [os.urandom(size) for size in (1, 1000, 70_000, 0, 5)]
    references = [spool.append("w", each) for each in data]
    assert [spool.read(reference) for reference in references] == data
    assert len(segments(tmp_path / "spool")) == 1
    assert oct(os.stat(tmp_path / "spool").st_mode & 0o777) == "0o700"
    assert oct(os.stat(tmp_path / "spool" / segments(tmp_path / "spool")[0]).st_mode & 0o777) == (
        "0o600"
    )
    # Another reader of the same folder (another process) reads them too.
    assert SnapshotSpool(str(tmp_path / "spool")).read(references[2]) == data[2]
    spool.close()


@pytest.mark.parametrize(
    "reference",
    ["", "nothing", "a:b:c", f"../x{SUFFIX}:0:1", f"missing{SUFFIX}:0:1", "x:1", "::"],
)
def test_a_reference_that_names_nothing_reads_none(tmp_path: Path, reference: str) -> None:
    assert SnapshotSpool(str(tmp_path)).read(reference) is None


def test_bytes_past_the_end_of_a_segment_read_none(tmp_path: Path) -> None:
    spool = SnapshotSpool(str(tmp_path))
    reference = spool.append("w", b"12345")
    name, offset, _ = reference.rsplit(":", 2)
    assert spool.read(f"{name}:{offset}:6") is None
    assert spool.read(f"{name}:3:2") == b"45"
    spool.close()


def test_a_full_segment_is_followed_by_a_new_one(tmp_path: Path) -> None:
    spool = SnapshotSpool(str(tmp_path), segment_size=100)
    references = [spool.append("w", bytes([i]) * 60) for i in range(4)]
    names = [reference.rsplit(":", 2)[0] for reference in references]
    assert names[0] == names[1] != names[2] == names[3]
    assert [spool.read(reference) for reference in references] == [
        bytes([i]) * 60 for i in range(4)
    ]
    spool.close()


def test_a_segment_removed_under_its_writer_is_replaced_once_it_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "LINK_CHECK_INTERVAL", 0.0)
    spool = SnapshotSpool(str(tmp_path))
    first = spool.append("w", b"one")
    (tmp_path / first.rsplit(":", 2)[0]).unlink()
    second = spool.append("w", b"two")
    assert second.rsplit(":", 2)[0] != first.rsplit(":", 2)[0]
    assert spool.read(second) == b"two"
    assert spool.read(first) is None
    spool.close()


def test_collect_removes_only_what_no_task_and_no_writer_needs(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    alive = SnapshotSpool(str(folder), segment_size=10)
    dead = SnapshotSpool(str(folder), segment_size=10)
    collector = SnapshotSpool(str(folder))
    alive_old = alive.append("alive", b"x" * 10).rsplit(":", 2)[0]
    alive_current = alive.append("alive", b"y").rsplit(":", 2)[0]
    dead_referenced = dead.append("dead", b"z" * 10).rsplit(":", 2)[0]
    dead_current = dead.append("dead", b"w").rsplit(":", 2)[0]
    alive.close()
    dead.close()
    assert len({alive_old, alive_current, dead_referenced, dead_current}) == 4
    asked: list[int] = []

    def referenced() -> set[str]:
        asked.append(1)
        return {dead_referenced}

    # The live owner's newest segment stays (it may append again), its older one
    # goes; the dead owner's go but for the one a task still points into.
    assert collector.collect(referenced, ["alive"]) == 2
    assert segments(folder) == sorted([alive_current, dead_referenced])
    assert asked == [1]
    assert collector.collect(set, ["alive"]) == 1  # that task has started
    assert segments(folder) == [alive_current]
    # Nothing that could be removed: the task rows are not read at all.
    assert collector.collect(referenced, ["alive"]) == 0
    assert asked == [1]
    # A process never removes the segment it appends to, live lease or not.
    mine = collector.append("me", b"m").rsplit(":", 2)[0]
    assert collector.collect(set, []) == 1
    assert segments(folder) == [mine]
    collector.close()
    assert collector.collect(set, []) == 1
    assert segments(folder) == []


def test_two_spools_of_one_process_on_one_folder_keep_each_others_segments(
    tmp_path: Path,
) -> None:
    # Two stores (two apps) on one file: each took the other's current segment
    # for an old one of the same worker, and removed it.
    first, second = SnapshotSpool(str(tmp_path)), SnapshotSpool(str(tmp_path))
    references = [spool.append("w", b"snapshot") for spool in (first, second)]
    for spool in (first, second):
        assert spool.collect(set, ["w"]) == 0
    assert second.read(references[0]) == first.read(references[1]) == b"snapshot"
    first.close()
    second.close()


def test_owner_tags_are_short_names_whatever_the_worker_is_called() -> None:
    tags = {owner_tag(worker) for worker in ("host:1:ab", "host/2:cd", None, "é" * 300)}
    assert len(tags) == 4
    assert all(len(tag) == 16 and tag.isalnum() for tag in tags)


def test_a_forked_child_appends_to_a_segment_of_its_own(tmp_path: Path) -> None:
    spool = SnapshotSpool(str(tmp_path))
    parent = spool.append("w", b"parent")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            spool.after_fork()
            os.write(write, spool.append("w", b"child").encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child.rsplit(":", 2)[0] != parent.rsplit(":", 2)[0]
    assert spool.read(child) == b"child"
    assert spool.read(spool.append("w", b"again")) == b"again"
    assert spool.read(parent) == b"parent"
    spool.close()


# --- through the store ------------------------------------------------------------


def new_task(worker: str = "w", **fields: t.Any) -> Task:
    return Task(id=new_task_id(), worker=worker, **fields)


def test_the_store_keeps_snapshots_beside_its_file_and_claims_read_them(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    store.renew_lease("taker")
    task = store.create(new_task(), b"the request")
    assert segments(tmp_path / "tasks.db-snapshots") != []
    with contextlib.closing(sqlite3.connect(tmp_path / "tasks.db")) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
    assert "snapshots" not in tables  # the database keeps only where it lies
    store.hand_back("w", [task.id])
    [claimed] = store.claim("taker", 5)
    assert (claimed.task.id, claimed.snapshot) == (task.id, b"the request")
    store.close()


def test_a_snapshot_that_cannot_be_written_is_a_503_and_leaves_no_task(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    (tmp_path / "tasks.db-snapshots").write_text("a file where the folder should be")
    task = new_task()
    with pytest.raises(StoreUnavailable):
        store.create(task, b"the request")
    assert store.get(task.id) is None
    # Without a snapshot (a task no other process could take over) it still works.
    assert store.create(new_task()).state is TaskState.QUEUED
    store.close()


def test_a_snapshot_whose_segment_is_gone_is_claimed_empty(tmp_path: Path) -> None:
    """The taker cannot decode it and ends the task lost (see takeover)."""
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    task = store.create(new_task(), b"the request")
    store.close()  # the writer's segment is sealed: removing it is what collect does
    for name in segments(tmp_path / "tasks.db-snapshots"):
        (tmp_path / "tasks.db-snapshots" / name).unlink()
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    store.hand_back("w", [task.id])
    [claimed] = store.claim("taker", 5)
    assert (claimed.task.id, claimed.snapshot) == (task.id, b"")
    store.close()


def test_maintain_removes_the_segments_of_a_gone_process_once_its_tasks_started(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "tasks.db")
    folder = tmp_path / "tasks.db-snapshots"
    gone = SQLiteStore(path)
    gone.configure(result_ttl=3600, tombstone_ttl=3600, lease=0.2)
    gone.renew_lease("gone")
    tasks = [gone.create(new_task(worker="gone"), b"request %d" % i) for i in range(3)]
    gone.close()
    taker = SQLiteStore(path)
    taker.configure(result_ttl=3600, tombstone_ttl=3600, lease=30)
    taker.renew_lease("taker")
    time.sleep(0.5)  # the gone process's lease lapses (held 0.4 s for a 0.2 s lease)
    taker.maintain()
    assert len(segments(folder)) == 1  # its queued tasks still need it
    claimed = taker.claim("taker", 5)
    assert sorted(each.snapshot for each in claimed) == [b"request %d" % i for i in range(3)]
    for task in tasks[:2]:
        taker.start(task.id, "taker")
    taker.maintain()
    assert len(segments(folder)) == 1
    taker.start(tasks[2].id, "taker")
    taker.maintain()
    assert segments(folder) == []
    taker.close()
