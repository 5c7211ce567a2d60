"""Running one task in a worker: fresh request context, handler, rendered response."""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import io
import time
import typing as t

from flask import Flask, current_app, request
from flask_restful import Api
from werkzeug.exceptions import HTTPException

from . import outbox, signals, waiting
from .context import TaskHandle, _cv_task
from .exceptions import ResultTooLarge, StoreUnavailable, TaskCancelled
from .lease import worker_id
from .resource import Replay, _cv_replay
from .responses import RESULT_TOO_LARGE, render_stored, served_headers, store_response
from .state import get_state
from .stores.base import Ending
from .task import StoredResponse, TaskState

if t.TYPE_CHECKING:
    from flask_restful import Resource

    from .deferred import Run
    from .snapshot import RequestSnapshot
    from .stores.base import TaskStore
    from .task import Progress, Task

_INTERNAL_ERROR = StoredResponse(
    500,
    served_headers([("Content-Type", "application/json")]),
    b'{"message": "Internal Server Error"}\n',
)


def run_task(
    app: Flask,
    task_id: str,
    snapshot: RequestSnapshot,
    resource: Resource | None = None,
    *,
    before_start: t.Callable[[], None] | None = None,
) -> bool:
    """Run a recorded task to its end and store the outcome; False if it did not
    start (cancelled, or not in the store).

    Runs in a new, empty :mod:`contextvars` context, so nothing of a previous task
    (or of the thread that called) can leak into this one. ``resource`` is the
    instance that accepted the request; without it (another process) a new one is
    made through the resource's view function.
    """
    ran = contextvars.Context().run(
        _run_task, app, task_id, snapshot, resource, None, before_start=before_start
    )
    return ran is not None


def run_here(
    app: Flask,
    task: Task,
    snapshot: RequestSnapshot,
    resource: Resource,
    *,
    unrecorded: Run | None = None,
) -> Ending | None:
    """Run ``task``, which its submit recorded as running already (under this
    process's worker name), in the request thread and context of that submit, and
    return how it ended as the store recorded it: None if the store did not take
    the outcome now (it waits in the outbox).

    With ``unrecorded``, the task is not in the store: it goes there as it ends,
    in one write, unless it was recorded running meanwhile (see
    :mod:`~flask_restful_async.deferred`), and how it ended is returned whether
    the store took it or not.

    The handler sees the submit's own request and ``g``, as a synchronous call
    would, in a copy of the current :mod:`contextvars` context: what it sets there
    stays there.
    """
    # The submit read the body (it is cached): what the handler reads of the raw
    # stream starts from its first byte again, as in a task thread.
    request.stream = io.BytesIO(snapshot.body)
    ran = contextvars.copy_context().run(
        _run_task, app, task.id, snapshot, resource, task, unrecorded
    )
    assert ran is not None
    return ran[0]


def _run_task(
    app: Flask,
    task_id: str,
    snapshot: RequestSnapshot,
    resource: Resource | None,
    started: Task | None,
    unrecorded: Run | None = None,
    before_start: t.Callable[[], None] | None = None,
) -> tuple[Ending | None] | None:
    # Start and outcome go through the outbox module: a store outage neither
    # leaves the task queued or running for ever nor ends the handler.
    state = get_state(app)
    store = state.store
    here = started is not None  # recorded running by its submit, which waits here
    if started is None:
        started = outbox.start(
            store,
            task_id,
            worker_id(),
            app.logger,
            on_give_up=lambda: signals.send_given_up(app, task_id, snapshot),
            before=before_start or (None if state.lease is None else state.lease.ensure),
        )
        if started is None:
            return None  # cancelled (or forgotten) before it could start
    if unrecorded is None:
        waiting.changed(store, task_id)  # streams in this process
    handle = TaskHandle(
        task_id,
        store,
        progress_interval=float(app.config["RESTFUL_ASYNC_PROGRESS_INTERVAL"]),
        logger=app.logger,
        app=app,
        record=started,
        carrier=snapshot.carrier,
        in_store=unrecorded is None,
    )
    if unrecorded is not None:
        unrecorded.attach(handle)
    _cv_task.set(handle)
    if signals.task_started.receivers:
        signals.send(signals.task_started, app, task=started)
    outcome: TaskState = TaskState.FAILED
    response: StoredResponse | None = _INTERNAL_ERROR
    try:
        if here:
            outcome, response = _outcome(app, task_id, snapshot, resource)
        else:
            outcome, response = _run_in_request(app, task_id, snapshot, resource)
    except Exception:
        app.logger.exception("Task %s failed", task_id, extra={"task_id": task_id})
    finally:
        # Decided before the handle closes: no recording starts after.
        write_whole = unrecorded is not None and unrecorded.end()
        handle._close()  # the latest progress lands before the outcome
        ending: Ending | None
        if unrecorded is not None and write_whole:
            ended_as = outcome
            ending = _create_finished(app, store, unrecorded, outcome, response, handle.latest)
        else:
            # Recorded meanwhile (see deferred), under the name the process had then.
            worker = started.worker if unrecorded is None else unrecorded.task.worker
            ended_as, ending = outbox.finish(
                store, task_id, outcome, response, worker, app.logger, started.started_at
            )
        if signals.task_finished.receivers:
            ended = dataclasses.replace(
                started,
                state=ended_as,
                finished_at=time.time() if ending is None else ending.finished_at,
                progress=handle.latest or started.progress,
                response=response if ended_as is outcome else None,
            )
            signals.send(signals.task_finished, app, task=ended)
    return (ending,)


