"""Progress reports, coalesced: a handler may report on every row, the store sees
a few writes a second.

A report is written at once when the task's last write is at least ``interval``
seconds old; otherwise it is kept, and only the latest kept value is written,
``interval`` seconds after the last write, by one thread per process (so it lands
even if the handler blocks after its last report), or before the task's outcome
(:meth:`ProgressReporter.close`), whichever comes first. A write that fails is
logged and skipped: progress is best effort and never ends a handler.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import typing as t

from . import waiting
from .exceptions import StoreUnavailable
from .task import Progress

if t.TYPE_CHECKING:
    from .stores.base import TaskStore


class ProgressReporter:
    """One task's progress on its way to the store; see the module documentation.

    ``on_cancel`` gets what each write learns of the cancel flag.
    """

    def __init__(
        self,
        task_id: str,
        store: TaskStore,
        *,
        interval: float,
        logger: logging.Logger,
        on_cancel: t.Callable[[bool], None],
    ) -> None:
        self.task_id = task_id
        self.store = store
        self.interval = interval
        self.logger = logger
        self.on_cancel = on_cancel
        # Held while writing, so that the handler's thread and the flusher never
        # write one task's progress at once (an older value could land last).
        self._lock = threading.Lock()
        self._pending: Progress | None = None
        self._written_at = -float("inf")
        self._scheduled = False
        self._closed = False
        self._failing = False

    def report(self, progress: Progress) -> None:
        """Write ``progress`` now, or keep it for a write at most ``interval`` later."""
        with self._lock:
            if self._closed:
                return
            self._pending = progress
            due = self._written_at + self.interval
            if time.monotonic() >= due:
                self._write()
            elif not self._scheduled:
                self._scheduled = True
                _flusher.schedule(due, self)

    def close(self) -> None:
        """Write the latest kept value (if any) and take no more: the task ends."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._write()

    def _flush_due(self) -> None:
        with self._lock:
            self._scheduled = False
            if self._closed or self._pending is None:
                return
            due = self._written_at + self.interval
            if time.monotonic() < due:  # the handler wrote meanwhile
                self._scheduled = True
                _flusher.schedule(due, self)
            else:
                self._write()

    def _write(self) -> None:
        progress, self._pending = self._pending, None
        if progress is None:
            return
        self._written_at = time.monotonic()
        try:
            requested = self.store.set_progress(self.task_id, progress)
        except Exception as e:
            # Once per run of failures: a handler reporting per row would
            # otherwise log as often as it reports.
            if not self._failing:
                self._failing = True
                self.logger.warning(
                    "Progress of task %s could not be stored; skipped until the store answers",
                    self.task_id,
                    exc_info=not isinstance(e, StoreUnavailable),
                    extra={"task_id": self.task_id},
                )
            return
        waiting.changed(self.store, self.task_id)  # streams in this process
        if self._failing:
            self._failing = False
            self.logger.info(
                "Progress of task %s is stored again", self.task_id, extra={"task_id": self.task_id}
            )
        self.on_cancel(requested)


class _Flusher:
    """The one thread per process that writes kept progress when it falls due.

    Started on first use, and again in a forked child; it sleeps while nothing is
    due and never holds a reporter's lock while it waits.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, ProgressReporter]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def schedule(self, due: float, reporter: ProgressReporter) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), reporter))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="restful-async-progress", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is reporter:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, reporter = heapq.heappop(self._heap)
            reporter._flush_due()


_flusher = _Flusher()
os.register_at_fork(after_in_child=_flusher._reset)
