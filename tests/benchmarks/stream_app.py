"""The app that ``bench_stream.py`` serves under gunicorn.

``POST /tick?seconds=S&rate=R`` reports progress ``R`` times a second for ``S``
seconds, each report's message being the ``time.time()`` at which it was made
(with ``RESTFUL_ASYNC_PROGRESS_INTERVAL = 0`` every report is written at once),
so that a client can tell how long a write took to reach it.

``FLASK_*`` environment variables are loaded into the config (JSON-decoded where
they parse); ``BENCH_INSTANCE`` is the instance folder, where the default SQLite
store lives.
"""

from __future__ import annotations

import os
import time
import typing as t

from flask import Flask, request
from flask_restful import Api

from flask_restful_async import AsyncResource, current_task, register_async


class Tick(AsyncResource):
    def post(self) -> t.Any:
        seconds = float(request.args.get("seconds", "1"))
        rate = float(request.args.get("rate", "10"))
        ticks = int(seconds * rate)
        start = time.monotonic()
        for number in range(1, ticks + 1):
            # On a schedule, not after a fixed sleep: the rate stays the rate.
            pause = start + number / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            current_task.progress(number, total=ticks, message=repr(time.time()))
        return {"ticks": ticks}


app = Flask(__name__, instance_path=os.environ.get("BENCH_INSTANCE") or None)
app.config.from_prefixed_env()
api = Api(app)
register_async(api)
api.add_resource(Tick, "/tick")
