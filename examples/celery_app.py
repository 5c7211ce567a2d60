"""The catch-all example (examples/catchall.py) with its jobs run by Celery workers.

Redis is both the Celery broker and the task store: ``REDIS_URL`` (default
``redis://127.0.0.1:6379/0``). Any GET path starts a slow job that reports its
progress (``CATCHALL_SECONDS``, 10 by default) and answers
``"The answer is: <path>"``; the web processes only record the task and send one
message, a Celery worker runs the handler.

Run a worker and the web server, from the repository root, each in a shell of its own::

    celery -A examples.celery_app:celery worker -P threads -c 4
    gunicorn -w 2 -k gthread -b 127.0.0.1:8000 examples.celery_app:flask_app

then ``python examples/client.py http://127.0.0.1:8000/hello/celery``. ``make
demo-celery`` does all three (examples/demo_celery.py).

Optional environment, read by the web server and the worker alike (set them the
same in both):

``RESTFUL_ASYNC_REDIS_PREFIX``
    Every Redis key of the app starts with it: the store's, and the broker's
    (kombu's ``global_keyprefix``, ``<prefix>kombu:``). Celery's remote control
    and events are then turned off, since their keys cannot be prefixed.
``RESTFUL_ASYNC_CELERY_QUEUE``
    The queue the tasks go to (Celery's default, ``celery``, without it); give
    the worker ``-Q <queue>`` too.
"""

from __future__ import annotations

import logging
import os
import time
import typing as t

from celery import Celery
from celery.signals import after_setup_logger
from flask import Flask
from flask.logging import default_handler
from flask_restful import Api

from flask_restful_async import AsyncResource, current_task, register_async
from flask_restful_async.celery import CeleryExecutor
from flask_restful_async.stores.redis import RedisStore

#: How long the "intensive processing" takes (seconds), in STEPS steps.
SECONDS = max(0.0, float(os.environ.get("CATCHALL_SECONDS", "10")))
STEPS = 10

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("RESTFUL_ASYNC_REDIS_PREFIX")
QUEUE = os.environ.get("RESTFUL_ASYNC_CELERY_QUEUE") or None

celery_config: dict[str, t.Any] = {}
if PREFIX:
    celery_config = {
        "broker_transport_options": {"global_keyprefix": f"{PREFIX}kombu:"},
        # Remote control (pidbox) and event keys are not under the prefix.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
    }

flask_app = Flask(__name__)
flask_app.logger.setLevel(logging.INFO)
# A plain Celery app, as Flask's own docs make one: register_async binds it to
# flask_app through the executor. This is what `celery -A examples.celery_app:celery` runs.
celery = Celery(__name__, broker=REDIS_URL)
celery.conf.update(broker_connection_retry_on_startup=True, **celery_config)


@after_setup_logger.connect
def _log_once(**kwargs: t.Any) -> None:
    # In a worker, Celery's root handler shows the app's log lines: Flask's own
    # handler (to stderr, which Celery redirects to its log) would show them twice.
    flask_app.logger.removeHandler(default_handler)


api = Api(flask_app)
register_async(
    api,
    url="/status/<task_id>",
    store=RedisStore(REDIS_URL, prefix=PREFIX) if PREFIX else REDIS_URL,
    executor=CeleryExecutor(celery, queue=QUEUE),
)


class CatchAll(AsyncResource):
    def get(self, path: str = "") -> str:
        # perform some intensive processing (in a Celery worker: pid is the worker's)
        flask_app.logger.info("starting processing task, path: '%s' (pid %d)", path, os.getpid())
        for step in range(1, STEPS + 1):
            time.sleep(SECONDS / STEPS)
            current_task.progress(step, total=STEPS, message=f"step {step} of {STEPS}")
        flask_app.logger.info("completed processing task, path: '%s'", path)
        return f"The answer is: {path}"


api.add_resource(CatchAll, "/<path:path>", "/")
