"""The store contract: every backend keeps task records behind these few methods."""

from __future__ import annotations

import abc
import builtins
import dataclasses
import logging
import time
import typing as t

from ..exceptions import StoreUnavailable
from ..task import Progress, StoredResponse, Task, TaskState
from .outages import OutageLog

ACTIVE_STATES = (TaskState.QUEUED, TaskState.RUNNING)
#: Seconds between two tries to renew a lease that could not be renewed (at most a
#: third of the lease; see :class:`~flask_restful_async.lease.LeaseKeeper`).
RENEW_RETRY = 0.5


def withdrawable(task: Task, running_under: str | None) -> bool:
    """Whether :meth:`TaskStore.withdraw` takes ``task`` back (see there)."""
    if task.state is TaskState.QUEUED:
        return True
    return (
        task.state is TaskState.RUNNING
        and running_under is not None
        and task.worker == running_under
    )


class Claimed(t.NamedTuple):
    """A queued task that :meth:`TaskStore.claim` gave to a worker, with the request
    snapshot that was stored with it (opaque bytes, as the submit wrote them)."""

    task: Task
    snapshot: bytes


@dataclasses.dataclass(frozen=True)
class Ending:
    """How a task ended, as a store may announce it along with its id, so that a
    waiter need not read the task again (see :meth:`TaskStore.listen`)."""

    state: TaskState
    finished_at: float
    response: StoredResponse | None
    #: When it started, where the one who announces it knows (None otherwise).
    started_at: float | None = None

    def apply(self, task: Task) -> Task | None:
        """``task`` (as read while it ran, or while it waited) as it ended; None
        when that cannot be told without reading it again: it was read before it
        started, and this does not say when it did."""
        if task.started_at is None and self.started_at is None:
            return None
        # A copy of its fields, three of them changed: what dataclasses.replace
        # gives, without its checks of every field, on the path of each answer.
        ended = object.__new__(type(task))
        ended.__dict__.update(task.__dict__)
        ended.state, ended.finished_at, ended.response = self.state, self.finished_at, self.response
        if task.started_at is None:
            ended.started_at = self.started_at
        return ended


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """What :meth:`TaskStore.stats` counts: the live tasks (not expired) of every
    owner by state, as they read, and when the oldest queued one was created
    (None if none is queued)."""

    counts: dict[TaskState, int]
    oldest_queued_at: float | None


class ChangeCallback(t.Protocol):
    """What :meth:`TaskStore.listen` calls: ``(task_id, ending, finished=...)``,
    see there."""

    def __call__(
        self, task_id: str | None, ending: Ending | None = None, *, finished: bool = True
    ) -> None: ...


