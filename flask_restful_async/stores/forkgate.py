"""Keeping ``fork()`` out of SQLite calls made by other threads.

SQLite keeps state for the whole process: its mutexes, and for each open file the
record of which locks this process's connections hold. ``fork()`` copies that
state into the child as it stands, but only the forking thread goes along. A
child forked while another thread of the parent was inside a statement inherits
locks that no thread will ever release: its first write waits until "database is
locked", its checkpoints never truncate, an open of the file may hang for good.
Opening new connections in the child (as the store does) does not help, since
they share that state. SQLite's own advice is not to fork with connections in use
(https://www.sqlite.org/howtocorrupt.html, section 2.6); a Flask app forks when a
server with ``--preload`` starts its workers, and when user code forks.

So every call of the store into SQLite passes a :class:`ForkGate` (shared, and
cheap: a lock taken and released on the way in and out), and a fork closes the
gate first (``os.register_at_fork``): it waits until the calls in flight have
ended, keeps new ones waiting until the child exists, then opens again.
"""

from __future__ import annotations

import logging
import threading
import time

_logger = logging.getLogger(__name__)

#: What :meth:`ForkGate.close` logs when it gives up waiting, by default (a fork).
FORK_WARNING = (
    "Forking while another thread is still inside %(name)s after %(wait).0f s:"
    " the child may find the database locked"
)


class ForkGate:
    """Calls into a library that a fork must not interrupt, counted across threads.

    :meth:`enter` and :meth:`leave` bracket each call (a thread may nest them);
    :meth:`close` waits for the calls in flight, up to ``wait`` seconds, and holds
    back new ones until :meth:`open`. A fork that waited in vain goes ahead, with a
    warning: a call that takes that long is waiting on another process (SQLite's
    busy timeout), which the fork would not end either.
    """

    def __init__(self, name: str, wait: float) -> None:
        self.name = name
        self.wait = wait
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inside = 0
        # Forks under way (two threads may fork at once): closed while above 0.
        self._closing = 0
        self._depth = threading.local()

    def enter(self) -> None:
        depth = self._depth.__dict__.get("n", 0)
        if not depth:
            with self._lock:
                while self._closing:
                    self._changed.wait()
                self._inside += 1
        self._depth.n = depth + 1

    def leave(self) -> None:
        depth = self._depth.n - 1
        self._depth.n = depth
        if not depth:
            with self._lock:
                self._inside -= 1
                if self._closing and not self._inside:
                    self._changed.notify_all()

    def close(self, warning: str = FORK_WARNING) -> None:
        """Wait for the calls in flight in other threads, and hold back new ones;
        log ``warning`` if they take longer than :attr:`wait`."""
        own = self._depth.__dict__.get("n", 0) > 0  # a fork from inside a call
        deadline = time.monotonic() + self.wait
        with self._lock:
            self._closing += 1
            while self._inside > own:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    _logger.warning(warning, {"name": self.name, "wait": self.wait})
                    return
                self._changed.wait(remaining)

    def open(self) -> None:
        """Let the calls held back by :meth:`close` go on (the parent, after a fork)."""
        with self._lock:
            self._closing -= 1
            self._changed.notify_all()

    def after_fork_in_child(self) -> None:
        """The child's gate: open, with nobody inside (the other threads are gone)."""
        self._reset()
