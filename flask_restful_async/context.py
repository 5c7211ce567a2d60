"""``current_task``: what a handler running as a task can ask of its task."""

from __future__ import annotations

import contextvars
import time
import typing as t

from werkzeug.local import LocalProxy

from .exceptions import TaskCancelled
from .task import Progress

if t.TYPE_CHECKING:
    from .stores.base import TaskStore

#: How long a read of the cancel flag is trusted before the store is asked again,
#: so that a handler may test ``current_task.cancelled`` in a tight loop.
CANCEL_CHECK_INTERVAL = 0.05


class TaskHandle:
    """The running task, as seen from inside its handler."""

    def __init__(self, task_id: str, store: TaskStore) -> None:
        self.id = task_id
        self._store = store
        self._cancelled = False
        self._checked_at = 0.0

    def progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report progress; the status document shows it while the task runs."""
        if total is not None and not isinstance(total, (int, float)):
            raise TypeError("total must be a number or None")
        if not isinstance(current, (int, float)):
            raise TypeError("current must be a number")
        if message is not None and not isinstance(message, str):
            raise TypeError("message must be a string or None")
        requested = self._store.set_progress(self.id, Progress(current, total, message))
        self._note_cancel(requested)

    @property
    def cancelled(self) -> bool:
        """True once a client asked to cancel this task (``DELETE`` on its status URL)."""
        if not self._cancelled and time.monotonic() - self._checked_at > CANCEL_CHECK_INTERVAL:
            self._note_cancel(self._store.cancel_requested(self.id))
        return self._cancelled

    def raise_if_cancelled(self) -> None:
        """End the task as ``cancelled`` if cancellation was requested."""
        if self.cancelled:
            raise TaskCancelled(f"task {self.id} was cancelled")

    def _note_cancel(self, requested: bool) -> None:
        self._cancelled = self._cancelled or requested
        self._checked_at = time.monotonic()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"


_cv_task: contextvars.ContextVar[TaskHandle] = contextvars.ContextVar("flask_restful_async.task")

#: The task the current handler runs as. Outside a task, using it raises RuntimeError.
current_task: TaskHandle = LocalProxy(  # type: ignore[assignment]
    _cv_task,
    unbound_message=(
        "Working outside of a task: current_task is only available inside a method"
        " of an AsyncResource that runs in the background."
    ),
)
