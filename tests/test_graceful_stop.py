"""What waits does not hold a graceful stop (``flask_restful_async.stopping``).

An event stream or a long-poll open on a gunicorn worker when SIGTERM reaches its
master used to hold the worker for the whole ``--graceful-timeout``, while its
task threads went on starting queued tasks, until the master killed it in the
middle of one: that task ended ``lost``. Now the stream ends and the long-poll
answers as the stop begins, the worker exits at once, hands its queued tasks back
and lets the running one finish; the next server runs the rest.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import typing as t
from http import client as http_client
from pathlib import Path

import pytest

from flask_restful_async import stopping, waiting
from flask_restful_async.executors.threads import ThreadExecutor
from flask_restful_async.state import get_state
from flask_restful_async.task import TaskState

from .conftest import HELD_RELEASE, HELD_STARTED, AppFactory, Held, wait_for
from .servers import GUNICORN_GRACEFUL_TIMEOUT, http, poll_until_done, serve

#: Tasks of /jobs/count, and how long each sleeps: more work than the graceful
#: timeout lasts, run one at a time (MAX_WORKERS 1), so that a worker held for
#: that long is killed in the middle of one.
TASKS = 8
SECONDS = 1.0


class Waiter(threading.Thread):
    """A request that waits (a stream or a long-poll); notes when its answer ends."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.headers = url, path, headers
        self.status: int | None = None
        self.ended_at: float | None = None
        self.opened = threading.Event()

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http_client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", self.path, headers=self.headers)
            self.opened.set()
            response = conn.getresponse()
            self.status = response.status
            while response.read1(4096):
                pass
        except (OSError, http_client.HTTPException):
            pass  # the connection went with the worker: its end is noted all the same
        finally:
            self.opened.set()
            self.ended_at = time.monotonic()
            conn.close()


