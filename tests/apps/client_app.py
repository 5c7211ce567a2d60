"""The server ``tests/test_client.py`` talks to: three apps behind one gunicorn.

- ``/`` (:func:`create_app`): ``POST /work`` (and ``/work/<tag>``, an
  :class:`AsyncResource`) runs ``steps`` steps of ``step`` seconds from its JSON
  body, reporting ``current_task.progress(i, total=steps, message="step i")`` and
  checking for cancellation (``"total": false``: no total, so that ``Retry-After``
  stays 1 s instead of the estimate of the time left); then answers ``201 {"echo":
  <body>}``. ``"fail": "abort"`` ends it with ``abort(422)``, ``"fail": "raise"`` with an exception
  (``500``), ``"die": true`` SIGKILLs the worker process (the task is lost).
  ``GET /plain`` is a plain ``Resource``. The task list is public.
- ``/redirect``: the same app with ``RESTFUL_ASYNC_RESULT_REDIRECT`` on (a finished
  task answers ``303`` to ``<status URL>/result``).
- ``/foreign``: a plain Flask app that speaks the pattern without this library:
  ``POST /jobs?seconds=S`` answers ``202`` with a ``Location`` and nothing else;
  ``GET /jobs/<id>`` answers ``202`` until ``S`` seconds have passed, then ``200
  {"job": <id>}``. With ``?date=N`` each ``202`` says ``Retry-After`` as the HTTP
  date ``N`` seconds ahead. ``POST /odd/<kind>`` answers ``202`` with odd
  ``Location`` and ``Retry-After`` headers: ``loop`` (its status URL answers ``303``
  to itself), ``moved`` (``308`` to another URL, which answers ``200``),
  ``elsewhere`` (a status URL on another origin), ``far`` (``Retry-After`` of 400
  digits).

Failures on demand, counted in this process (serve it with one worker): a submit
with ``X-Fail-Submits: N`` is answered ``503`` (or ``X-Fail-Status``) the first N
times its ``Idempotency-Key`` comes, and a poll with ``X-Fail-Polls: N`` the first N
times for its task, with ``Retry-After: X-Fail-Retry-After`` when that is given.

``CLIENT_APP_INSTANCE`` is the instance folder (each app has its own SQLite store
below it); ``FLASK_*`` variables are loaded into the config of both task apps.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import threading
import time
import typing as t

from flask import Flask, Response, jsonify, request, url_for
from flask_restful import Api, Resource, abort
from werkzeug.http import http_date
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from flask_restful_async import AsyncResource, current_task, register_async

INSTANCE_ENV = "CLIENT_APP_INSTANCE"

_lock = threading.Lock()
_failures: dict[str, int] = {}


def fail_first(key: str, header: str) -> Response | None:
    """A 503 (or ``X-Fail-Status``) for the first ``header`` times ``key`` comes."""
    wanted = int(request.headers.get(header, "0"))
    with _lock:
        seen = _failures.get(key, 0)
        _failures[key] = seen + 1
    if seen >= wanted:
        return None
    response = jsonify(message="try again later")
    response.status_code = int(request.headers.get("X-Fail-Status", "503"))
    if "X-Fail-Retry-After" in request.headers:
        response.headers["Retry-After"] = request.headers["X-Fail-Retry-After"]
    return response


def flaky_submits(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    @functools.wraps(view)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        key = "submit " + request.headers.get("Idempotency-Key", secrets.token_hex(8))
        return fail_first(key, "X-Fail-Submits") or view(*args, **kwargs)

    return wrapper


def flaky_polls(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    @functools.wraps(view)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        if request.method != "GET":
            return view(*args, **kwargs)
        return fail_first("poll " + request.path, "X-Fail-Polls") or view(*args, **kwargs)

    return wrapper


class Work(AsyncResource):
    method_decorators = [flaky_submits]

    def post(self, tag: str = "") -> t.Any:
        body = request.get_json()
        if body.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        steps = int(body.get("steps", 0))
        for i in range(1, steps + 1):
            current_task.raise_if_cancelled()
            time.sleep(float(body.get("step", 0)))
            total = steps if body.get("total", True) else None
            current_task.progress(i, total=total, message=f"step {i}")
        if body.get("fail") == "abort":
            abort(422, message="the input was not good enough")
        if body.get("fail") == "raise":
            raise RuntimeError("the handler broke")
        if body.get("elsewhere"):
            # The handler's own 202: the work goes on in another system.
            return {"queued": "elsewhere"}, 202, {"Location": "/elsewhere/1"}
        return {"echo": body}, 201, {"X-Work": "done"}


class Plain(Resource):
    def get(self) -> t.Any:
        return {"plain": True}


def create_app(instance_path: str, **config: t.Any) -> Flask:
    app = Flask(__name__, instance_path=instance_path)
    app.config.from_prefixed_env()
    app.config.update(RESTFUL_ASYNC_PUBLIC_LIST=True, **config)
    api = Api(app)
    register_async(api, decorators=(flaky_polls,))
    api.add_resource(Work, "/work", "/work/<tag>")
    api.add_resource(Plain, "/plain")
    return app


def create_foreign_app() -> Flask:
    app = Flask("foreign")
    jobs: dict[str, float] = {}

    @app.post("/jobs")
    def submit() -> Response:
        job = secrets.token_hex(8)
        jobs[job] = time.monotonic() + float(request.args.get("seconds", "0"))
        response = Response(status=202)
        response.headers["Location"] = url_for("job", job=job, date=request.args.get("date"))
        return response

    @app.get("/jobs/<job>")
    def job(job: str) -> Response:
        if time.monotonic() < jobs[job]:
            response = Response("working", status=202, mimetype="text/plain")
            ahead = request.args.get("date")
            if ahead is not None:
                response.headers["Retry-After"] = http_date(time.time() + float(ahead))
            return response
        return jsonify(job=job)

    odd_locations = {  # relative to /foreign/odd/<kind>
        "loop": "loop",
        "moved": "moved",
        "elsewhere": "http://127.0.0.2:9/odd/loop",
        "far": "loop",
    }

    @app.post("/odd/<kind>")
    def odd(kind: str) -> Response:
        response = Response(status=202)
        response.headers["Location"] = odd_locations[kind]
        if kind == "far":
            response.headers["Retry-After"] = "9" * 400
        return response

    @app.get("/odd/loop")
    def loop() -> Response:
        response = Response(status=303)
        response.headers["Location"] = "loop"
        return response

    @app.get("/odd/moved")
    def moved() -> Response:
        response = Response(status=308)
        response.headers["Location"] = "final"
        return response

    @app.get("/odd/final")
    def final() -> Response:
        return jsonify(moved=True)

    return app


def create_server(instance_path: str) -> DispatcherMiddleware:
    main = create_app(os.path.join(instance_path, "main"))
    redirect = create_app(
        os.path.join(instance_path, "redirect"), RESTFUL_ASYNC_RESULT_REDIRECT=True
    )
    return DispatcherMiddleware(main, {"/redirect": redirect, "/foreign": create_foreign_app()})


_app: DispatcherMiddleware | None = None


def __getattr__(name: str) -> t.Any:
    # PEP 562: ``app`` is made on first access, from the environment.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_server(os.environ[INSTANCE_ENV])
    return _app