class StopSignal(t.Protocol):
    """What :meth:`TaskStore.listen` watches to know when to return: a
    :class:`threading.Event` will do."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class TaskStore(abc.ABC):
    """Where task records live, shared by every thread (and, for shared stores,
    every process) that submits, runs or polls tasks.

    Each method is atomic: a state transition never loses a concurrent write (a
    finish racing a cancel, a progress update racing a finish). Methods raise
    :class:`~flask_restful_async.exceptions.StoreUnavailable` when the backend
    cannot be reached, and then have changed nothing.

    Retention: a task that finished more than ``result_ttl`` seconds ago reads as a
    tombstone (``expired=True``, no response; the status URL answers 410) and,
    ``tombstone_ttl`` seconds later, as unknown (None). Queued and running tasks are
    never evicted.

    Liveness: a queued or running task records the ``worker`` (process) that holds
    it, and every such process renews a lease of ``lease`` seconds. A task whose
    worker's lease has lapsed reads as ``lost``, and is recorded so, with two
    exceptions: a queued task stored with its request snapshot stays queued, for
    another process to :meth:`claim`; and a running task with ``rerun=True`` goes
    back to queued (no worker, no start time), claimable the same way. A task still
    queued ``queued_ttl`` seconds after it was created (no worker took it) reads
    lost, whatever holds it.

    Queue of record: a task created with a snapshot can be run by any process that
    shares the store. :meth:`claim` takes such tasks when their holder is gone
    (lease lapsed) or has handed them back (:meth:`hand_back`, on a graceful
    stop), oldest first, each by exactly one caller. The snapshot is dropped when
    the task starts (kept until it ends for ``rerun`` tasks) and whenever the task
    ends or is deleted.
    """

    #: The URL this store was made from (``memory://``, ``sqlite:///…``, ``redis://…``).
    url: str = ""
    #: True when several processes see the same tasks (every store but memory://).
    shared: bool = True
    #: Seconds a finished task's result is kept (``RESTFUL_ASYNC_RESULT_TTL``).
    result_ttl: float = 24 * 3600
    #: Seconds an expired task still reads as a tombstone (``RESTFUL_ASYNC_TOMBSTONE_TTL``).
    tombstone_ttl: float = 24 * 3600
    #: Seconds a worker's lease lasts after each renewal (``RESTFUL_ASYNC_LEASE``).
    lease: float = 30.0
    #: Seconds a task may stay queued before it reads lost (``RESTFUL_ASYNC_QUEUED_TTL``).
    queued_ttl: float = 24 * 3600

    @property
    def lease_hold(self) -> float:
        """Seconds a renewal keeps a worker's lease: :attr:`lease`, plus the third of
        it that may have passed since the last renewal when the store stops
        answering, plus two pauses between tries (:data:`RENEW_RETRY`) for the first
        renewal after. A store that does not answer for less than a lease (no
        renewal gets through, nor any other write) so lets no live process's lease
        lapse: whichever write comes first once it answers again, the renewal or
        another process's read of the lease, finds it held."""
        return self.lease + self.lease / 3 + 2 * min(self.lease / 3, RENEW_RETRY)

    def configure(
        self,
        *,
        result_ttl: float,
        tombstone_ttl: float,
        lease: float,
        queued_ttl: float = 24 * 3600,
    ) -> None:
        self.result_ttl = result_ttl
        self.tombstone_ttl = tombstone_ttl
        self.lease = lease
        self.queued_ttl = queued_ttl

    @abc.abstractmethod
    def create(self, task: Task, snapshot: bytes | None = None) -> Task:
        """Record a new queued task and return it.

        ``snapshot`` (the request, as
        :meth:`~flask_restful_async.snapshot.RequestSnapshot.to_bytes` wrote it,
        body included; opaque to the store) is recorded in the same write as the
        task, so that another process can :meth:`claim` and run it. Without one,
        only the process that holds the task can run it.

        If ``task.idempotency_key`` is set and a task of the same owner with the
        same key exists, return that one instead and record nothing.
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None:
        """The task, a tombstone (``expired=True``) or None when unknown or gone."""

    def get_owned(self, task_id: str, owner: str | None) -> Task | None:
        """As :meth:`get`, for ``owner`` only: another owner's task is None, as an
        unknown one is, and costs about as much to read (its response is never
        loaded). The status URL reads tasks through this.

        This default reads the task and then compares; stores override it to
        compare first.
        """
        task = self.get(task_id)
        return task if task is not None and task.owner == owner else None

    def get_by_key(self, owner: str | None, key: str) -> Task | None:
        """The live (not expired) task that ``owner`` created with the idempotency
        key ``key`` (as :attr:`Task.idempotency_key` holds it), or None: what a
        :meth:`create` with that key would return, without creating anything. A
        repeat of a submit answers with it when there is no room for a new task.

        This default knows no key: stores override it.
        """
        return None

    def get_many(self, task_ids: t.Sequence[str]) -> builtins.dict[str, Task]:
        """The tasks of ``task_ids`` that exist (or are tombstones), by id, each as
        :meth:`get` reads it. Streams in a process use it to look at every task
        they follow at once when a store's news does not say which task changed.

        This default reads them one by one; stores override it to read them in one
        query.
        """
        found: builtins.dict[str, Task] = {}
        for task_id in task_ids:
            task = self.get(task_id)
            if task is not None:
                found[task_id] = task
        return found

    @abc.abstractmethod
    def start(self, task_id: str, worker: str) -> Task | None:
        """Move a queued task to running, held by ``worker``; None if it is no
        longer queued (cancelled, lost).

        Drops the task's stored snapshot, unless the task has ``rerun=True``: then
        it is kept until the task ends, in case its worker dies.
        """

    @abc.abstractmethod
    def claim(self, worker: str, limit: int) -> list[Claimed]:
        """Take up to ``limit`` (>= 1) queued tasks that no live process holds, for
        ``worker`` to run, and return each with its stored snapshot.

        Claimable: queued, stored with a snapshot, not cancelled, created less than
        ``queued_ttl`` seconds ago, and held by no worker (handed back) or by one
        whose lease has lapsed. Oldest first (``created_at``, then ``id``). Atomic:
        across threads, processes and machines, each task goes to exactly one
        caller. A claimed task stays queued, held by ``worker``, until that worker
        starts it (or hands it back, or its lease lapses in turn).
        """

    @abc.abstractmethod
    def hand_back(self, worker: str, task_ids: t.Sequence[str]) -> int:
        """Give up the queued tasks among ``task_ids`` that ``worker`` still holds:
        they are held by no worker, for any process to :meth:`claim`. Returns how
        many. A graceful stop calls this rather than losing its queue. (A task
        stored without a snapshot is handed back too, but no process can claim
        it: it waits until ``queued_ttl`` and reads lost.)
        """

    @abc.abstractmethod
    def set_progress(self, task_id: str, progress: Progress) -> bool:
        """Record progress of a running task; return whether cancellation was requested."""

    @abc.abstractmethod
    def cancel_requested(self, task_id: str) -> bool:
        """Whether someone asked to cancel this task."""

    @abc.abstractmethod
    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> float | None:
        """Record the end of a task (from queued or running) and its response,
        and drop its snapshot; return the finish time recorded.

        A task that has already finished keeps its first outcome: None then (and
        for an unknown task). None also when the store cannot tell: the caller
        must then read the task to know how it ended.
        """

    def create_finished(self, task: Task) -> float | None:
        """Record ``task``, which has run to its end already: its submit ran it in
        the request thread before anyone was given its id (``Prefer: wait``), so
        there was nothing to record before. ``task`` is finished, with
        ``started_at``, ``finished_at`` and its ``response`` as :meth:`finish`
        takes it, and no idempotency key or snapshot. Returns the finish time
        recorded, as :meth:`finish` does (None if it had ended already).

        One recorded as running meanwhile (by a call whose reply was lost) ends
        with this outcome; one that has ended already (a retried call) is left as
        it is.

        This default creates it running and then finishes it (two writes); a store
        that can overrides it with one.
        """
        if self.get(task.id) is None:
            running = dataclasses.replace(
                task, state=TaskState.RUNNING, finished_at=None, response=None
            )
            self.create(running)
        return self.finish(task.id, task.state, task.response)

    @abc.abstractmethod
    def request_cancel(self, task_id: str) -> Task | None:
        """Cancel a queued task outright, or flag a running one; return the new record."""

    @abc.abstractmethod
    def delete(self, task_id: str) -> None:
        """Forget a task entirely, with its snapshot."""

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        """Take back a task whose submit was not answered ``202`` (its executor could
        not take it, or its create's reply was lost). It is taken back while still
        queued, or running under ``running_under`` (a submit that recorded it
        running, to run it in its request thread, and never ran it). Without an
        idempotency key it is deleted. With one, a repeat of its submit may have
        been answered ``202`` with its ``Location`` meanwhile, so it is kept: queued
        for any process to claim where it has its snapshot (the repeat then gets
        its result, and a later one finds it by its key); else it ends ``lost`` and
        lets go of its key (the client's next try with it creates a task anew).
        Returns False when there was nothing to take back.

        This default is read then written, and only deletes or ends the task;
        stores override it with one atomic step that does all of the above.
        """
        task = self.get(task_id)
        if task is None or not withdrawable(task, running_under):
            return False
        if task.idempotency_key is None:
            self.delete(task_id)
        else:
            self.finish(task_id, TaskState.LOST)
        return True

    @abc.abstractmethod
    def list(
        self,
        *,
        owner: str | None,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Task]:
        """Live (not expired) tasks of ``owner``, newest first, after the task ``before``.

        A ``before`` that is not one of ``owner``'s tasks (unknown, or another
        owner's) gives an empty list. Of a listed task's response, only the status
        code is read (``response.headers`` and ``response.body`` are empty): a list
        shows status documents, and a page of 500 results of megabytes each would
        be read for nothing (:meth:`get` has them).
        """

    @abc.abstractmethod
    def renew_lease(self, worker: str) -> None:
        """Say that ``worker`` is alive for ``lease`` more seconds."""

    @abc.abstractmethod
    def release_lease(self, worker: str) -> None:
        """``worker`` is going away: its tasks that are still active read as if its
        lease had lapsed (lost, or claimable; see the class)."""

    @abc.abstractmethod
    def purge_expired(self, now: float | None = None) -> int:
        """Reclaim the space of expired results and old tombstones, in batches.

        Reading already applies the retention rules, so this only frees space.
        Called by the lease renewal and amortized over submits; returns how many
        records changed.
        """

    # -- opaque blobs (large request bodies handed to another process) --------------

    def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        """Keep ``data`` under ``key`` for up to ``ttl`` seconds (replacing any
        blob of that key), for :meth:`take_blob` in any process that shares the
        store. Used by executors whose messages should not carry large bodies.

        Stores that cannot share blobs raise :class:`NotImplementedError`.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no blobs")

    def take_blob(self, key: str, *, call: str | None = None) -> bytes | None:
        """Remove and return the blob under ``key``; None if absent or expired.

        ``call`` names this take: a store whose replies can be lost (Redis) gives a
        take run again under the same name, within a minute, the same bytes."""
        raise NotImplementedError(f"{type(self).__name__} keeps no blobs")

    def maintain(self) -> None:
        """Housekeeping that the lease renewal runs every ``lease / 3`` seconds, off
        the request path: by default, :meth:`purge_expired`."""
        self.purge_expired()

    def close(self) -> None:
        """Release connections; the store may be used again afterwards."""

    # -- change notifications (long-polling, see flask_restful_async.waiting) --------

    def listen(
        self,
        on_change: ChangeCallback,
        stop: StopSignal,
        *,
        changes: t.Callable[[], bool] | None = None,
    ) -> None:
        """Report tasks ending in other processes, until ``stop`` is set.

        Blocks: runs in a thread of its own (one per store per process, started by
        :mod:`flask_restful_async.waiting`), on a connection of its own, never one
        that the other methods use. Calls ``on_change(task_id)`` when that task may
        have ended, or ``on_change(task_id, ending)`` when it did and the store
        knows how (the waiters then need not read it again);
        ``on_change(None)`` when any task may have; and
        ``on_change(None)`` as soon as it listens (and again after every
        interruption), since whatever ended before was not seen. Spurious calls
        are fine (waiters read the task again), missed ones are not. Returns
        within a fraction of a second of ``stop`` being set, and never raises for
        an outage: it keeps trying, with backoff, until stopped.

        While ``changes()`` is true (an event stream is open in this process) it
        also reports changes short of an end (a task created, started, given
        progress or asked to cancel) as ``on_change(task_id, finished=False)``,
        or ``on_change(None, finished=False)`` when such changes may have been
        missed (it calls that once it starts to hear them). A store that cannot
        tell a change from an end reports every change as ``on_change(None)``.

        This default suits a store whose tasks only change in this process (the
        runner tells waiters and streams itself): there is nothing to listen to.
        """
        while not stop.wait(1.0):
            pass

    def unavailable(
        self, kind: str, detail: str, *, retry_after: int = 1, level: int = logging.WARNING
    ) -> StoreUnavailable:
        """The error to raise for a failure of this store, of a ``kind`` such as
        ``"unreachable"``: its message is the same generic one for every failure of
        every store, since a 503 must not tell clients where the store lives;
        ``detail`` goes to the log ``flask_restful_async.stores`` (prefixed with
        :attr:`url`), at most once every
        :data:`~flask_restful_async.stores.outages.LOG_INTERVAL` seconds per kind,
        with a count of the records left out meanwhile.
        """
        log: OutageLog | None = self.__dict__.get("_outages")
        if log is None:
            log = self.__dict__.setdefault("_outages", OutageLog())
        return log.unavailable(
            kind, f"Task store {self.url}: {detail}", retry_after=retry_after, level=level
        )

    def retention_view(self, task: Task, now: float) -> Task | None:
        """Apply the retention rules to a task as read: itself, a tombstone, or None."""
        if task.finished_at is None or not task.state.finished:
            return task
        age = now - task.finished_at
        if age <= self.result_ttl:
            return task
        if age > self.result_ttl + self.tombstone_ttl:
            return None
        if task.expired:
            return task
        return dataclasses.replace(task, expired=True, response=None, progress=None)

    # -- operating: every owner's tasks, for the ``flask tasks`` commands -------------
    # Not on any request path. A store that cannot do these raises
    # NotImplementedError, and the commands say so.

    def list_all(
        self,
        *,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """Live (not expired) tasks of every owner, newest first, after the task
        ``before`` (an unknown ``before`` gives an empty list), as :meth:`list`
        reads one owner's."""
        raise NotImplementedError(f"{type(self).__name__} cannot list every owner's tasks")

    def stats(self) -> StoreStats:
        """Live tasks of every owner counted by state (as they read: a task whose
        worker is gone counts as lost), and the creation time of the oldest queued
        one. Counted in the store, without reading the tasks' responses."""
        raise NotImplementedError(f"{type(self).__name__} cannot count its tasks")

    def owner_stats(self, owner: str | None) -> StoreStats:
        """As :meth:`stats`, for the tasks of ``owner`` only (what the dashboard
        counts for a caller who sees only their own).

        This default counts what :meth:`list` reads, page by page; stores override
        it to count in the store.
        """
        counts = dict.fromkeys(TaskState, 0)
        oldest: float | None = None
        before: str | None = None
        while True:
            page = self.list(owner=owner, limit=500, before=before)
            for task in page:
                counts[task.state] += 1
                if task.state is TaskState.QUEUED:
                    oldest = task.created_at if oldest is None else min(oldest, task.created_at)
            if len(page) < 500:
                return StoreStats(counts, oldest)
            before = page[-1].id

    def purge_finished(self, *, older_than: float = 0.0, state: TaskState | None = None) -> int:
        """Delete the tasks recorded as finished (tombstones too) more than
        ``older_than`` seconds ago, of every owner; only those in ``state`` (a
        finished state) if given. Their status URLs then answer 404. Works in
        batches, each a short write of its own; returns how many it deleted.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot purge its tasks")

    @staticmethod
    def _finished_state(state: TaskState | None) -> TaskState | None:
        """``state``, refused unless it is None or a finished state (for purges)."""
        if state is not None and not state.finished:
            raise ValueError(f"only finished tasks are purged, not {state.value!r} ones")
        return state

    @staticmethod
    def _now() -> float:
        return time.time()
