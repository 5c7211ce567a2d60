"""The dashboard without a browser: who may see what, its headers, its files, its JSON,
and the cross-site refusal of DELETE on the status URL."""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

import pytest
from flask import Blueprint, Flask, abort, request
from flask_restful import Api

from flask_restful_async import Task, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.task import StoredResponse, new_task_id

from .conftest import AppFactory

DASHBOARD = "/tasks/dashboard"
ON = {"RESTFUL_ASYNC_DASHBOARD": DASHBOARD}
RESPONSE = StoredResponse(
    201, [("Content-Type", "application/json"), ("X-Report", "done")], b'{"rows": 42}\n'
)


def caller() -> str | None:
    return request.headers.get("X-User")


def operator() -> bool:
    return request.headers.get("X-Role") == "operator"


def add_task(app: Flask, owner: str | None, state: TaskState = TaskState.QUEUED) -> Task:
    """A task recorded straight in the store, in ``state``."""
    store = get_state(app).store
    task = store.create(Task(new_task_id(), owner=owner, method="POST", path="/reports"))
    if state is TaskState.RUNNING:
        store.start(task.id, "a-worker")
    elif state is TaskState.SUCCEEDED:
        store.finish(task.id, state, RESPONSE)
    elif state.finished:
        store.finish(task.id, state)
    return task


@pytest.fixture
def app(make_app: AppFactory) -> Flask:
    made, _ = make_app(config=ON, owner=caller, admin=operator, store="memory://")
    return made


# -- switching it on ---------------------------------------------------------------


def test_off_by_default(make_app: AppFactory) -> None:
    app, _ = make_app(owner=caller)
    assert app.test_client().get(DASHBOARD).status_code == 404
    assert "restful_async_dashboard" not in app.blueprints


def test_refused_without_owner_or_admin_outside_debug(make_app: AppFactory) -> None:
    with pytest.raises(RuntimeError, match="neither an owner nor an admin callable") as e:
        make_app(config=ON)
    assert "anyone" in str(e.value)


@pytest.mark.parametrize(
    "options",
    [{"owner": caller}, {"admin": operator}, {"config": {**ON, "DEBUG": True}}],
    ids=["owner", "admin", "debug"],
)
def test_served_with_owner_admin_or_in_debug(
    make_app: AppFactory, options: dict[str, t.Any]
) -> None:
    config = options.pop("config", ON)
    app, _ = make_app(config=config, **options)
    headers = {"X-Role": "operator"} if "admin" in options else {}
    if "owner" in options:
        headers = {"X-User": "alice"}
        # A caller the owner callable does not name has no list of their own.
        assert app.test_client().get(DASHBOARD).status_code == 404
    assert app.test_client().get(DASHBOARD, headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["tasks/dashboard", "/", 42, "/tasks", "/tasks/"])
def test_a_bad_path_is_refused(make_app: AppFactory, path: object) -> None:
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_DASHBOARD"):
        make_app(config={"RESTFUL_ASYNC_DASHBOARD": path}, owner=caller)


def test_admin_must_be_callable(make_app: AppFactory) -> None:
    with pytest.raises(TypeError, match="admin"):
        make_app(config=ON, owner=caller, admin=True)


# -- the page and its files ----------------------------------------------------------


def test_the_page_is_served_under_a_strict_csp_with_nothing_inline(app: Flask) -> None:
    response = app.test_client().get(DASHBOARD, headers={"X-User": "alice"})
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Content-Security-Policy"] == "default-src 'self'"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    assert "<style" not in html
    assert " style=" not in html
    assert not re.search(r"<[^>]*\son\w+=", html)  # no onclick= or the like
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert 'src="/tasks/dashboard/static/' in tag
    # Every URL in the page is of this origin.
    for url in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert url.startswith("/"), url
    assert "http://" not in html
    assert "https://" not in html