def _server_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The runs file, and the environment of a tasks_app server on a store in
    ``tmp_path``: one task thread, running tasks given 3 s at exit, a 2 s lease."""
    runs = tmp_path / "runs"
    runs.touch()
    return runs, {
        "TASKS_APP_INSTANCE": str(tmp_path / "instance"),
        "TASKS_APP_RUNS": str(runs),
        "FLASK_RESTFUL_ASYNC_MAX_WORKERS": "1",
        "FLASK_RESTFUL_ASYNC_SHUTDOWN_TIMEOUT": "3",
        "FLASK_RESTFUL_ASYNC_LEASE": "2",
    }


def _submit_tasks(base: str, seconds: float = SECONDS) -> list[str]:
    """Submit the :data:`TASKS` tasks of /jobs/count; their status URLs."""
    locations = []
    for number in range(TASKS):
        status, headers, _ = http(
            "POST",
            f"{base}/jobs/count?seconds={seconds}",
            body=json.dumps({"n": number}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert status == 202
        locations.append(headers["location"])
    return locations


def _stop_master(base: str) -> float:
    """SIGTERM to the master of the server at ``base``, then wait (bounded) until
    its worker is gone; returns when the signal went."""
    pids = json.loads(http("GET", base + "/pid")[2])
    os.kill(pids["ppid"], signal.SIGTERM)
    signalled = time.monotonic()
    deadline = signalled + GUNICORN_GRACEFUL_TIMEOUT + 5
    while not _gone(pids["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return signalled


def _every_task_ran_once(env: dict[str, str], locations: list[str], runs: Path) -> None:
    """A new server on the same store runs what was handed back: every task ends
    succeeded, none lost, none run twice."""
    env = {**env, "FLASK_RESTFUL_ASYNC_MAX_WORKERS": str(TASKS)}
    with serve("gunicorn-gthread", "tests.apps.tasks_app:app", env=env, threads=8) as base:
        answers = [poll_until_done(base, location, timeout=30) for location in locations]
    assert [status for status, _, _ in answers] == [200] * TASKS, [
        body[:80] for _, _, body in answers
    ]
    ran = [line.split()[0] for line in runs.read_text().splitlines()]
    assert sorted(ran) == sorted(location.rsplit("/", 1)[-1] for location in locations)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "preload"),
    [("gunicorn-gthread", False), ("gunicorn-gthread", True), ("gunicorn-gevent", True)],
    ids=["app-in-worker", "preload", "gevent-preload"],
)
def test_a_stream_and_a_long_poll_do_not_hold_a_graceful_stop(
    tmp_path: Path, kind: str, preload: bool
) -> None:
    """With gevent, ``--preload`` also shows that the app's executor, made in the
    master before gevent patched the worker, still runs tasks there: its first
    submit used to hang the worker."""
    runs, env = _server_env(tmp_path)
    # With --preload the app is made in the master: the worker's first wait,
    # stream or task thread listens for its stop.
    options = ("--preload",) if preload else ()
    with serve(kind, "tests.apps.tasks_app:app", env=env, options=options, may_exit=True) as base:
        locations = _submit_tasks(base)
        waiters = [
            Waiter(base, locations[-1], {"Accept": "text/event-stream"}),
            Waiter(base, locations[-1] + "?wait=20", {}),
        ]
        for waiter in waiters:
            waiter.start()
            waiter.opened.wait(5)
        time.sleep(0.5)  # both are waiting in the worker now, a task is running
        signalled = _stop_master(base)
        for waiter in waiters:
            waiter.join(GUNICORN_GRACEFUL_TIMEOUT + 5)
        exited = time.monotonic() - signalled
    stream, long_poll = waiters
    assert stream.status == 200
    assert long_poll.status == 202
    for waiter in waiters:
        assert waiter.ended_at is not None
        # Well before the graceful timeout, at which the master kills the worker.
        assert waiter.ended_at - signalled < GUNICORN_GRACEFUL_TIMEOUT / 2
    assert exited < GUNICORN_GRACEFUL_TIMEOUT, f"the worker exited {exited:.1f} s after SIGTERM"

    _every_task_ran_once(env, locations, runs)


class SlowUpload(threading.Thread):
    """A request that holds the worker: its body comes a chunk at a time, for
    longer than the graceful timeout."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.sending = threading.Event()

    def chunks(self) -> t.Iterator[bytes]:
        self.sending.set()
        for _ in range(GUNICORN_GRACEFUL_TIMEOUT * 4):
            yield b" "
            time.sleep(0.5)

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        conn = http_client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request(
                "POST",
                "/jobs/echo",
                body=self.chunks(),
                headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )
            conn.getresponse().read()
        except (OSError, http_client.HTTPException):
            pass  # the worker was killed under it
        finally:
            conn.close()


@pytest.mark.slow
def test_a_request_that_holds_the_stop_costs_no_queued_task(tmp_path: Path) -> None:
    """A slow upload holds the stopping worker until the master kills it: the
    queued tasks went back to the store as the stop began, and none started there
    meanwhile, so the kill finds nothing running and the next server runs them."""
    runs, env = _server_env(tmp_path)
    with serve("gunicorn-gthread", "tests.apps.tasks_app:app", env=env, may_exit=True) as base:
        locations = _submit_tasks(base)
        upload = SlowUpload(base)
        upload.start()
        assert upload.sending.wait(5)
        time.sleep(0.3)
        _stop_master(base)
    _every_task_ran_once(env, locations, runs)


