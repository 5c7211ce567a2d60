"""The store contract: every backend keeps task records behind these few methods."""

from __future__ import annotations

import abc
import time

from ..task import Progress, StoredResponse, Task, TaskState


class TaskStore(abc.ABC):
    """Where task records live, shared by every thread (and, for durable stores,
    every process) that submits, runs or polls tasks.

    Implementations must make each method atomic: a state transition never loses a
    concurrent write (a finish racing a cancel, a progress update racing a finish).
    Methods raise :class:`~flask_restful_async.exceptions.StoreUnavailable` when the
    backend cannot be reached; they never leave a half-written task.
    """

    #: Seconds a finished task's result is kept; set by the extension from
    #: ``RESTFUL_ASYNC_RESULT_TTL``.
    result_ttl: float = 24 * 3600
    #: Seconds an expired task is still remembered (answers 410) before it is forgotten.
    tombstone_ttl: float = 24 * 3600

    def configure(self, *, result_ttl: float, tombstone_ttl: float) -> None:
        self.result_ttl = result_ttl
        self.tombstone_ttl = tombstone_ttl

    @abc.abstractmethod
    def create(self, task: Task) -> Task:
        """Record a new queued task and return it.

        If ``task.idempotency_key`` is set and a live task has the same key, owner
        and fingerprint scope, return that task instead and record nothing.
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None:
        """The task, a tombstone (``expired=True``) or None when unknown."""

    @abc.abstractmethod
    def start(self, task_id: str, worker: str) -> Task | None:
        """Move a queued task to running; None if it is no longer queued (cancelled)."""

    @abc.abstractmethod
    def set_progress(self, task_id: str, progress: Progress) -> bool:
        """Record progress of a running task; return whether cancellation was requested."""

    @abc.abstractmethod
    def cancel_requested(self, task_id: str) -> bool:
        """Whether someone asked to cancel this task."""

    @abc.abstractmethod
    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> None:
        """Record the end of a task (from queued or running) and its response."""

    @abc.abstractmethod
    def request_cancel(self, task_id: str) -> Task | None:
        """Cancel a queued task outright, or flag a running one; return the new record."""

    @abc.abstractmethod
    def delete(self, task_id: str) -> None:
        """Forget a task entirely."""

    @abc.abstractmethod
    def list(
        self,
        *,
        owner: str | None,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Task]:
        """Tasks of ``owner`` newest first, starting after the task id ``before``."""

    @abc.abstractmethod
    def purge_expired(self, now: float | None = None) -> int:
        """Turn results past their retention into tombstones, drop old tombstones.

        Returns how many records changed. Stores call it themselves, amortized over
        normal traffic; it is public so a deployment can also run it on a schedule.
        """

    def close(self) -> None:
        """Release connections; the store may be used again afterwards."""

    def _is_expired(self, task: Task, now: float) -> bool:
        return (
            task.finished_at is not None
            and task.state.finished
            and now - task.finished_at > self.result_ttl
        )

    @staticmethod
    def _now() -> float:
        return time.time()