@pytest.mark.parametrize(
    ("name", "mimetype"),
    [
        ("dashboard.js", "text/javascript"),
        ("dashboard.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_are_served(app: Flask, name: str, mimetype: str) -> None:
    # No data in them: served to anyone, as static files are.
    response = app.test_client().get(f"{DASHBOARD}/static/{name}")
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert len(response.get_data()) > 100
    response.close()


def test_a_caller_who_may_see_no_list_gets_404(make_app: AppFactory) -> None:
    # An admin callable but no owner: only operators have a dashboard.
    app, _ = make_app(config=ON, admin=operator, store="memory://")
    client = app.test_client()
    for url in (DASHBOARD, f"{DASHBOARD}/api/tasks"):
        assert client.get(url).status_code == 404
        assert client.get(url, headers={"X-Role": "operator"}).status_code == 200


def test_the_decorators_guard_the_page_and_its_json(make_app: AppFactory) -> None:
    def login_required(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        def guarded(*args: t.Any, **kwargs: t.Any) -> t.Any:
            if "X-User" not in request.headers:
                abort(401)
            return view(*args, **kwargs)

        return guarded

    app, _ = make_app(config=ON, owner=caller, decorators=[login_required])
    client = app.test_client()
    for url in (DASHBOARD, f"{DASHBOARD}/api/tasks", f"{DASHBOARD}/api/tasks/{'a' * 22}"):
        assert client.get(url).status_code == 401
    assert client.get(DASHBOARD, headers={"X-User": "alice"}).status_code == 200


# -- what it shows -------------------------------------------------------------------


def test_an_owner_sees_their_own_tasks_and_counts_only(app: Flask) -> None:
    mine = [add_task(app, "alice", state) for state in (TaskState.QUEUED, TaskState.SUCCEEDED)]
    theirs = add_task(app, "bob", TaskState.RUNNING)
    client = app.test_client()
    data = client.get(f"{DASHBOARD}/api/tasks", headers={"X-User": "alice"}).json
    assert data is not None
    assert [task["id"] for task in data["tasks"]] == [task.id for task in reversed(mine)]
    assert data["counts"]["queued"] == 1
    assert data["counts"]["succeeded"] == 1
    assert data["counts"]["running"] == 0
    assert data["every"] is False
    assert "owner" not in data["tasks"][0]
    assert data["tasks"][0]["url"] == f"/tasks/{mine[1].id}"
    # What GET /tasks shows the same caller.
    listed = client.get("/tasks", headers={"X-User": "alice"}).json
    assert listed is not None
    assert [task["id"] for task in listed["tasks"]] == [task["id"] for task in data["tasks"]]
    # Another owner's task is unknown, to the page and to its detail.
    detail = client.get(f"{DASHBOARD}/api/tasks/{theirs.id}", headers={"X-User": "alice"})
    assert detail.status_code == 404
    assert detail.json == {"message": "No such task."}


def test_an_operator_sees_every_task_with_its_owner(app: Flask) -> None:
    add_task(app, "alice")
    bobs = add_task(app, "bob", TaskState.RUNNING)
    client = app.test_client()
    headers = {"X-User": "carol", "X-Role": "operator"}
    data = client.get(f"{DASHBOARD}/api/tasks", headers=headers).json
    assert data is not None
    assert data["every"] is True
    assert [task["owner"] for task in data["tasks"]] == ["bob", "alice"]
    assert data["counts"]["queued"] == 1
    assert data["counts"]["running"] == 1
    detail = client.get(f"{DASHBOARD}/api/tasks/{bobs.id}", headers=headers).json
    assert detail is not None
    assert detail["task"]["owner"] == "bob"
    assert detail["answer"] == 202
    page = client.get(DASHBOARD, headers=headers).get_data(as_text=True)
    assert "Every owner" in page


def test_pages_follow_the_store_cursor_and_the_state_filter(app: Flask) -> None:
    made = [add_task(app, "alice") for _ in range(3)]
    add_task(app, "alice", TaskState.FAILED)
    client = app.test_client()
    headers = {"X-User": "alice"}
    url = f"{DASHBOARD}/api/tasks?state=queued&limit=2"
    first = client.get(url, headers=headers).json
    assert first is not None
    assert [task["id"] for task in first["tasks"]] == [made[2].id, made[1].id]
    assert first["next"] == made[1].id
    second = client.get(f"{url}&cursor={first['next']}", headers=headers).json
    assert second is not None
    assert [task["id"] for task in second["tasks"]] == [made[0].id]
    assert second["next"] is None
    assert second["counts"]["failed"] == 1  # counts are of every state, whatever the filter
    uncounted = client.get(f"{url}&counts=0", headers=headers).json
    assert uncounted is not None
    assert uncounted["counts"] is None
    assert len(uncounted["tasks"]) == 2


def test_the_detail_tells_the_303_of_a_result_redirect(make_app: AppFactory) -> None:
    app, _ = make_app(
        config={**ON, "RESTFUL_ASYNC_RESULT_REDIRECT": True}, owner=caller, store="memory://"
    )
    done = add_task(app, "alice", TaskState.SUCCEEDED)
    client = app.test_client()
    data = client.get(f"{DASHBOARD}/api/tasks/{done.id}", headers={"X-User": "alice"})
    assert data.json is not None
    assert data.json["answer"] == 303
    assert client.get(f"/tasks/{done.id}", headers={"X-User": "alice"}).status_code == 303


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "limit=x", "state=done", "cursor=nope"])
def test_bad_queries_are_400(app: Flask, query: str) -> None:
    response = app.test_client().get(f"{DASHBOARD}/api/tasks?{query}", headers={"X-User": "a"})
    assert response.status_code == 400
    assert response.json is not None
    assert response.json["message"]


def test_the_detail_shows_the_stored_response(app: Flask) -> None:
    done = add_task(app, "alice", TaskState.SUCCEEDED)
    data = app.test_client().get(f"{DASHBOARD}/api/tasks/{done.id}", headers={"X-User": "alice"})
    assert data.json is not None
    assert data.json["answer"] == 201
    assert data.json["task"]["state"] == "succeeded"
    assert data.json["response"] == {
        "status": 201,
        "headers": [["Content-Type", "application/json"], ["X-Report", "done"]],
        "body": '{"rows": 42}\n',
        "size": 13,
        "truncated": False,
    }


def test_the_detail_previews_a_long_body_and_not_a_binary_one(app: Flask) -> None:
    store = get_state(app).store
    long = store.create(Task(new_task_id(), owner="alice"))
    store.finish(long.id, TaskState.SUCCEEDED, StoredResponse(200, [], b"x" * 5000))
    binary = store.create(Task(new_task_id(), owner="alice"))
    store.finish(binary.id, TaskState.FAILED, StoredResponse(500, [], b"\x00\x01"))
    client = app.test_client()
    shown = client.get(f"{DASHBOARD}/api/tasks/{long.id}", headers={"X-User": "alice"}).json
    assert shown is not None
    assert shown["response"]["body"] == "x" * 4096
    assert shown["response"]["truncated"] is True
    shown = client.get(f"{DASHBOARD}/api/tasks/{binary.id}", headers={"X-User": "alice"}).json
    assert shown is not None
    assert shown["response"]["body"] is None
    assert shown["answer"] == 500


# -- DELETE from a page of another site ----------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
    ],
    ids=["fetch-metadata", "fetch-metadata-wins", "origin", "opaque-origin"],
)
def test_a_cross_site_delete_is_refused(app: Flask, headers: dict[str, str]) -> None:
    task = add_task(app, "alice")
    client = app.test_client()
    response = client.delete(f"/tasks/{task.id}", headers={"X-User": "alice", **headers})
    assert response.status_code == 403
    assert response.json == {"message": "A page of another site may not cancel or forget tasks."}
    assert get_state(app).store.get(task.id).state is TaskState.QUEUED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "http://localhost"},
    ],
    ids=["not-a-browser", "same-origin", "same-site", "origin-of-this-host"],
)
def test_a_same_site_delete_cancels(app: Flask, headers: dict[str, str]) -> None:
    task = add_task(app, "alice")
    response = app.test_client().delete(f"/tasks/{task.id}", headers={"X-User": "alice", **headers})
    assert response.status_code == 200
    assert response.json is not None
    assert response.json["state"] == "cancelled"


