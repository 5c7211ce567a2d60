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

How the stop is heard: a gunicorn worker (of every class) says it is stopping
by setting its ``alive`` to False: on ``SIGTERM`` (the master's stop or reload),
at ``--max-requests``, on a code change under ``--reload``. :func:`listen` finds
the worker through the ``SIGTERM`` handler it set, and gives it an ``alive``
that tells this module first. That works from any thread once the worker has set
its signals up, so it is called where it matters, and costs a comparison once
done: by ``register_async`` (an app made in the worker), as a wait or a stream
begins, and as the executor starts its first thread (which also covers an app
made in the master, ``--preload``). Under another server, call :func:`begin`
where its graceful stop begins.
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
#: The process whose gunicorn worker :func:`listen` hears (0: none yet).
_heard_in = 0
_lock = threading.Lock()
_heard_classes: dict[type, type] = {}
_callbacks: list[t.Callable[[], None]] = []
_T = t.TypeVar("_T")


def begun() -> bool:
    """Whether this process's graceful stop has begun."""
    return _begun


def on_stop(callback: t.Callable[[], None]) -> None:
    """Call ``callback`` once the stop begins (in a thread of its own, started by
    :func:`begin`): it wakes what waits, so that it sees :func:`begun`."""
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


def listen() -> bool:
    """Hear this process's graceful stop, if it is a gunicorn worker: returns
    whether it is heard (False, with nothing changed, elsewhere: another server,
    gunicorn's master). From any thread; a comparison once it is heard."""
    global _heard_in
    if _heard_in == os.getpid():
        return True
    workers = sys.modules.get("gunicorn.workers.base")
    if workers is None:
        return False
    # A bound method of the worker, set before it loads the app (in the master,
    # before the fork, the master's own).
    worker = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if not isinstance(worker, workers.Worker):
        return False
    with _lock:
        if not getattr(type(worker), "_restful_async_heard", False):
            worker.__class__ = _heard(type(worker))
        _heard_in = os.getpid()
    if worker.alive is False:  # stopping already
        begin()
    return True


def _heard(cls: type) -> type:
    """``cls`` (a gunicorn worker class) whose ``alive``, set to False, also says
    that the stop has begun. The value stays where gunicorn keeps it. The caller
    holds the lock."""
    made = _heard_classes.get(cls)
    if made is not None:
        return made

    def get(worker: t.Any) -> t.Any:
        return worker.__dict__.get("alive", False)

    def put(worker: t.Any, value: t.Any) -> None:
        worker.__dict__["alive"] = value
        if not value:
            begin()  # safe in the signal handler that sets it

    made = type(cls.__name__, (cls,), {"alive": property(get, put), "_restful_async_heard": True})
    _heard_classes[cls] = made
    return made


def _reset_after_fork() -> None:
    # A child's stop is its own.
    global _begun, _lock
    _begun = False
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
