"""``memory://``: a dict in this process. Fast, and only for a single process."""

from __future__ import annotations

import builtins
import threading
import time
import typing as t
from collections import Counter, OrderedDict

from ..task import Progress, StoredResponse, Task, TaskState
from .base import Claimed, StoreStats, TaskStore, withdrawable

#: Expired results are looked for at most this often (seconds), by whichever
#: request happens to create or finish a task: no thread of its own.
PURGE_INTERVAL = 1.0


class MemoryStore(TaskStore):
    """Tasks in a dict guarded by one lock.

    Every process has its own copy, so this store is wrong under ``gunicorn -w 4``
    (the poll may reach another process): use it for tests and for servers that
    run one process (``gunicorn -w 1 --threads N``). Its tasks die with the
    process, so it keeps no leases: :meth:`claim` takes the tasks handed back
    (:meth:`hand_back`), which is all that another holder's lapse could mean here.
    """

    url = "memory://"
    shared = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        # finished task ids in finishing order, so that expiry pops from the front
        self._finished: OrderedDict[str, float] = OrderedDict()
        # For stats(): the queued and running tasks, and how many of those in
        # _finished ended in each state.
        self._active: dict[str, Task] = {}
        self._ended: Counter[TaskState] = Counter()
        self._tombstones: OrderedDict[str, float] = OrderedDict()
        self._keys: dict[tuple[str | None, str], str] = {}
        self._next_purge = 0.0
        self._blobs: dict[str, tuple[bytes, float]] = {}
        # Request snapshots of tasks that another worker may take over, by task id.
        self._snapshots: dict[str, bytes] = {}

    @classmethod
    def _listed(cls, task: Task) -> Task:
        """A copy as a list shows it: of its response, the status code alone (see
        TaskStore.list)."""
        copied = cls._copy(task)
        if task.response is not None:
            copied.response = StoredResponse(task.response.status, [], b"")
        return copied

    @staticmethod
    def _copy(task: Task) -> Task:
        # A shallow copy is enough (Progress and StoredResponse are frozen) and,
        # made this way, several times cheaper than dataclasses.replace.
        copied = Task.__new__(Task)
        copied.__dict__.update(task.__dict__)
        return copied

    def create(self, task: Task, snapshot: bytes | None = None) -> Task:
        with self._lock:
            self._maybe_purge()
            if task.idempotency_key is not None:
                scope = (task.owner, task.idempotency_key)
                existing_id = self._keys.get(scope)
                existing = self._tasks.get(existing_id) if existing_id else None
                if existing is not None and not existing.expired:
                    return self._copy(existing)
                self._keys[scope] = task.id
            self._tasks[task.id] = stored = self._copy(task)
            self._active[task.id] = stored
            if snapshot is not None:
                self._snapshots[task.id] = bytes(snapshot)
            return task

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return None
            now = time.time()
            self._lose_if_stale(task, now)
            return self.retention_view(self._copy(task), now)

    def get_by_key(self, owner: str | None, key: str) -> Task | None:
        with self._lock:
            task_id = self._keys.get((owner, key))
        if task_id is None:
            return None
        found = self.get(task_id)
        return None if found is None or found.expired else found

    def get_owned(self, task_id: str, owner: str | None) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.owner != owner:
                return None
            now = time.time()
            self._lose_if_stale(task, now)
            return self.retention_view(self._copy(task), now)

    def _lose_if_stale(self, task: Task, now: float) -> None:
        """Record as lost a task that no worker started within ``queued_ttl``
        (with the lock held)."""
        if task.state is TaskState.QUEUED and task.created_at < now - self.queued_ttl:
            self._end(task, TaskState.LOST, now)

    def _end(self, task: Task, state: TaskState, now: float) -> None:
        """Record ``task``'s end (with the lock held); its snapshot goes."""
        task.state, task.finished_at = state, now
        self._finished[task.id] = now
        self._active.pop(task.id, None)
        self._ended[state] += 1
        self._snapshots.pop(task.id, None)

    def start(self, task_id: str, worker: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is not None:
                self._lose_if_stale(task, time.time())  # it reads lost: never run
            if task is None or task.state is not TaskState.QUEUED:
                return None
            task.state = TaskState.RUNNING
            task.started_at = time.time()
            task.worker = worker
            if not task.rerun:
                self._snapshots.pop(task_id, None)
            return self._copy(task)

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        if limit < 1:
            raise ValueError(f"claim limit must be 1 or more, not {limit}")
        now = time.time()
        with self._lock:
            claimable = []
            for task_id in list(self._snapshots):
                task = self._tasks[task_id]
                self._lose_if_stale(task, now)
                if task.state is TaskState.QUEUED and task.worker is None:
                    claimable.append(task)
            claimable.sort(key=lambda task: (task.created_at, task.id))
            claimed = []
            for task in claimable[:limit]:
                task.worker = worker
                claimed.append(Claimed(self._copy(task), self._snapshots[task.id]))
            return claimed

    def hand_back(self, worker: str, task_ids: t.Sequence[str]) -> int:
        with self._lock:
            handed = 0
            for task_id in task_ids:
                task = self._tasks.get(task_id)
                if task is not None and task.state is TaskState.QUEUED and task.worker == worker:
                    task.worker = None
                    handed += 1
            return handed

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return False
            if task.state is TaskState.RUNNING:
                task.progress = progress
            return task.cancel_requested

    def cancel_requested(self, task_id: str) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            return task is not None and task.cancel_requested

    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> float | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.state.finished:
                return None
            now = time.time()
            task.response = response
            self._end(task, state, now)
            self._maybe_purge(now)
        return now

    def request_cancel(self, task_id: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.expired:
                return None
            self._lose_if_stale(task, time.time())
            if task.state is TaskState.QUEUED:
                self._end(task, TaskState.CANCELLED, time.time())
            task.cancel_requested = True
            return self._copy(task)

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._forget(task_id)

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or not withdrawable(task, running_under):
                return False
            if task.idempotency_key is None:
                self._forget(task_id)
            elif task_id in self._snapshots:
                if task.cancel_requested:  # asked while it read running: it ends so
                    self._end(task, TaskState.CANCELLED, time.time())
                else:
                    task.state, task.started_at, task.worker = TaskState.QUEUED, None, None
            else:
                self._drop_key(task)
                task.idempotency_key = None
                self._end(task, TaskState.LOST, time.time())
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
        with self._lock:
            candidates = list(reversed(self._tasks.values()))
            for task in candidates:
                self._lose_if_stale(task, now)
        found: list[Task] = []
        skipping = before is not None
        for task in candidates:
            if skipping:
                # Only the owner's own task is a cursor: any other id ends the list.
                skipping = task.id != before or task.owner != owner
                continue
            if task.owner != owner or (state is not None and task.state is not state):
                continue
            view = self.retention_view(task, now)
            if view is None or view.expired:
                continue
            found.append(self._listed(view))
            if len(found) >= limit:
                break
        return found

    def renew_lease(self, worker: str) -> None:
        """Nothing to do: tasks of this store live and die with this process."""

    def release_lease(self, worker: str) -> None:
        """Nothing to do: tasks of this store live and die with this process."""

    def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        with self._lock:
            self._blobs[key] = (bytes(data), time.time() + ttl)

    def take_blob(self, key: str, *, call: str | None = None) -> bytes | None:
        with self._lock:
            entry = self._blobs.pop(key, None)
        if entry is None or entry[1] < time.time():
            return None
        return entry[0]

    def purge_expired(self, now: float | None = None) -> int:
        with self._lock:
            return self._purge(time.time() if now is None else now)

    def _maybe_purge(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now >= self._next_purge:
            self._next_purge = now + PURGE_INTERVAL
            self._purge(now)

    def _purge(self, now: float) -> int:
        changed = 0
        for key in [k for k, (_, until) in self._blobs.items() if until < now]:
            del self._blobs[key]
        while self._finished:
            task_id, finished_at = next(iter(self._finished.items()))
            if now - finished_at <= self.result_ttl:
                break
            del self._finished[task_id]
            task = self._tasks.get(task_id)
            if task is not None:
                self._ended[task.state] -= 1
                task.expired, task.response, task.progress = True, None, None
                self._tombstones[task_id] = finished_at
            changed += 1
        while self._tombstones:
            task_id, finished_at = next(iter(self._tombstones.items()))
            if now - finished_at <= self.result_ttl + self.tombstone_ttl:
                break
            self._forget(task_id)
            changed += 1
        return changed

    def _forget(self, task_id: str) -> None:
        task = self._tasks.pop(task_id, None)
        self._snapshots.pop(task_id, None)
        self._active.pop(task_id, None)
        if self._finished.pop(task_id, None) is not None and task is not None:
            self._ended[task.state] -= 1
        self._tombstones.pop(task_id, None)
        if task is not None:
            self._drop_key(task)

    def _drop_key(self, task: Task) -> None:
        """Let go of ``task``'s idempotency key, if it still names it (lock held)."""
        if task.idempotency_key is not None:
            scope = (task.owner, task.idempotency_key)
            if self._keys.get(scope) == task.id:
                del self._keys[scope]

    # -- operating (see TaskStore.list_all) ----------------------------------------

    def _live(self, now: float) -> builtins.list[Task]:
        """Copies of every live task as it reads, newest first."""
        with self._lock:
            found = []
            for task in reversed(self._tasks.values()):
                self._lose_if_stale(task, now)
                view = self.retention_view(task, now)
                if view is not None and not view.expired:
                    found.append(self._listed(view))
            return found

    def list_all(
        self,
        *,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        tasks = self._live(time.time())
        if before is not None:
            position = next((i for i, task in enumerate(tasks) if task.id == before), None)
            if position is None:
                return []
            tasks = tasks[position + 1 :]
        return [task for task in tasks if state is None or task.state is state][:limit]

    def stats(self) -> StoreStats:
        """Counted as tasks end, once expired results are purged: the cost follows
        the number of queued and running tasks, not of those kept."""
        now = time.time()
        with self._lock:
            self._purge(now)
            for task in list(self._active.values()):
                self._lose_if_stale(task, now)
            counts = dict.fromkeys(TaskState, 0)
            counts.update(self._ended)
            oldest: float | None = None
            for task in self._active.values():
                counts[task.state] += 1
                if task.state is TaskState.QUEUED:
                    oldest = task.created_at if oldest is None else min(oldest, task.created_at)
        return StoreStats(counts, oldest)

    def owner_stats(self, owner: str | None) -> StoreStats:
        """One owner's live tasks, counted one by one."""
        counts = dict.fromkeys(TaskState, 0)
        oldest: float | None = None
        for task in self._live(time.time()):
            if task.owner != owner:
                continue
            counts[task.state] += 1
            if task.state is TaskState.QUEUED:
                oldest = task.created_at if oldest is None else min(oldest, task.created_at)
        return StoreStats(counts, oldest)

    def purge_finished(self, *, older_than: float = 0.0, state: TaskState | None = None) -> int:
        state = self._finished_state(state)
        cutoff = time.time() - older_than
        with self._lock:
            doomed = [
                task.id
                for task in self._tasks.values()
                if task.state.finished
                and task.finished_at is not None
                and task.finished_at <= cutoff
                and (state is None or task.state is state)
            ]
            for task_id in doomed:
                self._forget(task_id)
        return len(doomed)
