"""Task control over HTTP: idempotency keys, Retry-After from progress, the
result redirect, and the owner warning."""

from __future__ import annotations

import logging
import threading
import time
import typing as t
from pathlib import Path

import pytest
from flask import Flask, request
from flask_restful import Api

from flask_restful_async import (
    AsyncResource,
    Progress,
    Task,
    TaskState,
    current_task,
    register_async,
)
from flask_restful_async.state import get_state
from flask_restful_async.task import new_task_id

from .conftest import AppFactory, wait_done


class Echo(AsyncResource):
    def post(self) -> t.Any:
        return {"echo": request.get_json()}

    def put(self) -> t.Any:
        return {"put": request.get_json()}


class Anywhere(AsyncResource):
    def post(self, where: str) -> t.Any:
        return {"where": where}


def test_keys_with_spaces_never_meet_across_paths(make_app: AppFactory) -> None:
    # "/at/a b" with key "c" and "/at/a" with key "b c" once made one scope.
    app, api = make_app()
    api.add_resource(Anywhere, "/at/<path:where>")
    client = app.test_client()
    first = client.post("/at/a b", data=b"x", headers={"Idempotency-Key": "c"})
    second = client.post("/at/a", data=b"x", headers={"Idempotency-Key": "b c"})
    third = client.post("/at/a%2520b", data=b"x", headers={"Idempotency-Key": "c"})
    assert [r.status_code for r in (first, second, third)] == [202, 202, 202]
    locations = {r.headers["Location"] for r in (first, second, third)}
    assert len(locations) == 3
    assert wait_done(client, second.headers["Location"]).json == {"where": "a"}
    again = client.post("/at/a b", data=b"x", headers={"Idempotency-Key": "c"})
    assert again.headers["Location"] == first.headers["Location"]


