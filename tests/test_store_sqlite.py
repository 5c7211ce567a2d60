"""The SQLite store: where its file lives, and what happens when it is busy."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask, request
from flask_restful import Api

from flask_restful_async import AsyncResource, StoreUnavailable, Task, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.stores import SQLiteStore, open_store
from flask_restful_async.stores import sqlite as sqlite_store
from flask_restful_async.stores.outages import MESSAGE
from flask_restful_async.task import StoredResponse, new_task_id

from .conftest import AppFactory, run_at_once, wait_done, wait_for


class Echo(AsyncResource):
    def post(self) -> t.Any:
        return {"echo": request.get_json()}


def test_the_default_store_is_a_sqlite_file_in_the_instance_folder(make_app: AppFactory) -> None:
    app, _ = make_app()
    store = get_state(app).store
    assert isinstance(store, SQLiteStore)
    assert store.path == str(Path(app.instance_path) / "restful_async.db")


def test_relative_paths_are_in_the_instance_folder_absolute_ones_are_not(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    relative = open_store("sqlite:///sub/tasks.db", app)
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db", app)
    assert isinstance(relative, SQLiteStore)
    assert isinstance(absolute, SQLiteStore)
    assert relative.path == str(tmp_path / "instance" / "sub" / "tasks.db")
    assert absolute.path == str(tmp_path / "abs.db")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_urls_without_a_file_are_refused(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no file"):
        open_store(url, Flask(__name__, instance_path=str(tmp_path)))


def test_results_survive_a_new_store_on_the_same_file(make_app: AppFactory, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    app, api = make_app(store=url)
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    location = client.post("/echo", json=[1, 2]).headers["Location"]
    assert wait_done(client, location).json == {"echo": [1, 2]}
    again, _ = make_app(store=url)
    assert again.test_client().get(location).json == {"echo": [1, 2]}


def test_a_locked_database_is_a_503_on_submit_and_leaves_no_task(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(str(path), timeout=0.2)
    app = Flask(__name__, instance_path=str(tmp_path))
    api = Api(app)
    register_async(api, store=store)
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    try:
        location = client.post("/echo", json=1).headers["Location"]
        wait_done(client, location)

        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        try:
            refused = client.post("/echo", json=2)
            assert refused.status_code == 503
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json is not None
            assert "not available" in refused.json["message"]
            assert client.get(location).status_code == 200  # readers are not blocked
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        tasks = store.list(owner=None)
        assert [task.id for task in tasks] == [location.rsplit("/", 1)[1]]
        assert tasks[0].state is TaskState.SUCCEEDED
        assert client.post("/echo", json=3).status_code == 202
    finally:
        get_state(app).close()


def test_writers_queued_behind_a_locked_file_each_get_their_503_within_the_timeout(
    tmp_path: Path,
) -> None:
    """Another process holds the file's write lock: the first writer of this process
    waits for it, the others wait for that writer; each answers within the store's
    timeout of its own start, not a whole timeout after the writer before it."""
    path = tmp_path / "locked.db"
    store = SQLiteStore(str(path), timeout=1.0)
    try:
        store.create(Task(id=new_task_id()))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        took: list[float] = []
        refused: list[BaseException] = []

        def submit() -> None:
            start = time.monotonic()
            try:
                store.create(Task(id=new_task_id()))
            except StoreUnavailable as e:
                refused.append(e)
            took.append(time.monotonic() - start)

        try:
            run_at_once(submit, 4)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert len(refused) == 4
        assert max(took) < 2.5, took  # one after another: about 1, 2, 3 and 4 s
        store.create(Task(id=new_task_id()))
        assert len(store.list(owner=None)) == 2
    finally:
        store.close()


def test_writers_queued_behind_writes_that_go_through_wait_past_the_timeout(
    tmp_path: Path,
) -> None:
    """Many threads of one process writing at once is no outage: a writer waits for
    the others as long as their writes go through, however long its turn takes."""
    store = SQLiteStore(str(tmp_path / "tasks.db"), timeout=0.1)
    try:
        store.create(Task(id=new_task_id()))
        busy = threading.Event()

        def slow_writes() -> None:
            # Writes of 20 ms each for 0.6 s, the write lock taken again at once.
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:
                with store._writing() as conn:
                    conn.execute("SELECT 1")
                    busy.set()
                    time.sleep(0.02)

        refused: list[BaseException] = []

        def submit() -> None:
            try:
                store.create(Task(id=new_task_id()))
            except StoreUnavailable as e:
                refused.append(e)

        writer = threading.Thread(target=slow_writes)
        writer.start()
        assert busy.wait(5)
        run_at_once(submit, 4)
        writer.join(30)
        assert refused == []
        assert len(store.list(owner=None)) == 5
    finally:
        store.close()


def test_a_writer_that_queued_gets_the_rest_of_the_timeout_then_the_whole_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(str(path), timeout=2.0)
    try:
        store.create(Task(id=new_task_id()))
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.5, blocker.execute, ("ROLLBACK",))
        release.start()
        made: list[Task] = []
        writers = [
            threading.Thread(target=lambda: made.append(store.create(Task(id=new_task_id()))))
            for _ in range(2)
        ]
        try:
            for writer in writers:
                writer.start()
            for writer in writers:
                writer.join(30)
        finally:
            release.join(5)
            blocker.close()
        assert len(made) == 2  # the second waited for the first, then wrote in time
        assert store._writer is not None
        assert store._writer.execute("PRAGMA busy_timeout").fetchone() == (2000,)
    finally:
        store.close()


def test_a_database_that_cannot_be_opened_is_a_503_for_submit_poll_and_list(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["RESTFUL_ASYNC_PUBLIC_LIST"] = True
    api = Api(app)
    register_async(api, store=f"sqlite:///{tmp_path}/a-file/tasks.db")
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    for response in (
        client.post("/echo", json=1),
        client.get("/tasks/" + "a" * 22),
        client.get("/tasks"),
    ):
        assert response.status_code == 503
        assert response.json is not None
        assert "message" in response.json
        assert int(response.headers["Retry-After"]) >= 1
    get_state(app).close()


def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    import os
    import time

    store = SQLiteStore(str(tmp_path / "fork.db"))
    store.configure(result_ttl=60, tombstone_ttl=60, lease=30)
    store.renew_lease("parent")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reports through the exit code
        code = 1
        try:
            store.renew_lease("child")
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while not os.waitpid(pid, os.WNOHANG)[0]:
        assert time.monotonic() < deadline, "child did not finish"
        time.sleep(0.01)
    store.renew_lease("parent")
    store.close()


def test_a_fork_with_the_spare_connections_full_does_not_hang_the_child(tmp_path: Path) -> None:
    # The child drops the other threads' local data before its at-fork handlers
    # run: their connections must not go to the spares (full), to be closed
    # through the gate that the parent's fork still holds shut.
    store = SQLiteStore(str(tmp_path / "fork.db"))
    release = threading.Event()

    def holds() -> None:
        store.get(new_task_id())
        release.wait(10)

    def uses() -> None:
        store.get(new_task_id())

    holding = [threading.Thread(target=holds) for _ in range(2)]
    ended = [threading.Thread(target=uses) for _ in range(sqlite_store.SPARE_CONNECTIONS)]
    for thread in [*holding, *ended]:
        thread.start()
    for thread in ended:
        thread.join(10)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - reports through the exit code
            os._exit(0)
        deadline = time.monotonic() + 10
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child hung before its own code ran")
            time.sleep(0.01)
    finally:
        release.set()
        for thread in holding:
            thread.join(10)
        store.close()


def test_the_purge_records_tasks_queued_past_queued_ttl_as_lost(tmp_path: Path) -> None:
    # Read one by one, they read lost; unread, they stayed queued rows for good:
    # never purged, and counted among the live tasks.
    path = tmp_path / "stale.db"
    store = SQLiteStore(str(path))
    store.configure(result_ttl=60, tombstone_ttl=60, lease=30, queued_ttl=3600)
    stale = store.create(Task(id=new_task_id(), created_at=time.time() - 7200))
    fresh = store.create(Task(id=new_task_id()))
    store.purge_expired()
    with sqlite3.connect(path) as raw:
        rows = dict(raw.execute("SELECT id, state FROM tasks").fetchall())
    assert rows == {stale.id: "lost", fresh.id: "queued"}
    store.close()


def test_a_file_of_this_layout_made_before_its_later_columns_gets_them(
    tmp_path: Path,
) -> None:
    # Files of layout 4 made before the response and request columns: every
    # statement failed with "no such column", a 503 for good.
    later = {name for name, _ in sqlite_store._LATER_COLUMNS}
    table, rest = sqlite_store._SCHEMA.split(") WITHOUT ROWID;", 1)
    kept = [line for line in table.splitlines() if line.strip().split(" ", 1)[0] not in later]
    schema = "\n".join(kept).rstrip(",") + "\n) WITHOUT ROWID;" + rest
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:
        raw.executescript(schema)
        raw.execute(f"PRAGMA user_version = {sqlite_store.SCHEMA_VERSION}")
        raw.execute(
            "INSERT INTO tasks (id, state, created_at) VALUES (?, 'queued', ?)",
            ("a" * 22, time.time()),
        )
    store = SQLiteStore(str(path))
    old = store.get("a" * 22)
    assert old is not None
    assert old.path is None
    task = store.create(Task(id=new_task_id(), method="POST", path="/x"))
    store.finish(task.id, TaskState.SUCCEEDED, StoredResponse(200, [], b"{}"))
    found = store.get(task.id)
    assert found is not None
    assert found.path == "/x"
    assert found.response == StoredResponse(200, [], b"{}")
    store.close()


def test_a_file_with_the_old_key_index_gets_the_new_one(tmp_path: Path) -> None:
    # The old index took owner "" for no owner; a file made with it is moved on.
    path = tmp_path / "keys.db"
    store = SQLiteStore(str(path))
    store.get(new_task_id())
    store.close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP INDEX tasks_by_owner_key")
        raw.execute(
            "CREATE UNIQUE INDEX tasks_by_key ON tasks (coalesce(owner, ''), idempotency_key)"
            " WHERE idempotency_key IS NOT NULL"
        )
    store = SQLiteStore(str(path))
    first = store.create(Task(id=new_task_id(), idempotency_key="k"))
    second = store.create(Task(id=new_task_id(), owner="", idempotency_key="k"))
    assert first.id != second.id
    store.close()
    with sqlite3.connect(path) as raw:
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_schema")}
    assert "tasks_by_owner_key" in names
    assert "tasks_by_key" not in names


def test_a_claim_that_cannot_read_a_snapshot_now_hands_its_task_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(str(tmp_path / "claim.db"))
    store.configure(result_ttl=60, tombstone_ttl=60, lease=30)
    store.renew_lease("taker")
    task = store.create(Task(id=new_task_id()), b"snapshot")

    def unreadable(reference: str) -> bytes | None:
        raise OSError(24, "Too many open files")

    with monkeypatch.context() as patched:
        patched.setattr(store._spool, "read", unreadable)
        with pytest.raises(StoreUnavailable):
            store.claim("taker", 5)
    found = store.get(task.id)
    assert found is not None
    assert found.worker is None  # not held by a taker that never got it
    assert [(each.task.id, each.snapshot) for each in store.claim("taker", 5)] == [
        (task.id, b"snapshot")
    ]
    store.close()


def test_a_fork_waits_for_a_write_of_another_thread_and_the_child_can_write(
    tmp_path: Path,
) -> None:
    # A short busy timeout: without the wait, the child's first write would find
    # the write lock of the parent's transaction held for good, and fail.
    store = SQLiteStore(str(tmp_path / "fork.db"), timeout=1.0)
    store.configure(result_ttl=60, tombstone_ttl=60, lease=30)
    store.renew_lease("parent")
    inside = threading.Event()

    def hold_a_write() -> None:
        with store._transaction() as conn:
            conn.execute("UPDATE leases SET expires_at = expires_at + 1")
            inside.set()
            time.sleep(0.3)

    writer = threading.Thread(target=hold_a_write)
    writer.start()
    try:
        assert inside.wait(5)
        forked_at = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - reports through the exit code
            code = 1
            try:
                store.renew_lease("child")
                store.create(Task(id=new_task_id()))
                code = 0
            finally:
                os._exit(code)
        waited = time.monotonic() - forked_at
        deadline = time.monotonic() + 10
        while not (done := os.waitpid(pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, "child did not finish"
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(done[1]) == 0
        assert waited >= 0.2  # the fork waited for the transaction to end
    finally:
        writer.join(5)
        store.close()


@pytest.mark.parametrize("layout", ["other tables", "a later version", "the previous version"])
def test_a_file_of_another_layout_is_refused_with_a_503(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tasks.db"
    versions = {"a later version": 999, "the previous version": sqlite_store.SCHEMA_VERSION - 1}
    with sqlite3.connect(path) as conn:
        if layout == "other tables":
            conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, response_body BLOB)")
        else:
            conn.execute(f"PRAGMA user_version = {versions[layout]}")
    conn.close()
    app = Flask(__name__)
    api = Api(app)
    register_async(api, store=f"sqlite:///{path}")
    api.add_resource(Echo, "/echo")
    response = app.test_client().post("/echo", json={"a": 1})
    assert response.status_code == 503
    assert response.json["message"] == MESSAGE
    assert response.headers["Retry-After"]
    # The operator learns which file, and why; the client neither.
    assert str(path) in caplog.text
    assert "is not a task store of this version" in caplog.text
    with sqlite3.connect(path) as conn:  # untouched
        assert conn.execute("PRAGMA user_version").fetchone()[0] == versions.get(layout, 0)
    conn.close()
    get_state(app).close()


# --- the file removed or replaced under a running store ---------------------------


def other_store_file(tmp_path: Path) -> Path:
    """A valid task store file of its own, to move over the one in use."""
    other = tmp_path / "elsewhere" / "tasks.db"
    made = SQLiteStore(str(other))
    made.renew_lease("someone")
    made.maintain()
    made.close()
    return other


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_a_file_removed_or_replaced_under_the_store_is_a_503_and_an_error(
    tmp_path: Path,
    change: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sqlite_store, "FILE_CHECK_INTERVAL", 0.05)
    path = tmp_path / "tasks.db"
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    api = Api(app)
    register_async(api, store=f"sqlite:///{path}", owner=lambda: "alice")
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    try:
        location = client.post("/echo", json=1).headers["Location"]
        assert wait_done(client, location).status_code == 200
        replacement = other_store_file(tmp_path) if change == "replaced" else None
        # Another process changes the file, while this one keeps its connections.
        subprocess.run(
            [sys.executable, "-c", CHANGE_FILE, str(path), str(replacement or "")],
            check=True,
            timeout=30,
        )
        time.sleep(0.1)
        with caplog.at_level(logging.ERROR, logger="flask_restful_async.stores"):
            answers = [
                client.get(location),
                client.post("/echo", json=2),
                client.get("/tasks"),
            ]
            # A thread that connects afterwards gets no new file of its own.
            in_thread: list[int] = []
            thread = threading.Thread(
                target=lambda: in_thread.append(client.get(location).status_code)
            )
            thread.start()
            thread.join(10)
        for answer in answers:
            assert answer.status_code == 503
            assert answer.json == {"message": MESSAGE}
            assert answer.headers["Retry-After"]
        assert in_thread == [503]
        assert str(path) in caplog.text
        assert "removed or replaced" in caplog.text
        assert path.exists() is (change == "replaced")
    finally:
        get_state(app).close()


def test_a_process_that_never_opened_a_removed_file_makes_no_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Only the processes that had the file open noticed its removal; one that had
    # not made a new, empty file and answered 202 on it, while the others answered
    # 503: the processes of one app split between two files.
    path = tmp_path / "tasks.db"
    first = SQLiteStore(str(path))
    first.create(Task(id=new_task_id(), worker="w"), b"a request")
    first.close()
    for name in ("tasks.db", "tasks.db-wal", "tasks.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    late = SQLiteStore(str(path))  # a process that had not used the store yet
    try:
        with (
            caplog.at_level(logging.ERROR, logger="flask_restful_async.stores"),
            pytest.raises(StoreUnavailable),
        ):
            late.create(Task(id=new_task_id(), worker="w2"))
        assert not path.exists()
        assert "the database file is missing" in caplog.text
        # Started afresh on purpose (the copies removed too), it makes its file.
        shutil.rmtree(f"{path}-snapshots")
        late.create(Task(id=new_task_id(), worker="w2"))
        assert path.exists()
    finally:
        late.close()


CHANGE_FILE = """
import os, sys
path, replacement = sys.argv[1], sys.argv[2]
if replacement:
    os.replace(replacement, path)
