"""Short tasks: a submit waits for a task that usually ends soon, then answers 202
already finished, so that a client polling by ``Retry-After`` gets it at once."""

from __future__ import annotations

import logging
import threading
import typing as t

import pytest
from flask import Flask

from flask_restful_async import AsyncResource, waiting
from flask_restful_async.estimates import RunTimes
from flask_restful_async.state import AsyncState, get_state
from flask_restful_async.task import Task

from .conftest import AppFactory, wait_done, wait_for

GATE = threading.Event()
#: A short wait long enough that a task of a few milliseconds always ends within
#: it, even on a loaded machine.
GENEROUS = {"RESTFUL_ASYNC_SHORT_WAIT": 5}


class Quick(AsyncResource):
    def post(self) -> t.Any:
        return {"quick": True}


class Gated(AsyncResource):
    def post(self) -> t.Any:
        GATE.wait(10)
        return {"gated": True}


@pytest.fixture(autouse=True)
def open_gate() -> t.Iterator[None]:
    GATE.set()
    yield
    GATE.set()


def count_waits(state: AsyncState, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds of every wait a submit of ``state`` makes before its 202."""
    holds: list[float] = []
    wait_briefly = state.wait_briefly

    def counted(task: Task, seconds: float, ticket: int | None) -> Task:
        holds.append(seconds)
        return wait_briefly(task, seconds, ticket)

    monkeypatch.setattr(state, "wait_briefly", counted)
    return holds


def warm_up(app: Flask, path: str, endpoint: str) -> None:
    """One task of ``path`` run to its end, and its run time recorded."""
    client = app.test_client()
    wait_done(client, client.post(path).headers["Location"])
    state = get_state(app)
    wait_for(lambda: state.run_times.estimate(endpoint, "post") is not None)


def test_run_times_average_recent_samples() -> None:
    times = RunTimes(weight=0.5)
    assert times.estimate("e", "post") is None
    times.record("e", "post", 1.0)
    assert times.estimate("e", "post") == 1.0
    times.record("e", "post", 3.0)
    assert times.estimate("e", "post") == 2.0
    assert times.estimate("e", "get") is None
    with pytest.raises(ValueError, match="weight"):
        RunTimes(weight=0)


def test_quick_task_answers_202_finished_once_its_run_time_is_known(
    make_app_any_store: AppFactory,
) -> None:
    app, api = make_app_any_store(config=GENEROUS)
    api.add_resource(Quick, "/quick")
    client = app.test_client()
    first = client.post("/quick")
    assert first.status_code == 202
    assert first.json is not None
    assert first.json["state"] == "queued"
    assert first.headers["Retry-After"] == "1"
    wait_done(client, first.headers["Location"])
    wait_for(lambda: get_state(app).run_times.estimate("quick", "post") is not None)

    second = client.post("/quick")
    assert second.status_code == 202  # without Prefer, a submit always answers 202
    assert second.json is not None
    assert second.json["state"] == "succeeded"
    assert second.headers["Retry-After"] == "0"
    # A task that ran has started, in the 202 as at the status URL.
    assert second.json["started_at"] is not None
    assert second.json["started_at"] <= second.json["finished_at"]
    result = client.get(second.headers["Location"])
    assert (result.status_code, result.json) == (200, {"quick": True})


def test_task_that_runs_longer_than_the_short_wait_is_not_waited_for(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_SHORT_WAIT": 0.05})
    api.add_resource(Gated, "/gated")
    client = app.test_client()
    state = get_state(app)
    GATE.clear()
    first = client.post("/gated")
    # Runs for longer than the short wait: released only after that much time.
    threading.Timer(0.2, GATE.set).start()
    wait_done(client, first.headers["Location"])
    wait_for(lambda: state.run_times.estimate("gated", "post") is not None)
    estimate = state.run_times.estimate("gated", "post")
    assert estimate is not None
    assert estimate > 0.05

    holds = count_waits(state, monkeypatch)
    GATE.clear()
    second = client.post("/gated")
    assert second.status_code == 202
    assert second.json is not None
    assert second.json["state"] in ("queued", "running")
    assert second.headers["Retry-After"] == "1"
    assert holds == []
    GATE.set()
    wait_done(client, second.headers["Location"])


def test_respond_async_is_answered_at_once(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, api = make_app(config=GENEROUS)
    api.add_resource(Gated, "/gated")
    warm_up(app, "/gated", "gated")
    state = get_state(app)
    assert state.plan_wait("gated", "post", {})[0] == state.short_wait == 5
    holds = count_waits(state, monkeypatch)
    client = app.test_client()
    GATE.clear()
    response = client.post("/gated", headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    assert response.headers["Preference-Applied"] == "respond-async"
    assert response.json is not None
    assert response.json["state"] in ("queued", "running")
    assert holds == []
    # Any other preference (here: none that applies) leaves the short wait on.
    GATE.set()
    answered = client.post("/gated", headers={"Prefer": "handling=lenient"})
    assert holds == [5]
    assert answered.json is not None
    assert answered.json["state"] == "succeeded"
    wait_done(client, response.headers["Location"])


def test_short_wait_zero_never_waits(make_app: AppFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_SHORT_WAIT": 0})
    api.add_resource(Quick, "/quick")
    warm_up(app, "/quick", "quick")
    holds = count_waits(get_state(app), monkeypatch)
    response = app.test_client().post("/quick")
    assert response.headers["Retry-After"] == "1"
    assert holds == []


@pytest.mark.parametrize("value", [-1, "half", True, None, float("nan")])
def test_short_wait_must_be_seconds(make_app: AppFactory, value: t.Any) -> None:
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_SHORT_WAIT"):
        make_app(config={"RESTFUL_ASYNC_SHORT_WAIT": value})


class Failing(RunTimes):
    def record(self, endpoint: str, method: str, seconds: float) -> None:
        raise RuntimeError("no room for samples")

    def estimate(self, endpoint: str, method: str) -> float | None:
        raise RuntimeError("no estimate today")


def test_a_failing_estimate_never_breaks_a_submit_nor_a_worker(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, api = make_app()
    api.add_resource(Quick, "/quick")
    state = get_state(app)
    failing = Failing()
    state.run_times = failing
    state.executor.on_ran = failing.record
    client = app.test_client()
    with caplog.at_level(logging.ERROR):
        for _ in range(2):
            response = client.post("/quick")
            assert response.status_code == 202
            done = wait_done(client, response.headers["Location"])
            assert (done.status_code, done.json) == (200, {"quick": True})
        wait_for(lambda: "Recording the run time" in caplog.text)
    assert "Estimating the run time of post quick failed" in caplog.text


def test_prefer_wait_on_a_quick_task_needs_no_listener(make_app: AppFactory) -> None:
    # The default store (SQLite) is shared: a long-poll there starts a listener
    # thread; the first part of a submit's wait, on its own task, does not.
    app, api = make_app(config=GENEROUS)
    api.add_resource(Quick, "/quick")
    state = get_state(app)
    response = app.test_client().post("/quick", headers={"Prefer": "wait=10"})
    assert response.status_code == 200
    assert response.json == {"quick": True}
    assert response.headers["Preference-Applied"] == "wait=10"
    assert not waiting.waiters_for(state.store).listening
