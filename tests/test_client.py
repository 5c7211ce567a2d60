"""flask_restful_async.client against real gunicorn: tests/apps/client_app.py.

One server (one worker, so that the failures it is told to make are counted in one
process) serves the task app, the same app with the result redirect on, and a plain
Flask app that speaks the 202 pattern without this library. Each request a client
makes is recorded through httpx's event hooks, to count polls and time them.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import flask_restful_async
from flask_restful_async.client import (
    AsyncOperation,
    AsyncTaskClient,
    Operation,
    Progress,
    TaskCancelled,
    TaskClient,
    TaskFailed,
    TaskLost,
    retry_after,
)
from flask_restful_async.client.cli import main as cli_main
from flask_restful_async.client.protocol import (
    MAX_REDIRECTS,
    MAX_RETRY_AFTER,
    Policy,
    location_of,
)

from .servers import ROOT, http, serve

APP = "tests.apps.client_app:app"
#: A task of about ``STEPS * STEP`` seconds.
STEPS, STEP = 5, 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "CLIENT_APP_INSTANCE": str(tmp_path_factory.mktemp("client_app")),
        # No submit waits for its task: what the client sees of a task does not
        # depend on which quick tasks the tests before ran (their run times).
        "FLASK_RESTFUL_ASYNC_SHORT_WAIT": "0",
    }
    with serve("gunicorn-gthread", APP, env=env, workers=1, threads=16) as url:
        yield url


class Recorder:
    """Every request a client sends and every answer it gets, with their times."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.requests: list[tuple[float, httpx.Request]] = []
        self.responses: list[tuple[float, httpx.Response]] = []

    def hooks(self) -> dict[str, list[t.Callable[..., None]]]:
        return {"request": [self.on_request], "response": [self.on_response]}

    def on_request(self, request: httpx.Request) -> None:
        self.requests.append((time.monotonic(), request))

    def on_response(self, response: httpx.Response) -> None:
        self.responses.append((time.monotonic(), response))

    def sent(self, method: str, path_part: str = "") -> list[tuple[float, httpx.Request]]:
        return [
            (when, r) for when, r in self.requests if r.method == method and path_part in r.url.path
        ]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(base: str, recorder: Recorder) -> Iterator[TaskClient]:
    with TaskClient(base, backoff=0.05, event_hooks=recorder.hooks()) as client:
        yield client


def submit(client: TaskClient, path: str = "/work", **body: t.Any) -> Operation:
    operation = client.post(path, json=body)
    assert isinstance(operation, Operation), operation
    return operation


# -- the result, and what goes wrong -----------------------------------------------


def test_result_with_progress_in_order(client: TaskClient, recorder: Recorder) -> None:
    operation = submit(client, steps=STEPS, step=STEP, total=False)
    # running when the server held the submit a moment (its tasks here are often short)
    assert operation.state in ("queued", "running")
    assert operation.url.startswith(client.http.base_url.join("/tasks/").__str__())
    assert operation.id == operation.url.rsplit("/", 1)[1]
    seen: list[Progress] = []
    response = operation.result(on_progress=seen.append)
    assert response.status_code == 201
    assert response.json() == {"echo": {"steps": STEPS, "step": STEP, "total": False}}
    assert response.headers["X-Work"] == "done"
    assert operation.done()
    assert operation.state == "succeeded"
    assert operation.status()["state"] == "succeeded"
    # progress comes as often as the server's Retry-After (1 s without a total)
    assert len(seen) >= 2, seen
    currents = [p.current for p in seen]
    assert currents == sorted(set(currents)), seen
    assert all(p.total is None and p.message == f"step {p.current:g}" for p in seen)
    assert operation.progress == seen[-1]
    # submit and polls only; each poll long-polls and the server applies it
    polls = recorder.sent("GET", operation.id)
    assert len(recorder.requests) == 1 + len(polls)
    assert all(r.headers["Prefer"] == "wait=1" for _, r in polls)


def test_without_progress_one_long_poll_gets_the_result(
    client: TaskClient, recorder: Recorder
) -> None:
    operation = submit(client, steps=1, step=1.5)
    response = operation.result()
    assert response.status_code == 201
    # the 202 asked for 1 s; the poll then waited on the server until the end
    (first, _), (when, poll) = recorder.requests
    assert when - first >= 1.0
    assert poll.headers["Prefer"] == "wait=20"
    assert recorder.responses[-1][1].headers["Preference-Applied"] == "wait=20"


