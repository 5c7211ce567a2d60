"""``register_async``: wire the status routes and the per-app state into an Api."""

from __future__ import annotations

import os
import typing as t

from flask import Flask
from flask.sansio.blueprints import BlueprintSetupState
from flask_restful import Api

from .executors.base import Executor
from .executors.threads import ThreadExecutor
from .state import EXTENSION_KEY, RESULT_SUFFIX, AsyncState, OwnerCallable
from .status import TaskListResource, TaskResultResource, TaskStatusResource
from .stores import TaskStore, open_store

STATUS_ENDPOINT = "restful_async_task"
LIST_ENDPOINT = "restful_async_tasks"
RESULT_ENDPOINT = "restful_async_result"
_TASK_ID_PART = "/<task_id>"

#: Every config key the extension reads, with its default. The README's table
#: mirrors this.
DEFAULTS: dict[str, t.Any] = {
    # Where task records live: a SQLite file in the instance folder, shared by
    # every process of this machine; memory:// (one process) or redis://.
    "RESTFUL_ASYNC_STORE": "sqlite:///restful_async.db",
    # Prefix of every key of a Redis store; the {...} hash tag keeps all keys in
    # one Redis Cluster slot.
    "RESTFUL_ASYNC_REDIS_PREFIX": "{restful_async}:",
    # Tasks running at once in one process (the thread pool's size).
    "RESTFUL_ASYNC_MAX_WORKERS": min(32, (os.cpu_count() or 1) + 4),
    # Accepted tasks waiting for a worker, per process; beyond that, 503.
    "RESTFUL_ASYNC_MAX_PENDING": 64,
    # Seconds a finished task's result is kept; then the status URL answers 410.
    "RESTFUL_ASYNC_RESULT_TTL": 24 * 3600,
    # Seconds an expired task still answers 410 before it is forgotten (404).
    "RESTFUL_ASYNC_TOMBSTONE_TTL": 24 * 3600,
    # Seconds a process's lease lasts; renewed every third of it. A task whose
    # process stopped renewing reads as lost after at most this long.
    "RESTFUL_ASYNC_LEASE": 30,
    # The Retry-After (seconds) of a 202 when the handler reports no progress.
    "RESTFUL_ASYNC_RETRY_AFTER": 1,
    # The largest Retry-After (seconds) estimated from a handler's progress.
    "RESTFUL_ASYNC_MAX_RETRY_AFTER": 30,
    # The longest a request may wait (seconds) for a task to finish, with
    # ?wait=N or Prefer: wait=N; a waiting request holds one server thread. Below
    # gunicorn's default --timeout (30 s), which would kill a sync worker.
    "RESTFUL_ASYNC_MAX_WAIT": 20,
    # Finished tasks answer 303 See Other to <status URL>/result, which serves
    # the response, instead of serving it at the status URL itself.
    "RESTFUL_ASYNC_RESULT_REDIRECT": False,
    # Largest request body (bytes) a task accepts; larger ones get 413 before a
    # task exists. The body is held in memory until the task starts.
    "RESTFUL_ASYNC_MAX_BODY": 10 * 1024 * 1024,
    # The least time (seconds) between two progress writes of one task: a handler
    # may report on every row, the store gets a few writes a second. The latest
    # report lands this long after the previous write at most. 0: every report.
    "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0.25,
    # Seconds running tasks get to finish when the process exits (keep it below
    # gunicorn's graceful timeout, 30 s by default).
    "RESTFUL_ASYNC_SHUTDOWN_TIMEOUT": 20,
}


