"""Real HTTP servers for tests: start one in a subprocess, talk to it, stop it.

Usage::

    from tests.servers import http, poll_until_done, serve

    with serve("gunicorn-gthread", "tests.apps.digest_app:app", threads=8) as base:
        status, headers, body = http(
            "POST", base + "/digest", body=b"{}", headers={"Content-Type": "application/json"}
        )
        status, headers, body = poll_until_done(base, headers["location"])

Kinds of server (:data:`KINDS`):

``gunicorn-sync``
    ``gunicorn -k sync -w WORKERS``: one request at a time per worker process.
``gunicorn-gthread``
    ``gunicorn -k gthread -w WORKERS --threads THREADS``.
``gunicorn-gevent`` (in :data:`MORE_KINDS`)
    ``gunicorn -k gevent -w WORKERS``: greenlets (gevent monkey-patches the
    worker before the app is imported); needs gevent.
``werkzeug``
    werkzeug's threaded development server (what ``run_simple(threaded=True)``
    runs), one process; ``workers`` must be 1.

The server listens on 127.0.0.1 only, on a port the kernel picked. The socket is
bound and listening *before* the server starts and is handed to it as a file
descriptor: no other process can take the port between choosing and binding it,
and connections made while the server boots wait in the backlog instead of
being refused. Servers run with the repository root as working directory and
first on ``PYTHONPATH``, so ``app_spec`` may name any module of the repository
(``"tests.apps.digest_app:app"``).

Each server runs in a session of its own; on exit the whole session is stopped
(SIGTERM to the server, a bounded wait, then SIGKILL to every process left in
the session), so that no worker outlives the ``with`` block, whatever happened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from http import client as http_client
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent

KINDS = ("gunicorn-sync", "gunicorn-gthread", "werkzeug")
#: Kinds that are served but not part of :data:`KINDS` (which the server tests
#: run every case on): gevent only where a test asks for it.
MORE_KINDS = ("gunicorn-gevent",)

#: Seconds gunicorn gives its workers to finish on SIGTERM. Shorter than the
#: default ``stop_timeout`` so that gunicorn ends them itself before we escalate.
GUNICORN_GRACEFUL_TIMEOUT = 5

# argv: app_spec, listening fd. make_server is what run_simple(threaded=True)
# builds, minus the reloader and debugger; unlike run_simple it takes an fd.
_WERKZEUG_SCRIPT = """\
import importlib, sys
from werkzeug.serving import make_server
module, _, name = sys.argv[1].partition(":")
app = getattr(importlib.import_module(module), name or "app")
make_server("127.0.0.1", 0, app, threaded=True, fd=int(sys.argv[2])).serve_forever()
"""

Headers = dict[str, str]
Response = tuple[int, Headers, bytes]


class ServerError(RuntimeError):
    """The server did not start, or died while in use. The message has its output."""


@contextlib.contextmanager
def serve(
    kind: str,
    app_spec: str,
    *,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    threads: int = 4,
    timeout: float = 20,
    stop_timeout: float = 10,
    log: t.IO[bytes] | None = None,
    options: Sequence[str] = (),
    may_exit: bool = False,
) -> Iterator[str]:
    """Run ``app_spec`` (``"package.module:attr"``) under a server of ``kind``.

    Yields the base URL (``http://127.0.0.1:PORT``, no trailing slash) once the
    server has answered an HTTP request. With several gunicorn workers, others
    may still be booting then; they share the listening socket, so a request
    waits for a free worker instead of failing. ``env`` is added to the server's
    environment. ``threads`` only applies to ``gunicorn-gthread`` (werkzeug
    starts a thread per request). ``timeout`` bounds the start-up,
    ``stop_timeout`` the graceful part of the shutdown. The server's output
    goes to ``log`` (a file opened for binary writing) if given, so that a test
    can read it; to a temporary file otherwise. ``options`` are added to
    gunicorn's command line (e.g. ``("--max-requests", "50")``).

    Raises :class:`ServerError` with the server's output if it does not answer
    within ``timeout``, exits during start-up, or has died by the time the
    ``with`` block ends normally (unless ``may_exit``: a test that stops it).
    Otherwise, the output is echoed to stderr at exit if it contains a traceback
    (a handler that failed in a worker shows up there, not in the 500 the client
    gets).
    """
    if workers < 1 or threads < 1:
        raise ValueError("workers and threads must be at least 1")
    if kind == "werkzeug" and workers != 1:
        raise ValueError("the werkzeug server runs a single process: workers must be 1")
    with contextlib.ExitStack() as stack:
        if log is None:
            log = stack.enter_context(tempfile.TemporaryFile())
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            proc = subprocess.Popen(
                _command(kind, app_spec, listener.fileno(), workers, threads, options),
                cwd=ROOT,
                env=_environment(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                start_new_session=True,
            )
            stack.push(_echo_tracebacks(log, kind))
            stack.callback(_stop, proc, stop_timeout)
        # The server now holds the only copy of the listening socket: if it dies,
        # clients are refused instead of waiting in a backlog nobody reads.
        base = f"http://127.0.0.1:{port}"
        _wait_until_ready(proc, kind, base, timeout, log)
        yield base
        if _has_exited(proc) and not may_exit:
            raise ServerError(f"{kind} server died while in use:\n{_read(log)}")


def http(
    method: str,
    url: str,
    *,
    body: bytes | Iterable[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10,
) -> Response:
    """One request on a fresh connection: ``(status, headers, body)``.

    Header names in the result are lowercase; repeated headers are joined with
    ``", "``. ``body`` may be an iterable of byte strings: it is then sent with
    ``Transfer-Encoding: chunked``, one chunk per item. Only loopback hosts are
    accepted, so that a test can never reach out to the network.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or host is None or not _is_loopback(host):
        raise ValueError(f"only http:// URLs to a loopback address, not {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request_headers = dict(headers or {})
    chunked = body is not None and not isinstance(body, bytes | bytearray | memoryview)
    if chunked:
        request_headers.setdefault("Transfer-Encoding", "chunked")
    conn = http_client.HTTPConnection(host, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=request_headers, encode_chunked=chunked)
        with conn.getresponse() as response:
            data = response.read()
            received: Headers = {}
            for name, value in response.getheaders():
                name = name.lower()
                received[name] = f"{received[name]}, {value}" if name in received else value
            return response.status, received, data
    finally:
        conn.close()


def poll_until_done(
    base: str, location: str, *, timeout: float = 20, interval: float = 0.02
) -> Response:
    """GET ``location`` (relative to ``base``) until the answer is not 202.

    Returns that final response. The pause between polls starts at ``interval``
    and doubles up to 0.5 s: the server's ``Retry-After`` (whole seconds) would
    make quick tasks slow to test. Raises :class:`TimeoutError` after
    ``timeout`` seconds.
    """
    url = urllib.parse.urljoin(base + "/", location)
    deadline = time.monotonic() + timeout
    while True:
        response = http("GET", url, timeout=max(0.1, min(10, deadline - time.monotonic())))
        if response[0] != 202:
            return response
        if time.monotonic() + interval > deadline:
            raise TimeoutError(f"{url} still answers 202 after {timeout} s: {response[2]!r}")
        time.sleep(interval)
        interval = min(interval * 2, 0.5)


def _command(
    kind: str, app_spec: str, fd: int, workers: int, threads: int, options: Sequence[str]
) -> list[str]:
    if kind == "werkzeug":
        if options:
            raise ValueError("options are for gunicorn only")
        return [sys.executable, "-c", _WERKZEUG_SCRIPT, app_spec, str(fd)]
    if kind == "gunicorn-sync":
        # No --threads: with more than one, gunicorn silently switches to gthread.
        worker_args = ["--worker-class", "sync"]
    elif kind == "gunicorn-gthread":
        worker_args = ["--worker-class", "gthread", "--threads", str(threads)]
    elif kind == "gunicorn-gevent":
        worker_args = ["--worker-class", "gevent"]
    else:
        raise ValueError(f"unknown server kind {kind!r}; one of {', '.join(KINDS)}")
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"fd://{fd}",
        "--workers",
        str(workers),
        *worker_args,
        "--graceful-timeout",
        str(GUNICORN_GRACEFUL_TIMEOUT),
        *_gunicorn_no_control_socket(),
        *options,
        app_spec,
    ]


def _gunicorn_no_control_socket() -> list[str]:
    # Recent gunicorn masters open a control socket at a fixed path in the home
    # directory (~/.gunicorn/gunicorn.ctl): servers started side by side would
    # fight over it. Older versions have neither the socket nor the option.
    import gunicorn.config

    if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
        return ["--no-control-socket"]
    return []


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    environ = dict(os.environ)
    environ.update(extra or {})
    paths = [str(ROOT), *filter(None, environ.get("PYTHONPATH", "").split(os.pathsep))]
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    # Without it a crash at start-up could leave the reason in an unflushed buffer.
    environ["PYTHONUNBUFFERED"] = "1"
    return environ


def _wait_until_ready(
    proc: subprocess.Popen[bytes], kind: str, base: str, timeout: float, log: t.IO[bytes]
) -> None:
    # Any HTTP answer (even a 404) means the app is imported and requests are served.
    deadline = time.monotonic() + timeout
    while True:
        if _has_exited(proc):
            raise ServerError(f"{kind} server exited during start-up:\n{_read(log)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ServerError(f"{kind} server did not answer within {timeout} s:\n{_read(log)}")
        try:
            http("GET", base + "/", timeout=min(1.0, remaining))
        except (OSError, http_client.HTTPException):
            time.sleep(0.05)
        else:
            return


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    # WNOWAIT leaves the exited server unreaped: as long as it is a zombie, its
    # pid (the session's process group id) cannot be reused, so _stop can still
    # signal that group safely.
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # already reaped
    return info is not None


def _wait_for_exit(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _has_exited(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        if not _has_exited(proc):
            # gunicorn's master stops its workers on SIGTERM; werkzeug just exits.
            os.kill(proc.pid, signal.SIGTERM)
            _wait_for_exit(proc, timeout)
    finally:
        # Whatever is left in the group: the server if it ignored SIGTERM, or
        # workers it left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _read(log: t.IO[bytes]) -> str:
    # pread: the server writes through the same open file, so moving the shared
    # offset back would make it overwrite what it wrote before.
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def _echo_tracebacks(log: t.IO[bytes], kind: str) -> t.Callable[..., None]:
    # An exit callback for ExitStack.push: it sees the exception leaving the block.
    def echo(
        exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, ServerError):
            return  # its message already has the output
        output = _read(log)
        if "Traceback (most recent call last)" in output:
            print(f"--- output of the {kind} server ---\n{output}", file=sys.stderr)

    return echo


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
