"""How an operation can end badly, as exceptions that carry its final answer."""

from __future__ import annotations

import typing as t

import httpx

from ..exceptions import RestfulAsyncError


class TaskError(RestfulAsyncError):
    """A task that did not succeed. ``response`` is the final answer of its status URL
    (after a ``303``, of its result URL); ``status_document`` is the status document
    that answer carries, or None (a failed handler's own error body has none);
    ``operation`` is the operation that waited for it, when there is one."""

    def __init__(
        self,
        response: httpx.Response,
        status_document: dict[str, t.Any] | None = None,
        operation: t.Any = None,
    ) -> None:
        super().__init__(f"{response.status_code} {response.reason_phrase} from {response.url}")
        self.response = response
        self.status_document = status_document
        self.operation = operation


class TaskFailed(TaskError):
    """The final answer is a ``4xx`` or ``5xx``: the handler failed (an ``abort``, an
    exception), or the task is unknown (``404``) or expired (``410``)."""


class TaskCancelled(TaskError):
    """The task was cancelled: ``409`` with its status document (``state: cancelled``).

    Not the server-side :class:`flask_restful_async.TaskCancelled`, which a handler
    raises to end its task."""


class TaskLost(TaskError):
    """The process that ran the task died: ``500`` with its status document
    (``state: lost``)."""