def test_a_synchronous_answer_is_the_response(client: TaskClient, recorder: Recorder) -> None:
    response = client.get("/plain")
    assert isinstance(response, httpx.Response)
    assert response.json() == {"plain": True}
    # a submit that asks to wait gets the final response itself when it comes in time
    answered = client.post("/work", json={"steps": 1, "step": 0.2}, wait=5)
    assert isinstance(answered, httpx.Response)
    assert answered.status_code == 201
    assert answered.headers["Preference-Applied"] == "wait=5"
    assert recorder.requests[-1][1].headers["Prefer"] == "wait=5"


def test_a_submit_that_asks_to_wait_is_given_the_time_it_asked_for(
    base: str, recorder: Recorder
) -> None:
    # Only polls had their read timeout lengthened by their wait: a submit with
    # wait=N timed out at the client's read timeout (httpx's 5 s by default), went
    # again and again with its key, and past a few tries raised ReadTimeout.
    with TaskClient(base, timeout=0.5, backoff=0.05, event_hooks=recorder.hooks()) as client:
        answered = client.post("/work", json={"steps": 3, "step": 0.4}, wait=5)
    assert isinstance(answered, httpx.Response)
    assert answered.status_code == 201
    assert len(recorder.sent("POST")) == 1


def test_the_handlers_own_202_is_its_final_answer(client: TaskClient) -> None:
    # A 202 whose Location is not the status URL is the handler's answer, not a
    # task still at work: the operation ends with it.
    operation = submit(client, steps=1, step=0.3, elsewhere=True)
    response = operation.result(timeout=10)
    assert response.status_code == 202
    assert response.headers["Location"] == "/elsewhere/1"
    assert response.json() == {"queued": "elsewhere"}
    assert operation.done()
    assert operation.state == "succeeded"


def test_failed_by_abort_and_by_an_exception(client: TaskClient) -> None:
    with pytest.raises(TaskFailed) as failed:
        submit(client, fail="abort").result(timeout=10)
    assert failed.value.response.status_code == 422
    assert failed.value.response.json() == {"message": "the input was not good enough"}
    assert failed.value.status_document is None
    with pytest.raises(TaskFailed) as broken:
        submit(client, fail="raise").result(timeout=10)
    assert broken.value.response.status_code == 500
    assert "Traceback" not in broken.value.response.text
    operation = broken.value.operation
    assert isinstance(operation, Operation)
    assert operation.status()["state"] == "failed"


def test_cancelled_and_timeout(client: TaskClient) -> None:
    operation = submit(client, steps=100, step=0.05, total=False)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        operation.result(timeout=1.5)
    assert time.monotonic() - started >= 1.0
    assert operation.cancel() is True
    with pytest.raises(TaskCancelled) as cancelled:
        operation.result(timeout=10)
    assert cancelled.value.response.status_code == 409
    assert cancelled.value.status_document is not None
    assert cancelled.value.status_document["state"] == "cancelled"
    assert operation.state == "cancelled"
    # a finished operation is not deleted by a later cancel
    assert operation.cancel() is False


def test_lost(tmp_path: Path) -> None:
    env = {"CLIENT_APP_INSTANCE": str(tmp_path), "FLASK_RESTFUL_ASYNC_LEASE": "1"}
    with (
        serve("gunicorn-gthread", APP, env=env, workers=1, threads=4) as url,
        TaskClient(url) as client,
    ):
        operation = client.post("/work", json={"die": True})
        assert isinstance(operation, Operation)
        with pytest.raises(TaskLost) as lost:
            operation.result(timeout=20)
    assert lost.value.response.status_code == 500
    assert lost.value.status_document is not None
    assert lost.value.status_document["state"] == "lost"
    assert lost.value.status_document["id"] == operation.id


