"""The lease a process renews while it holds tasks, so that others can tell it died."""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
import weakref

from flask import Flask

from .exceptions import RestfulAsyncError
from .stores.base import TaskStore


def _new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


# Named once per process, at import and in every forked child, never lazily: two
# threads naming a process at once would give its tasks and its lease two names.
_worker_id = _new_worker_id()


def worker_id() -> str:
    """This process's name in task records: host, pid and a random part (pids repeat)."""
    return _worker_id


class LeaseKeeper:
    """Renews this process's lease in a shared store every third of its length.

    Started by the first submit in each process (so forked workers start their
    own), it also reclaims expired results in batches: the one place, besides the
    amortized purge on submit, where cleanup runs, and never a thread per request.
    At interpreter exit the lease is released, and tasks the process still held
    become ``lost`` at once instead of after the lease.
    """

    def __init__(self, app: Flask, store: TaskStore) -> None:
        self.app = app
        self.store = store
        self._reset()
        _keepers.add(self)

    def _reset(self) -> None:
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def ensure(self) -> None:
        """Hold a fresh lease for this process; raises ``StoreUnavailable`` if it cannot."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self.store.renew_lease(worker_id())
            self._stop = threading.Event()
            threading.Thread(
                target=self._renew, args=(self._stop,), name="restful-async-lease", daemon=True
            ).start()
            atexit.register(self.release)
            self._pid = os.getpid()

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.store.lease / 3):
            try:
                self.store.renew_lease(worker_id())
                self.store.maintain()
            except Exception:
                # Whatever went wrong, keep trying: if this thread ended, every task
                # of this (living) process would soon read as lost.
                self.app.logger.warning("Could not renew the task lease", exc_info=True)

    def release(self) -> None:
        if self._pid != os.getpid():
            return
        self._stop.set()
        self._pid = None
        try:
            self.store.release_lease(worker_id())
        except RestfulAsyncError:
            self.app.logger.warning("Could not release the task lease", exc_info=True)


_keepers: weakref.WeakSet[LeaseKeeper] = weakref.WeakSet()


def _reset_after_fork() -> None:
    global _worker_id
    _worker_id = _new_worker_id()
    for keeper in list(_keepers):
        keeper._reset()


os.register_at_fork(after_in_child=_reset_after_fork)
