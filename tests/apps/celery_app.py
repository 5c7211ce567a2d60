"""An app whose tasks run in Celery workers, for ``tests/test_celery.py``.

Broker and task store are Redis database :data:`REDIS_DB` on 127.0.0.1:6379. Every
key the app makes (the store's and the broker's, through kombu's
``global_keyprefix``) starts with the prefix from ``CELERY_TEST_PREFIX``; tasks go
to the queue named by ``CELERY_TEST_QUEUE``; ``CELERY_TEST_LEASE`` (seconds), if
set, is the store's lease; ``CELERY_TEST_BROKER``, if set, the broker URL (Redis
db :data:`REDIS_DB` otherwise); ``CELERY_TEST_REMOTE_CONTROL=1`` makes a worker
listen to remote control (``revoke``, ``inspect``). A worker::

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
import os
import sys
import time
import typing as t

import redis
from celery import Celery
from flask import Flask, current_app, request
from flask_restful import Api, Resource, abort

from flask_restful_async import AsyncResource, current_task, register_async
from flask_restful_async.celery import CeleryExecutor, make_celery
from flask_restful_async.stores.redis import RedisStore

REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX_ENV = "CELERY_TEST_PREFIX"
QUEUE_ENV = "CELERY_TEST_QUEUE"
#: Seconds of the store's lease (``RESTFUL_ASYNC_LEASE``), if set.
LEASE_ENV = "CELERY_TEST_LEASE"
BROKER_ENV = "CELERY_TEST_BROKER"
REMOTE_CONTROL_ENV = "CELERY_TEST_REMOTE_CONTROL"
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


def create_app(
    prefix: str, queue: str, broker_url: str = REDIS_URL
) -> tuple[Flask, Celery, RedisStore]:
    """A Flask app, its Celery app and its store: keys under ``prefix``, tasks to
    ``queue``, messages through ``broker_url``."""
    app = Flask(__name__)
    app.config.update(
        CELERY_TEST_PREFIX=prefix,
        CELERY_BROKER_URL=broker_url,
        CELERY_CONFIG={
            # Every broker key under the test's prefix, so that it can delete them.
            "broker_transport_options": {"global_keyprefix": f"{prefix}kombu:"},
            # Remote control only for a test that asks for it (kombu puts its
            # pidbox keys and channels under the prefix too), and no events.
            "worker_enable_remote_control": os.environ.get(REMOTE_CONTROL_ENV) == "1",
            "worker_send_task_events": False,
            "worker_hijack_root_logger": False,
        },
    )
    if broker_url.startswith("amqp"):
        # The worker's event loop wakes for its timers, at most 10 s apart: the
        # heartbeat check (every heartbeat / 3 s) makes a warm shutdown quick.
        app.config["CELERY_CONFIG"]["broker_heartbeat"] = 2
    if os.environ.get(LEASE_ENV):
        app.config["RESTFUL_ASYNC_LEASE"] = float(os.environ[LEASE_ENV])
    celery_app = make_celery(app)
    store = RedisStore(REDIS_URL, prefix=prefix)
    api = Api(app)
    register_async(
        api, store=store, executor=CeleryExecutor(celery_app, queue=queue), owner=lambda: None
    )
    api.add_resource(Echo, "/echo")
    api.add_resource(Probe, "/probe")
    return app, celery_app, store


_built: tuple[Flask, Celery, RedisStore] | None = None


def __getattr__(name: str) -> t.Any:
    # PEP 562: built on first access, so importing the module builds nothing.
    global _built
    if name not in ("celery", "flask_app"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _built is None:
        prefix, queue = os.environ.get(PREFIX_ENV), os.environ.get(QUEUE_ENV)
        if not prefix or not queue:
            raise RuntimeError(f"set {PREFIX_ENV} and {QUEUE_ENV} for tests.apps.celery_app")
        _built = create_app(prefix, queue, os.environ.get(BROKER_ENV) or REDIS_URL)
    return _built[0] if name == "flask_app" else _built[1]
