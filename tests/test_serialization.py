"""Results are serialized in the worker, through the Api's representations."""

from __future__ import annotations

import decimal
import json
import typing as t
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask import Flask, make_response
from flask_restful import Api, Resource
from werkzeug.exceptions import HTTPException

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.exceptions import ResultTooLarge
from flask_restful_async.responses import render_result, render_stored, store_response
from flask_restful_async.state import get_state

from .conftest import AppFactory, wait_done


def test_datetime_decimal_and_uuid_results_serialize(make_app: AppFactory) -> None:
    class Values(AsyncResource):
        def get(self) -> t.Any:
            return {
                "when": datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
                "amount": decimal.Decimal("12.50"),
                "id": uuid.UUID(int=7),
            }

    app, api = make_app()
    api.add_resource(Values, "/values")
    client = app.test_client()
    final = wait_done(client, client.get("/values").headers["Location"])
    assert final.status_code == 200
    assert final.json == {
        "when": "Tue, 24 Nov 2026 10:00:00 GMT",
        "amount": "12.50",
        "id": "00000000-0000-0000-0000-000000000007",
    }


def test_restful_json_settings_are_honoured(make_app: AppFactory) -> None:
    class Ordered(AsyncResource):
        def get(self) -> t.Any:
            return {"b": 1, "a": 2}

    app, api = make_app(config={"RESTFUL_JSON": {"separators": (",", ":")}})
    api.add_resource(Ordered, "/ordered")
    client = app.test_client()
    final = wait_done(client, client.get("/ordered").headers["Location"])
    assert final.data == b'{"b":1,"a":2}\n'


def test_an_unserializable_result_fails_the_task_not_the_status_request(
    make_app: AppFactory,
) -> None:
    class Opaque(AsyncResource):
        def get(self) -> t.Any:
            return {"thing": object()}

    app, api = make_app()
    api.add_resource(Opaque, "/opaque")
    client = app.test_client()
    location = client.get("/opaque").headers["Location"]
    final = wait_done(client, location)
    assert final.status_code == 500
    assert final.json == {"message": "Internal Server Error"}
    task = get_state(app).store.get(location.rsplit("/", 1)[1])
    assert task is not None
    assert task.state is TaskState.FAILED
    assert client.get(location).status_code == 500


def test_the_submitting_requests_accept_picks_the_representation(make_app: AppFactory) -> None:
    class Data(AsyncResource):
        def get(self) -> t.Any:
            return {"n": 1}, 200

    app, api = make_app()

    @api.representation("text/csv")
    def csv(data: t.Any, code: int, headers: t.Any = None) -> t.Any:
        response = make_response(",".join(f"{k}={v}" for k, v in data.items()), code)
        response.headers.extend(headers or {})
        return response

    api.add_resource(Data, "/data")
    client = app.test_client()
    accepted = client.get("/data", headers={"Accept": "text/csv"})
    final = wait_done(client, accepted.headers["Location"])
    assert final.headers["Content-Type"] == "text/csv"
    assert final.data == b"n=1"
    as_json = wait_done(client, client.get("/data").headers["Location"])
    assert as_json.json == {"n": 1}


def test_a_response_object_is_stored_as_is(make_app: AppFactory) -> None:
    class Raw(AsyncResource):
        def get(self) -> t.Any:
            response = make_response(b"\x00\x01binary", 206)
            response.headers["Content-Type"] = "application/octet-stream"
            response.set_cookie("seen", "1")
            return response

    app, api = make_app()
    api.add_resource(Raw, "/raw")
    client = app.test_client()
    final = wait_done(client, client.get("/raw").headers["Location"])
    assert final.status_code == 206
    assert final.data == b"\x00\x01binary"
    assert final.headers["Content-Type"] == "application/octet-stream"
    assert "seen=1" in final.headers["Set-Cookie"]


class Plain(AsyncResource):
    def get(self) -> t.Any:
        return {}


class Represented(AsyncResource):
    representations = {"text/csv": lambda data, code, headers: make_response("a,b\n", code)}

    def get(self) -> t.Any:
        return {}


