"""Results are serialized in the worker, through the Api's representations."""

from __future__ import annotations

import decimal
import typing as t
import uuid
from datetime import UTC, datetime

from flask import make_response

from flask_restful_async import AsyncResource, TaskState
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
