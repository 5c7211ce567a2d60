"""The default executor: a bounded pool of threads in this process."""

from __future__ import annotations

import atexit
import dataclasses
import os
import queue
import threading
import time
import typing as t
import weakref

from ..exceptions import Saturated
from .base import Executor

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_restful import Resource

    from ..snapshot import RequestSnapshot
    from ..task import Task


@dataclasses.dataclass
class _Job:
    app: Flask
    task_id: str
    snapshot: RequestSnapshot
    resource: Resource | None


class ThreadExecutor(Executor):
    """At most ``max_workers`` tasks run at once; at most ``max_pending`` more wait.

    Beyond that, :meth:`acquire` raises ``Saturated`` and the client gets 503 with
    ``Retry-After``: the process never grows an unbounded queue or thread count.

    Threads are started on demand in the process that submits, so an executor
    created before ``fork`` (``gunicorn --preload``) works in every child. At
    interpreter exit, waiting tasks are marked ``lost`` and running ones get
    ``shutdown_timeout`` seconds to finish.
    """

    local = True

    def __init__(
        self, max_workers: int = 8, max_pending: int = 64, shutdown_timeout: float = 20.0
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if max_pending < 0:
            raise ValueError("max_pending must be 0 or more")
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.shutdown_timeout = shutdown_timeout
        self._reset()
        _executors.add(self)

    def _reset(self) -> None:
        # Also run in a forked child: the parent's threads and locks are not ours.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_workers + self.max_pending)
        self._idle = threading.Semaphore(0)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._exit_hook_registered = False

    @property
    def thread_count(self) -> int:
        """Worker threads started in this process so far (at most ``max_workers``)."""
        return len(self._threads)

    def acquire(self) -> None:
        if self._closed or not self._slots.acquire(blocking=False):
            raise Saturated(
                f"All {self.max_workers} workers are busy and {self.max_pending}"
                " tasks are waiting; try again later."
            )

    def release(self) -> None:
        self._slots.release()

    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        self._queue.put(_Job(app, task.id, snapshot, resource))
        if self._idle.acquire(blocking=False):
            return
        with self._lock:
            if len(self._threads) < self.max_workers and not self._closed:
                thread = threading.Thread(
                    target=self._work,
                    name=f"restful-async-{len(self._threads)}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
                if not self._exit_hook_registered:
                    atexit.register(self.shutdown)
                    self._exit_hook_registered = True

    def _work(self) -> None:
        # Imported here, not at the top: every process imports this module (the
        # package does), and one that hands its tasks to another executor
        # (Celery) should never load the code that runs handlers.
        from ..runner import run_task

        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                run_task(job.app, job.task_id, job.snapshot, job.resource)
            finally:
                self._slots.release()
            self._idle.release()

    def shutdown(self, timeout: float | None = None) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        deadline = time.monotonic() + (self.shutdown_timeout if timeout is None else timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                from ..runner import abandon_task

                abandon_task(job.app, job.task_id)
                self._slots.release()
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


_executors: weakref.WeakSet[ThreadExecutor] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for executor in list(_executors):
        executor._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
