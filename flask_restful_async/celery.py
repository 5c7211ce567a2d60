"""Run tasks in Celery workers: ``CeleryExecutor`` and ``make_celery``.

Needs Celery: ``pip install flask-restful-async[celery]``, and a store that every
process shares (``redis://``; SQLite only when the workers are on the same host).

The app module builds both apps, and the workers import that same module::

    app = Flask(__name__)
    app.config["CELERY_BROKER_URL"] = "redis://127.0.0.1:6379/1"
    celery = make_celery(app)                      # the Celery app, bound to ``app``
    api = Api(app)
    register_async(api, store="redis://127.0.0.1:6379/0", executor=CeleryExecutor(celery))

    # celery -A yourapp.module worker -Q <queue>

(Name the Flask app anything but ``app`` in that module, or give ``-A module:celery``:
``celery -A module`` takes a module attribute ``app`` for the Celery app.)

``make_celery`` reads these config keys of the Flask app:

``CELERY_BROKER_URL``
    The broker (``broker_url``); required.
``CELERY_RESULT_BACKEND``
    Celery's own result backend (``result_backend``); optional, this package does
    not use it: results live in the task store.
``CELERY_CONFIG``
    A dict of any other Celery settings, by their lowercase names.

and :class:`CeleryExecutor` reads these when it submits:

``CELERY_MAX_MESSAGE_BODY``
    Bytes (default :data:`DEFAULT_MAX_MESSAGE_BODY`, 256 KiB): a request body
    larger than this does not travel in the message but through the task store
    (see "Large bodies" below). ``None`` sends every body in the message.
``CELERY_LARGE_BODY_TTL``
    Seconds (default :data:`DEFAULT_LARGE_BODY_TTL`, a day) that such a body
    waits in the store for a worker; a task whose body expired first fails (500).

Design:

- The message. A submit sends one message: the Celery task :data:`TASK_NAME` with
  the arguments ``(task_id, snapshot_json, body_key)``: the request as
  :meth:`RequestSnapshot.to_json` wrote it (strings only, so Celery's default JSON
  serializer carries it), and ``None`` unless the body went through the store
  (see "Large bodies"). The Celery task id is the store's task id. Nothing else
  of the request crosses: the worker rebuilds the resource through the endpoint's
  view function (``run_task`` with ``resource=None``). Only the worker imports
  :mod:`flask_restful_async.runner`; a web process that submits never loads it.
- The app. ``make_celery`` stores the Flask app on the Celery app
  (``celery_app.flask_app``); the worker, which imported the app module, finds it
  there. No request ever ran in the worker, so nothing else could tell it.
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
- Failure to publish (broker down) answers 503 with ``Retry-After``: the task the
  store had just recorded is deleted, so no half-submitted task remains.
"""

from __future__ import annotations

import dataclasses
import threading
import typing as t
import weakref

try:
    from celery import Celery  # type: ignore[import-untyped,import-not-found,unused-ignore]
    from kombu.exceptions import (  # type: ignore[import-untyped,import-not-found,unused-ignore]
        OperationalError,
    )
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "flask_restful_async.celery needs Celery: pip install flask-restful-async[celery]"
    ) from e

from . import waiting
from .exceptions import RestfulAsyncError, StoreUnavailable, Unavailable
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

#: Seconds between retries of a task whose worker could not take its lease (the
#: store did not answer), and how many retries before the message is dropped.
LEASE_RETRY_DELAY = 2
LEASE_RETRIES = 30

#: Bytes of request body above which the body goes through the task store rather
#: than in the message (``CELERY_MAX_MESSAGE_BODY``).
DEFAULT_MAX_MESSAGE_BODY = 256 * 1024
#: Seconds a body put in the store waits for its worker (``CELERY_LARGE_BODY_TTL``).
DEFAULT_LARGE_BODY_TTL = 24 * 3600.0

#: Where the task of a large body that the worker could not find back ends.
_BODY_LOST = StoredResponse(
    500,
    served_headers([("Content-Type", "application/json")]),
    b'{"message": "The request body of this task was lost before it could run."}\n',
)


class BrokerUnavailable(Unavailable):
    """The broker did not take the task's message: the submit answers 503 with
    ``Retry-After``, and the task is removed from the store again."""


