"""``sqlite:///path``: the default store, a file shared by every process of one machine.

Write-ahead logging lets readers (polls) run alongside the one writer, every
transaction is a single short statement or ``BEGIN IMMEDIATE`` block, and each
thread of each process has its own connection, as SQLite requires. Results
survive restarts; a process that dies is detected through its lease.
"""

from __future__ import annotations

import atexit
import builtins
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import random
import sqlite3
import threading
import time
import types
import typing as t
import weakref

from ..exceptions import StoreUnavailable
from ..task import Progress, StoredResponse, Task, TaskState
from .base import ChangeCallback, Claimed, StopSignal, StoreStats, TaskStore
from .forkgate import ForkGate
from .spool import SnapshotSpool

#: Records changed per statement when reclaiming space, so that no purge holds the
#: write lock for long.
PURGE_BATCH = 500
#: Seconds between purges started by submits (the lease renewal purges too).
PURGE_INTERVAL = 5.0
#: Pages (4 KiB) the write-ahead log may grow to before a writer checkpoints it
#: itself, paying for the fsyncs inside a request while every other writer waits.
#: The background checkpoints below leave it little to copy.
WAL_AUTOCHECKPOINT_PAGES = 10_000
#: Writes of a process between two checkpoints it runs in a thread of its own
#: (see :meth:`SQLiteStore._checkpoint`): some 2,000 pages of log.
CHECKPOINT_WRITES = 500
#: Bytes the write-ahead log file is cut back to whenever SQLite starts it over
#: (``PRAGMA journal_size_limit``); :meth:`SQLiteStore.maintain` empties it.
WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: Seconds :meth:`SQLiteStore.maintain` waits for readers and writers to let its
#: checkpoint start the log over; it tries again next time if they do not.
CHECKPOINT_WAIT = 0.25
#: Seconds between two looks at which file the database path names (see
#: :meth:`SQLiteStore._check_file`).
FILE_CHECK_INTERVAL = 1.0
#: Seconds between two looks at the database's change counter by :meth:`SQLiteStore.listen`.
LISTEN_INTERVAL = 0.02
#: Seconds a fork waits for the SQLite calls of other threads to end (see
#: :mod:`~flask_restful_async.stores.forkgate`): longer than a store's busy
#: timeout, so that only a call stuck on another process is not waited for.
FORK_WAIT = 10.0
#: Connections of threads that ended kept open for the next threads, per store and
#: process. Under gevent every request is a greenlet of its own, with a
#: "thread-local" connection of its own: without this, each would open one.
SPARE_CONNECTIONS = 8

#: Bytes of a response (body and encoded headers) up to which it is kept in its task
#: row: a finish is one statement, and a poll reads one row. (Rows of a WITHOUT ROWID
#: table spill to overflow pages past about 1,000 bytes.) Larger ones go to the
#: results table.
INLINE_RESPONSE = 512

#: The layout of the file, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 4

# Tasks are small rows in a WITHOUT ROWID table (the id is the b-tree's key, so a
# submit writes two pages: the table's and the owner index's). A small response
# (status, headers, body) is kept in its task's row; larger ones live in a table of
# their own, found by their rowid (``result``): one more b-tree step for a poll, no
# index to keep. A task's request snapshot
# (the queue of record, for another process to take the task over) lies in a
# spool file beside the database (see .spool); ``snapshot`` says where, until the
# task starts. The request's endpoint, method and path come last: no read of the
# columns before them pays for them. Only tasks that no process holds (handed back, or freed from a
# lapsed lease) are in the claim index, so a submit adds nothing to it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress TEXT,
    owner TEXT,
    idempotency_key TEXT,
    fingerprint TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    expired INTEGER NOT NULL DEFAULT 0,
    result INTEGER,
    status INTEGER,
    headers TEXT,
    body BLOB,
    rerun INTEGER NOT NULL DEFAULT 0,
    snapshot TEXT,
    endpoint TEXT,
    method TEXT,
    path TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, created_at);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    status INTEGER NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_unheld ON tasks (created_at, id)
    WHERE worker IS NULL AND snapshot IS NOT NULL;
