"""The examples: catchall.py through Flask's test client, client.py (on top of
flask_restful_async.client), demo.py."""

from __future__ import annotations

import http.client
import http.server
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_restful_async.state import get_state
from flask_restful_async.stores import SQLiteStore

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"


def load_example(name: str) -> types.ModuleType:
    """Import examples/<name>.py afresh (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def catchall_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.setenv("CATCHALL_SECONDS", "0.3")
    module = load_example("catchall")
    app: Flask = module.app
    app.config["TESTING"] = True
    yield app
    get_state(app).close()


@pytest.mark.parametrize("path", ["some/path", ""])
def test_catchall_answers_202_then_the_answer(catchall_app: Flask, path: str) -> None:
    client = catchall_app.test_client()
    response = client.get(f"/{path}")
    assert response.status_code == 202
    location = response.headers["Location"]
    assert location.startswith("/status/")
    assert response.headers["Retry-After"].isdigit()
    assert response.get_json()["state"] in ("queued", "running")

    progress = []
    deadline = time.monotonic() + 10
    while response.status_code == 202:
        assert time.monotonic() < deadline, "the task did not finish in time"
        time.sleep(0.02)
        response = client.get(location)
        if response.status_code == 202:
            assert response.headers["Location"] == location
            document = response.get_json()
            assert document["id"] == location.rsplit("/", 1)[1]
            if document["progress"] is not None:
                progress.append(document["progress"])

    assert response.status_code == 200
    assert response.get_json() == f"The answer is: {path}"
    assert progress, "no progress was seen while the task ran"
    assert all(p["total"] == 10 and 1 <= p["current"] <= 10 for p in progress)
    assert progress[0]["message"] == f"step {progress[0]['current']} of 10"
    # the status routes are not swallowed by the catch-all route (which would
    # answer 202): the list is there, and answers 404 as the app has no owner
    listed = client.get("/status")
    assert listed.status_code == 404
    assert listed.json is not None
    assert client.get("/status/nope").status_code == 404


class TinyHandler(http.server.BaseHTTPRequestHandler):
    """200 at /ok, 202 at /accepted (to /ok), 202 at /forever (to itself), else 404."""

    def do_GET(self) -> None:
        if self.path == "/ok":
            self.reply(200, b'"fine"', {"Content-Type": "application/json"})
        elif self.path == "/accepted":
            document = b'{"state": "running", "progress": {"current": 2.5, "total": 10}}'
            self.reply(202, document, {"Location": "ok", "Retry-After": "0"})
        elif self.path == "/forever":
            self.reply(202, b"{}", {"Location": "/forever", "Retry-After": "0"})
        else:
            self.reply(404, b"no", {"Content-Type": "text/plain"})

    def reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TinyHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def client() -> types.ModuleType:
    return load_example("client")


def test_catchall_stops_at_a_delete_as_the_readme_shows(catchall_app: Flask) -> None:
    # README's "Task control" runs its curl examples against this app: a DELETE of
    # a running task ends it cancelled, 409.
    client = catchall_app.test_client()
    location = client.get("/cancel/me").headers["Location"]
    deadline = time.monotonic() + 10
    while client.get(location).get_json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    asked = client.delete(location)
    assert asked.status_code == 202
    assert asked.get_json()["cancel_requested"] is True
    final = client.get(f"{location}?wait=5")
    assert final.status_code == 409
    assert final.get_json()["state"] == "cancelled"
    # The paths under /status are the task URLs', not jobs.
    assert client.get("/status/a/b").get_json() == {"message": "No such task."}


@pytest.mark.parametrize(
    ("path", "code", "last_lines"),
    [
        ("/ok", 0, ["200 OK  application/json", '"fine"']),
        ("/missing", 1, ["404 Not Found  text/plain", "no"]),
        ("/accepted", 0, ["200 OK  application/json", '"fine"']),
    ],
)
def test_follow_exit_status(
    client: types.ModuleType, tiny_server: str, path: str, code: int, last_lines: list[str]
) -> None:
    out = io.StringIO()
    assert client.follow(tiny_server + path, timeout=10, out=out) == code
    lines = out.getvalue().splitlines()
    assert lines[0] == f"GET {tiny_server}{path}"
    assert lines[-2:] == last_lines


def test_follow_polls_with_retry_after(client: types.ModuleType, tiny_server: str) -> None:
    out = io.StringIO()
    assert client.follow(tiny_server + "/accepted", timeout=10, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == "202 Accepted  Location: ok  Retry-After: 0"
    assert re.fullmatch(r"  +\d+\.\ds  running   2\.5/10", lines[2]), lines


def test_follow_times_out(client: types.ModuleType, tiny_server: str) -> None:
    out = io.StringIO()
    started = time.monotonic()
    assert client.follow(tiny_server + "/forever", timeout=0.5, out=out) == 1
    assert time.monotonic() - started < 2
    lines = out.getvalue().splitlines()
    assert lines[-2] == "error: no final response within 0.5 s; the task goes on:"
    assert lines[-1] == f"  {tiny_server}/forever"


def test_follow_connection_refused(client: types.ModuleType) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        out = io.StringIO()
        assert client.follow(f"http://127.0.0.1:{port}/", timeout=1, out=out) == 1
    assert out.getvalue().splitlines()[-1].startswith("error: ")


def test_client_sends_api_token(
    client: types.ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/client.py is the command line plus a bearer token from API_TOKEN."""
    received: list[str | None] = []

    class Handler(TinyHandler):
        def do_GET(self) -> None:
            received.append(self.headers.get("Authorization"))
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        monkeypatch.setenv("API_TOKEN", "s3cret")
        url = f"http://127.0.0.1:{server.server_address[1]}/accepted"
        assert client.main([url, "--progress", "none"]) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert received == ["Bearer s3cret", "Bearer s3cret"]  # the submit and its poll
    assert capsys.readouterr().out.splitlines()[-1] == '"fine"'


