"""``register_async``: wire the status routes and the per-app state into an Api."""

from __future__ import annotations

import importlib.util
import os
import re
import typing as t
import weakref

from flask import Flask, Response, current_app, request
from flask.sansio.blueprints import BlueprintSetupState
from flask_restful import Api, Resource
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from . import stopping
from .cli import tasks_cli
from .dashboard import check_dashboard, install_dashboard
from .executors.base import Executor
from .executors.eager import EagerExecutor
from .executors.threads import ThreadExecutor
from .settings import flag, maybe_flag, number, whole
from .state import EXTENSION_KEY, RESULT_SUFFIX, AdminCallable, AsyncState, OwnerCallable
from .status import TaskListResource, TaskResultResource, TaskStatusResource
from .stores import TaskStore, open_store
from .takeover import Takeover

STATUS_ENDPOINT = "restful_async_task"
LIST_ENDPOINT = "restful_async_tasks"
RESULT_ENDPOINT = "restful_async_result"
_TASK_ID_PART = "/<task_id>"


class _OtherThanResult(PathConverter):
    """The status URL's catch-all (see :func:`_routes`): any path of one or more
    segments but a result URL (``<id>/result``), which the result's rule serves.
    Matched there too, the catch-all would add its methods (``DELETE``) to what
    the router and ``OPTIONS`` say the result URL allows."""

    regex = f"(?![^/]+{re.escape(RESULT_SUFFIX)}$)[^/].*?"


#: The name the catch-all's converter has in each app's URL map.
_CATCH_ALL_CONVERTER = "restful_async_task_path"

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
    # Accepted tasks waiting for a worker, per process; beyond that, 503. A waiting
    # task costs its request snapshot in memory, not a thread.
    "RESTFUL_ASYNC_MAX_PENDING": 4096,
    # Bytes of request snapshots (body and headers) that the tasks waiting for a
    # worker may hold between them, per process; beyond that, 503.
    "RESTFUL_ASYNC_MAX_PENDING_BYTES": 64 * 1024 * 1024,
    # Seconds a submit waits for its task before the 202 when the endpoint's tasks
    # usually end within that (as this process has seen them run): the 202 then
    # reads finished, with Retry-After: 0. Holds the request thread meanwhile.
    # 0: never wait.
    "RESTFUL_ASYNC_SHORT_WAIT": 0.5,
    # A task that a Prefer: wait=N submit waits for, and that usually ends within
    # SHORT_WAIT and N, runs in that request thread, which waits for it anyway
    # (at most MAX_WORKERS at once per process, then in the places of idle task
    # threads): no hand-over to a task thread.
    # One that turns slow holds the request thread until it ends, past N.
    # False: always in a task thread.
    "RESTFUL_ASYNC_SHORT_IN_REQUEST": True,
    # Seconds a finished task's result is kept; then the status URL answers 410.
    "RESTFUL_ASYNC_RESULT_TTL": 24 * 3600,
    # Seconds an expired task still answers 410 before it is forgotten (404).
    "RESTFUL_ASYNC_TOMBSTONE_TTL": 24 * 3600,
    # Seconds a process's lease lasts; renewed every third of it. A task whose
    # process stopped renewing reads as lost after at most this long.
    "RESTFUL_ASYNC_LEASE": 30,
    # Seconds a task may wait for a worker; still queued after that, it reads lost.
    "RESTFUL_ASYNC_QUEUED_TTL": 24 * 3600,
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
    # Without an owner callable, serve the task list anyway (to anyone: every task
    # id it shows is a bearer token). Unsafe; debug mode serves it too.
    "RESTFUL_ASYNC_PUBLIC_LIST": False,
    # Largest request body (bytes) a task accepts; larger ones get 413 before a
    # task exists. The body is held in memory until the task starts.
    "RESTFUL_ASYNC_MAX_BODY": 10 * 1024 * 1024,
    # Largest response (body bytes) a task may give; a larger one fails the task
    # (500 at its status URL) instead of filling the store. A streamed body is
    # never read past it.
    "RESTFUL_ASYNC_MAX_RESULT": 8 * 1024 * 1024,
    # The least time (seconds) between two progress writes of one task: a handler
    # may report on every row, the store gets a few writes a second. The latest
    # report lands this long after the previous write at most. 0: every report.
    "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0.25,
    # Seconds running tasks get to finish when the process exits (keep it below
    # gunicorn's graceful timeout, 30 s by default).
    "RESTFUL_ASYNC_SHUTDOWN_TIMEOUT": 20,
    # Test mode: every task runs in the request thread before its 202 leaves,
    # whatever executor is configured (Celery too), through the same store.
    "RESTFUL_ASYNC_EAGER": False,
    # OpenTelemetry traces of each task (see flask_restful_async.traces). None: on
    # when opentelemetry-api is importable; True: on, an ImportError without it;
    # False: off.
    "RESTFUL_ASYNC_TRACES": None,
    # The path of the dashboard page (e.g. "/tasks/dashboard"); None: no dashboard.
    # Needs an owner or admin callable outside debug mode.
    "RESTFUL_ASYNC_DASHBOARD": None,
    # Let a browser page of another site cancel and forget tasks with DELETE (for
    # an app that serves its front end from another site, through CORS).
    "RESTFUL_ASYNC_CROSS_SITE_DELETE": False,
    # The longest an event stream (Accept: text/event-stream) lasts, in seconds;
    # then it ends and the client reconnects. A stream holds one server thread
    # (gthread) or a greenlet (gevent) meanwhile.
    "RESTFUL_ASYNC_MAX_STREAM": 300,
    # Seconds an event stream may stay silent before a comment line keeps
    # proxies from closing it.
    "RESTFUL_ASYNC_STREAM_KEEPALIVE": 15,
    # Prometheus metrics (flask_restful_async.metrics): None, on if prometheus-client
    # is installed; True, required (an ImportError naming the extra if it is not);
    # False, off.
    "RESTFUL_ASYNC_METRICS": None,
}


