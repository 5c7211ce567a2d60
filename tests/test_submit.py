"""The submit path (CONTRACT section 2) and what a handler sees in its task."""

from __future__ import annotations

import functools
import io
import re
import threading
import typing as t
from datetime import datetime

import pytest
from flask import Flask, g, request
from flask_restful import Resource, abort, reqparse

from flask_restful_async import AsyncResource, TaskState, current_task
from flask_restful_async.state import get_state

from .conftest import AppFactory, wait_done, wait_for

LOCATION = re.compile(r"/tasks/[A-Za-z0-9_-]{22}")


class Echo(AsyncResource):
    def post(self) -> t.Any:
        return {"json": request.get_json(), "args": request.args.to_dict()}, 201, {"X-Echo": "1"}


class PlainEcho(Resource):
    def post(self) -> t.Any:
        return {"json": request.get_json(), "args": request.args.to_dict()}, 201, {"X-Echo": "1"}


def test_accepted_answers_202_location_retry_after_and_status_document(
    make_app: AppFactory,
) -> None:
    app, api = make_app()
    api.add_resource(Echo, "/echo")
    response = app.test_client().post("/echo", json={"a": 1})
    assert response.status_code == 202
    assert LOCATION.fullmatch(response.headers["Location"])
    assert response.headers["Retry-After"] == "1"
    doc = response.json
    assert doc is not None
    assert set(doc) == {
        "id",
        "state",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
        "request",
    }
    assert doc["request"] == {"method": "POST", "path": "/echo"}
    assert response.headers["Location"].endswith(doc["id"])
    assert doc["state"] in ("queued", "running")
    assert doc["progress"] is None
    created = datetime.fromisoformat(doc["created_at"])
    assert created.utcoffset() is not None
    assert created.utcoffset().total_seconds() == 0


def test_final_response_is_what_a_plain_resource_answers(make_app: AppFactory) -> None:
    app, api = make_app()
    api.add_resource(Echo, "/echo")
    api.add_resource(PlainEcho, "/plain")
    client = app.test_client()
    plain = client.post("/plain?x=1", json={"a": [1, 2]})
    accepted = client.post("/echo?x=1", json={"a": [1, 2]})
    final = wait_done(client, accepted.headers["Location"])
    assert final.status_code == plain.status_code == 201
    assert final.data == plain.data
    assert final.headers["X-Echo"] == "1"
    assert final.headers["Content-Type"] == plain.headers["Content-Type"]
    assert final.headers["Cache-Control"] == "no-store"


