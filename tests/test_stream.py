"""Event streams (CONTRACT 6.5): ``Accept: text/event-stream`` on the status URL
and on the task list, in this process, across processes, and on gunicorn's
gthread and gevent workers."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import typing as t
import urllib.parse
from collections.abc import Iterator
from http import client as http_client
from pathlib import Path

import pytest
from flask import Flask, request
from flask.testing import FlaskClient
from flask_restful import abort

from flask_restful_async import AsyncResource, StoreUnavailable, current_task, streams, waiting
from flask_restful_async.state import get_state
from flask_restful_async.stores.memory import MemoryStore
from flask_restful_async.task import Progress, Task, TaskState, new_task_id

from .apps.tasks_app import create_app
from .conftest import AppFactory, wait_for
from .servers import http, serve
from .services import delete_redis_keys, require_redis
from .test_multiprocess import REDIS_DB, Store, close_app

STREAM = {"Accept": "text/event-stream"}
#: Bounds every stream of these tests, whatever goes wrong.
MAX_STREAM = 10

STEP = threading.Semaphore(0)


class Steps(AsyncResource):
    """Reports progress 1, 2, 3, each once the test releases ``STEP``."""

    def post(self) -> t.Any:
        for number in (1, 2, 3):
            if not STEP.acquire(timeout=10):
                raise TimeoutError("the test did not release the next step")
            current_task.progress(number, total=3, message=f"step {number}")
            current_task.raise_if_cancelled()
        return {"steps": 3}, 201


class Refused(AsyncResource):
    def post(self) -> t.Any:
        abort(409, message="no")


class Broken(AsyncResource):
    def post(self) -> t.Any:
        raise RuntimeError("broken")


class Event(t.NamedTuple):
    """One event, or a comment (``name`` is ``":"``, its text in ``data``)."""

    name: str
    data: str
    id: str | None

    @property
    def json(self) -> t.Any:
        return json.loads(self.data)


def parse(chunks: t.Iterable[bytes]) -> Iterator[Event]:
    """The events (and comments) of a stream of bytes, as a browser reads them."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                if name == "":
                    yield Event(":", value.strip(), None)
                    continue
                fields[name] = value.removeprefix(" ")
            if "data" in fields:
                yield Event(fields.get("event", "message"), fields["data"], fields.get("id"))


@pytest.fixture
def app(make_app_any_store: AppFactory) -> Iterator[Flask]:
    """An app on each store, owners from ``X-User``, short keep-alives."""
    app, api = make_app_any_store(
        owner=lambda: request.headers.get("X-User"),
        config={
            "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0,
            "RESTFUL_ASYNC_STREAM_KEEPALIVE": 0.3,
            "RESTFUL_ASYNC_MAX_STREAM": MAX_STREAM,
            "RESTFUL_ASYNC_SHORT_WAIT": 0,
        },
    )
    api.add_resource(Steps, "/steps")
    api.add_resource(Refused, "/refused")
    api.add_resource(Broken, "/broken")
    drain_steps()
    yield app
    for _ in range(3):
        STEP.release()  # a task still waiting ends


@contextlib.contextmanager
def stream(
    client: FlaskClient, url: str, user: str = "alice", **headers: str
) -> Iterator[Iterator[Event]]:
    response = client.get(url, headers={**STREAM, "X-User": user, **headers}, buffered=False)
    assert response.status_code == 200, response.get_data()
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    try:
        yield parse(response.response)
    finally:
        response.close()


def submit(client: FlaskClient, path: str, user: str = "alice") -> str:
    response = client.post(path, headers={"X-User": user})
    assert response.status_code == 202
    return response.headers["Location"]


def drain_steps() -> None:
    while STEP.acquire(blocking=False):
        pass


def running(events: Iterator[Event]) -> Event:
    """The first status event of a running task."""
    while True:
        item = next_event(events)
        if item.name == "status" and item.json["state"] == "running":
            return item


def next_event(events: Iterator[Event]) -> Event:
    """The next event that is not a comment."""
    for item in events:
        if item.name != ":":
            return item
    raise AssertionError("the stream ended")


