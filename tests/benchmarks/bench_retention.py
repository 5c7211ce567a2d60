"""Does a poll slow down as finished tasks pile up? 100 against 100,000 retained.

For each store, two apps: one whose store holds 100 finished tasks, one with
100,000; the same poll (``GET`` of a finished task's status URL) is timed in
interleaved rounds on both. Run with ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchstores import bench_store
from flask import Flask
from flask_restful import Api

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.stores import SQLiteStore, TaskStore
from flask_restful_async.task import StoredResponse, Task, new_task_id

RESPONSE = StoredResponse(200, [("Content-Type", "application/json")], b'{"rows": 42}\n')


class Report(AsyncResource):
    def post(self) -> t.Any:
        return {"rows": 42}


def fill(store: TaskStore, count: int) -> str:
    """Record ``count`` finished tasks (in bulk where the store allows); return one id."""
    now = time.time()
    ids = [new_task_id() for _ in range(count)]
    if isinstance(store, SQLiteStore):
        from flask_restful_async.stores.sqlite import _encode_headers

        headers = _encode_headers(RESPONSE.headers)
        conn = store._connection()
        conn.execute("BEGIN")
        for task_id in ids:
            result = conn.execute(
                "INSERT INTO results (status, headers, body) VALUES (?, ?, ?)",
                (RESPONSE.status, headers, RESPONSE.body),
            ).lastrowid
            conn.execute(
                "INSERT INTO tasks (id, state, created_at, started_at, finished_at, worker,"
                " result) VALUES (?, 'succeeded', ?, ?, ?, 'w', ?)",
                (task_id, now, now, now, result),
            )
        conn.execute("COMMIT")
    else:
        for task_id in ids:
            store.create(Task(id=task_id, worker="w"))
            store.start(task_id, "w")
            store.finish(task_id, TaskState.SUCCEEDED, RESPONSE)
    return ids[count // 2]


def make_app(url: TaskStore | str, folder: str) -> Flask:
    app = Flask(__name__, instance_path=folder)
    api = Api(app)
    register_async(api, store=url)
    api.add_resource(Report, "/reports")
    return app


def store_url(kind: str, folder: str, name: str) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{folder}/{name}.db"
    return kind  # a redis:// URL


def run(kind: str, rounds: int, requests: int, sizes: tuple[int, ...]) -> dict[int, float]:
    with tempfile.TemporaryDirectory() as folder:
        pollers: dict[int, t.Callable[[], t.Any]] = {}
        apps = []
        stores = contextlib.ExitStack()
        for size in sizes:
            url = store_url(kind, folder, f"n{size}")
            app = make_app(stores.enter_context(bench_store(url)), folder)
            apps.append(app)
            store = get_state(app).store
            store.renew_lease("w")
            location = f"/tasks/{fill(store, size)}"
            client = app.test_client()
            assert client.get(location).json == {"rows": 42}
            pollers[size] = lambda client=client, location=location: client.get(location)
        samples: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size, poll in pollers.items():
                start = time.perf_counter()
                for _ in range(requests):
                    poll()
                samples[size].append((time.perf_counter() - start) / requests)
        for app in apps:
            get_state(app).close()
        stores.close()
        return {size: statistics.median(values) for size, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stores", nargs="+", default=["memory", "sqlite"])
    options = parser.parse_args()
    small, large = 100, 100_000
    for kind in options.stores:
        medians = run(kind, options.rounds, options.requests, (small, large))
        print(
            f"{kind}: poll with {small:,} retained {medians[small] * 1e6:.1f} µs,"
            f" with {large:,} {medians[large] * 1e6:.1f} µs,"
            f" ratio {medians[large] / medians[small]:.2f}"
        )


if __name__ == "__main__":
    main()