def test_a_repeated_idempotency_key_answers_the_first_task(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store()
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    headers = {"Idempotency-Key": "order-1"}
    first = client.post("/echo", json={"n": 1}, headers=headers)
    assert first.status_code == 202
    wait_done(client, first.headers["Location"])
    again = client.post("/echo", json={"n": 1}, headers=headers)
    assert again.status_code == 202
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json is not None
    assert again.json["state"] == "succeeded"
    assert len(get_state(app).store.list(owner=None)) == 1
    # the key is scoped by method and path: another method is another task
    other = client.put("/echo", json={"n": 1}, headers=headers)
    assert other.headers["Location"] != first.headers["Location"]


def test_the_same_key_with_another_body_is_422(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store()
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    headers = {"Idempotency-Key": "k"}
    assert client.post("/echo", json={"n": 1}, headers=headers).status_code == 202
    conflict = client.post("/echo", json={"n": 2}, headers=headers)
    assert conflict.status_code == 422
    assert conflict.json is not None
    assert "Idempotency-Key" in conflict.json["message"]
    assert len(get_state(app).store.list(owner=None)) == 1


def test_the_same_key_with_another_query_string_is_422(make_app_any_store: AppFactory) -> None:
    # Only the body told a repeat: POST /echo?n=3 with the key of POST /echo?n=2
    # (same body) got the first task's Location and result.
    app, api = make_app_any_store()
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    headers = {"Idempotency-Key": "q"}
    first = client.post("/echo?n=2", json={"n": 1}, headers=headers)
    assert first.status_code == 202
    again = client.post("/echo?n=2", json={"n": 1}, headers=headers)
    assert again.headers["Location"] == first.headers["Location"]
    assert client.post("/echo?n=3", json={"n": 1}, headers=headers).status_code == 422
    assert client.post("/echo", json={"n": 1}, headers=headers).status_code == 422
    assert len(get_state(app).store.list(owner=None)) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
def test_a_malformed_key_is_400_and_creates_nothing(
    make_app_any_store: AppFactory, key: str
) -> None:
    app, api = make_app_any_store()
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    response = client.post("/echo", json=1, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert response.json is not None
    assert "message" in response.json
    assert get_state(app).store.list(owner=None) == []


def test_keys_of_different_owners_never_meet(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store(owner=lambda: request.headers.get("X-User"))
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    alice = client.post("/echo", json=1, headers={"Idempotency-Key": "k", "X-User": "alice"})
    bob = client.post("/echo", json=2, headers={"Idempotency-Key": "k", "X-User": "bob"})
    assert alice.status_code == bob.status_code == 202
    assert alice.headers["Location"] != bob.headers["Location"]


def test_concurrent_duplicates_create_exactly_one_task(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store()
    api.add_resource(Echo, "/echo")
    barrier = threading.Barrier(20, timeout=10)
    locations: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        client = app.test_client()
        barrier.wait()
        response = client.post("/echo", json={"same": True}, headers={"Idempotency-Key": "dup"})
        assert response.status_code == 202
        with lock:
            locations.append(response.headers["Location"])

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(locations) == 20
    assert len(set(locations)) == 1
    assert len(get_state(app).store.list(owner=None)) == 1


def test_retry_after_is_estimated_from_progress(make_app_any_store: AppFactory) -> None:
    reported = threading.Event()
    release = threading.Event()

    class Slow(AsyncResource):
        def post(self) -> t.Any:
            time.sleep(0.5)
            current_task.progress(1, total=11)  # 10 more steps at 0.5 s each: 5 s
            reported.set()
            release.wait(10)
            return {}

    app, api = make_app_any_store(config={"RESTFUL_ASYNC_MAX_RETRY_AFTER": 30})
    api.add_resource(Slow, "/slow")
    client = app.test_client()
    location = client.post("/slow").headers["Location"]
    assert reported.wait(10)
    running = client.get(location)
    assert running.status_code == 202
    assert 4 <= int(running.headers["Retry-After"]) <= 7
    release.set()
    wait_done(client, location)


def test_retry_after_counts_the_rate_up_to_the_report_not_up_to_the_poll(
    make_app: AppFactory,
) -> None:
    """1 step of 10 done 0.5 s after the start, a poll 1.5 s after that report:
    4.5 s of work to go at that rate, 1.5 of them gone since. Counted up to the
    poll instead, the rate would be four times slower (18 s)."""
    app, _ = make_app(config={"RESTFUL_ASYNC_MAX_RETRY_AFTER": 60})
    state = get_state(app)
    now = time.time()
    task = Task(id=new_task_id(), state=TaskState.RUNNING, started_at=now - 2.0)
    task.progress = Progress(1, 10, at=now - 1.5)
    assert state.retry_after_for(task) == 3
    # A record of an earlier version, whose progress has no time: up to the poll.
    task.progress = Progress(1, 10)
    assert state.retry_after_for(task) in (18, 19)  # the poll comes a little later
    # Past its estimate, as past a report from a clock ahead: the least, 1 s.
    task.progress = Progress(1, 10, at=now - 1.9)
    assert state.retry_after_for(task) == 1
    task.progress = Progress(1, 10, at=now + 30)
    assert state.retry_after_for(task) in (18, 19)


def test_progress_takes_finite_numbers_only(make_app: AppFactory) -> None:
    """JSON has no NaN nor infinity, and the status document is JSON: the handler's
    call fails (the task fails, 500), the status URL never does."""
    refused: list[str] = []

    class Odd(AsyncResource):
        def post(self) -> t.Any:
            for current, total in ((1, float("inf")), (float("nan"), None), (1, 10**400)):
                try:
                    current_task.progress(current, total=total)
                except ValueError as e:
                    refused.append(str(e))
            current_task.progress(1, total=2)
            return {}

    app, api = make_app()
    api.add_resource(Odd, "/odd")
    client = app.test_client()
    assert wait_done(client, client.post("/odd").headers["Location"]).status_code == 200
    assert refused == ["current and total must be finite numbers"] * 3


def test_retry_after_is_capped(make_app_any_store: AppFactory) -> None:
    reported = threading.Event()
    release = threading.Event()

    class Slow(AsyncResource):
        def post(self) -> t.Any:
            time.sleep(0.2)
            current_task.progress(1, total=1000)
            reported.set()
            release.wait(10)
            return {}

    app, api = make_app_any_store(config={"RESTFUL_ASYNC_MAX_RETRY_AFTER": 3})
    api.add_resource(Slow, "/slow")
    client = app.test_client()
    location = client.post("/slow").headers["Location"]
    assert reported.wait(10)
    assert client.get(location).headers["Retry-After"] == "3"
    release.set()
    wait_done(client, location)


def test_the_result_redirect_mode(make_app_any_store: AppFactory) -> None:
    app, api = make_app_any_store(config={"RESTFUL_ASYNC_RESULT_REDIRECT": True})
    api.add_resource(Echo, "/echo")
    client = app.test_client()
    location = client.post("/echo", json=[1]).headers["Location"]
    deadline = time.monotonic() + 10
    while (finished := client.get(location)).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert finished.status_code == 303
    assert finished.headers["Location"] == location + "/result"
    assert finished.headers["Cache-Control"] == "no-store"
    assert finished.json is not None
    assert finished.json["state"] == "succeeded"
    result = client.get(finished.headers["Location"])
    assert result.status_code == 200
    assert result.json == {"echo": [1]}
    assert result.headers["Cache-Control"] == "no-store"


def test_the_result_url_without_redirect_mode_and_for_unfinished_tasks(
    make_app_any_store: AppFactory,
) -> None:
    release = threading.Event()

    class Waiting(AsyncResource):
        def post(self) -> t.Any:
            release.wait(10)
            return {"late": True}

    app, api = make_app_any_store()
    api.add_resource(Waiting, "/waiting")
    client = app.test_client()
    location = client.post("/waiting").headers["Location"]
    early = client.get(location + "/result")
    assert early.status_code == 404
    assert early.json is not None
    assert early.json["state"] in ("queued", "running")
    release.set()
    assert wait_done(client, location).json == {"late": True}
    assert client.get(location + "/result").json == {"late": True}
    assert client.get("/tasks/" + "b" * 22 + "/result").json == {"message": "No such task."}


def test_without_owner_a_warning_says_ids_are_bearer_tokens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    warned = Flask("warned", instance_path=str(tmp_path / "a"))
    with caplog.at_level(logging.WARNING):
        register_async(Api(warned))
        # Not at set-up (a command like flask tasks serves no one), but with the
        # first request that relies on it, and once.
        assert not any("bearer tokens" in r.getMessage() for r in caplog.records)
        client = warned.test_client()
        assert client.get("/tasks/" + "a" * 22).status_code == 404
        assert client.get("/tasks/" + "a" * 22).status_code == 404
    assert sum("bearer tokens" in r.getMessage() for r in caplog.records) == 1
    assert "the task list answers 404" in caplog.text
    caplog.clear()
    # With the list public, the warning says so rather than that it answers 404.
    public = Flask("public", instance_path=str(tmp_path / "p"))
    public.config["RESTFUL_ASYNC_PUBLIC_LIST"] = True
    with caplog.at_level(logging.WARNING):
        register_async(Api(public))
        assert public.test_client().get("/tasks").status_code == 200
    assert "shows every id to anyone at the task list" in caplog.text
    assert "answers 404" not in caplog.text
    caplog.clear()
    quiet = Flask("quiet", instance_path=str(tmp_path / "b"))
    with caplog.at_level(logging.WARNING):
        register_async(Api(quiet), owner=lambda: None)
    debug = Flask("debug", instance_path=str(tmp_path / "c"))
    debug.debug = True
    with caplog.at_level(logging.WARNING):
        register_async(Api(debug))
        assert debug.test_client().get("/tasks/" + "a" * 22).status_code == 404
    assert not any("bearer tokens" in r.getMessage() for r in caplog.records)
