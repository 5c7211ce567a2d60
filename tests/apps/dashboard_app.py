"""The app of the dashboard's browser tests: users by cookie, jobs that report progress.

The caller is the ``user`` cookie (or an ``X-User`` header, for scripts), an
operator has the cookie ``role=operator``. ``POST /jobs?steps=N&delay=S`` (or
``/reports``, ``/exports/<name>``) runs N steps of S seconds, reporting progress
after each and stopping when cancelled; with ``&fail=1`` it then fails (409).
Tasks are kept in the SQLite file ``$DASHBOARD_DB``.
"""

from __future__ import annotations

import os
import time

from flask import Flask, request
from flask_restful import Api, abort

from flask_restful_async import AsyncResource, current_task, register_async

app = Flask(__name__)
app.config["RESTFUL_ASYNC_STORE"] = "sqlite:///" + os.environ["DASHBOARD_DB"]
app.config["RESTFUL_ASYNC_DASHBOARD"] = "/tasks/dashboard"
app.config["RESTFUL_ASYNC_PROGRESS_INTERVAL"] = 0
api = Api(app)


def user() -> str | None:
    return request.cookies.get("user") or request.headers.get("X-User")


def operator() -> bool:
    return request.cookies.get("role") == "operator"


class Jobs(AsyncResource):
    def post(self, name: str = "") -> tuple[dict[str, int], int]:
        steps = int(request.args.get("steps", "1"))
        delay = float(request.args.get("delay", "0"))
        for step in range(1, steps + 1):
            current_task.raise_if_cancelled()
            time.sleep(delay)
            current_task.progress(step, total=steps, message=f"step {step} of {steps}")
        if request.args.get("fail"):
            abort(409, message="asked to fail")
        return {"steps": steps}, 201


api.add_resource(Jobs, "/jobs", "/reports", "/exports/<name>")
register_async(api, owner=user, admin=operator)