@pytest.mark.slow
def test_a_worker_recycled_by_max_requests_ends_its_streams(tmp_path: Path) -> None:
    """--max-requests stops a worker without a signal: it is heard all the same
    (the worker's own ``alive``), so an open stream does not keep the worker from
    its exit, and no new worker from starting, for the graceful timeout and more."""
    runs, env = _server_env(tmp_path)
    env["FLASK_RESTFUL_ASYNC_MAX_WORKERS"] = "2"
    env["FLASK_RESTFUL_ASYNC_PUBLIC_LIST"] = "true"  # a list to follow, without owners
    options = ("--max-requests", str(TASKS + 4))
    with serve("gunicorn-gthread", "tests.apps.tasks_app:app", env=env, options=options) as base:
        locations = _submit_tasks(base, seconds=0.5)
        # The list's stream, which no task's end ends.
        stream = Waiter(base, "/tasks", {"Accept": "text/event-stream"})
        stream.start()
        stream.opened.wait(5)
        time.sleep(0.3)
        first = json.loads(http("GET", base + "/pid")[2])["pid"]
        started = time.monotonic()
        pid = first
        while pid == first and time.monotonic() - started < 40:
            # The requests that reach the limit, then the first one of the next worker.
            pid = json.loads(http("GET", base + "/pid", timeout=40)[2])["pid"]
        recycled = time.monotonic() - started
        print(f"a new worker {recycled:.2f} s after the requests that reach the limit began")
        stream.join(5)
        assert pid != first
        assert stream.ended_at is not None
        assert recycled < GUNICORN_GRACEFUL_TIMEOUT, f"a new worker after {recycled:.1f} s"
        answers = [poll_until_done(base, location, timeout=30) for location in locations]
    assert [status for status, _, _ in answers] == [200] * TASKS
    ran = [line.split()[0] for line in runs.read_text().splitlines()]
    assert sorted(ran) == sorted(location.rsplit("/", 1)[-1] for location in locations)


def test_listen_hears_nothing_but_a_gunicorn_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopping, "_heard_in", 0)
    # The test process's SIGTERM handler is not a gunicorn worker's: left alone.
    before = signal.getsignal(signal.SIGTERM)
    assert stopping.listen() is False
    assert signal.getsignal(signal.SIGTERM) is before
    heard: list[bool] = []
    thread = threading.Thread(target=lambda: heard.append(stopping.listen()))
    thread.start()
    thread.join(5)
    assert heard == [False]


@pytest.mark.usefixtures("held_tasks")
def test_a_begun_stop_ends_streams_and_long_polls_at_once(
    make_app_any_store: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stopping, "_begun", False)  # and back to False afterwards
    app, api = make_app_any_store(config={"RESTFUL_ASYNC_MAX_WAIT": 20})
    api.add_resource(Held, "/held")
    client = app.test_client()
    location = client.post("/held").headers["Location"]
    assert HELD_STARTED.wait(10)
    answers: dict[str, t.Any] = {}

    def long_poll() -> None:
        answers["long-poll"] = client.get(f"{location}?wait=20")

    def stream() -> None:
        response = client.get(location, headers={"Accept": "text/event-stream"}, buffered=False)
        answers["stream"] = b"".join(response.response)
        response.close()

    threads = [threading.Thread(target=target) for target in (long_poll, stream)]
    for thread in threads:
        thread.start()
    wait_for(lambda: waiting.waiters_for(get_state(app).store).waiting == 1, timeout=10)
    wait_for(lambda: waiting.waiters_for(get_state(app).store).watching == 1, timeout=10)
    started = time.monotonic()
    stopping.begin()
    for thread in threads:
        thread.join(10)
    assert time.monotonic() - started < 5  # not the 20 s the long-poll asked for
    assert answers["long-poll"].status_code == 202
    assert answers["long-poll"].json["state"] == "running"
    # One status event, then the end: no done event, the task runs on.
    assert answers["stream"].count(b"event: status") == 1
    assert b"event: done" not in answers["stream"]
    # A wait that comes once the stop has begun answers at once.
    started = time.monotonic()
    assert client.get(f"{location}?wait=20").status_code == 202
    assert time.monotonic() - started < 5


