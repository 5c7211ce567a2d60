"""The app that ``bench_e2e.py`` serves under gunicorn: the same 20 ms of work on a
plain ``Resource`` (``POST /plain/work``) and on an ``AsyncResource`` (``POST /work``).

``FLASK_*`` environment variables are loaded into the config (JSON-decoded where
they parse), e.g. ``FLASK_RESTFUL_ASYNC_STORE``; ``BENCH_INSTANCE`` is the
instance folder, where the default SQLite store lives.
"""

from __future__ import annotations

import os
import time
import typing as t

from flask import Flask, request
from flask_restful import Api, Resource

from flask_restful_async import AsyncResource, register_async

#: Seconds of work per call: a handler that waits on something (a query, a service).
WORK = 0.02


def work() -> dict[str, t.Any]:
    data = request.get_json()
    time.sleep(WORK)
    return {"x": data["x"], "done": True}


class PlainWork(Resource):
    def post(self) -> t.Any:
        return work()


class AsyncWork(AsyncResource):
    def post(self) -> t.Any:
        return work()


app = Flask(__name__, instance_path=os.environ.get("BENCH_INSTANCE") or None)
# As installed without the metrics and otel extras (the dev environment has both):
# FLASK_RESTFUL_ASYNC_METRICS=null (or true) measures them.
app.config["RESTFUL_ASYNC_METRICS"] = False
app.config["RESTFUL_ASYNC_TRACES"] = False
app.config.from_prefixed_env()
api = Api(app)
register_async(api)
api.add_resource(PlainWork, "/plain/work")
api.add_resource(AsyncWork, "/work")
