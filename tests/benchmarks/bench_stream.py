"""Event streams under load: many open streams on one gunicorn worker, many tasks
reporting progress in another process.

Two gunicorn servers share one store (the default SQLite file in a temporary
instance folder, or Redis under a prefix of its own, whose keys are deleted
afterwards), both serving ``stream_app.py``:

- the task server (``-w 1 -k gthread``) runs ``--tasks`` tasks (50), each
  reporting progress ``--rate`` times a second (10), every report written at once
  (``RESTFUL_ASYNC_PROGRESS_INTERVAL = 0``) with the time it was made as its
  message;
- the stream server (``-w 1``, ``-k gthread --threads N`` or ``-k gevent``) serves
  ``--streams`` event streams (200), as many on each task, which this process
  opens (plain sockets, one thread, ``selectors``) and reads.

Measured over ``--seconds`` (8) once every stream has its first event: the delay
from each progress write (the time in its message) to the moment its event is
read here (median, 90th and 99th percentile), the events read per second, and
the CPU time (user + system, from ``/proc``) of the stream server's processes:
in all, and per stream (milliseconds of CPU per second per stream).

    .venv/bin/python tests/benchmarks/bench_stream.py --store sqlite --worker gthread
    .venv/bin/python tests/benchmarks/bench_stream.py --store redis://127.0.0.1:6379/12 \
        --worker gevent

Not part of ``make test``: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import selectors
import socket
import statistics
import sys
import tempfile
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_e2e import cpu_ticks, delete_keys  # noqa: E402
from tests.servers import http, serve  # noqa: E402

APP = "tests.benchmarks.stream_app:app"


class Stream:
    """One event stream read from a socket (HTTP/1.0: no chunked encoding)."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        request = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        self.sock.sendall(request.encode())
        self.sock.setblocking(False)
        self.buffer = b""
        self.head = True
        self.events = 0
        self.closed = False

    def read(self, now: float, delays: list[float] | None) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            return
        self.buffer += data
        if self.head:
            if b"\r\n\r\n" not in self.buffer:
                return
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
                raise RuntimeError(f"stream refused: {head[:200]!r}")
            self.head = False
        *blocks, self.buffer = self.buffer.split(b"\n\n")
        for block in blocks:
            for line in block.split(b"\n"):
                if line.startswith(b"data: {"):
                    self.events += 1
                    doc = json.loads(line[6:])
                    progress = doc.get("progress")
                    if delays is not None and progress and doc.get("state") == "running":
                        delays.append(now - float(progress["message"]))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def servers(store: str, worker: str, streams: int, tasks: int) -> t.Iterator[tuple[str, str, int]]:
    """(task server URL, stream server URL, stream server master pid)."""
    config: dict[str, t.Any] = {
        "RESTFUL_ASYNC_PROGRESS_INTERVAL": 0,
        "RESTFUL_ASYNC_MAX_WORKERS": tasks + 4,
        "RESTFUL_ASYNC_SHORT_WAIT": 0,
        "RESTFUL_ASYNC_MAX_STREAM": 600,
    }
    prefix = None
    with tempfile.TemporaryDirectory() as instance, contextlib.ExitStack() as stack:
        if store != "sqlite":
            prefix = f"{{rfa-sse-bench-{secrets.token_hex(6)}}}:"
            config["RESTFUL_ASYNC_STORE"] = store
            config["RESTFUL_ASYNC_REDIS_PREFIX"] = prefix
            stack.callback(delete_keys, store, prefix)
        env = {f"FLASK_{key}": json.dumps(value) for key, value in config.items()}
        env["BENCH_INSTANCE"] = instance
        pidfile = os.path.join(instance, "streams.pid")
        task_base = stack.enter_context(
            serve("gunicorn-gthread", APP, env=env, threads=8, stop_timeout=15)
        )
        stream_base = stack.enter_context(
            serve(
                f"gunicorn-{worker}",
                APP,
                env=env,
                threads=streams + 16,
                options=("--pid", pidfile),
                stop_timeout=15,
            )
        )
        yield task_base, stream_base, int(Path(pidfile).read_text())


def run(options: argparse.Namespace) -> None:
    duration = options.seconds + 10  # connecting and warming up come first
    with servers(options.store, options.worker, options.streams, options.tasks) as (
        task_base,
        stream_base,
        master,
    ):
        locations = []
        for _ in range(options.tasks):
            status, headers, body = http(
                "POST", f"{task_base}/tick?seconds={duration}&rate={options.rate}", body=b""
            )
            if status != 202:
                raise RuntimeError(f"submit answered {status}: {body[:200]!r}")
            locations.append(headers["location"])
        port = int(stream_base.rsplit(":", 1)[1])
        selector = selectors.DefaultSelector()
        opened = []
        for number in range(options.streams):
            stream = Stream(port, locations[number % len(locations)])
            selector.register(stream.sock, selectors.EVENT_READ, stream)
            opened.append(stream)

        def pump(until: float, delays: list[float] | None) -> None:
            while (left := until - time.monotonic()) > 0:
                for key, _ in selector.select(min(left, 0.5)):
                    key.data.read(time.time(), delays)

        deadline = time.monotonic() + 30
        while any(stream.events == 0 for stream in opened):
            if time.monotonic() > deadline:
                raise RuntimeError("not every stream got its first event in 30 s")
            pump(time.monotonic() + 0.2, None)
        pump(time.monotonic() + 1.0, None)  # settle
        delays: list[float] = []
        events = sum(stream.events for stream in opened)
        ticks = cpu_ticks(master)
        start = time.monotonic()
        pump(start + options.seconds, delays)
        elapsed = time.monotonic() - start
        cpu = (cpu_ticks(master) - ticks) / os.sysconf("SC_CLK_TCK")
        events = sum(stream.events for stream in opened) - events
        closed = sum(stream.closed for stream in opened)
        for stream in opened:
            selector.unregister(stream.sock)
            stream.sock.close()
    writes = options.tasks * options.rate
    print(
        f"{options.store} {options.worker}: {options.streams} streams on {options.tasks} tasks,"
        f" {writes:g} progress writes/s"
    )
    if not delays:
        print("  no progress event was read")
        return
    median, p90, p99 = (
        statistics.median(delays) * 1000,
        percentile(delays, 0.9) * 1000,
        percentile(delays, 0.99) * 1000,
    )
    print(f"  delay write -> client: median {median:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms")
    expected = writes * options.streams / options.tasks
    print(
        f"  events read: {events / elapsed:.0f}/s (of {expected:g}/s written x streams per"
        f" task); streams closed early: {closed}"
    )
    print(
        f"  stream server CPU: {cpu / elapsed * 100:.0f} % of a core,"
        f" {cpu / elapsed / options.streams * 1000:.2f} ms/s per stream"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite", help="sqlite (the default store) or redis://…")
    parser.add_argument("--worker", choices=("gthread", "gevent"), default="gthread")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
