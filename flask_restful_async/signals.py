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
    ``DELETE``). Keyword ``task``, with its final ``state``, ``finished_at`` and
    ``response``. Not sent for ends that no process sees as they happen (a worker
    that died: its tasks read lost).
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

import typing as t

from blinker import NamedSignal, Namespace

if t.TYPE_CHECKING:
    from flask import Flask

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
