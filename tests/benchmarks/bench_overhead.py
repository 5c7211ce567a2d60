"""What AsyncResource costs over a plain Resource, through Flask's test client.

Timed in one process, in interleaved rounds so that drift of the machine hits
every operation alike:

- ``plain POST``: a plain ``Resource`` answering a JSON body synchronously;
- ``submit``: the same handler on an ``AsyncResource``, until the 202. This is
  what the request thread spends: the tasks wait at a gate while it is timed, so
  that their work (which a real deployment runs on other threads, cores or
  machines) does not land on this figure;
- ``submit, work alongside``: the same, with the tasks running in this process
  at the same time and sharing its GIL;
- ``submit+run``: a submit round until its last task has finished: the whole
  cost of the work, not what the client waits for;
- ``plain GET``: a plain ``Resource`` returning the finished task's result;
- ``poll``: ``GET`` on the status URL of that finished task.

Run with ``make bench``. Prints the median over rounds of the mean time per
request, and the ratios the README quotes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchstores import bench_store
from flask import Flask, request
from flask_restful import Api, Resource

from flask_restful_async import AsyncResource, TaskState, register_async
from flask_restful_async.state import get_state
from flask_restful_async.stores import TaskStore

BODY = {"customer": 42, "items": [{"sku": f"sku-{i}", "qty": i} for i in range(10)]}
RESULT = {"accepted": 10, "customer": 42, "total": 45}

# Open except while the request-thread cost of a submit is timed.
GATE = threading.Event()
GATE.set()


def summarize() -> dict[str, int]:
    order = request.get_json()
    return {
        "accepted": len(order["items"]),
        "customer": order["customer"],
        "total": sum(item["qty"] for item in order["items"]),
    }


class PlainOrders(Resource):
    def post(self) -> t.Any:
        return summarize()


class AsyncOrders(AsyncResource):
    def post(self) -> t.Any:
        GATE.wait(60)
        return summarize()


class PlainResult(Resource):
    def get(self) -> t.Any:
        return RESULT


def make_app(store: TaskStore | str) -> Flask:
    app = Flask(__name__)
    app.config["RESTFUL_ASYNC_MAX_PENDING"] = 1_000_000
    api = Api(app)
    register_async(api, store=store)
    api.add_resource(PlainOrders, "/plain/orders")
    api.add_resource(AsyncOrders, "/orders")
    api.add_resource(PlainResult, "/plain/result")
    return app


def drain(app: Flask) -> None:
    """Wait until every submitted task has finished, so rounds do not overlap."""
    store = get_state(app).store
    deadline = time.monotonic() + 120
    for state in (TaskState.QUEUED, TaskState.RUNNING):
        while store.list(owner=None, state=state, limit=1):
            if time.monotonic() > deadline:
                raise RuntimeError("tasks did not drain")
            time.sleep(0.005)


def timed(operation: t.Callable[[], t.Any], requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        operation()
    return (time.perf_counter() - start) / requests


def run(url: str, rounds: int, requests: int) -> dict[str, float]:
    with bench_store(url) as store:
        return run_on(store, rounds, requests)


def run_on(store: TaskStore | str, rounds: int, requests: int) -> dict[str, float]:
    app = make_app(store)
    client = app.test_client()
    location = client.post("/orders", json=BODY).headers["Location"]
    drain(app)
    assert client.get(location).json == RESULT
    assert client.get("/plain/result").json == RESULT

    def submit() -> None:
        assert client.post("/orders", json=BODY).status_code == 202

    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        round_samples = {
            "plain POST": timed(lambda: client.post("/plain/orders", json=BODY), requests)
        }
        GATE.clear()
        start = time.perf_counter()
        round_samples["submit"] = timed(submit, requests)
        GATE.set()
        drain(app)
        round_samples["submit+run"] = (time.perf_counter() - start) / requests
        round_samples["submit, work alongside"] = timed(submit, requests)
        drain(app)
        round_samples["plain GET"] = timed(lambda: client.get("/plain/result"), requests)
        round_samples["poll"] = timed(lambda: client.get(location), requests)
        for name, value in round_samples.items():
            samples.setdefault(name, []).append(value)
    get_state(app).executor.shutdown(timeout=10)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--store", default="memory://")
    options = parser.parse_args()
    medians = run(options.store, options.rounds, options.requests)
    print(f"store {options.store}: median of {options.rounds} interleaved rounds")
    for name, seconds in medians.items():
        print(f"  {name:<24} {seconds * 1e6:8.1f} µs/request")
    post, get = medians["plain POST"], medians["plain GET"]
    print(f"  submit / plain POST                 = {medians['submit'] / post:.2f}")
    print(f"  poll / plain GET                    = {medians['poll'] / get:.2f}")
    print(f"  submit, work alongside / plain POST = {medians['submit, work alongside'] / post:.2f}")
    print(f"  submit+run / plain POST             = {medians['submit+run'] / post:.2f}")


if __name__ == "__main__":
    main()
