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


def test_a_lone_surrogate_in_g_or_a_view_argument_round_trips() -> None:
    # JSON's "\ud800" parses into one; a plain Resource takes it, so must a submit.
    snapshot = _snapshot(b"{}", "\ud800", name="a\udfffb")
    snapshot.g.pop("conn")
    snapshot.g["parsed"] = {"name": "\ud800"}
    again = RequestSnapshot.from_bytes(snapshot.to_bytes())
    assert again == snapshot
    assert RequestSnapshot.from_json(snapshot.to_json()) == snapshot


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


class _Custom(Flask):
    def request_context(self, environ: t.Any) -> t.Any:
        self.contexts = getattr(self, "contexts", 0) + 1
        return super().request_context(environ)


@pytest.mark.parametrize("app_class", [Flask, _Custom])
def test_a_replay_sees_the_url_rule_and_view_args_the_submit_matched(
    app_class: type[Flask],
) -> None:
    """In process, the submit's match is taken as it is (the URL is not matched
    again, unless the app makes its own request contexts); from bytes, in another
    process, the URL is matched: either way the handler sees the same."""
    app = app_class(__name__)
    app.add_url_rule("/things/<int:thing>", "thing", lambda thing: "", methods=["PUT"])
    with app.test_request_context("/things/7", method="PUT"):
        snapshot = RequestSnapshot.capture(b"", "put", (), {"thing": 7})
    assert snapshot.match is not None
    for replayed in (snapshot, RequestSnapshot.from_bytes(snapshot.to_bytes())):
        with replayed.request_context(app):
            assert request.url_rule is not None
            assert (request.url_rule.rule, request.endpoint) == ("/things/<int:thing>", "thing")
            assert request.view_args == {"thing": 7}
            request.view_args["thing"] = 8  # a handler's change stays in its request
    assert snapshot.match[1] == {"thing": 7}
    if app_class is _Custom:
        assert app.contexts == 3  # type: ignore[attr-defined]
