"""The graceful stop of this process, heard as it begins.

A server that stops gracefully (gunicorn on ``SIGTERM``, a reload, or
``--max-requests``) stops taking connections, then waits up to its graceful
timeout for the requests under way, and only then exits: which is when the
executor hands its waiting tasks back and gives the running ones
``RESTFUL_ASYNC_SHUTDOWN_TIMEOUT`` to end. An open event stream (a dashboard
left on screen) or a long-poll is a request under way: left alone, it holds the
worker for the whole graceful timeout, during which the task threads go on
starting waiting tasks, and gunicorn's master then kills the worker while they
run. Those tasks end ``lost``, against CONTRACT section 5.

So, once the stop has begun (:func:`begun`), streams end (their clients
reconnect, to another worker) and long-polls answer at once with the task as it
is (``202`` and ``Retry-After``; their clients poll again): the worker exits as
soon as its other requests are done, and the executor's orderly stop comes in
time. And the thread executor hands its waiting tasks back to the store at once
(those another process can run), starts no more of them, and takes over none:
a request that still holds the stop (a slow upload, a long synchronous view)
then puts only the tasks already running at risk.

How the stop is heard: :func:`listen` wraps the ``SIGTERM`` handler of a gunicorn
worker (every worker class sets one) so that it tells this module first. It has
to run in the worker's main thread, after gunicorn set its handler:
``register_async`` calls it, which covers an app made in the worker (gunicorn
without ``--preload``). With ``--preload`` the app is made in the master, so call
:func:`listen` from gunicorn's ``post_worker_init`` hook (see the README). Under
another server, call :func:`begin` where its graceful stop begins.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import typing as t

_logger = logging.getLogger(__name__)
_begun = False
_callbacks: list[t.Callable[[], None]] = []
_T = t.TypeVar("_T")


def begun() -> bool:
    """Whether this process's graceful stop has begun."""
    return _begun


def on_stop(callback: t.Callable[[], None]) -> None:
    """Call ``callback`` once the stop begins (in a thread of its own when a
    signal told it): it wakes what waits, so that it sees :func:`begun`."""
    _callbacks.append(callback)


def begin() -> None:
    """Say that this process's graceful stop has begun: event streams end and
    long-polls answer now. For servers whose stop :func:`listen` does not hear;
    safe in a signal handler (the callbacks run in a thread of their own)."""
    global _begun
    if _begun:
        return
    _begun = True
    # The callbacks take locks that the calling code may hold, when a signal
    # handler calls this: they run in a new thread (the low-level call takes no
    # lock of the threading module, which this thread may hold while it starts a
    # thread). If no thread can start, waits and streams see the flag at their
    # next look (within RECHECK_INTERVAL), and the exit hands the queue back.
    with contextlib.suppress(RuntimeError):
        _thread.start_new_thread(_wake, ())


def _wake() -> None:
    for callback in list(_callbacks):
        try:
            callback()
        except Exception:
            # What one of them failed to do, the process's exit does later.
            _logger.exception("A callback of the graceful stop failed")


def members(items: t.Iterable[_T]) -> list[_T]:
    """A copy of ``items``, a weak set that other threads may add to meanwhile
    (which would make a plain ``list()`` of it raise)."""
    while True:
        try:
            return list(items)
        except RuntimeError:  # changed size during the copy: again
            continue


class _Relay:
    """A ``SIGTERM`` handler that tells of the stop, then calls the server's own."""

    def __init__(self, handler: t.Callable[[int, t.Any], t.Any]) -> None:
        self.handler = handler

    def __call__(self, signum: int, frame: t.Any) -> t.Any:
        with contextlib.suppress(Exception):  # the server hears its signal, whatever happens
            begin()
        return self.handler(signum, frame)


def listen() -> bool:
    """Hear this process's graceful stop: wrap the ``SIGTERM`` handler a gunicorn
    worker set. Returns whether it is heard; False (and nothing changed) outside
    the main thread, or where the handler is not a gunicorn worker's (another
    server, or gunicorn's master). Calling it again changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return False
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, _Relay):
        return True
    workers = sys.modules.get("gunicorn.workers.base")
    if (
        not callable(handler)
        or workers is None
        or not isinstance(getattr(handler, "__self__", None), workers.Worker)
    ):
        return False
    signal.signal(signal.SIGTERM, _Relay(handler))
    # signal.signal() resets the flag gunicorn set: its workers let SIGTERM
    # interrupt no system call under way.
    signal.siginterrupt(signal.SIGTERM, False)
    return True


def _reset_after_fork() -> None:
    # A child's stop is its own.
    global _begun
    _begun = False


os.register_at_fork(after_in_child=_reset_after_fork)
