"""Every response a plain ``Resource`` can give comes back from the status URL.

Each handler of :data:`HANDLERS` runs twice on one app: in a plain
``flask_restful.Resource`` (the control, answered at once) and in an
``AsyncResource``, whose response is read at the status URL. Status, body bytes
and the headers a client acts on must be the same, on every store. Then the cap
on a result's size (``RESTFUL_ASYNC_MAX_RESULT``), a stream that fails midway,
conditional and range requests on the status URL, and a real gunicorn download.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import (
    Flask,
    Response,
    current_app,
    make_response,
    redirect,
    request,
    send_file,
    stream_with_context,
)
from flask_restful import Api, Resource
from werkzeug.test import TestResponse

from flask_restful_async import AsyncResource, TaskState
from flask_restful_async.state import get_state

from .conftest import AppFactory, wait_done
from .servers import http, poll_until_done, serve

#: A CSV of several of send_file's 8 KiB blocks, with a last block that is not full.
CSV = b"".join(b"%d,row %d,%s\r\n" % (i, i, b"x" * (i % 50)) for i in range(2000))
#: Headers a client acts on: they must come back as the handler gave them.
COMPARED = (
    "Content-Type",
    "Content-Disposition",
    "Content-Encoding",
    "Set-Cookie",
    "Location",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
    "X-Report",
)


def _send_buffer() -> Response:
    # The most common use: build a file in memory, hand it over as a download.
    return send_file(io.BytesIO(CSV), as_attachment=True, download_name="rapport été.csv")


def _send_path() -> Response:
    return send_file(current_app.config["TEST_RESULT_FILE"], as_attachment=True)


def _send_inline() -> Response:
    return send_file(io.BytesIO(b"%PDF-1.4 not really\n"), mimetype="application/pdf")


def _stream_with_context() -> Response:
    def rows() -> Iterator[str]:
        # Reads the request while the body is produced: needs the request context.
        for i in range(int(request.args["rows"])):
            yield f"{i},{request.headers['X-Label']}\n"

    return Response(stream_with_context(rows()), mimetype="text/csv")


def _generator() -> Response:
    return Response((bytes([i]) * 1000 for i in range(256)), mimetype="application/octet-stream")


def _redirect_relative() -> Response:
    return redirect("/reports/7", 303)


def _redirect_absolute() -> Response:
    return redirect("https://files.example/reports/7?sig=a%20b", 302)


def _cookies() -> Response:
    response = make_response({"ok": True}, 201, {"X-Report": "done"})
    response.set_cookie("session", "abc", httponly=True, samesite="Lax")
    response.set_cookie("theme", "dark", max_age=3600)
    response.delete_cookie("old")
    return response


def _empty_204() -> tuple[str, int]:
    return "", 204


def _empty_200() -> Response:
    return Response(status=200)


def _binary() -> Response:
    return Response(bytes(range(256)) * 4, mimetype="application/octet-stream")


def _csv_representation() -> dict[str, t.Any]:
    # Rendered through the Api's text/csv representation (the request asks for it).
    return {"rows": [[1, "a"], [2, "b"]]}


HANDLERS: dict[str, t.Callable[[], t.Any]] = {
    "send_file-buffer": _send_buffer,
    "send_file-path": _send_path,
    "send_file-inline": _send_inline,
    "stream_with_context": _stream_with_context,
    "generator": _generator,
    "redirect-relative": _redirect_relative,
    "redirect-absolute": _redirect_absolute,
    "cookies": _cookies,
    "empty-204": _empty_204,
    "empty-200": _empty_200,
    "binary": _binary,
    "csv-representation": _csv_representation,
}


def request_for(kind: str) -> dict[str, t.Any]:
    """What the client sends, to both resources (the Accept header picks the
    representation of a result that is data, not a response)."""
    headers = {"X-Label": "été"}
    if kind == "csv-representation":
        headers["Accept"] = "text/csv"
    return {"query_string": {"rows": "50"}, "headers": headers}


def output_csv(data: t.Any, code: int, headers: t.Any = None) -> Response:
    body = "".join(f"{n},{label}\r\n" for n, label in data["rows"])
    response = make_response(body, code)
    response.headers.extend(headers or {})
    return response


def add_pair(api: Api, name: str, handler: t.Callable[[], t.Any], method: str = "post") -> None:
    """``/sync/<name>`` on a plain Resource, ``/async/<name>`` on an AsyncResource."""
    for base, prefix in ((Resource, "sync"), (AsyncResource, "async")):
        cls = type(f"{prefix}_{name}", (base,), {method: lambda self: handler()})
        api.add_resource(cls, f"/{prefix}/{name}", endpoint=f"{prefix}_{name}")


def result_app(factory: AppFactory, tmp_path: Path, **config: t.Any) -> tuple[Flask, Api]:
    path = tmp_path / "report.csv"
    path.write_bytes(CSV)
    app, api = factory(config={"TEST_RESULT_FILE": str(path), **config})
    api.representation("text/csv")(output_csv)
    for name, handler in HANDLERS.items():
        add_pair(api, name, handler)
    return app, api


def compared(response: TestResponse) -> dict[str, list[str]]:
    # A cookie's Expires is the time of the response plus its Max-Age, in whole
    # seconds: the task and the plain call may end on either side of a second.
    return {
        name: [_EXPIRES.sub("Expires=<date>", value) for value in response.headers.getlist(name)]
        for name in COMPARED
    }


_EXPIRES = re.compile(r"Expires=[^;]*(?=; Max-Age=[1-9])")


@pytest.mark.parametrize("kind", HANDLERS)
def test_status_url_answers_what_a_plain_resource_answers(
    make_app_any_store: AppFactory, tmp_path: Path, kind: str
) -> None:
    app, _ = result_app(make_app_any_store, tmp_path)
    client = app.test_client()
    with client.post(f"/sync/{kind}", **request_for(kind)) as plain:
        plain.get_data()  # a send_file body is read (and its file closed) here
    accepted = client.post(f"/async/{kind}", **request_for(kind))
    assert accepted.status_code == 202
    final = wait_done(client, accepted.headers["Location"])
    assert (final.status_code, final.data) == (plain.status_code, plain.data)
    assert compared(final) == compared(plain)
    assert final.headers["Cache-Control"] == "no-store"
    if final.status_code != 204:
        assert final.headers["Content-Length"] == str(len(plain.data))


def test_send_file_result_is_kept_byte_identical_in_the_store(
    make_app_any_store: AppFactory, tmp_path: Path
) -> None:
    app, _ = result_app(make_app_any_store, tmp_path)
    client = app.test_client()
    location = client.post("/async/send_file-buffer").headers["Location"]
    assert wait_done(client, location).data == CSV
    task = get_state(app).store.get(location.rsplit("/", 1)[1])
    assert task is not None
    assert task.state is TaskState.SUCCEEDED
    assert task.response is not None
    assert task.response.body == CSV


def test_result_over_the_cap_fails_the_task_with_a_message_logged_once(
    make_app_any_store: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = result_app(make_app_any_store, tmp_path, RESTFUL_ASYNC_MAX_RESULT=len(CSV) - 1)
    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger=app.logger.name):
        location = client.post("/async/send_file-buffer").headers["Location"]
        final = wait_done(client, location)
    assert final.status_code == 500
    assert final.headers["Content-Type"] == "application/json"
    assert final.json is not None
    assert "too large" in final.json["message"]
    task_id = location.rsplit("/", 1)[1]
    records = [r for r in caplog.records if getattr(r, "task_id", None) == task_id]
    assert len(records) == 1
    assert "RESTFUL_ASYNC_MAX_RESULT" in records[0].getMessage()
    task = get_state(app).store.get(task_id)
    assert task is not None
    assert task.state is TaskState.FAILED
    assert task.response is not None
    assert len(task.response.body) < 100


def test_result_at_the_cap_is_kept(make_app: AppFactory, tmp_path: Path) -> None:
    app, _ = result_app(make_app, tmp_path, RESTFUL_ASYNC_MAX_RESULT=len(CSV))
    client = app.test_client()
    final = wait_done(client, client.post("/async/send_file-path").headers["Location"])
    assert (final.status_code, final.data) == (200, CSV)


def test_a_stream_is_not_read_past_the_cap_and_is_closed(make_app: AppFactory) -> None:
    pulled: list[int] = []
    closed: list[bool] = []

    def endless() -> Response:
        def chunks() -> Iterator[bytes]:
            try:
                while True:
                    pulled.append(1)
                    yield b"x" * 100
            finally:
                closed.append(True)

        return Response(stream_with_context(chunks()), mimetype="text/plain")

    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_RESULT": 1000})
    add_pair(api, "endless", endless)
    add_pair(api, "after", _send_inline)
    client = app.test_client()
    final = wait_done(client, client.post("/async/endless").headers["Location"])
    assert final.status_code == 500
    assert final.json is not None
    assert "too large" in final.json["message"]
    assert len(pulled) == 11  # 1000 bytes kept, the 1001st refused, nothing more read
    assert closed == [True]
    # The worker's request context was left clean: the next task runs.
    final = wait_done(client, client.post("/async/after").headers["Location"])
    assert final.status_code == 200


def test_a_stream_that_fails_midway_fails_the_task_and_stores_nothing_of_it(
    make_app_any_store: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Response:
        def chunks() -> Iterator[bytes]:
            yield b"partial row 1\n"
            yield b"partial row 2\n"
            raise OSError("disk went away")

        return Response(stream_with_context(chunks()), mimetype="text/csv")

    app, api = make_app_any_store()
    add_pair(api, "broken", broken)
    client = app.test_client()
    with caplog.at_level(logging.ERROR, logger=app.logger.name):
        location = client.post("/async/broken").headers["Location"]
        final = wait_done(client, location)
    assert final.status_code == 500
    assert final.json == {"message": "Internal Server Error"}
    task_id = location.rsplit("/", 1)[1]
    assert any(task_id in r.getMessage() and r.exc_info for r in caplog.records)
    task = get_state(app).store.get(task_id)
    assert task is not None
    assert task.state is TaskState.FAILED
    assert task.response is not None
    assert b"partial" not in task.response.body


def test_conditional_poll_of_a_file_result_answers_as_send_file(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, _ = result_app(make_app, tmp_path, RESTFUL_ASYNC_MAX_RESULT=len(CSV))
    client = app.test_client()
    location = client.post("/async/send_file-path").headers["Location"]
    etag = wait_done(client, location).headers["ETag"]
    unchanged = client.get(location, headers={"If-None-Match": etag})
    assert (unchanged.status_code, unchanged.data) == (304, b"")
    assert unchanged.headers["ETag"] == etag
    changed = client.get(location, headers={"If-None-Match": '"another"'})
    assert (changed.status_code, changed.data) == (200, CSV)
    failed = client.get(location, headers={"If-Match": '"another"'})
    assert failed.status_code == 412


def test_range_on_a_result_that_offers_no_ranges_gets_the_whole_body(
    make_app: AppFactory, tmp_path: Path
) -> None:
    # A POST's send_file says no Accept-Ranges: the status URL must not cut the body.
    app, _ = result_app(make_app, tmp_path)
    client = app.test_client()
    location = client.post("/async/send_file-buffer").headers["Location"]
    assert wait_done(client, location).headers.get("Accept-Ranges") is None
    full = client.get(location, headers={"Range": "bytes=0-9"})
    assert (full.status_code, full.data) == (200, CSV)
    assert "Content-Range" not in full.headers


def test_range_on_a_background_get_download_answers_as_send_file(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, api = result_app(make_app, tmp_path)
    add_pair(api, "download", _send_path, method="get")
    client = app.test_client()
    ranged = {"Range": "bytes=100-199"}
    with client.get("/sync/download", headers=ranged) as plain:
        assert plain.status_code == 206
    location = client.get("/async/download").headers["Location"]
    assert wait_done(client, location).data == CSV
    final = client.get(location, headers=ranged)
    assert (final.status_code, final.data) == (206, CSV[100:200])
    assert final.headers["Content-Range"] == plain.headers["Content-Range"]
    assert final.headers["Content-Length"] == "100"


def test_a_range_past_the_end_is_416_and_kept_by_no_cache(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, api = result_app(make_app, tmp_path)
    add_pair(api, "download", _send_path, method="get")
    client = app.test_client()
    location = client.get("/async/download").headers["Location"]
    wait_done(client, location)
    beyond = client.get(location, headers={"Range": f"bytes={len(CSV) + 10}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(CSV)}"
    assert beyond.headers["Cache-Control"] == "no-store"
    assert "message" in beyond.json


def test_send_file_downloads_byte_identical_under_gunicorn(tmp_path: Path) -> None:
    # Large enough for many blocks on both sides: a short read shows as a hash mismatch.
    size = 3 * 1024 * 1024 + 17
    env = {
        "FLASK_RESTFUL_ASYNC_STORE": f"sqlite:///{tmp_path / 'tasks.db'}",
        "RESULTS_APP_SIZE": str(size),
    }
    expected = random.Random(10).randbytes(size)
    with serve("gunicorn-gthread", "tests.apps.results_app:app", env=env, timeout=15) as base:
        plain = http("POST", base + "/plain-download")
        status, headers, _ = http("POST", base + "/download")
        assert status == 202
        final = poll_until_done(base, headers["location"])
    assert plain[0] == final[0] == 200
    assert hashlib.sha256(final[2]).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert final[2] == plain[2]
    for name in ("content-type", "content-disposition"):
        assert final[1][name] == plain[1][name]
    assert final[1]["content-length"] == str(size)
