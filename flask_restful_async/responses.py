"""Building and storing responses: task results, status documents, errors."""

from __future__ import annotations

import json
import typing as t

from flask import Response, current_app, request
from flask_restful import Api, Resource
from flask_restful.representations.json import output_json
from flask_restful.utils import unpack
from werkzeug.exceptions import NotAcceptable
from werkzeug.wrappers import Response as ResponseBase

from .exceptions import ResultTooLarge
from .task import StoredResponse, Task

JSON = "application/json"
#: Every answer about a task: it changes from one poll to the next.
NO_STORE = {"Cache-Control": "no-store"}
#: What the status URL answers also depends on ``Prefer: wait`` (RFC 7240 section 2).
POLLED = {**NO_STORE, "Vary": "Prefer"}


def dump_json(data: t.Any, code: int, headers: t.Any = None) -> Response:
    """flask-restful's JSON representation, encoded with ``app.json``.

    flask-restful's own ``output_json`` calls :func:`json.dumps` directly, so a
    ``datetime``, ``Decimal`` or ``UUID`` in a result fails. This keeps its output
    (``RESTFUL_JSON`` settings, indent in debug mode, trailing newline, key order)
    and adds what Flask's JSON provider knows how to encode.
    """
    # Through make_response, as output_json: a handler's ``return data, {headers}``
    # gives headers, not a status, in the place of the code.
    response: Response = current_app.make_response((_json_text(data), code))
    if headers:
        response.headers.extend(headers)
    return response


def _json_text(data: t.Any) -> str:
    app = current_app
    settings = dict(app.config.get("RESTFUL_JSON") or ())
    if app.debug:
        settings.setdefault("indent", 4)
    settings.setdefault("sort_keys", False)
    if "cls" in settings:
        # flask-restful's way to add an encoder: app.json would pass its own
        # default= to it, which replaces the encoder's default method.
        settings.setdefault("default", None)
    return app.json.dumps(data, **settings) + "\n"


def render_stored(api: Api, resource: Resource, rv: t.Any, max_size: int) -> StoredResponse:
    """What :func:`render_result` then :func:`store_response` give, without making a
    ``Response`` in the common case: data rendered by the default JSON
    representation, with no headers of the handler's."""
    if not isinstance(rv, ResponseBase) and not resource.representations:
        data, code, headers = unpack(rv)
        if (
            not headers
            and type(code) is int
            and type(api).make_response is Api.make_response
            and _api_mediatype(api) == JSON
            and api.representations.get(JSON) is output_json
        ):
            body = _json_text(data).encode()
            if len(body) > max_size:
                raise ResultTooLarge(max_size)
            return StoredResponse(code, list(_JSON_HEADERS), body)
    return store_response(render_result(api, resource, rv), max_size)


def render_result(api: Api, resource: Resource, rv: t.Any) -> ResponseBase:
    """Turn a handler's return value into the response flask-restful would send.

    This is ``Resource.dispatch_request``'s tail (per-resource representations)
    followed by ``Api.output`` (``unpack`` and ``Api.make_response``), with the
    default JSON representation swapped for :func:`dump_json`. An Api whose class
    overrides ``make_response`` has it called, as flask-restful would.
    """
    if isinstance(rv, ResponseBase):
        return rv
    data, code, headers = unpack(rv)
    representations = resource.representations
    if representations:
        mediatype = request.accept_mimetypes.best_match(representations)
        if mediatype is not None and mediatype in representations:
            response = _represent(representations[mediatype], data, code, headers)
            response.headers["Content-Type"] = mediatype
            return response
    if type(api).make_response is not Api.make_response:
        return api.make_response(data, code, headers=headers)
    mediatype = _api_mediatype(api)
    if mediatype is None:
        raise NotAcceptable()
    if mediatype in api.representations:
        response = _represent(api.representations[mediatype], data, code, headers)
        response.headers["Content-Type"] = mediatype
        return response
    return api.make_response(data, code, headers)


def _api_mediatype(api: Api) -> str | None:
    """The API's representation that the request accepts best (flask-restful's
    choice in ``Api.make_response``)."""
    if api.default_mediatype is None:
        return request.accept_mimetypes.best_match(api.representations)
    return request.accept_mimetypes.best_match(api.representations, default=api.default_mediatype)


def _represent(
    representation: t.Callable[..., ResponseBase], data: t.Any, code: int, headers: t.Any
) -> ResponseBase:
    if representation is output_json:
        representation = dump_json
    return representation(data, code, headers)


