"""The request as plain data, and the one place that rebuilds a request from it.

A live request context must never cross a thread: its input stream belongs to the
server and is gone (or empty) once the 202 has left. So the submit path copies the
request into a :class:`RequestSnapshot` (strings and bytes only) and the worker
builds a fresh request context of its own from that copy.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import typing as t

from flask import Flask, g, request
from flask.ctx import RequestContext
from werkzeug.datastructures import MultiDict
from werkzeug.test import EnvironBuilder

# Headers that described the original transfer, not the request itself: the copy
# is replayed from a buffer with a known length.
_TRANSFER_KEYS = frozenset({"CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_EXPECT"})


@dataclasses.dataclass
class RequestSnapshot:
    """Everything a handler may read from its request, detached from the server.

    ``environ`` keeps the string-valued WSGI keys (method, path, query string,
    headers, remote address, URL scheme); ``body`` the full body bytes, from which
    form fields and uploaded files are parsed again in the worker. ``args`` and
    ``kwargs`` are the view arguments as the resource's ``method_decorators`` left
    them; ``g`` is a shallow copy of :data:`flask.g` at submit time.
    """

    environ: dict[str, str]
    body: bytes
    endpoint: str
    method: str
    args: tuple[t.Any, ...] = ()
    kwargs: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    g: dict[str, t.Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        body: bytes,
        method: str,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
    ) -> RequestSnapshot:
        """Copy the current request. ``body`` is what ``request.get_data()`` read
        before anything else could consume the stream."""
        environ = {
            key: value
            for key, value in request.environ.items()
            if type(value) is str and key not in _TRANSFER_KEYS
        }
        chunked = "HTTP_TRANSFER_ENCODING" in request.environ
        framed = chunked or "CONTENT_LENGTH" in request.environ
        if not body and (request.content_length or chunked) and (request.form or request.files):
            # Something (a before_request hook) parsed the form before we could read
            # the raw body: encode the parsed fields and files again.
            body, content_type = _encode_parsed_form()
            environ["CONTENT_TYPE"] = content_type
        if body or framed:
            # The copy is replayed from a buffer of known length (a chunked upload
            # included); an explicit "Content-Length: 0" stays 0, not None.
            environ["CONTENT_LENGTH"] = str(len(body))
        return cls(
            environ=environ,
            body=body,
            endpoint=request.endpoint or "",
            method=method,
            args=args,
            kwargs=kwargs,
            g={name: g.get(name) for name in g},
        )

    def request_context(self, app: Flask) -> RequestContext:
        """A new, unpushed request context over a private copy of the request."""
        environ: dict[str, t.Any] = dict(self.environ)
        environ.update(
            {
                "wsgi.input": io.BytesIO(self.body),
                "wsgi.errors": sys.stderr,
                "wsgi.version": (1, 0),
                "wsgi.multithread": True,
                "wsgi.multiprocess": False,
                "wsgi.run_once": False,
                "wsgi.input_terminated": True,
            }
        )
        return app.request_context(environ)

    def restore_g(self) -> None:
        """Copy the submit-time ``g`` into the (fresh) ``g`` of the current context."""
        for name, value in self.g.items():
            setattr(g, name, value)


def _encode_parsed_form() -> tuple[bytes, str]:
    data: MultiDict[str, t.Any] = MultiDict()
    for key, value in request.form.items(multi=True):
        data.add(key, value)
    for key, storage in request.files.items(multi=True):
        storage.stream.seek(0)
        data.add(key, (io.BytesIO(storage.read()), storage.filename, storage.content_type))
        storage.stream.seek(0)
    builder = EnvironBuilder(method="POST", data=data)
    try:
        environ = builder.get_environ()
        return environ["wsgi.input"].read(), environ["CONTENT_TYPE"]
    finally:
        builder.close()