def test_method_decorators_run_in_the_request_thread_and_can_reject(
    make_app: AppFactory,
) -> None:
    seen: dict[str, int] = {}

    def authenticate(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(func)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            seen["decorator"] = threading.get_ident()
            if request.headers.get("Authorization") != "Bearer ok":
                abort(401, message="who are you?")
            return func(*args, user="alice", **kwargs)

        return wrapper

    class Secret(AsyncResource):
        method_decorators = [authenticate]

        def post(self, user: str) -> t.Any:
            seen["handler"] = threading.get_ident()
            return {"user": user}

    app, api = make_app()
    api.add_resource(Secret, "/secret")
    client = app.test_client()

    rejected = client.post("/secret")
    assert rejected.status_code == 401
    assert rejected.json == {"message": "who are you?"}
    assert get_state(app).store.list(owner=None) == []

    accepted = client.post("/secret", headers={"Authorization": "Bearer ok"})
    assert accepted.status_code == 202
    final = wait_done(client, accepted.headers["Location"])
    assert final.json == {"user": "alice"}
    assert seen["decorator"] == threading.get_ident()
    assert seen["handler"] != threading.get_ident()


def test_body_over_max_content_length_is_413_and_leaves_no_task(make_app: AppFactory) -> None:
    app, api = make_app(config={"MAX_CONTENT_LENGTH": 100})
    api.add_resource(Echo, "/echo")
    response = app.test_client().post("/echo", data=b"x" * 101)
    assert response.status_code == 413
    assert response.json is not None
    assert "message" in response.json
    assert get_state(app).store.list(owner=None) == []


def test_sync_methods_head_and_options_never_create_a_task(make_app: AppFactory) -> None:
    class Mixed(AsyncResource):
        sync_methods = ("get",)

        def get(self) -> t.Any:
            return {"sync": True}

        def post(self) -> t.Any:
            return {"sync": False}

    app, api = make_app()
    api.add_resource(Mixed, "/mixed")
    client = app.test_client()
    assert client.get("/mixed").json == {"sync": True}
    head = client.head("/mixed")
    assert head.status_code == 200
    assert head.data == b""
    options = client.options("/mixed")
    assert options.status_code == 200
    assert {"GET", "POST", "HEAD", "OPTIONS"} <= set(options.headers["Allow"].split(", "))
    assert get_state(app).store.list(owner=None) == []
    assert client.post("/mixed").status_code == 202


def test_head_of_a_background_get_is_405_with_allow_and_never_runs_it(
    make_app: AppFactory,
) -> None:
    ran: list[str] = []

    class Report(AsyncResource):
        def get(self) -> t.Any:
            ran.append("get")
            return {"rows": 1}

        def post(self) -> t.Any:
            return {}

    app, api = make_app()
    api.add_resource(Report, "/report")
    client = app.test_client()
    head = client.head("/report")
    assert head.status_code == 405
    assert head.headers["Allow"] == "GET, OPTIONS, POST"
    assert head.headers["Content-Type"] == "application/json"
    # HEAD has no body on the wire: the same answer to the same request as data.
    with app.test_request_context("/report", method="HEAD"):
        rendered = app.full_dispatch_request()
    assert rendered.status_code == 405
    assert rendered.json is not None
    assert "GET runs as a background task" in rendered.json["message"]
    assert ran == []
    assert get_state(app).store.list(owner=None) == []


def test_head_goes_to_the_resources_own_head(make_app: AppFactory) -> None:
    class Report(AsyncResource):
        def get(self) -> t.Any:
            raise AssertionError("a background get never runs for HEAD")

        def head(self) -> t.Any:
            return {}, 200, {"X-Rows": "1"}

    app, api = make_app()
    api.add_resource(Report, "/report")
    head = app.test_client().head("/report")
    assert head.status_code == 200
    assert head.headers["X-Rows"] == "1"
    assert get_state(app).store.list(owner=None) == []


def test_sync_methods_accept_any_case(make_app: AppFactory) -> None:
    class Shout(AsyncResource):
        sync_methods = ("GET", "Put")

        def get(self) -> t.Any:
            return {"sync": True}

        def put(self) -> t.Any:
            return {"sync": True}

        def post(self) -> t.Any:
            return {"sync": False}

    app, api = make_app()
    api.add_resource(Shout, "/shout")
    client = app.test_client()
    assert client.get("/shout").json == {"sync": True}
    assert client.put("/shout").json == {"sync": True}
    assert client.head("/shout").status_code == 200
    assert get_state(app).store.list(owner=None) == []
    assert client.post("/shout").status_code == 202


@pytest.mark.parametrize(
    ("names", "error", "message"),
    [
        (("gte",), ValueError, "'gte'"),
        (("get", "HEAD"), ValueError, "'HEAD'"),
        ("get", TypeError, "collection of method names"),
    ],
)
def test_sync_methods_refuse_unknown_names_when_the_class_is_made(
    names: t.Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        type("Typo", (AsyncResource,), {"sync_methods": names, "get": lambda self: {}})
    assert "Typo.sync_methods" in str(raised.value)
    if error is ValueError:
        assert "delete, get, patch, post, put" in str(raised.value)


def test_validate_method_runs_in_the_request_thread_before_any_task(
    make_app: AppFactory,
) -> None:
    parser = reqparse.RequestParser()
    parser.add_argument("rows", type=int, required=True, location="json")
    seen: dict[str, int] = {}

    class Report(AsyncResource):
        def validate_post(self, year: int) -> t.Any:
            seen["validate"] = threading.get_ident()
            if year < 2000:
                return {"message": "too old"}, 422
            g.report = dict(parser.parse_args())
            return None

        def post(self, year: int) -> t.Any:
            seen["handler"] = threading.get_ident()
            return {"year": year, "rows": g.report["rows"]}

    app, api = make_app()
    api.add_resource(Report, "/reports/<int:year>")
    client = app.test_client()

    missing = client.post("/reports/2026", json={})
    assert missing.status_code == 400
    assert missing.json is not None
    assert "rows" in missing.json["message"]
    old = client.post("/reports/1999", json={"rows": 3})
    assert old.status_code == 422
    assert old.json == {"message": "too old"}
    assert get_state(app).store.list(owner=None) == []

    accepted = client.post("/reports/2026", json={"rows": 3})
    assert accepted.status_code == 202
    assert wait_done(client, accepted.headers["Location"]).json == {"year": 2026, "rows": 3}
    assert seen["validate"] == threading.get_ident()
    assert seen["handler"] != threading.get_ident()


def test_validate_runs_after_method_decorators_with_their_arguments(
    make_app: AppFactory,
) -> None:
    calls: list[str] = []

    def authenticate(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(func)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            calls.append("decorator")
            if request.headers.get("Authorization") != "Bearer ok":
                abort(401, message="who are you?")
            return func(*args, user="alice", **kwargs)

        return wrapper

    class Owned(AsyncResource):
        method_decorators = [authenticate]

        def validate_put(self, user: str) -> None:
            calls.append(f"validate {user}")
            abort(409, message="not now")

        def put(self, user: str) -> t.Any:
            return {}

        def post(self, user: str) -> t.Any:
            return {"user": user}

    app, api = make_app()
    api.add_resource(Owned, "/owned")
    client = app.test_client()
    assert client.put("/owned").status_code == 401
    assert calls == ["decorator"]
    conflict = client.put("/owned", headers={"Authorization": "Bearer ok"})
    assert conflict.status_code == 409
    assert conflict.json == {"message": "not now"}
    assert calls == ["decorator", "decorator", "validate alice"]
    assert get_state(app).store.list(owner=None) == []
    accepted = client.post("/owned", headers={"Authorization": "Bearer ok"})
    assert wait_done(client, accepted.headers["Location"]).json == {"user": "alice"}


def test_async_def_handlers_run(make_app: AppFactory) -> None:
    class Coroutine(AsyncResource):
        async def post(self) -> t.Any:
            return {"async": True, "path": request.path}

    app, api = make_app()
    api.add_resource(Coroutine, "/co")
    client = app.test_client()
    final = wait_done(client, client.post("/co").headers["Location"])
    assert final.json == {"async": True, "path": "/co"}


def test_handler_sees_a_shallow_copy_of_g(make_app: AppFactory) -> None:
    marker = object()
    seen: dict[str, t.Any] = {}
    app, api = make_app()

    @app.before_request
    def load_user() -> None:
        g.user = marker
        g.name = "alice"

    class WhoAmI(AsyncResource):
        def post(self) -> t.Any:
            seen["user"] = g.user
            g.name = "changed in the task"
            return {"name": "ok"}

    api.add_resource(WhoAmI, "/me")
    client = app.test_client()
    with client:
        accepted = client.post("/me")
        assert g.name == "alice"
    wait_done(client, accepted.headers["Location"])
    assert seen["user"] is marker


def test_teardown_request_runs_once_per_task_in_the_worker(make_app: AppFactory) -> None:
    calls: list[tuple[int, str]] = []
    app, api = make_app()

    @app.teardown_request
    def record(exc: BaseException | None) -> None:
        calls.append((threading.get_ident(), request.path))

    api.add_resource(Echo, "/echo")
    client = app.test_client()
    locations = [client.post("/echo", json=i).headers["Location"] for i in range(5)]
    for location in locations:
        wait_done(client, location)
    worker_calls = [c for c in calls if c[0] != threading.get_ident() and c[1] == "/echo"]
    assert len(worker_calls) == 5


def test_64_tasks_run_at_once_each_in_its_own_context(make_app: AppFactory) -> None:
    barrier = threading.Barrier(64, timeout=10)

    class Together(AsyncResource):
        def post(self, n: int) -> t.Any:
            barrier.wait()  # all 64 handlers are inside their request contexts now
            return {
                "n": n,
                "json": request.get_json(),
                "header": request.headers["X-N"],
                "task": current_task.id,
            }

    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 64})
    api.add_resource(Together, "/together/<int:n>")
    client = app.test_client()
    locations = [
        client.post(f"/together/{i}", json={"i": i}, headers={"X-N": str(i)}).headers["Location"]
        for i in range(64)
    ]
    for i, location in enumerate(locations):
        final = wait_done(client, location)
        assert final.status_code == 200
        assert final.json == {
            "n": i,
            "json": {"i": i},
            "header": str(i),
            "task": location.rsplit("/", 1)[1],
        }


def test_current_task_outside_a_task_raises_runtime_error() -> None:
    with pytest.raises(RuntimeError, match="outside of a task"):
        current_task.progress(1)
    with pytest.raises(RuntimeError, match="outside of a task"):
        _ = current_task.id


def test_progress_is_visible_while_the_task_runs(make_app: AppFactory) -> None:
    reported = threading.Event()
    release = threading.Event()

    class Slow(AsyncResource):
        def post(self) -> t.Any:
            current_task.progress(3, total=10, message="crunching")
            reported.set()
            release.wait(10)
            return {"done": True}

    app, api = make_app()
    api.add_resource(Slow, "/slow")
    client = app.test_client()
    location = client.post("/slow").headers["Location"]
    assert reported.wait(10)
    running = client.get(location)
    assert running.status_code == 202
    assert running.headers["Location"] == location
    assert running.headers["Cache-Control"] == "no-store"
    assert running.json is not None
    assert running.json["state"] == "running"
    assert running.json["started_at"] is not None
    assert running.json["progress"] == {"current": 3, "total": 10, "message": "crunching"}
    release.set()
    assert wait_done(client, location).json == {"done": True}


def test_third_submit_at_one_worker_one_pending_is_503_and_leaves_no_task(
    make_app: AppFactory,
) -> None:
    release = threading.Event()

    class Blocked(AsyncResource):
        def post(self) -> t.Any:
            release.wait(10)
            return {}

    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 1})
    api.add_resource(Blocked, "/blocked")
    client = app.test_client()
    first = client.post("/blocked")
    second = client.post("/blocked")
    third = client.post("/blocked")
    assert (first.status_code, second.status_code, third.status_code) == (202, 202, 503)
    assert int(third.headers["Retry-After"]) >= 1
    assert third.json is not None
    assert "message" in third.json
    assert len(get_state(app).store.list(owner=None)) == 2
    release.set()
    wait_done(client, first.headers["Location"])
    wait_done(client, second.headers["Location"])
    assert client.post("/blocked").status_code == 202


