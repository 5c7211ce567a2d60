"""The Python client end to end: tasks through ``TaskClient`` against plain calls.

The server is ``bench_e2e.py``'s: ``gunicorn -w 2 -k gthread --threads 8`` serving
``e2e_app.py``, whose ``POST /plain/work`` (a plain ``Resource``) and ``POST /work``
(an ``AsyncResource``) run the same 20 ms handler, on the default SQLite store.
``--clients`` threads (4 by default), each with a ``TaskClient`` of its own, make
``--calls`` calls between them:

- ``plain``: ``client.post("/plain/work")``, which returns the ``200`` at once;
- ``task``: ``client.post("/work")``, then ``operation.result()`` (a long-poll);
  with ``--wait N``, ``client.post("/work", wait=N)``, which the server answers with
  the final response when the task ends within N seconds.

Both go through the same client, so that httpx's own cost is on both sides. Runs
alternate plain, task, plain, task... (``--rounds`` pairs) so that the machine's
drift hits both alike. Per pair: the ratio of wall times, the ratio of median
latencies (one call: from the submit to the final response), and the HTTP requests
per task (counted by an httpx event hook). Every answer is checked.

Run it with ``make bench-client``, or::

    .venv/bin/python tests/benchmarks/bench_client.py [--calls 1000] [--clients 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from flask_restful_async.client import Operation, TaskClient  # noqa: E402
from tests.servers import serve  # noqa: E402

APP = "tests.benchmarks.e2e_app:app"
EXPECTED = {"x": 1, "done": True}


@dataclass
class Run:
    wall: float
    latencies: list[float]
    requests: int
    errors: int


def one_call(client: TaskClient, way: str, wait: int | None) -> bool:
    if way == "plain":
        answer = client.post("/plain/work", json={"x": 1})
    else:
        answer = client.post("/work", json={"x": 1}, wait=wait)
    response = answer.result(timeout=60) if isinstance(answer, Operation) else answer
    return response.status_code == 200 and response.json() == EXPECTED


def run(base: str, way: str, calls: int, clients: int, wait: int | None = None) -> Run:
    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    remaining = [calls]

    def count(request: httpx.Request) -> None:
        with lock:
            counts["requests"] += 1

    def loop() -> None:
        with TaskClient(base, event_hooks={"request": [count]}) as client:
            while True:
                with lock:
                    if not remaining[0]:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                ok = one_call(client, way, wait)
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
                    counts["errors"] += not ok

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Run(time.perf_counter() - started, latencies, counts["requests"], counts["errors"])


def describe(done: Run) -> str:
    median = statistics.median(done.latencies) * 1e3
    return f"{done.wall:6.2f} s, median {median:5.1f} ms, {done.requests} requests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--wait", type=int, metavar="N", help="submit with wait=N (Prefer: wait=N) too"
    )
    options = parser.parse_args()
    walls: list[float] = []
    medians: list[float] = []
    per_task: list[float] = []
    errors = 0
    with tempfile.TemporaryDirectory() as instance:
        env = {"BENCH_INSTANCE": instance}
        with serve("gunicorn-gthread", APP, env=env, workers=2, threads=8) as base:
            # Connections, imports, the store's first writes, the run-time estimates.
            for way in ("plain", "task"):
                run(base, way, 20 * options.clients, options.clients)
            for _ in range(options.rounds):
                plain = run(base, "plain", options.calls, options.clients)
                task = run(base, "task", options.calls, options.clients, options.wait)
                errors += plain.errors + task.errors
                walls.append(task.wall / plain.wall)
                medians.append(
                    statistics.median(task.latencies) / statistics.median(plain.latencies)
                )
                per_task.append(task.requests / options.calls)
                print(f"  plain {describe(plain)} | task {describe(task)}", flush=True)

    def span(values: list[float]) -> str:
        return f"{min(values):.2f} to {max(values):.2f}"

    print(
        f"gunicorn -w 2 -k gthread --threads 8, SQLite store; {options.clients} client threads,"
        f" {options.calls} calls of a 20 ms handler per run, {options.rounds} ABAB rounds"
        + (f"; submits with wait={options.wait}" if options.wait else "")
    )
    print(f"  task / plain: wall {span(walls)}, median latency {span(medians)}")
    print(f"  HTTP requests per task: {span(per_task)}   (errors: {errors})")


if __name__ == "__main__":
    main()