def register_async(
    api: Api,
    *,
    app: Flask | None = None,
    url: str = "/tasks/<task_id>",
    store: TaskStore | str | None = None,
    executor: Executor | None = None,
    owner: OwnerCallable | None = None,
    decorators: t.Sequence[t.Callable[..., t.Any]] = (),
    admin: AdminCallable | None = None,
) -> None:
    """Set up background tasks for ``api``: the status URL, the task list, the state.

    ``url`` is the status route and must end in ``/<task_id>``; the task list is
    served one level up (``/tasks``). ``store`` is a :class:`TaskStore` or a store
    URL; ``executor`` an :class:`Executor` (a :class:`ThreadExecutor` sized by the
    config by default); ``owner`` a callable, run in the request context, that
    returns the caller's identity (str) or None. ``decorators`` wrap the status,
    result and list resources as ``Api(decorators=...)`` wraps every resource: put
    the authentication there that loads what ``owner`` reads. Keyword arguments win
    over the ``RESTFUL_ASYNC_*`` config keys, which are read when the app is set up;
    but with ``RESTFUL_ASYNC_EAGER = True`` (test mode) an
    :class:`~flask_restful_async.executors.EagerExecutor` takes the place of any
    ``executor``, Celery's included: each task runs before its ``202`` leaves.
    the authentication there that loads what ``owner`` reads. ``admin`` is a
    callable, run in the request context, that returns True for an operator: the
    dashboard (``RESTFUL_ASYNC_DASHBOARD``) then shows them every owner's tasks,
    and ``DELETE`` on a status URL may cancel or forget any. Keyword arguments win
    over the ``RESTFUL_ASYNC_*`` config keys, which are read when the app is set up.

    - ``Api(app)``: set up for that app, now.
    - ``Api(blueprint)``: set up for each app the blueprint is registered on, when
      it is registered.
    - An app factory (``api = Api()`` at module level, ``api.init_app(app)`` in
      ``create_app()``): pass ``app=app`` in ``create_app()``, before or after
      ``api.init_app(app)``, once per app.

    The app's CLI gets the ``flask tasks`` commands (see
    :mod:`flask_restful_async.cli`), unless it has a ``tasks`` command already.

    Each app gets its own state: its config, store and executor. A store or
    executor object serves the one app it was first set up for; with several
    apps, give the store as a URL (or leave both to the config), or make the
    objects inside the app factory. A second call for one app is a RuntimeError.
    """
    if not url.endswith(_TASK_ID_PART):
        raise ValueError(f"url must end with {_TASK_ID_PART!r}, got {url!r}")
    if not all(callable(decorator) for decorator in decorators):
        raise TypeError("decorators must be a sequence of decorators (callables)")
    routes = _routes(url)
    decorators = tuple(decorators)
    # The task list's path and the status rule's, within the Api: no dashboard in
    # their place (see setup for a blueprint's prefix).
    api_paths = {api.prefix + rules[0].split("<", 1)[0].rstrip("/") for _, rules, _ in routes}

    def setup(app: Flask, url_prefix: str | None = None) -> None:
        # Where the app serves them: under the url_prefix a blueprint was
        # registered with, joined as Flask joins it to the blueprint's rules.
        task_paths = {
            path if url_prefix is None else f"{url_prefix.rstrip('/')}/{path.lstrip('/')}"
            for path in api_paths
        }
        app.url_map.converters.setdefault(_CATCH_ALL_CONVERTER, _OtherThanResult)
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"register_async was already called for the app {app.name!r}: one Api"
                " per app holds the task routes. Register your AsyncResources on that"
                " Api, or call register_async only once per app."
            )
        for shared in (store, executor):
            if shared is not None and not isinstance(shared, str):
                _claim(shared, app)
        app.extensions[EXTENSION_KEY] = _make_state(
            app, api, store, executor, owner, decorators, admin, task_paths
        )
        _connect_metrics(app)
        # An app's own command of that name wins; it can add ours under another:
        # app.cli.add_command(tasks_cli, "async-tasks").
        if tasks_cli.name not in app.cli.commands:
            app.cli.add_command(tasks_cli)

    if api.blueprint is not None:
        if app is not None:
            raise ValueError(
                "register_async(api, app=...) is for an Api made without an app; an Api"
                " on a blueprint is set up on every app the blueprint is registered on."
            )
        if STATUS_ENDPOINT in api.endpoints:
            raise RuntimeError("register_async was already called for this Api; call it once.")
        blueprint = api.blueprint

        def on_register(setup_state: BlueprintSetupState) -> None:
            setup(t.cast(Flask, setup_state.app), setup_state.url_prefix)

        blueprint.record_once(on_register)
        for resource, rules, endpoint in routes:
            api.add_resource(resource, *rules, endpoint=endpoint)
    elif api.app is not None:
        if app is not None and app is not api.app:
            raise ValueError(
                "register_async(api, app=...) got another app than the one the Api is"
                " bound to: leave app out for an Api(app)."
            )
        setup(t.cast(Flask, api.app))
        for resource, rules, endpoint in routes:
            api.add_resource(resource, *rules, endpoint=endpoint)
    elif app is None:
        raise ValueError(
            "register_async needs to know the app of an Api made without one: call"
            " register_async(api, app=app) in your app factory, before or after"
            " api.init_app(app), or make the Api with Api(app) or Api(blueprint)."
        )
    else:
        setup(app)
        _add_routes_to(api, app, routes)


