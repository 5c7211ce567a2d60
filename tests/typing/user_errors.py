"""Mistakes in the use of flask_restful_async that ``mypy --strict`` must catch:
each line marked ``# error`` (see ``tests/test_typing_users.py``). Proves that the
package's types reach a user's code, rather than ``Any``."""

from __future__ import annotations

from flask import Flask
from flask.testing import FlaskClient
from flask_restful import Api

from flask_restful_async import AsyncResource, current_task, register_async
from flask_restful_async.testing import follow


class Report(AsyncResource):
    sync_methods = 3  # error
    rerun_on_crash = "yes"  # error
    method_decorators = ["not a decorator"]  # error

    def post(self) -> dict[str, str]:
        current_task.progress("half")  # error
        return {"id": current_task.id}


def create_app() -> Flask:
    app = Flask(__name__)
    api = Api(app)
    register_async(api, store=42)  # error
    register_async(api, owner=lambda: 42)  # error
    return app


def check(client: FlaskClient) -> str:
    return follow(client, client.post("/reports"), timeout="5")  # error
