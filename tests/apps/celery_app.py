"""An app whose tasks run in Celery workers, for ``tests/test_celery.py``.

Broker and task store are Redis database :data:`REDIS_DB` on 127.0.0.1:6379. Every
key the app makes (the store's and the broker's, through kombu's
``global_keyprefix``) starts with the prefix from ``CELERY_TEST_PREFIX``; tasks go
to the queue named by ``CELERY_TEST_QUEUE``; ``CELERY_TEST_LEASE`` (seconds), if
set, is the store's lease; ``CELERY_TEST_BROKER``, if set, the broker URL (Redis
db :data:`REDIS_DB` otherwise); ``CELERY_TEST_REMOTE_CONTROL=1`` makes a worker
listen to remote control (``revoke``, ``inspect``). ``CELERY_TEST_WIRING`` says how
the Celery app is made (:data:`WIRINGS`; ``plain`` by default): ``plain`` is
``Celery(__name__, broker=...)``, ``init_app`` Flask's documented
``celery_init_app``, ``make_celery`` this package's; ``unbound`` makes a worker
whose module builds the Celery app and the executor but no Flask app (a
misconfigured worker). ``CELERY_TEST_SIGNALS``, if set, is a file to which the
app's receivers of ``task_started``, ``task_progress`` and ``task_finished``
append one JSON line per signal (its name, the task's id, state, method and path,
the sender's name and the pid that sent it). ``CELERY_TEST_TRACES``, if set, is
a file to which the worker process exports every span it ends, one JSON line each
(:func:`export_spans`: OpenTelemetry's SDK, set up when the module builds its app).
A worker::

    CELERY_TEST_PREFIX='{p}:' CELERY_TEST_QUEUE=q \\
        celery -A tests.apps.celery_app worker -P threads -c 4 -Q q

``POST /echo`` (an :class:`AsyncResource`) returns ``{"body": <body as text>,
"header": <X-Echo>, "args": <query args, lists>, "pid": <pid>}``. With
``?steps=N`` it first reports progress N times, ``?step=S`` seconds apart; with
``?fail=CODE`` it aborts with that HTTP status instead. ``?mark=NAME`` first
sets the Redis key ``<prefix>ran:NAME`` (so a test can tell that it ran);
``?hold=NAME`` then waits (at most :data:`HOLD_TIMEOUT` seconds) until the test
pushes to the Redis list ``<prefix>release:NAME``; ``?digest=1`` answers the
body's ``sha256`` and ``length`` instead of the body.

``GET /probe`` (a plain ``Resource``) tells what the process that answers has
done: its pid, how many times ``Echo.post`` ran in it, and which modules of
``flask_restful_async`` it has imported.

The module's ``celery`` (what ``celery -A`` finds) and ``flask_app`` are built on
first access, from the environment; a test builds its own with :func:`create_app`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import typing as t

import redis
from celery import Celery, Task
from flask import Flask, current_app, request
from flask_restful import Api, Resource, abort

from flask_restful_async import (
    AsyncResource,
    current_task,
    register_async,
    task_finished,
    task_progress,
    task_started,
)
from flask_restful_async.celery import CeleryExecutor, make_celery
from flask_restful_async.stores.redis import RedisStore
from flask_restful_async.task import Task as TaskRecord

REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX_ENV = "CELERY_TEST_PREFIX"
QUEUE_ENV = "CELERY_TEST_QUEUE"
#: Seconds of the store's lease (``RESTFUL_ASYNC_LEASE``), if set.
LEASE_ENV = "CELERY_TEST_LEASE"
BROKER_ENV = "CELERY_TEST_BROKER"
REMOTE_CONTROL_ENV = "CELERY_TEST_REMOTE_CONTROL"
WIRING_ENV = "CELERY_TEST_WIRING"
SIGNALS_ENV = "CELERY_TEST_SIGNALS"
TRACES_ENV = "CELERY_TEST_TRACES"
#: The ways of making the Celery app that tasks must run with.
WIRINGS = ("plain", "init_app", "make_celery")
#: Seconds a ``?hold=NAME`` task waits for its release at most.
HOLD_TIMEOUT = 10

#: The id of every task whose ``Echo.post`` ran in this process.
handler_runs: list[str] = []


class Echo(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        handler_runs.append(current_task.id)
        fail = request.args.get("fail")
        if fail:
            abort(int(fail), message=f"failed with {fail} as asked")
        prefix = current_app.config["CELERY_TEST_PREFIX"]
        mark, hold = request.args.get("mark"), request.args.get("hold")
        if mark or hold:
            with redis.Redis.from_url(REDIS_URL) as client:
                if mark:
                    client.set(f"{prefix}ran:{mark}", os.getpid())
                if hold:
                    client.blpop([f"{prefix}release:{hold}"], timeout=HOLD_TIMEOUT)
        steps = int(request.args.get("steps", "0"))
        step = float(request.args.get("step", "0.1"))
        for i in range(steps):
            current_task.progress(i, total=steps, message="stepping")
            if request.args.get("cancellable"):
                current_task.raise_if_cancelled()
            time.sleep(step)
        if request.files:
            return {
                "form": request.form.to_dict(flat=False),
                "files": {
                    name: {
                        "filename": upload.filename,
                        "type": upload.mimetype,
                        "sha256": hashlib.sha256(upload.read()).hexdigest(),
                    }
                    for name, upload in request.files.items()
                },
            }
        if request.args.get("digest"):
            data = request.get_data()
            return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
        return {
            "body": request.get_data(as_text=True),
            "header": request.headers.get("X-Echo"),
            "args": request.args.to_dict(flat=False),
            "pid": os.getpid(),
        }


class Probe(Resource):
    def get(self) -> dict[str, t.Any]:
        ours = sorted(name for name in sys.modules if name.startswith("flask_restful_async"))
        return {"pid": os.getpid(), "handler_runs": len(handler_runs), "modules": ours}


def celery_init_app(app: Flask) -> Celery:
    """Flask's documented way to make a Celery app for a Flask app, word for word
    (https://flask.palletsprojects.com/en/stable/patterns/celery/)."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def celery_settings(prefix: str, broker_url: str) -> dict[str, t.Any]:
    """The Celery settings of every wiring: broker keys under ``prefix``."""
    settings: dict[str, t.Any] = {
        "broker_connection_retry_on_startup": True,
        # Every broker key under the test's prefix, so that it can delete them.
        "broker_transport_options": {"global_keyprefix": f"{prefix}kombu:"},
        # Remote control only for a test that asks for it (kombu puts its
        # pidbox keys and channels under the prefix too), and no events.
        "worker_enable_remote_control": os.environ.get(REMOTE_CONTROL_ENV) == "1",
        "worker_send_task_events": False,
        "worker_hijack_root_logger": False,
    }
    if broker_url.startswith("amqp"):
        # The worker's event loop wakes for its timers, at most 10 s apart: the
        # heartbeat check (every heartbeat / 3 s) makes a warm shutdown quick.
        settings["broker_heartbeat"] = 2
    return settings


def make_celery_app(app: Flask, wiring: str, prefix: str, broker_url: str) -> Celery:
    """The Celery app of ``app``, made as ``wiring`` says."""
    settings = celery_settings(prefix, broker_url)
    if wiring == "make_celery":
        app.config.update(CELERY_BROKER_URL=broker_url, CELERY_CONFIG=settings)
        return make_celery(app)
    if wiring == "init_app":
        app.config["CELERY"] = {"broker_url": broker_url, **settings}
        return celery_init_app(app)
    assert wiring == "plain", wiring
    celery_app = Celery(__name__, broker=broker_url)
    celery_app.conf.update(settings)
    return celery_app


def create_app(
    prefix: str, queue: str, broker_url: str = REDIS_URL, wiring: str = "plain"
) -> tuple[Flask, Celery, RedisStore]:
    """A Flask app, its Celery app (made as ``wiring`` says) and its store: keys
    under ``prefix``, tasks to ``queue``, messages through ``broker_url``."""
    app = Flask(__name__)
    app.config["CELERY_TEST_PREFIX"] = prefix
    if os.environ.get(LEASE_ENV):
        app.config["RESTFUL_ASYNC_LEASE"] = float(os.environ[LEASE_ENV])
    celery_app = make_celery_app(app, wiring, prefix, broker_url)
    store = RedisStore(REDIS_URL, prefix=prefix)
    api = Api(app)
    register_async(
        api, store=store, executor=CeleryExecutor(celery_app, queue=queue), owner=lambda: None
    )
    api.add_resource(Echo, "/echo")
    api.add_resource(Probe, "/probe")
    if os.environ.get(SIGNALS_ENV):
        record_signals(app, os.environ[SIGNALS_ENV])
    return app, celery_app, store


def record_signals(app: Flask, path: str) -> None:
    """Append a JSON line to ``path`` for each task signal that ``app`` sends."""

    def receiver(name: str) -> t.Callable[..., None]:
        def record(sender: Flask, *, task: TaskRecord) -> None:
            line = {
                "signal": name,
                "id": task.id,
                "state": task.state.value,
                "method": task.method,
                "path": task.path,
                "sender": sender.name,
                "pid": os.getpid(),
            }
            with open(path, "a", encoding="utf-8") as file:
                file.write(json.dumps(line) + "\n")

        return record

    for name, signal in (
        ("started", task_started),
        ("progress", task_progress),
        ("finished", task_finished),
    ):
        signal.connect(receiver(name), sender=app, weak=False)


def export_spans(path: str) -> None:
    """Make OpenTelemetry's SDK this process's tracer provider, exporting each span
    as it ends to ``path``: a JSON line with its name, ids (hex), parent span id,
    attributes and status code."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    def line(span: ReadableSpan) -> str:
        assert span.context is not None
        return (
            json.dumps(
                {
                    "name": span.name,
                    "trace_id": format(span.context.trace_id, "032x"),
                    "span_id": format(span.context.span_id, "016x"),
                    "parent_id": span.parent and format(span.parent.span_id, "016x"),
                    "attributes": dict(span.attributes or {}),
                    "status": span.status.status_code.name,
                    "pid": os.getpid(),
                }
            )
            + "\n"
        )

    out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=line)))
    trace.set_tracer_provider(provider)


def create_unbound_celery(prefix: str, queue: str, broker_url: str) -> Celery:
    """A Celery app with this package's task, and no Flask app bound to it."""
    celery_app = Celery(__name__, broker=broker_url)
    celery_app.conf.update(celery_settings(prefix, broker_url))
    CeleryExecutor(celery_app, queue=queue)
    return celery_app


_built: dict[str, t.Any] = {}


def __getattr__(name: str) -> t.Any:
    # PEP 562: built on first access, so importing the module builds nothing.
    if name not in ("celery", "flask_app"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _built:
        prefix, queue = os.environ.get(PREFIX_ENV), os.environ.get(QUEUE_ENV)
        if not prefix or not queue:
            raise RuntimeError(f"set {PREFIX_ENV} and {QUEUE_ENV} for tests.apps.celery_app")
        broker_url = os.environ.get(BROKER_ENV) or REDIS_URL
        wiring = os.environ.get(WIRING_ENV) or "plain"
        if os.environ.get(TRACES_ENV):
            export_spans(os.environ[TRACES_ENV])
        if wiring == "unbound":
            _built["celery"] = create_unbound_celery(prefix, queue, broker_url)
        else:
            _built["flask_app"], _built["celery"], _ = create_app(prefix, queue, broker_url, wiring)
    try:
        return _built[name]
    except KeyError:
        raise AttributeError(f"{__name__} has no {name} with {WIRING_ENV}=unbound") from None
