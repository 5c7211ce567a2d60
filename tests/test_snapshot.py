"""The request snapshot as bytes: what a store keeps with a task for another process."""

from __future__ import annotations

import hashlib
import typing as t

import pytest
from flask import Flask, g, request

from flask_restful_async.snapshot import RequestSnapshot


def _snapshot(body: bytes, *args: t.Any, **kwargs: t.Any) -> RequestSnapshot:
    app = Flask(__name__)
    with app.test_request_context(
        "/things/7?q=a&q=b",
        method="PUT",
        data=body,
        headers={"X-Echo": "é", "Content-Type": "application/octet-stream"},
    ):
        g.user = {"id": 1, "roles": ["a", "b"]}
        g.conn = object()
        return RequestSnapshot.capture(body, "put", args, kwargs)


def test_bytes_round_trip_keeps_every_part() -> None:
    body = bytes(range(256)) + "naïve ☃".encode()
    snapshot = _snapshot(body, 7, "x", id=7, flag=None)
    again = RequestSnapshot.from_bytes(snapshot.to_bytes())
    assert again.g == {"user": {"id": 1, "roles": ["a", "b"]}}  # not JSON data: dropped
    snapshot.g.pop("conn")
    assert again == snapshot
    assert isinstance(again.args, tuple)
    with again.request_context(Flask(__name__)):
        assert request.get_data() == body
        assert request.args.getlist("q") == ["a", "b"]
        assert request.headers["X-Echo"] == "é"


def test_a_5_mb_body_is_kept_as_it_is_not_in_base64() -> None:
    body = hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32)
    data = _snapshot(body).to_bytes()
    assert len(body) < len(data) < len(body) + 1024
    assert RequestSnapshot.from_bytes(data).body == body


def test_view_arguments_that_are_not_json_make_it_not_portable() -> None:
    assert _snapshot(b"", 1, name="x").portable
    snapshot = _snapshot(b"", when=object())
    assert not snapshot.portable
    with pytest.raises(TypeError, match="not JSON data"):
        snapshot.to_bytes()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"RSNAP\x02\x00\x00\x00\x02{}",  # a later version of the layout
        b"RSNAP\x01\x00\x00\x00\x09{}",  # header longer than the data
        b"RSNAP\x01\x00\x00\x00\x02[]",
        b"RSNAP\x01\x00\x00\x00\x02{}",  # no environ
        b"RSNAP\x01\x00\x00\x00\x03{x}",
    ],
)
def test_from_bytes_refuses_other_data(data: bytes) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        RequestSnapshot.from_bytes(data)