def test_resume_from_the_status_url(base: str, client: TaskClient) -> None:
    url = submit(client, steps=2, step=0.3, resumed=True).url
    with TaskClient() as other:
        operation = other.operation(url)
        assert operation.state is None
        assert operation.status()["state"] in ("queued", "running")
        assert operation.result(timeout=10).json()["echo"]["resumed"] is True
    with TaskClient(base) as relative:
        path = httpx.URL(url).path
        assert relative.operation(path).result(timeout=10).status_code == 201


def test_status_and_done_poll_no_faster_than_retry_after(
    client: TaskClient, recorder: Recorder
) -> None:
    operation = submit(client, steps=3, step=0.6)
    for _ in range(20):
        assert not operation.done()
        operation.status()
    assert len(recorder.requests) == 1  # within the 202's Retry-After: 1
    time.sleep(1.05)
    assert operation.status()["state"] == "running"
    assert len(recorder.requests) == 2
    operation.result(timeout=10)


# -- pacing: Retry-After, backoff, redirects ---------------------------------------


def test_retry_after_is_honoured_without_long_poll(base: str, recorder: Recorder) -> None:
    with TaskClient(base, long_poll=0, event_hooks=recorder.hooks()) as client:
        operation = submit(client, steps=5, step=0.4, total=False)
        assert operation.result(timeout=15).status_code == 201
    polls = recorder.sent("GET", operation.id)
    # 2 s of work, Retry-After 1 s: 2 to 4 polls, each in its time
    assert 2 <= len(polls) <= 4, [when - recorder.started for when, _ in polls]
    assert all("Prefer" not in r.headers for _, r in polls)
    answers = [when for when, _ in recorder.responses]
    asked = [retry_after(r) for _, r in recorder.responses]
    for (sent, _), answered, pause in zip(polls, answers, asked, strict=False):
        assert pause is not None
        assert pause >= 1
        assert sent - answered >= pause - 0.01


def test_foreign_server_without_retry_after(base: str, recorder: Recorder) -> None:
    with TaskClient(base, event_hooks=recorder.hooks()) as client:
        operation = client.post("/foreign/jobs", params={"seconds": 0.6})
        assert isinstance(operation, Operation)
        assert operation.state is None  # a 202 with no status document
        response = operation.result(timeout=10)
    assert response.status_code == 200
    assert response.json() == {"job": operation.id}
    assert operation.state == "succeeded"
    polls = recorder.sent("GET", "/foreign/jobs/")
    # pauses of 0.1, 0.2, 0.4 s...: not busy-polling, not a second each
    assert 3 <= len(polls) <= 5, len(polls)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(polls)]
    assert all(gap >= 0.2 * 2**i for i, gap in enumerate(gaps)), gaps
    # asked once to long-poll; not applied, so never asked again
    assert polls[0][1].headers["Prefer"] == "wait=9"  # 20, within the timeout of 10 s
    assert all("Prefer" not in r.headers for _, r in polls[1:])


def test_foreign_server_with_an_http_date(base: str, recorder: Recorder) -> None:
    with TaskClient(base, event_hooks=recorder.hooks()) as client:
        operation = client.post("/foreign/jobs", params={"seconds": 0.8, "date": 2})
        assert isinstance(operation, Operation)
        assert operation.result(timeout=10).status_code == 200
    # the submit's 202 has no Retry-After: a first poll soon, then as the date says
    # (whole seconds, read against the answer's Date: 1 to 2 s, 1 when a second
    # begins between the two; so the job ends within the shortest of those waits)
    (first, _), (polled, _) = recorder.responses[1], recorder.requests[2]
    # Three answers: a poll sent after 2 s of quiet may meet the server's keep-alive
    # closing the connection, and the client sends it again (one more request).
    assert len(recorder.responses) == 3
    assert polled - first >= 0.9


def test_a_status_url_that_redirects_to_itself_is_given_up(base: str, recorder: Recorder) -> None:
    with TaskClient(base, event_hooks=recorder.hooks()) as client:
        operation = client.post("/foreign/odd/loop")
        assert isinstance(operation, Operation)
        with pytest.raises(httpx.TooManyRedirects):
            operation.result(timeout=10)
    assert len(recorder.sent("GET", "/odd/loop")) == MAX_REDIRECTS + 1