def store_response(response: ResponseBase, max_size: int) -> StoredResponse:
    """Serialize a response completely, with the headers it will be served with
    (see :func:`served_headers`).

    The body is read to the end here, in the task's request context (which a
    ``stream_with_context`` generator needs), whatever it is: bytes, a generator,
    or the file of a ``send_file`` response (in direct passthrough mode, which
    ``get_data`` refuses). Raises :class:`ResultTooLarge` as soon as more than
    ``max_size`` bytes have been read: a stream is never read further. The
    response is closed in every case (a generator's ``finally`` runs, a file is
    closed).
    """
    try:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_encoded():
            size += len(chunk)
            if size > max_size:
                raise ResultTooLarge(max_size)
            chunks.append(chunk)
        body = b"".join(chunks)
        return StoredResponse(response.status_code, served_headers(response.headers.items()), body)
    finally:
        response.close()


#: Headers of a stored response that belong to one message, not to the result:
#: ``Content-Length`` (the stored body gives it anew), ``Date`` (when the poll is
#: answered, not when the task ended) and ``Cache-Control`` (replaced).
_MESSAGE_HEADERS = frozenset(("cache-control", "content-length", "date"))
#: Headers of a stored ``200`` that make a ``GET`` of it conditional.
_CONDITIONAL = frozenset(("etag", "last-modified", "accept-ranges"))


def served_headers(headers: t.Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A task's response headers as its URLs serve them, worked out once when it is
    stored rather than on every poll: ``Cache-Control: no-store`` instead of the
    handler's (the answer at a status URL changes), ``Prefer`` added to ``Vary``
    (``Prefer: wait`` changes it), and no ``Content-Length`` or ``Date``, which
    each answer gets anew. Every other header is kept as the handler gave it:
    repeated ``Set-Cookie``, ``Location`` relative or absolute, ``ETag``,
    ``Last-Modified``, ``Content-Disposition``."""
    kept: list[tuple[str, str]] = []
    vary: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == "vary":
            vary.append(value)
        elif lowered not in _MESSAGE_HEADERS:
            kept.append((name, value))
    kept.append(("Cache-Control", "no-store"))
    kept.append(("Vary", ", ".join([*vary, "Prefer"])))
    return kept


#: The headers of a JSON result with none of the handler's, as served.
_JSON_HEADERS = tuple(served_headers([("Content-Type", JSON)]))

#: What the URLs of a task whose result was larger than ``RESTFUL_ASYNC_MAX_RESULT``
#: answer: the task failed, and the message says why.
RESULT_TOO_LARGE = StoredResponse(
    500,
    served_headers([("Content-Type", JSON)]),
    b'{"message": "The result of this task was too large to be kept."}\n',
)


def stored_to_response(stored: StoredResponse) -> Response:
    """A finished task's stored response, as served (its headers are already).

    A ``200`` with validators (``ETag``, ``Last-Modified``, as ``send_file`` gives)
    answers a ``GET`` conditionally, as ``send_file`` itself would: ``304`` for a
    matching ``If-None-Match`` or ``If-Modified-Since``, ``412`` for a failed
    ``If-Match``. A ``Range`` is honoured (``206``) only when the response said
    ``Accept-Ranges``; otherwise the whole body comes with ``200``.
    """
    response = current_app.response_class(stored.body, stored.status, stored.headers)
    if stored.status == 200 and any(name.lower() in _CONDITIONAL for name, _ in stored.headers):
        response.make_conditional(
            request,
            accept_ranges=response.accept_ranges == "bytes",
            complete_length=len(stored.body),
        )
    return response


def json_response(
    code: int, document: t.Any, headers: t.Mapping[str, str] | None = None
) -> Response:
    # content_type, not mimetype: JSON takes no charset, so there is nothing to derive.
    response = current_app.response_class(
        json.dumps(document) + "\n", code, headers, content_type=JSON
    )
    return response


def status_response(
    task: Task,
    code: int,
    location: str | None,
    retry_after: int | None,
    *,
    vary_on_prefer: bool = False,
) -> Response:
    headers = dict(POLLED) if vary_on_prefer else dict(NO_STORE)
    if location is not None:
        headers["Location"] = location
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return json_response(code, task.status_document(), headers)


def expired_response(*, vary_on_prefer: bool = False) -> Response:
    """A task whose result is past its retention time: 410, at every URL of the task."""
    return error_response(
        410, "The result of this task has expired.", POLLED if vary_on_prefer else NO_STORE
    )


def no_content() -> Response:
    """``204 No Content``, ``Cache-Control: no-store``: without the
    ``Content-Type: text/html`` a Flask response gets by default, which an
    empty answer has no use for."""
    response = current_app.response_class(status=204, headers=NO_STORE)
    del response.headers["Content-Type"]
    return response


def error_response(code: int, message: str, headers: t.Mapping[str, str] | None = None) -> Response:
    return json_response(code, {"message": message}, headers)
