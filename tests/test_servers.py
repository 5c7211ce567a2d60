"""Request bodies reach a background handler intact under real servers.

The submit path must copy the whole body before the 202 leaves: the server owns
the input stream and the handler runs later, in another thread. Each test sends
a body to ``tests/apps/digest_app.py`` under gunicorn (sync and gthread) and
werkzeug's threaded server, and compares hashes of what the handler saw with
hashes of the bytes sent. ``/plain-digest`` (a synchronous ``Resource``) is the
control: if it disagrees too, the fault is in the test or the server, not in
the library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import typing as t
from collections.abc import Iterator

import pytest

from .servers import KINDS, Response, http, poll_until_done, serve

APP = "tests.apps.digest_app:app"
FIELD_VALUE = "naïve café, ünïcödé\r\n-- and a line break"
FILE_NAME = "random.bin"
FILE_TYPE = "application/octet-stream"
CHUNK_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Payload:
    body: bytes = dataclasses.field(repr=False)
    content_type: str
    expected: dict[str, t.Any]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(data: t.Any) -> bytes:
    # Must match digest_app.canonical_json; not imported so that this process
    # does not build the app (and its executor) it never uses.
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_payload(body: bytes) -> Payload:
    return Payload(
        body,
        "application/json",
        {
            "sha256": sha256(body),
            "length": len(body),
            "json_sha256": sha256(canonical_json(json.loads(body))),
            "form": {},
            "files": {},
        },
    )


def small_json() -> Payload:
    body = b'{"a":"bcdefg"}'
    assert len(body) == 14
    return json_payload(body)


def large_json() -> Payload:
    # Non-ASCII text and escapes, so that a decode/re-encode on the way would show.
    rng = random.Random(200)
    items = [
        {"i": i, "word": "".join(rng.choices('abcdéfgh"\\/\n€𝄞', k=40)), "x": rng.random()}
        for i in range(2000)
    ]
    body = json.dumps({"items": items}, ensure_ascii=False).encode()
    assert 180_000 < len(body) < 260_000
    return json_payload(body)


def upload() -> Payload:
    # Seeded, so that a failure can be replayed; random bytes contain CRLFs and
    # dashes that a careless multipart parser (or a truncated copy) trips on.
    rng = random.Random(600)
    content = rng.randbytes(600 * 1024)
    boundary = "digest-" + rng.randbytes(16).hex()
    assert boundary.encode() not in content
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="note"\r\n\r\n',
            FIELD_VALUE.encode(),
            f"\r\n--{boundary}\r\n".encode(),
            f'Content-Disposition: form-data; name="file"; filename="{FILE_NAME}"\r\n'.encode(),
            f"Content-Type: {FILE_TYPE}\r\n\r\n".encode(),
            content,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    file = {"filename": FILE_NAME, "content_type": FILE_TYPE, "size": len(content)}
    return Payload(
        body,
        f"multipart/form-data; boundary={boundary}",
        {
            "sha256": sha256(body),
            "length": len(body),
            "json_sha256": None,
            "form": {"note": [FIELD_VALUE]},
            "files": {"file": [{**file, "sha256": sha256(content)}]},
        },
    )


PAYLOADS = {"json-14B": small_json(), "json-200kB": large_json(), "upload-600kB": upload()}


@pytest.fixture(scope="module", params=KINDS)
def base(request: pytest.FixtureRequest) -> Iterator[str]:
    with serve(request.param, APP, timeout=15) as url:
        yield url


def chunks(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), CHUNK_SIZE):
        yield body[start : start + CHUNK_SIZE]


def send(base: str, path: str, payload: Payload, *, chunked: bool) -> Response:
    return http(
        "POST",
        base + path,
        body=chunks(payload.body) if chunked else payload.body,
        headers={"Content-Type": payload.content_type},
    )


def check_digest(body: bytes, payload: Payload, *, content_length: int | None) -> None:
    # One comparison, so that a failure lists every field that differs.
    assert json.loads(body) == {**payload.expected, "content_length": content_length}


def submit_and_wait(base: str, payload: Payload, *, chunked: bool) -> bytes:
    status, headers, body = send(base, "/digest", payload, chunked=chunked)
    assert status == 202, body
    task_id = json.loads(body)["id"]
    assert headers["location"] == f"/tasks/{task_id}"
    assert int(headers["retry-after"]) >= 0
    status, _, body = poll_until_done(base, headers["location"], timeout=10)
    assert status == 200, body
    return body


@pytest.mark.parametrize("name", PAYLOADS)
def test_plain_handler_sees_the_body(base: str, name: str) -> None:
    payload = PAYLOADS[name]
    status, _, body = send(base, "/plain-digest", payload, chunked=False)
    assert status == 200, body
    check_digest(body, payload, content_length=len(payload.body))


@pytest.mark.parametrize("name", PAYLOADS)
def test_background_handler_sees_the_body(base: str, name: str) -> None:
    payload = PAYLOADS[name]
    body = submit_and_wait(base, payload, chunked=False)
    check_digest(body, payload, content_length=len(payload.body))


def test_plain_handler_sees_a_chunked_upload(base: str) -> None:
    payload = PAYLOADS["upload-600kB"]
    status, _, body = send(base, "/plain-digest", payload, chunked=True)
    assert status == 200, body
    # Nothing on the wire said how long the body was.
    check_digest(body, payload, content_length=None)


def test_background_handler_sees_a_chunked_upload(base: str) -> None:
    # werkzeug's dev server de-chunks request bodies too (and sets
    # wsgi.input_terminated), so no server kind is skipped.
    payload = PAYLOADS["upload-600kB"]
    body = submit_and_wait(base, payload, chunked=True)
    # The worker's copy is a buffer of known length: it always has one.
    check_digest(body, payload, content_length=len(payload.body))
