"""What AsyncResource costs over a plain Resource, through Flask's test client.

Timed in one process, each operation in blocks of 200 requests right after a
block of its plain counterpart, so that the machine's drift (10-20 % over
seconds here) hits both alike:

- ``plain POST``: a plain ``Resource`` answering a JSON body synchronously;
- ``submit``: the same handler on an ``AsyncResource``, until the 202. This is
  what the request thread spends: the tasks wait at a gate while it is timed, so
  that their work (which a real deployment runs on other threads, cores or
  machines) does not land on this figure; they run (untimed) after each pair of
  blocks, so that every block starts from the same empty queue;
- ``submit, work alongside``: the same, with the tasks running in this process
  at the same time and sharing its GIL;
- ``submit+run``: a block of submits until its last task has finished: the whole
  cost of the work, not what the client waits for;
- ``plain GET``: a plain ``Resource`` returning the finished task's result;
- ``poll``: ``GET`` on the status URL of that finished task;
- ``floor POST`` and ``floor GET``: the plain ``Resource`` again, which also writes
  (POST) or reads (GET) one small row of a SQLite file set up as the default store
  sets up its own (WAL, ``synchronous = NORMAL``): a three-column row in a table with
  no other index, one statement, committed on its own. No store can keep a task
  across processes and restarts for less, so ``floor POST / plain POST`` is the
  least a submit that keeps its ``202`` durable can cost, and ``floor GET / plain
  GET`` the least a poll of a task kept there can.

``--traces`` sets up OpenTelemetry traces: ``off`` (``RESTFUL_ASYNC_TRACES =
False``), ``absent`` (as if opentelemetry were not installed), ``sdk`` (the SDK
as tracer provider, spans dropped at their end, and a span per request for plain
and async requests alike, as a web framework's instrumentation makes); ``api``
leaves the app as ``register_async`` sets it up (traces on when opentelemetry-api
is importable, no-op spans without an SDK); without it, traces are off.

``--signals`` connects a receiver that does nothing to every signal of the app
(what a receiver costs before it does anything); ``--metrics`` turns the
Prometheus metrics on (``RESTFUL_ASYNC_METRICS``; off otherwise), whose
receivers count every submit and end.

``--body-size N`` pads the JSON body to N bytes (a ``note`` string beside the
order; default: the order alone, about 300 bytes; 0: ``{"x": 1}``), to see what
the size of a request costs a submit, which copies and stores it.

Run with ``make bench``. Prints the median time per request over blocks, and the
ratios the README quotes: for each operation, the median over all pairs of
adjacent blocks of (operation / plain counterpart).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchstores import bench_store
from flask import Flask, request
from flask_restful import Api, Resource

from flask_restful_async import AsyncResource, TaskState, register_async, signals
from flask_restful_async.state import get_state
from flask_restful_async.stores import TaskStore

ORDER = {"customer": 42, "items": [{"sku": f"sku-{i}", "qty": i} for i in range(10)]}
#: The small body (``--body-size 0``).
SMALL = {"x": 1}
RESULT = {"accepted": 10, "customer": 42, "total": 45}

#: Requests per block: each ratio compares two blocks timed one right after the other.
BLOCK = 200


# Open except while the request-thread cost of a submit is timed.
GATE = threading.Event()
GATE.set()


def summarize() -> dict[str, int]:
    order = request.get_json()
    items = order.get("items", [])
    return {
        "accepted": len(items),
        "customer": order.get("customer"),
        "total": sum(item["qty"] for item in items),
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


class Floor:
    """The least a durable record costs: one row of a SQLite file, written or read
    by one statement on a connection of this thread (see the module's doc)."""

    def __init__(self) -> None:
        self.directory = tempfile.TemporaryDirectory(prefix="bench-floor-")
        self.path = os.path.join(self.directory.name, "floor.db")
        self._local = threading.local()
        self.key = secrets.token_urlsafe(16)
        self.connection().execute("INSERT INTO rows VALUES (?, 'succeeded', 0)", (self.key,))

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS rows"
                " (id TEXT PRIMARY KEY, state TEXT, created_at REAL) WITHOUT ROWID"
            )
            self._local.conn = conn
        return conn

    def write(self) -> None:
        self.connection().execute(
            "INSERT INTO rows VALUES (?, 'queued', ?)", (secrets.token_urlsafe(16), time.time())
        )

    def read(self) -> None:
        row = self.connection().execute("SELECT state FROM rows WHERE id = ?", (self.key,))
        assert row.fetchone() is not None


FLOOR = Floor()


class FloorOrders(Resource):
    def post(self) -> t.Any:
        FLOOR.write()
        return summarize()


class FloorResult(Resource):
    def get(self) -> t.Any:
        FLOOR.read()
        return RESULT