#: Logged once per app without an owner callable, with the first request that
#: submits, polls or lists a task.
UNOWNED_WARNING = (
    "register_async: no owner callable, so task ids are bearer tokens: whoever"
    " learns a status URL can read that task's result and cancel it; {list}."
    " Pass register_async(api, owner=...) returning the caller's identity."
)
#: What :data:`UNOWNED_WARNING` says of the task list, without and with
#: ``RESTFUL_ASYNC_PUBLIC_LIST``.
_UNOWNED_LIST = (
    "the task list answers 404 (RESTFUL_ASYNC_PUBLIC_LIST = True would show every id to anyone)",
    "and RESTFUL_ASYNC_PUBLIC_LIST = True shows every id to anyone at the task list",
)


def _connect_metrics(app: Flask) -> None:
    """Connect the Prometheus metrics to ``app``'s signals, as ``RESTFUL_ASYNC_METRICS``
    says: on when prometheus-client is importable, unless False."""
    wanted = maybe_flag(
        app.config,
        "RESTFUL_ASYNC_METRICS",
        "None (on if prometheus-client is installed), True (required) or False (off)",
    )
    if wanted is False:
        return
    if wanted is None and importlib.util.find_spec("prometheus_client") is None:
        return
    from . import metrics  # an ImportError naming the extra, if it is missing

    metrics.connect(app)


Routes = list[tuple[type[Resource], tuple[str, ...], str]]


def _routes(url: str) -> Routes:
    """The resources register_async adds, with their rules and endpoint names."""
    # The catch-all also takes ids with slashes, and the rule that ends in a
    # slash the empty id, so that every malformed id gets the same JSON 404 instead
    # of the router's HTML one. The status URL itself comes first: the router finds
    # an id of one segment by it, which costs a poll half what the catch-all's rule
    # does (a pattern tried against the rest of the path).
    base = url[: -len(_TASK_ID_PART)]
    catch_all = base + f"/<{_CATCH_ALL_CONVERTER}:task_id>"
    status = (url, catch_all, base + "/") if base else (url, catch_all)
    return [
        (TaskStatusResource, status, STATUS_ENDPOINT),
        (TaskResultResource, (url + RESULT_SUFFIX,), RESULT_ENDPOINT),
        (TaskListResource, (base or "/",), LIST_ENDPOINT),
    ]