CREATE TABLE IF NOT EXISTS blobs (
    key TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    worker TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""
# What files of this layout get as they are opened (see _ensure_schema), by name:
# processes of an earlier version, sharing the file during a deploy, never name
# them.
# - tasks_ended: ended tasks by finish time, with their state: for purges, and for
#   stats() to count them from the index alone, never reading a row.
# - tasks_open: the few active (unfinished) tasks, for stats() to find without a
#   scan. By creation time, which a start does not change: only a submit and an
#   end touch it.
_EXTRAS = {
    "tasks_ended": "CREATE INDEX tasks_ended ON tasks (finished_at, state)"
    " WHERE finished_at IS NOT NULL",
    "tasks_open": "CREATE INDEX tasks_open ON tasks (created_at) WHERE finished_at IS NULL",
    # Idempotency keys, unique per owner; an owner "" is not "no owner" (see _BY_KEY).
    "tasks_by_owner_key": "CREATE UNIQUE INDEX tasks_by_owner_key ON tasks"
    " (owner IS NULL, coalesce(owner, ''), idempotency_key) WHERE idempotency_key IS NOT NULL",
}
# What files of an earlier version of this layout may hold, and this one drops: the
# index of idempotency keys that took owner "" for no owner, the index tasks_ended
# replaces, and the counts per minute of finish time that triggers kept (a write of
# one more table on every end, for a scrape's sake).
_REPLACED = {
    "tasks_by_key": "DROP INDEX IF EXISTS tasks_by_key",
    "tasks_by_finish": "DROP INDEX IF EXISTS tasks_by_finish",
    "ended_update": "DROP TRIGGER IF EXISTS ended_update",
    "ended_delete": "DROP TRIGGER IF EXISTS ended_delete",
    "ended": "DROP TABLE IF EXISTS ended",
}

_COLUMNS = (
    "id, state, created_at, started_at, finished_at, progress, owner, idempotency_key,"
    " fingerprint, cancel_requested, worker"
)
# The request that made a task, at the end of every row read (see _task).
_REQUEST = "endpoint, method, path"
# What UPDATE ... RETURNING gives back: a task's row, laid out as _SELECT's, without
# its response, lease and snapshot.
_RETURNING = f"RETURNING {_COLUMNS}, NULL, NULL, NULL, expired, rerun, NULL, NULL, {_REQUEST}"


def _select(response: str, join: str = "") -> str:
    """A task's row as :meth:`SQLiteStore._read` takes it, with ``response`` as the
    response's headers and body columns and ``join`` added to the join of the
    results table: the reads below differ in these alone."""
    return (
        "SELECT t.id, t.state, t.created_at, t.started_at, t.finished_at, t.progress, t.owner,"
        " t.idempotency_key, t.fingerprint, t.cancel_requested, t.worker,"
        f" coalesce(t.status, r.status), {response},"
        " t.expired, t.rerun,"
        " CASE WHEN t.state IN ('queued', 'running')"
        " THEN (SELECT l.expires_at FROM leases AS l WHERE l.worker = t.worker) END,"
        " t.snapshot, t.endpoint, t.method, t.path"
        f" FROM tasks AS t LEFT JOIN results AS r ON r.id = t.result{join}"
    )


_RESPONSE = "coalesce(t.headers, r.headers), coalesce(t.body, r.body)"
# A task with its response and, while it is active, the expiry of its worker's
# lease and its snapshot's id: one read per poll, and no lease lookup once the task
# has finished.
_SELECT = _select(_RESPONSE)
_GET = f"{_SELECT} WHERE t.id = ?"
# The same as a list shows a task: of its response the status code alone (a list
# stream's "done" event tells it), never the headers and body, which a page of
# status documents does not need and which may weigh megabytes (see
# TaskStore.list). A large result's status is the first column of its row: read
# without its overflow pages.
_LISTED = _select("'', x''")
# The same for one owner (bind: owner, id, owner): the response is joined only
# when the owner matches, and a row of another owner is never returned.
_GET_OWNED = _select(_RESPONSE, " AND t.owner IS ?") + " WHERE t.id = ? AND t.owner IS ?"
# Several tasks at once (see get_many): one statement per size of list, the ids
# padded to the next size by repeating one.
_GET_MANY_SIZES = (8, 32, 128)
_GET_MANY = {size: f"{_SELECT} WHERE t.id IN ({', '.join('?' * size)})" for size in _GET_MANY_SIZES}
_INSERT = (
    f"INSERT INTO tasks ({_COLUMNS}, rerun, snapshot, {_REQUEST})"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ACTIVE = "('queued', 'running')"
# A task that ran to its end before it was recorded (see create_finished), with its
# response in the row or, if large, in the results table. One recorded as running
# meanwhile (by a call whose outcome its caller did not learn) ends now.
_INSERT_FINISHED = (
    f"INSERT INTO tasks ({_COLUMNS}, rerun, snapshot, {_REQUEST}, status, headers, body, result)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
    " finished_at = excluded.finished_at, progress = excluded.progress,"
    " status = excluded.status, headers = excluded.headers, body = excluded.body,"
    f" result = excluded.result, snapshot = NULL WHERE tasks.state IN {_ACTIVE}"
)
# A task by owner and idempotency key, in the terms of the index tasks_by_owner_key
# (so that it serves the lookup): parameters owner, owner, key.
_BY_KEY = (
    "(t.owner IS NULL) = (? IS NULL) AND coalesce(t.owner, '') = coalesce(?, '')"
    " AND t.idempotency_key = ?"
)
_ACTIVE_VALUES = frozenset(("queued", "running"))
_STATES = {state.value: state for state in TaskState}
# True for a task whose worker holds no live lease (bind: now).
_LAPSED = (
    "(t.worker IS NOT NULL AND coalesce("
    "(SELECT l.expires_at FROM leases AS l WHERE l.worker = t.worker), 0) < ?)"
)
# The same in an UPDATE of the tasks table.
_STILL_LAPSED = _LAPSED.replace("t.worker", "tasks.worker")
# True for a task that no worker started in time (bind: now - queued_ttl).
_STALE = "(t.state = 'queued' AND t.created_at < ?)"
# How an active task reads, for list() to filter on: (condition, the names of the
# values it binds, in order: "now", or "stale" for now - queued_ttl). A queued
# task of a lapsed worker stays queued when another process can claim it (it has
# a snapshot); a running one with ``rerun`` goes back to the queue (or ends
# cancelled, if that was asked).
_READS_AS: dict[TaskState, tuple[str, tuple[str, ...]]] = {
    TaskState.QUEUED: (
        f"((t.state = 'queued' AND NOT {_STALE} AND (t.snapshot IS NOT NULL OR NOT {_LAPSED}))"
        f" OR (t.state = 'running' AND t.rerun = 1 AND t.cancel_requested = 0 AND {_LAPSED}))",
        ("stale", "now", "now"),
    ),
    TaskState.RUNNING: (f"(t.state = 'running' AND NOT {_LAPSED})", ("now",)),
    TaskState.LOST: (
        f"(t.state = 'lost' OR (t.state = 'queued' AND ({_STALE} OR"
        f" (t.snapshot IS NULL AND {_LAPSED})))"
        f" OR (t.state = 'running' AND t.rerun = 0 AND {_LAPSED}))",
        ("stale", "now", "now"),
    ),
    TaskState.CANCELLED: (
        "(t.state = 'cancelled' OR (t.state = 'running' AND t.rerun = 1"
        f" AND t.cancel_requested = 1 AND {_LAPSED}))",
        ("now",),
    ),
}
# The tasks claim() may take, oldest first (bind: now - queued_ttl, limit): those
# no process holds (see _ORPHAN), through the partial index tasks_unheld.
_CLAIMABLE = (
    "SELECT id FROM tasks WHERE worker IS NULL AND snapshot IS NOT NULL"
    " AND state = 'queued' AND cancel_requested = 0 AND created_at >= ?"
    " ORDER BY created_at, id LIMIT ?"
)
# Each task's state as it reads (the rules of SQLiteStore._read, in SQL; bind ?2:
# stale, ?3: now), with the count and earliest creation time of each, for stats().
_SEEN = """
SELECT CASE
    WHEN t.state = 'queued' AND t.created_at < ?2 THEN 'lost'
    WHEN t.state IN ('queued', 'running') AND t.worker IS NOT NULL AND coalesce(
        (SELECT l.expires_at FROM leases AS l WHERE l.worker = t.worker), 0) < ?3 THEN
        CASE
            WHEN t.state = 'queued' AND t.snapshot IS NOT NULL THEN 'queued'
            WHEN t.state = 'running' AND t.rerun = 1 AND t.cancel_requested = 1 THEN 'cancelled'
            WHEN t.state = 'running' AND t.rerun = 1 THEN 'queued'
            ELSE 'lost'
        END
    ELSE t.state
END AS seen, count(*), min(t.created_at)
"""
# Live tasks counted by the state they read as (bind: fresh_after, stale, now), in
# one statement (one snapshot), through _EXTRAS. Active tasks (a few rows, found
# through tasks_open): a queued task that waited too long is lost; one whose worker
# holds no lease is lost, unless it waits to be claimed (queued, with a snapshot) or
# goes back to the queue (running with rerun; cancelled if that was asked); with the
# earliest creation time of each state, for the oldest queued task. Ended tasks:
# those that ended since fresh_after, counted in tasks_ended alone (it holds both
# columns: no row is read). A tombstone (expired = 1) ended before fresh_after.
_COUNT_BY_STATE = f"""
{_SEEN.strip()}
FROM tasks AS t INDEXED BY tasks_open WHERE t.finished_at IS NULL
GROUP BY seen
UNION ALL
SELECT state, count(*), NULL FROM tasks INDEXED BY tasks_ended
WHERE finished_at IS NOT NULL AND finished_at >= ?1
GROUP BY state
"""
# One owner's live tasks counted by the state they read as (bind: fresh_after,
# stale, now, owner), through the index of owners: every row of that owner, ended
# ones included (the buckets of ``ended`` do not tell owners apart).
_OWNER_STATS = f"""
{_SEEN.strip()}
FROM tasks AS t WHERE t.owner IS ?4 AND t.expired = 0
    AND (t.finished_at IS NULL OR t.finished_at >= ?1)
GROUP BY seen
"""
# What becomes of the active tasks of a worker that is gone, in this order (bind:
# worker; then now, worker): those another process can run (queued with their
# request, or running with ``rerun``) wait again, held by none, for claim(); the
# others end, recorded so: cancelled if that was asked of a ``rerun`` one, lost
# otherwise. Scans of the table, but once per worker that dies or leaves.
_ORPHAN = (
    "UPDATE tasks SET state = 'queued', worker = NULL, started_at = NULL, progress = NULL"
    " WHERE worker = ? AND snapshot IS NOT NULL AND cancel_requested = 0"
    " AND (state = 'queued' OR (state = 'running' AND rerun = 1))",
    "UPDATE tasks SET finished_at = ?, snapshot = NULL, state = CASE"
    " WHEN state = 'running' AND rerun = 1 AND cancel_requested = 1 THEN 'cancelled'"
    f" ELSE 'lost' END WHERE worker = ? AND state IN {_ACTIVE}",
)


class SQLiteStore(TaskStore):
    """Tasks in one SQLite file, for every process and thread of one machine.

    ``path`` is the database file; its folder is created if missing. ``timeout``
    is how long a statement waits for another writer before the store reports
    itself unavailable (503).
    """

    shared = True

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        if sqlite3.sqlite_version_info < (3, 35, 0):
            raise RuntimeError(
                f"the sqlite store needs SQLite 3.35 or newer, this Python has"
                f" {sqlite3.sqlite_version}"
            )
        self.path = os.path.abspath(path)
        self.url = f"sqlite:///{self.path}"
        self.timeout = timeout
        self._local = threading.local()
        # Each thread's connection, held by the thread's local data (see _Held).
        self._held: weakref.WeakSet[_Held] = weakref.WeakSet()
        self._spares: collections.deque[sqlite3.Connection] = collections.deque()
        # Connections a forked child inherited: never used, never closed by it.
        self._inherited: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        # The one connection this process writes with, under _write_lock (see
        # _writing); reads go through each thread's own.
        self._writer: sqlite3.Connection | None = None
        self._next_purge = 0.0
        # (st_dev, st_ino) of the file this store opened first; the file at
        # ``path`` is compared with it every FILE_CHECK_INTERVAL seconds.
        self._identity: tuple[int, int] | None = None
        self._check_at = 0.0
        self._replaced = False
        self._spool = SnapshotSpool(self.path + "-snapshots")
        # Writes since the last background checkpoint, and its thread.
        self._writes = 0
        self._checkpointer: threading.Thread | None = None
        # When the last write of this process ended (monotonic): writers queued
        # behind others wait as long as writes go through (see _Access).
        self._write_ended = 0.0
        # The connections of listen() calls running here (see there).
        self._listening: set[sqlite3.Connection] = set()
        # Closed as the process exits: no connection opens again (see _close_at_exit).
        self._ended = False
        _stores.add(self)

    # -- connections -------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if time.monotonic() >= self._check_at:
            self._check_file()
        try:
            conn: sqlite3.Connection | None = self._local.held.conn
        except AttributeError:
            conn = None
        if conn is None:
            try:
                conn = self._spares.pop()
            except IndexError:
                conn = self._connect()
            held = self._local.held = _Held(self, conn)
            with self._lock:
                self._held.add(held)
        return conn

    def _writer_connection(self) -> sqlite3.Connection:
        """The connection every write of this process goes through (its caller
        holds the write lock)."""
        if time.monotonic() >= self._check_at:
            self._check_file()
        if self._writer is None:
            self._writer = self._connect()
        self._writes += 1
        if self._writes >= CHECKPOINT_WRITES:
            self._writes = 0
            self._start_checkpoint()
        return self._writer

    def _start_checkpoint(self) -> None:
        """Run :meth:`_checkpoint` in a thread, unless the last one still runs."""
        running = self._checkpointer
        if running is not None and running.is_alive():
            return
        # Not a daemon: the interpreter's exit waits for it (a fraction of a second)
        # before it closes the stores (see _close_at_exit).
        thread = threading.Thread(target=self._checkpoint, name="restful-async-checkpoint")
        try:
            thread.start()
        except RuntimeError:
            # No thread to be had (at the interpreter's exit, or none left): the
            # write goes on, and SQLite's own limit keeps the log bounded.
            return
        self._checkpointer = thread

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database, in a thread of its own.

        A commit in WAL mode only appends to the log. SQLite copies the log into
        the database in the commit that finds it past ``WAL_AUTOCHECKPOINT_PAGES``:
        that request then waits for the copy and two fsyncs while every writer
        of every process waits for it (about 130 ms for 10,000 pages here). A
        passive checkpoint takes no lock that writers or readers wait for, so run
        every ``CHECKPOINT_WRITES`` writes it does most of that work beside them,
        and the commit that reaches the limit finds little left to copy.
        """
        try:
            with self._reading() as conn:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception:
            # SQLite's own limit, and maintain(), still empty the log.
            _logger.debug("A background checkpoint of %s failed", self.url, exc_info=True)

    def _writer_failed(self) -> None:
        """After a write that failed: the writer leaves no transaction open for the
        next one, or is given up (the next write opens another)."""
        writer = self._writer
        if writer is None or not writer.in_transaction:
            return
        try:
            writer.execute("ROLLBACK")
        except Exception:
            self._drop_writer(writer)

    def _restore_busy_timeout(self) -> None:
        """The writer's wait for SQLite's lock back to the whole timeout, after a
        write that had less of it left (see _Access); the caller holds the write lock."""
        writer = self._writer
        if writer is not None:
            try:
                writer.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            except sqlite3.Error:
                self._drop_writer(writer)

    def _drop_writer(self, writer: sqlite3.Connection) -> None:
        """Give up the writer connection, which a statement left in a state of
        doubt: the next write opens another, set up as usual."""
        self._writer = None
        with contextlib.suppress(Exception):
            writer.close()

    @property
    def _connections(self) -> list[sqlite3.Connection]:
        """The connections open in this process (threads', spare, the writer)."""
        with self._lock:
            held = [h.conn for h in self._held if h.conn is not None]
        writer = [] if self._writer is None else [self._writer]
        return held + list(self._spares) + writer

    def _spare(self, conn: sqlite3.Connection) -> None:
        """A thread that ended leaves its connection: keep it for another, or close
        it. Runs wherever the thread's local data is dropped: it never raises."""
        try:
            if len(self._spares) < SPARE_CONNECTIONS and not conn.in_transaction:
                self._spares.append(conn)
            else:
                _close(conn)
        except Exception:
            pass

    def _check_file(self) -> None:
        """Raise ``StoreUnavailable``, from now on, once the file at :attr:`path`
        is no longer the one this store opened first (removed or replaced).

        The connections that are open would go on with the old file and new ones
        would make another: processes and threads would each see their own tasks.
        Every operation answers 503 instead, and the log says which file to mend.
        """
        if not self._replaced:
            self._check_at = time.monotonic() + FILE_CHECK_INTERVAL
            if self._identity is None:
                return
            try:
                found = os.stat(self.path)
            except FileNotFoundError:
                pass
            except OSError:
                return  # not ours to judge: connecting reports it
            else:
                if (found.st_dev, found.st_ino) == self._identity:
                    return
            self._replaced = True
            self._check_at = 0.0  # every later call raises
        raise self.unavailable(
            "replaced",
            "the database file was removed or replaced while in use;"
            " restore it or restart every process that uses it",
            level=logging.ERROR,
        )

    def _connect(self) -> sqlite3.Connection:
        if self._closed_at_exit():
            raise self.unavailable(
                "ended", "the process is exiting and closed it", level=logging.DEBUG
            )
        conn: sqlite3.Connection | None = None
        known = self._identity is not None
        if known:
            # Before opening: SQLite would recover the old file's log into a new one.
            self._check_file()
        elif not os.path.exists(self.path) and self._spool.holds_segments():
            # This process never opened the file, but others did: their request
            # copies are still there. Made anew here, it would split the processes
            # between two files (those that had it open answer 503, see _check_file).
            raise self.unavailable(
                "removed",
                "the database file is missing, but the request copies written with it"
                f" ({self._spool.folder}) are not: it was removed while in use; restore"
                " it, or remove that folder too to start afresh",
                level=logging.ERROR,
            )
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            conn = sqlite3.connect(
                # Once the file is known, never make another in its place.
                pathlib.Path(self.path).as_uri() + "?mode=rw" if known else self.path,
                uri=known,
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                _use_wal(conn, self.timeout)
            # WAL with synchronous=NORMAL stays consistent on a crash; a power loss
            # may lose the last commits, which a 202 client would then see as 404.
            conn.execute("PRAGMA synchronous = NORMAL")
            # Checkpoints (the only fsyncs in WAL mode) run in threads of their own
            # (_checkpoint) and in the lease renewal (maintain()): the commit that
            # reaches this limit finds little left to copy.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            _ensure_schema(conn, self)
            if known:
                self._check_file()
            else:
                found = os.stat(self.path)
                self._identity = (found.st_dev, found.st_ino)
        except BaseException as e:
            if conn is not None:
                conn.close()
            if known and _is_outage(e):
                self._check_file()  # a removed file fails to open: say that
            if _is_outage(e):
                raise self._outage(e) from e
            raise
        return conn

    def _outage(self, exc: BaseException) -> StoreUnavailable:
        return self.unavailable(str(exc), f"{type(exc).__name__}: {exc}")

    def _reading(self) -> _Access:
        """The thread's connection, with outages raised as ``StoreUnavailable``."""
        return _Access(self, None)

    def _writing(self) -> _Access:
        """The same for writes, which the threads of this process take in turns,
        on one connection of the process.

        SQLite lets one writer in at a time and makes the others wait in a busy
        handler that sleeps in steps of milliseconds; queueing on a Python lock
        first keeps that for writers of other processes only. One connection for
        the writes: a connection drops the pages it had read whenever another one
        wrote to the file, and with one per thread, every write of a sibling
        thread made the next writer read its pages again (counted in the
        end-to-end benchmark: about 7 reads of the file per task, now 4).
        """
        return _Access(self, self._write_lock)

    @contextlib.contextmanager
    def _transaction(self) -> t.Iterator[sqlite3.Connection]:
        """A write transaction that takes the write lock at once (no upgrade deadlock)."""
        with self._writing() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _after_fork(self) -> None:
        # Locks held by threads that do not exist in the child would never be freed.
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        # A connection must never cross a fork: the child opens its own. It keeps
        # the parent's open but untouched, since closing one could checkpoint or
        # remove the write-ahead log under the parent's feet.
        self._inherited += self._retire()
        self._local = threading.local()
        self._spool.after_fork()
        self._checkpointer = None  # a thread of the parent

    def _retire(self) -> list[sqlite3.Connection]:
        """Take every connection from the threads, the listeners, the spares and the
        writer, for good."""
        with self._lock:
            held, self._held = list(self._held), weakref.WeakSet()
            connections = list(self._listening)
            self._listening.clear()
        connections += self._spares
        self._spares.clear()
        if self._writer is not None:
            connections.append(self._writer)
            self._writer = None
        for each in held:
            if each.conn is not None:
                connections.append(each.conn)
                each.conn = None  # never spared: it is closed (or inherited)
        return connections

    def close(self) -> None:
        checkpointer = self._checkpointer
        if checkpointer is not None and checkpointer is not threading.current_thread():
            checkpointer.join(self.timeout)  # it uses a connection of this store
        # A connection closed while another thread runs a statement on it (a task
        # thread's write, the outbox retrying one) crashes the process: the
        # connections are taken once no thread is inside SQLite. Threads that come
        # later open new ones (unless the process is exiting: _close_at_exit).
        _GATE.close(_CLOSE_WARNING)
        try:
            connections = self._retire()
        finally:
            _GATE.open()
        for conn in connections:
            _close(conn)
        self._local = threading.local()
        self._spool.close()

    # -- reading -------------------------------------------------------------------

    @staticmethod
    def _task(row: t.Sequence[t.Any]) -> Task:
        # On every poll: plain lookups rather than Enum calls and generic code.
        status, headers, progress = row[11], row[12], row[5]
        return Task(
            row[0],
            _STATES[row[1]],
            row[2],
            row[3],
            row[4],
            Progress.from_dict(json.loads(progress)) if progress is not None else None,
            row[6],
            row[7],
            row[8],
            row[9] == 1,
            row[10],
            StoredResponse(status, list(_decoded_headers(headers)), row[13])
            if status is not None
            else None,
            row[14] == 1,
            row[15] == 1,
            row[18],
            row[19],
            row[20],
        )

    def _read(self, row: t.Sequence[t.Any], now: float) -> Task | None:
        """A row of ``_SELECT`` as clients see it: the rules of a lapsed lease and
        of a task that waited too long for a worker (see :class:`TaskStore`),
        retention."""
        task = self._task(row)
        if row[1] in _ACTIVE_VALUES:
            lease_expires = row[16]
            lapsed = task.worker is not None and (lease_expires is None or lease_expires < now)
            if row[1] == "queued" and row[2] < now - self.queued_ttl:
                self._move(task, TaskState.LOST, now)
            elif not lapsed or (row[1] == "queued" and row[17] is not None):
                return task  # alive, or claimable by another process
            elif task.rerun:
                moved = TaskState.CANCELLED if task.cancel_requested else TaskState.QUEUED
                self._move(task, moved, now, lapsed=True)
                return task
            else:
                self._move(task, TaskState.LOST, now, lapsed=True)
        elif row[4] is not None and now - row[4] <= self.result_ttl:  # the common case
            return task
        return self.retention_view(task, now)

    def _move(self, task: Task, state: TaskState, now: float, *, lapsed: bool = False) -> None:
        """Record what ``task`` (active, as read) has become: ended (its snapshot
        dropped), or queued again without worker; unless someone else moved it on
        meanwhile, or (``lapsed``: moved for its worker's lease, read lapsed) its
        worker renewed that lease since the read: then ``task`` becomes what the
        store holds."""
        # The lease, checked again in the write: a process that renewed it just
        # after the read still runs the task, which must neither read lost nor
        # be queued for another process to run at the same time.
        still = f" AND {_STILL_LAPSED}" if lapsed else ""
        bound = (now,) if lapsed else ()
        with self._writing() as conn:
            if state is TaskState.QUEUED:
                changed = conn.execute(
                    "UPDATE tasks SET state = 'queued', worker = NULL, started_at = NULL,"
                    f" progress = NULL WHERE id = ? AND state = ? AND worker IS ?{still}",
                    (task.id, task.state.value, task.worker, *bound),
                ).rowcount
            else:
                changed = conn.execute(
                    "UPDATE tasks SET state = ?, finished_at = ?, snapshot = NULL"
                    f" WHERE id = ? AND state = ? AND worker IS ?{still}",
                    (state.value, now, task.id, task.state.value, task.worker, *bound),
                ).rowcount
        if not changed:
            fresh = self.get(task.id)
            if fresh is not None:
                task.__dict__.update(fresh.__dict__)
        elif state is TaskState.QUEUED:
            task.state, task.worker, task.started_at, task.progress = state, None, None, None
        else:
            task.state, task.finished_at = state, now

    def _select(self, sql: str, params: t.Sequence[t.Any]) -> list[t.Any]:
        """The rows of a read, on the thread's connection without ``_Access``'s
        wrapping (the hot path of every poll)."""
        _GATE.enter()
        try:
            return self._connection().execute(sql, params).fetchall()
        except BaseException as e:
            if _is_outage(e):
                raise self._outage(e) from e
            raise
        finally:
            _GATE.leave()

    def _fetch_task(self, sql: str, params: tuple[t.Any, ...]) -> Task | None:
        """The task of a one-row read, as clients see it."""
        rows = self._select(sql, params)
        return self._read(rows[0], time.time()) if rows else None

    def get(self, task_id: str) -> Task | None:
        return self._fetch_task(_GET, (task_id,))

    def get_many(self, task_ids: t.Sequence[str]) -> dict[str, Task]:
        found: dict[str, Task] = {}
        largest = _GET_MANY_SIZES[-1]
        for start in range(0, len(task_ids), largest):
            chunk = list(task_ids[start : start + largest])
            size = next(size for size in _GET_MANY_SIZES if size >= len(chunk))
            chunk += chunk[-1:] * (size - len(chunk))
            rows = self._select(_GET_MANY[size], chunk)
            now = time.time()
            for row in rows:
                task = self._read(row, now)
                if task is not None:
                    found[task.id] = task
        return found

    def get_owned(self, task_id: str, owner: str | None) -> Task | None:
        # The owner is compared before the response is joined: another owner's
        # task reads as fast as an unknown one, however large its result.
        return self._fetch_task(_GET_OWNED, (owner, task_id, owner))

    def get_by_key(self, owner: str | None, key: str) -> Task | None:
        now = time.time()
        with self._reading() as conn:
            row = conn.execute(
                f"{_SELECT} WHERE {_BY_KEY}",
                (owner, owner, key),
            ).fetchone()
        found = None if row is None else self._read(row, now)
        return None if found is None or found.expired else found

    # -- writing -------------------------------------------------------------------

    def create(self, task: Task, snapshot: bytes | None = None) -> Task:
        now = time.time()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            self.purge_expired(now)
        if task.idempotency_key is None:
            # One statement, committed on its own: the common case stays one write.
            with self._writing() as conn:
                self._insert(conn, task, snapshot)
            return task
        with self._transaction() as conn:
            row = conn.execute(
                f"{_SELECT} WHERE {_BY_KEY}",
                (task.owner, task.owner, task.idempotency_key),
            ).fetchone()
            if row is not None:
                existing = self.retention_view(self._task(row), now)
                if existing is not None and not existing.expired:
                    return existing
                conn.execute("UPDATE tasks SET idempotency_key = NULL WHERE id = ?", (row[0],))
            self._insert(conn, task, snapshot)
        return task

    def create_finished(self, task: Task) -> float | None:
        now = time.time()
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            self.purge_expired(now)
        if task.finished_at is None:
            task = dataclasses.replace(task, finished_at=now)
        response = task.response
        if response is None:
            with self._writing() as conn:
                written = conn.execute(
                    _INSERT_FINISHED, (*_row(task, None), None, None, None, None)
                ).rowcount
            return task.finished_at if written else None
        headers = _encode_headers(response.headers)
        if len(response.body) + len(headers) <= INLINE_RESPONSE:
            # One statement, the response in the row: the whole task in one write.
            with self._writing() as conn:
                written = conn.execute(
                    _INSERT_FINISHED,
                    (*_row(task, None), response.status, headers, response.body, None),
                ).rowcount
            return task.finished_at if written else None
        with self._transaction() as conn:
            result = conn.execute(
                "INSERT INTO results (status, headers, body) VALUES (?, ?, ?)",
                (response.status, headers, response.body),
            ).lastrowid
            written = conn.execute(
                _INSERT_FINISHED, (*_row(task, None), None, None, None, result)
            ).rowcount
            if not written:  # it had ended already
                conn.execute("DELETE FROM results WHERE id = ?", (result,))
        return task.finished_at if written else None

    def _insert(self, conn: sqlite3.Connection, task: Task, snapshot: bytes | None) -> None:
        """Insert ``task``, its snapshot appended to the spool first (under the
        write lock, inside the transaction if there is one)."""
        reference = None if snapshot is None else self._spool.append(task.worker, snapshot)
        conn.execute(_INSERT, _row(task, reference))

    def start(self, task_id: str, worker: str) -> Task | None:
        # Not a task queued past queued_ttl: it reads lost, and must not run later.
        now = time.time()
        with self._writing() as conn:
            row = conn.execute(
                "UPDATE tasks SET state = 'running', started_at = ?, worker = ?,"
                " snapshot = CASE WHEN rerun = 1 THEN snapshot END"
                f" WHERE id = ? AND state = 'queued' AND created_at >= ? {_RETURNING}",
                (now, worker, task_id, now - self.queued_ttl),
            ).fetchone()
        return None if row is None else self._task(row)

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        if limit < 1:
            raise ValueError(f"claim limit must be 1 or more, not {limit}")
        now = time.time()
        stale = now - self.queued_ttl
        # Most claims find nothing: a read says so without taking the write lock
        # from the submits.
        with self._reading() as conn:
            found = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM leases WHERE expires_at < ?)"
                f" OR EXISTS ({_CLAIMABLE})",
                (now, stale, 1),
            ).fetchone()[0]
        if not found:
            return []
        with self._transaction() as conn:
            self._free_lapsed(conn, now)
            # One statement picks and takes: no other writer can come in between.
            rows = conn.execute(
                f"UPDATE tasks SET worker = ? WHERE id IN ({_CLAIMABLE}) {_RETURNING}, snapshot",
                (worker, stale, limit),
            ).fetchall()
        rows.sort(key=lambda row: (row[2], row[0]))  # RETURNING keeps no order
        # A snapshot that is gone (its file removed by hand) comes back empty: the
        # taker ends its task lost, as for any snapshot it cannot decode. One that
        # cannot be read now (too many open files, an I/O error) goes back to the
        # queue, for the next claim: taken and not run, it would wait for a day.
        claimed, unread = [], []
        for row in rows:
            try:
                claimed.append(Claimed(self._task(row), self._spool.read(row[21]) or b""))
            except OSError:
                unread.append(row[0])
        if unread:
            self.hand_back(worker, unread)
            if not claimed:
                raise self.unavailable("spool", "the snapshot spool cannot be read now")
        return claimed

    @staticmethod
    def _free_lapsed(conn: sqlite3.Connection, lapsed_before: float) -> None:
        """Orphan the active tasks of every worker whose lease lapsed before
        ``lapsed_before`` (see _ORPHAN), and forget the lease."""
        lapsed = conn.execute(
            "SELECT worker FROM leases WHERE expires_at < ?", (lapsed_before,)
        ).fetchall()
        for (gone,) in lapsed:
            _orphan(conn, gone)
            conn.execute("DELETE FROM leases WHERE worker = ?", (gone,))

    def hand_back(self, worker: str, task_ids: t.Sequence[str]) -> int:
        if not task_ids:
            return 0
        with self._transaction() as conn:
            return conn.executemany(
                "UPDATE tasks SET worker = NULL WHERE id = ? AND state = 'queued' AND worker = ?",
                [(task_id, worker) for task_id in task_ids],
            ).rowcount

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        with self._writing() as conn:
            row = conn.execute(
                "UPDATE tasks SET progress = ? WHERE id = ? AND state = 'running'"
                " RETURNING cancel_requested",
                (json.dumps(progress.to_stored()), task_id),
            ).fetchone()
        return bool(row[0]) if row is not None else self.cancel_requested(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT cancel_requested FROM tasks WHERE id = ?", (task_id,)
            ).fetchone()
        return row is not None and bool(row[0])

    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> float | None:
        headers = None if response is None else _encode_headers(response.headers)
        now = time.time()
        if response is None or len(response.body) + len(headers or "") <= INLINE_RESPONSE:
            # One statement: the response (if any) in the task row itself.
            with self._writing() as conn:
                changed = conn.execute(
                    "UPDATE tasks SET state = ?, finished_at = ?, status = ?, headers = ?,"
                    f" body = ?, snapshot = NULL WHERE id = ? AND state IN {_ACTIVE}",
                    (
                        state.value,
                        now,
                        None if response is None else response.status,
                        headers,
                        None if response is None else response.body,
                        task_id,
                    ),
                ).rowcount
            return now if changed else None
        with self._transaction() as conn:
            result = None
            if response is not None:
                result = conn.execute(
                    "INSERT INTO results (status, headers, body) VALUES (?, ?, ?)",
                    (response.status, headers, response.body),
                ).lastrowid
            changed = conn.execute(
                "UPDATE tasks SET state = ?, finished_at = ?, result = ?, snapshot = NULL"
                f" WHERE id = ? AND state IN {_ACTIVE}",
                (state.value, now, result, task_id),
            ).rowcount
            if not changed and result is not None:
                conn.execute("DELETE FROM results WHERE id = ?", (result,))
        return now if changed else None

    def request_cancel(self, task_id: str) -> Task | None:
        now = time.time()
        with self._writing() as conn:
            row = conn.execute(
                "UPDATE tasks SET cancel_requested = 1,"
                " finished_at = CASE WHEN state = 'queued' THEN ? ELSE finished_at END,"
                " state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,"
                " snapshot = CASE WHEN state = 'queued' THEN NULL ELSE snapshot END"
                f" WHERE id = ? AND expired = 0 {_RETURNING}",
                (now, task_id),
            ).fetchone()
        return None if row is None else self._task(row)

    def delete(self, task_id: str) -> None:
        with self._transaction() as conn:
            row = conn.execute("DELETE FROM tasks WHERE id = ? RETURNING result", (task_id,))
            _drop_results(conn, row.fetchall())

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT idempotency_key, snapshot IS NOT NULL, cancel_requested FROM tasks"
                " WHERE id = ? AND (state = 'queued' OR (state = 'running' AND worker = ?))",
                (task_id, running_under),
            ).fetchone()
            if row is None:
                return False
            if row[0] is None:
                found = conn.execute("DELETE FROM tasks WHERE id = ? RETURNING result", (task_id,))
                _drop_results(conn, found.fetchall())
            elif row[1] and row[2]:
                # Cancelling was asked while it read running: it ends so.
                conn.execute(
                    "UPDATE tasks SET state = 'cancelled', finished_at = ?, snapshot = NULL"
                    " WHERE id = ?",
                    (time.time(), task_id),
                )
            elif row[1]:
                conn.execute(
                    "UPDATE tasks SET state = 'queued', started_at = NULL, worker = NULL"
                    " WHERE id = ?",
                    (task_id,),
                )
            else:
                conn.execute(
                    "UPDATE tasks SET state = 'lost', finished_at = ?, idempotency_key = NULL,"
                    " snapshot = NULL WHERE id = ?",
                    (time.time(), task_id),
                )
        return True

    def list(
        self,
        *,
        owner: str | None,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Task]:
        now = time.time()
        # Finished longer ago than this, a task is expired and not listed.
        fresh_after = now - self.result_ttl
        query = [f"{_LISTED} WHERE t.owner IS ? AND t.expired = 0"]
        params: list[t.Any] = [owner]
        query.append("AND (t.finished_at IS NULL OR t.finished_at >= ?)")
        params.append(fresh_after)
        self._filter_state(state, now, query, params)
        if before is not None:
            query.append(
                "AND (t.created_at, t.id) < (SELECT created_at, id FROM tasks"
                " WHERE id = ? AND owner IS ?)"
            )
            params.extend([before, owner])
        query.append("ORDER BY t.created_at DESC, t.id DESC LIMIT ?")
        params.append(limit)
        with self._reading() as conn:
            rows = conn.execute(" ".join(query), params).fetchall()
        tasks = (self._read(row, now) for row in rows)
        return [task for task in tasks if task is not None and not task.expired]

    def _filter_state(
        self,
        state: TaskState | None,
        now: float,
        query: builtins.list[str],
        params: builtins.list[t.Any],
    ) -> None:
        """Add to ``query`` (with its ``params``) a filter on the state a task reads
        as (see _READS_AS), for list() and list_all()."""
        if state in _READS_AS:
            condition, binds = _READS_AS[state]
            query.append(f"AND {condition}")
            bound = {"now": now, "stale": now - self.queued_ttl}
            params.extend(bound[name] for name in binds)
        elif state is not None:
            query.append("AND t.state = ?")
            params.append(state.value)

    # -- liveness and retention --------------------------------------------------

    def renew_lease(self, worker: str) -> None:
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO leases (worker, expires_at) VALUES (?, ?)"
                " ON CONFLICT (worker) DO UPDATE SET expires_at = excluded.expires_at",
                (worker, time.time() + self.lease_hold),
            )

    def release_lease(self, worker: str) -> None:
        # A worker without a lease has lapsed: what it still held is orphaned now.
        with self._transaction() as conn:
            _orphan(conn, worker)
            conn.execute("DELETE FROM leases WHERE worker = ?", (worker,))

    # -- opaque blobs ------------------------------------------------------------

    def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO blobs (key, data, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET data = excluded.data,"
                " expires_at = excluded.expires_at",
                (key, sqlite3.Binary(data), time.time() + ttl),
            )

    def take_blob(self, key: str, *, call: str | None = None) -> bytes | None:
        now = time.time()
        with self._writing() as conn:
            row = conn.execute(
                "DELETE FROM blobs WHERE key = ? RETURNING data, expires_at", (key,)
            ).fetchone()
        if row is None or row[1] < now:
            return None
        return bytes(row[0])

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._transaction() as conn:
            # Past the tombstone: forget the task. Past the result's retention: keep
            # a tombstone without the response. Either way the response goes.
            gone = conn.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at < ?"
                " LIMIT ?) RETURNING result",
                (now - self.result_ttl - self.tombstone_ttl, PURGE_BATCH),
            ).fetchall()
            expired = conn.execute(
                "SELECT result, id FROM tasks WHERE finished_at < ? AND expired = 0 LIMIT ?",
                (now - self.result_ttl, PURGE_BATCH),
            ).fetchall()
            conn.executemany(
                "UPDATE tasks SET expired = 1, progress = NULL, idempotency_key = NULL,"
                " result = NULL, status = NULL, headers = NULL, body = NULL WHERE id = ?",
                [(row[1],) for row in expired],
            )
            _drop_results(conn, [*gone, *expired])
            changed = len(gone) + len(expired)
            # Queued past queued_ttl: lost, and recorded so (they read lost already),
            # so that they end, get purged and stop counting as live. Through the
            # index of unfinished tasks.
            conn.execute(
                "UPDATE tasks SET state = 'lost', finished_at = ?, snapshot = NULL"
                " WHERE id IN (SELECT id FROM tasks WHERE finished_at IS NULL"
                " AND created_at < ? AND state = 'queued' LIMIT ?)",
                (now, now - self.queued_ttl, PURGE_BATCH),
            )
            conn.execute(
                "DELETE FROM blobs WHERE key IN (SELECT key FROM blobs WHERE expires_at < ?"
                " LIMIT ?)",
                (now, PURGE_BATCH),
            )
            # A lapsed lease and a missing one mean the same: the worker is gone.
            self._free_lapsed(conn, now - self.lease)
        return changed

    def maintain(self) -> None:
        """Purge, then copy the write-ahead log into the database and empty it:
        the one fsync of WAL mode, done here (by the lease renewal) rather than
        inside a request.

        A passive checkpoint would copy the log but never start it over while
        polls keep reading (SQLite restarts the log only when a writer finds no
        reader in it), so the file would grow to its high-water mark and stay
        there. This one waits up to ``CHECKPOINT_WAIT`` seconds for the readers
        of the moment (each a single statement) and writers to let it truncate
        the log; if they do not, the next call tries again.

        Also removes the snapshot spool's segments that no task needs any longer.
        """
        self.purge_expired()
        now = time.time()
        with self._reading() as conn:
            live = conn.execute("SELECT worker FROM leases WHERE expires_at >= ?", (now,))
            workers = [row[0] for row in live.fetchall()]
        self._spool.collect(self._referenced_segments, workers)
        with self._writing() as conn:
            conn.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")

    def _referenced_segments(self) -> set[str]:
        """The spool segments that task rows point into, but for tasks that waited
        too long to be claimed (they read lost)."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT DISTINCT substr(snapshot, 1, instr(snapshot, ':') - 1) FROM tasks"
                " WHERE snapshot IS NOT NULL AND NOT (state = 'queued' AND created_at < ?)",
                (time.time() - self.queued_ttl,),
            ).fetchall()
        return {row[0] for row in rows}

    # -- change notifications --------------------------------------------------------

    def listen(
        self,
        on_change: ChangeCallback,
        stop: StopSignal,
        *,
        changes: t.Callable[[], bool] | None = None,
    ) -> None:
        """Call ``on_change(None)`` whenever another connection has committed.

        Every ``LISTEN_INTERVAL`` seconds, reads ``PRAGMA data_version`` on a
        connection of its own (which never writes; closed on return, or by
        :meth:`close`, after which a listener still running opens another unless
        the process is exiting). SQLite changes that number when *another*
        connection, of this process or any other, has committed to the file: a
        task that ended, but also progress, submits, lease renewals (and a
        truncating checkpoint), so waiters are woken more often than needed and
        read their task again; event streams hear every change this way, so
        ``changes`` changes nothing here. Each look is a read transaction of a few
        microseconds on the shared-memory WAL index, ended at once: no disk
        access, and nothing that holds back a checkpoint.
        """
        conn: sqlite3.Connection | None = None
        version = None
        failures = 0
        try:
            while not stop.is_set() and not self._closed_at_exit():
                if time.monotonic() >= self._check_at:
                    # A file removed or replaced is noticed (and logged) even
                    # while no request comes.
                    with contextlib.suppress(StoreUnavailable):
                        self._check_file()
                changed = False
                _GATE.enter()
                try:
                    if conn is not None and conn not in self._listening:
                        conn = None  # closed with the store (see close())
                    if conn is None:
                        if self._closed_at_exit():
                            break
                        conn = sqlite3.connect(
                            pathlib.Path(self.path).as_uri() + "?mode=rw",
                            uri=True,
                            timeout=1.0,
                            isolation_level=None,
                            check_same_thread=False,
                        )
                        with self._lock:
                            self._listening.add(conn)
                        version = _data_version(conn)
                        changed = True  # what changed before this was not seen
                    else:
                        current = _data_version(conn)
                        changed, version = current != version, current
                except (sqlite3.Error, OSError):
                    if conn is not None:
                        self._forget_listening(conn)
                        conn = None
                    failures += 1
                    if failures == 1:
                        _logger.warning("Cannot listen to %s", self.url, exc_info=True)
                finally:
                    _GATE.leave()
                if conn is None:
                    stop.wait(min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))
                    continue
                if failures:
                    _logger.info("Listening to %s again", self.url)
                    failures = 0
                if changed:
                    on_change(None)
                stop.wait(LISTEN_INTERVAL)
        finally:
            if conn is not None:
                self._forget_listening(conn)

    def _closed_at_exit(self) -> bool:
        return self._ended

    def _forget_listening(self, conn: sqlite3.Connection) -> None:
        """Close a connection of :meth:`listen`, unless :meth:`close` took it."""
        with self._lock:
            mine = conn in self._listening
            self._listening.discard(conn)
        if mine:
            _close(conn)

    # -- operating (see TaskStore.list_all) ----------------------------------------

    def list_all(
        self,
        *,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """Every owner's live tasks, newest first.

        The page's ids are picked first, from the task rows alone (a scan of the
        table and a sort that keeps ``limit`` rows); only those rows are then read
        (with their response's status code only, as :meth:`list`).
        """
        now = time.time()
        query = [
            "SELECT t.id FROM tasks AS t WHERE t.expired = 0",
            "AND (t.finished_at IS NULL OR t.finished_at >= ?)",
        ]
        params: builtins.list[t.Any] = [now - self.result_ttl]
        self._filter_state(state, now, query, params)
        if before is not None:
            query.append(
                "AND (t.created_at, t.id) < (SELECT created_at, id FROM tasks WHERE id = ?)"
            )
            params.append(before)
        query.append("ORDER BY t.created_at DESC, t.id DESC LIMIT ?")
        params.append(limit)
        page = f"{_LISTED} WHERE t.id IN ({' '.join(query)}) ORDER BY t.created_at DESC, t.id DESC"
        with self._reading() as conn:
            rows = conn.execute(page, params).fetchall()
        tasks = (self._read(row, now) for row in rows)
        return [task for task in tasks if task is not None and not task.expired]

    def stats(self) -> StoreStats:
        """One statement: each active row's state as it reads (the rules of
        :meth:`_read`, in SQL), and the ended ones counted in their index;
        nothing is decoded in Python. Reads the active rows and the index entries
        of the tasks that ended within ``result_ttl``, never a response."""
        now = time.time()
        return self._count(_COUNT_BY_STATE, (now - self.result_ttl, now - self.queued_ttl, now))

    def owner_stats(self, owner: str | None) -> StoreStats:
        now = time.time()
        return self._count(_OWNER_STATS, (now - self.result_ttl, now - self.queued_ttl, now, owner))

    def _count(self, statement: str, params: tuple[t.Any, ...]) -> StoreStats:
        with self._reading() as conn:
            rows = conn.execute(statement, params)
            counts = dict.fromkeys(TaskState, 0)
            oldest = None
            for name, count, first_created in rows.fetchall():
                counts[_STATES[name]] += count
                if name == "queued" and first_created is not None:
                    oldest = first_created if oldest is None else min(oldest, first_created)
        return StoreStats(counts, oldest)

    def purge_finished(self, *, older_than: float = 0.0, state: TaskState | None = None) -> int:
        """Through the index of finish times, ``PURGE_BATCH`` rows per transaction."""
        state = self._finished_state(state)
        cutoff = time.time() - older_than
        condition = "finished_at < ?" if state is None else "finished_at < ? AND state = ?"
        params: tuple[t.Any, ...] = (cutoff,) if state is None else (cutoff, state.value)
        deleted = 0
        while True:
            with self._transaction() as conn:
                gone = conn.execute(
                    f"DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE {condition}"
                    " LIMIT ?) RETURNING result",
                    (*params, PURGE_BATCH),
                ).fetchall()
                _drop_results(conn, gone)
            deleted += len(gone)
            if len(gone) < PURGE_BATCH:
                return deleted


def _row(task: Task, snapshot: str | None) -> tuple[t.Any, ...]:
    """The values of ``_INSERT`` for ``task``, whose snapshot lies at ``snapshot``."""
    return (
        task.id,
        task.state.value,
        task.created_at,
        task.started_at,
        task.finished_at,
        json.dumps(task.progress.to_stored()) if task.progress is not None else None,
        task.owner,
        task.idempotency_key,
        task.fingerprint,
        int(task.cancel_requested),
        task.worker,
        int(task.rerun),
        snapshot,
        task.endpoint,
        task.method,
        task.path,
    )


def _encode_headers(headers: t.Sequence[tuple[str, str]]) -> str:
    """Names and values joined by NUL characters, which HTTP does not allow in
    either; JSON (which starts with "[") for anything that has one anyway. Read
    back on every poll, where this is several times cheaper than JSON."""
    parts = [part for header in headers for part in header]
    if any("\x00" in part for part in parts) or (parts and parts[0].startswith("[")):
        return json.dumps(headers)
    return "\x00".join(parts)


@functools.lru_cache(maxsize=256)
def _decoded_headers(text: str) -> tuple[tuple[str, str], ...]:
    """What :func:`_encode_headers` wrote. Cached: most responses share a handful
    of header sets, each decoded once (callers copy the tuple into a list)."""
    if text.startswith("["):
        return tuple((name, value) for name, value in json.loads(text))
    if not text:
        return ()
    parts = text.split("\x00")
    return tuple(zip(parts[::2], parts[1::2], strict=True))


def _orphan(conn: sqlite3.Connection, worker: str) -> None:
    """What becomes of the active tasks of ``worker``, which is gone (see _ORPHAN)."""
    requeue, end = _ORPHAN
    conn.execute(requeue, (worker,))
    conn.execute(end, (time.time(), worker))


def _drop_results(conn: sqlite3.Connection, rows: t.Iterable[t.Sequence[t.Any]]) -> None:
    """Delete the responses whose ids are the first column of ``rows``."""
    conn.executemany(
        "DELETE FROM results WHERE id = ?", [(row[0],) for row in rows if row[0] is not None]
    )


def _data_version(conn: sqlite3.Connection) -> int:
    # fetchall: the statement runs to its end, so the read transaction is over.
    return int(conn.execute("PRAGMA data_version").fetchall()[0][0])


_logger = logging.getLogger(__name__)


#: Seconds between two tries to switch a new file to WAL mode (see _use_wal).
WAL_SWITCH_RETRY = 0.01


def _use_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switch the file of ``conn`` to write-ahead logging, which is kept in the file.

    Only a new file needs it, and where several processes start on the same new
    file (the workers of a first deploy) one of them switches while the others are
    opening it. The switch needs the file to itself, and SQLite answers
    "database is locked" at once rather than wait the busy timeout for it: try
    again until ``timeout`` (whoever switches first leaves nothing to do).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            # SQLITE_BUSY, or one of its extended codes (SQLITE_BUSY_RECOVERY...).
            if e.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        else:
            if mode == "wal":
                return
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(f"the file stays in {mode} mode, not WAL")
        time.sleep(WAL_SWITCH_RETRY)


def _ensure_schema(conn: sqlite3.Connection, store: SQLiteStore) -> None:
    """Create the tables in a new file, add the indexes an earlier version of this
    layout lacks; refuse a file of another layout."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION and not any(_schema_changes(conn)) and not _missing_columns(conn):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'table'").fetchone()[
            0
        ]
        if version not in (0, SCHEMA_VERSION) or (version == 0 and tables):
            # Not a passing outage, but a deployment to mend: logged loudly, and
            # answered 503 like any store that cannot serve.
            raise store.unavailable(
                "layout",
                "the file is not a task store of this version of flask_restful_async"
                f" (layout {version}, expected {SCHEMA_VERSION}): point"
                " RESTFUL_ASYNC_STORE at another file, or remove this one",
                level=logging.ERROR,
            )
        if version == 0:
            # Statement by statement: executescript would commit the transaction.
            statement = ""
            for line in _SCHEMA.splitlines(keepends=True):
                statement += line
                if sqlite3.complete_statement(statement):
                    conn.execute(statement)
                    statement = ""
        # A new file, or one an earlier version made: what this version adds.
        for name, kind in _missing_columns(conn):
            conn.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")
        missing, stale = _schema_changes(conn)
        for name, statement in _EXTRAS.items():
            if name in missing:
                conn.execute(statement)
        for name, statement in _REPLACED.items():
            if name in stale:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


