"""The dashboard (CONTRACT 6.6): one page of the caller's tasks, live.

``RESTFUL_ASYNC_DASHBOARD = "/tasks/dashboard"`` serves, under that path:

- the page itself, server-rendered from ``templates/restful_async/dashboard.html``
  (an app may override it with a template of that name of its own);
- ``static/dashboard.js`` and ``static/dashboard.css``, its only script and
  stylesheet: no CDN, no build step, nothing inline, so that the page works under
  ``Content-Security-Policy: default-src 'self'``, which it is served with;
- ``api/tasks`` (a page of tasks, newest first, with the counts by state) and
  ``api/tasks/<id>`` (one task, with its stored response), the JSON the script
  reads.

Each answer shows what ``GET /tasks`` would show the same caller (their own
tasks), or every owner's tasks to an operator (``register_async(..., admin=...)``
returns True). A caller who may see neither gets ``404``, as ``GET /tasks``
answers them. The ``decorators`` of ``register_async`` wrap every view but the
static files, which hold no data. Cancel and Forget are ``DELETE`` requests on
each task's status URL, which refuses them from a page of another site.

Live updates come from the list URL's event stream (``Accept:
text/event-stream``, CONTRACT 6.5), over the tasks of the page shown; an
operator's from ``api/tasks``, which streams every owner's tasks the same way.
Where no stream answers, the script reads ``api/tasks`` again every few seconds.
"""

from __future__ import annotations

import functools
import typing as t

from flask import Blueprint, Flask, Response, current_app, render_template, request, url_for
from werkzeug.exceptions import NotFound

from .. import streams
from ..exceptions import Unavailable
from ..origin import is_cross_site
from ..prefer import delta_seconds
from ..responses import NO_STORE, error_response, json_response
from ..state import AdminCallable, AsyncState, OwnerCallable, get_state
from ..status import (
    CROSS_SITE_MESSAGE,
    MAX_LIST_LIMIT,
    TaskListResource,
    cancel,
    find_task,
    list_served,
    not_found,
    unavailable,
)
from ..task import Task, TaskState, is_task_id_then, is_valid_task_id

#: How many tasks a page of the dashboard shows, unless ``?limit=`` says otherwise.
PAGE_SIZE = 25
#: How much of a stored response body the task's detail shows.
BODY_PREVIEW = 4096
#: What the page is served with: its own origin for everything, and no framing
#: (its buttons cancel and forget tasks).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    **NO_STORE,
}

blueprint = Blueprint(
    "restful_async_dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
)

F = t.TypeVar("F", bound=t.Callable[..., t.Any])


def check_dashboard(
    app: Flask,
    path: object,
    owner: OwnerCallable | None,
    admin: AdminCallable | None,
    task_paths: t.Collection[str] = (),
) -> None:
    """Refuse a dashboard that would show every task to anyone, or a bad path (one
    of ``task_paths``, where the task list or the status URLs are served)."""
    if not isinstance(path, str) or not path.startswith("/") or not path.strip("/"):
        raise ValueError(
            "RESTFUL_ASYNC_DASHBOARD must be the path of the dashboard page, such as"
            f" '/tasks/dashboard', or None for no dashboard; not {path!r}"
        )
    if path.rstrip("/") in task_paths:
        raise ValueError(
            f"RESTFUL_ASYNC_DASHBOARD = {path!r} is the path of the task list or of a"
            " task's status URL: give the dashboard a path of its own, such as"
            " '/tasks/dashboard'"
        )
    if owner is None and admin is None and not app.debug:
        raise RuntimeError(
            f"RESTFUL_ASYNC_DASHBOARD = {path!r}, but register_async has neither an owner"
            " nor an admin callable: the dashboard would show every task, with its"
            " result and a Cancel button, to anyone who opens the page. Pass"
            " register_async(api, owner=...) (each caller sees their own tasks) and/or"
            " admin=... (returns True for operators, who see every task); outside"
            " debug mode the dashboard is refused without them."
        )


