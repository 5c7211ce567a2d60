"""``make demo-celery``: examples/celery_app.py with a Celery worker and gunicorn, then the client.

Starts, on 127.0.0.1, a Celery worker (``-P threads -c 4``) and gunicorn (2
processes) for ``examples.celery_app``, both on Redis database 12 (broker and task
store) under a fresh key prefix and queue of their own; runs examples/client.py's
``follow()`` against ``/hello/celery``; shows which process ran the handler; stops
both and deletes every Redis key under the prefix. The job takes
``CATCHALL_SECONDS`` (3 by default here). The exit status is the client's (1 as
well if the handler ran in a web process).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

from client import follow  # examples/client.py: this script's directory is on sys.path
from demo_support import HOST, exit_on_sigterm, free_port, stop, wait_for_web

ROOT = Path(__file__).resolve().parent.parent
REDIS_PORT = 6379
REDIS_DB = 12
REDIS_URL = f"redis://{HOST}:{REDIS_PORT}/{REDIS_DB}"
START_TIMEOUT = 20.0
DEFAULT_SECONDS = "3"  # the job's length, unless CATCHALL_SECONDS is set


def redis_up() -> bool:
    try:
        with socket.create_connection((HOST, REDIS_PORT), timeout=1):
            return True
    except OSError:
        return False


def start(command: list[str], env: dict[str, str], log: t.IO[bytes]) -> subprocess.Popen[bytes]:
    # A session of its own: a Ctrl-C meant for us does not reach it; we stop it below.
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def read(log: t.IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")


def wait_for_worker(worker: subprocess.Popen[bytes], log: t.IO[bytes]) -> str | None:
    """None once the worker says it is ready, else what went wrong."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            return f"the Celery worker exited with status {worker.returncode}"
        if " ready." in read(log):
            return None
        time.sleep(0.1)
    return f"the Celery worker was not ready in {START_TIMEOUT:g} s"


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux /proc; none elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return sorted(int(p) for p in text.split())


def handler_pid(prefix: str, task_id: str) -> int | None:
    """The pid of the process that ran the task, from its record in the store."""
    from flask_restful_async.stores.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        task = store.get(task_id)
    finally:
        store.close()
    if task is None or not task.worker:
        return None
    parts = task.worker.split(":")  # host:pid:random
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def delete_keys(prefix: str) -> int:
    import redis

    with redis.Redis(host=HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)


class Tee(io.StringIO):
    """Prints what it is written, and keeps it."""

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        return super().write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if not redis_up():
        print(f"error: Redis is not reachable at {HOST}:{REDIS_PORT}", flush=True)
        return 2
    sys.path.insert(0, str(ROOT))  # flask_restful_async, for handler_pid
    token = secrets.token_hex(6)
    prefix = f"{{restful_async_demo_{token}}}:"
    queue = f"restful_async_demo_{token}"
    seconds = os.environ.get("CATCHALL_SECONDS", DEFAULT_SECONDS)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "CATCHALL_SECONDS": seconds,
        "REDIS_URL": REDIS_URL,
        "RESTFUL_ASYNC_REDIS_PREFIX": prefix,
        "RESTFUL_ASYNC_CELERY_QUEUE": queue,
    }
    port = free_port()
    base = f"http://{HOST}:{port}"
    worker_command = [
        sys.executable, "-m", "celery", "-A", "examples.celery_app:celery", "worker",
        "-P", "threads", "-c", "4", "-Q", queue, "-n", f"demo-{token}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
    ]  # fmt: skip
    web_command = [
        sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4",
        "-b", f"{HOST}:{port}", "--log-level", "warning", "examples.celery_app:flask_app",
    ]  # fmt: skip
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryFile() as worker_log, tempfile.TemporaryFile() as web_log:
        try:
            worker = start(worker_command, env, worker_log)
            processes.append(worker)
            web = start(web_command, env, web_log)
            processes.append(web)
            error = wait_for_worker(worker, worker_log) or wait_for_web(web, port, START_TIMEOUT)
            if error is not None:
                print(f"error: {error}", flush=True)
                print(read(worker_log)[-3000:], read(web_log)[-3000:], sep="\n", flush=True)
                return 2
            web_pids = [web.pid, *children(web.pid)]
            print(
                f"gunicorn serves examples/celery_app.py on {base} (pids {web_pids}: the\n"
                f"arbiter and 2 workers); a Celery worker (pid {worker.pid}, -P threads -c 4)\n"
                f"runs the jobs. Broker and store: {REDIS_URL},\nkeys under {prefix},"
                f" queue {queue}.\nGET /hello/celery starts a {seconds} s job: the web server"
                " answers 202 Accepted at once\nand sends it to the worker; the client polls"
                " the Location every Retry-After seconds.\n",
                flush=True,
            )
            out = Tee()
            code = follow(base + "/hello/celery", out=out)
            match = re.search(r"Location: \S*/status/(\S+)", out.getvalue())
            ran_in = handler_pid(prefix, match.group(1)) if match else None
            print()
            for line in read(worker_log).splitlines():
                if "processing task" in line:  # the app's log lines
                    print(f"worker log: {line.strip()}")
            if ran_in is not None:
                where = (
                    "the Celery worker"
                    if ran_in == worker.pid
                    else "a web process!"
                    if ran_in in web_pids
                    else "another process"
                )
                print(f"The handler ran in pid {ran_in}: {where} (web pids: {web_pids})")
                if ran_in in web_pids:
                    code = code or 1
            return code
        except KeyboardInterrupt:
            print("interrupted: stopping the servers", flush=True)
            return 130
        finally:
            for process in reversed(processes):
                stop(process)
            with contextlib.suppress(Exception):
                deleted = delete_keys(prefix)
                print(f"Stopped gunicorn and the worker; deleted {deleted} Redis keys.")


if __name__ == "__main__":
    sys.exit(main())