else:
    os.unlink(path)
"""


def test_the_listener_notices_a_removed_file_without_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sqlite_store, "FILE_CHECK_INTERVAL", 0.05)
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    store.renew_lease("w")
    stop = threading.Event()
    listener = threading.Thread(target=store.listen, args=(lambda *_: None, stop))
    with caplog.at_level(logging.ERROR, logger="flask_restful_async.stores"):
        listener.start()
        try:
            os.unlink(tmp_path / "tasks.db")
            wait_for(lambda: "removed or replaced" in caplog.text, timeout=5)
        finally:
            stop.set()
            listener.join(5)
            store.close()
    with pytest.raises(StoreUnavailable):
        store.get(new_task_id())


# --- the write-ahead log stays bounded ----------------------------------------------


def test_the_write_ahead_log_stays_bounded_under_polls(tmp_path: Path) -> None:
    """Polls that never stop kept every checkpoint from starting the log over: it
    grew to tens of MB and stayed there. After maintain() it is at most
    WAL_SIZE_LIMIT (the README's bound)."""
    path = tmp_path / "tasks.db"
    store = SQLiteStore(str(path))
    store.configure(result_ttl=3600, tombstone_ttl=3600, lease=60)
    store.renew_lease("w")
    response = StoredResponse(200, [("Content-Type", "application/json")], b"x" * 2000)
    ids: list[str] = []
    stop = threading.Event()

    def write(count: int) -> None:
        for _ in range(count):
            task = store.create(Task(id=new_task_id()))
            ids.append(task.id)
            store.start(task.id, "w")
            store.finish(task.id, TaskState.SUCCEEDED, response)

    def poll() -> None:
        while not stop.is_set():
            if ids:
                store.get(random.choice(ids))

    pollers = [threading.Thread(target=poll) for _ in range(3)]
    writers = [threading.Thread(target=write, args=(700,)) for _ in range(3)]
    try:
        for thread in pollers + writers:
            thread.start()
        for thread in writers:
            thread.join(120)
        store.maintain()  # while the polls go on
        wal = Path(f"{path}-wal").stat().st_size
    finally:
        stop.set()
        for thread in pollers:
            thread.join(10)
        store.close()
    assert len(ids) == 2100
    assert wal <= sqlite_store.WAL_SIZE_LIMIT, wal


def test_a_thread_of_its_own_copies_the_log_into_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CHECKPOINT_WRITES writes, a thread of the process checkpoints: no
    request waits for SQLite's own checkpoint to copy the whole log (the rows reach
    the database file itself, which a commit alone never writes)."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_WRITES", 3)
    path = tmp_path / "tasks.db"
    store = SQLiteStore(str(path))
    try:
        first = store.create(Task(id=new_task_id()))  # and the first purge: 2 writes
        assert store._checkpointer is None
        assert first.id.encode() not in path.read_bytes()  # in the log only
        second = store.create(Task(id=new_task_id()))  # the third write: a checkpoint
        third = store.create(Task(id=new_task_id()))
        checkpointer = store._checkpointer
        assert checkpointer is not None
        assert checkpointer.name == "restful-async-checkpoint"
        checkpointer.join(10)
        assert not checkpointer.is_alive()
        # What was committed when it began; the third write may come before or
        # after it (it began with the second write's turn).
        copied = path.read_bytes()
        assert first.id.encode() in copied
        assert store.get(second.id) is not None
        assert store.get(third.id) is not None
    finally:
        store.close()


