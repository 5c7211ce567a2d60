"""Real services the tests talk to: skip when absent, fail when CI requires them.

``RESTFUL_ASYNC_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns "service absent"
from a skip into a failure, so that CI never passes by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
#: The databases the tests may use and flush; never any other.
REDIS_TEST_DBS = (12, 13, 14, 15)


def services_required() -> bool:
    return os.environ.get("RESTFUL_ASYNC_REQUIRE_SERVICES") == "1"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, when services are required, fail) unless ``host:port`` answers."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if services_required():
        pytest.fail(f"{message}, and RESTFUL_ASYNC_REQUIRE_SERVICES=1")
    pytest.skip(message)


def require_redis() -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(port: int, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A redis-server of the test's own on 127.0.0.1:``port``, never the shared one.

    No persistence, except that it loads ``workdir``'s dump.rdb if there is one
    (written by ``SHUTDOWN SAVE``). Ready once it answers PING; killed and reaped
    on exit. Skips (or fails, when services are required) without the binary.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        message = "redis-server is not installed"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(port):
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING on port {port} in 10 s")
            time.sleep(0.02)
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


class ReplyCutter:
    """A loopback TCP proxy to ``port`` that, while :attr:`cutting`, lets requests
    through and cuts the connection instead of passing the reply back: the server
    ran the command, the caller never learns it (a reply lost to a dropped
    connection). Serves on :attr:`port` from ``with`` until the block ends, then
    closes every socket and joins its threads."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.cutting = False
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port = int(self._server.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> ReplyCutter:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: t.Callable[..., None], *args: t.Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if replies and self.cutting:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class RestartableRedis:
    """A :func:`redis_server` that can be stopped and started again on the same port
    and folder, its data kept (``SHUTDOWN SAVE``, then loaded from ``dump.rdb``):
    an outage of a few seconds, as a restart or a failover makes. Stops on exit."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self._running: contextlib.ExitStack | None = None

    def start(self) -> None:
        assert self._running is None, "already running"
        stack = contextlib.ExitStack()
        stack.enter_context(redis_server(self.port, self.workdir))
        self._running = stack

    def stop(self) -> None:
        """``SHUTDOWN SAVE``: clients are refused from now until :meth:`start`."""
        assert self._running is not None, "not running"
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn,
        ):
            conn.sendall(b"SHUTDOWN SAVE\r\n")
            conn.recv(64)  # the server closes the connection once saved
        stack, self._running = self._running, None
        stack.close()

    def __enter__(self) -> RestartableRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


def delete_redis_keys(db: int, prefix: str) -> int:
    """Delete the keys under ``prefix`` in test database ``db`` (never a flush)."""
    import redis

    assert db in REDIS_TEST_DBS, db
    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (Celery's warm shutdown), a bounded wait, then SIGKILL to its session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@contextlib.contextmanager
def celery_worker(
    app_spec: str,
    queue: str,
    options: Sequence[str],
    env: Mapping[str, str],
    log: t.IO[bytes],
) -> Iterator[subprocess.Popen[bytes]]:
    """``celery -A app_spec worker`` consuming ``queue``, run from the project's root
    in a session of its own (so that a stuck one can be killed with its pool), its
    output in ``log``; stopped on exit. No gossip, mingle or heartbeat: nothing
    these tests and benchmarks use, and each costs broker traffic."""
    root = Path(__file__).resolve().parent.parent
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        **env,
    }
    # The worker is no test run: whether services are required is pytest's to say.
    environ.pop("RESTFUL_ASYNC_REQUIRE_SERVICES", None)
    command = [
        sys.executable, "-m", "celery", "-A", app_spec, "worker", "-Q", queue, *options,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=root,
        env=environ,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop_worker(process)