def padded(size: int) -> dict[str, t.Any]:
    """The order as a JSON body of ``size`` bytes (at least the order's own size)."""
    pad = max(0, size - len(json.dumps({**ORDER, "note": ""})))
    return {**ORDER, "note": "x" * pad}


def ignore(sender: Flask, **kwargs: t.Any) -> None:
    """A receiver that does nothing."""


def make_app(
    store: TaskStore | str,
    *,
    traces: str | None = None,
    with_signals: bool = False,
    metrics: bool = False,
) -> Flask:
    app = Flask(__name__)
    app.config["RESTFUL_ASYNC_METRICS"] = metrics
    if traces is None or traces == "off":
        app.config["RESTFUL_ASYNC_TRACES"] = False
    elif traces == "sdk":
        trace_requests(app)
    app.config["RESTFUL_ASYNC_MAX_PENDING"] = 1_000_000
    app.config["RESTFUL_ASYNC_MAX_PENDING_BYTES"] = 1 << 40
    # What a submit costs the request thread, without waiting for its task: the
    # tasks are held at a gate while submits are timed.
    app.config["RESTFUL_ASYNC_SHORT_WAIT"] = 0
    api = Api(app)
    register_async(api, store=store)
    api.add_resource(PlainOrders, "/plain/orders")
    api.add_resource(AsyncOrders, "/orders")
    api.add_resource(PlainResult, "/plain/result")
    api.add_resource(FloorOrders, "/floor/orders")
    api.add_resource(FloorResult, "/floor/result")
    if with_signals:
        for signal in (
            signals.task_submitted,
            signals.task_started,
            signals.task_progress,
            signals.task_finished,
            signals.task_rejected,
        ):
            signal.connect(ignore, sender=app)
    return app


def trace_requests(app: Flask) -> None:
    """The SDK as tracer provider (spans recorded, exported nowhere), and a span
    around every request of ``app``."""
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("bench_overhead")

    @app.before_request
    def start() -> None:
        span = tracer.start_span(request.path)
        request.environ["bench.span"] = span
        request.environ["bench.token"] = context.attach(trace.set_span_in_context(span))

    @app.teardown_request
    def end(error: BaseException | None) -> None:
        if "bench.span" in request.environ:  # not in a task's replayed request
            request.environ["bench.span"].end()
            context.detach(request.environ["bench.token"])


def drain(app: Flask) -> None:
    """Wait until every submitted task has finished, so rounds do not overlap."""
    store = get_state(app).store
    deadline = time.monotonic() + 120
    for state in (TaskState.QUEUED, TaskState.RUNNING):
        while store.list(owner=None, state=state, limit=1):
            if time.monotonic() > deadline:
                raise RuntimeError("tasks did not drain")
            time.sleep(0.005)


#: What a block is timed with: wall time, or (``--clock thread``) the CPU time of
#: the requesting thread, which other processes of a busy machine do not inflate.
CLOCK: t.Callable[[], float] = time.perf_counter


def timed(operation: t.Callable[[], t.Any], requests: int) -> float:
    start = CLOCK()
    for _ in range(requests):
        operation()
    return (CLOCK() - start) / requests


def run(
    url: str,
    rounds: int,
    requests: int,
    block: int = BLOCK,
    body_size: int | None = None,
    **app_options: t.Any,
) -> Figures:
    with bench_store(url) as store:
        return run_on(store, rounds, requests, block, body_size, **app_options)


class Figures(t.NamedTuple):
    """Medians over rounds of the mean time per request, and medians of ratios."""

    seconds: dict[str, float]
    ratios: dict[str, float]


