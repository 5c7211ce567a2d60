"""What a Prometheus scrape costs the store: ``stats()`` (the per-state gauge and
the oldest queued task) with many tasks kept.

Fills a store with ``--tasks`` tasks (default 100,000): most ended within the
result's retention (succeeded, failed, cancelled), ``--active`` of them queued or
running. Then times ``store.stats()`` and, with prometheus-client installed, a
whole scrape of an app on that store (``generate_latest`` of a registry that
holds the store collector), each the median of ``--repeat`` calls.

    python tests/benchmarks/bench_scrape.py --store sqlite:///$(mktemp -d)/s.db
    python tests/benchmarks/bench_scrape.py --store redis://127.0.0.1:6379/12
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchstores import bench_store

from flask_restful_async.stores import TaskStore, open_store
from flask_restful_async.task import StoredResponse, Task, TaskState, new_task_id

ENDINGS = (TaskState.SUCCEEDED, TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)
RESPONSE = StoredResponse(200, [("Content-Type", "application/json")], b'{"total": 45}\n')
WORKER = "bench-scrape-worker"


def fill(store: TaskStore, tasks: int, active: int, threads: int = 8) -> None:
    store.renew_lease(WORKER)

    def one(i: int) -> None:
        task = store.create(
            Task(new_task_id(), worker=WORKER, endpoint="orders", method="POST", path="/orders")
        )
        if i < active:
            if i % 2:
                store.start(task.id, WORKER)
            return
        state = ENDINGS[i % len(ENDINGS)]
        store.finish(task.id, state, RESPONSE if state is not TaskState.CANCELLED else None)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(one, range(tasks), chunksize=500):
            pass


def median_ms(call: object, repeat: int) -> tuple[float, float, float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times), max(times)


def spread(ms: tuple[float, float, float], repeat: int) -> str:
    return f" (median of {repeat}; {ms[1]:.2f} to {ms[2]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--active", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=9)
    options = parser.parse_args()
    with bench_store(options.store) as given:
        store = open_store(given, None) if isinstance(given, str) else given  # type: ignore[arg-type]
        start = time.perf_counter()
        fill(store, options.tasks, options.active)
        print(
            f"{store.url}: {options.tasks} tasks ({options.active} active),"
            f" filled in {time.perf_counter() - start:.0f} s"
        )
        stats = store.stats()
        print("  counts:", {state.value: count for state, count in stats.counts.items()})
        ms = median_ms(store.stats, options.repeat)
        print(f"  stats()              {ms[0]:8.2f} ms" + spread(ms, options.repeat))
        try:
            from flask import Flask
            from flask_restful import Api
            from prometheus_client import CollectorRegistry, generate_latest

            from flask_restful_async import register_async
            from flask_restful_async.metrics import TaskStoreCollector
        except ImportError:
            return
        app = Flask(__name__)
        register_async(Api(app), store=store, owner=lambda: None)
        collector = TaskStoreCollector()
        collector.add(app)
        registry = CollectorRegistry()
        registry.register(collector)
        ms = median_ms(lambda: generate_latest(registry), options.repeat)
        print(f"  scrape of the gauges {ms[0]:8.2f} ms" + spread(ms, options.repeat))
        store.release_lease(WORKER)


if __name__ == "__main__":
    main()