@pytest.mark.usefixtures("held_tasks")
def test_a_begun_stop_hands_the_queued_tasks_over_at_once(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued tasks are not started in a process that stops (the server may kill
    it before they end): they go back to the store for another process, and so do
    tasks accepted meanwhile; the running one goes on."""
    monkeypatch.setattr(stopping, "_begun", False)  # and back to False afterwards
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Held, "/held")
    state = get_state(app)
    client = app.test_client()
    running = client.post("/held").headers["Location"].rsplit("/", 1)[-1]
    assert HELD_STARTED.wait(10)
    queued = [client.post("/held").headers["Location"].rsplit("/", 1)[-1] for _ in range(3)]
    assert all(state.store.get(task_id).worker is not None for task_id in queued)
    stopping.begin()
    wait_for(lambda: all(state.store.get(task_id).worker is None for task_id in queued))
    # Accepted while it stops: for another process too, at once.
    late = client.post("/held", headers={"Prefer": "wait=5"})
    assert late.status_code == 202
    late_id = late.headers["Location"].rsplit("/", 1)[-1]
    assert state.store.get(late_id).worker is None
    assert state.executor.idle(10) == 0  # takes over nothing meanwhile
    assert state.store.get(running).state is TaskState.RUNNING
    # Another process takes them; here, this one, once it no longer stops.
    monkeypatch.setattr(stopping, "_begun", False)
    HELD_RELEASE.set()
    wait_for(lambda: state.store.get(running).state is TaskState.SUCCEEDED)
    assert state.takeover is not None
    state.takeover.claim()
    handed = [*queued, late_id]
    wait_for(
        lambda: all(state.store.get(i).state is TaskState.SUCCEEDED for i in handed), timeout=20
    )


def test_a_gunicorn_worker_is_heard_as_it_stops_from_any_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gunicorn.workers.base import Worker

    monkeypatch.setattr(stopping, "_begun", False)  # and back afterwards
    monkeypatch.setattr(stopping, "_heard_in", 0)
    heard: list[str] = []
    monkeypatch.setattr(stopping, "_callbacks", [lambda: heard.append("callback")])
    worker = object.__new__(Worker)  # its signal handler, without a server
    worker.alive = True
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, worker.handle_exit)
    try:
        answers: list[bool] = []
        thread = threading.Thread(target=lambda: answers.append(stopping.listen()))
        thread.start()
        thread.join(5)
        assert answers == [True]  # from a request thread, say
        assert stopping.listen() is True
        assert isinstance(worker, Worker)
        assert worker.alive is True
        assert signal.getsignal(signal.SIGTERM) == worker.handle_exit  # untouched
        assert not stopping.begun()
        os.kill(os.getpid(), signal.SIGTERM)  # gunicorn's handler: alive = False
        wait_for(lambda: heard == ["callback"], timeout=5)  # in a thread of its own
        assert stopping.begun()
        assert worker.alive is False
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_stop_is_said_even_if_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopping, "_begun", False)

    def no_thread(*args: object) -> t.NoReturn:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(stopping._thread, "start_new_thread", no_thread)
    stopping.begin()  # in a signal handler, say: it must not raise there
    assert stopping.begun()  # waits and streams see it at their next look


@pytest.mark.usefixtures("held_tasks")
def test_tasks_that_cannot_be_handed_over_run_here(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses the early hand-back (an error it does not call an
    outage): the queued tasks run in this process after all, and its counts are
    as before; no task thread dies of it."""
    monkeypatch.setattr(stopping, "_begun", False)
    app, api = make_app(config={"RESTFUL_ASYNC_MAX_WORKERS": 1})
    api.add_resource(Held, "/held")
    state = get_state(app)
    executor = state.executor
    assert isinstance(executor, ThreadExecutor)

    def refuse(jobs: object) -> None:
        raise RuntimeError("OOM command not allowed")

    monkeypatch.setattr(executor, "on_hand_back", refuse)
    client = app.test_client()
    running = client.post("/held").headers["Location"].rsplit("/", 1)[-1]
    assert HELD_STARTED.wait(10)
    queued = [client.post("/held").headers["Location"].rsplit("/", 1)[-1] for _ in range(2)]
    stopping.begin()
    late = client.post("/held").headers["Location"].rsplit("/", 1)[-1]
    wait_for(lambda: "Handing 1 waiting tasks back to the store failed" in caplog.text)
    HELD_RELEASE.set()
    every = [running, *queued, late]
    wait_for(
        lambda: all(state.store.get(i).state is TaskState.SUCCEEDED for i in every), timeout=20
    )
    assert all(thread.is_alive() for thread in executor._threads)
    # A task thread gives its place back just after the task's end is stored.
    wait_for(lambda: (executor._taken, executor.held_bytes) == (0, 0))
