"""Tasks run in their submit's request thread, written to the store once.

A submit with ``Prefer: wait=N`` may run its task in its own request thread (see
:meth:`AsyncState.plan_wait <flask_restful_async.state.AsyncState.plan_wait>`).
When no one can learn the task's id before it ends (it has no idempotency key to
repeat the submit by, and no copy of the request for another process to run it
again), the store need not hold it while it runs: it is written once, finished
(:meth:`TaskStore.create_finished
<flask_restful_async.stores.base.TaskStore.create_finished>`), one write where a
recorded task takes two.

One that runs longer than it was expected to, past :attr:`Recorder.after`
seconds (``RESTFUL_ASYNC_SHORT_WAIT``), is recorded as running by a thread of
this module, so that the task lists, the dashboard and ``flask tasks`` show it
and it can be cancelled; from then on it is a recorded task like any other. The
thread wakes a few times a second while such runs are under way, and ends when
there are none.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import typing as t
import weakref

from . import outbox, waiting
from .lease import worker_id

if t.TYPE_CHECKING:
    import logging

    from .context import TaskHandle
    from .stores.base import TaskStore
    from .task import Task

#: Longest pause of the thread between two looks at the runs under way (seconds).
MAX_TICK = 0.25


class Run:
    """A task running in its request thread that the store may not hold yet."""

    def __init__(self, task: Task, due: float) -> None:
        self.task = task
        #: When (``time.monotonic()``) it is to be recorded as running if still under way.
        self.due = due
        #: Whether the store holds it, as running.
        self.recorded = False
        #: Whether the store holds it, written whole as it ended.
        self.written = False
        self.ended = False
        #: Called once, as the handler is done (before the final write).
        self.on_end: t.Callable[[], object] | None = None
        #: The worker name of the last recording as running that failed: the store
        #: may hold the task under it all the same (a reply lost), or None.
        self.tried_as: str | None = None
        self.handle: TaskHandle | None = None
        self.lock = threading.Lock()
        self._warned = False

    def attach(self, handle: TaskHandle) -> None:
        """Give the run its ``current_task``, which writes progress and reads the
        cancel flag once the run is recorded (at once, if it is already)."""
        with self.lock:
            self.handle = handle
            if self.recorded:
                handle._in_store(self.task.progress)

    @property
    def stored(self) -> bool:
        """Whether the store holds the task (as running, or as it ended)."""
        return self.recorded or self.written

    def end(self) -> bool:
        """The handler is done: True if the task is still to be written, finished
        (it never was recorded); False if it was recorded running, and ends as any
        recorded task does. No recording starts after this."""
        with self.lock:
            first, self.ended = not self.ended, True
            write_whole = not self.recorded
        if first and self.on_end is not None:
            self.on_end()
        return write_whole


class Recorder:
    """This process's runs of one store that are not recorded yet (see the module)."""

    def __init__(
        self,
        store: TaskStore,
        after: float,
        logger: logging.Logger,
        before_record: t.Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        #: Seconds a run may last before it is recorded as running.
        self.after = after
        self.logger = logger
        #: Called before a run is recorded as running (the lease it runs under).
        self.before_record = before_record
        self._reset()
        _recorders.add(self)

    def _reset(self) -> None:
        # Also in a forked child, before any of its threads runs: the parent's
        # runs are the parent's, and its thread is not in the child.
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._thread: threading.Thread | None = None

    def begin(self, task: Task) -> Run:
        """A run of ``task`` (not in the store) starts in this thread."""
        run = Run(task, time.monotonic() + self.after)
        with self._lock:
            self._runs[task.id] = run
            if self._thread is None:
                thread = threading.Thread(
                    target=self._watch, name="restful-async-recorder", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    # At interpreter exit no thread starts: the run is written
                    # once, as it ends, however long it takes.
                    return run
                self._thread = thread
        return run

    def done(self, run: Run) -> None:
        """Forget ``run``, which has ended (see :meth:`Run.end`)."""
        with self._lock:
            if self._runs.get(run.task.id) is run:
                del self._runs[run.task.id]

    def _watch(self) -> None:
        tick = min(MAX_TICK, max(0.01, self.after / 2))
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                if not self._runs:
                    self._thread = None
                    return
                due = [run for run in self._runs.values() if run.due <= now]
            for run in due:
                try:
                    self._record(run)
                except Exception:
                    # Never the end of this thread: the other runs still need it.
                    self.logger.exception(
                        "Recording task %s as running failed",
                        run.task.id,
                        extra={"task_id": run.task.id},
                    )

    def _record(self, run: Run) -> None:
        """Record ``run`` as running, unless it has ended or is recorded already.
        A store that does not take it is asked again at the next look."""
        with run.lock:
            if run.ended or run.recorded:
                return
            handle = run.handle
            latest = handle.latest if handle is not None else None
            # Under this process's name now: the one it had at the submit may have
            # been given up since (see outbox), and its lease with it.
            task = dataclasses.replace(run.task, worker=worker_id(), progress=latest)
            try:
                if self.before_record is not None:
                    self.before_record()
                self.store.create(task)
            except Exception as e:
                run.tried_as = task.worker
                if not run._warned:
                    run._warned = True
                    outbox.warn_failed(
                        self.logger,
                        "Task %s runs in its request longer than expected and could not"
                        " be recorded as running yet: %s",
                        task.id,
                        e,
                    )
                return
            run.recorded = True
            run.task = task
            if handle is not None:
                handle._in_store(latest)
        with self._lock:
            if self._runs.get(run.task.id) is run:
                del self._runs[run.task.id]
        waiting.changed(self.store, task.id)  # list streams in this process


_recorders: weakref.WeakSet[Recorder] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for recorder in list(_recorders):
        recorder._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
