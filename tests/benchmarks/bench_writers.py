"""Processes writing tasks to one SQLite file: how long each write takes, waits included.

``--processes`` processes (default 2) each run, for ``--seconds``, a loop of one
task's writes (a ``create``, then its ``finish`` with a small response) with
``--work`` microseconds of CPU work between two writes (what a request does
besides writing), through one ``SQLiteStore`` each. Printed per process: the
writes made, and the time of one write at the median, 99th and 99.9th
percentiles and at most.

A writer that finds another process's write under way waits in SQLite's busy
handler, which sleeps 1, 2, 5, 10 ms and on up to 100 ms between tries: what
the tail of this distribution shows. ``--rounds`` runs it again::

    .venv/bin/python tests/benchmarks/bench_writers.py --work 300
    .venv/bin/python tests/benchmarks/bench_writers.py --work 0 --rounds 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flask_restful_async.stores import SQLiteStore
from flask_restful_async.task import StoredResponse, Task, TaskState, new_task_id

RESPONSE = StoredResponse(
    200,
    [("Content-Type", "application/json"), ("Cache-Control", "no-store"), ("Vary", "Prefer")],
    b'{"x": 1, "done": true}\n',
)


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def writer(path: str, seconds: float, work: float, start: t.Any, results: t.Any) -> None:
    store = SQLiteStore(path)
    times: list[float] = []
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        task = Task(new_task_id(), TaskState.RUNNING, worker="bench")
        began = time.perf_counter()
        store.create(task)
        times.append(time.perf_counter() - began)
        busy(work)
        began = time.perf_counter()
        store.finish(task.id, TaskState.SUCCEEDED, RESPONSE)
        times.append(time.perf_counter() - began)
        busy(work)
    store.close()
    results.put(times)


def run(processes: int, seconds: float, work: float) -> list[list[float]]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/tasks.db"
        SQLiteStore(path).close()  # the file and its layout, before the writers start
        start, results = context.Event(), context.Queue()
        workers = [
            context.Process(target=writer, args=(path, seconds, work, start, results))
            for _ in range(processes)
        ]
        for each in workers:
            each.start()
        time.sleep(1.0)  # imports
        start.set()
        found = [results.get(timeout=seconds + 60) for _ in workers]
        for each in workers:
            each.join(10)
        return found


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    n = len(ordered)
    return (
        f"{n:7d} writes  median {statistics.median(ordered) * 1e6:6.0f} µs"
        f"  p99 {ordered[int(n * 0.99)] * 1e6:7.0f} µs"
        f"  p99.9 {ordered[int(n * 0.999)] * 1e3:6.1f} ms  max {ordered[-1] * 1e3:6.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--work", type=float, default=300.0, help="µs of CPU work between writes")
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    print(
        f"{options.processes} processes writing tasks (create, finish) for {options.seconds:g} s,"
        f" {options.work:g} µs of work between writes"
    )
    for _ in range(options.rounds):
        found = run(options.processes, options.seconds, options.work / 1e6)
        for number, times in enumerate(found, 1):
            print(f"  process {number}: {describe(times)}")


if __name__ == "__main__":
    main()
