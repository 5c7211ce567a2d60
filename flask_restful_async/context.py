"""``current_task``: what a handler running as a task can ask of its task."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import math
import threading
import time
import typing as t

from werkzeug.local import LocalProxy

from . import signals
from .exceptions import StoreUnavailable, TaskCancelled
from .progress import ProgressReporter
from .task import Progress

if t.TYPE_CHECKING:
    from flask import Flask

    from .stores.base import TaskStore
    from .task import Task

#: How long a read of the cancel flag is trusted before the store is asked again,
#: so that a handler may test ``current_task.cancelled`` in a tight loop.
CANCEL_CHECK_INTERVAL = 0.05


class TaskHandle:
    """The running task, as seen from inside its handler.

    Nothing here raises for a store outage: progress is best effort (see
    :mod:`flask_restful_async.progress`), and the cancel flag keeps its last known
    value until the store answers again.

    With ``app`` and ``record`` (the task as it started), each report sends
    :data:`~flask_restful_async.signals.task_progress`.
    """

    #: What the submit's propagators wrote into the task's carrier (text fields,
    #: such as the W3C ``traceparent`` of the request that submitted the task;
    #: see :attr:`AsyncState.propagators
    #: <flask_restful_async.state.AsyncState.propagators>`). Empty without any.
    #: Set before ``task_started`` is sent, so its receivers can read it.
    carrier: t.Mapping[str, str]

    def __init__(
        self,
        task_id: str,
        store: TaskStore,
        *,
        progress_interval: float = 0.0,
        logger: logging.Logger | None = None,
        app: Flask | None = None,
        record: Task | None = None,
        carrier: t.Mapping[str, str] | None = None,
        in_store: bool = True,
    ) -> None:
        self.id = task_id
        self.carrier = carrier if carrier is not None else {}
        self._store = store
        self._app = app
        self._record = record
        #: The latest progress the handler reported (None before the first report).
        self.latest: Progress | None = None
        self._cancelled = False
        self._checked_at = 0.0
        self._progress_interval = progress_interval
        self._logger = logger or logging.getLogger(__name__)
        # A task not in the store yet (run in its request thread, see
        # flask_restful_async.deferred) keeps its progress here until it is
        # recorded, and cannot be cancelled meanwhile: no one knows its id.
        self._reporter: ProgressReporter | None = None
        # Until then, taken by each report and by the move to the store, so that
        # a report made meanwhile is never overtaken by an older one.
        self._moving: threading.Lock | None = None
        if in_store:
            self._reporter = self._new_reporter()
        else:
            self._moving = threading.Lock()

    def _new_reporter(self) -> ProgressReporter:
        return ProgressReporter(
            self.id,
            self._store,
            interval=self._progress_interval,
            logger=self._logger,
            on_cancel=self._note_cancel,
        )

    def _in_store(self, recorded: Progress | None) -> None:
        """The task is in the store from now on, recorded with progress
        ``recorded``: progress is written there, the cancel flag read there."""
        assert self._moving is not None
        with self._moving:
            reporter = self._new_reporter()
            latest = self.latest
            if latest is not None and latest is not recorded:
                reporter.report(latest)  # reported while it was being recorded
            self._reporter = reporter

    def progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report progress; the status document shows it while the task runs.

        Cheap enough to call on every row: the store gets at most one write per
        ``RESTFUL_ASYNC_PROGRESS_INTERVAL`` seconds, and the latest value lands
        at most that long after it was reported, and before the task's outcome.
        """
        if total is not None and not isinstance(total, (int, float)):
            raise TypeError("total must be a number or None")
        if not isinstance(current, (int, float)):
            raise TypeError("current must be a number")
        # JSON has no NaN nor infinity; an int too large for a float is neither.
        if not _finite(current) or (total is not None and not _finite(total)):
            raise ValueError("current and total must be finite numbers")
        if message is not None and not isinstance(message, str):
            raise TypeError("message must be a string or None")
        progress = Progress(current, total, message, time.time())
        if self._moving is None:
            self.latest = progress
            self._reporter_report(progress)
        else:
            with self._moving:
                self.latest = progress
                self._reporter_report(progress)
        if signals.task_progress.receivers and self._app is not None and self._record is not None:
            task = dataclasses.replace(self._record, progress=progress)
            signals.send(signals.task_progress, self._app, task=task)

    def _reporter_report(self, progress: Progress) -> None:
        reporter = self._reporter
        if reporter is not None:
            reporter.report(progress)

    def _close(self) -> None:
        # The handler returned: write the progress still kept, take no more.
        if self._reporter is not None:
            self._reporter.close()

    @property
    def cancelled(self) -> bool:
        """True once a client asked to cancel this task (``DELETE`` on its status URL)."""
        if self._reporter is None:
            return self._cancelled
        if not self._cancelled and time.monotonic() - self._checked_at > CANCEL_CHECK_INTERVAL:
            try:
                requested = self._store.cancel_requested(self.id)
            except StoreUnavailable:
                # No one can ask to cancel through a store that does not answer.
                requested = False
            self._note_cancel(requested)
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


def _finite(number: float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False
