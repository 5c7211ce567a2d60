"""An app that reports what its handlers received, byte for byte.

``POST /digest`` (an :class:`AsyncResource`, so it runs in a worker thread after
the 202) and ``POST /plain-digest`` (a plain ``Resource``, answered at once)
return the same document: hashes of the raw body, of the JSON it parses to and
of every uploaded file. Comparing them with hashes of the bytes the client sent
shows whether the body survived the trip into the worker intact.

``FLASK_*`` environment variables are loaded into the config (JSON-decoded where
they parse), so a server started by ``tests.servers.serve(env=...)`` can be
configured, e.g. ``FLASK_RESTFUL_ASYNC_STORE``.
"""

from __future__ import annotations

import hashlib
import json
import typing as t

from flask import Flask, request
from flask_restful import Api, Resource
from werkzeug.datastructures import FileStorage

from flask_restful_async import AsyncResource, register_async


def canonical_json(data: t.Any) -> bytes:
    """One encoding per JSON value, so that client and server hashes compare."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_file(storage: FileStorage) -> dict[str, t.Any]:
    content = storage.read()
    return {
        "filename": storage.filename,
        "content_type": storage.mimetype,
        "size": len(content),
        "sha256": sha256(content),
    }


def digest_request() -> dict[str, t.Any]:
    # The raw body first: once form parsing has consumed the stream, get_data()
    # would only return what was cached, which is nothing.
    body = request.get_data()
    data = request.get_json(silent=True)
    files = {key: [describe_file(f) for f in request.files.getlist(key)] for key in request.files}
    return {
        "sha256": sha256(body),
        "length": len(body),
        "content_length": request.content_length,
        "json_sha256": None if data is None else sha256(canonical_json(data)),
        "form": request.form.to_dict(flat=False),
        "files": files,
    }


class Digest(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return digest_request()


class PlainDigest(Resource):
    def post(self) -> dict[str, t.Any]:
        return digest_request()


app = Flask(__name__)
app.config.from_prefixed_env()
api = Api(app)
register_async(api)
api.add_resource(Digest, "/digest")
api.add_resource(PlainDigest, "/plain-digest")
