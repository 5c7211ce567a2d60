"""Backpressure: the tasks waiting for a worker are bounded by count
(``RESTFUL_ASYNC_MAX_PENDING``) and by the bytes of the requests they hold
(``RESTFUL_ASYNC_MAX_PENDING_BYTES``); beyond either, a submit answers 503."""

from __future__ import annotations

import pytest

from flask_restful_async.executors.threads import ThreadExecutor
from flask_restful_async.state import get_state

from .conftest import HELD_RELEASE as RELEASE
from .conftest import HELD_STARTED as STARTED
from .conftest import AppFactory, Held, wait_done, wait_for

pytestmark = pytest.mark.usefixtures("held_tasks")


def test_a_burst_of_1000_small_submits_is_accepted_with_the_defaults(
    make_app: AppFactory,
) -> None:
    app, api = make_app()
    api.add_resource(Held, "/held")
    client = app.test_client()
    codes = [client.post("/held", json={"x": 1}).status_code for _ in range(1000)]
    assert codes == [202] * 1000
    executor = get_state(app).executor
    assert isinstance(executor, ThreadExecutor)
    assert executor.held_bytes > 0
    RELEASE.set()
    wait_for(lambda: executor.idle(executor.max_workers) == executor.max_workers, timeout=60)
    assert executor.held_bytes == 0


def test_submits_beyond_the_held_bytes_answer_503_and_leave_no_task(
    make_app: AppFactory,
) -> None:
    app, api = make_app(
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING_BYTES": 20_000}
    )
    api.add_resource(Held, "/held")
    client = app.test_client()
    state = get_state(app)
    executor = state.executor
    assert isinstance(executor, ThreadExecutor)
    body = {"pad": "x" * 5000}
    running = client.post("/held", json=body)
    assert STARTED.wait(10)
    wait_for(lambda: executor.held_bytes == 0)  # a running task's request is not counted

    accepted = []
    while True:
        response = client.post("/held", json=body)
        if response.status_code != 202:
            break
        accepted.append(response.headers["Location"])
        assert len(accepted) < 10, "the held bytes were never bounded"
    assert len(accepted) == 3  # three requests of a bit over 5,000 bytes fit in 20,000
    assert executor.held_bytes <= 20_000
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json is not None
    assert "bytes" in response.json["message"]
    assert len(state.store.list(owner=None)) == 1 + len(accepted)
    # A small request may still fit where a large one did not.
    assert client.post("/held", json={"x": 1}).status_code == 202

    RELEASE.set()
    for location in [running.headers["Location"], *accepted]:
        assert wait_done(client, location).status_code == 200
    wait_for(lambda: executor.held_bytes == 0)
    assert client.post("/held", json=body).status_code == 202


def test_a_repeat_with_its_key_gets_its_202_when_no_room_is_left(
    make_app_any_store: AppFactory,
) -> None:
    # The contract: a repeat answers as the first submit did, whatever state the
    # task is in. It needs no room: it creates nothing.
    app, api = make_app_any_store(
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING": 1}
    )
    api.add_resource(Held, "/held")
    client = app.test_client()
    running = client.post("/held", json={"n": 0})
    assert STARTED.wait(10)
    first = client.post("/held", json={"n": 1}, headers={"Idempotency-Key": "k"})
    assert first.status_code == 202
    assert client.post("/held", json={"n": 2}).status_code == 503  # full
    again = client.post("/held", json={"n": 1}, headers={"Idempotency-Key": "k"})
    assert again.status_code == 202, again.get_data()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.json is not None
    assert again.json["state"] == "queued"
    other = client.post("/held", json={"n": 3}, headers={"Idempotency-Key": "k"})
    assert other.status_code == 422
    new_key = client.post("/held", json={"n": 1}, headers={"Idempotency-Key": "k2"})
    assert new_key.status_code == 503
    RELEASE.set()
    for location in (running.headers["Location"], first.headers["Location"]):
        assert wait_done(client, location).status_code == 200


def test_one_request_larger_than_the_bound_is_accepted_when_nothing_waits(
    make_app: AppFactory,
) -> None:
    app, api = make_app(
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_MAX_PENDING_BYTES": 1000}
    )
    api.add_resource(Held, "/held")
    client = app.test_client()
    first = client.post("/held", json={"x": 1})
    assert STARTED.wait(10)
    large = {"pad": "x" * 5000}
    assert client.post("/held", json=large).status_code == 202  # nothing else waits
    assert client.post("/held", json={"x": 1}).status_code == 503
    RELEASE.set()
    wait_done(client, first.headers["Location"])


def test_max_pending_bytes_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_pending_bytes"):
        ThreadExecutor(max_pending_bytes=-1)


def test_config_sizes_the_thread_executor(make_app: AppFactory) -> None:
    app, _ = make_app(config={"RESTFUL_ASYNC_MAX_PENDING_BYTES": 12345})
    executor = get_state(app).executor
    assert isinstance(executor, ThreadExecutor)
    assert executor.max_pending_bytes == 12345
    assert executor.max_pending == 4096
