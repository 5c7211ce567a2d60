"""An app whose handlers build a file in memory and send it as a download.

``POST /download`` (an :class:`AsyncResource`: the file is read at its status
URL) and ``POST /plain-download`` (a plain ``Resource``, the control) send the
same bytes: ``RESULTS_APP_SIZE`` pseudo-random bytes from a fixed seed.
``FLASK_*`` environment variables are loaded into the config, e.g.
``FLASK_RESTFUL_ASYNC_STORE``.
"""

from __future__ import annotations

import io
import os
import random

from flask import Flask, Response, send_file
from flask_restful import Api, Resource

from flask_restful_async import AsyncResource, register_async

SIZE = int(os.environ.get("RESULTS_APP_SIZE", "1024"))


def download() -> Response:
    data = random.Random(10).randbytes(SIZE)
    return send_file(io.BytesIO(data), as_attachment=True, download_name="export.bin")


class Download(AsyncResource):
    def post(self) -> Response:
        return download()


class PlainDownload(Resource):
    def post(self) -> Response:
        return download()


app = Flask(__name__)
app.config.from_prefixed_env()
app.config.setdefault("RESTFUL_ASYNC_MAX_RESULT", 2 * SIZE)
api = Api(app)
register_async(api)
api.add_resource(Download, "/download")
api.add_resource(PlainDownload, "/plain-download")
