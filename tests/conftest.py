"""Shared fixtures: apps with the extension set up, and a poller with a deadline."""

from __future__ import annotations

import secrets
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from flask_restful import Api
from werkzeug.test import TestResponse

from flask_restful_async import AsyncResource, register_async
from flask_restful_async.state import get_state

from .services import require_redis

AppFactory = t.Callable[..., tuple[Flask, Api]]
ANY_STORE_REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture
def make_app(tmp_path: Path) -> t.Iterator[AppFactory]:
    """Build apps with ``register_async``, each with an instance folder of its own
    (where the default SQLite store lives); executors are shut down afterwards."""
    made: list[Flask] = []

    def factory(**options: t.Any) -> tuple[Flask, Api]:
        config = options.pop("config", {})
        app = Flask(f"test_app_{len(made)}", instance_path=str(tmp_path / f"instance{len(made)}"))
        app.config.update(config)
        api = Api(app)
        register_async(api, **options)
        made.append(app)
        return app, api

    yield factory
    for app in made:
        get_state(app).close()


#: Set by a task of :class:`Held` as it starts; :data:`HELD_RELEASE` lets it end.
HELD_STARTED = threading.Event()
HELD_RELEASE = threading.Event()


class Held(AsyncResource):
    """``POST``: a task that tells it started, then waits (at most 20 s) until the
    test sets :data:`HELD_RELEASE`. Tests that use it ask for ``held_tasks``."""

    def post(self) -> t.Any:
        HELD_STARTED.set()
        HELD_RELEASE.wait(20)
        return {"held": True}


@pytest.fixture
def held_tasks(make_app: AppFactory) -> t.Iterator[None]:
    """:class:`Held` tasks start held, and are let go at the end of the test.

    Asks for ``make_app`` so as to end before it: held tasks are released before
    the apps are closed, which would otherwise wait for them.
    """
    HELD_RELEASE.clear()
    HELD_STARTED.clear()
    yield
    HELD_RELEASE.set()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_app_any_store(
    request: pytest.FixtureRequest, make_app: AppFactory
) -> t.Iterator[AppFactory]:
    """``make_app`` on each store: memory, SQLite (the default), Redis (db 12, under
    a prefix of the test's own, whose keys are deleted afterwards)."""
    store: str | None = None
    config: dict[str, t.Any] = {}
    if request.param == "memory":
        store = "memory://"
    elif request.param == "redis":
        require_redis()
        store = ANY_STORE_REDIS_URL
        config["RESTFUL_ASYNC_REDIS_PREFIX"] = f"{{any-store-{secrets.token_hex(6)}}}:"

    def factory(**options: t.Any) -> tuple[Flask, Api]:
        if store is not None:
            options.setdefault("store", store)
        options["config"] = {**config, **options.get("config", {})}
        return make_app(**options)

    yield factory
    if request.param == "redis":
        import redis

        with redis.Redis.from_url(ANY_STORE_REDIS_URL) as client:
            keys = list(client.scan_iter(match=config["RESTFUL_ASYNC_REDIS_PREFIX"] + "*"))
            if keys:
                client.delete(*keys)


def wait_done(client: FlaskClient, location: str, timeout: float = 10.0) -> TestResponse:
    """Poll ``location`` until it stops answering 202, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(location)
        if response.status_code != 202:
            return response
        if time.monotonic() > deadline:
            raise AssertionError(f"{location} still 202 after {timeout}s: {response.json}")
        time.sleep(0.005)


def wait_for(predicate: t.Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def run_at_once(target: t.Callable[[], object], count: int, timeout: float = 30.0) -> None:
    """Run ``target`` in ``count`` threads at once; wait for them all, each at most
    ``timeout`` seconds."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
