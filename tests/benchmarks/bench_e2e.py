"""A whole task end to end, on real gunicorn, against a plain synchronous call.

The server is ``gunicorn -w 2 -k gthread --threads 8`` serving ``e2e_app.py``:
``POST /plain/work`` (a plain ``Resource``) and ``POST /work`` (an
``AsyncResource``) run the same handler, which sleeps 20 ms and returns a small
JSON document. 16 clients (threads of this process, each with one keep-alive
``http.client`` connection) make 1,000 calls between them, in each of the ways a
client can get a task's answer:

- ``sync``: ``POST /plain/work``, the reference;
- ``Prefer: wait``: ``POST /work`` with ``Prefer: wait=20``; a 202 is followed
  by ``GET <Location>?wait=20`` until the answer is final;
- ``GET ?wait``: ``POST /work``, then ``GET <Location>?wait=20`` until final;
- ``Retry-After``: ``POST /work``, then, as a well-behaved client does, sleep the
  ``Retry-After`` seconds of each 202 and ``GET <Location>``, until final.

Each way is run right after a ``sync`` run of its own (so that the machine's
drift hits both alike), in rounds; a figure is the median over rounds of the
ratio of that pair. Measured per call: wall time (the run's elapsed time over
the calls, with 16 calls in flight) and server CPU (user + system time of the
gunicorn master and its workers, their reaped children included, read from
``/proc/<pid>/stat`` before and after the run).

Every answer is checked: a call whose final answer is not the handler's ``200``
counts as an error and is reported.

Run with ``make bench-e2e``, or one store at a time (Redis under a prefix of its
own, whose keys are deleted afterwards)::

    .venv/bin/python tests/benchmarks/bench_e2e.py --store sqlite
    .venv/bin/python tests/benchmarks/bench_e2e.py --store redis://127.0.0.1:6379/12

``--config KEY=JSON`` sets a ``RESTFUL_ASYNC_*`` key of the served app (e.g.
``--config RESTFUL_ASYNC_SHORT_WAIT=0`` to see the figures without it).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.servers import serve  # noqa: E402

APP = "tests.benchmarks.e2e_app:app"
BODY = json.dumps({"x": 1}).encode()
EXPECTED = {"x": 1, "done": True}
JSON = {"Content-Type": "application/json"}
#: Seconds any single request may take before the run is abandoned.
REQUEST_TIMEOUT = 60.0

WAYS = ("Prefer: wait", "GET ?wait", "Retry-After")


class Client:
    """One keep-alive connection; reconnects when the server closed it while idle."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        self.reconnects = 0

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.conn.close()
                return response.status, response.headers, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A keep-alive connection the server closed while we slept (gunicorn's
                # --keep-alive is 2 s): nothing reached the app, so sending again on a
                # fresh connection is safe.
                self.conn.close()
                self.reconnects += 1
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def retry_after(headers: http.client.HTTPMessage) -> float:
    value = headers.get("Retry-After", "1")
    return float(value) if value.isdigit() else 1.0


def final(
    client: Client, status: int, headers: http.client.HTTPMessage, data: bytes, way: str
) -> bool:
    """Follow a submit's answer to the task's final answer; True if it is the handler's."""
    while status == 202:
        location = headers["Location"]
        if way == "Retry-After":
            time.sleep(retry_after(headers))
            status, headers, data = client.request("GET", location)
        else:
            status, headers, data = client.request("GET", location + "?wait=20")
    return status == 200 and json.loads(data) == EXPECTED


def one_call(client: Client, way: str) -> bool:
    if way == "sync":
        status, _, data = client.request("POST", "/plain/work", BODY, JSON)
        return status == 200 and json.loads(data) == EXPECTED
    headers = dict(JSON)
    if way == "Prefer: wait":
        headers["Prefer"] = "wait=20"
    status, answer, data = client.request("POST", "/work", BODY, headers)
    return final(client, status, answer, data, way)


def cpu_ticks(master: int) -> int:
    """utime + stime + cutime + cstime of the master and its children, in clock ticks."""
    total = 0
    for pid in [master, *children(master)]:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += sum(int(value) for value in fields[11:15])
    return total


def children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
                    found.append(int(entry))
    return found


class Run(t.NamedTuple):
    wall: float  # seconds per call
    cpu: float  # server CPU seconds per call
    errors: int


def run(port: int, master: int, way: str, calls: int, clients: int) -> Run:
    """``calls`` calls made by ``clients`` threads, each on its own connection."""
    left = iter(range(calls))
    lock = threading.Lock()
    errors = [0]
    failures: list[BaseException] = []

    def client_loop() -> None:
        client = Client(port)
        try:
            while True:
                with lock:
                    if next(left, None) is None:
                        return
                ok = one_call(client, way)
                if not ok:
                    with lock:
                        errors[0] += 1
        except BaseException as e:
            failures.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    ticks = cpu_ticks(master)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = (cpu_ticks(master) - ticks) / os.sysconf("SC_CLK_TCK")
    if failures:
        raise RuntimeError(f"{way}: {len(failures)} clients failed") from failures[0]
    return Run(elapsed / calls, cpu / calls, errors[0])


def warm_up(port: int, master: int, clients: int) -> None:
    """Connections, imports, the store's first writes and tasks' first runs."""
    for way in ("sync", *WAYS):
        run(port, master, way, 4 * clients, clients)


@contextlib.contextmanager
def server(store: str, config: dict[str, t.Any]) -> t.Iterator[tuple[int, int]]:
    """gunicorn on ``store`` (``sqlite``: the default store): (port, master pid)."""
    env = {f"FLASK_{key}": json.dumps(value) for key, value in config.items()}
    prefix = None
    with tempfile.TemporaryDirectory() as instance:
        env["BENCH_INSTANCE"] = instance
        if store != "sqlite":
            prefix = f"{{bench-e2e-{secrets.token_hex(6)}}}:"
            env["FLASK_RESTFUL_ASYNC_STORE"] = store
            env["FLASK_RESTFUL_ASYNC_REDIS_PREFIX"] = prefix
        pidfile = os.path.join(instance, "gunicorn.pid")
        try:
            with serve(
                "gunicorn-gthread",
                APP,
                env=env,
                workers=2,
                threads=8,
                options=("--pid", pidfile),
            ) as base:
                port = int(base.rsplit(":", 1)[1])
                yield port, int(Path(pidfile).read_text())
        finally:
            if prefix is not None:
                delete_keys(store, prefix)


def delete_keys(url: str, prefix: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def parse_config(items: list[str]) -> dict[str, t.Any]:
    config: dict[str, t.Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key.startswith("RESTFUL_ASYNC_"):
            raise SystemExit(f"--config takes RESTFUL_ASYNC_KEY=JSON, not {item!r}")
        config[key] = json.loads(value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite", help="sqlite (the default store) or redis://…")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--config", action="append", default=[], metavar="KEY=JSON")
    options = parser.parse_args()
    config = parse_config(options.config)
    ratios: dict[str, dict[str, list[float]]] = {
        way: {"wall": [], "cpu": []} for way in options.ways
    }
    seconds: dict[str, dict[str, list[float]]] = {
        way: {"wall": [], "cpu": []} for way in ("sync", *options.ways)
    }
    errors = 0
    with server(options.store, config) as (port, master):
        warm_up(port, master, options.clients)
        for _ in range(options.rounds):
            for way in options.ways:
                reference = run(port, master, "sync", options.calls, options.clients)
                measured = run(port, master, way, options.calls, options.clients)
                errors += reference.errors + measured.errors
                for name, done in (("sync", reference), (way, measured)):
                    seconds[name]["wall"].append(done.wall)
                    seconds[name]["cpu"].append(done.cpu)
                ratios[way]["wall"].append(measured.wall / reference.wall)
                ratios[way]["cpu"].append(measured.cpu / reference.cpu if reference.cpu else 0.0)
    settings = ", ".join(f"{k}={v!r}" for k, v in config.items())
    print(
        f"store {options.store}: gunicorn -w 2 -k gthread --threads 8, {options.clients}"
        f" keep-alive clients, {options.calls} calls of a 20 ms handler per run,"
        f" {options.rounds} rounds" + (f"; {settings}" if settings else "")
    )
    for name, values in seconds.items():
        wall = statistics.median(values["wall"]) * 1e3
        cpu = statistics.median(values["cpu"]) * 1e6
        print(f"  {name:<14} wall {wall:7.2f} ms/call   server CPU {cpu:7.0f} µs/call")
    for way, values in ratios.items():
        wall = statistics.median(values["wall"])
        cpu = statistics.median(values["cpu"])
        spread = ", ".join(f"{r:.2f}" for r in values["wall"])
        print(f"  {way:<14} / sync: wall {wall:5.2f}  CPU {cpu:5.2f}   (wall by round: {spread})")
    print(f"  (medians over rounds; errors: {errors})")


if __name__ == "__main__":
    main()
