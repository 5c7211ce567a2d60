"""The body a task gets: read only for an accepted request, whole, bounded, checked.

The first tests use Flask's test client. The last ones send broken bodies to a
real gunicorn over raw sockets (what a test client cannot send): a body cut
short by a client that went away, and malformed chunked framing. Each must get a
400 JSON answer, create no task and leave no traceback in the server's log.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import socket
import tempfile
import typing as t
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import request
from flask_restful import abort

from flask_restful_async import AsyncResource
from flask_restful_async.state import get_state
from flask_restful_async.stores import SQLiteStore

from .conftest import AppFactory, wait_done
from .servers import serve

LIMIT = 1000


def authenticate(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    @functools.wraps(func)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        if request.headers.get("Authorization") != "Bearer ok":
            abort(401, message="who are you?")
        return func(*args, **kwargs)

    return wrapper


class Digest(AsyncResource):
    method_decorators = [authenticate]

    def post(self) -> t.Any:
        body = request.get_data()
        return {"sha256": hashlib.sha256(body).hexdigest(), "form": request.form.to_dict()}


def test_an_unauthenticated_body_over_the_cap_is_401_and_never_read(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_BODY": LIMIT})
    api.add_resource(Digest, "/digest")
    client = app.test_client()
    for size in (LIMIT + 1, 12 * LIMIT):
        stream = io.BytesIO(b"x" * size)
        response = client.post(
            "/digest", input_stream=stream, content_length=size, content_type="text/plain"
        )
        assert response.status_code == 401, size
        assert response.json == {"message": "who are you?"}
        assert stream.tell() == 0  # not a byte read
    assert get_state(app).store.list(owner=None) == []


def test_an_authenticated_body_over_the_cap_is_413_chunked_included(
    make_app: AppFactory,
) -> None:
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_BODY": LIMIT})
    api.add_resource(Digest, "/digest")
    client = app.test_client()
    auth = {"Authorization": "Bearer ok"}
    assert client.post("/digest", data=b"x" * (LIMIT + 1), headers=auth).status_code == 413
    chunked = client.post(
        "/digest",
        input_stream=io.BytesIO(b"y" * (LIMIT + 1)),
        headers={**auth, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert chunked.status_code == 413
    assert chunked.json is not None
    assert "message" in chunked.json
    assert get_state(app).store.list(owner=None) == []
    body = b"z" * LIMIT
    accepted = client.post("/digest", data=body, headers=auth, content_type="text/plain")
    assert accepted.status_code == 202
    final = wait_done(client, accepted.headers["Location"])
    assert final.json == {"sha256": hashlib.sha256(body).hexdigest(), "form": {}}


def test_a_decorator_that_reads_the_body_over_the_cap_gets_413(make_app: AppFactory) -> None:
    def peek_json(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(func)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            request.get_json()
            return func(*args, **kwargs)

        return wrapper

    class Peeked(AsyncResource):
        method_decorators = [peek_json]

        def post(self) -> t.Any:
            return request.get_json()

    app, api = make_app(config={"RESTFUL_ASYNC_MAX_BODY": LIMIT})
    api.add_resource(Peeked, "/peeked")
    client = app.test_client()
    big = json.dumps({"pad": "p" * LIMIT}).encode()
    chunked = client.post(
        "/peeked",
        input_stream=io.BytesIO(big),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert chunked.status_code == 413
    assert get_state(app).store.list(owner=None) == []
    accepted = client.post("/peeked", json={"small": [1, 2]})
    assert wait_done(client, accepted.headers["Location"]).json == {"small": [1, 2]}


def test_a_form_a_decorator_parsed_reaches_the_task_byte_identical(
    make_app: AppFactory,
) -> None:
    def read_form(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
        @functools.wraps(func)
        def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
            if request.form.get("token") != "ok":
                abort(401, message="who are you?")
            return func(*args, **kwargs)

        return wrapper

    class FormDigest(Digest):
        method_decorators = [read_form]

    app, api = make_app()
    api.add_resource(FormDigest, "/form")
    client = app.test_client()
    # Not as werkzeug would encode it: a re-encoded form would show.
    body = b"b=%C3%A9t%C3%A9&token=ok&a=1+2&a=3"
    accepted = client.post("/form", data=body, content_type="application/x-www-form-urlencoded")
    assert accepted.status_code == 202
    assert wait_done(client, accepted.headers["Location"]).json == {
        "sha256": hashlib.sha256(body).hexdigest(),
        "form": {"b": "été", "token": "ok", "a": "1 2"},
    }


class BrokenStream(io.BytesIO):
    """A server's input that fails after its first bytes, as gunicorn's does on
    bad chunks (werkzeug reads through ``readinto`` where there is one)."""

    def read(self, size: int | None = -1) -> bytes:
        self.fail_after_first()
        return super().read(4)

    def readinto(self, buffer: t.Any) -> int:
        self.fail_after_first()
        return super().readinto(memoryview(buffer)[:4])

    def fail_after_first(self) -> None:
        if self.tell():
            raise RuntimeError("invalid chunk size")


def read_json(func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    @functools.wraps(func)
    def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
        request.get_json(silent=True)
        request.form.get("x")
        return func(*args, **kwargs)

    return wrapper


class Plain(AsyncResource):
    def post(self) -> t.Any:
        return {}


class Decorated(Plain):
    method_decorators = [read_json]


@pytest.mark.parametrize("resource", [Plain, Decorated])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_stream_that_breaks_or_ends_early_is_400_and_no_task(
    make_app: AppFactory, resource: type[AsyncResource], content_type: str
) -> None:
    app, api = make_app()
    api.add_resource(resource, "/broken")
    client = app.test_client()
    # A server that terminates the input itself, as gunicorn does: werkzeug then
    # neither counts the bytes against Content-Length nor catches its errors.
    terminated = {"wsgi.input_terminated": True}
    broken = client.post(
        "/broken",
        input_stream=BrokenStream(b'{"x": "1"}'),
        content_type=content_type,
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides=terminated,
    )
    assert broken.status_code == 400
    assert broken.json is not None
    assert "could not be read" in broken.json["message"]
    short = client.post(
        "/broken",
        input_stream=io.BytesIO(b"x=1"),
        content_type=content_type,
        environ_overrides={**terminated, "CONTENT_LENGTH": "1000"},
    )
    assert short.status_code == 400
    assert short.json is not None
    assert "incomplete" in short.json["message"]
    assert get_state(app).store.list(owner=None) == []


# -- under gunicorn, over raw sockets ------------------------------------------------

APP = "tests.apps.tasks_app:app"


class Gunicorn(t.NamedTuple):
    host: str
    port: int
    log: t.IO[bytes]
    store: SQLiteStore

    def send(self, raw: bytes, *, close_write: bool = False) -> tuple[int, dict[str, t.Any]]:
        """Send ``raw`` bytes as they are; the status and JSON body of the answer."""
        with socket.create_connection((self.host, self.port), timeout=10) as sock:
            sock.sendall(raw)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.getheader("Content-Type") == "application/json"
            return response.status, json.loads(response.read())

    def task_count(self) -> int:
        return len(self.store.list(owner=None, limit=500))

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")


@pytest.fixture(scope="module", params=["gunicorn-sync", "gunicorn-gthread"])
def gunicorn(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    instance = tmp_path_factory.mktemp("bodies") / "instance"
    with (
        tempfile.NamedTemporaryFile(prefix="gunicorn-", suffix=".log") as log,
        serve(request.param, APP, env={"TASKS_APP_INSTANCE": str(instance)}, log=log) as base,
    ):
        parts = urllib.parse.urlsplit(base)
        assert parts.hostname is not None
        assert parts.port is not None
        store = SQLiteStore(str(instance / "restful_async.db"))
        try:
            yield Gunicorn(parts.hostname, parts.port, log, store)
        finally:
            store.close()


def post_head(**headers: str) -> bytes:
    lines = ["POST /jobs/echo HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_body_shorter_than_its_content_length_is_400_and_no_task(gunicorn: Gunicorn) -> None:
    before = gunicorn.task_count()
    status, doc = gunicorn.send(post_head(Content_Length="1000") + b"{}\n", close_write=True)
    assert status == 400
    assert "incomplete" in doc["message"]
    assert gunicorn.task_count() == before
    assert "Traceback" not in gunicorn.output()


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param(b"zz\r\n{}\r\n0\r\n\r\n", id="invalid-chunk-size"),
        pytest.param(b"2\r\n{}XY0\r\n\r\n", id="missing-terminator"),
        pytest.param(b"a\r\n{}", id="cut-short"),
    ],
)
def test_a_malformed_chunked_body_is_400_without_traceback(
    gunicorn: Gunicorn, chunks: bytes
) -> None:
    before = gunicorn.task_count()
    for _ in range(2):
        status, doc = gunicorn.send(
            post_head(Transfer_Encoding="chunked") + chunks, close_write=True
        )
        assert status == 400
        assert "could not be read" in doc["message"]
    assert gunicorn.task_count() == before
    assert "Traceback" not in gunicorn.output()


def test_a_whole_body_still_makes_a_task(gunicorn: Gunicorn) -> None:
    before = gunicorn.task_count()
    status, doc = gunicorn.send(post_head(Content_Length="2") + b"{}")
    assert status == 202, doc
    status, doc = gunicorn.send(post_head(Transfer_Encoding="chunked") + b"2\r\n{}\r\n0\r\n\r\n")
    assert status == 202, doc
    assert gunicorn.task_count() == before + 2