def _create_finished(
    app: Flask,
    store: TaskStore,
    run: Run,
    outcome: TaskState,
    response: StoredResponse | None,
    progress: Progress | None,
) -> Ending:
    """Record a task that ran before it was recorded, now that it has ended, and
    return how it ended. Its answer goes to the client whatever the store does: a
    store that does not take the record leaves it out of the task lists (logged),
    and nothing else, since no one was given its id.

    Unless it was there all the same, after a recording as running that failed
    (see deferred) but may have taken effect (its reply lost): then the outcome
    waits in the outbox, under the name that recording used, as any outcome the
    store did not take, and ends the task if the store has it. Otherwise the
    store cannot have it (a write that did not answer wrote it whole or not at
    all), and nothing waits: the outbox's room and its giving up of a worker name
    are for tasks the store holds."""
    started = run.task
    finished_at = time.time()
    ended = dataclasses.replace(
        started,
        state=outcome,
        finished_at=finished_at,
        progress=progress or started.progress,
        response=response,
    )
    try:
        recorded_at = store.create_finished(ended)
    except Exception as e:
        outbox.warn_failed(
            app.logger,
            "Task %s ran in its request thread, whose client gets its answer, but the"
            " store did not take its record: it may be missing from the task lists (%s)",
            started.id,
            e,
        )
        if run.tried_as is not None:
            outbox.outbox_for(store).put(
                started.id,
                outcome,
                response,
                run.tried_as,
                app.logger,
                refused=not isinstance(e, StoreUnavailable),
            )
        return Ending(outcome, finished_at, response, started.started_at)
    # None: it had ended otherwise already (a recording whose reply was lost, then
    # its lease lapsed): the client gets this answer itself, not a redirect.
    run.written = recorded_at is not None
    ending = Ending(outcome, recorded_at or finished_at, response, started.started_at)
    # List streams in this process hear of it; no one waits for it by id (and so,
    # as outbox.finish does, a large response is not kept with the news); of one
    # that had ended already, the store says how.
    if recorded_at is None:
        waiting.notify(store, started.id)
    elif response is None or len(response.body) <= outbox.ANNOUNCED_BODY_MAX:
        waiting.notify(store, started.id, ending)
    else:
        waiting.notify(store, started.id)
    return ending


def _run_in_request(
    app: Flask, task_id: str, snapshot: RequestSnapshot, resource: Resource | None
) -> tuple[TaskState, StoredResponse | None]:
    ctx = snapshot.request_context(app)
    ctx.push()
    failure: list[BaseException] = []
    try:
        snapshot.restore_g()
        return _outcome(app, task_id, snapshot, resource, failure)
    finally:
        ctx.pop(failure[0] if failure else None)


def _outcome(
    app: Flask,
    task_id: str,
    snapshot: RequestSnapshot,
    resource: Resource | None,
    failure: list[BaseException] | None = None,
) -> tuple[TaskState, StoredResponse | None]:
    """Call the handler in the current request context, and render what it gave
    (or how it failed) as the task's outcome; an unexpected error goes into
    ``failure`` too."""
    state = get_state(app)
    try:
        rv, resource = _call_handler(snapshot, resource)
        return TaskState.SUCCEEDED, render_stored(state.api, resource, rv, state.max_result)
    except TaskCancelled:
        return TaskState.CANCELLED, None
    except ResultTooLarge as e:
        app.logger.error(
            "Task %s failed: its response is larger than RESTFUL_ASYNC_MAX_RESULT (%d bytes)",
            task_id,
            e.max_size,
            extra={"task_id": task_id},
        )
        return TaskState.FAILED, RESULT_TOO_LARGE
    except HTTPException as e:
        return TaskState.FAILED, store_response(state.api.handle_error(e), state.max_result)
    except Exception as e:
        if failure is not None:
            failure.append(e)
        app.logger.exception("Task %s failed", task_id, extra={"task_id": task_id})
        return TaskState.FAILED, _mapped_error(state.api, e, state.max_result)


def _mapped_error(api: Api, error: Exception, max_size: int) -> StoredResponse:
    """The response of a task that failed by ``error`` (not an HTTPException):
    what ``api`` answers for it where it says something of its own (an entry of
    ``Api(errors=...)`` for the exception's class, or a ``handle_error`` of a
    subclass), else a ``500`` with a generic message."""
    if type(error).__name__ not in api.errors and type(api).handle_error is Api.handle_error:
        return _INTERNAL_ERROR
    try:
        return store_response(api.handle_error(error), max_size)
    except Exception:
        # Raised again (PROPAGATE_EXCEPTIONS, as under TESTING), or the handler
        # failed in turn: the generic answer.
        return _INTERNAL_ERROR


def _call_handler(snapshot: RequestSnapshot, resource: Resource | None) -> tuple[t.Any, Resource]:
    if resource is not None:
        method = getattr(resource, snapshot.method)
        return current_app.ensure_sync(method)(*snapshot.args, **snapshot.kwargs), resource
    # Another process: make the resource as its view function would (with the
    # resource_class_args/kwargs given to add_resource), skipping the decorators
    # that already ran in the request thread.
    view = inspect.unwrap(current_app.view_functions[snapshot.endpoint])
    replay = Replay(snapshot.method, snapshot.args, snapshot.kwargs)
    token = _cv_replay.set(replay)
    try:
        rv = view(**(request.view_args or {}))
    finally:
        # Taken by AsyncResource.dispatch_request; not left set by a view that is not one.
        _cv_replay.reset(token)
    if replay.resource is None:
        raise RuntimeError(f"endpoint {snapshot.endpoint!r} is not an AsyncResource")
    return rv, replay.resource