def test_a_status_url_that_moved_is_followed(base: str) -> None:
    with TaskClient(base) as client:
        operation = client.post("/foreign/odd/moved")
        assert isinstance(operation, Operation)
        response = operation.result(timeout=10)
    assert (response.status_code, response.json()) == (200, {"moved": True})
    assert operation.state == "succeeded"


def test_a_location_on_another_origin_is_not_followed(base: str, recorder: Recorder) -> None:
    """The polls would carry the caller's headers and credentials: only to the
    origin of the submit. Such a 202 is the final answer."""
    with TaskClient(
        base, headers={"Authorization": "Bearer secret"}, event_hooks=recorder.hooks()
    ) as client:
        answer = client.post("/foreign/odd/elsewhere")
    assert isinstance(answer, httpx.Response)
    assert answer.status_code == 202
    assert [r.method for _, r in recorder.requests] == ["POST"]


@pytest.mark.parametrize(
    ("location", "followed"),
    [
        ("/tasks/abc", "http://127.0.0.1:8000/tasks/abc"),
        ("http://127.0.0.1:8000/tasks/abc", "http://127.0.0.1:8000/tasks/abc"),
        ("https://127.0.0.1:8000/tasks/abc", None),  # another scheme
        ("http://127.0.0.1:8001/tasks/abc", None),  # another port
        ("//example.com/tasks/abc", None),  # another host
        ("http://[::1", None),  # not a URL (werkzeug would not even send it)
        ("", None),
    ],
)
def test_which_locations_the_polls_follow(location: str, followed: str | None) -> None:
    request = httpx.Request("POST", "http://127.0.0.1:8000/work")
    response = httpx.Response(202, headers={"Location": location}, request=request)
    found = location_of(response)
    assert (None if found is None else str(found)) == followed