@pytest.mark.parametrize(
    "rv",
    [
        {"b": 1, "a": [1, 2.5, None, "é"]},
        [1, 2],
        "text",
        None,
        ({"created": True}, 201),
        ({"created": True}, 201, {"X-A": "b", "Content-Type": "text/plain"}),
        ({"x": 1}, 200, [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Vary", "Accept")]),
        ({"x": 1}, "202"),
        (1, 2, 3, 4),
    ],
)
@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("accept", [None, "application/json", "text/html", "text/csv"])
@pytest.mark.parametrize("resource", [Plain, Represented])
def test_the_short_way_to_a_stored_result_gives_what_the_long_way_gives(
    make_app: AppFactory,
    rv: t.Any,
    debug: bool,
    accept: str | None,
    resource: type[AsyncResource],
) -> None:
    """The worker skips the Response object for plain JSON results: whatever the
    handler returns, the stored response is the one flask-restful's path gives."""
    app, api = make_app()
    app.debug = debug
    app.config["RESTFUL_JSON"] = {"separators": (",", ":")} if debug else {}
    headers = {} if accept is None else {"Accept": accept}
    with app.test_request_context("/x", headers=headers):
        try:
            long = store_response(render_result(api, resource(), rv), 1 << 20)
        except HTTPException as e:
            with pytest.raises(type(e)):
                render_stored(api, resource(), rv, 1 << 20)
            return
        assert render_stored(api, resource(), rv, 1 << 20) == long
        with pytest.raises(ResultTooLarge):
            render_stored(api, resource(), rv, len(long.body) - 1)


class PriceEncoder(json.JSONEncoder):
    def default(self, o: t.Any) -> t.Any:
        if isinstance(o, decimal.Decimal):
            return float(o)
        return super().default(o)


class Conflict(Exception):
    pass


class Versioned(Api):
    """An Api subclass as apps write them: an envelope header, errors of its own."""

    def make_response(self, data: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        response = super().make_response(data, *args, **kwargs)
        response.headers["X-Api-Version"] = "2"
        return response

    def handle_error(self, e: Exception) -> t.Any:
        if isinstance(e, KeyError):
            return self.make_response({"message": "no such item"}, 422)
        return super().handle_error(e)


def answers(
    tmp_path: Path, api_class: type[Api], body: t.Callable[[], t.Any], **config: t.Any
) -> tuple[tuple[int, list[tuple[str, str]], bytes], tuple[int, list[tuple[str, str]], bytes]]:
    """What a plain Resource and an AsyncResource with ``body`` as their handler
    answer (the async one at its status URL), without Date and Cache-Control."""
    app = Flask("parity", instance_path=str(tmp_path / "instance"))
    app.config.update(config)
    api = api_class(app, errors={"Conflict": {"status": 409}})
    register_async(api, store="memory://")

    class Plain(Resource):
        def post(self) -> t.Any:
            return body()

    class Async(AsyncResource):
        def post(self) -> t.Any:
            return body()

    api.add_resource(Plain, "/plain")
    api.add_resource(Async, "/async")
    client = app.test_client()
    try:

        def seen(response: t.Any) -> tuple[int, list[tuple[str, str]], bytes]:
            skipped = {"date", "cache-control", "vary", "content-length"}
            headers = [(k, v) for k, v in response.headers.items() if k.lower() not in skipped]
            return response.status_code, sorted(headers), response.get_data()

        final = wait_done(client, client.post("/async").headers["Location"])
        return seen(client.post("/plain")), seen(final)
    finally:
        get_state(app).close()


@pytest.mark.parametrize(
    ("name", "body", "config"),
    [
        ("RESTFUL_JSON's own encoder", lambda: {"price": decimal.Decimal("1.5")},
         {"RESTFUL_JSON": {"cls": PriceEncoder}}),
        ("data and a dict of headers", lambda: ({"x": 1}, {"X-Extra": "1"}), {}),
        ("data and a code as text", lambda: ({"x": 1}, "201 CREATED"), {}),
        ("an exception Api(errors=...) maps", lambda: (_ for _ in ()).throw(Conflict("no")), {}),
        ("an exception handle_error maps", lambda: {}["missing"], {}),
    ],
)  # fmt: skip
def test_the_final_answer_is_what_flask_restful_answers(
    tmp_path: Path, name: str, body: t.Callable[[], t.Any], config: dict[str, t.Any]
) -> None:
    plain, final = answers(tmp_path, Versioned, body, **config)
    assert final == plain, name


def test_an_unmapped_exception_is_the_generic_500_through_an_api_subclass(
    tmp_path: Path,
) -> None:
    plain, final = answers(tmp_path, Versioned, lambda: 1 / 0)
    assert plain[0] == final[0] == 500
    assert json.loads(final[2]) == {"message": "Internal Server Error"}