def test_cross_site_delete_may_be_allowed(make_app: AppFactory) -> None:
    app, _ = make_app(owner=caller, config={"RESTFUL_ASYNC_CROSS_SITE_DELETE": True})
    task = add_task(app, "alice")
    response = app.test_client().delete(
        f"/tasks/{task.id}", headers={"X-User": "alice", "Sec-Fetch-Site": "cross-site"}
    )
    assert response.status_code == 200


def test_an_operator_may_cancel_and_forget_any_task(app: Flask) -> None:
    running = add_task(app, "bob", TaskState.RUNNING)
    finished = add_task(app, "bob", TaskState.SUCCEEDED)
    client = app.test_client()
    # Not to another owner...
    for task in (running, finished):
        assert client.delete(f"/tasks/{task.id}", headers={"X-User": "alice"}).status_code == 404
    # ...but to an operator.
    operator_headers = {"X-User": "carol", "X-Role": "operator"}
    cancelling = client.delete(f"/tasks/{running.id}", headers=operator_headers)
    assert cancelling.status_code == 202
    assert cancelling.json is not None
    assert cancelling.json["cancel_requested"] is True
    assert client.delete(f"/tasks/{finished.id}", headers=operator_headers).status_code == 204
    assert get_state(app).store.get(finished.id) is None
    # Reading a task is still its owner's alone.
    assert client.get(f"/tasks/{running.id}", headers=operator_headers).status_code == 404


def test_an_operator_streams_every_owners_tasks(make_app: AppFactory) -> None:
    app, _ = make_app(
        config={**ON, "RESTFUL_ASYNC_MAX_STREAM": 1},
        owner=caller,
        admin=operator,
        store="memory://",
    )
    bobs = add_task(app, "bob", TaskState.RUNNING)
    headers = {"X-User": "carol", "X-Role": "operator", "Accept": "text/event-stream"}
    page = app.test_client().get(DASHBOARD, headers=headers).get_data(as_text=True)
    assert f'data-stream-url="{DASHBOARD}/api/tasks"' in page
    response = app.test_client().get(f"{DASHBOARD}/api/tasks", headers=headers, buffered=False)
    try:
        assert response.status_code == 200
        assert response.mimetype == "text/event-stream"
        first = next(iter(response.response)).decode()
    finally:
        response.close()
    assert "event: status" in first
    assert bobs.id in first
    # An owner's page listens to the list URL, which has their own tasks.
    page = app.test_client().get(DASHBOARD, headers={"X-User": "alice"}).get_data(as_text=True)
    assert 'data-stream-url="/tasks"' in page