def install_dashboard(app: Flask, path: str) -> None:
    """Serve the dashboard of ``app`` at ``path``."""
    app.register_blueprint(blueprint, url_prefix=path.rstrip("/"))


def _guarded(view: F) -> F:
    """Run the ``decorators`` of ``register_async`` around ``view``, as the task
    list's resource does: the authentication that loads what ``owner`` reads."""

    @functools.wraps(view)
    def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
        wrapped: t.Callable[..., t.Any] = view
        for decorator in get_state(current_app).decorators:
            wrapped = decorator(wrapped)
        return wrapped(*args, **kwargs)

    return t.cast(F, run)


class _Scope(t.NamedTuple):
    """Whose tasks the caller sees: every owner's, or those of ``owner``."""

    every: bool
    owner: str | None


def _scope(state: AsyncState) -> _Scope | None:
    """The caller's scope, or None when the task list is not theirs to see."""
    if state.is_admin():
        return _Scope(True, None)
    owner = state.identity()
    if list_served(state, owner):
        return _Scope(False, owner)
    return None


def _no_such_page() -> Response:
    # What the task list answers such a caller: a URL that does not exist.
    return error_response(404, NotFound.description, NO_STORE)


@blueprint.route("", methods=["GET"])
@_guarded
def page() -> Response:
    state = get_state(current_app)
    scope = _scope(state)
    if scope is None:
        return _no_such_page()
    # An operator's stream is api/tasks's own: the list URL's has one owner's tasks.
    stream = url_for(".tasks") if scope.every else state.api.url_for(TaskListResource)
    html = render_template(
        "restful_async/dashboard.html",
        every=scope.every,
        tasks_url=url_for(".tasks"),
        stream_url=stream,
        page_size=PAGE_SIZE,
        states=[s.value for s in TaskState],
    )
    return current_app.response_class(html, 200, PAGE_HEADERS, mimetype="text/html")


@blueprint.route("/api/tasks", methods=["GET"])
@_guarded
def tasks() -> Response:
    """``{"tasks": [...], "next": cursor or null, "counts": {state: n}, "every": bool}``.

    ``?state=``, ``?limit=`` (1 to 500) and ``?cursor=`` (the ``next`` of the page
    before) as ``GET /tasks`` takes them; ``?counts=0`` leaves the counts out
    (null), which cost more than the page: an operator's go through every task.
    Each task is its status document with its status URL (``url``) and, for an
    operator, its ``owner``.

    For an operator, ``Accept: text/event-stream`` gets the list URL's event
    stream (CONTRACT 6.5) over every owner's tasks of that page.
    """
    state = get_state(current_app)
    scope = _scope(state)
    if scope is None:
        return _no_such_page()
    limit = delta_seconds(request.args.get("limit", str(PAGE_SIZE)))
    if limit is None or not 1 <= limit <= MAX_LIST_LIMIT:
        return error_response(400, f"limit must be between 1 and {MAX_LIST_LIMIT}.", NO_STORE)
    wanted = request.args.get("state") or None
    try:
        state_filter = TaskState(wanted) if wanted is not None else None
    except ValueError:
        names = ", ".join(s.value for s in TaskState)
        return error_response(400, f"state must be one of: {names}.", NO_STORE)
    cursor = request.args.get("cursor") or None
    if cursor is not None and not is_valid_task_id(cursor):
        return error_response(400, "cursor is not valid.", NO_STORE)
    if scope.every and streams.wants_stream():
        query = streams.ListQuery(None, state_filter, limit, cursor, every=True)
        return TaskListResource.stream(state, query)
    counted = request.args.get("counts") != "0"
    store = state.store
    stats = None
    try:
        if scope.every:
            found = store.list_all(state=state_filter, limit=limit + 1, before=cursor)
            if counted:
                stats = store.stats()
        else:
            found = store.list(
                owner=scope.owner, state=state_filter, limit=limit + 1, before=cursor
            )
            if counted:
                stats = store.owner_stats(scope.owner)
    except Unavailable as e:
        return unavailable(e)
    following = found[limit - 1].id if len(found) > limit else None
    document = {
        "tasks": [_summary(state, task, scope) for task in found[:limit]],
        "next": following,
        "counts": None if stats is None else {s.value: n for s, n in stats.counts.items()},
        "every": scope.every,
    }
    return json_response(200, document, NO_STORE)