def register_async(
    api: Api,
    *,
    url: str = "/tasks/<task_id>",
    store: TaskStore | str | None = None,
    executor: Executor | None = None,
    owner: OwnerCallable | None = None,
) -> None:
    """Set up background tasks for ``api``: the status URL, the task list, the state.

    ``url`` is the status route and must end in ``/<task_id>``; the task list is
    served one level up (``/tasks``). ``store`` is a :class:`TaskStore` or a store
    URL; ``executor`` an :class:`Executor` (a :class:`ThreadExecutor` sized by the
    config by default); ``owner`` a callable, run in the request context, that
    returns the caller's identity (str) or None. Keyword arguments win over the
    ``RESTFUL_ASYNC_*`` config keys, which are read when the app is set up.

    Works for an ``Api`` bound to an app or to a blueprint (then the state is made
    when the blueprint is registered). Once per app.
    """
    if not url.endswith(_TASK_ID_PART):
        raise ValueError(f"url must end with {_TASK_ID_PART!r}, got {url!r}")
    if STATUS_ENDPOINT in api.endpoints:
        raise RuntimeError("register_async was already called for this Api; call it once.")
    if api.blueprint is None and api.app is None:
        raise ValueError(
            "register_async needs an Api bound to an app or a blueprint: call it after"
            " Api(app) or api.init_app(app)."
        )

    def setup(app: Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"register_async was already called for the app {app.name!r}: one Api"
                " per app holds the task routes. Register your AsyncResources on that"
                " Api, or call register_async only once."
            )
        app.extensions[EXTENSION_KEY] = _make_state(app, api, store, executor, owner)

    if api.blueprint is not None:

        def on_register(setup_state: BlueprintSetupState) -> None:
            setup(t.cast(Flask, setup_state.app))

        api.blueprint.record_once(on_register)
    else:
        setup(t.cast(Flask, api.app))

    # The path converter also catches ids with slashes, so that every malformed id
    # gets the same JSON 404 instead of the router's HTML one.
    status_rule = url[: -len(_TASK_ID_PART)] + "/<path:task_id>"
    api.add_resource(TaskStatusResource, status_rule, endpoint=STATUS_ENDPOINT)
    api.add_resource(TaskResultResource, url + RESULT_SUFFIX, endpoint=RESULT_ENDPOINT)
    api.add_resource(TaskListResource, url[: -len(_TASK_ID_PART)] or "/", endpoint=LIST_ENDPOINT)


def _make_state(
    app: Flask,
    api: Api,
    store: TaskStore | str | None,
    executor: Executor | None,
    owner: OwnerCallable | None,
) -> AsyncState:
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    config = app.config
    interval = config["RESTFUL_ASYNC_PROGRESS_INTERVAL"]
    # Read by every task as it starts: refused here rather than in a worker.
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
        raise ValueError(
            "RESTFUL_ASYNC_PROGRESS_INTERVAL must be a number of seconds, 0 or more"
            f" (0 writes every progress report), not {interval!r}"
        )
    if store is None or isinstance(store, str):
        store = open_store(store or config["RESTFUL_ASYNC_STORE"], app)
    store.configure(
        result_ttl=float(config["RESTFUL_ASYNC_RESULT_TTL"]),
        tombstone_ttl=float(config["RESTFUL_ASYNC_TOMBSTONE_TTL"]),
        lease=float(config["RESTFUL_ASYNC_LEASE"]),
    )
    if executor is None:
        executor = ThreadExecutor(
            max_workers=int(config["RESTFUL_ASYNC_MAX_WORKERS"]),
            max_pending=int(config["RESTFUL_ASYNC_MAX_PENDING"]),
            shutdown_timeout=float(config["RESTFUL_ASYNC_SHUTDOWN_TIMEOUT"]),
        )
    if owner is not None and not callable(owner):
        raise TypeError("owner must be a callable that returns the caller's identity")
    if owner is None and not app.debug:
        app.logger.warning(
            "register_async: no owner callable, so task ids are bearer tokens: whoever"
            " learns a status URL can read that task's result and cancel it. Pass"
            " register_async(api, owner=...) returning the caller's identity."
        )
    return AsyncState(
        app=app,
        api=api,
        store=store,
        executor=executor,
        owner=owner,
        status_resource=TaskStatusResource,
        retry_after=int(config["RESTFUL_ASYNC_RETRY_AFTER"]),
        max_retry_after=int(config["RESTFUL_ASYNC_MAX_RETRY_AFTER"]),
        result_redirect=bool(config["RESTFUL_ASYNC_RESULT_REDIRECT"]),
        max_wait=int(config["RESTFUL_ASYNC_MAX_WAIT"]),
        max_body=int(config["RESTFUL_ASYNC_MAX_BODY"]),
    )
