"""Config values are read by their kind and checked at ``register_async``
(``flask_restful_async.settings``): a switch given as the string ``"False"`` (as
``from_prefixed_env`` keeps it, and ``os.environ`` gives every value) is off, not
on; a number out of its range, or no number at all, is refused with its key named,
never taken for something else or left to fail requests."""

from __future__ import annotations

import typing as t
from decimal import Decimal
from fractions import Fraction

import pytest
from flask import Flask

from flask_restful_async import AsyncResource
from flask_restful_async.executors.eager import EagerExecutor
from flask_restful_async.executors.threads import ThreadExecutor
from flask_restful_async.settings import flag, number, whole
from flask_restful_async.state import get_state

from .conftest import AppFactory


class Echo(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return {"ok": True}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("True", True),
        ("true", True),
        (" YES ", True),
        ("on", True),
        ("1", True),
        ("False", False),
        ("false", False),
        ("no", False),
        ("OFF", False),
        ("0", False),
        ("", False),
    ],
)
def test_a_switch_reads_its_usual_spellings(value: object, expected: bool) -> None:
    assert flag({"KEY": value}, "KEY") is expected


@pytest.mark.parametrize("value", ["maybe", "Falsey", 2, -1, 0.5, [], "nope"])
def test_anything_else_is_refused_with_its_key(value: object) -> None:
    with pytest.raises(ValueError, match=r"^KEY must be True or False"):
        flag({"KEY": value}, "KEY")


def test_numbers_and_their_strings_are_read() -> None:
    assert number({"K": 2}, "K") == 2.0
    assert number({"K": "2.5"}, "K") == 2.5
    assert number({"K": " 0 "}, "K") == 0.0
    assert number({"K": "1e3"}, "K") == 1000.0
    assert whole({"K": "20"}, "K") == 20
    assert whole({"K": 20.0}, "K") == 20


@pytest.mark.parametrize(
    ("value", "options"),
    [
        ("abc", {}),
        (None, {}),
        (True, {}),
        (-1, {}),
        (float("nan"), {}),
        (float("inf"), {}),
        ("inf", {}),
        (0, {"above": True}),
        (10**400, {}),
        (Decimal("NaN"), {}),
        (1j, {}),
    ],
)
def test_a_number_out_of_range_or_none_at_all_is_refused(
    value: object, options: dict[str, t.Any]
) -> None:
    with pytest.raises(ValueError, match=r"^K must be a |^K is too large"):
        number({"K": value}, "K", **options)


@pytest.mark.parametrize(("value", "least"), [(2.5, 0), ("2.5", 0), (0, 1), (-1, 0), ("x", 0)])
def test_a_whole_number_is_whole(value: object, least: int) -> None:
    with pytest.raises(ValueError, match=r"^K must be a whole number"):
        whole({"K": value}, "K", least=least)


def test_other_kinds_of_numbers_are_read() -> None:
    assert whole({"K": 2**53 + 1}, "K") == 2**53 + 1  # exactly, not through a float
    assert whole({"K": 10**30}, "K") == 10**30
    assert number({"K": Decimal("2.5")}, "K") == 2.5
    assert number({"K": Fraction(1, 4)}, "K") == 0.25
    assert whole({"K": Decimal("20")}, "K") == 20
    assert flag({"K": None}, "K") is False  # unset: off
    assert flag({"K": 1.0}, "K") is True


def _make(make_app: AppFactory, **config: t.Any) -> Flask:
    app, api = make_app(store="memory://", config=config)
    api.add_resource(Echo, "/echo")
    return app


def test_switches_given_as_false_strings_are_off(make_app: AppFactory) -> None:
    app = _make(
        make_app,
        RESTFUL_ASYNC_PUBLIC_LIST="False",
        RESTFUL_ASYNC_CROSS_SITE_DELETE="false",
        RESTFUL_ASYNC_EAGER="0",
        RESTFUL_ASYNC_RESULT_REDIRECT="off",
    )
    state = get_state(app)
    assert not state.public_list
    assert not state.cross_site_delete
    assert not state.result_redirect
    assert isinstance(state.executor, ThreadExecutor)
    client = app.test_client()
    # No owner callable, not in debug mode: no list for anyone.
    assert client.get("/tasks").status_code == 404
    location = client.post("/echo").headers["Location"]
    cross_site = {"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"}
    assert client.delete(location, headers=cross_site).status_code == 403


def test_switches_given_as_true_strings_are_on(make_app: AppFactory) -> None:
    app = _make(make_app, RESTFUL_ASYNC_EAGER="true", RESTFUL_ASYNC_PUBLIC_LIST="1")
    assert isinstance(get_state(app).executor, EagerExecutor)
    assert app.test_client().get("/tasks").status_code == 200


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("RESTFUL_ASYNC_PUBLIC_LIST", "perhaps"),
        ("RESTFUL_ASYNC_LEASE", 0),
        ("RESTFUL_ASYNC_LEASE", -1),
        ("RESTFUL_ASYNC_RESULT_TTL", 0),
        ("RESTFUL_ASYNC_RESULT_TTL", -1),
        ("RESTFUL_ASYNC_TOMBSTONE_TTL", -1),
        ("RESTFUL_ASYNC_QUEUED_TTL", -1),
        ("RESTFUL_ASYNC_RETRY_AFTER", -1),
        ("RESTFUL_ASYNC_RETRY_AFTER", 1.5),
        ("RESTFUL_ASYNC_MAX_RETRY_AFTER", 0),
        ("RESTFUL_ASYNC_MAX_WAIT", -5),
        ("RESTFUL_ASYNC_MAX_WAIT", 2.5),
        ("RESTFUL_ASYNC_MAX_WAIT", "abc"),
        ("RESTFUL_ASYNC_MAX_BODY", -1),
        ("RESTFUL_ASYNC_MAX_RESULT", -1),
        ("RESTFUL_ASYNC_MAX_WORKERS", 0),
        ("RESTFUL_ASYNC_MAX_WORKERS", "many"),
        ("RESTFUL_ASYNC_MAX_PENDING", -1),
        ("RESTFUL_ASYNC_SHUTDOWN_TIMEOUT", -1),
    ],
)
def test_a_bad_value_is_refused_at_start_with_its_key(
    make_app: AppFactory, key: str, value: object
) -> None:
    with pytest.raises(ValueError, match=f"^{key} must be"):
        make_app(store="memory://", config={key: value})


def test_numbers_from_the_environment_are_taken(make_app: AppFactory) -> None:
    app = _make(
        make_app,
        RESTFUL_ASYNC_MAX_WAIT="7",
        RESTFUL_ASYNC_RETRY_AFTER="3",
        RESTFUL_ASYNC_MAX_BODY="1024",
        RESTFUL_ASYNC_LEASE="12.5",
    )
    state = get_state(app)
    assert (state.max_wait, state.retry_after, state.max_body) == (7, 3, 1024)
    assert state.store.lease == 12.5
    assert app.test_client().post("/echo").headers["Retry-After"] == "3"