def paired(
    reference: t.Callable[[], t.Any],
    measured: t.Callable[[], t.Any],
    requests: int,
    block: int,
    between: t.Callable[[], t.Any] | None = None,
) -> tuple[list[float], list[float], list[float]]:
    """Alternate blocks of ``reference`` and ``measured`` requests, calling
    ``between`` (untimed) after each pair.

    This machine's speed drifts by 10-20 % over seconds (other processes,
    frequency, caches); a ratio of two blocks timed back to back cancels most of
    that, where a ratio of two long runs minutes apart would not.
    """
    references, measures, ratios = [], [], []
    for _ in range(max(1, requests // block)):
        before = timed(reference, block)
        after = timed(measured, block)
        references.append(before)
        measures.append(after)
        ratios.append(after / before)
        if between is not None:
            between()
    return references, measures, ratios


def run_on(
    store: TaskStore | str,
    rounds: int,
    requests: int,
    block: int = BLOCK,
    body_size: int | None = None,
    **app_options: t.Any,
) -> Figures:
    body = SMALL if body_size == 0 else padded(body_size) if body_size else ORDER
    app = make_app(store, **app_options)
    client = app.test_client()
    location = client.post("/orders", json=ORDER).headers["Location"]
    drain(app)
    assert client.get(location).json == RESULT
    assert client.get("/plain/result").json == RESULT
    plain = client.post("/plain/orders", json=body).json
    assert client.post("/floor/orders", json=body).json == plain
    assert client.get("/floor/result").json == RESULT

    def plain_post() -> None:
        client.post("/plain/orders", json=body)

    def submit() -> None:
        assert client.post("/orders", json=body).status_code == 202

    samples: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}

    def add(name: str, values: list[float]) -> None:
        samples.setdefault(name, []).extend(values)

    runs: list[float] = []

    def release() -> None:
        # The held tasks run and end before the next pair: each submit block is
        # timed from the same start, not on top of a growing pile.
        start = time.perf_counter()
        GATE.set()
        drain(app)
        runs.append(time.perf_counter() - start)
        GATE.clear()

    for _ in range(rounds):
        GATE.clear()
        runs.clear()
        posts, submits, submit_ratios = paired(plain_post, submit, requests, block, release)
        GATE.set()
        # From a block's first submit to its last task's end.
        if CLOCK is time.perf_counter:  # the tasks' own threads are not timed otherwise
            add("submit+run", [(sum(submits) * block + sum(runs)) / (len(submits) * block)])
        add("plain POST", posts)
        add("submit", submits)
        ratios.setdefault("submit / plain POST", []).extend(submit_ratios)
        posts, alongside, alongside_ratios = paired(plain_post, submit, requests, block)
        drain(app)
        add("submit, work alongside", alongside)
        ratios.setdefault("submit, work alongside / plain POST", []).extend(alongside_ratios)
        gets, polls, poll_ratios = paired(
            lambda: client.get("/plain/result"), lambda: client.get(location), requests, block
        )
        add("plain GET", gets)
        add("poll", polls)
        ratios.setdefault("poll / plain GET", []).extend(poll_ratios)
        posts, floors, floor_ratios = paired(
            plain_post, lambda: client.post("/floor/orders", json=body), requests, block
        )
        add("floor POST", floors)
        ratios.setdefault("floor POST / plain POST", []).extend(floor_ratios)
        gets, floors, floor_ratios = paired(
            lambda: client.get("/plain/result"),
            lambda: client.get("/floor/result"),
            requests,
            block,
        )
        add("floor GET", floors)
        ratios.setdefault("floor GET / plain GET", []).extend(floor_ratios)
    get_state(app).executor.shutdown(timeout=10)
    seconds = {name: statistics.median(values) for name, values in samples.items()}
    medians = {name: statistics.median(values) for name, values in ratios.items()}
    if "submit+run" in seconds:
        medians["submit+run / plain POST"] = seconds["submit+run"] / seconds["plain POST"]
    return Figures(seconds, medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--block", type=int, default=BLOCK)
    parser.add_argument("--store", default="memory://")
    parser.add_argument(
        "--body-size",
        type=int,
        default=None,
        help='bytes of the JSON body (0: {"x": 1}; default: the order, about 300 bytes)',
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="time blocks by wall time, or by the requesting thread's CPU time",
    )
    parser.add_argument(
        "--traces",
        choices=["off", "absent", "api", "sdk"],
        default=None,
        help="OpenTelemetry traces off, not installed, as set up, or with the SDK (see above)",
    )
    parser.add_argument(
        "--signals", action="store_true", help="connect a no-op receiver to every signal"
    )
    parser.add_argument("--metrics", action="store_true", help="turn the Prometheus metrics on")
    options = parser.parse_args()
    if options.traces == "absent":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    global CLOCK
    CLOCK = time.thread_time if options.clock == "thread" else time.perf_counter
    figures = run(
        options.store,
        options.rounds,
        options.requests,
        options.block,
        options.body_size,
        traces=options.traces,
        with_signals=options.signals,
        metrics=options.metrics,
    )
    pairs = options.rounds * max(1, options.requests // options.block)
    print(
        f"store {options.store}: {options.rounds} rounds of {options.requests} requests"
        f" per operation, in blocks of {options.block}"
        + (f", {options.body_size}-byte bodies" if options.body_size else "")
        + (', body {"x": 1}' if options.body_size == 0 else "")
        + (", thread CPU time" if options.clock == "thread" else "")
        + (f", traces {options.traces}" if options.traces else "")
        + (", no-op receivers on every signal" if options.signals else "")
        + (", metrics on" if options.metrics else "")
    )
    for name, seconds in figures.seconds.items():
        print(f"  {name:<24} {seconds * 1e6:8.1f} µs/request (median over blocks)")
    for name, ratio in figures.ratios.items():
        print(f"  {name:<36} = {ratio:.2f}")
    print(f"  (ratios: medians over {pairs} pairs of adjacent blocks; submit+run: of medians)")


if __name__ == "__main__":
    main()
