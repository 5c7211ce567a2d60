"""Test mode: each task runs in the request thread, before its ``202`` leaves."""

from __future__ import annotations

import typing as t

from .base import Executor

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_restful import Resource

    from ..snapshot import RequestSnapshot
    from ..task import Task


class EagerExecutor(Executor):
    """Runs each task to its end inside :meth:`submit`, in the thread that accepted it.

    ``RESTFUL_ASYNC_EAGER = True`` puts it in place of the configured executor
    (threads or Celery alike), for tests: the task goes through the same request
    snapshot, replay, rendering and store as anywhere else, so the ``202`` reads
    finished and the first ``GET`` of its ``Location`` answers the final response.

    Nothing bounds it (the request thread is the only worker), it takes over no
    task of other processes, and no client can cancel a task before its ``202``:
    test cancellation with the :class:`~flask_restful_async.ThreadExecutor`.
    """

    local = True
    inline = True

    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        # Imported here, as the thread executor does: the runner imports the
        # resource and state modules, which import the executors.
        from ..runner import run_task

        run_task(app, task.id, snapshot, resource)