def test_closing_a_store_waits_for_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_WRITES", 1)
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    store.create(Task(id=new_task_id()))
    checkpointer = store._checkpointer
    assert checkpointer is not None
    store.close()
    assert not checkpointer.is_alive()
    assert store._connections == []


def test_a_process_that_exits_leaves_no_write_ahead_log(tmp_path: Path) -> None:
    """Connections still open at exit (task threads, the lease) are closed then, so the
    file is left alone, without -wal and -shm beside it."""
    path = tmp_path / "tasks.db"
    script = (
        "import threading\n"
        "from flask_restful_async.stores import SQLiteStore\n"
        "from flask_restful_async.task import Task, new_task_id\n"
        f"store = SQLiteStore({str(path)!r})\n"
        "store.create(Task(new_task_id()))\n"
        "created = threading.Event()\n"
        "def work():\n"
        "    store.create(Task(new_task_id()))\n"
        "    created.set()\n"
        "    threading.Event().wait()  # a task thread still alive when the process ends\n"
        "threading.Thread(target=work, daemon=True).start()\n"
        "created.wait(10)\n"
    )
    run_and_find_only_the_file(script, tmp_path)
    assert len(SQLiteStore(str(path)).list(owner=None)) == 2


def run_and_find_only_the_file(script: str, folder: Path) -> None:
    """Run ``script`` in a process of its own; then ``folder`` holds its store's
    file alone: no write-ahead log (-wal, -shm) was left open at exit."""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert sorted(p.name for p in folder.iterdir()) == ["tasks.db"]


