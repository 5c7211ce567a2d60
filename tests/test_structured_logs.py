"""Log lines about a task carry its id as ``extra={"task_id": ...}``, for JSON log
formatters: a handler failing, a task that could not start and ends lost, a
store that refuses progress or an outcome."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import typing as t
from collections.abc import Iterator

from flask import Flask

from flask_restful_async import AsyncResource, MemoryStore, StoreUnavailable, current_task
from flask_restful_async.task import Progress, StoredResponse, TaskState

from .conftest import AppFactory, wait_done, wait_for


class JsonLines(logging.Handler):
    """What a JSON log formatter would write: the message and the task id."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, t.Any]] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = {
            "level": record.levelname,
            "message": record.getMessage(),
            "task_id": getattr(record, "task_id", None),
        }
        with self._guard:
            self.lines.append(json.loads(json.dumps(line)))

    def about(self, fragment: str) -> list[dict[str, t.Any]]:
        with self._guard:
            return [line for line in self.lines if fragment in line["message"]]


@contextlib.contextmanager
def collected(app: Flask) -> Iterator[JsonLines]:
    handler = JsonLines()
    level = app.logger.level
    app.logger.setLevel(logging.INFO)
    app.logger.addHandler(handler)
    try:
        yield handler
    finally:
        app.logger.removeHandler(handler)
        app.logger.setLevel(level)


class Broken(AsyncResource):
    def post(self) -> t.Any:
        raise RuntimeError("the handler broke")


class Stepping(AsyncResource):
    def post(self) -> t.Any:
        current_task.progress(1, total=2)
        return {"done": True}


class Unstartable(MemoryStore):
    """A store that never lets a task start: it does not answer."""

    def start(self, task_id: str, worker: str) -> t.Any:
        raise StoreUnavailable("the store does not answer")


class Forgetful(MemoryStore):
    """A store that takes no progress, and refuses every outcome but ``lost``."""

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        raise StoreUnavailable("the store does not answer")

    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> float | None:
        if state is not TaskState.LOST:
            raise ValueError("no such outcome here")
        return super().finish(task_id, state, response)


def test_a_failing_handler_is_logged_with_its_task_id(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Broken, "/broken")
    client = app.test_client()
    with collected(app) as logs:
        response = client.post("/broken")
        assert wait_done(client, response.headers["Location"]).status_code == 500
    (line,) = logs.about("failed")
    assert line["level"] == "ERROR"
    assert line["task_id"] == response.json["id"]


def test_a_task_that_cannot_start_ends_lost_and_says_which(make_app: AppFactory) -> None:
    # A lease of 0.05 s: a start is tried for four of them.
    app, api = make_app(store=Unstartable(), config={"RESTFUL_ASYNC_LEASE": 0.05})
    api.add_resource(Broken, "/broken")
    client = app.test_client()
    with collected(app) as logs:
        response = client.post("/broken")
        task_id = response.json["id"]
        assert wait_done(client, response.headers["Location"]).status_code == 500
        wait_for(lambda: bool(logs.about("is stored")))
    assert client.get(response.headers["Location"]).json["state"] == "lost"
    for fragment in ("cannot start yet", "could not be started", "is stored"):
        (line,) = logs.about(fragment)
        assert line["task_id"] == task_id, fragment


def test_progress_and_outcomes_the_store_refuses_are_logged_with_the_task_id(
    make_app: AppFactory,
) -> None:
    # Refused for a lease, the outcome is tried without its response, as lost.
    app, api = make_app(store=Forgetful(), config={"RESTFUL_ASYNC_LEASE": 1})
    api.add_resource(Stepping, "/stepping")
    client = app.test_client()
    with collected(app) as logs:
        response = client.post("/stepping")
        task_id = response.json["id"]
        assert wait_done(client, response.headers["Location"]).status_code == 500
        wait_for(lambda: bool(logs.about("is stored")))
    assert client.get(response.headers["Location"]).json["state"] == "lost"
    for fragment in ("Progress of task", "refused the outcome", "is stored"):
        lines = logs.about(fragment)
        assert lines, fragment
        assert {line["task_id"] for line in lines} == {task_id}, fragment
