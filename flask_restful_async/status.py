"""The status URL of a task (``/tasks/<task_id>``) and the task list (``/tasks``)."""

from __future__ import annotations

import typing as t

from flask import Response, current_app, request
from flask_restful import Resource

from .exceptions import Unavailable
from .responses import error_response, json_response, status_response, stored_to_response
from .state import AsyncState, get_state
from .task import Task, TaskState, is_valid_task_id

NOT_FOUND_MESSAGE = "No such task."
RESULT_SUFFIX = "/result"
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500

_NO_STORE = {"Cache-Control": "no-store"}


def not_found() -> Response:
    # One body for unknown, malformed and foreign ids: nothing tells them apart.
    return error_response(404, NOT_FOUND_MESSAGE, _NO_STORE)


def unavailable(e: Unavailable) -> Response:
    return error_response(503, e.message, {"Retry-After": str(e.retry_after), **_NO_STORE})


class TaskStatusResource(Resource):
    """Polled by clients at the ``Location`` of a 202 (CONTRACT section 4).

    ``202`` and the status document while the task is queued or running; once it
    has finished, the response the handler gave (``409`` if cancelled, ``500`` if
    its worker was lost); ``410`` once the result has expired; ``404`` for ids that
    are unknown, malformed or another owner's.
    """

    def get(self, task_id: str) -> Response:
        state = get_state(current_app)
        try:
            task = find_task(state, task_id)
        except Unavailable as e:
            return unavailable(e)
        if task is None:
            return not_found()
        return task_response(state, task)

    def delete(self, task_id: str) -> Response:
        """Cancel or forget a task.

        Queued: ``200`` and the status document, state ``cancelled``; the handler
        never runs. Running: ``202`` and the status document; the handler sees
        ``current_task.cancelled``. Finished (or expired): ``204``, and the task is
        forgotten.
        """
        state = get_state(current_app)
        try:
            task = find_task(state, task_id)
            if task is None:
                return not_found()
            if not task.state.finished:
                task = state.store.request_cancel(task.id)
                if task is None:
                    return not_found()
                if task.state is TaskState.CANCELLED:
                    return status_response(task, 200, None, None)
                if not task.state.finished:
                    return state.status(task, 202)
            state.store.delete(task.id)
        except Unavailable as e:
            return unavailable(e)
        return current_app.response_class(status=204, headers=_NO_STORE)


def find_task(state: AsyncState, task_id: str) -> Task | None:
    """The caller's task with that id, or None (never a store lookup for a bad id)."""
    if not is_valid_task_id(task_id):
        return None
    task = state.store.get(task_id)
    if task is None or task.owner != state.identity():
        return None
    return task


def task_response(state: AsyncState, task: Task) -> Response:
    if task.expired:
        return error_response(410, "The result of this task has expired.", _NO_STORE)
    if not task.state.finished:
        return state.status(task, 202)
    if task.response is None:
        code = 409 if task.state is TaskState.CANCELLED else 500
        return status_response(task, code, None, None)
    if state.result_redirect:
        return status_response(task, 303, state.location(task.id) + RESULT_SUFFIX, None)
    return result_response(task)


def result_response(task: Task) -> Response:
    assert task.response is not None
    response = stored_to_response(task.response)
    response.headers["Cache-Control"] = "no-store"
    return response


class TaskResultResource(Resource):
    """``<status URL>/result``: a finished task's response, on its own URL.

    Where ``RESTFUL_ASYNC_RESULT_REDIRECT`` is on, the status URL of a finished
    task answers ``303 See Other`` to here. An unfinished task answers ``404``
    with its status document; expired ``410``; unknown or foreign ``404``.
    """

    def get(self, task_id: str) -> Response:
        state = get_state(current_app)
        try:
            task = find_task(state, task_id)
        except Unavailable as e:
            return unavailable(e)
        if task is None:
            return not_found()
        if task.expired:
            return error_response(410, "The result of this task has expired.", _NO_STORE)
        if task.response is None:
            return status_response(task, 404, None, None)
        return result_response(task)


class TaskListResource(Resource):
    """``GET /tasks``: the caller's tasks, newest first, in pages."""

    def get(self) -> Response:
        state = get_state(current_app)
        try:
            limit = int(request.args.get("limit", DEFAULT_LIST_LIMIT))
        except ValueError:
            return error_response(400, "limit must be a whole number.", _NO_STORE)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            return error_response(400, f"limit must be between 1 and {MAX_LIST_LIMIT}.", _NO_STORE)
        wanted = request.args.get("state")
        try:
            state_filter = TaskState(wanted) if wanted is not None else None
        except ValueError:
            names = ", ".join(s.value for s in TaskState)
            return error_response(400, f"state must be one of: {names}.", _NO_STORE)
        cursor = request.args.get("cursor")
        if cursor is not None and not is_valid_task_id(cursor):
            return error_response(400, "cursor is not valid.", _NO_STORE)
        try:
            tasks = state.store.list(
                owner=state.identity(), state=state_filter, limit=limit + 1, before=cursor
            )
        except Unavailable as e:
            return unavailable(e)
        next_url = None
        if len(tasks) > limit:
            tasks = tasks[:limit]
            query: dict[str, t.Any] = {"limit": limit, "cursor": tasks[-1].id}
            if wanted is not None:
                query["state"] = wanted
            next_url = state.api.url_for(TaskListResource, **query)
        headers = dict(_NO_STORE)
        if next_url is not None:
            headers["Link"] = f'<{next_url}>; rel="next"'
        return json_response(
            200,
            {"tasks": [task.status_document() for task in tasks], "next": next_url},
            headers,
        )