#: The endpoints of the task URLs (after a blueprint's name and its dot, if any).
_TASK_ENDPOINTS = frozenset((STATUS_ENDPOINT, RESULT_ENDPOINT, LIST_ENDPOINT))


def _no_store_at_task_urls(response: Response) -> Response:
    """``Cache-Control: no-store`` on every answer at a task URL that has no
    ``Cache-Control`` (CONTRACT section 4): also on those that Flask or the router
    give without the resources (``OPTIONS``, ``405``) and on errors that
    flask-restful renders. An ``after_request`` function of each app."""
    rule = request.url_rule
    if rule is None:
        if response.status_code != 405 or not _at_task_url():
            return response
    elif rule.endpoint.rpartition(".")[2] not in _TASK_ENDPOINTS:
        return response
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response


def _at_task_url() -> bool:
    """Whether the request's path is a task URL (one that answers ``GET``)."""
    adapter = current_app.create_url_adapter(request)
    if adapter is None:
        return False
    try:
        rule, _ = adapter.match(method="GET", return_rule=True)
    except HTTPException:
        return False
    return rule.endpoint.rpartition(".")[2] in _TASK_ENDPOINTS


def _add_routes_to(api: Api, app: Flask, routes: Routes) -> None:
    """Add ``routes`` to one app of an Api made without an app.

    flask-restful adds a resource to an app at once only while ``api.app`` is that
    app; otherwise it keeps it for the next ``api.init_app``, which for this app
    may have run already. Binding ``api.app`` for the call reuses flask-restful's
    own registration (prefix, ``Api(decorators=...)``, error handling), and leaves
    the Api unbound for the next app.
    """
    api.app = app
    try:
        for resource, rules, endpoint in routes:
            api.add_resource(resource, *rules, endpoint=endpoint)
    finally:
        api.app = None


# Which app each store or executor object given to register_async serves. Weak, so
# that registering keeps nothing alive; never released, so that the answer does not
# depend on when the garbage collector runs.
_CLAIMS: weakref.WeakKeyDictionary[object, weakref.ref[Flask]] = weakref.WeakKeyDictionary()


def _claim(shared: object, app: Flask) -> None:
    """Refuse to set up a second app with a store or executor object of another.

    Their threads, connections, lease and close() belong to one app: shared, the
    second app's config would not apply and closing one app would stop the other.
    """
    claimed = _CLAIMS.get(shared)
    if claimed is not None and claimed() is not app:
        kind = "store" if isinstance(shared, TaskStore) else "executor"
        raise RuntimeError(
            f"this {kind} object already serves another app; each app needs its own."
            f" Make the {kind} inside your app factory and pass it with"
            f" register_async(api, app=app, {kind}=...), or leave it to the config"
            " (RESTFUL_ASYNC_STORE, RESTFUL_ASYNC_MAX_WORKERS, ...), which every app"
            " reads for itself."
        )
    _CLAIMS[shared] = weakref.ref(app)


_SECONDS = "a number of seconds"
_BYTES = "a number of bytes"