def make_celery(flask_app: Flask, name: str | None = None) -> Celery:
    """A Celery app configured from ``flask_app.config`` and bound to ``flask_app``.

    See the module documentation for the config keys. The worker runs each task
    in the Flask app stored as ``celery_app.flask_app``.
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

    ``queue`` is the queue the messages go to (Celery's default routing
    without one). The constructor registers the Celery task on ``celery_app``,
    which must come from :func:`make_celery` (or carry the Flask app as
    ``celery_app.flask_app``). Tasks never run in the submitting process, so it
    holds no lease and no backlog: the broker is the queue.
    """

    local = False

    def __init__(self, celery_app: Celery, *, queue: str | None = None) -> None:
        self.celery_app = celery_app
        self.queue = queue
        self._task = _register(celery_app)
        self._errors: tuple[type[BaseException], ...] | None = None

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        if self._errors is None:
            # The transport's own (redis-py's, py-amqp's) besides kombu's: no
            # connection is made to learn them.
            with self.celery_app.connection_for_write() as connection:
                transport_errors = tuple(connection.connection_errors)
            self._errors = (OperationalError, OSError, *transport_errors)
        return self._errors

    def submit(
        self,
        app: Flask,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource | None = None,
    ) -> None:
        options: dict[str, t.Any] = {"task_id": task.id}
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
            self._task.apply_async(args=(task.id, snapshot.to_json(), body_key), **options)
        except Exception as e:
            _forget(app, task.id, body_key)
            if isinstance(e, self._connection_errors()):
                app.logger.warning("Could not send task %s to the broker: %r", task.id, e)
                raise BrokerUnavailable("The task queue is not available; try again later.") from e
            raise

    def cancel(self, app: Flask, task_id: str) -> None:
        """Revoke the message of a cancelled queued task (``control.revoke``).

        Best effort: errors are logged, never raised, and a broker that does not
        answer is given up on after one quick retry.
        """
        try:
            with self.celery_app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
                self.celery_app.control.revoke(task_id, connection=connection)
        except Exception as e:
            app.logger.warning("Could not revoke the message of task %s: %r", task_id, e)


def _forget(app: Flask, task_id: str, body_key: str | None = None) -> None:
    """Delete a recorded task that was not sent: no half-submitted task is left."""
    store = get_state(app).store
    try:
        store.delete(task_id)
        if body_key is not None:
            store.take_blob(body_key)
    except RestfulAsyncError:
        app.logger.warning("Could not delete unsent task %s", task_id, exc_info=True)


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


def _bound_app(celery_app: Celery) -> Flask:
    flask_app = getattr(celery_app, "flask_app", None)
    if flask_app is None:
        raise RuntimeError(
            f"the Celery app {celery_app.main!r} has no Flask app: make it with"
            " flask_restful_async.celery.make_celery(flask_app)"
        )
    return t.cast("Flask", flask_app)


def _body_lost(flask_app: Flask, task_id: str) -> None:
    """The body of a queued task expired (or was taken) before a worker ran it."""
    flask_app.logger.error("The request body of task %s is no longer in the store", task_id)
    store = get_state(flask_app).store
    try:
        task = store.get(task_id)
        # Only a task still queued: one that another worker started (and died
        # running) stays as it reads, lost; a cancelled one stays cancelled.
        if task is not None and task.state is TaskState.QUEUED:
            store.finish(task_id, TaskState.FAILED, _BODY_LOST)
            waiting.notify(store, task_id)
    except RestfulAsyncError:
        flask_app.logger.warning("Could not mark task %s as failed", task_id, exc_info=True)


def _register(celery_app: Celery) -> t.Any:
    """The Celery task :data:`TASK_NAME` of ``celery_app``, registered once."""

    @celery_app.task(  # type: ignore[untyped-decorator,misc,unused-ignore]
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=False,
        ignore_result=True,
    )
    def run(self: t.Any, task_id: str, snapshot_json: str, body_key: str | None = None) -> None:
        # Only a worker gets here: the web processes, which import this module to
        # submit, never load the code that runs handlers.
        from .runner import run_task

        flask_app = _bound_app(celery_app)
        snapshot = RequestSnapshot.from_json(snapshot_json)
        store = get_state(flask_app).store
        try:
            _lease(flask_app)
            body = None if body_key is None else store.take_blob(body_key)
        except StoreUnavailable as e:
            # Without a lease the task would read as lost at once (and without its
            # body it cannot run): try again later (the task is still queued).
            flask_app.logger.warning("Task %s cannot start yet: %s", task_id, e.message)
            raise self.retry(countdown=LEASE_RETRY_DELAY, max_retries=LEASE_RETRIES) from e
        if body_key is not None:
            if body is None:
                _body_lost(flask_app, task_id)
                return
            snapshot = dataclasses.replace(snapshot, body=body)
        run_task(flask_app, task_id, snapshot, resource=None)

    return run
