"""The status URL (CONTRACT section 4) and the task list."""

from __future__ import annotations

import threading
import time
import typing as t

import pytest
from flask import request
from werkzeug.exceptions import NotFound

from flask_restful_async import AsyncResource, MemoryStore, Task, TaskState, current_task
from flask_restful_async.state import get_state
from flask_restful_async.task import new_task_id

from .conftest import AppFactory, wait_done

PUBLIC_LIST = {"RESTFUL_ASYNC_PUBLIC_LIST": True}


class Quick(AsyncResource):
    def post(self) -> t.Any:
        return {"ok": True}


class CountingStore(MemoryStore):
    """Counts lookups, to prove that malformed ids never reach the store."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    def get(self, task_id: str) -> Task | None:
        self.lookups += 1
        return super().get(task_id)


@pytest.mark.parametrize(
    "task_id",
    ["x", "a" * 21, "a" * 23, "a" * 21 + "!", "..%2F..%2Fetc", "%00" * 8, "é" * 22],
)
def test_malformed_ids_are_404_without_a_store_lookup(make_app: AppFactory, task_id: str) -> None:
    store = CountingStore()
    app, _ = make_app(store=store)
    response = app.test_client().get(f"/tasks/{task_id}")
    assert response.status_code == 404
    assert response.json == {"message": "No such task."}
    assert response.headers["Cache-Control"] == "no-store"
    assert store.lookups == 0


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_the_empty_id_is_the_same_json_404(make_app: AppFactory, method: str) -> None:
    app, _ = make_app(store=MemoryStore())
    response = app.test_client().open("/tasks/", method=method)
    assert response.status_code == 404
    assert response.json == {"message": "No such task."}
    assert response.headers["Cache-Control"] == "no-store"


def test_answers_the_router_gives_at_task_urls_are_kept_by_no_cache(
    make_app: AppFactory,
) -> None:
    # OPTIONS (Flask's own answer) and 405 (the router's) never reach the resources;
    # a 405 is cacheable by default (RFC 9110, 15.5.6).
    app, api = make_app(store=MemoryStore(), owner=lambda: "alice")
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    for method, path, code in [
        ("OPTIONS", location, 200),
        ("PUT", location, 405),
        ("OPTIONS", "/tasks", 200),
        ("POST", "/tasks", 405),
        ("PATCH", f"{location}/result", 405),
        # The status rule's catch-all leaves <id>/result to the result's rule: a
        # DELETE there forgets nothing, and says nothing of "No such task.".
        ("DELETE", f"{location}/result", 405),
    ]:
        response = client.open(path, method=method)
        assert (method, path, response.status_code) == (method, path, code)
        assert response.headers["Cache-Control"] == "no-store"
        assert "GET" in response.headers["Allow"]
    assert client.get(location).status_code in (200, 202)  # the DELETE forgot nothing
    # Elsewhere in the app, answers are left as they were.
    assert "Cache-Control" not in client.put("/quick").headers
    assert "Cache-Control" not in client.options("/quick").headers


def test_the_result_url_allows_only_what_it_serves(make_app: AppFactory) -> None:
    """The router's 405 and Flask's OPTIONS list the methods of every rule that
    matches the path: the status URL's catch-all (for ids with slashes) must not
    match a result URL and offer its DELETE there."""
    app, api = make_app(store=MemoryStore())
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    for method in ("PUT", "DELETE", "OPTIONS"):
        response = client.open(f"{location}/result", method=method)
        allowed = {name.strip() for name in response.headers["Allow"].split(",")}
        assert allowed == {"GET", "HEAD", "OPTIONS"}, method
    assert "DELETE" in client.options(location).headers["Allow"]
    # Ids with slashes still get the status URL's JSON 404, for every method it has.
    for path in ("/tasks/a/b", f"{location}/result/more", "/tasks/a/b/result"):
        for method in ("GET", "DELETE"):
            response = client.open(path, method=method)
            assert response.status_code == 404, (method, path)
            assert response.json == {"message": "No such task."}


def test_a_cache_control_of_the_app_at_task_urls_is_left_alone(make_app: AppFactory) -> None:
    app, _ = make_app(store=MemoryStore())

    @app.after_request
    def private(response: t.Any) -> t.Any:
        if request.method == "OPTIONS":
            response.headers["Cache-Control"] = "private"
        return response

    assert app.test_client().options("/tasks/x").headers["Cache-Control"] == "private"


def test_unknown_malformed_and_foreign_ids_get_the_same_404(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick", headers={"X-User": "alice"}).headers["Location"]
    unknown = client.get(f"/tasks/{new_task_id()}", headers={"X-User": "alice"})
    malformed = client.get("/tasks/nope", headers={"X-User": "alice"})
    foreign = client.get(location, headers={"X-User": "mallory"})
    anonymous = client.get(location)
    for response in (unknown, malformed, foreign, anonymous):
        assert response.status_code == 404
        assert response.data == unknown.data
        assert dict(response.headers) == dict(unknown.headers)
    own = client.get(location, headers={"X-User": "alice"})
    assert own.status_code in (200, 202)


def test_cancelled_task_answers_409_with_its_status_document(make_app: AppFactory) -> None:
    app, _ = make_app()
    store = get_state(app).store
    task = store.create(Task(id=new_task_id()))
    store.request_cancel(task.id)
    response = app.test_client().get(f"/tasks/{task.id}")
    assert response.status_code == 409
    assert response.json is not None
    assert response.json["state"] == "cancelled"
    assert response.headers["Cache-Control"] == "no-store"


def test_lost_task_answers_500_with_its_status_document(make_app: AppFactory) -> None:
    app, _ = make_app()
    store = get_state(app).store
    task = store.create(Task(id=new_task_id()))
    store.start(task.id, "gone-worker")
    store.finish(task.id, TaskState.LOST)
    response = app.test_client().get(f"/tasks/{task.id}")
    assert response.status_code == 500
    assert response.json is not None
    assert response.json["state"] == "lost"
    assert response.headers["Cache-Control"] == "no-store"


def test_queued_task_answers_202_with_location_and_retry_after(make_app: AppFactory) -> None:
    app, _ = make_app(config={"RESTFUL_ASYNC_RETRY_AFTER": 3})
    task = get_state(app).store.create(Task(id=new_task_id()))
    response = app.test_client().get(f"/tasks/{task.id}")
    assert response.status_code == 202
    assert response.headers["Location"] == f"/tasks/{task.id}"
    assert response.headers["Retry-After"] == "3"
    assert response.json is not None
    assert response.json["state"] == "queued"


def test_results_expire_to_410_then_404_with_no_thread_of_their_own(
    make_app: AppFactory,
) -> None:
    app, api = make_app(
        config={"RESTFUL_ASYNC_RESULT_TTL": 0.2, "RESTFUL_ASYNC_TOMBSTONE_TTL": 0.2}
    )
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    assert wait_done(client, location).status_code == 200
    threads = threading.active_count()
    time.sleep(0.25)
    gone = client.get(location)
    assert gone.status_code == 410
    assert gone.json is not None
    assert "message" in gone.json
    assert gone.headers["Cache-Control"] == "no-store"
    time.sleep(0.25)
    get_state(app).store.purge_expired()
    assert client.get(location).status_code == 404
    assert threading.active_count() == threads


def test_running_tasks_are_never_evicted(make_app: AppFactory) -> None:
    release = threading.Event()

    class Long(AsyncResource):
        def post(self) -> t.Any:
            release.wait(10)
            return {"late": True}

    app, api = make_app(config={"RESTFUL_ASYNC_RESULT_TTL": 0.05})
    api.add_resource(Long, "/long")
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/long").headers["Location"]
    time.sleep(0.1)
    for _ in range(3):  # finishing other tasks runs the purge
        wait_done(client, client.post("/quick").headers["Location"])
        time.sleep(0.06)
    get_state(app).store.purge_expired()
    assert client.get(location).status_code == 202
    release.set()
    assert wait_done(client, location).json == {"late": True}


def test_task_list_is_newest_first_paginated_and_filtered(make_app: AppFactory) -> None:
    app, api = make_app(config=PUBLIC_LIST)
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    ids = []
    for _ in range(5):
        location = client.post("/quick").headers["Location"]
        wait_done(client, location)
        ids.append(location.rsplit("/", 1)[1])
    newest_first = list(reversed(ids))

    first = client.get("/tasks?limit=2")
    assert first.status_code == 200
    assert first.headers["Cache-Control"] == "no-store"
    body = first.json
    assert body is not None
    assert [doc["id"] for doc in body["tasks"]] == newest_first[:2]
    assert first.headers["Link"] == f'<{body["next"]}>; rel="next"'

    second = client.get(body["next"]).json
    assert second is not None
    assert [doc["id"] for doc in second["tasks"]] == newest_first[2:4]
    third = client.get(second["next"]).json
    assert third is not None
    assert [doc["id"] for doc in third["tasks"]] == newest_first[4:]
    assert third["next"] is None

    assert client.get("/tasks?state=running").json == {"tasks": [], "next": None}
    succeeded = client.get("/tasks?state=succeeded").json
    assert succeeded is not None
    assert len(succeeded["tasks"]) == 5
    assert "Link" not in client.get("/tasks").headers


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=" + "9" * 30,
        "limit=ten",
        "limit=",
        # int() takes all of these; ?wait= never did: one spelling per number
        "limit=5_0",
        "limit=%D9%A5",  # ARABIC-INDIC DIGIT FIVE
        "limit=%EF%BC%95",  # FULLWIDTH DIGIT FIVE
        "limit=%2B5",
        "limit=-5",
        "limit=%205",
        "limit=5%20",
        "state=sleeping",
        "cursor=bad",
    ],
)
def test_task_list_rejects_bad_parameters_with_400_json(make_app: AppFactory, query: str) -> None:
    app, _ = make_app(config=PUBLIC_LIST)
    response = app.test_client().get(f"/tasks?{query}")
    assert response.status_code == 400
    assert response.json is not None
    assert "message" in response.json
    if query.startswith("limit=") and query[6:].isdigit():
        # A number, however long, out of bounds: said as such.
        assert response.json["message"] == "limit must be between 1 and 500."


def test_task_list_is_scoped_to_the_owner(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    mine = client.post("/quick", headers={"X-User": "alice"}).headers["Location"]
    client.post("/quick", headers={"X-User": "bob"})
    listed = client.get("/tasks", headers={"X-User": "alice"}).json
    assert listed is not None
    assert [doc["id"] for doc in listed["tasks"]] == [mine.rsplit("/", 1)[1]]


def test_without_an_owner_the_task_list_is_a_404_and_hands_out_no_id(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store()
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    task_id = location.rsplit("/", 1)[1]
    for query in ("", "?limit=5", "?state=succeeded", "?limit=bad"):
        response = client.get(f"/tasks{query}")
        assert response.status_code == 404
        assert response.headers["Cache-Control"] == "no-store"
        assert response.json == {"message": NotFound.description}
        assert task_id.encode() not in response.data
    assert wait_done(client, location).status_code == 200


def test_a_caller_the_owner_callable_does_not_name_gets_no_list(
    make_app_any_store: AppFactory,
) -> None:
    """Anonymous callers share no owner: a list would show each of them the tasks
    of every other one, and their ids are bearer tokens."""
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]  # an anonymous caller's
    task_id = location.rsplit("/", 1)[1]
    for headers in ({}, {"Accept": "text/event-stream"}):
        response = client.get("/tasks", headers=headers)
        assert response.status_code == 404
        assert response.json == {"message": NotFound.description}
        assert task_id.encode() not in response.data
    assert wait_done(client, location).status_code == 200  # the URL itself works
    named = client.get("/tasks", headers={"X-User": "bob"})
    assert named.status_code == 200
    assert named.json == {"tasks": [], "next": None}


@pytest.mark.parametrize(
    ("options", "debug"),
    [
        ({"config": PUBLIC_LIST}, False),
        ({}, True),
        ({"owner": lambda: "alice"}, False),
    ],
    ids=["RESTFUL_ASYNC_PUBLIC_LIST", "debug", "owner"],
)
def test_the_task_list_is_served_when_public_in_debug_or_with_an_owner(
    make_app: AppFactory, options: dict[str, t.Any], debug: bool
) -> None:
    app, api = make_app(**options)
    app.debug = debug
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    wait_done(client, location)
    listed = client.get("/tasks")
    assert listed.status_code == 200
    assert listed.json is not None
    assert [doc["id"] for doc in listed.json["tasks"]] == [location.rsplit("/", 1)[1]]


def test_delete_of_a_queued_task_cancels_it_and_the_handler_never_runs(
    make_app_any_store: AppFactory,
) -> None:
    release = threading.Event()
    ran: list[str] = []

    class Blocking(AsyncResource):
        def post(self) -> t.Any:
            ran.append(request.get_data(as_text=True))
            release.wait(10)
            return {}

    app, api = make_app_any_store(config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Blocking, "/blocking")
    client = app.test_client()
    first = client.post("/blocking", data="first").headers["Location"]
    queued = client.post("/blocking", data="second").headers["Location"]
    deleted = client.delete(queued)
    assert deleted.status_code == 200
    assert deleted.json is not None
    assert deleted.json["state"] == "cancelled"
    assert deleted.headers["Cache-Control"] == "no-store"
    release.set()
    wait_done(client, first)
    assert client.get(queued).status_code == 409
    assert ran == ["first"]


def test_delete_of_a_running_task_is_seen_by_the_handler(make_app_any_store: AppFactory) -> None:
    started = threading.Event()

    class Polite(AsyncResource):
        def post(self) -> t.Any:
            started.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                current_task.raise_if_cancelled()
                time.sleep(0.01)
            return {"cancelled": False}

    class Stubborn(AsyncResource):
        def post(self) -> t.Any:
            started.set()
            deadline = time.monotonic() + 10
            while not current_task.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            return {"saw_cancel": current_task.cancelled}

    app, api = make_app_any_store(config=PUBLIC_LIST)
    api.add_resource(Polite, "/polite")
    api.add_resource(Stubborn, "/stubborn")
    client = app.test_client()

    location = client.post("/polite").headers["Location"]
    assert started.wait(10)
    response = client.delete(location)
    assert response.status_code == 202
    assert response.json is not None
    assert response.json["cancel_requested"] is True
    final = wait_done(client, location)
    assert final.status_code == 409
    assert final.json is not None
    assert final.json["state"] == "cancelled"

    started.clear()
    location = client.post("/stubborn").headers["Location"]
    assert started.wait(10)
    assert client.delete(location).status_code == 202
    final = wait_done(client, location)
    assert final.status_code == 200
    assert final.json == {"saw_cancel": True}
    listed = client.get("/tasks?limit=1").json
    assert listed is not None
    assert listed["tasks"][0]["cancel_requested"] is True


def test_delete_of_a_finished_task_forgets_it(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store()
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick").headers["Location"]
    wait_done(client, location)
    response = client.delete(location)
    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers  # not Flask's default text/html
    assert client.get(location).status_code == 404
    assert client.delete(location).status_code == 404


def test_delete_by_another_owner_is_a_404_and_changes_nothing(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    location = client.post("/quick", headers={"X-User": "alice"}).headers["Location"]
    denied = client.delete(location, headers={"X-User": "mallory"})
    assert denied.status_code == 404
    assert denied.json == {"message": "No such task."}
    assert client.get(location, headers={"X-User": "alice"}).status_code in (200, 202)
