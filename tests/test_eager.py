"""Test mode (``RESTFUL_ASYNC_EAGER``) and :func:`flask_restful_async.testing.follow`.

In eager mode each task runs in the request thread before its ``202`` leaves,
through the same snapshot, replay, rendering and store as with workers: the
``202`` reads finished and the first ``GET`` of its ``Location`` is final. Every
kind of answer a handler gives is compared with a plain ``Resource``'s, on every
store. ``follow`` is tested in eager mode and against the thread executor, where
it long-polls.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask, g, make_response, redirect, request
from flask_restful import Api, Resource, abort
from werkzeug.http import http_date

from flask_restful_async import AsyncResource, TaskState, current_task, signals
from flask_restful_async.executors import EagerExecutor, ThreadExecutor
from flask_restful_async.state import get_state
from flask_restful_async.testing import _retry_after, follow

from . import test_results
from .conftest import AppFactory

EAGER = {"RESTFUL_ASYNC_EAGER": True}


def _dict() -> t.Any:
    return {"rows": 42, "body": request.get_json(silent=True), "g": g.get("user")}


def _tuple_code_headers() -> t.Any:
    return {"rows": 42}, 201, {"X-Report": "done"}


def _tuple_code() -> t.Any:
    return ["a", "b"], 207


def _response() -> t.Any:
    response = make_response("plain text", 200)
    response.mimetype = "text/plain"
    response.set_cookie("seen", "1")
    return response


def _redirect() -> t.Any:
    return redirect("/elsewhere", 302)


def _empty() -> t.Any:
    return "", 204


def _abort() -> t.Any:
    abort(409, message="already there")


def _raise() -> t.Any:
    raise ValueError("the handler broke")


def _unserializable() -> t.Any:
    return {"when": object()}


#: Handlers whose answer a plain Resource gives the same way (one that raises gives
#: a 500 there too, but a body of flask-restful's making: tested on its own).
HANDLERS: dict[str, t.Callable[[], t.Any]] = {
    "dict": _dict,
    "tuple-code-headers": _tuple_code_headers,
    "tuple-code": _tuple_code,
    "response": _response,
    "redirect": _redirect,
    "empty": _empty,
    "abort": _abort,
}
COMPARED = ("Content-Type", "X-Report", "Location", "Set-Cookie")


def set_user(f: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        g.user = request.headers.get("X-User")
        return f(*args, **kwargs)

    return wrapper


def add_pairs(api: Api, handlers: dict[str, t.Callable[[], t.Any]]) -> None:
    for name, handler in handlers.items():
        for base, prefix in ((Resource, "sync"), (AsyncResource, "async")):
            body = {
                "post": lambda self, handler=handler: handler(),
                "method_decorators": [set_user],
            }
            cls = type(f"{prefix}_{name}", (base,), body)
            api.add_resource(cls, f"/{prefix}/{name}", endpoint=f"{prefix}_{name}")


class Steps(AsyncResource):
    """Reports progress ``?n`` times; ``?hold=1`` then waits for :data:`RELEASE`."""

    def post(self) -> t.Any:
        steps = int(request.args.get("n", "3"))
        for i in range(steps):
            current_task.raise_if_cancelled()
            current_task.progress(i + 1, total=steps, message=f"step {i + 1}")
        if request.args.get("hold"):
            HELD.set()
            deadline = time.monotonic() + 10
            while not current_task.cancelled and time.monotonic() < deadline:
                RELEASE.wait(0.01)
                if RELEASE.is_set():
                    break
            current_task.raise_if_cancelled()
        return {"id": current_task.id, "steps": steps}


HELD = threading.Event()
RELEASE = threading.Event()


@pytest.fixture
def held() -> t.Iterator[None]:
    HELD.clear()
    RELEASE.clear()
    yield
    RELEASE.set()


def eager_app(factory: AppFactory, **options: t.Any) -> tuple[Flask, Api]:
    config = {**EAGER, **options.pop("config", {})}
    app, api = factory(config=config, **options)
    add_pairs(api, HANDLERS)
    api.add_resource(Steps, "/steps")
    return app, api


@pytest.mark.parametrize("kind", HANDLERS)
def test_eager_task_is_final_at_the_first_poll_and_answers_as_a_plain_resource(
    make_app_any_store: AppFactory, kind: str
) -> None:
    app, _ = eager_app(make_app_any_store)
    client = app.test_client()
    request_options: dict[str, t.Any] = {"json": {"n": 1}, "headers": {"X-User": "ann"}}
    plain = client.post(f"/sync/{kind}", **request_options)
    accepted = client.post(f"/async/{kind}", **request_options)
    assert accepted.status_code == 202
    assert accepted.json is not None
    # The 202 already tells the end, and asks for no pause.
    assert accepted.json["state"] == ("failed" if kind == "abort" else "succeeded")
    assert accepted.headers["Retry-After"] == "0"
    final = client.get(accepted.headers["Location"])
    assert (final.status_code, final.data) == (plain.status_code, plain.data)
    assert {name: final.headers.getlist(name) for name in COMPARED} == {
        name: plain.headers.getlist(name) for name in COMPARED
    }
    assert final.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("kind", test_results.HANDLERS)
def test_eager_results_are_those_of_the_thread_executor(
    make_app_any_store: AppFactory, tmp_path: Path, kind: str
) -> None:
    """Files, streams, redirects, cookies, representations: as ``test_results``
    checks them for the thread executor, read at the first poll."""
    app, _ = test_results.result_app(make_app_any_store, tmp_path, **EAGER)
    client = app.test_client()
    with client.post(f"/sync/{kind}", **test_results.request_for(kind)) as plain:
        plain.get_data()
    accepted = client.post(f"/async/{kind}", **test_results.request_for(kind))
    assert accepted.status_code == 202
    final = client.get(accepted.headers["Location"])
    assert (final.status_code, final.data) == (plain.status_code, plain.data)
    assert test_results.compared(final) == test_results.compared(plain)


def test_eager_runs_async_def_handlers(make_app: AppFactory) -> None:
    pytest.importorskip("asgiref")

    class Coroutine(AsyncResource):
        async def post(self) -> t.Any:
            current_task.progress(1, total=1)
            return {"task": current_task.id}, 201

    app, api = eager_app(make_app)
    api.add_resource(Coroutine, "/coroutine")
    client = app.test_client()
    accepted = client.post("/coroutine")
    assert accepted.json is not None
    final = client.get(accepted.headers["Location"])
    assert (final.status_code, final.json) == (201, {"task": accepted.json["id"]})


def test_eager_runs_in_the_request_thread_through_the_store(make_app: AppFactory) -> None:
    app, _ = eager_app(make_app)
    state = get_state(app)
    assert isinstance(state.executor, EagerExecutor)
    client = app.test_client()
    accepted = client.post("/async/dict", json={"x": 1}, headers={"X-User": "bob"})
    task = state.store.get(accepted.json["id"]) if accepted.json else None
    assert task is not None
    assert task.state is TaskState.SUCCEEDED
    assert (task.method, task.path, task.endpoint) == ("POST", "/async/dict", "async_dict")
    assert task.started_at is not None
    assert task.finished_at is not None
    # The body and g went through the snapshot, the result through the renderer.
    assert client.get(accepted.headers["Location"]).json == {
        "rows": 42,
        "body": {"x": 1},
        "g": "bob",
    }


def test_eager_handler_that_raises_fails_its_task_with_a_logged_500(
    make_app_any_store: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, api = eager_app(make_app_any_store)
    add_pairs(api, {"raise": _raise, "unserializable": _unserializable})
    client = app.test_client()
    for kind in ("raise", "unserializable"):
        with caplog.at_level(logging.ERROR, logger=app.logger.name):
            accepted = client.post(f"/async/{kind}")
        assert accepted.status_code == 202
        assert accepted.json is not None
        assert accepted.json["state"] == "failed"
        final = client.get(accepted.headers["Location"])
        assert final.status_code == 500
        assert final.json == {"message": "Internal Server Error"}
        task_id = accepted.json["id"]
        assert any(getattr(r, "task_id", None) == task_id for r in caplog.records)
    # The request that submitted it was not hurt: the app answers on.
    assert client.post("/async/dict").status_code == 202


def test_eager_progress_and_current_task_inside(make_app_any_store: AppFactory) -> None:
    app, _ = eager_app(make_app_any_store, config={"RESTFUL_ASYNC_PROGRESS_INTERVAL": 0})
    seen: list[tuple[str, t.Any]] = []

    def record(name: str) -> t.Callable[..., None]:
        def receiver(sender: Flask, **kwargs: t.Any) -> None:
            task = kwargs["task"]
            seen.append((name, task.progress.current if task.progress else None))

        return receiver

    receivers = {name: record(name) for name in ("submitted", "started", "progress", "finished")}
    for name, receiver in receivers.items():
        getattr(signals, f"task_{name}").connect(receiver, app)
    try:
        accepted = app.test_client().post("/steps?n=3")
    finally:
        for name, receiver in receivers.items():
            getattr(signals, f"task_{name}").disconnect(receiver, app)
    assert accepted.status_code == 202
    document = accepted.json
    assert document is not None
    assert document["progress"] == {"current": 3, "total": 3, "message": "step 3"}
    final = app.test_client().get(accepted.headers["Location"])
    assert final.json == {"id": document["id"], "steps": 3}
    # Each event in the order a worker elsewhere would send them.
    assert seen == [
        ("submitted", None),
        ("started", None),
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
        ("finished", 3),
    ]


def test_eager_task_is_forgotten_by_delete_and_a_cancelling_handler_ends_cancelled(
    make_app: AppFactory,
) -> None:
    class GivesUp(AsyncResource):
        def post(self) -> t.Any:
            from flask_restful_async import TaskCancelled

            raise TaskCancelled("not today")

    app, api = eager_app(make_app)
    api.add_resource(GivesUp, "/gives-up")
    client = app.test_client()
    accepted = client.post("/gives-up")
    assert accepted.json is not None
    assert accepted.json["state"] == "cancelled"
    assert client.get(accepted.headers["Location"]).status_code == 409
    # Finished before any client knew its URL: DELETE forgets it, as for any finished task.
    assert client.delete(accepted.headers["Location"]).status_code == 204
    assert client.get(accepted.headers["Location"]).status_code in (404, 410)


def test_eager_with_prefer_wait_answers_the_result_at_once(make_app: AppFactory) -> None:
    app, _ = eager_app(make_app)
    response = app.test_client().post("/async/tuple-code-headers", headers={"Prefer": "wait=5"})
    assert response.status_code == 201
    assert response.json == {"rows": 42}
    assert response.headers["Preference-Applied"] == "wait=5"


def test_eager_with_result_redirect_and_follow(make_app: AppFactory) -> None:
    app, _ = eager_app(make_app, config={"RESTFUL_ASYNC_RESULT_REDIRECT": True})
    client = app.test_client()
    accepted = client.post("/async/tuple-code-headers")
    assert client.get(accepted.headers["Location"]).status_code == 303
    final = follow(client, accepted)
    assert (final.status_code, final.json) == (201, {"rows": 42})
    assert final.headers["X-Report"] == "done"
    # A handler's own redirect is its answer, not followed.
    assert follow(client, client.post("/async/redirect")).status_code == 302


@pytest.mark.parametrize("eager", [True, False])
def test_follow_under_a_script_root(make_app: AppFactory, eager: bool) -> None:
    # An app mounted below a prefix names its status URLs with it.
    app, _ = eager_app(make_app, config={"RESTFUL_ASYNC_EAGER": eager})
    client = app.test_client()
    accepted = client.post("/async/tuple-code-headers", base_url="http://localhost/prefix/")
    assert accepted.headers["Location"].startswith("/prefix/tasks/")
    final = follow(client, accepted)
    assert (final.status_code, final.json) == (201, {"rows": 42})


def test_eager_replaces_a_celery_executor_and_needs_no_broker(make_app: AppFactory) -> None:
    pytest.importorskip("celery")
    from celery import Celery

    from flask_restful_async.celery import CeleryExecutor

    # Nothing listens there: a message sent would fail the submit with a 503.
    celery_app = Celery("eager-test", broker="redis://127.0.0.1:1/0")
    app, _ = eager_app(make_app, store="memory://", executor=CeleryExecutor(celery_app))
    client = app.test_client()
    final = follow(client, client.post("/async/tuple-code-headers"))
    assert (final.status_code, final.json) == (201, {"rows": 42})


def test_eager_is_off_by_default(make_app: AppFactory) -> None:
    app, _ = make_app()
    assert isinstance(get_state(app).executor, ThreadExecutor)
    assert app.config["RESTFUL_ASYNC_EAGER"] is False


def test_follow_returns_a_final_answer_as_it_is(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://")

    class Mixed(AsyncResource):
        sync_methods = ("get",)

        def get(self) -> t.Any:
            return {"sync": True}

        def post(self) -> t.Any:
            return {"async": True}

    api.add_resource(Mixed, "/mixed")
    client = app.test_client()
    assert follow(client, client.get("/mixed")).json == {"sync": True}
    assert follow(client, client.put("/mixed")).status_code == 405


def test_follow_returns_the_handlers_own_202(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store()

    class Elsewhere(AsyncResource):
        def post(self) -> t.Any:
            return {"queued": "elsewhere"}, 202, {"Location": "/elsewhere/1"}

    api.add_resource(Elsewhere, "/elsewhere")
    client = app.test_client()
    submitted = client.post("/elsewhere")
    assert submitted.status_code == 202
    assert submitted.headers["Location"].startswith("/tasks/")
    final = follow(client, submitted)
    assert final.status_code == 202
    assert final.headers["Location"] == "/elsewhere/1"
    assert final.json == {"queued": "elsewhere"}


def test_follow_long_polls_the_thread_executor(make_app_any_store: AppFactory, held: None) -> None:
    app, api = make_app_any_store()
    api.add_resource(Steps, "/steps")
    client = app.test_client()
    polls: list[str] = []

    @app.before_request
    def count() -> None:
        if request.method == "GET":
            polls.append(request.full_path)

    accepted = client.post("/steps?n=2&hold=1")
    assert accepted.status_code == 202
    assert HELD.wait(10)
    threading.Timer(0.3, RELEASE.set).start()
    final = follow(client, accepted, timeout=10)
    assert final.status_code == 200
    assert final.json == {"id": accepted.json["id"] if accepted.json else None, "steps": 2}
    # One long-poll, answered when the task ended: no busy polling.
    assert len(polls) == 1
    assert "wait=" in polls[0]


def test_follow_honours_retry_after_where_the_server_does_not_wait(
    make_app: AppFactory, held: None
) -> None:
    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_WAIT": 0})
    api.add_resource(Steps, "/steps")
    client = app.test_client()
    polls: list[float] = []

    @app.before_request
    def count() -> None:
        if request.method == "GET":
            polls.append(time.monotonic())

    accepted = client.post("/steps?n=1&hold=1")
    assert HELD.wait(10)
    threading.Timer(1.5, RELEASE.set).start()
    assert follow(client, accepted, timeout=10).status_code == 200
    # Retry-After is 1 s (no progress estimate once all steps are reported).
    assert len(polls) >= 2
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(polls))


def test_follow_times_out_and_the_task_can_be_cancelled(make_app: AppFactory, held: None) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Steps, "/steps")
    client = app.test_client()
    accepted = client.post("/steps?n=1&hold=1")
    assert HELD.wait(10)
    with pytest.raises(TimeoutError, match="has not finished"):
        follow(client, accepted, timeout=0.5)
    # Running: DELETE asks, the handler sees current_task.cancelled and gives up.
    assert client.delete(accepted.headers["Location"]).status_code == 202
    final = follow(client, accepted, timeout=10)
    assert final.status_code == 409
    assert final.json is not None
    assert final.json["state"] == "cancelled"


def test_follow_sends_headers_with_every_poll(make_app: AppFactory) -> None:
    app, api = make_app(
        store="memory://", owner=lambda: request.headers.get("X-User"), config=EAGER
    )
    add_pairs(api, {"dict": _dict})
    client = app.test_client()
    accepted = client.post("/async/dict", headers={"X-User": "ann"})
    # Another identity sees no such task.
    assert follow(client, accepted).status_code == 404
    final = follow(client, accepted, headers={"X-User": "ann"})
    assert final.status_code == 200
    assert final.json is not None
    assert final.json["g"] == "ann"


def test_follow_reads_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert _retry_after("3") == 3
    assert _retry_after(None) == 0
    assert _retry_after("soon") == 0
    assert 28 <= _retry_after(http_date(time.time() + 30)) <= 31
    assert _retry_after(http_date(time.time() - 30)) == 0