def test_a_retry_after_past_any_clock_is_a_day_and_times_out_at_once(base: str) -> None:
    response = httpx.Response(503, headers={"Retry-After": "9" * 400})
    assert retry_after(response) == MAX_RETRY_AFTER
    dated = httpx.Response(503, headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    assert retry_after(dated) == MAX_RETRY_AFTER
    with TaskClient(base) as client:
        operation = client.post("/foreign/odd/far")
        assert isinstance(operation, Operation)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            operation.result(timeout=5)
    assert time.monotonic() - started < 1


def test_503_on_submit_is_retried_with_the_same_key(client: TaskClient, recorder: Recorder) -> None:
    headers = {"X-Fail-Submits": "2", "X-Fail-Retry-After": "1"}
    operation = client.post("/work", json={}, headers=headers)
    assert isinstance(operation, Operation)
    posts = recorder.sent("POST")
    assert len(posts) == 3
    assert len({r.headers["Idempotency-Key"] for _, r in posts}) == 1
    answers = [when for when, r in recorder.responses if r.status_code == 503]
    for (sent, _), answered in zip(posts[1:], answers, strict=True):
        # Retry-After plus up to 10 % of jitter (and whatever a loaded machine adds)
        assert 1.0 <= sent - answered <= 1.5
    assert operation.result(timeout=10).status_code == 201


def test_429_without_retry_after_backs_off_and_gives_up(base: str, recorder: Recorder) -> None:
    headers = {"X-Fail-Submits": "5", "X-Fail-Status": "429"}
    with TaskClient(base, retries=3, backoff=0.1, event_hooks=recorder.hooks()) as client:
        response = client.post("/work", json={}, headers=headers)
    assert isinstance(response, httpx.Response)
    assert response.status_code == 429
    posts = [when for when, _ in recorder.sent("POST")]
    assert len(posts) == 4
    gaps = [b - a for a, b in itertools.pairwise(posts)]
    # equal jitter: between half and all of 0.1, 0.2, 0.4 s
    for gap, step in zip(gaps, (0.1, 0.2, 0.4), strict=True):
        assert step / 2 <= gap <= step + 0.3, gaps


def test_503_on_polls_is_retried(client: TaskClient, recorder: Recorder) -> None:
    headers = {"X-Fail-Polls": "2", "X-Fail-Retry-After": "0"}
    operation = client.post("/work", json={"steps": 1, "step": 0.1}, headers=headers)
    assert isinstance(operation, Operation)
    assert operation.result(timeout=10).status_code == 201
    codes = [r.status_code for _, r in recorder.responses]
    assert codes[1:3] == [503, 503]
    # the headers of the submit go with its polls, those of its body do not
    polls = recorder.sent("GET", operation.id)
    assert all(r.headers["X-Fail-Polls"] == "2" for _, r in polls)
    assert all("Content-Type" not in r.headers for _, r in polls)
    assert all("Idempotency-Key" not in r.headers for _, r in polls)


def test_303_to_the_result_is_followed(client: TaskClient, recorder: Recorder) -> None:
    operation = submit(client, "/redirect/work", steps=1, step=0.1)
    response = operation.result(timeout=10)
    assert response.status_code == 201
    assert response.json()["echo"]["steps"] == 1
    assert str(response.url) == operation.url + "/result"
    assert [r.status_code for _, r in recorder.responses][-2:] == [303, 201]


# -- a submit whose answer was lost ------------------------------------------------


class DroppingProxy:
    """A loopback TCP proxy to ``port`` that loses the first ``drop`` answers: it
    forwards the request, reads the server's whole response, then closes the
    client's connection without a byte of it. Later connections are relayed."""

    def __init__(self, port: int, drop: int = 1) -> None:
        self.port = port
        self.drop = drop
        self.dropped: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self.accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            upstream = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            self.sockets += [conn, upstream]
            if self.drop:
                self.drop -= 1
                upstream.sendall(read_message(conn))
                self.dropped.append(read_message(upstream))
                conn.close()
                upstream.close()
                continue
            for source, sink in ((conn, upstream), (upstream, conn)):
                thread = threading.Thread(target=pump, args=(source, sink), daemon=True)
                thread.start()
                self.threads.append(thread)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(5)


def read_message(sock: socket.socket) -> bytes:
    """One HTTP message with a Content-Length (or none), read whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a message"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a body"
        body += chunk
    return head + b"\r\n\r\n" + body


def pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def test_a_submit_whose_answer_was_lost_makes_one_task(base: str, recorder: Recorder) -> None:
    proxy = DroppingProxy(httpx.URL(base).port or 80)
    tag = os.urandom(6).hex()
    try:
        with TaskClient(proxy.url, backoff=0.05, event_hooks=recorder.hooks()) as client:
            operation = client.post(f"/work/{tag}", json={"tag": tag})
            assert isinstance(operation, Operation)
            assert operation.result(timeout=10).json() == {"echo": {"tag": tag}}
    finally:
        proxy.close()
    (lost,) = proxy.dropped
    assert lost.startswith(b"HTTP/1.1 202 ")
    assert f"Location: /tasks/{operation.id}\r\n".encode() in lost
    posts = recorder.sent("POST")
    assert len(posts) == 2
    assert posts[0][1].headers["Idempotency-Key"] == posts[1][1].headers["Idempotency-Key"]
    status, _, body = http("GET", base + "/tasks?limit=500")
    assert status == 200
    tasks = [task for task in json.loads(body)["tasks"] if task["request"]["path"].endswith(tag)]
    assert [task["id"] for task in tasks] == [operation.id]


# -- asyncio -----------------------------------------------------------------------


def test_async_client(base: str) -> None:
    async def main() -> tuple[list[Progress], int, int]:
        seen: list[Progress] = []

        async def report(progress: Progress) -> None:
            await asyncio.sleep(0)
            seen.append(progress)

        async with AsyncTaskClient(base) as client:
            done, cancelled = await asyncio.gather(
                client.post("/work", json={"steps": 3, "step": 0.7, "total": False}),
                client.post("/work", json={"steps": 100, "step": 0.05, "total": False}),
            )
            assert isinstance(done, AsyncOperation)
            assert isinstance(cancelled, AsyncOperation)
            assert await cancelled.cancel()
            response = await done.result(timeout=10, on_progress=report)
            with pytest.raises(TaskCancelled) as caught:
                await cancelled.result(timeout=10)
            assert (await cancelled.status())["state"] == "cancelled"
            assert await client.get("/plain") is not None
            return seen, response.status_code, caught.value.response.status_code

    seen, code, cancelled_code = asyncio.run(main())
    assert (code, cancelled_code) == (201, 409)
    assert seen
    assert [p.current for p in seen] == sorted({p.current for p in seen})


# -- the command line --------------------------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flask_restful_async.client", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_follows_a_task_to_its_result(base: str) -> None:
    body = json.dumps({"steps": 4, "step": 0.7, "total": False})
    result = run_cli("post", base + "/work", "--json", body, "-H", "X-Fail-Polls: 1")
    assert result.returncode == 0, result
    lines = result.stdout.splitlines()
    assert lines[0] == f"POST {base}/work"
    assert lines[1].startswith("202 ACCEPTED  Location: /tasks/")
    assert lines[1].endswith("  Retry-After: 1")
    assert lines[2].split()[1:] in (["queued"], ["running"])
    running = re.compile(r" +\d+\.\ds  running +(\d+)  step \1")
    assert any(running.fullmatch(line) for line in lines[3:-2]), lines
    assert lines[-2:] == ["201 CREATED  application/json", json.dumps({"echo": json.loads(body)})]


def test_cli_wait_gets_the_final_answer_to_the_submit_itself(base: str) -> None:
    body = json.dumps({"steps": 2, "step": 0.2})
    result = run_cli("post", base + "/work", "--json", body, "--wait", "10")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        f"POST {base}/work",
        "201 CREATED  application/json",
        json.dumps({"echo": json.loads(body)}),
    ]


def test_cli_bar_and_exit_status_of_a_failure(base: str) -> None:
    body = json.dumps({"steps": 3, "step": 0.8, "fail": "abort"})
    result = run_cli("POST", base + "/work", "--json", body, "--progress", "bar")
    assert result.returncode == 1, result
    assert result.stdout.splitlines()[-2:] == [
        "422 UNPROCESSABLE ENTITY  application/json",
        '{"message": "the input was not good enough"}',
    ]
    assert "running: " in result.stderr  # tqdm's bar: the state, then the count
    assert "step 2" in result.stderr


def test_cli_bar_ends_full_when_the_task_succeeds(base: str) -> None:
    """The last report (4 of 4) comes right before the end: the client, polling
    each second, sees 3 of 4 at most; the bar ends full all the same."""
    body = json.dumps({"steps": 4, "step": 0.6})
    result = run_cli("POST", base + "/work", "--json", body, "--progress", "bar")
    assert result.returncode == 0, result
    last = re.split(r"[\r\n]", result.stderr.strip())[-1]
    assert last.startswith("succeeded: 100%"), result.stderr
    assert "4/4" in last


def test_cli_bad_usage_and_errors(base: str) -> None:
    assert run_cli("POST", base + "/work", "--json", "{nope").returncode == 2
    assert run_cli("GET", base + "/plain", "-H", "no colon").returncode == 2
    for bad in (
        ["GET", "http://[::1"],  # not a URL
        ["GET", "ftp://127.0.0.1/x"],
        ["GET", base + "/plain", "-H", "X-Name: \u00e9"],  # not ASCII
        ["GET", base + "/plain", "--timeout", "nan"],
        ["GET", base + "/plain", "--timeout", "inf"],
        ["GET", base + "/plain", "--wait", "0"],
    ):
        with pytest.raises(SystemExit) as usage:  # argparse's exit, with a message
            cli_main(bad)
        assert usage.value.code == 2, bad
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        refused = run_cli("GET", f"http://127.0.0.1:{s.getsockname()[1]}/", "--timeout", "1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ")
    slow = run_cli("POST", base + "/work", "--json", '{"steps": 3, "step": 1}', "--timeout", "1")
    assert slow.returncode == 1
    assert "error: no final response within 1 s" in slow.stderr


def start_cli(*args: str, **options: t.Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flask_restful_async.client", *args],
        cwd=ROOT,
        text=True,
        **options,
    )


def read_until(fd: int, pattern: bytes, timeout: float = 15) -> bytes:
    """Read ``fd`` until ``pattern`` (a regex) matches (or it ends, or ``timeout`` passes)."""
    data = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, data) and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pty whose other side closed
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("cancel", [False, True])
def test_cli_ctrl_c_without_a_terminal(base: str, cancel: bool) -> None:
    args = ["POST", base + "/work", "--json", '{"steps": 40, "step": 0.05}']
    if cancel:
        args.append("--cancel-on-interrupt")
    cli = start_cli(*args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert cli.stdout is not None
        head = read_until(cli.stdout.fileno(), rb"\ds  (queued|running)")
        location = head.decode().split("Location: ")[1].split()[0]
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=15)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 130, err
    status, _, body = http("GET", base + location + "?wait=10")
    if cancel:
        assert "the task is cancelled" in err
        assert (status, json.loads(body)["state"]) == (409, "cancelled")
    else:
        assert f"python -m flask_restful_async.client GET {base}{location}" in err
        assert status == 201


def test_cli_ctrl_c_on_a_terminal_asks(base: str) -> None:
    body = '{"steps": 60, "step": 0.05}'
    # stdin and stderr must both be terminals for the prompt
    leader, follower = pty.openpty()
    cli = start_cli(
        "POST", base + "/work", "--json", body, stdin=follower, stdout=follower, stderr=follower
    )
    try:
        seen = read_until(leader, rb"Retry-After: \d+")
        assert b"202 ACCEPTED" in seen
        time.sleep(0.3)
        cli.send_signal(signal.SIGINT)
        prompt = read_until(leader, rb"\[y/N\] ")
        assert b"Cancel the task at " in prompt, prompt
        os.write(leader, b"y\n")
        rest = read_until(leader, rb"the task is cancelled")
        assert cli.wait(15) == 130
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        os.close(follower)
        os.close(leader)
    assert b"the task is cancelled" in rest, rest


# -- parts, without a server -------------------------------------------------------


def answer(*headers: tuple[str, str], status: int = 202, body: bytes = b"") -> httpx.Response:
    return httpx.Response(status, headers=list(headers), content=body)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("3", 3.0), ("0", 0.0), (" 7 ", 7.0), ("soon", None), ("-1", None), ("1.5", None)],
)
def test_retry_after_in_seconds(value: str, seconds: float | None) -> None:
    assert retry_after(answer(("Retry-After", value))) == seconds
    assert retry_after(answer()) is None


def test_retry_after_as_an_http_date() -> None:
    # read against the answer's Date, whatever the local clock says
    date = email.utils.formatdate(1_000_000_000, usegmt=True)
    later = email.utils.formatdate(1_000_000_042, usegmt=True)
    assert retry_after(answer(("Retry-After", later), ("Date", date))) == 42
    assert retry_after(answer(("Retry-After", date), ("Date", later))) == 0
    # without a Date: against the local clock
    ahead = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = retry_after(answer(("Retry-After", ahead)))
    assert seconds is not None
    assert 28 <= seconds <= 30


def test_backoff_has_jitter_and_a_cap() -> None:
    policy = Policy(backoff=1, max_backoff=8)
    for attempt, step in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        pauses = {policy.pause(attempt, None) for _ in range(50)}
        assert all(step / 2 <= p <= step for p in pauses)
        assert len(pauses) > 1
    assert all(10 <= policy.pause(1, 10) <= 11 for _ in range(50))
    with pytest.raises(ValueError, match="must not be negative"):
        Policy(retries=-1)


def test_exported_names() -> None:
    import flask_restful_async.client as client

    assert set(client.__all__) == {
        "AsyncOperation",
        "AsyncTaskClient",
        "Operation",
        "Progress",
        "TaskCancelled",
        "TaskClient",
        "TaskError",
        "TaskFailed",
        "TaskLost",
        "retry_after",
    }
    assert all(hasattr(client, name) for name in client.__all__)
    assert issubclass(client.TaskError, flask_restful_async.RestfulAsyncError)
    assert client.TaskCancelled is not flask_restful_async.TaskCancelled


def test_the_command_line_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python -m flask_restful_async.client POST" in readme
    assert "## Python client" in readme


def test_http_dates_from_the_foreign_app_parse(base: str) -> None:
    # the foreign app's Location keeps ?date, and its 202 has a parseable date
    status, headers, _ = http("POST", base + "/foreign/jobs?seconds=5&date=3")
    assert status == 202
    status, headers, _ = http("GET", base + headers["location"])
    assert status == 202
    assert email.utils.parsedate_to_datetime(headers["retry-after"]) is not None