def _make_state(
    app: Flask,
    api: Api,
    store: TaskStore | str | None,
    executor: Executor | None,
    owner: OwnerCallable | None,
    decorators: tuple[t.Callable[..., t.Any], ...],
    admin: AdminCallable | None = None,
    task_paths: t.Collection[str] = (),
) -> AsyncState:
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    config = app.config
    if admin is not None and not callable(admin):
        raise TypeError("admin must be a callable that returns True for an operator")
    dashboard = config["RESTFUL_ASYNC_DASHBOARD"]
    if dashboard:
        # Refused before anything is opened or started for the app.
        check_dashboard(app, dashboard, owner, admin, task_paths)
    # Read by every task as it starts, and by every stream: refused here rather
    # than in a worker or a request.
    number(config, "RESTFUL_ASYNC_PROGRESS_INTERVAL")
    number(config, "RESTFUL_ASYNC_MAX_STREAM", above=True)
    number(config, "RESTFUL_ASYNC_STREAM_KEEPALIVE", above=True)
    short_wait = number(config, "RESTFUL_ASYNC_SHORT_WAIT")
    if store is None or isinstance(store, str):
        store = open_store(store or config["RESTFUL_ASYNC_STORE"], app)
    store.configure(
        result_ttl=number(config, "RESTFUL_ASYNC_RESULT_TTL", above=True),
        tombstone_ttl=number(config, "RESTFUL_ASYNC_TOMBSTONE_TTL"),
        lease=number(config, "RESTFUL_ASYNC_LEASE", above=True),
        queued_ttl=number(config, "RESTFUL_ASYNC_QUEUED_TTL", above=True),
    )
    if flag(config, "RESTFUL_ASYNC_EAGER"):
        # In place of any executor given: tests need no worker, thread or broker.
        executor = EagerExecutor()
    elif executor is None:
        executor = ThreadExecutor(
            max_workers=whole(config, "RESTFUL_ASYNC_MAX_WORKERS", least=1),
            max_pending=whole(config, "RESTFUL_ASYNC_MAX_PENDING"),
            max_pending_bytes=whole(config, "RESTFUL_ASYNC_MAX_PENDING_BYTES", what=_BYTES),
            shutdown_timeout=number(config, "RESTFUL_ASYNC_SHUTDOWN_TIMEOUT"),
        )
    if not executor.local and not store.shared:
        raise ValueError(
            f"register_async: a {type(store).__name__} keeps its tasks in this process,"
            f" where the {type(executor).__name__}'s workers never see them (every task"
            " would stay queued). Use a store the workers share:"
            ' store="redis://127.0.0.1:6379/0", or a sqlite:/// file when the web'
            " processes and the workers all run on one host."
        )
    if owner is not None and not callable(owner):
        raise TypeError("owner must be a callable that returns the caller's identity")
    executor.bind(app)
    state = AsyncState(
        app=app,
        api=api,
        store=store,
        executor=executor,
        owner=owner,
        decorators=decorators,
        public_list=flag(config, "RESTFUL_ASYNC_PUBLIC_LIST"),
        status_resource=TaskStatusResource,
        retry_after=whole(config, "RESTFUL_ASYNC_RETRY_AFTER", what=_SECONDS),
        max_retry_after=whole(config, "RESTFUL_ASYNC_MAX_RETRY_AFTER", least=1, what=_SECONDS),
        result_redirect=flag(config, "RESTFUL_ASYNC_RESULT_REDIRECT"),
        max_wait=whole(config, "RESTFUL_ASYNC_MAX_WAIT", what=_SECONDS),
        max_body=whole(config, "RESTFUL_ASYNC_MAX_BODY", what=_BYTES),
        max_result=whole(config, "RESTFUL_ASYNC_MAX_RESULT", what=_BYTES),
        short_wait=short_wait,
        short_in_request=flag(config, "RESTFUL_ASYNC_SHORT_IN_REQUEST"),
        admin=admin,
        cross_site_delete=flag(config, "RESTFUL_ASYNC_CROSS_SITE_DELETE"),
    )
    if owner is None and not app.debug:
        # Told with the first request it concerns, not here: an app loaded by a
        # command (flask tasks, flask shell) serves no one and should not say it.
        state.unowned_warning = UNOWNED_WARNING.format(list=_UNOWNED_LIST[state.public_list])
    if dashboard:
        install_dashboard(app, dashboard)
    if state.lease is not None:
        # Tasks other processes could not run are taken over here: from the lease
        # keeper, which the first request of any kind starts (see takeover.py).
        state.takeover = Takeover(app, store, executor, state.lease)
        state.lease.on_renew = state.takeover.claim
        executor.on_done = state.takeover.done
        executor.hands_over = True
        app.before_request(state.lease.start)
    app.after_request(_no_store_at_task_urls)
    _connect_traces(state)
    # In a gunicorn worker (an app made there): its streams and long-polls end
    # as its graceful stop begins, not at its graceful timeout (see stopping.py).
    # In the master (--preload), the first wait, stream or task thread of each
    # worker does it.
    stopping.listen()
    return state


def _connect_traces(state: AsyncState) -> None:
    setting = maybe_flag(
        state.app.config,
        "RESTFUL_ASYNC_TRACES",
        "True (traces, or an error without opentelemetry-api), False (no traces) or None"
        " (traces when opentelemetry-api is installed)",
    )
    if setting is False:
        return
    try:
        from .traces import connect
    except ImportError:
        if setting is None:
            return  # on by default, and nothing to trace with
        raise
    connect(state)
