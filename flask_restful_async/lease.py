"""The lease a process renews while it holds tasks, so that others can tell it died."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import secrets
import socket
import threading
import time
import typing as t
import weakref

from flask import Flask

from . import outbox
from .exceptions import RestfulAsyncError
from .stores.base import RENEW_RETRY, TaskStore


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


# Named once per process, at import and in every forked child, never lazily: two
# threads naming a process at once would give its tasks and its lease two names.
_worker_id = _new_worker_id()


def worker_id() -> str:
    """This process's name in task records: host, pid and a random part (pids repeat)."""
    return _worker_id


#: Seconds a process that exits gives the outcomes still waiting for the store
#: before it releases its lease (which makes their tasks lost).
EXIT_DRAIN_TIMEOUT = 2.0
#: Seconds :meth:`LeaseKeeper.release` waits for a renewal or claim under way.
STOP_TIMEOUT = 2.0
#: Seconds between two tries of :meth:`LeaseKeeper.start` while the store is down.
START_RETRY = 1.0


class LeaseKeeper:
    """Renews this process's lease in a shared store every third of its length.

    Started by the first request of any kind in each process (so forked workers
    start their own, and a process started by a reload soon takes over the tasks
    its predecessor handed back), or the first submit, it also reclaims expired
    results in batches: the one place, besides the amortized purge on submit,
    where cleanup runs, and never a thread per request. After each renewal, and
    when woken (:meth:`wake`), it calls ``on_renew`` (set by the app's wiring:
    :meth:`Takeover.claim <flask_restful_async.takeover.Takeover.claim>`). At
    interpreter exit the lease is released, and tasks the process still held
    become ``lost`` at once (running ones) or free for others (waiting ones)
    instead of after the lease.

    It never renews a name whose tasks' outcomes the process gave up on (see
    :mod:`flask_restful_async.outbox`): it releases that name's lease instead,
    so that those tasks read ``lost``, and the process goes on under a new name.
    """

    def __init__(self, app: Flask, store: TaskStore) -> None:
        self.app = app
        self.store = store
        self.on_renew: t.Callable[[], object] | None = None
        self._reset()
        _keepers.add(self)

    def _reset(self) -> None:
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._turn_at = math.inf
        self._thread: threading.Thread | None = None
        self._next_start = 0.0
        # Until when (time.monotonic()) the last renewal that went through keeps
        # the lease live (see ensure).
        self._live_until = -math.inf
        # The names this process renews in this store, the current one last;
        # older ones until the process gives them up.
        self._held: list[str] = []

    def ensure(self) -> None:
        """Hold a live lease for this process; raises ``StoreUnavailable`` if it cannot.

        Called before this process writes its name into a task (a submit, a start, a
        short task's record). Once started it costs two comparisons, unless no
        renewal went through for a lease (a store outage that outlasted it): then
        the lease is renewed here first, since the store may hold it lapsed, and a
        task written under a lapsed name reads as lost to the next reader, before
        the renewal thread's next try.
        """
        if (
            self._pid == os.getpid()
            and self._held[-1] == _worker_id
            and time.monotonic() < self._live_until
        ):
            return
        # The store is called outside the lock: while it fails, each caller fails
        # in the store's own time, not one timeout after another (a renewal is an
        # upsert of the same name, which callers at once may each make).
        current = _worker_id
        if self._pid == os.getpid():
            if self._held[-1] != current or time.monotonic() >= self._live_until:
                self._renew_now(current)
                with self._lock:
                    if self._held[-1] != current:  # the process took a new name
                        self._held.append(current)
            return
        self._renew_now(current)
        with self._lock:
            if self._pid == os.getpid():
                return  # another thread started it meanwhile
            self._held = [current]
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._renew, args=(self._stop,), name="restful-async-lease", daemon=True
            )
            # Registered before the thread can take over a task (and so start the
            # executor, whose exit hook must run first: atexit runs the latest
            # registration first), so that the lease outlives the tasks at exit.
            atexit.register(self.release)
            self._pid = os.getpid()
            self._thread.start()

    def _renew_now(self, worker: str) -> None:
        at = time.monotonic()
        self.store.renew_lease(worker)
        self._renewed(at)

    def _renewed(self, at: float) -> None:
        """A renewal that began at ``at`` went through: the store holds the lease
        for ``lease_hold`` from about then; it counts as live for ``lease``, less
        than that, which leaves the renewal thread its turns."""
        self._live_until = max(self._live_until, at + self.store.lease)

    def start(self) -> None:
        """:meth:`ensure`, for a request of any kind: never raises, and costs a
        comparison once started. While the store is down, tried again at most
        once per :data:`START_RETRY` seconds."""
        if self._pid == os.getpid() or time.monotonic() < self._next_start:
            return
        try:
            self.ensure()
        except Exception as e:
            # Every request of the app passes here: whatever the store answers, a
            # request that has nothing to do with tasks must not fail of it.
            self._next_start = time.monotonic() + START_RETRY
            if not isinstance(e, RestfulAsyncError):
                self.app.logger.warning("Could not take the task lease", exc_info=True)

    def wake(self, at: float | None = None) -> None:
        """Call ``on_renew`` at ``at`` (a :func:`time.monotonic` time; now when
        None), without waiting for the next renewal. Calls asked for before the
        next one are one call, at the earliest time asked."""
        at = time.monotonic() if at is None else at
        if at < self._turn_at:
            self._turn_at = at
            self._wake.set()

    def _renew(self, stop: threading.Event) -> None:
        renew_at = time.monotonic() + self.store.lease / 3
        failing = maintain_failing = False
        self._turn()  # the lease was just taken: the first use takes over at once
        while True:
            self._wake.wait(max(0.0, min(renew_at, self._turn_at) - time.monotonic()))
            self._wake.clear()
            if stop.is_set():
                return
            if time.monotonic() < renew_at:
                if time.monotonic() >= self._turn_at:
                    if failing:
                        # No look while the store fails: the next renewal that
                        # works makes one. Until then, wake for renewals only.
                        self._turn_at = math.inf
                    else:
                        self._turn()
                continue
            # After a failure, sooner: a store back within the lease must find it
            # renewed before it lapses, or running tasks would read as lost.
            renew_at = time.monotonic() + min(self.store.lease / 3, RENEW_RETRY)
            try:
                # First what the outbox gave up: never renew a lease for those tasks.
                self._give_up()
                with self._lock:
                    if self._held[-1] != _worker_id:
                        self._held.append(_worker_id)
                    held = list(self._held)
                began = time.monotonic()
                for worker in held:
                    self.store.renew_lease(worker)
                self._renewed(began)
                renew_at = time.monotonic() + self.store.lease / 3
                if failing:
                    failing = False
                    self.app.logger.info("The task lease is renewed again")
            except Exception:
                # Whatever went wrong, keep trying: if this thread ended, every task
                # of this (living) process would soon read as lost. Logged once per
                # run of failures: the tries are frequent.
                if not failing:
                    failing = True
                    self.app.logger.warning("Could not renew the task lease", exc_info=True)
            else:
                # Housekeeping apart: one that fails every time (a purge the store
                # refuses) must neither stop the look for tasks to take over nor
                # pass for a failed renewal.
                maintain_failing = self._maintain(maintain_failing)
                self._turn()

    def _maintain(self, failing: bool) -> bool:
        """The store's housekeeping; whether it failed (logged once per run of
        failures, as they come at every renewal)."""
        try:
            self.store.maintain()
        except Exception:
            if not failing:
                self.app.logger.warning("The task store's housekeeping failed", exc_info=True)
            return True
        if failing:
            self.app.logger.info("The task store's housekeeping works again")
        return False

    def _turn(self) -> None:
        self._turn_at = math.inf
        if self.on_renew is None:
            return
        try:
            self.on_renew()
        except Exception:
            # A store that fails now is tried again at the next renewal.
            self.app.logger.warning("Could not take over waiting tasks", exc_info=True)

    def _give_up(self) -> None:
        found = outbox.existing_outbox(self.store)
        given_up = found.given_up() if found is not None else set()
        with self._lock:
            dropped = [worker for worker in self._held if worker in given_up]
            if not dropped:
                return
            # Built whole, then put in place: ensure() reads the last name
            # without the lock, and must never find the list empty.
            kept = [worker for worker in self._held if worker not in given_up]
            if _worker_id in given_up:
                _rename()
                self._live_until = -math.inf  # the new name has had no renewal yet
            if not kept:
                kept.append(_worker_id)
            self._held = kept
        for worker in dropped:
            self.app.logger.error(
                "Tasks of %s in this store could not be ended: its lease is given up,"
                " they read as lost",
                worker,
            )
            with contextlib.suppress(RestfulAsyncError):  # if not, it lapses
                self.store.release_lease(worker)

    def release(self) -> None:
        if self._pid != os.getpid():
            return
        self._stop.set()
        self._wake.set()
        self._pid = None
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # Let a renewal or a claim under way end before the lease goes (and,
            # at exit, before the store's connections are closed under it).
            thread.join(STOP_TIMEOUT)
        found = outbox.existing_outbox(self.store)
        if found is not None and found.drain(EXIT_DRAIN_TIMEOUT):
            withdrawals = found.withdrawals()
            outcomes = len(found) - len(withdrawals)
            if outcomes:
                self.app.logger.error(
                    "%d task outcomes could not be stored before exit; those tasks read as lost",
                    outcomes,
                )
            for task_id in withdrawals:
                # Nothing else knows that it must not run: say so where it can be acted on.
                self.app.logger.error(
                    "Task %s, whose submit was answered 503, could not be taken back before"
                    " exit: another process may take it over and run it once the store answers",
                    task_id,
                    extra={"task_id": task_id},
                )
        try:
            for worker in self._held:
                self.store.release_lease(worker)
        except RestfulAsyncError:
            self.app.logger.warning("Could not release the task lease", exc_info=True)
        if found is not None:
            # Released, or no longer renewed: those tasks read as lost either way.
            found.clear()


_keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()


def _rename() -> None:
    """Give this process a new name: tasks it starts from now on run under it."""
    global _worker_id
    _worker_id = _new_worker_id()


def _reset_after_fork() -> None:
    global _worker_id
    _worker_id = _new_worker_id()
    for keeper in list(_keepers):
        keeper._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