def test_an_api_on_a_blueprint_serves_it_with_its_own_list_url(tmp_path: Path) -> None:
    blueprint = Blueprint("v1", __name__, url_prefix="/v1")
    api = Api(blueprint)
    register_async(api, owner=caller)
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(ON)
    app.register_blueprint(blueprint)
    try:
        add_task(app, "alice")
        client = app.test_client()
        page = client.get(DASHBOARD, headers={"X-User": "alice"}).get_data(as_text=True)
        assert 'data-stream-url="/v1/tasks"' in page
        data = client.get(f"{DASHBOARD}/api/tasks", headers={"X-User": "alice"}).json
        assert data is not None
        assert data["tasks"][0]["url"].startswith("/v1/tasks/")
    finally:
        get_state(app).close()


@pytest.mark.parametrize("registered_at", ["blueprint", "register"])
def test_a_blueprints_prefix_counts_in_the_paths_the_dashboard_may_not_take(
    tmp_path: Path, registered_at: str
) -> None:
    def made(dashboard: str) -> Flask:
        blueprint = Blueprint(
            "v1", __name__, url_prefix="/api/v1" if registered_at == "blueprint" else None
        )
        register_async(Api(blueprint), owner=caller)
        app = Flask(__name__, instance_path=str(tmp_path))
        app.config.update(RESTFUL_ASYNC_STORE="memory://", RESTFUL_ASYNC_DASHBOARD=dashboard)
        if registered_at == "blueprint":
            app.register_blueprint(blueprint)
        else:
            app.register_blueprint(blueprint, url_prefix="/api/v1/")
        return app

    # The task list's own path, with the prefix: refused, not served in its place.
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_DASHBOARD"):
        made("/api/v1/tasks")
    # /tasks is free in this app: the list is under the prefix.
    app = made("/tasks")
    try:
        client = app.test_client()
        assert client.get("/tasks", headers={"X-User": "alice"}).mimetype == "text/html"
        assert client.get("/api/v1/tasks", headers={"X-User": "alice"}).json == {
            "tasks": [],
            "next": None,
        }
    finally:
        get_state(app).close()


def test_a_get_of_the_cancel_url_is_a_405_that_names_post(app: Flask) -> None:
    client = app.test_client()
    queued = add_task(app, "alice")
    answer = client.get(f"{DASHBOARD}/api/tasks/{queued.id}/cancel", headers={"X-User": "alice"})
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "OPTIONS, POST"
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.json == {"message": "Cancel a task with POST."}
    # Not a task: the JSON 404 of any other path.
    assert client.get(f"{DASHBOARD}/api/tasks/x/cancel", headers={"X-User": "alice"}).json == {
        "message": "No such task."
    }
    # Nor to a caller with no page, who learns nothing of it.
    assert client.get(f"{DASHBOARD}/api/tasks/{queued.id}/cancel").status_code == 404


def test_cancel_never_forgets_a_task_that_finished(app: Flask) -> None:
    # The page's Cancel: a row still read running when its task finished; a
    # DELETE then deleted the result.
    client = app.test_client()
    alice = {"X-User": "alice"}
    queued = add_task(app, "alice")
    running = add_task(app, "alice", TaskState.RUNNING)
    done = add_task(app, "alice", TaskState.SUCCEEDED)
    url = f"{DASHBOARD}/api/tasks/%s/cancel"
    # A form of another page could POST this without the browser asking first.
    assert client.post(url % queued.id, headers=alice, data={"a": "1"}).status_code == 415
    alice = {**alice, "Content-Type": "application/json"}
    answer = client.post(url % queued.id, headers=alice)
    assert answer.status_code == 200
    assert answer.json is not None
    assert answer.json["state"] == "cancelled"
    answer = client.post(url % running.id, headers=alice)
    assert answer.status_code == 202
    assert answer.json is not None
    assert answer.json["cancel_requested"] is True
    answer = client.post(url % done.id, headers=alice)
    assert answer.status_code == 409
    assert answer.headers["Cache-Control"] == "no-store"
    kept = get_state(app).store.get(done.id)
    assert kept is not None
    assert kept.state is TaskState.SUCCEEDED
    bob = {**alice, "X-User": "bob"}
    assert client.post(url % queued.id, headers=bob).status_code == 404
    cross = {**alice, "Sec-Fetch-Site": "cross-site"}
    assert client.post(url % running.id, headers=cross).status_code == 403