def test_threads_still_running_at_exit_open_no_connection_after_the_store_closed(
    tmp_path: Path,
) -> None:
    """A daemon thread the exit did not stop (a listener that outlived its join on a
    busy machine, a task past the shutdown timeout) runs until the interpreter
    ends: neither keeps nor opens a connection once the store closed at exit."""
    path = tmp_path / "tasks.db"
    script = (
        "import atexit, time\n"
        # Registered first, so it runs last: time for the threads to go on after
        # the store's close at exit.
        "atexit.register(time.sleep, 0.5)\n"
        "import threading\n"
        "from flask_restful_async.stores import SQLiteStore\n"
        "from flask_restful_async.task import Task, new_task_id\n"
        f"store = SQLiteStore({str(path)!r})\n"
        "task = store.create(Task(new_task_id()))\n"
        "heard = threading.Event()\n"
        "never = threading.Event()\n"
        "threading.Thread(\n"
        "    target=store.listen, args=(lambda _: heard.set(), never), daemon=True\n"
        ").start()\n"
        "def read():\n"
        "    while True:\n"
        "        try:\n"
        "            store.get(task.id)\n"
        "        except Exception:\n"
        "            pass\n"
        "        time.sleep(0.005)\n"
        "threading.Thread(target=read, daemon=True).start()\n"
        "heard.wait(10)\n"
    )
    run_and_find_only_the_file(script, tmp_path)


