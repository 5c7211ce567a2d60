"""Run tasks in Celery workers: ``CeleryExecutor`` (and ``make_celery``).

Needs Celery with its Redis transport: ``pip install flask-restful-async[celery]``
(which brings ``celery[redis]``), and a store that every process shares:
``redis://``, or a ``sqlite:///`` file when the web processes and the workers all
run on one host. ``memory://`` is refused: the workers would never see its tasks.

Any Celery app works, made as Celery's or Flask's documentation makes it. The app
module builds the Flask app, the Celery app and the Api, and the workers import that
same module::

    celery_app = Celery(__name__, broker="redis://127.0.0.1:6379/1")

    app = Flask(__name__)
    api = Api(app)
    register_async(api, store="redis://127.0.0.1:6379/0", executor=CeleryExecutor(celery_app))

    # celery -A yourpackage.module:celery_app worker

Flask's ``celery_init_app`` (https://flask.palletsprojects.com/en/stable/patterns/celery/),
which keeps the Celery app in ``app.extensions["celery"]``, works as it is::

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["CELERY"] = {"broker_url": "redis://127.0.0.1:6379/1"}
        celery_app = celery_init_app(app)
        api = Api(app)
        register_async(api, store="redis://127.0.0.1:6379/0", executor=CeleryExecutor(celery_app))
        ...
        return app

    # make_celery.py, for `celery -A make_celery worker`:
    flask_app = create_app()
    celery_app = flask_app.extensions["celery"]

(``celery -A module`` takes a module attribute ``app`` for the Celery app: name the
Flask app anything else in that module, or give ``-A module:celery_app``.)

:func:`make_celery` is a shortcut that builds the Celery app from these config keys
of the Flask app:

``CELERY_BROKER_URL``
    The broker (``broker_url``); required.
``CELERY_RESULT_BACKEND``
    Celery's own result backend (``result_backend``); optional, this package does
    not use it: results live in the task store.
``CELERY_CONFIG``
    A dict of any other Celery settings, by their lowercase names.

and :class:`CeleryExecutor` reads these when it submits, however the Celery app
was made:

``CELERY_MAX_MESSAGE_BODY``
    Bytes (default :data:`DEFAULT_MAX_MESSAGE_BODY`, 256 KiB): a request body
    larger than this does not travel in the message but through the task store
    (see "Large bodies" below). ``None`` sends every body in the message.
``CELERY_LARGE_BODY_TTL``
    Seconds (default :data:`DEFAULT_LARGE_BODY_TTL`, a day) that such a body
    waits in the store for a worker; a task whose body expired first fails (500).

Design:

- The message. A submit sends one message: the Celery task :data:`TASK_NAME` with
  the arguments ``(task_id, snapshot_json, body_key)`` and the keyword argument
  ``flask_app``: the request as :meth:`RequestSnapshot.to_json` wrote it (strings
  only, so Celery's default JSON serializer carries it; with the task's carrier,
  such as the submitting request's trace context, see
  :mod:`flask_restful_async.traces`), ``None`` unless the body
  went through the store (see "Large bodies"), and the Flask app's ``name``. The
  Celery task id is the store's task id. Nothing else of the request crosses: the
  worker rebuilds the resource through the endpoint's view function (``run_task``
  with ``resource=None``). Only the worker imports
  :mod:`flask_restful_async.runner`; a web process that submits never loads it.
- The app. ``register_async`` binds its Flask app to the Celery app
  (:meth:`CeleryExecutor.bind`) in every process that runs it: the web processes
  and the workers, which imported the same module. A worker runs each task in the
  bound app that the message names (the last one bound, when one process made
  several apps of one name, as test suites do), or else in the only app bound.
- Failures before the handler. A task ends ``failed`` (500 JSON at its status URL,
  the error logged with the task id through ``app.logger``) when its snapshot does
  not decode, when the store keeps failing (lease, body) for about a minute
  (``LEASE_RETRIES * LEASE_RETRY_DELAY`` s, tried again in the worker: a message
  sent back to a broker that is down too would be dropped), or when anything else
  fails before the handler runs. A worker that has no app for a message cannot reach
  the task's store (only the app knows it), so it cannot end the task: it logs an
  error that says how to fix the worker and sends the message back to the broker (a
  Celery retry, 1, 2, 4, then every :data:`APP_RETRY_DELAY` seconds, at most
  :data:`APP_RETRIES` times: about five minutes), so that a worker that has the app
  (another one, or this one fixed and restarted) runs it. Acknowledging the message
  would lose the task silently; requeueing it at once would hand it straight back. A
  task whose retries run out stays ``queued`` until ``RESTFUL_ASYNC_QUEUED_TTL``
  reads it ``lost``. A message for a task its store does not know is dropped with an
  error that says that the web process and the worker do not share the store.
- The lease. A worker process that runs tasks holds a lease in the store, renewed
  by a :class:`LeaseKeeper` (one per Flask app and process, started by the first
  task): a worker that dies has its running tasks read as ``lost`` within the
  lease. Queued tasks (still in the broker) belong to no process and never read
  as lost.
- Acknowledgement: ``acks_late=True`` with ``reject_on_worker_lost=False``. A
  message is acknowledged once its task has run (succeeded or failed), so a
  message that a worker took but never started (prefetched when the worker was
  stopped) goes back to the queue. If the process running a task dies (a prefork
  child killed, OOM), the message is acknowledged all the same and the task is
  not run again: it already reads ``running`` under that process's name, and the
  lease, no longer renewed, makes it ``lost``. Running it again could repeat side
  effects the first run made, which the client cannot tell happened. When a whole
  worker dies, the broker may still deliver its unacknowledged message again
  (AMQP at once, Redis after its visibility timeout): the store then refuses to
  start the task, no longer ``queued``, and the message is dropped. So a task
  runs at most once.
- Large bodies. A body above ``CELERY_MAX_MESSAGE_BODY`` is put in the task
  store (:meth:`TaskStore.put_blob`, under the task id) and the message carries
  an empty body and that reference, as a third argument; the worker takes the
  body back (:meth:`TaskStore.take_blob`, which deletes it) before running the
  task. Brokers handle small messages best (Redis keeps them in memory, and
  Celery's JSON would carry the body base64-encoded, a third larger).
- Cancelling. The status URL's ``DELETE`` cancels a queued task in the store,
  which is what keeps it from running: the worker refuses to start a task that
  is no longer ``queued``. :meth:`CeleryExecutor.cancel` also revokes its
  message (``control.revoke``), best effort: a worker that listens to remote
  control then drops the message without even looking at the store.
- Failure to publish, whatever the cause (broker down, full, misconfigured),
  answers 503 with ``Retry-After`` and a message that says nothing of the broker;
  the detail goes to ``app.logger``. The task the store had just recorded is
  deleted, so no half-submitted task remains.
- A broker that stops answering without closing its connections (a process
  stopped, a host gone behind NAT) would hold a submit until it answers again:
  kombu's Redis transport waits for a reply without a time limit unless
  ``socket_timeout`` is set. Submits publish through producers of their own: a
  submit waits up to ``publish_timeout`` seconds (:data:`PUBLISH_TIMEOUT` by
  default) for a free one, and their Redis connections wait as long for the
  broker (unless ``broker_transport_options`` sets ``socket_timeout``), without
  trying again (unless ``task_publish_retry_policy`` was changed): a 503 within
  that time, or twice that where more submits than the pool's connections
  (``broker_pool_limit``) wait at once. (AMQP: a connection opens within Celery's
  ``broker_connection_timeout``, 4 s by default.) The workers' own connections
  are left as the Celery app configures them: there a lost connection makes kombu
  restore the unacknowledged messages, where a broker that stopped for a while
  and came back only paused them. A message the silent broker had received
  before the submit gave up reaches a worker once the broker answers again: its
  task was taken back, so the worker finds no task and drops it (logged as a
  store it does not share).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
import typing as t
import weakref

try:
    from celery import Celery  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "flask_restful_async.celery needs Celery: pip install flask-restful-async[celery]"
    ) from e

from . import outbox, signals, waiting
from .exceptions import RestfulAsyncError, Unavailable
from .executors.base import Executor
from .lease import LeaseKeeper
from .responses import served_headers
from .snapshot import RequestSnapshot
from .state import get_state
from .task import StoredResponse, TaskState

if t.TYPE_CHECKING:
    from flask import Flask
    from flask_restful import Resource

    from .task import Task

__all__ = [
    "DEFAULT_LARGE_BODY_TTL",
    "DEFAULT_MAX_MESSAGE_BODY",
    "TASK_NAME",
    "BrokerUnavailable",
    "CeleryExecutor",
    "make_celery",
]

#: The name of the Celery task that runs a submitted task in a worker.
TASK_NAME = "flask_restful_async.run"

#: A task whose worker cannot get it ready (the store does not serve its lease or
#: its body) is tried again for ``LEASE_RETRIES * LEASE_RETRY_DELAY`` seconds, in
#: the worker, then fails.
LEASE_RETRY_DELAY = 2
LEASE_RETRIES = 30

#: The longest wait (seconds) between tries of a message that a worker has no
#: Flask app for (1, 2, 4, then this), and how many retries before it gives up.
APP_RETRY_DELAY = 5
APP_RETRIES = 60

#: Bytes of request body above which the body goes through the task store rather
#: than in the message (``CELERY_MAX_MESSAGE_BODY``).
DEFAULT_MAX_MESSAGE_BODY = 256 * 1024
#: Seconds a body put in the store waits for its worker (``CELERY_LARGE_BODY_TTL``).
DEFAULT_LARGE_BODY_TTL = 24 * 3600.0

#: Seconds a submit waits for a free producer, and for a Redis broker to connect
#: and to answer (kombu's ``socket_timeout`` and ``socket_connect_timeout`` on the
#: connections submits publish through, unless ``broker_transport_options`` sets
#: them): the default of ``CeleryExecutor(publish_timeout=...)``.
PUBLISH_TIMEOUT = 2.0
#: How a submit tries its message again (unless the Celery app changed Celery's
#: ``task_publish_retry_policy``, three more tries): not at all, so that a broker
#: that does not answer costs it ``PUBLISH_TIMEOUT`` seconds before its 503, not
#: four times that and more. A pooled connection that a broker restarted since has
#: closed is opened again by the Redis client itself, without a retry.
PUBLISH_RETRY_POLICY: dict[str, float] = {"max_retries": 0}

_JSON = served_headers([("Content-Type", "application/json")])
#: Where a task that failed before its handler ran ends.
_NOT_STARTED = StoredResponse(500, _JSON, b'{"message": "Internal Server Error"}\n')
#: Where the task of a large body that the worker could not find back ends.
_BODY_LOST = StoredResponse(
    500, _JSON, b'{"message": "The request body of this task was lost before it could run."}\n'
)

# For what happens where no Flask app (and so no app.logger) is known.
_logger = logging.getLogger(__name__)


class BrokerUnavailable(Unavailable):
    """The broker did not take the task's message: the submit answers 503 with
    ``Retry-After``, and the task is removed from the store again."""


def make_celery(flask_app: Flask, name: str | None = None) -> Celery:
    """A Celery app configured from ``flask_app.config``.

    See the module documentation for the config keys. The Flask app is also kept
    as ``celery_app.flask_app``, for your own tasks; this package's tasks find it
    through ``register_async``, as for any Celery app.
    """
    config = flask_app.config
    broker = config.get("CELERY_BROKER_URL")
    if not broker:
        raise ValueError("make_celery needs CELERY_BROKER_URL in the Flask app's config")
    celery_app = Celery(name or flask_app.import_name)
    settings: dict[str, t.Any] = {
        "broker_url": broker,
        # Keep retrying a lost broker connection at startup as at any other time
        # (also Celery 6's default; saying so silences Celery 5's warning).
        "broker_connection_retry_on_startup": True,
    }
    if config.get("CELERY_RESULT_BACKEND"):
        settings["result_backend"] = config["CELERY_RESULT_BACKEND"]
    settings.update(config.get("CELERY_CONFIG") or {})
    celery_app.conf.update(settings)
    celery_app.flask_app = flask_app
    return celery_app


class CeleryExecutor(Executor):
    """Hands each task to a Celery worker: one message to :data:`TASK_NAME`.

    ``celery_app`` is any Celery app (``Celery(__name__, broker=...)``, Flask's
    ``celery_init_app``, :func:`make_celery`); ``queue`` is the queue the
    messages go to (Celery's default routing without one). The constructor
    registers the Celery task on ``celery_app`` (once, however many executors
    share it); ``register_async`` binds each Flask app to it. Tasks never run in
    the submitting process, so it holds no lease and no backlog: the broker is the
    queue.
    """

    local = False

    def __init__(
        self,
        celery_app: Celery,
        *,
        queue: str | None = None,
        publish_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        if not publish_timeout > 0:
            raise ValueError(f"publish_timeout must be above 0, not {publish_timeout!r}")
        self.celery_app = celery_app
        self.queue = queue
        self.publish_timeout = publish_timeout
        self._task = _register(celery_app)
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        # Made at the first submit of a process, once the Celery app's config is
        # final (see _producers).
        self._publishing: tuple[int, t.Any, dict[str, t.Any]] | None = None
        self._publishing_lock = threading.Lock()
        _executors.add(self)

    def bind(self, app: Flask) -> None:
        """Let this process's workers find ``app`` for the messages that name it."""
        _bind(self.celery_app, app)
        self._apps.add(app)

    def shutdown(self, timeout: float | None = None) -> None:
        """Release the leases this process holds for this executor's apps (a worker
        process that ran their tasks), and stop renewing them."""
        for app in list(self._apps):
            with _keepers_lock:
                keeper = _keepers.pop(app, None)
            if keeper is not None:
                keeper.release()
        publishing, self._publishing = self._publishing, None
        if publishing is not None and publishing[0] == os.getpid():
            publishing[1].connections.force_close_all()

    def _producers(self) -> tuple[t.Any, dict[str, t.Any]]:
        """The pool of producers submits publish through in this process, and the
        publish options they add (see "A broker that stops answering" above)."""
        publishing = self._publishing
        if publishing is None or publishing[0] != os.getpid():
            with self._publishing_lock:
                publishing = self._publishing
                if publishing is None or publishing[0] != os.getpid():
                    # A forked child leaves its parent's connections alone.
                    made = _publishing(self.celery_app, self.publish_timeout)
                    publishing = self._publishing = (os.getpid(), *made)
        return publishing[1], publishing[2]

    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        options: dict[str, t.Any] = {"task_id": task.id, "kwargs": {"flask_app": app.name}}
        if self.queue is not None:
            options["queue"] = self.queue
        limit = app.config.get("CELERY_MAX_MESSAGE_BODY", DEFAULT_MAX_MESSAGE_BODY)
        body_key: str | None = None
        try:
            if limit is not None and len(snapshot.body) > limit:
                ttl = app.config.get("CELERY_LARGE_BODY_TTL", DEFAULT_LARGE_BODY_TTL)
                body_key = task.id
                get_state(app).store.put_blob(body_key, snapshot.body, float(ttl))
                snapshot = dataclasses.replace(snapshot, body=b"")
            message = snapshot.to_json()
        except Exception:
            # Not an Unavailable: the submit does not take the task back itself.
            outbox.withdraw(get_state(app).store, task.id, app.logger)
            if body_key is not None:
                _drop_body(app, body_key, "unsent")
            raise
        try:
            producers, publish_options = self._producers()
            with producers.acquire(block=True, timeout=self.publish_timeout) as producer:
                self._task.apply_async(
                    args=(task.id, message, body_key),
                    producer=producer,
                    **publish_options,
                    **options,
                )
        except Exception as e:
            # Whatever kept the message from the broker (down, full, a transport
            # that is not installed), the client can only try again later; where
            # the broker is and what it said is for the log alone. The submit
            # takes the task back (see Executor.submit); its body goes here.
            if body_key is not None:
                _drop_body(app, body_key, "unsent")
            app.logger.error(
                "Could not send task %s to the broker: %r", task.id, e, extra={"task_id": task.id}
            )
            raise BrokerUnavailable("The task queue is not available; try again later.") from e

    def cancel(self, app: Flask, task_id: str) -> None:
        """Revoke the message of a cancelled queued task (``control.revoke``).

        Best effort: errors are logged, never raised, and a broker that does not
        answer is given up on after one quick retry.
        """
        # A large body waits in the store for a worker that will not take it now
        # (a revoked message is dropped unseen): it goes now.
        _drop_body(app, task_id, "cancelled")
        try:
            with self.celery_app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
                self.celery_app.control.revoke(task_id, connection=connection)
        except Exception as e:
            app.logger.warning(
                "Could not revoke the message of task %s: %r",
                task_id,
                e,
                extra={"task_id": task_id},
            )


def _publishing(celery_app: Celery, timeout: float) -> tuple[t.Any, dict[str, t.Any]]:
    """A pool of producers on connections of their own (see
    :meth:`CeleryExecutor._producers`), and the publish options of a submit."""
    from celery.app.defaults import DEFAULTS  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from kombu.pools import ProducerPool  # type: ignore[import-untyped,import-not-found,unused-ignore]

    conf = celery_app.conf
    transport_options = dict(conf.broker_transport_options or {})
    connection = celery_app.connection_for_write()
    options: dict[str, t.Any] = {}
    # Redis only: an AMQP publish is a write to the socket that waits for no
    # reply, and py-amqp does not reopen a connection the broker closed.
    if connection.transport.driver_type == "redis":
        transport_options.setdefault("socket_timeout", timeout)
        transport_options.setdefault("socket_connect_timeout", timeout)
        connection = celery_app.connection_for_write(transport_options=transport_options)
        if conf.task_publish_retry_policy == DEFAULTS["task_publish_retry_policy"]:
            options["retry_policy"] = dict(PUBLISH_RETRY_POLICY)
    limit = conf.broker_pool_limit
    producers = ProducerPool(  # type: ignore[no-untyped-call,unused-ignore]
        connection.Pool(limit=limit), limit=limit, Producer=celery_app.amqp.Producer
    )
    return producers, options


#: Every executor of this process: a forked child makes the lock of their
#: producer pools anew (a thread of the parent may have held it at the fork).
_executors: weakref.WeakSet[CeleryExecutor] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for executor in list(_executors):
        executor._publishing_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _drop_body(app: Flask, task_id: str, what: str) -> None:
    """Delete the large body kept for task ``task_id`` (its blob key is the id),
    which no worker will take; best effort: it lapses with its own TTL
    (``CELERY_LARGE_BODY_TTL``) otherwise."""
    try:
        get_state(app).store.take_blob(task_id)
    except Exception:
        app.logger.warning(
            "Could not delete the body of %s task %s",
            what,
            task_id,
            exc_info=True,
            extra={"task_id": task_id},
        )


# -- which Flask app a message is for ------------------------------------------------

# The Flask apps bound to each Celery app in this process, oldest first. Weak both
# ways: a test suite makes and drops many apps.
_bound: weakref.WeakKeyDictionary[Celery, list[weakref.ref[Flask]]] = weakref.WeakKeyDictionary()
_bound_lock = threading.Lock()


def _bind(celery_app: Celery, flask_app: Flask) -> None:
    with _bound_lock:
        refs = [ref for ref in _bound.get(celery_app, ()) if ref() not in (None, flask_app)]
        refs.append(weakref.ref(flask_app))
        _bound[celery_app] = refs


def _bound_apps(celery_app: Celery) -> list[Flask]:
    with _bound_lock:
        return [app for ref in _bound.get(celery_app, ()) if (app := ref()) is not None]


def _find_app(celery_app: Celery, name: str | None) -> Flask | None:
    """The bound Flask app named ``name`` (the last bound of that name), else the
    only app bound, else None."""
    apps = _bound_apps(celery_app)
    named = [app for app in apps if app.name == name]
    if named:
        return named[-1]
    return apps[0] if len(apps) == 1 else None


def _no_app_message(celery_app: Celery, task_id: str, name: str | None) -> str:
    bound = ", ".join(repr(app.name) for app in _bound_apps(celery_app)) or "none"
    return (
        f"Task {task_id} is for the Flask app {name!r}, and this worker has no such app"
        f" bound to the Celery app {celery_app.main!r} (bound: {bound}). The module the"
        " worker imports (celery -A ...) must build the Flask app and call"
        " register_async(api, executor=CeleryExecutor(celery_app)) for it, as the web"
        " process does."
    )


# -- the worker side -----------------------------------------------------------------

_keepers: weakref.WeakKeyDictionary[Flask, LeaseKeeper] = weakref.WeakKeyDictionary()
_keepers_lock = threading.Lock()


def _lease(flask_app: Flask) -> None:
    """Make sure this process holds a lease in ``flask_app``'s store (one keeper per app)."""
    with _keepers_lock:
        keeper = _keepers.get(flask_app)
        if keeper is None:
            keeper = _keepers[flask_app] = LeaseKeeper(flask_app, get_state(flask_app).store)
    keeper.ensure()


class _StoreGaveUp(Exception):
    """The store did not serve a task's preparation within the retry bound."""


def _prepare(
    flask_app: Flask, task_id: str, snapshot_json: str, body_key: str | None
) -> RequestSnapshot | None:
    """The snapshot to run, with its body; None when the task must not run (it
    was ended here).

    The store's part (this process's lease, the large body) is tried again here,
    with backoff, for about ``LEASE_RETRIES * LEASE_RETRY_DELAY`` seconds, through
    an outage or an error reply that may pass (Redis out of memory, busy): not by
    sending the message back to the broker, which may be down too (a broker on the
    same Redis), when Celery drops it. Raises :class:`_StoreGaveUp` past the bound.
    """
    snapshot = RequestSnapshot.from_json(snapshot_json)
    store = get_state(flask_app).store
    call = secrets.token_hex(8)  # the same take, tried again, finds its copy
    deadline = time.monotonic() + LEASE_RETRIES * LEASE_RETRY_DELAY
    backoff = outbox.Backoff()
    told = False
    while True:
        try:
            _lease(flask_app)
            if body_key is None:
                return snapshot
            body = store.take_blob(body_key, call=call)
            break
        except Exception as e:
            if time.monotonic() >= deadline:
                raise _StoreGaveUp(
                    f"the store did not serve it for {LEASE_RETRIES * LEASE_RETRY_DELAY} s: {e!r}"
                ) from e
            if not told:
                told = True
                flask_app.logger.warning(
                    "Task %s cannot start yet, trying again: %r",
                    task_id,
                    e,
                    extra={"task_id": task_id},
                )
        backoff.sleep()
    if body is None:
        flask_app.logger.error(
            "The request body of task %s is no longer in the store",
            task_id,
            extra={"task_id": task_id},
        )
        _end_queued(flask_app, task_id, _BODY_LOST)
        return None
    return dataclasses.replace(snapshot, body=body)


def _check_known(flask_app: Flask, task_id: str) -> None:
    """A task did not start: say so if the reason is that this worker's store does
    not know it (read only then, not for every task)."""
    try:
        unknown = get_state(flask_app).store.get(task_id) is None
    except RestfulAsyncError:
        return  # the runner has logged why the store did not answer
    if unknown:
        flask_app.logger.error(
            "Task %s is not in this worker's task store: the web process that accepted"
            " it and this worker do not share the store (a sqlite:/// store works only"
            " when both run on one host and use the same file; use redis:// otherwise),"
            " or the task was deleted before it ran. The message is dropped.",
            task_id,
            extra={"task_id": task_id},
        )


def _fail(flask_app: Flask, task_id: str, reason: str) -> None:
    """A task failed before its handler ran: log why, end it ``failed`` (500)."""
    flask_app.logger.error(
        "Task %s failed before its handler ran: %s",
        task_id,
        reason,
        exc_info=True,
        extra={"task_id": task_id},
    )
    _end_queued(flask_app, task_id, _NOT_STARTED)


def _end_queued(flask_app: Flask, task_id: str, response: StoredResponse) -> None:
    """End a task that never started as ``failed`` with ``response``."""
    store = get_state(flask_app).store
    try:
        task = store.get(task_id)
        # Only a task still queued: one that another worker started (and died
        # running) stays as it reads, lost; a cancelled one stays cancelled.
        if task is not None and task.state is TaskState.QUEUED:
            store.finish(task_id, TaskState.FAILED, response)
            waiting.notify(store, task_id)
            if signals.task_finished.receivers:
                ended = dataclasses.replace(
                    task, state=TaskState.FAILED, finished_at=time.time(), response=response
                )
                signals.send(signals.task_finished, flask_app, task=ended)
    except Exception:
        # The store does not answer, or refuses (out of memory): the outbox
        # writes the end once it takes it (it ends only a task still active).
        flask_app.logger.warning(
            "Could not mark task %s as failed now; it is written once the store takes it",
            task_id,
            exc_info=True,
            extra={"task_id": task_id},
        )
        outbox.finish(store, task_id, TaskState.FAILED, response, None, flask_app.logger)


def _register(celery_app: Celery) -> t.Any:
    """The Celery task :data:`TASK_NAME` of ``celery_app``, registered once."""
    registered = celery_app.tasks.get(TASK_NAME)
    if registered is not None:
        return registered

    @celery_app.task(  # type: ignore[untyped-decorator,misc,unused-ignore]
        name=TASK_NAME,
        bind=True,
        # Not added to every Celery app made later (Celery's default): this task
        # finds its Flask apps through the Celery app it was registered on.
        shared=False,
        acks_late=True,
        reject_on_worker_lost=False,
        ignore_result=True,
    )
    def run(
        self: t.Any,
        task_id: str,
        snapshot_json: str,
        body_key: str | None = None,
        flask_app: str | None = None,
    ) -> None:
        # Only a worker gets here: the web processes, which import this module to
        # submit, never load the code that runs handlers.
        from .runner import run_task

        app = _find_app(celery_app, flask_app)
        if app is None:
            message = _no_app_message(celery_app, task_id, flask_app)
            if self.request.retries >= APP_RETRIES:
                _logger.error(
                    "%s Gave the task up after %d tries.",
                    message,
                    APP_RETRIES + 1,
                    extra={"task_id": task_id},
                )
                return
            delay = min(APP_RETRY_DELAY, 2**self.request.retries)
            _logger.error(
                "%s The message goes back to the broker for %d s.",
                message,
                delay,
                extra={"task_id": task_id},
            )
            raise self.retry(countdown=delay, max_retries=APP_RETRIES)
        try:
            snapshot = _prepare(app, task_id, snapshot_json, body_key)
        except _StoreGaveUp as e:
            _fail(app, task_id, str(e))
            return
        except Exception as e:
            _fail(app, task_id, repr(e))
            return
        if snapshot is None:
            return
        # Before each try of the start: the lease is live in the store (see
        # LeaseKeeper.ensure), as the preparation left it or renewed again.
        keeper = _keepers.get(app)
        before = None if keeper is None else keeper.ensure
        if not run_task(app, task_id, snapshot, resource=None, before_start=before):
            _check_known(app, task_id)

    return run
