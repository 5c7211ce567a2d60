"""The status URL of a task (``/tasks/<task_id>``) and the task list (``/tasks``)."""

from __future__ import annotations

import typing as t

from flask import Response, current_app, request
from flask_restful import Resource
from werkzeug.exceptions import NotFound

from . import signals, streams, waiting
from .exceptions import Unavailable
from .origin import is_cross_site
from .prefer import delta_seconds, request_prefer, wait_seconds
from .responses import (
    NO_STORE,
    error_response,
    expired_response,
    json_response,
    no_content,
    status_response,
)
from .state import AsyncState, get_state
from .task import Task, TaskState, is_valid_task_id

NOT_FOUND_MESSAGE = "No such task."
CROSS_SITE_MESSAGE = "A page of another site may not cancel or forget tasks."
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 500


def not_found() -> Response:
    # One body for unknown, malformed and foreign ids: nothing tells them apart.
    return error_response(404, NOT_FOUND_MESSAGE, NO_STORE)


def unavailable(e: Unavailable) -> Response:
    return error_response(503, e.message, {"Retry-After": str(e.retry_after), **NO_STORE})


class _TaskResource(Resource):
    """Runs ``register_async(..., decorators=...)`` around each request, as
    ``Api(decorators=...)`` would: authentication answers before anything else."""

    def dispatch_request(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        decorators = get_state(current_app).decorators
        if not decorators and not self.method_decorators:
            # What Resource.dispatch_request does when there is nothing to wrap:
            # the handler's answer is always a Response, never data to represent.
            handler = getattr(self, request.method.lower(), None)
            if handler is not None:
                return handler(*args, **kwargs)
        view = super().dispatch_request
        for decorator in decorators:
            view = decorator(view)
        return view(*args, **kwargs)


class TaskStatusResource(_TaskResource):
    """Polled by clients at the ``Location`` of a 202 (CONTRACT section 4).

    ``202`` and the status document while the task is queued or running; once it
    has finished, the response the handler gave (``409`` if cancelled, ``500`` if
    its worker was lost); ``410`` once the result has expired; ``404`` for ids that
    are unknown, malformed or another owner's.
    """

    def get(self, task_id: str = "") -> Response:
        """With ``?wait=N`` or ``Prefer: wait=N``, wait up to N seconds (at most
        ``RESTFUL_ASYNC_MAX_WAIT``) for the task to finish before answering; with
        ``Accept: text/event-stream``, a stream of its changes (see
        :mod:`~flask_restful_async.streams`)."""
        state = get_state(current_app)
        if streams.wants_stream():
            return self.stream(state, task_id)
        wait, from_prefer = requested_wait()
        if wait is None:
            return error_response(400, "wait must be a whole number of seconds.", NO_STORE)
        try:
            # Taken before the read: the wait reads again only if a task ended since.
            ticket = waiting.ticket(state.store) if wait else None
            task = find_task(state, task_id)
            if task is not None and wait:
                task = state.wait(task, wait, ticket)
        except Unavailable as e:
            return unavailable(e)
        if task is None:
            return not_found()
        response = state.task_response(task)
        if from_prefer and wait:
            response.headers["Preference-Applied"] = f"wait={min(wait, state.max_wait)}"
        return response

    @staticmethod
    def stream(state: AsyncState, task_id: str) -> Response:
        if not is_valid_task_id(task_id):
            return not_found()
        owner = state.identity()
        timing = streams.Timing.from_config()
        # Made before the first read: no change after that read goes unheard.
        subscription = waiting.subscribe(state.store, task_id)
        try:
            task, document = subscription.read(streams.document_of)
        except Unavailable as e:
            subscription.close()
            return unavailable(e)
        except BaseException:
            subscription.close()  # no stream: nothing else would end it
            raise
        if task is None or task.owner != owner:
            subscription.close()
            return not_found()
        last_id = request.headers.get("Last-Event-ID")
        return streams.task_stream(state, subscription, task, document, last_id, timing)

    def delete(self, task_id: str = "") -> Response:
        """Cancel or forget a task.

        Queued: ``200`` and the status document, state ``cancelled``; the handler
        never runs. Running: ``202`` and the status document; the handler sees
        ``current_task.cancelled``. Finished (or expired): ``204``, and the task is
        forgotten.

        Refused with ``403`` when a browser sent it for another site (see
        :mod:`~flask_restful_async.origin`), unless ``RESTFUL_ASYNC_CROSS_SITE_DELETE``
        is on. An operator (the ``admin`` callable returns True) may cancel or
        forget any owner's task.
        """
        state = get_state(current_app)
        if not state.cross_site_delete and is_cross_site(request.environ, request.host_url):
            return error_response(403, CROSS_SITE_MESSAGE, NO_STORE)
        try:
            task = find_task(state, task_id)
            if task is None and state.admin is not None and is_valid_task_id(task_id):
                task = state.store.get(task_id) if state.is_admin() else None
            if task is None:
                return not_found()
            if not task.state.finished:
                answer = cancel(state, task)
                if answer is not None:
                    return answer
            state.store.delete(task.id)
            waiting.notify(state.store, task.id)
        except Unavailable as e:
            return unavailable(e)
        return no_content()


def cancel(state: AsyncState, task: Task) -> Response | None:
    """Cancel ``task``, read while queued or running, as ``DELETE`` does: ``200``
    and the document of a queued task now cancelled, ``202`` for a running one
    asked to stop, ``404`` if it is gone; None if it finished meanwhile. Raises
    what the store raises."""
    found = state.store.request_cancel(task.id)
    if found is None:
        return not_found()
    if found.state is TaskState.CANCELLED:
        waiting.notify(state.store, found.id)
        state.executor.cancel(state.app, found.id)  # e.g. revoke its message
        if signals.task_finished.receivers:
            # It ended here, in this request: no worker will tell.
            signals.send(signals.task_finished, state.app, task=found)
        return status_response(found, 200, None, None)
    if found.state.finished:
        return None
    waiting.changed(state.store, found.id)  # cancel_requested: true
    return state.status(found, 202)


def requested_wait() -> tuple[int | None, bool]:
    """Seconds to wait from ``?wait=N`` (which wins) or ``Prefer: wait=N``, and
    whether they came from ``Prefer``; 0 when neither asks; None when the query
    parameter is not a whole number (a bad ``Prefer`` is ignored, as RFC 7240 says
    preferences are)."""
    environ = request.environ
    query = request.args.get("wait") if environ.get("QUERY_STRING") else None
    if query is not None:
        return delta_seconds(query), False
    seconds = wait_seconds(request_prefer(environ))
    return (seconds, True) if seconds else (0, False)


def find_task(state: AsyncState, task_id: str) -> Task | None:
    """The caller's task with that id, or None (never a store lookup for a bad id)."""
    if not is_valid_task_id(task_id):
        return None
    owner = state.identity()
    task = state.store.get_owned(task_id, owner)
    if task is None or task.owner != owner:
        return None
    return task


class TaskResultResource(_TaskResource):
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
            return expired_response()
        if task.response is None:
            return status_response(task, 404, None, None)
        return state.result_response(task)


def list_served(state: AsyncState, owner: str | None) -> bool:
    """Whether the task list exists for a caller whose identity is ``owner``: with
    an owner callable that named them (each caller sees their own tasks), in debug
    mode, or where ``RESTFUL_ASYNC_PUBLIC_LIST`` shows every task to anyone.
    Without an owner every task id is a bearer token, and a list would hand them
    all out: to a caller the owner callable did not name, too, who would see every
    task of every other anonymous caller."""
    return (owner is not None and state.owner is not None) or state.public_list or state.app.debug


class TaskListResource(_TaskResource):
    """``GET /tasks``: the caller's tasks, newest first, in pages.

    Without an owner callable, or to a caller it returns None for, it answers
    ``404`` (the JSON flask-restful gives a URL that does not exist), unless the app
    is in debug mode or ``RESTFUL_ASYNC_PUBLIC_LIST`` is on.
    """

    def get(self) -> Response:
        """With ``Accept: text/event-stream``, a stream of the changes of the
        tasks of that page (see :mod:`~flask_restful_async.streams`)."""
        state = get_state(current_app)
        owner = state.identity()
        if not list_served(state, owner):
            return error_response(404, NotFound.description, NO_STORE)
        limit = delta_seconds(request.args.get("limit", str(DEFAULT_LIST_LIMIT)))
        if limit is None:
            return error_response(400, "limit must be a whole number.", NO_STORE)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            return error_response(400, f"limit must be between 1 and {MAX_LIST_LIMIT}.", NO_STORE)
        wanted = request.args.get("state")
        try:
            state_filter = TaskState(wanted) if wanted is not None else None
        except ValueError:
            names = ", ".join(s.value for s in TaskState)
            return error_response(400, f"state must be one of: {names}.", NO_STORE)
        cursor = request.args.get("cursor")
        if cursor is not None and not is_valid_task_id(cursor):
            return error_response(400, "cursor is not valid.", NO_STORE)
        if streams.wants_stream():
            wanted_tasks = streams.ListQuery(owner, state_filter, limit, cursor)
            return self.stream(state, wanted_tasks)
        try:
            tasks = state.store.list(
                owner=owner, state=state_filter, limit=limit + 1, before=cursor
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
        headers = dict(NO_STORE)
        if next_url is not None:
            headers["Link"] = f'<{next_url}>; rel="next"'
        return json_response(
            200,
            {"tasks": [task.status_document() for task in tasks], "next": next_url},
            headers,
        )

    @staticmethod
    def stream(state: AsyncState, query: streams.ListQuery) -> Response:
        timing = streams.Timing.from_config()
        subscription = waiting.subscribe(state.store)  # before the first read
        try:
            tasks = query.read(state)
        except Unavailable as e:
            subscription.close()
            return unavailable(e)
        except BaseException:
            subscription.close()  # no stream: nothing else would end it
            raise
        last_id = request.headers.get("Last-Event-ID")
        return streams.list_stream(state, subscription, query, tasks, last_id, timing)