def test_closing_a_store_closes_its_listeners_connection_and_listening_goes_on(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    other = SQLiteStore(str(tmp_path / "tasks.db"))
    other.create(Task(id=new_task_id()))
    heard = threading.Event()
    stop = threading.Event()
    listener = threading.Thread(target=store.listen, args=(lambda _: heard.set(), stop))
    listener.start()
    try:
        assert heard.wait(5)
        (first,) = store._listening
        store.close()
        assert store._listening == set()
        with pytest.raises(sqlite3.ProgrammingError):
            first.execute("SELECT 1")  # closed
        heard.clear()
        other.create(Task(id=new_task_id()))
        assert heard.wait(5)  # a connection of its own again
        assert store._listening
        assert first not in store._listening
    finally:
        stop.set()
        listener.join(5)
        store.close()
        other.close()
    assert store._listening == set()


def test_threads_that_end_leave_their_connection_to_the_next(tmp_path: Path) -> None:
    """Under gevent every request is a greenlet with "thread-local" data of its own:
    a connection per request must not stay open for ever."""
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    try:
        task = store.create(Task(id=new_task_id()))
        for _ in range(3 * sqlite_store.SPARE_CONNECTIONS):
            reader = threading.Thread(target=store.get, args=(task.id,))
            reader.start()
            reader.join(5)
        wait_for(lambda: len(store._spares) >= 1)
        assert len(store._connections) <= sqlite_store.SPARE_CONNECTIONS + 1
        assert store.get(task.id) is not None  # this thread takes a spare
    finally:
        store.close()
    assert store._connections == []


def test_every_thread_of_a_process_writes_through_one_connection(tmp_path: Path) -> None:
    """A connection drops the pages it read whenever another one writes: one writer
    per process keeps its pages across the writes of sibling threads."""
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    try:
        made: list[Task] = []

        def submit_and_poll() -> None:
            task = store.create(Task(id=new_task_id()))
            assert store.get(task.id) == task
            store.finish(task.id, TaskState.SUCCEEDED)
            made.append(task)

        threads = [threading.Thread(target=submit_and_poll) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(made) == 4
        writer = store._writer
        assert writer is not None
        assert writer.total_changes >= 8
        readers = [conn for conn in store._connections if conn is not writer]
        assert readers  # the polls read through the threads' own connections
        assert all(conn.total_changes == 0 for conn in readers)
    finally:
        store.close()


def test_a_write_that_fails_leaves_the_writer_ready_for_the_next(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    try:
        first = store.create(Task(id=new_task_id()))

        def fail_midway() -> None:
            with store._transaction() as conn:
                conn.execute("UPDATE tasks SET state = 'running' WHERE id = ?", (first.id,))
                raise RuntimeError("the caller's own error, in the middle")

        with pytest.raises(RuntimeError):
            fail_midway()
        writer = store._writer
        assert writer is not None
        assert not writer.in_transaction
        got = store.get(first.id)
        assert got is not None
        assert got.state is TaskState.QUEUED  # rolled back
        # A transaction left open (a ROLLBACK that failed) is closed, or the writer
        # given up, before the next write.
        writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(RuntimeError), store._writing():
            raise RuntimeError("failed with the transaction open")
        assert store._writer is None or not store._writer.in_transaction
        second = store.create(Task(id=new_task_id()))
        assert store.get(second.id) == second
    finally:
        store.close()


def test_a_write_goes_on_when_no_checkpoint_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the interpreter's exit (the lease is released then) no thread starts."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_WRITES", 1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    try:
        task = store.create(Task(id=new_task_id()))
        assert store._checkpointer is None
        assert store.get(task.id) is not None
    finally:
        store.close()


def test_processes_that_start_together_on_a_new_file_all_write(tmp_path: Path) -> None:
    """The workers of a first deploy open the new file at the same moment. One of
    them switches it to WAL mode while the others open it, and SQLite answered
    those "database is locked" at once, without waiting its busy timeout: a 503."""
    path = tmp_path / "tasks.db"
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from flask_restful_async.stores import SQLiteStore\n"
        "from flask_restful_async.task import Task, new_task_id\n"
        "store = SQLiteStore(sys.argv[1])\n"
        "deadline = time.monotonic() + 20\n"
        "while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:\n"
        "    time.sleep(0.001)\n"
        "store.create(Task(new_task_id()))\n"
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(go)], stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    try:
        time.sleep(1.0)  # their imports done
        go.touch()
        errors = [worker.communicate(timeout=30)[1] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(10)
    assert [worker.returncode for worker in workers] == [0, 0, 0, 0], errors
    assert len(SQLiteStore(str(path)).list(owner=None)) == 4


def test_closing_a_store_waits_for_a_statement_another_thread_runs(tmp_path: Path) -> None:
    """A connection closed under a statement of another thread crashed the process
    (the outbox retried a write while a test closed the store: a segfault)."""
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    task = store.create(Task(id=new_task_id()))
    inside = threading.Event()
    after: list[t.Any] = []

    def write() -> None:
        with store._writing() as conn:
            inside.set()
            time.sleep(0.3)
            after.append(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert inside.wait(10)
        started = time.monotonic()
        store.close()
        assert time.monotonic() - started >= 0.2
    finally:
        writer.join(10)
    assert after == [1]  # its connection was still open for its statement
    assert store._connections == []
    assert store.get(task.id) is not None  # a later call opens a new one
    store.close()


@pytest.mark.parametrize("rerun", [False, True])
def test_a_lease_renewed_after_the_read_keeps_the_task_running(tmp_path: Path, rerun: bool) -> None:
    """A read found the worker's lease lapsed; the worker renewed it before the
    read's write: the task is neither lost (its outcome would be refused) nor,
    with rerun, queued for another process to run alongside."""
    store = SQLiteStore(str(tmp_path / "tasks.db"))
    store.configure(result_ttl=60, tombstone_ttl=60, lease=0.2)
    try:
        store.renew_lease("w")
        task = Task(id=new_task_id(), worker="w", rerun=rerun)
        store.create(task, b"snapshot")
        assert store.start(task.id, "w") is not None
        time.sleep(0.5)  # lapsed (held 0.4 s for a 0.2 s lease)
        [row] = store._select(f"{sqlite_store._SELECT} WHERE t.id = ?", (task.id,))
        store.renew_lease("w")  # the worker comes back between the read and its write
        read = store._read(row, time.time())
        assert read is not None
        assert (read.state, read.worker) == (TaskState.RUNNING, "w")
        stored = store.get(task.id)
        assert stored is not None
        assert stored.state is TaskState.RUNNING
        assert store.finish(task.id, TaskState.SUCCEEDED, None) is not None
    finally:
        store.close()
