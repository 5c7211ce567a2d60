"""The request body a task gets: read in the request thread, whole, bounded and checked.

A task is accepted only with the body its client sent, byte for byte: not one that
is larger than the task body cap (413), cut short by a client that went away
(400), or unreadable because its chunked framing is broken (400). The body is read
only once the resource's ``method_decorators`` have accepted the request, so an
unauthenticated client cannot make the process buffer it.
"""

from __future__ import annotations

import typing as t

from flask import request
from werkzeug.exceptions import (
    BadRequest,
    ClientDisconnected,
    HTTPException,
    RequestEntityTooLarge,
)

INCOMPLETE = "The request body is incomplete: fewer bytes arrived than its Content-Length says."
UNREADABLE = (
    "The request body could not be read: the connection broke or its chunked encoding is malformed."
)


class BodyReader:
    """Watches the current request's body from before the decorators run.

    :meth:`watch` costs nothing and reads nothing: it bounds the stream, and if
    something may read the body before the task does (``method_decorators``),
    records what passes through it, so that a decorator that parses
    ``request.form`` or ``files`` does not take the raw bytes away from the task.
    :meth:`read` then reads the rest and checks the whole.
    """

    def __init__(self, limit: int, recording: _RecordingInput | None) -> None:
        self.limit = limit
        self.recording = recording

    @classmethod
    def watch(cls, limit: int, *, record: bool) -> BodyReader:
        """Bound the current request's body to ``limit`` bytes; with ``record``,
        keep what anything reads of it."""
        # werkzeug then bounds every read of the body, but stops a chunked one at
        # the limit without complaint: allow one byte more, so that a body over
        # the limit shows (and is refused).
        request.max_content_length = limit + 1
        recording = None
        if record:
            environ = request.environ
            recording = environ["wsgi.input"] = _RecordingInput(environ["wsgi.input"], limit)
        return cls(limit, recording)

    def read(self) -> bytes:
        """The whole body; 413 or 400 (no task) if it is too large or incomplete."""
        try:
            body = request.get_data(cache=True)
        except ClientDisconnected as e:
            raise BadRequest(UNREADABLE) from e
        except HTTPException:
            raise
        except Exception as e:
            # Whatever the server raises for a body it cannot deliver (gunicorn:
            # InvalidChunkSize, ChunkMissingTerminator) is the client's doing, not
            # the app's: no 500, no traceback.
            raise BadRequest(UNREADABLE) from e
        recording = self.recording
        if recording is not None:
            # What a decorator's form parsing consumed is only in the record; a
            # body read before the watch began (by a before_request hook) only in
            # the cache.
            if len(body) < recording.size:
                body = recording.recorded()
            recording.forget()
        if len(body) > self.limit:
            raise RequestEntityTooLarge()
        # A server that terminates the input itself (gunicorn) hands over what
        # arrived before the client closed, and werkzeug does not count it then.
        if request.environ.get("CONTENT_LENGTH") == str(len(body)):
            return body  # the common case, without parsing headers
        declared = request.content_length
        # Only a form parsed before the watch began leaves no body: the snapshot
        # encodes it again.
        if (
            declared is not None
            and len(body) != declared
            and (body or not (request.form or request.files))
        ):
            raise BadRequest(INCOMPLETE)
        return body


class _RecordingInput:
    """The server's ``wsgi.input``, read through: keeps the bytes read, refuses
    more than ``limit`` of them (413, to a decorator that reads the body too), and
    turns an error of the stream itself into a 400, not a 500 and a traceback."""

    def __init__(self, stream: t.Any, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        return self._record(self._call(self.stream.read, size))

    def readline(self, size: int = -1) -> bytes:
        return self._record(self._call(self.stream.readline, size))

    def recorded(self) -> bytes:
        return b"".join(self.chunks)

    def forget(self) -> None:
        self.chunks = []

    def _call(self, read: t.Callable[[int], bytes], size: int) -> bytes:
        try:
            return read(size)
        except HTTPException:
            raise
        except Exception as e:
            # As in BodyReader.read, for a decorator that reads the body.
            raise BadRequest(UNREADABLE) from e

    def _record(self, data: bytes) -> bytes:
        if data:
            self.chunks.append(data)
            self.size += len(data)
            if self.size > self.limit:
                raise RequestEntityTooLarge()
        return data