#: Columns of the tasks table that files of this layout made before them lack
#: (added at the end of the table, where SQLite adds a column): all may be NULL.
_LATER_COLUMNS = (
    ("status", "INTEGER"),
    ("headers", "TEXT"),
    ("body", "BLOB"),
    ("endpoint", "TEXT"),
    ("method", "TEXT"),
    ("path", "TEXT"),
)


def _missing_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """The columns of :data:`_LATER_COLUMNS` that the file's tasks table lacks."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(tasks)").fetchall()}
    return [column for column in _LATER_COLUMNS if column[0] not in present]


def _schema_changes(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """The names of _EXTRAS that the file lacks, and of _REPLACED that it holds."""
    names = (*_EXTRAS, *_REPLACED)
    marks = ", ".join("?" * len(names))
    rows = conn.execute(f"SELECT name FROM sqlite_schema WHERE name IN ({marks})", names)
    found = {row[0] for row in rows.fetchall()}
    return set(_EXTRAS) - found, set(_REPLACED) & found


#: How often (seconds, at least) a writer queued behind the other writers of its
#: process looks whether they make progress, when the store's timeout is shorter.
QUEUE_CHECK = 0.1


class _Access:
    """A store's connection for one statement or transaction (a context manager):
    outages come out as ``StoreUnavailable``; writers hold the write lock.

    A writer waits for the other writers of its process as long as their writes
    go through, and for SQLite's lock (held by another process) within the
    store's ``timeout`` of the later of its own start and the last write of its
    process that went through: where the file stays locked, every writer queued
    behind the first gets its ``503`` in that time too, rather than a whole
    timeout after the one before it.

    Written as a class rather than with ``contextlib``: it wraps every statement,
    and this is several times cheaper.
    """

    __slots__ = ("_left", "_lock", "_store")

    def __init__(self, store: SQLiteStore, lock: threading.RLock | None) -> None:
        self._store, self._lock = store, lock
        # Seconds of the timeout left for SQLite's lock after a wait for the
        # write lock; None when it was free.
        self._left: float | None = None

    def __enter__(self) -> sqlite3.Connection:
        _GATE.enter()
        lock = self._lock
        if lock is not None:
            try:
                if not lock.acquire(False):
                    self._queue(lock)
            except BaseException:
                _GATE.leave()  # interrupted while waiting (a signal's exception), or late
                raise
        try:
            if lock is None:
                return self._store._connection()
            conn = self._store._writer_connection()
            if self._left is not None:
                conn.execute(f"PRAGMA busy_timeout = {max(0, int(self._left * 1000))}")
            return conn
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise

    def _queue(self, lock: threading.RLock) -> None:
        """Wait for the other writers of this process: as long as they make progress
        (a write of this process ends at least every ``timeout`` seconds: many
        threads writing at once), else up to the store's timeout (the file is locked
        by another process, or the disk stalls)."""
        store = self._store
        start = time.monotonic()
        limit = max(store.timeout, QUEUE_CHECK)
        while True:
            left = limit - (time.monotonic() - max(start, store._write_ended))
            if left <= 0:
                raise store.unavailable(
                    "queued",
                    f"no write of this process ended in {store.timeout:g} s (the file is"
                    " locked by another process, or the disk stalls)",
                )
            if lock.acquire(timeout=left):
                break
        # What the waits on SQLite's lock have left of the timeout since the last
        # write of this process went through.
        self._left = store.timeout - (time.monotonic() - max(start, store._write_ended))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        try:
            if self._lock is not None:
                try:
                    if exc is not None:
                        self._store._writer_failed()
                    else:
                        self._store._write_ended = time.monotonic()
                    if self._left is not None:
                        self._store._restore_busy_timeout()
                finally:
                    self._lock.release()
        finally:
            _GATE.leave()
        if exc is not None and _is_outage(exc):
            raise self._store._outage(exc) from exc


def _is_outage(exc: BaseException) -> bool:
    # Locked past the timeout, disk full, I/O error, a folder that cannot be made,
    # "file is not a database". Integrity and programming errors are bugs instead,
    # and propagate as they are.
    return isinstance(exc, (sqlite3.OperationalError, OSError)) or (
        type(exc) is sqlite3.DatabaseError
    )


class _Held:
    """A thread's connection, kept in the thread's local data: when the thread (or
    greenlet) ends, its local data goes, and with it this, which hands the
    connection back to its store (:meth:`SQLiteStore._spare`). The store keeps
    weak references to these (a ``sqlite3.Connection`` cannot have any)."""

    __slots__ = ("__weakref__", "conn", "pid", "store")

    def __init__(self, store: SQLiteStore, conn: sqlite3.Connection) -> None:
        # Weak: the store's thread-local data holds this.
        self.store = weakref.ref(store)
        self.conn: sqlite3.Connection | None = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        store = self.store()
        if self.pid != os.getpid():
            # A forked child drops the other threads' local data before its
            # at-fork handlers run, with the gate still closed by the parent's
            # fork: never wait on it here, nor close the parent's connection.
            if store is not None:
                store._inherited.append(conn)
            return
        if store is not None:
            store._spare(conn)
        else:
            with contextlib.suppress(Exception):
                _close(conn)


_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()

#: Every call of this module into SQLite passes it, and a fork waits for them.
_GATE = ForkGate("SQLite", FORK_WAIT)
_CLOSE_WARNING = (
    "Closing a task store while another thread is still inside %(name)s after %(wait).0f s"
)


def _close(conn: sqlite3.Connection) -> None:
    """Close ``conn`` (closing is a call into SQLite too: no fork meanwhile)."""
    _GATE.enter()
    try:
        conn.close()
    finally:
        _GATE.leave()


def _reset_after_fork() -> None:
    _GATE.after_fork_in_child()
    for store in list(_stores):
        store._after_fork()


os.register_at_fork(
    before=_GATE.close, after_in_parent=_GATE.open, after_in_child=_reset_after_fork
)


def _close_at_exit() -> None:
    # A connection still open when the process ends leaves the write-ahead log and
    # its index (-wal, -shm) beside the file; the last connection closed removes
    # them. Registered at import, so it runs after the executor has let its tasks
    # finish and the lease is released (atexit runs the latest registration first).
    # Daemon threads still run until the interpreter stops them (a listener that
    # outlived its join, a task past the shutdown timeout): none may open a
    # connection again, which nothing would close.
    for store in list(_stores):
        store._ended = True
        store.close()


atexit.register(_close_at_exit)
