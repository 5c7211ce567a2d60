"""What ``current_task.progress()`` costs a handler that reports on every row.

A task on each store calls ``progress()`` in a tight loop for ``--seconds``,
then reports the calls it made, the store writes they caused, and the time per
call in microseconds. ``--interval`` is ``RESTFUL_ASYNC_PROGRESS_INTERVAL``: 0
writes every call (what progress() did before coalescing).

    python tests/benchmarks/bench_progress.py --stores sqlite redis://127.0.0.1:6379/12
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchstores import bench_store
from flask import Flask, current_app
from flask_restful import Api

from flask_restful_async import AsyncResource, current_task, register_async
from flask_restful_async.state import get_state


class Rows(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        seconds = current_app.config["BENCH_SECONDS"]
        calls = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            calls += 1
            current_task.progress(calls, total=None, message="rows")
        elapsed = time.perf_counter() - started
        current_app.config["BENCH_RESULT"] = (calls, elapsed)
        current_app.config["BENCH_DONE"].set()
        return {"calls": calls}


def measure(store_url: str, interval: float, seconds: float, folder: str) -> tuple[int, float, int]:
    with bench_store(store_url) as store:
        app = Flask("bench_progress", instance_path=folder)
        app.config.update(
            RESTFUL_ASYNC_PROGRESS_INTERVAL=interval,
            BENCH_SECONDS=seconds,
            BENCH_DONE=threading.Event(),
        )
        api = Api(app)
        register_async(api, store=store)
        api.add_resource(Rows, "/rows")
        writes = 0
        state = get_state(app)
        original = state.store.set_progress

        def counting(task_id: str, progress: t.Any) -> bool:
            nonlocal writes
            writes += 1
            return original(task_id, progress)

        state.store.set_progress = counting  # type: ignore[method-assign]
        try:
            response = app.test_client().post("/rows")
            assert response.status_code == 202, response.get_data()
            assert app.config["BENCH_DONE"].wait(seconds + 30)
            calls, elapsed = app.config["BENCH_RESULT"]
        finally:
            state.close()
        return calls, elapsed, writes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "redis://127.0.0.1:6379/12"])
    parser.add_argument("--intervals", nargs="+", type=float, default=[0.0, 0.25])
    parser.add_argument("--seconds", type=float, default=2.0)
    options = parser.parse_args()
    print(f"{'store':<28} {'interval':>8} {'calls':>9} {'writes':>7} {'us/call':>8}")
    for store in options.stores:
        for interval in options.intervals:
            with tempfile.TemporaryDirectory() as folder:
                url = "sqlite:///bench.db" if store == "sqlite" else store
                calls, elapsed, writes = measure(url, interval, options.seconds, folder)
            print(
                f"{store:<28} {interval:>8g} {calls:>9} {writes:>7} {elapsed / calls * 1e6:>8.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
