"""An app for tests that run several processes on one task store.

``POST /jobs/echo`` (an :class:`AsyncResource`) returns ``{"echo": <JSON body>,
"pid": <pid>}``; ``POST /jobs/sleep?seconds=S`` sleeps ``S`` seconds in small
steps, reporting progress, then returns ``{"slept": S, "pid": <pid>}``. ``GET
/pid`` (a plain ``Resource``, answered at once) returns ``{"pid": <pid>, "ppid":
<ppid>}``: the process that served the request, and its parent (gunicorn's
master). The pids tell which process ran a task. ``POST /jobs/count?seconds=S``
sleeps ``S`` seconds and returns ``{"echo": <JSON body>, "pid": <pid>}``, having
appended its task id and pid to the file named by ``TASKS_APP_RUNS`` (one line
per run: a task run twice shows twice); ``size`` and ``sha256`` of the body are in the
result instead of ``echo`` when the body is not JSON.

The instance folder, where the default SQLite store lives, comes from the
``TASKS_APP_INSTANCE`` environment variable, so that each test's store is in a
temporary directory of its own. ``FLASK_*`` environment variables are loaded into
the config (JSON-decoded where they parse), e.g. ``FLASK_RESTFUL_ASYNC_LEASE=1``.
With a ``redis://`` ``RESTFUL_ASYNC_STORE``, ``TASKS_APP_REDIS_PREFIX`` (if set)
is the prefix of the store's keys.

``app`` is built on first access (``gunicorn tests.apps.tasks_app:app``), so a
test may import :func:`create_app` without the environment variable and without
building an app it does not use.
"""

from __future__ import annotations

import hashlib
import os
import time
import typing as t

from flask import Flask, request
from flask_restful import Api, Resource

from flask_restful_async import AsyncResource, current_task, register_async

INSTANCE_ENV = "TASKS_APP_INSTANCE"
#: The file ``/jobs/count`` appends the id of each task it runs to.
RUNS_ENV = "TASKS_APP_RUNS"
#: Config key (env ``FLASK_TASKS_APP_REDIS_PREFIX``): with a ``redis://``
#: ``RESTFUL_ASYNC_STORE``, the prefix of the store's keys.
REDIS_PREFIX_KEY = "TASKS_APP_REDIS_PREFIX"
#: Seconds between two progress reports of ``/jobs/sleep``.
SLEEP_STEP = 0.05


class Echo(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return {"echo": request.get_json(), "pid": os.getpid()}


class Sleep(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        seconds = float(request.args.get("seconds", "0"))
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            current_task.progress(round(seconds - remaining, 3), total=seconds, message="sleeping")
            current_task.raise_if_cancelled()
            time.sleep(min(SLEEP_STEP, remaining))
        return {"slept": seconds, "pid": os.getpid()}


class Count(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        with open(os.environ[RUNS_ENV], "a") as runs:
            runs.write(f"{current_task.id} {os.getpid()}\n")
        time.sleep(float(request.args.get("seconds", "0")))
        if request.is_json:
            return {"echo": request.get_json(), "pid": os.getpid()}
        body = request.get_data()
        return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "pid": os.getpid()}


class Pid(Resource):
    def get(self) -> dict[str, t.Any]:
        return {"pid": os.getpid(), "ppid": os.getppid()}


def create_app(instance_path: str, **config: t.Any) -> Flask:
    """A new app with the routes above; ``config`` wins over ``FLASK_*`` variables.

    Apps made with the same ``instance_path`` (or the same ``RESTFUL_ASYNC_STORE``
    URL) share their tasks.
    """
    app = Flask(__name__, instance_path=os.path.abspath(instance_path))
    app.config.from_prefixed_env()
    app.config.update(config)
    api = Api(app)
    prefix = app.config.get(REDIS_PREFIX_KEY)
    if prefix:
        # Keys of the redis:// store under a prefix of the test's own, so that
        # tests (and test runs) sharing a Redis database stay apart.
        from flask_restful_async.stores.redis import RedisStore

        register_async(api, store=RedisStore(app.config["RESTFUL_ASYNC_STORE"], prefix=prefix))
    else:
        register_async(api)
    api.add_resource(Echo, "/jobs/echo")
    api.add_resource(Sleep, "/jobs/sleep")
    api.add_resource(Count, "/jobs/count")
    api.add_resource(Pid, "/pid")
    return app


_app: Flask | None = None


def __getattr__(name: str) -> t.Any:
    # PEP 562: ``app`` is made on first access, from the environment.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        instance = os.environ.get(INSTANCE_ENV)
        if not instance:
            raise RuntimeError(f"set {INSTANCE_ENV} to the instance folder of tasks_app:app")
        _app = create_app(instance)
    return _app