def test_events_come_in_order_and_done_comes_last(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    seen = []
    with stream(client, location) as events:
        first = next_event(events)
        assert first.name == "status"
        assert first.json["id"] == location.rsplit("/", 1)[1]
        seen.append(first)
        for number in (1, 2, 3):
            STEP.release()
            while True:
                item = next_event(events)
                seen.append(item)
                progress = item.json.get("progress")
                if progress is not None and progress["current"] == number:
                    break
                assert item.name == "status"
        rest = list(events)
    seen += [item for item in rest if item.name != ":"]
    assert [item.name for item in seen][-1] == "done"
    assert seen[-1].json == {"status": 201}
    statuses = [item.json for item in seen if item.name == "status"]
    order = ["queued", "running", "succeeded"]
    assert [order.index(doc["state"]) for doc in statuses] == sorted(
        order.index(doc["state"]) for doc in statuses
    )
    assert statuses[-1]["state"] == "succeeded"
    currents = [doc["progress"]["current"] for doc in statuses if doc["progress"]]
    assert currents == sorted(currents)
    assert {1, 2, 3} <= set(currents)
    ids = [item.id for item in seen if item.name == "status"]
    assert all(ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(("path", "code"), [("/refused", 409), ("/broken", 500)])
def test_done_carries_the_code_the_status_url_answers(app: Flask, path: str, code: int) -> None:
    client = app.test_client()
    location = submit(client, path)
    with stream(client, location) as events:
        items = [item for item in events if item.name != ":"]
    assert items[-1].name == "done"
    assert items[-1].json == {"status": code}
    assert client.get(location, headers={"X-User": "alice"}).status_code == code


def test_a_cancelled_task_is_done_with_409(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    with stream(client, location) as events:
        assert next_event(events).name == "status"
        assert client.delete(location, headers={"X-User": "alice"}).status_code in (200, 202)
        STEP.release()  # a running handler sees the flag at its next report
        items = [item for item in events if item.name != ":"]
    assert items[-1].json == {"status": 409}
    assert items[-2].json["state"] == "cancelled"


def test_last_event_id_does_not_replay_what_was_seen(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    with stream(client, location) as events:
        seen = running(events)
    # Nothing changed: the stream starts with a keep-alive, not the same status.
    with stream(client, location, **{"Last-Event-ID": seen.id or ""}) as events:
        assert next(events).name == ":"
        STEP.release()
        changed = next_event(events)
        assert changed.name == "status"
        assert changed.id != seen.id
        assert changed.json["progress"]["current"] == 1
    STEP.release()
    STEP.release()
    with stream(client, location) as events:
        items = [item for item in events if item.name != ":"]
    final, done = items[-2], items[-1]
    assert done.name == "done"
    # Saw the final status but not done: only done.
    with stream(client, location, **{"Last-Event-ID": final.id or ""}) as events:
        assert [item.name for item in events if item.name != ":"] == ["done"]
    # Saw done: 204, which tells an EventSource to stop reconnecting.
    response = client.get(location, headers={**STREAM, "X-User": "alice", "Last-Event-ID": "done"})
    assert response.status_code == 204
    assert "Content-Type" not in response.headers


def test_a_reconnect_with_nothing_new_answers_at_once(app: Flask) -> None:
    """Its head goes out with a comment, not with the first keep-alive (15 s by
    default): an HTTP client's read timeout is often shorter (httpx: 5 s)."""
    app.config["RESTFUL_ASYNC_STREAM_KEEPALIVE"] = 60
    client = app.test_client()
    location = submit(client, "/steps")
    with stream(client, location) as events:
        seen = running(events)
    first: list[Event] = []

    def reconnect() -> None:
        # The test client returns once the first chunk is out.
        with stream(client, location, **{"Last-Event-ID": seen.id or ""}) as events:
            first.append(next(events))

    thread = threading.Thread(target=reconnect, daemon=True)
    thread.start()
    thread.join(10)
    assert first == [Event(":", "keep-alive", None)]


def test_a_silent_stream_sends_keep_alive_comments(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    with stream(client, location) as events:
        running(events)
        start = time.monotonic()
        comment = next(events)
        assert comment == Event(":", "keep-alive", None)
        assert 0.2 < time.monotonic() - start < 3


def test_a_stream_ends_after_max_stream_seconds(make_app: AppFactory) -> None:
    app, api = make_app(
        store="memory://",
        config={"RESTFUL_ASYNC_MAX_STREAM": 0.5, "RESTFUL_ASYNC_STREAM_KEEPALIVE": 0.2},
    )
    api.add_resource(Steps, "/steps")
    drain_steps()
    client = app.test_client()
    location = client.post("/steps").headers["Location"]
    start = time.monotonic()
    with stream(client, location) as events:
        items = list(events)
    assert 0.4 < time.monotonic() - start < 3
    assert items[0].name == "status"
    assert "done" not in [item.name for item in items]
    for _ in range(3):
        STEP.release()


@pytest.mark.parametrize("value", [0, -1, "fifteen", True])
def test_bad_stream_settings_are_refused_at_start(make_app: AppFactory, value: t.Any) -> None:
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_MAX_STREAM"):
        make_app(store="memory://", config={"RESTFUL_ASYNC_MAX_STREAM": value})


def test_unknown_malformed_and_foreign_ids_are_404_without_a_stream(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/refused", user="bob")
    prefix = location.rsplit("/", 1)[0]
    bodies = []
    for url, user in [
        (location, "alice"),  # bob's
        (f"{prefix}/{'A' * 22}", "alice"),  # unknown
        (f"{prefix}/not-an-id", "alice"),  # malformed
    ]:
        response = client.get(url, headers={**STREAM, "X-User": user})
        assert response.status_code == 404
        assert response.mimetype == "application/json"
        assert response.headers["Cache-Control"] == "no-store"
        bodies.append(response.get_data())
    assert len(set(bodies)) == 1


class BuggyStore(MemoryStore):
    """Reads that fail with an error that is not an outage (a bug, say)."""

    broken = False

    def _check(self) -> None:
        if self.broken:
            raise RuntimeError("a bug in the store")

    def get(self, task_id: str) -> Task | None:
        self._check()
        return super().get(task_id)

    def get_many(self, task_ids: t.Sequence[str]) -> dict[str, Task]:
        self._check()
        return super().get_many(task_ids)

    def list(self, **kwargs: t.Any) -> list[Task]:
        self._check()
        return super().list(**kwargs)


def test_a_stream_whose_first_read_fails_leaves_no_subscription(make_app: AppFactory) -> None:
    store = BuggyStore()
    app, api = make_app(store=store, owner=lambda: "alice")
    app.config["PROPAGATE_EXCEPTIONS"] = False
    api.add_resource(Refused, "/refused")
    client = app.test_client()
    location = client.post("/refused").headers["Location"]
    store.broken = True
    for url in (location, "/tasks"):
        assert client.get(url, headers=STREAM).status_code == 500
    assert waiting.waiters_for(store).watching == 0


def test_without_the_accept_header_the_status_url_answers_json(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    for accept in (
        "*/*",
        "text/*",
        "application/json",
        "text/event-stream;q=0",
        "text/event-stream;q=0.5, application/json",
        "text/event-stream;q=0.1, */*",
    ):
        response = client.get(location, headers={"Accept": accept, "X-User": "alice"})
        assert response.status_code == 202, accept
        assert response.mimetype == "application/json", accept


@pytest.mark.parametrize(
    "accept",
    [
        "TEXT/EVENT-STREAM",
        "text/event-stream, application/json",
        "application/json, text/event-stream",
        "application/json;q=0.5, Text/Event-Stream",
    ],
)
def test_an_accept_that_names_the_stream_and_ranks_json_no_higher_gets_it(
    app: Flask, accept: str
) -> None:
    client = app.test_client()
    location = submit(client, "/steps")
    with client.get(
        location, headers={"Accept": accept, "X-User": "alice"}, buffered=False
    ) as response:
        assert response.status_code == 200
        assert response.mimetype == "text/event-stream"


def test_the_list_stream_follows_the_callers_tasks_only(app: Flask) -> None:
    client = app.test_client()
    done_before = submit(client, "/refused")
    assert client.get(f"{done_before}?wait=5", headers={"X-User": "alice"}).status_code == 409
    with stream(client, "/tasks") as events:
        first = [next_event(events), next_event(events)]
        assert [item.name for item in first] == ["status", "done"]
        assert first[1].json == {"id": done_before.rsplit("/", 1)[1], "status": 409}
        submit(client, "/steps", user="bob")  # never shown to alice
        location = submit(client, "/steps")
        task_id = location.rsplit("/", 1)[1]
        for _ in range(6):
            STEP.release()  # bob's or alice's: either may take them
        items = []
        while not items or items[-1].name != "done":
            item = next_event(events)
            assert item.json["id"] == task_id
            items.append(item)
        last_id = items[-1].id
        assert items[-1].json == {"id": task_id, "status": 201}
        assert items[-2].json["state"] == "succeeded"
    # Reconnecting after the last event: nothing of alice's changed since.
    with stream(client, "/tasks", **{"Last-Event-ID": last_id or ""}) as events:
        assert next(events).name == ":"


def test_an_empty_list_stream_starts_at_once(make_app: AppFactory) -> None:
    # Its head went out with the first keep-alive only: a browser's EventSource
    # stayed "connecting" for as long.
    app, _ = make_app(
        owner=lambda: "alice",
        config={"RESTFUL_ASYNC_STREAM_KEEPALIVE": 60, "RESTFUL_ASYNC_MAX_STREAM": 2},
    )
    with stream(app.test_client(), "/tasks?state=running") as events:
        assert next(events) == Event(":", "keep-alive", None)


def test_only_the_last_event_of_a_list_batch_carries_an_id(app: Flask) -> None:
    """A client that leaves in the middle of a batch reconnects with the id of the
    batch before (here none): it gets the whole batch again, nothing is skipped."""
    client = app.test_client()
    for _ in range(3):
        location = submit(client, "/refused")
        assert client.get(f"{location}?wait=5", headers={"X-User": "alice"}).status_code == 409
    with stream(client, "/tasks") as events:
        batch = [next_event(events) for _ in range(6)]
    assert [item.name for item in batch] == ["status", "done"] * 3
    assert [item.id is not None for item in batch] == [False] * 5 + [True]
    last_id = batch[-1].id
    assert last_id is not None
    with stream(client, "/tasks", **{"Last-Event-ID": last_id}) as events:
        assert next(events).name == ":"  # all seen: nothing again


def test_the_list_stream_tells_of_a_task_forgotten(app: Flask) -> None:
    client = app.test_client()
    location = submit(client, "/refused")
    task_id = location.rsplit("/", 1)[1]
    assert client.get(f"{location}?wait=5", headers={"X-User": "alice"}).status_code == 409
    with stream(client, "/tasks") as events:
        assert [next_event(events).name, next_event(events).name] == ["status", "done"]
        assert client.delete(location, headers={"X-User": "alice"}).status_code == 204
        gone = next_event(events)
    assert gone.name == "done"
    assert gone.json == {"id": task_id, "status": 404}


def test_the_list_stream_takes_the_lists_parameters(app: Flask) -> None:
    client = app.test_client()
    submit(client, "/refused")
    location = submit(client, "/steps")
    with stream(client, location) as events:
        running(events)
    with stream(client, "/tasks?state=running&limit=5") as events:
        first = next_event(events)
        assert first.json["id"] == location.rsplit("/", 1)[1]
        for _ in range(3):
            STEP.release()
        names = []
        while "done" not in names:
            names.append(next_event(events).name)
    response = client.get("/tasks?limit=0", headers={**STREAM, "X-User": "alice"})
    assert response.status_code == 400


def test_the_list_stream_is_404_where_the_list_is(make_app: AppFactory) -> None:
    app, _ = make_app(store="memory://")
    response = app.test_client().get("/tasks", headers=STREAM)
    assert response.status_code == 404
    assert response.mimetype == "application/json"


# -- the notification underneath ------------------------------------------------------------


class CountingStore(MemoryStore):
    """Counts its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.batches = 0

    def get(self, task_id: str) -> Task | None:
        self.reads += 1
        return super().get(task_id)

    def get_many(self, task_ids: t.Sequence[str]) -> dict[str, Task]:
        self.batches += 1
        return super().get_many(task_ids)


def test_streams_on_one_task_share_each_read() -> None:
    store = CountingStore()
    task = store.create(Task(id=new_task_id()))
    waiters = waiting.Waiters(store)
    subscriptions = [waiters.subscribe(task.id) for _ in range(4)]
    try:
        waiters.changed(task.id)
        for subscription in subscriptions:
            assert subscription.wait(0)
            read, document = subscription.read(streams.document_of)
            assert read is not None
            assert document == streams.document_of(task)
        assert store.reads == 1
        assert not subscriptions[0].wait(0)  # nothing new
        waiters.changed("another task")
        assert not subscriptions[0].wait(0)
        assert waiters.watching == 4
    finally:
        for subscription in subscriptions:
            subscription.close()
    assert waiters.watching == 0


def test_news_of_any_task_wakes_one_stream_per_task_to_look() -> None:
    """SQLite's listener hears "the file changed": one stream reads, and tells the
    others only if their task did change."""
    store = CountingStore()
    task = store.create(Task(id=new_task_id()))
    store.start(task.id, "worker")
    waiters = waiting.Waiters(store)
    subscriptions = [waiters.subscribe(task.id) for _ in range(4)]
    try:
        first, *others = subscriptions
        first.read(streams.document_of)
        waiters.notify(None)  # nothing changed
        assert first.wait(0)
        first.read(streams.document_of)
        assert [other.wait(0) for other in others] == [False] * 3
        store.set_progress(task.id, Progress(1))
        waiters.notify(None)  # a change nobody announced
        assert first.wait(0)
        read, _ = first.read(streams.document_of)
        assert read is not None
        assert read.progress == Progress(1)
        assert [other.wait(0) for other in others] == [True] * 3
        for other in others:
            assert other.read(streams.document_of)[0] == read
        assert store.reads == 3
    finally:
        for subscription in subscriptions:
            subscription.close()


def test_news_of_any_task_is_one_read_of_every_followed_task_and_wakes_only_the_changed() -> None:
    """What the listener does when SQLite tells it "the file changed": one read of
    every task followed here, and the streams of a task that changed woken with
    that read to share; the streams of the others sleep on."""
    store = CountingStore()
    quiet, busy = (store.create(Task(id=new_task_id())) for _ in range(2))
    for task in (quiet, busy):
        store.start(task.id, "worker")
    waiters = waiting.Waiters(store)
    on_quiet = [waiters.subscribe(quiet.id) for _ in range(2)]
    on_busy = [waiters.subscribe(busy.id) for _ in range(2)]
    try:
        on_quiet[0].read(streams.document_of)
        on_busy[0].read(streams.document_of)
        assert store.reads == 2
        store.set_progress(busy.id, Progress(1))
        waiters._heard(None, finished=False)
        assert store.batches == 1
        assert store.reads == 4  # the default get_many reads one by one
        assert [each.wait(0) for each in on_quiet] == [False, False]
        assert [each.wait(0) for each in on_busy] == [True, True]
        for each in on_busy:
            read, document = each.read(streams.document_of)
            assert read is not None
            assert read.progress == Progress(1)
            assert document == streams.document_of(read)
        assert store.reads == 4  # the streams took the listener's read
    finally:
        for subscription in on_quiet + on_busy:
            subscription.close()


class FailingBatches(CountingStore):
    def get_many(self, task_ids: t.Sequence[str]) -> dict[str, Task]:
        raise StoreUnavailable("The task store is down.")


def test_news_of_any_task_wakes_a_stream_per_task_where_the_one_read_fails() -> None:
    store = FailingBatches()
    task = store.create(Task(id=new_task_id()))
    waiters = waiting.Waiters(store)
    subscriptions = [waiters.subscribe(task.id) for _ in range(2)]
    try:
        subscriptions[0].read(streams.document_of)
        waiters._heard(None, finished=False)
        assert subscriptions[0].wait(0)  # to look for itself, as before batches
        read, _ = subscriptions[0].read(streams.document_of)
        assert read == task
    finally:
        for subscription in subscriptions:
            subscription.close()


def test_progress_does_not_wake_a_long_poll() -> None:
    store = CountingStore()
    task = store.create(Task(id=new_task_id()))
    store.start(task.id, "worker")
    waiters = waiting.Waiters(store)
    with waiters.subscribe() as every:
        result: list[Task | None] = []
        poll = threading.Thread(target=lambda: result.append(waiters.wait_finished(task.id, 5)))
        poll.start()
        wait_for(lambda: waiters.waiting == 1)
        reads = store.reads
        for number in range(20):
            store.set_progress(task.id, Progress(number))
            waiters.changed(task.id)
        assert every.wait(0)  # a list stream hears it
        time.sleep(0.1)
        assert store.reads == reads  # the long-poll did not
        store.finish(task.id, TaskState.SUCCEEDED)
        waiters.notify(task.id)
        poll.join(5)
    assert result[0] is not None
    assert result[0].state is TaskState.SUCCEEDED


# -- across processes, and on gunicorn ---------------------------------------------------


@contextlib.contextmanager
def shared_store(kind: str, instance: Path) -> Iterator[Store]:
    if kind == "sqlite":
        yield Store("sqlite", instance)
        return
    require_redis()
    prefix = f"{{rfa-sse-{secrets.token_hex(6)}}}:"
    try:
        yield Store("redis", instance, prefix)
    finally:
        delete_redis_keys(REDIS_DB, prefix)


def http_events(url: str, timeout: float = MAX_STREAM) -> Iterator[Event]:
    """The events of a stream from a real server, read as they arrive."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    conn = http_client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path, headers=STREAM)
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")

        def lines() -> Iterator[bytes]:
            while line := response.readline():
                yield line

        yield from parse(lines())
    finally:
        conn.close()


def follow(events: Iterator[Event]) -> list[Event]:
    """Every event up to ``done``."""
    items = []
    for item in events:
        if item.name == ":":
            continue
        items.append(item)
        if item.name == "done":
            return items
    raise AssertionError(f"the stream ended before done: {items}")


def check_followed(items: list[Event]) -> None:
    assert items[-1].json == {"status": 200}
    docs = [item.json for item in items[:-1]]
    assert docs[-1]["state"] == "succeeded"
    # Progress written by the task's process every 0.1 s for 0.6 s shows up here.
    assert len({doc["progress"]["current"] for doc in docs if doc["progress"]}) >= 2


@pytest.mark.parametrize("server", ["gunicorn-gthread", "gunicorn-gevent"])
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_changes_in_another_process_arrive(kind: str, server: str, tmp_path: Path) -> None:
    """Both ways: a stream on gunicorn follows a task run in this process, and a
    stream in this process follows a task run by gunicorn."""
    if server == "gunicorn-gevent":
        pytest.importorskip("gevent", reason="gevent is not installed (the dev extra has it)")
    settings = {
        "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0.1,
        "RESTFUL_ASYNC_MAX_STREAM": MAX_STREAM,
        # A stream notices that its client left at its next write: soon, so
        # that gunicorn stops at once.
        "RESTFUL_ASYNC_STREAM_KEEPALIVE": 0.3,
        "RESTFUL_ASYNC_SHORT_WAIT": 0,
        "RESTFUL_ASYNC_PUBLIC_LIST": True,
    }
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(shared_store(kind, tmp_path / "instance"))
        base = stack.enter_context(serve(server, APP, env=store.server_env(**settings)))
        app = create_app(str(store.instance), **store.config(**settings))
        stack.callback(close_app, app)
        client = app.test_client()

        # Run here, streamed from gunicorn.
        location = client.post("/jobs/sleep?seconds=0.6").headers["Location"]
        check_followed(follow(http_events(base + location)))

        # Run by gunicorn, streamed here.
        status, headers, _ = http("POST", f"{base}/jobs/sleep?seconds=0.6", body=b"")
        assert status == 202
        with stream(client, headers["location"]) as events:
            check_followed(follow(events))

        # The list stream on gunicorn sees a task made here.
        events = http_events(base + "/tasks")
        stack.callback(events.close)
        location = client.post("/jobs/echo", json={"x": 1}).headers["Location"]
        task_id = location.rsplit("/", 1)[1]
        for item in events:
            if item.name == "done" and item.json["id"] == task_id:
                assert item.json["status"] == 200
                break


def test_progress_from_a_celery_worker_arrives() -> None:
    """The task runs in a Celery worker (another process, as on another machine):
    its progress reaches a stream here through Redis."""
    from .apps.celery_app import create_app as create_celery_app
    from .test_celery import run_worker

    with run_worker() as worker:
        app, _, _ = create_celery_app(worker.prefix, worker.queue)
        app.config["RESTFUL_ASYNC_MAX_STREAM"] = 30  # a worker that never starts
        try:
            client = app.test_client()
            location = submit(client, "/echo?steps=6&step=0.15")
            with stream(client, location) as events:
                items = follow(events)
        finally:
            get_state(app).close()
    assert items[-1].json == {"status": 200}, worker.output()
    docs = [item.json for item in items[:-1]]
    assert docs[-1]["state"] == "succeeded"
    assert len({doc["progress"]["current"] for doc in docs if doc["progress"]}) >= 2


APP = "tests.apps.tasks_app:app"
