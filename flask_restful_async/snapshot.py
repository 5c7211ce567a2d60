"""The request as plain data, and the one place that rebuilds a request from it.

A live request context must never cross a thread: its input stream belongs to the
server and is gone (or empty) once the 202 has left. So the submit path copies the
request into a :class:`RequestSnapshot` (strings and bytes only) and the worker
builds a fresh request context of its own from that copy.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import logging
import math
import struct
import sys
import typing as t

from flask import Flask, g, request
from flask.ctx import RequestContext
from werkzeug.datastructures import MultiDict
from werkzeug.routing import Rule
from werkzeug.test import EnvironBuilder

# Headers that described the original transfer, not the request itself: the copy
# is replayed from a buffer with a known length.
_TRANSFER_KEYS = frozenset({"CONTENT_LENGTH", "HTTP_TRANSFER_ENCODING", "HTTP_EXPECT"})

_logger = logging.getLogger(__name__)

#: The version of :meth:`RequestSnapshot.to_json`'s format; ``from_json`` refuses others.
_JSON_VERSION = 1
#: What :meth:`RequestSnapshot.to_bytes` output starts with: a name and the layout's
#: version (1), then the header's length and the JSON header, then the raw body.
_BYTES_MAGIC = b"RSNAP\x01"
_HEADER_LENGTH = struct.Struct(">I")


@dataclasses.dataclass
class RequestSnapshot:
    """Everything a handler may read from its request, detached from the server.

    ``environ`` keeps the string-valued WSGI keys (method, path, query string,
    headers, remote address, URL scheme); ``body`` the full body bytes, from which
    form fields and uploaded files are parsed again in the worker. ``args`` and
    ``kwargs`` are the view arguments as the resource's ``method_decorators`` left
    them; ``g`` is a shallow copy of :data:`flask.g` at submit time.

    ``carrier`` holds context that travels with the task beside the request, as
    text fields (the W3C ``traceparent`` and ``tracestate`` of the submitting
    request's span, say): written at submit by the app's propagators (see
    :attr:`AsyncState.propagators <flask_restful_async.state.AsyncState.propagators>`),
    read in the worker as :attr:`current_task.carrier
    <flask_restful_async.context.TaskHandle.carrier>`.
    """

    environ: dict[str, str]
    body: bytes
    endpoint: str
    method: str
    args: tuple[t.Any, ...] = ()
    kwargs: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    g: dict[str, t.Any] = dataclasses.field(default_factory=dict)
    carrier: dict[str, str] = dataclasses.field(default_factory=dict)
    #: The URL rule and view arguments the submit matched: a replay in the same
    #: process takes them instead of matching the URL again. Never written out
    #: (another process matches).
    match: tuple[Rule, dict[str, t.Any]] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @classmethod
    def capture(
        cls,
        body: bytes,
        method: str,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
    ) -> RequestSnapshot:
        """Copy the current request. ``body`` is the whole raw body, as
        :class:`~flask_restful_async.body.BodyReader` read it."""
        # Each ``request.x`` goes through a context-local proxy: read what is
        # needed once, from the request's own environ where that says the same.
        source = request.environ
        environ = {
            key: value
            for key, value in source.items()
            if type(value) is str and key not in _TRANSFER_KEYS
        }
        chunked = "HTTP_TRANSFER_ENCODING" in source
        framed = chunked or "CONTENT_LENGTH" in source
        if not body and (request.content_length or chunked) and (request.form or request.files):
            # A before_request hook parsed the form before the body could be
            # watched, so the raw bytes are gone: encode the fields and files again.
            body, content_type = _encode_parsed_form()
            environ["CONTENT_TYPE"] = content_type
        if body or framed:
            # The copy is replayed from a buffer of known length (a chunked upload
            # included); an explicit "Content-Length: 0" stays 0, not None.
            environ["CONTENT_LENGTH"] = str(len(body))
        rule, view_args = request.url_rule, request.view_args
        return cls(
            environ=environ,
            body=body,
            endpoint=(rule.endpoint if rule is not None else None) or "",
            method=method,
            args=args,
            kwargs=kwargs,
            g={name: g.get(name) for name in g},
            match=(rule, dict(view_args)) if rule is not None and view_args is not None else None,
        )

    @classmethod
    def in_place(
        cls,
        body: bytes,
        endpoint: str,
        method: str,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
    ) -> RequestSnapshot:
        """What a task that runs in its submit's own request (see
        :meth:`AsyncState.run_now <flask_restful_async.state.AsyncState.run_now>`)
        needs: the handler's arguments and a carrier, not a copy of the request,
        which the handler reads where it is. Never replayed nor written out."""
        return cls(
            environ={}, body=body, endpoint=endpoint, method=method, args=args, kwargs=kwargs
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
        if self.match is None or type(app).request_context is not Flask.request_context:
            return app.request_context(environ)
        return _MatchedContext(app, environ, self.match)

    def restore_g(self) -> None:
        """Copy the submit-time ``g`` into the (fresh) ``g`` of the current context."""
        for name, value in self.g.items():
            setattr(g, name, value)

    @functools.cached_property
    def held_bytes(self) -> int:
        """What holding this snapshot in memory is counted as, against
        ``RESTFUL_ASYNC_MAX_PENDING_BYTES``: the body and the request's strings
        (headers and the other WSGI keys)."""
        environ = self.environ
        return len(self.body) + sum(map(len, environ)) + sum(map(len, environ.values()))

    @property
    def portable(self) -> bool:
        """Whether :meth:`to_json` and :meth:`to_bytes` can write this snapshot:
        its view arguments are JSON data (see :meth:`to_json`)."""
        return all(_is_json(value) for value in self.args) and all(
            _is_json(value) for value in self.kwargs.values()
        )

    def to_json(self) -> str:
        """This snapshot as a JSON document, for an executor that crosses processes.

        The body travels as base64. ``args`` and ``kwargs`` must be JSON data (str,
        int, finite float, bool, None, lists and str-keyed dicts of those) or this
        raises :class:`TypeError`: the handler would otherwise get other values than
        in-process. Entries of ``g`` that are not JSON data are dropped (their names
        are logged at debug level): ``g`` often holds connections and clients.
        """
        header = self._header()
        header["v"] = _JSON_VERSION
        header["body"] = base64.b64encode(self.body).decode("ascii")
        return _dumps(header)

    @classmethod
    def from_json(cls, text: str | bytes) -> RequestSnapshot:
        """The snapshot that :meth:`to_json` wrote; ``ValueError`` if ``text`` is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != _JSON_VERSION:
            raise ValueError("not a request snapshot of a known version")
        try:
            body = base64.b64decode(data["body"], validate=True)
        except (KeyError, TypeError, binascii.Error) as e:
            raise ValueError(f"malformed request snapshot: {e!r}") from None
        return cls._from_header(data, body)

    def to_bytes(self) -> bytes:
        """This snapshot as bytes, for a store to keep with its task.

        The same rules as :meth:`to_json` (``TypeError`` for view arguments that
        are not JSON data), but the body follows a small JSON header as it is:
        a 5 MB upload costs 5 MB, not the third more of base64. The layout is
        versioned; :meth:`from_bytes` refuses versions it does not know.
        """
        fields = self._header()
        try:
            header = _dumps(fields).encode()
        except UnicodeEncodeError:
            # A lone surrogate (JSON's "\ud800" parses into one, in g or a view
            # argument): escaped instead, as JSON allows, and read back the same.
            header = _ASCII_ENCODER.encode(fields).encode()
        return b"".join((_BYTES_MAGIC, _HEADER_LENGTH.pack(len(header)), header, self.body))

    @classmethod
    def from_bytes(cls, data: bytes) -> RequestSnapshot:
        """The snapshot that :meth:`to_bytes` wrote; ``ValueError`` if ``data`` is not one."""
        start = len(_BYTES_MAGIC) + _HEADER_LENGTH.size
        if len(data) < start or not data.startswith(_BYTES_MAGIC):
            raise ValueError("not a request snapshot of a known version")
        (length,) = _HEADER_LENGTH.unpack_from(data, len(_BYTES_MAGIC))
        if start + length > len(data):
            raise ValueError("malformed request snapshot: truncated header")
        try:
            header = json.loads(data[start : start + length])
        except ValueError:
            raise ValueError("malformed request snapshot: the header is not JSON") from None
        if not isinstance(header, dict):
            raise ValueError("malformed request snapshot: the header is not an object")
        return cls._from_header(header, bytes(data[start + length :]))

    def _header(self) -> dict[str, t.Any]:
        """Everything but the body, as JSON data."""
        for index, value in enumerate(self.args):
            _require_json(value, f"view argument {index}")
        for name, value in self.kwargs.items():
            _require_json(value, f"view argument {name!r}")
        g_values = self.g and {name: value for name, value in self.g.items() if _is_json(value)}
        if len(g_values) != len(self.g):
            dropped = sorted(set(self.g) - set(g_values))
            _logger.debug("Not sent to the worker (not JSON data): g.%s", ", g.".join(dropped))
        header: dict[str, t.Any] = {
            "environ": self.environ,
            "endpoint": self.endpoint,
            "method": self.method,
            "args": list(self.args),
            "kwargs": self.kwargs,
            "g": g_values,
        }
        if self.carrier:
            # Only when there is one: a snapshot without reads as before.
            header["carrier"] = self.carrier
        return header

    @classmethod
    def _from_header(cls, data: dict[str, t.Any], body: bytes) -> RequestSnapshot:
        try:
            environ = data["environ"]
            if not isinstance(environ, dict) or not all(
                type(key) is str and type(value) is str for key, value in environ.items()
            ):
                raise ValueError("malformed request snapshot: environ must map str to str")
            args, kwargs, g_values = data["args"], data["kwargs"], data["g"]
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise ValueError(
                    "malformed request snapshot: args must be a list, kwargs an object"
                )
            if not isinstance(g_values, dict):
                raise ValueError("malformed request snapshot: g must be an object")
            carrier = data.get("carrier", {})
            if not isinstance(carrier, dict) or not all(
                type(key) is str and type(value) is str for key, value in carrier.items()
            ):
                raise ValueError("malformed request snapshot: carrier must map str to str")
            return cls(
                environ=environ,
                body=body,
                endpoint=str(data["endpoint"]),
                method=str(data["method"]),
                args=tuple(args),
                kwargs=kwargs,
                g=g_values,
                carrier=carrier,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed request snapshot: {e!r}") from None


# One encoder for every snapshot: json.dumps with arguments of its own would build
# a new one per call, a third of the cost of a small header.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


class _MatchedContext(RequestContext):
    """A request context whose URL was matched already, by the submit:
    ``match_request`` is Flask's documented hook for this."""

    def __init__(
        self, app: Flask, environ: dict[str, t.Any], match: tuple[Rule, dict[str, t.Any]]
    ) -> None:
        super().__init__(app, environ)
        self.known_match = match

    def match_request(self) -> None:
        rule, view_args = self.known_match
        self.request.url_rule, self.request.view_args = rule, dict(view_args)


def _dumps(data: dict[str, t.Any]) -> str:
    return _ENCODER.encode(data)


def _is_json(value: t.Any) -> bool:
    """Whether ``value`` survives a JSON round trip unchanged (types included)."""
    kind = type(value)
    if kind in (str, int, bool) or value is None:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_is_json(item) for item in value)
    if kind is dict:
        return all(type(key) is str and _is_json(item) for key, item in value.items())
    return False


def _require_json(value: t.Any, what: str) -> None:
    if not _is_json(value):
        raise TypeError(
            f"{what} ({type(value).__name__}) is not JSON data, so it cannot be sent to"
            " another process: give the view JSON-compatible arguments (str, int, float,"
            " bool, None, lists and dicts of them), or convert them in a method decorator"
        )


def _encode_parsed_form() -> tuple[bytes, str]:
    data: MultiDict[str, t.Any] = MultiDict()
    for key, value in request.form.items(multi=True):
        data.add(key, value)
    for key, storage in request.files.items(multi=True):
        storage.stream.seek(0)
        data.add(key, (io.BytesIO(storage.read()), storage.filename, storage.content_type))
        storage.stream.seek(0)
    # Multipart stays multipart, files or not, as the handler would see it.
    multipart = request.mimetype == "multipart/form-data"
    builder = EnvironBuilder(
        method="POST", data=data, content_type="multipart/form-data" if multipart else None
    )
    try:
        environ = builder.get_environ()
        return environ["wsgi.input"].read(), environ["CONTENT_TYPE"]
    finally:
        builder.close()
