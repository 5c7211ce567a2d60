"""A user's module, as the README shows them: it must pass ``mypy --strict``
(see ``tests/test_typing_users.py``)."""

from __future__ import annotations

import functools
import typing as t

from flask import Flask, Response, g, request
from flask.testing import FlaskClient
from flask_restful import Api, abort

from flask_restful_async import (
    AsyncResource,
    Task,
    TaskState,
    TaskStatusResource,
    current_task,
    register_async,
    task_finished,
)
from flask_restful_async.testing import follow

F = t.TypeVar("F", bound=t.Callable[..., t.Any])


def authenticate(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        token = request.headers.get("Authorization")
        if token is None:
            abort(401, message="Log in first.")
        g.user = token
        return f(*args, **kwargs)

    return t.cast(F, wrapper)


class Report(AsyncResource):
    sync_methods = ("get",)
    method_decorators = [authenticate]
    rerun_on_crash = True

    def get(self, report_id: int) -> dict[str, t.Any]:
        return {"id": report_id}

    def post(self, report_id: int) -> tuple[dict[str, t.Any], int, dict[str, str]]:
        rows = 0
        for i in range(10):
            current_task.raise_if_cancelled()
            current_task.progress(i, total=10, message="crunching")
            rows += i
        if current_task.cancelled:
            abort(409, message="cancelled")
        return {"id": report_id, "task": current_task.id, "rows": rows}, 201, {"X": "1"}

    def validate_post(self, report_id: int) -> Response | None:
        return None

    async def put(self, report_id: int) -> dict[str, int]:
        return {"id": report_id}


class Export(AsyncResource):
    method_decorators = {"post": [authenticate]}

    def post(self) -> Response:
        return Response("a,b\n", mimetype="text/csv")


def owner() -> str | None:
    return request.headers.get("Authorization")


def on_finished(sender: Flask, *, task: Task, **extra: t.Any) -> None:
    if task.state is TaskState.FAILED:
        sender.logger.warning("task %s failed", task.id)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["RESTFUL_ASYNC_EAGER"] = True
    api = Api(app)
    register_async(api, store="memory://", owner=owner, decorators=[authenticate])
    api.add_resource(Report, "/reports/<int:report_id>")
    api.add_resource(Export, "/exports")
    task_finished.connect(on_finished, app)
    return app


def status_url(api: Api, task_id: str) -> str:
    return str(api.url_for(TaskStatusResource, task_id=task_id))


def check_report(client: FlaskClient) -> int:
    response = follow(client, client.post("/reports/7"), timeout=5, headers={"Authorization": "a"})
    assert response.json is not None
    return response.status_code