def test_threads_stay_bounded_across_1000_blocked_submissions(make_app: AppFactory) -> None:
    release = threading.Event()

    class Blocked(AsyncResource):
        def post(self) -> t.Any:
            release.wait(20)
            return {}

    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 4, "RESTFUL_ASYNC_MAX_PENDING": 16})
    api.add_resource(Blocked, "/blocked")
    before = threading.active_count()
    codes: list[int] = []
    lock = threading.Lock()

    def submit_many(count: int) -> None:
        client = app.test_client()
        for _ in range(count):
            code = client.post("/blocked").status_code
            with lock:
                codes.append(code)

    submitters = [threading.Thread(target=submit_many, args=(125,)) for _ in range(8)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join(30)
    try:
        assert len(codes) == 1000
        assert codes.count(202) == 20
        assert codes.count(503) == 980
        assert get_state(app).executor.thread_count == 4  # type: ignore[attr-defined]
        # the 4 workers and this process's lease renewal
        assert threading.active_count() <= before + 4 + 1
    finally:
        release.set()
    client = app.test_client()
    wait_for(lambda: len(get_state(app).store.list(owner=None, state=TaskState.SUCCEEDED)) == 20)
    assert client.post("/blocked").status_code == 202


def test_form_fields_and_files_reach_the_handler(make_app: AppFactory) -> None:
    class Upload(AsyncResource):
        def post(self) -> t.Any:
            upload = request.files["doc"]
            return {
                "field": request.form["field"],
                "name": upload.filename,
                "content": upload.read().decode(),
            }

    app, api = make_app()
    api.add_resource(Upload, "/upload")
    client = app.test_client()
    accepted = client.post(
        "/upload",
        data={"field": "value", "doc": (io.BytesIO(b"file body"), "a.txt")},
        content_type="multipart/form-data",
    )
    assert wait_done(client, accepted.headers["Location"]).json == {
        "field": "value",
        "name": "a.txt",
        "content": "file body",
    }


def test_form_parsed_before_submit_still_reaches_the_handler(make_app: AppFactory) -> None:
    app, api = make_app()

    @app.before_request
    def peek() -> None:
        # consumes the input stream before the resource can copy the raw body
        _ = request.form.get("field")

    class Upload(AsyncResource):
        def post(self) -> t.Any:
            return {"field": request.form["field"], "content": request.files["doc"].read().decode()}

    api.add_resource(Upload, "/upload")
    client = app.test_client()
    accepted = client.post(
        "/upload",
        data={"field": "v", "doc": (io.BytesIO(b"bytes"), "b.bin")},
        content_type="multipart/form-data",
    )
    assert wait_done(client, accepted.headers["Location"]).json == {
        "field": "v",
        "content": "bytes",
    }


def test_replay_in_another_process_builds_the_resource_with_its_class_kwargs(
    make_app: AppFactory,
) -> None:
    """The path an executor that crosses processes takes: no resource instance."""
    from flask_restful_async.runner import run_task
    from flask_restful_async.snapshot import RequestSnapshot
    from flask_restful_async.task import Task

    decorator_calls: list[str] = []

    def counted(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(func)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            decorator_calls.append(request.method)
            return func(*args, **kwargs)

        return wrapper

    class Configured(AsyncResource):
        method_decorators = [counted]

        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

        def put(self, name: str) -> t.Any:
            return {"text": f"{self.greeting}, {name}", "body": request.get_data(as_text=True)}

    app, api = make_app()
    api.add_resource(Configured, "/greet/<name>", resource_class_kwargs={"greeting": "hello"})
    with app.test_request_context("/greet/bob", method="PUT", data="payload"):
        body = request.get_data()
        snapshot = RequestSnapshot.capture(body, "put", (), {"name": "bob"})
    task = get_state(app).store.create(Task(id="t" * 22))
    run_task(app, task.id, snapshot)
    finished = get_state(app).store.get(task.id)
    assert finished is not None
    assert finished.state is TaskState.SUCCEEDED
    assert finished.response is not None
    assert finished.response.body == b'{"text": "hello, bob", "body": "payload"}\n'
    assert decorator_calls == []


def test_handler_exception_is_a_500_without_traceback_logged_with_the_task_id(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(AsyncResource):
        def post(self) -> t.Any:
            raise ValueError("secret internals")

    app, api = make_app()
    api.add_resource(Broken, "/broken")
    client = app.test_client()
    location = client.post("/broken").headers["Location"]
    final = wait_done(client, location)
    assert final.status_code == 500
    assert final.json == {"message": "Internal Server Error"}
    assert b"secret" not in final.data
    assert b"Traceback" not in final.data
    task_id = location.rsplit("/", 1)[1]
    assert any(task_id in r.getMessage() and r.exc_info for r in caplog.records)
    task = get_state(app).store.get(task_id)
    assert task is not None
    assert task.state is TaskState.FAILED


def test_http_exception_keeps_its_status_and_flask_restful_body(make_app: AppFactory) -> None:
    class Conflict(AsyncResource):
        def post(self) -> t.Any:
            abort(409, message="already there")

    app, api = make_app()
    api.add_resource(Conflict, "/conflict")
    client = app.test_client()
    final = wait_done(client, client.post("/conflict").headers["Location"])
    assert final.status_code == 409
    assert final.json == {"message": "already there"}


def test_raise_if_cancelled_ends_the_task_as_cancelled(make_app: AppFactory) -> None:
    started = threading.Event()
    release = threading.Event()

    class Cancellable(AsyncResource):
        def post(self) -> t.Any:
            started.set()
            release.wait(10)
            current_task.raise_if_cancelled()
            return {"finished": True}

    app, api = make_app()
    api.add_resource(Cancellable, "/job")
    client = app.test_client()
    location = client.post("/job").headers["Location"]
    assert started.wait(10)
    get_state(app).store.request_cancel(location.rsplit("/", 1)[1])
    release.set()
    final = wait_done(client, location)
    assert final.status_code == 409
    assert final.json is not None
    assert final.json["state"] == "cancelled"


def test_the_app_object_not_a_proxy_reaches_the_worker(make_app: AppFactory) -> None:
    seen: dict[str, Flask] = {}

    class Which(AsyncResource):
        def post(self) -> t.Any:
            from flask import current_app

            seen["app"] = current_app._get_current_object()  # type: ignore[attr-defined]
            return {}

    app, api = make_app()
    api.add_resource(Which, "/which")
    client = app.test_client()
    wait_done(client, client.post("/which").headers["Location"])
    assert seen["app"] is app


def test_a_body_over_the_task_body_cap_is_413_before_any_task(make_app: AppFactory) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_BODY": 1000})
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    assert client.post("/echo", data=b"x" * 1001).status_code == 413

    # no Content-Length: a chunked upload, whose size is known only while reading
    chunked = client.post(
        "/echo",
        input_stream=io.BytesIO(b"y" * 1001),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert chunked.status_code == 413
    assert get_state(app).store.list(owner=None) == []
    assert client.post("/echo", json={"small": True}).status_code == 202
