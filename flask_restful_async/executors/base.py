"""The executor contract: how an accepted task gets to run somewhere."""

from __future__ import annotations

import abc
import typing as t

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_restful import Resource

    from ..deferred import Run
    from ..snapshot import RequestSnapshot
    from ..stores.base import Ending
    from ..task import Task


class Executor(abc.ABC):
    """Runs tasks away from the request thread.

    Submitting is two steps so that nothing is left behind on rejection:
    :meth:`acquire` reserves room (or raises
    :class:`~flask_restful_async.exceptions.Saturated`) before the task is recorded
    in the store, then :meth:`submit` hands the recorded task over. If recording
    fails, :meth:`release` gives the room back.

    Whatever runs the task calls :func:`flask_restful_async.runner.run_task`.
    """

    #: True when tasks run in the process that accepted them (threads): that
    #: process then holds them, and keeps a lease in shared stores.
    local: bool = False

    #: True when :meth:`submit` runs the task to its end before it returns (test
    #: mode, see :class:`~flask_restful_async.executors.eager.EagerExecutor`):
    #: the submit then tells the task submitted first, and answers with the task as
    #: it ended. Such an executor never raises ``Unavailable`` from :meth:`submit`.
    inline: bool = False

    #: For a local executor: called each time one of its tasks is done (see
    #: :class:`~flask_restful_async.takeover.Takeover`).
    on_done: t.Callable[[], None] | None = None

    #: For a local executor: called with the tasks ``(task_id, holder, snapshot)``
    #: it accepted and will not run, as it shuts down (see
    #: :func:`~flask_restful_async.takeover.hand_back`); without it they are dropped.
    on_hand_back: t.Callable[[t.Sequence[tuple[str, str | None, RequestSnapshot]]], None] | None = (
        None
    )

    #: For a local executor: True where another process can take over its waiting
    #: tasks (a shared store, see :mod:`~flask_restful_async.takeover`). Then, once
    #: this process's graceful stop has begun (:mod:`~flask_restful_async.stopping`),
    #: those it can hand over go back to the store at once, and no more start here,
    #: where the stop may be cut short before they end.
    hands_over: bool = False

    #: For a local executor: called with the endpoint, the method (lower case) and
    #: the seconds from :meth:`submit` to the end of each of its tasks (see
    #: :mod:`flask_restful_async.estimates`). What it raises is logged and ignored.
    on_ran: t.Callable[[str, str, float], None] | None = None

    def bind(self, app: Flask) -> None:
        """``register_async`` is setting ``app`` up with this executor (once per app).
        An executor whose workers run in other processes remembers the app here, so
        that a worker, which imported the same code, finds it. Nothing by default."""

    def acquire(self, size: int = 0) -> None:
        """Reserve room for one task whose request snapshot holds ``size`` bytes
        (:attr:`RequestSnapshot.held_bytes
        <flask_restful_async.snapshot.RequestSnapshot.held_bytes>`), or raise
        ``Saturated``. Unbounded by default."""

    def release(self, size: int = 0) -> None:
        """Give back a reservation (of the same ``size``) that will not be submitted."""

    def acquire_now(self) -> bool:
        """Reserve room for one task that the caller runs itself, at once (a short
        task that its submit's request thread waits for; see
        :meth:`AsyncState.submit <flask_restful_async.state.AsyncState.submit>`);
        False if as many such tasks run already as the executor allows.
        :meth:`release_now` gives it back. Never by default."""
        return False

    def release_now(self) -> None:
        """Give back what :meth:`acquire_now` took, once the task has ended."""

    def run_now(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource,
        *,
        unrecorded: Run | None = None,
    ) -> Ending | None:
        """Run ``task``, for which :meth:`acquire_now` took room and which its submit
        recorded as running (or, with ``unrecorded``, not in the store yet), in the
        calling (request) thread; then give the room back. Returns how it ended
        (see :func:`~flask_restful_async.runner.run_here`). Only an executor whose
        :meth:`acquire_now` can succeed has it."""
        raise NotImplementedError(f"{type(self).__name__} runs no task in the request thread")

    def idle(self, limit: int) -> int:
        """How many of ``limit`` tasks taken over from other processes this
        executor could start at once (a local executor). Reserves nothing: the
        taker claims that many, then takes room for each with :meth:`acquire`. None by
        default: the executor takes over no task."""
        return 0

    @abc.abstractmethod
    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        """Run a recorded task. ``resource`` is the instance that accepted the
        request; an executor that crosses processes ignores it and the runner
        builds one in the worker. Raises
        :class:`~flask_restful_async.exceptions.Unavailable` when it cannot take
        the task (the submit then answers ``503`` and takes the task back from the
        store)."""

    def cancel(self, app: Flask, task_id: str) -> None:
        """A queued task was cancelled in the store: drop it from wherever it waits,
        if the executor can. Best effort, never raises; the runner refuses to start
        a task that is no longer queued, so this only saves the work of delivering
        it. Nothing to do by default."""

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking tasks and wait up to ``timeout`` seconds for running ones."""
