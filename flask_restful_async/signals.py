"""Signals (blinker) sent as tasks go through their lives, for metrics, traces,
audit logs and the like.

Every signal is sent with the Flask app as sender (the app object itself, never
the ``current_app`` proxy), in the process where the event happens:

``task_submitted``
    A submit was accepted: the task is in the store and on its way to a worker.
    In the request thread, before the ``202`` leaves. Keyword ``task``.
``task_started``
    A worker started the task, just before its handler runs. In the worker (a
    thread of the web process, or a Celery worker process). Keyword ``task``.
``task_progress``
    The handler reported progress (``current_task.progress``): on every report,
    before reports are coalesced for the store. In the handler's thread, so keep
    receivers cheap. Keyword ``task``, its ``progress`` the new value.
``task_finished``
    The task ended in the worker, its outcome handed to the store: ``succeeded``,
    ``failed``, ``cancelled``, or ``lost`` if the store refused it; or, for a task
    still queued, a ``DELETE`` cancelled it (sent in the process that answered the
    ``DELETE``). Also ``lost`` where a process gives up a task it holds: a start
    the store did not take for ``4 x RESTFUL_ASYNC_LEASE`` seconds, a task taken
    over whose stored request cannot be read, a waiting task that a stopping
    process cannot hand to another. Keyword ``task``, with its final ``state``,
    ``finished_at`` and ``response`` (of a task given up before it started, only
    its id, ``endpoint``, ``method`` and ``path`` are known: its other times read
    as its end). Not sent for ends that no process sees as they happen: the tasks
    of a process that died read lost once its lease lapses, and an outcome that
    waited in a worker for the store longer than that (``task_finished`` was sent
    with the outcome) reads lost too.
``task_rejected``
    A submit answered ``503`` and left no task: keyword ``reason``, one of
    ``"saturated"`` (the executor's backlog is full), ``"store"`` (the task store
    did not answer) or ``"broker"`` (the executor could not hand the task over).

``task`` is a :class:`~flask_restful_async.task.Task`, a copy of the record: its
``endpoint``, ``method`` and ``path`` tell which request made it. With thread
workers, ``task_started`` may come before ``task_submitted`` (they are sent from
different threads). A receiver that raises is logged through ``app.logger`` (with
the task id) and the other receivers still run; it never changes the task's
outcome nor the HTTP answer. With no receiver connected, sending costs a
dictionary check.
"""

from __future__ import annotations

import time
import typing as t

from blinker import NamedSignal, Namespace

from .task import Task, TaskState

if t.TYPE_CHECKING:
    from flask import Flask

    from .snapshot import RequestSnapshot

__all__ = [
    "REJECTED_REASONS",
    "task_finished",
    "task_progress",
    "task_rejected",
    "task_started",
    "task_submitted",
]

_signals = Namespace()

#: A submit was accepted (in the request thread); keyword ``task``.
task_submitted = _signals.signal("task-submitted")
#: A worker started a task (in the worker); keyword ``task``.
task_started = _signals.signal("task-started")
#: A handler reported progress (in its thread); keyword ``task``.
task_progress = _signals.signal("task-progress")
#: A task ended in its worker; keyword ``task``, as it ended.
task_finished = _signals.signal("task-finished")
#: A submit answered 503 and left no task; keyword ``reason``.
task_rejected = _signals.signal("task-rejected")

#: The values of ``task_rejected``'s ``reason``.
REJECTED_REASONS = ("saturated", "store", "broker")


def send_given_up(app: Flask, task_id: str, snapshot: RequestSnapshot) -> None:
    """``task_finished`` (``lost``) for a task this process gives up before it
    started, with no record at hand: what its request tells of it."""
    if not task_finished.receivers:
        return
    now = time.time()
    task = Task(
        task_id,
        TaskState.LOST,
        created_at=now,
        finished_at=now,
        endpoint=snapshot.endpoint,
        method=snapshot.environ.get("REQUEST_METHOD"),
        path=snapshot.environ.get("PATH_INFO"),
    )
    send(task_finished, app, task=task)


def send(signal: NamedSignal, app: Flask, **kwargs: t.Any) -> None:
    """Call the receivers of ``signal`` for ``app`` one by one; log what one raises
    (with the task id, if a ``task`` is given) and go on with the next.

    Callers test ``signal.receivers`` first, before building what they send: the
    submit and run paths then pay nothing while no receiver is connected.
    """
    if signal.is_muted:
        return
    for receiver in signal.receivers_for(app):
        try:
            receiver(app, **kwargs)
        except Exception:
            task = kwargs.get("task")
            task_id = getattr(task, "id", None)
            app.logger.exception(
                "A receiver of the signal %s raised%s",
                signal.name,
                f" (task {task_id})" if task_id is not None else "",
                extra={"task_id": task_id},
            )
