"""What the two demos (``make demo``, ``make demo-celery``) share: a free port, a
readiness probe, stopping a server, and leaving cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def answers(port: int) -> bool:
    """True once the app answers at its status URL: 404 for an id that cannot
    exist (no task is made, the store is not read)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", "/status/ready")
        with connection.getresponse() as response:
            response.read()
            return response.status == 404
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def wait_for_web(server: subprocess.Popen[bytes], port: int, timeout: float) -> str | None:
    """None once gunicorn answers on ``port``, else what went wrong."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return f"gunicorn exited with status {server.returncode}"
        if answers(port):
            return None
        time.sleep(0.1)
    return f"gunicorn did not answer in {timeout:g} s"


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a graceful stop), a bounded wait, then SIGKILL to its whole session
    (a gunicorn arbiter and its workers, a Celery worker and its pool)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT)


def exit_on_sigterm(signum: int, frame: object) -> None:
    """Install with ``signal.signal(signal.SIGTERM, exit_on_sigterm)``: a SIGTERM then
    unwinds through the demo's ``finally``, which stops its servers."""
    raise SystemExit(128 + signum)