_CANCEL_SUFFIX = "/cancel"


@blueprint.route("/api/tasks/<path:task_id>/cancel", methods=["POST"])
@_guarded
def cancel_task(task_id: str) -> Response:
    """Cancel a queued or running task, as ``DELETE`` on its status URL does, but
    never forget one: a task that finished before the click answers ``409`` (the
    page's Cancel button; ``DELETE`` of a finished task deletes its result)."""
    state = get_state(current_app)
    if not state.cross_site_delete and is_cross_site(request.environ, request.host_url):
        return error_response(403, CROSS_SITE_MESSAGE, NO_STORE)
    if request.mimetype != "application/json":
        # A form of another page can POST without asking first; a JSON body, as
        # a DELETE, needs the browser to ask the server (CORS), which says no.
        return error_response(415, "Send the cancel as application/json.", NO_STORE)
    scope = _scope(state)
    if scope is None:
        return _no_such_page()
    try:
        found = _visible(state, scope, task_id)
        if found is None:
            return not_found()
        answer = None if found.state.finished else cancel(state, found)
    except Unavailable as e:
        return unavailable(e)
    if answer is not None:
        return answer
    return error_response(409, "The task has finished: there is nothing to cancel.", NO_STORE)


def _visible(state: AsyncState, scope: _Scope, task_id: str) -> Task | None:
    """The task ``task_id`` if the caller may see it (raises what the store raises)."""
    if scope.every:
        return state.store.get(task_id) if is_valid_task_id(task_id) else None
    return find_task(state, task_id)


@blueprint.route("/api/tasks/<path:task_id>", methods=["GET"])
@_guarded
def task(task_id: str) -> Response:
    """One task: ``{"task": ..., "answer": the code its status URL answers,
    "response": {"status", "headers", "body", "size", "truncated"} or null}``.

    ``body`` is the start of the stored body as text (at most
    :data:`BODY_PREVIEW` bytes, undecodable bytes replaced), or null for a body
    that is not text.
    """
    state = get_state(current_app)
    scope = _scope(state)
    if scope is None:
        return _no_such_page()
    if is_task_id_then(task_id, _CANCEL_SUFFIX):
        # <path>/api/tasks/<id>/cancel, which this rule catches too: POST only.
        return error_response(
            405, "Cancel a task with POST.", {"Allow": "OPTIONS, POST", **NO_STORE}
        )
    try:
        found = _visible(state, scope, task_id)
    except Unavailable as e:
        return unavailable(e)
    if found is None:
        return not_found()
    stored = found.response
    response: dict[str, t.Any] | None = None
    if stored is not None:
        preview = stored.body[:BODY_PREVIEW]
        response = {
            "status": stored.status,
            "headers": [list(header) for header in stored.headers],
            "body": None if b"\x00" in preview else preview.decode(errors="replace"),
            "size": len(stored.body),
            "truncated": len(stored.body) > BODY_PREVIEW,
        }
    document = {
        "task": _summary(state, found, scope),
        "answer": streams.answer_code(state, found),
        "response": response,
    }
    return json_response(200, document, NO_STORE)


def _summary(state: AsyncState, task: Task, scope: _Scope) -> dict[str, t.Any]:
    """A task as the page shows it: its status document, status URL, and for an
    operator whose it is and which endpoint made it."""
    summary = task.status_document()
    summary["url"] = state.location(task.id)
    if task.expired:
        summary["expired"] = True
    if scope.every:
        summary["owner"] = task.owner
        summary["endpoint"] = task.endpoint
    return summary
