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

from .. import stopping
from ..exceptions import Saturated
from .base import Executor

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_restful import Resource

    from ..deferred import Run
    from ..snapshot import RequestSnapshot
    from ..stores.base import Ending
    from ..task import Task


@dataclasses.dataclass
class _Job:
    app: Flask
    task_id: str
    worker: str | None
    snapshot: RequestSnapshot
    resource: Resource | None
    # When it was submitted (time.monotonic()): its run time counts from there.
    submitted: float = dataclasses.field(default_factory=time.monotonic)


class ThreadExecutor(Executor):
    """At most ``max_workers`` tasks run at once (in its threads, or in request
    threads in their place: see :meth:`acquire_now`); at most ``max_pending`` more
    wait, holding at most ``max_pending_bytes`` of request snapshots between them.
    Short tasks that their submits run themselves take ``max_workers`` places of
    their own first.

    Beyond either bound, :meth:`acquire` raises ``Saturated`` and the client gets
    503 with ``Retry-After``: the process never grows an unbounded queue, heap or
    thread count. A task counts against ``max_pending_bytes`` from its submit until
    a worker starts it; one task is always let in when none waits, whatever its
    size (the body's own bound is ``RESTFUL_ASYNC_MAX_BODY``).

    Threads are started on demand in the process that submits, so an executor
    created before ``fork`` (``gunicorn --preload``) works in every child. At
    interpreter exit (a graceful stop), it takes no new task, hands the waiting
    ones back to the store for another process to run (see
    :mod:`flask_restful_async.takeover`), and gives running ones
    ``shutdown_timeout`` seconds to finish. Where the stop is heard as it begins
    (:mod:`flask_restful_async.stopping`), the waiting tasks that another process
    can run go back then, and none starts here after it (see :attr:`hands_over`).
    """

    local = True

    def __init__(
        self,
        max_workers: int = 8,
        max_pending: int = 4096,
        shutdown_timeout: float = 20.0,
        max_pending_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        if max_pending < 0:
            raise ValueError("max_pending must be 0 or more")
        if max_pending_bytes < 0:
            raise ValueError("max_pending_bytes must be 0 or more")
        self.max_workers = max_workers
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.shutdown_timeout = shutdown_timeout
        self._reset()
        _executors.add(self)

    def _reset(self) -> None:
        # Also run in a forked child: the parent's threads and locks are not ours.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_workers + self.max_pending)
        self._idle = threading.Semaphore(0)
        # One per task running in the thread that submitted it (acquire_now): at
        # most max_workers at once, besides as many in this pool's threads. Beyond
        # those, such a task takes the place of an idle worker (_borrowed of them).
        self._in_request = threading.BoundedSemaphore(self.max_workers)
        self._borrowed = 0
        # Tasks running in this pool's threads, or in a request thread in a
        # worker's place: at most max_workers.
        self._running = threading.BoundedSemaphore(self.max_workers)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Tasks accepted or taken over and not yet done (running or waiting).
        self._taken = 0
        # Bytes of the snapshots of tasks reserved or waiting, not yet started.
        self._held_bytes = 0
        self._closed = False
        self._exit_hook_registered = False

    @property
    def thread_count(self) -> int:
        """Worker threads started in this process so far (at most ``max_workers``)."""
        return len(self._threads)

    @property
    def held_bytes(self) -> int:
        """Bytes of request snapshots held by tasks accepted and not yet started."""
        return self._held_bytes

    def acquire(self, size: int = 0) -> None:
        if self._closed or not self._slots.acquire(blocking=False):
            raise Saturated(
                f"All {self.max_workers} workers are busy and {self.max_pending}"
                " tasks are waiting; try again later."
            )
        with self._lock:
            if self._held_bytes and self._held_bytes + size > self.max_pending_bytes:
                full = True
            else:
                full = False
                self._taken += 1
                self._held_bytes += size
        if full:
            self._slots.release()
            raise Saturated(
                "The tasks waiting here hold as many bytes of requests as they may"
                f" ({self.max_pending_bytes}); try again later."
            )

    def acquire_now(self) -> bool:
        if self._closed or stopping.begun():
            # Stopping: the task goes to the queue (and to another process, where
            # it can: see submit), not into a request thread the stop waits for.
            return False
        if self._in_request.acquire(blocking=False):
            return True
        # Every place for a task in a request thread is taken. Sent to this pool,
        # the task would take an idle worker's place while its client's thread
        # waits: it takes that place all the same, and runs where it is. The
        # handlers running at once stay as many as before; the hand-over to a
        # worker and back (as much CPU again as the rest of the task's path) is saved.
        with self._lock:
            if self._taken >= self.max_workers or not self._running.acquire(blocking=False):
                return False
            if not self._slots.acquire(blocking=False):
                self._running.release()
                return False
            self._taken += 1
            self._borrowed += 1
        return True

    def release_now(self) -> None:
        # Places are alike: a worker's place is given back first, whichever task
        # ends, so that the pool has it again as soon as it can.
        with self._lock:
            borrowed = self._borrowed > 0
            if borrowed:
                self._borrowed -= 1
                self._taken -= 1
        if borrowed:
            self._running.release()
            self._slots.release()
        else:
            self._in_request.release()

    def run_now(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource,
        *,
        unrecorded: Run | None = None,
    ) -> Ending | None:
        from ..runner import run_here  # as in _work

        try:
            return run_here(app, task, snapshot, resource, unrecorded=unrecorded)
        finally:
            self.release_now()

    def release(self, size: int = 0) -> None:
        with self._lock:
            self._taken -= 1
            self._held_bytes -= size
        self._slots.release()

    def idle(self, limit: int) -> int:
        """Idle workers, at most ``limit``: room for tasks taken over from other
        processes. The waiting room (``max_pending``) stays for this process's own
        submits, and a backlog spreads over the processes. Nothing is reserved, so
        a submit is never refused because a claim is under way."""
        with self._lock:
            if self._closed or stopping.begun():
                return 0  # a stopping process takes over nothing
            return max(0, min(limit, self.max_workers - self._taken))

    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        job = _Job(app, task.id, task.worker, snapshot, resource)
        if self._handed_over_now(job):
            return  # accepted while the process stops: for another process, at once
        if not self._idle.acquire(blocking=False):
            # No idle worker: one more, if the pool may grow. Before the job is
            # queued, so that a task no thread can run is refused, not stranded.
            self._grow(app)
        self._queue.put(job)
        if self._closed:
            # Shut down while this request was on its way: no worker may be left
            # to take the task, so it goes back to the store with the rest.
            self._hand_back()

    def _grow(self, app: Flask) -> None:
        """Start one more worker if the pool has room. Raises Saturated when none
        can start (the process's thread limit) and no worker is there to take the
        task in its turn."""
        with self._lock:
            if len(self._threads) >= self.max_workers or self._closed:
                return
            if not self._threads:
                self._queue = _current_queue(self._queue)
                # Its queued tasks go back as this process's stop begins.
                stopping.listen()
            thread = threading.Thread(
                target=self._work,
                name=f"restful-async-{len(self._threads)}",
                daemon=True,
            )
            try:
                thread.start()
            except RuntimeError:
                if self._threads:
                    app.logger.warning(
                        "Could not start a task worker; the %d running will take the task",
                        len(self._threads),
                        exc_info=True,
                    )
                    return
                raise Saturated("No worker can be started here now; try again later.") from None
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
            if self._handed_over_now(job):
                # Not started in a process that stops (see _stop_begun).
                self._idle.release()
                continue
            with self._lock:
                self._held_bytes -= job.snapshot.held_bytes
            self._running.acquire()  # a task in a request thread may hold a place
            try:
                run_task(job.app, job.task_id, job.snapshot, job.resource)
            except BaseException:
                # What a handler raises that is no Exception (sys.exit(), an
                # asyncio.CancelledError) ended its task failed on its way out; it
                # must not end this thread too, which nothing would replace.
                job.app.logger.exception(
                    "Task %s raised past its handler; the worker goes on",
                    job.task_id,
                    extra={"task_id": job.task_id},
                )
            finally:
                self._running.release()
                self.release()
            self._idle.release()
            if self.on_ran is not None:
                self._report_run_time(job)
            if self.on_done is not None:
                self.on_done()

    def _report_run_time(self, job: _Job) -> None:
        assert self.on_ran is not None
        seconds = time.monotonic() - job.submitted
        try:
            self.on_ran(job.snapshot.endpoint, job.snapshot.method, seconds)
        except Exception:
            # Only a guess of run times is lost: the worker carries on.
            job.app.logger.exception(
                "Recording the run time of task %s failed",
                job.task_id,
                extra={"task_id": job.task_id},
            )

    def shutdown(self, timeout: float | None = None) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        deadline = time.monotonic() + (self.shutdown_timeout if timeout is None else timeout)
        self._hand_back()
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _stop_begun(self) -> None:
        """This process's graceful stop has begun (:mod:`~flask_restful_async.stopping`):
        the waiting tasks another process can run go back to the store now, rather
        than wait for a worker here, where the server may kill the process before
        they end (it waits for the requests under way first, up to its graceful
        timeout, and the task threads would go on starting tasks meanwhile). The
        others wait for their turn here, as before; tasks accepted from now on go
        the same way (see :meth:`submit`)."""
        if os.getpid() != self._pid or not self.hands_over:
            return
        going, staying = self._take_queued(only_going=True)
        if not self._give_back(going, keep=True):
            staying.extend(going)  # not handed over: run here after all
        for job in staying:
            self._queue.put(job)
        if self._closed:
            # Shut down (before or meanwhile): its drain may have missed the jobs
            # put back.
            self._hand_back()

    def _goes_back(self, job: _Job) -> bool:
        """Whether another process can run ``job`` (see :func:`takeover.hand_back
        <flask_restful_async.takeover.hand_back>`)."""
        return self.hands_over and job.worker is not None and job.snapshot.portable

    def _handed_over_now(self, job: _Job) -> bool:
        """Whether ``job``, about to be queued or started, went back to the store
        instead, for another process: it does once the process's stop has begun,
        if another process can run it and the store takes it."""
        return stopping.begun() and self._goes_back(job) and self._give_back([job], keep=True)

    def _hand_back(self) -> None:
        """Take every waiting task out of the queue and give it back to the store."""
        jobs, _ = self._take_queued(only_going=False)
        self._give_back(jobs, keep=False)

    def _take_queued(self, *, only_going: bool) -> tuple[list[_Job], list[_Job]]:
        """Empty the queue, but for the shutdown's markers, which go back in:
        ``(going, staying)``, where with ``only_going`` the jobs no other process
        can run are staying, and otherwise none."""
        going: list[_Job] = []
        staying: list[_Job] = []
        stops = 0
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stops += 1
            elif only_going and not self._goes_back(job):
                staying.append(job)
            else:
                going.append(job)
        for _ in range(stops):  # a late submit's drain took them: put them back
            self._queue.put(None)
        return going, staying

    def _give_back(self, jobs: list[_Job], *, keep: bool) -> bool:
        """Give ``jobs``, which this executor will not run, back to the store, and
        their places here. Returns whether that went well. If it failed (logged),
        with ``keep`` the jobs are still this executor's to run, their places kept;
        without, their places are given up all the same: the store still has them
        held by this process, and another takes them over once its lease ends."""
        apps = {id(job.app): job.app for job in jobs}.values()
        try:
            for app in apps:
                mine = [(job.task_id, job.worker, job.snapshot) for job in jobs if job.app is app]
                if self.on_hand_back is not None:
                    self.on_hand_back(mine)
        except Exception:
            for app in apps:
                app.logger.exception(
                    "Handing %d waiting tasks back to the store failed%s",
                    len(jobs),
                    "; they run here" if keep else "",
                )
            if keep:
                return False
            went = False
        else:
            went = True
        for job in jobs:
            self.release(job.snapshot.held_bytes)
        return went


def _current_queue(jobs: queue.SimpleQueue[_Job | None]) -> queue.SimpleQueue[_Job | None]:
    """``jobs``, or a queue of the class the ``queue`` module holds now, with the
    same jobs, if that has changed since ``jobs`` was made.

    gevent replaces it when it patches a process: gunicorn's gevent worker does so
    after the fork, and so after an app made in the master (``--preload``) made its
    executor. A worker thread (a greenlet then) waiting on the C queue made before
    would block the whole process at its first task. Called before the first
    worker thread of the process starts: nothing waits on ``jobs`` yet.
    """
    if type(jobs) is queue.SimpleQueue:
        return jobs
    fresh: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
    while True:
        try:
            fresh.put(jobs.get_nowait())
        except queue.Empty:
            return fresh


_executors: weakref.WeakSet[ThreadExecutor] = weakref.WeakSet()


def _stop_begun() -> None:
    for executor in stopping.members(_executors):
        executor._stop_begun()


def _reset_after_fork() -> None:
    for executor in list(_executors):
        executor._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
stopping.on_stop(_stop_begun)