def test_demo() -> None:
    env = {**os.environ, "CATCHALL_SECONDS": "1"}
    demo = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "demo.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = demo.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        demo.terminate()  # demo.py stops its server on SIGTERM
        try:
            output, _ = demo.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            demo.kill()
            output, _ = demo.communicate()
        pytest.fail(f"demo.py did not finish in 60 s:\n{output}")
    assert demo.returncode == 0, output
    # Every process closed the store at exit: no write-ahead log is left beside it.
    assert not list((EXAMPLES / "instance").glob("*-wal"))
    assert not list((EXAMPLES / "instance").glob("*-shm"))
    assert "202 ACCEPTED  Location: /status/" in output
    assert "200 OK  application/json" in output
    assert '"The answer is: hello/world"' in output
    assert re.search(r"The dashboard shows it live: http://127\.0\.0\.1:\d+/dashboard", output)


def test_catchall_serves_the_dashboard_in_debug_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app: Flask = load_example("catchall").app
    try:
        client = app.test_client()
        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["Content-Security-Policy"] == "default-src 'self'"
        assert client.get("/dashboard/api/tasks").status_code == 200
    finally:
        get_state(app).close()


def test_catchall_has_no_dashboard_outside_debug_mode(catchall_app: Flask) -> None:
    # /dashboard is then a path like any other: the catch-all resource takes it.
    assert catchall_app.test_client().get("/dashboard").status_code == 202


def test_catchall_keeps_its_tasks_in_examples_instance(catchall_app: Flask) -> None:
    store = get_state(catchall_app).store
    assert isinstance(store, SQLiteStore)
    assert Path(store.path) == EXAMPLES / "instance" / "restful_async.db"
    assert "`examples/instance/restful_async.db`" in README.read_text()


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n{title}\n")
    heading = re.compile(r"^#{2,3} ", re.MULTILINE)
    following = heading.search(text, start + len(title) + 2)
    return text[start : following.start() if following else None]


def test_readme_prefer_example_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's `Prefer: respond-async, wait=N` example, run as it is written: the
    job must be shorter than the wait, so that the final answer comes back."""
    section = readme_section("### `Prefer` on a submit (RFC 7240)")
    seconds = re.search(r"CATCHALL_SECONDS=(\d+(?:\.\d+)?) python examples/catchall\.py", section)
    curl = re.search(r"curl -i -H 'Prefer: ([^']+)' http://127\.0\.0\.1:5000(\S+)", section)
    assert seconds is not None
    assert curl is not None
    prefer, path = curl.groups()
    monkeypatch.setenv("CATCHALL_SECONDS", seconds.group(1))
    app: Flask = load_example("catchall").app
    try:
        response = app.test_client().get(path, headers={"Prefer": prefer})
        wait = re.search(r"wait=(\d+)", prefer)
        assert wait is not None
        assert response.status_code == 200, response.get_json()
        assert response.headers["Preference-Applied"] == f"wait={wait.group(1)}"
        assert f"Preference-Applied: wait={wait.group(1)}" in section
        assert response.get_json() == f"The answer is: {path.lstrip('/')}"
        assert f'"The answer is: {path.lstrip("/")}"' in section
    finally:
        get_state(app).close()


def test_readme_deployment_covers_proxies() -> None:
    """Long-polls and slow uploads meet the reverse proxy first: the deployment section
    says which settings matter."""
    section = readme_section("## Deployment")
    for setting in ("proxy_read_timeout", "proxy_request_buffering", "client_max_body_size"):
        assert setting in section
    assert "RESTFUL_ASYNC_MAX_WAIT" in section
