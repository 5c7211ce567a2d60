"""Our CeleryExecutor against raw Celery, through the same broker and worker.

One Celery worker subprocess (``-P threads -c 4``) serves this module; Redis
database 12 on 127.0.0.1:6379 is the broker, our task store and (for the raw task
only) Celery's result backend, every key under a fresh prefix, deleted at the end.

Four ways through, one after the other in every iteration (so the machine's
drift hits all alike):

- ``raw``: ``apply_async`` of a no-op task of the same Celery app, then
  ``AsyncResult.get(timeout=10)`` (Celery's result backend, on Redis pub/sub).
- ``executor``: the same round trip through our executor: the task recorded in
  the store, handed to :class:`CeleryExecutor` (the message carries the request),
  replayed in the worker through the ``AsyncResource`` and its ``Api``, its
  response stored, and awaited as a long-poll does (news on Redis pub/sub). What
  Flask does around a request in the web process is left out, as raw Celery has
  no such part; the worker's replay of the request is in.
- ``http, Prefer: wait``: ``POST /noop`` with ``Prefer: wait=10`` through an
  in-process Flask test client: one request answers with the result.
- ``http, POST + GET ?wait``: ``POST /noop``, then ``GET <Location>?wait=10``.

Latency: the median of N sequential round trips each. Throughput: N tasks
submitted back to back, then all awaited (tasks/s), in rounds where each way
goes first in turn; the ratio is the median over rounds of (way / raw). Run
with ``make bench-celery``; prints figures, asserts nothing. Needs Redis.

The worker imports this module as ``tests.benchmarks.bench_celery`` and builds
its apps from ``BENCH_CELERY_PREFIX`` and ``BENCH_CELERY_QUEUE``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402
from flask import Flask  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402
from flask_restful import Api  # noqa: E402

from flask_restful_async import AsyncResource, register_async  # noqa: E402
from flask_restful_async.celery import CeleryExecutor, make_celery  # noqa: E402
from flask_restful_async.stores.redis import RedisStore  # noqa: E402
from flask_restful_async.task import Task  # noqa: E402
from tests.services import celery_worker, delete_redis_keys  # noqa: E402

REDIS_DB = 12
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PREFIX_ENV = "BENCH_CELERY_PREFIX"
QUEUE_ENV = "BENCH_CELERY_QUEUE"
RAW_TASK = "bench_celery.noop"
RESULT = {"ok": True, "n": 42}


class Noop(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return RESULT


def create_app(prefix: str, queue: str) -> tuple[Flask, Celery, t.Any]:
    """The Flask app (``POST /noop``), its Celery app, and the raw no-op task."""
    app = Flask(__name__)
    app.config.update(
        CELERY_BROKER_URL=REDIS_URL,
        CELERY_RESULT_BACKEND=REDIS_URL,  # for the raw task: ours ignore results
        CELERY_CONFIG={
            "broker_transport_options": {"global_keyprefix": f"{prefix}kombu:"},
            "result_backend_transport_options": {"global_keyprefix": f"{prefix}result:"},
            "worker_enable_remote_control": False,
            "worker_send_task_events": False,
            "worker_hijack_root_logger": False,
        },
    )
    celery_app = make_celery(app)

    @celery_app.task(name=RAW_TASK)  # type: ignore[untyped-decorator,misc,unused-ignore]
    def noop() -> dict[str, t.Any]:
        return RESULT

    api = Api(app)
    register_async(
        api,
        store=RedisStore(REDIS_URL, prefix=prefix),
        executor=CeleryExecutor(celery_app, queue=queue),
        owner=lambda: None,
    )
    api.add_resource(Noop, "/noop")
    return app, celery_app, noop


_built: tuple[Flask, Celery, t.Any] | None = None


def __getattr__(name: str) -> t.Any:
    # PEP 562: what `celery -A tests.benchmarks.bench_celery:celery` finds, built on access.
    global _built
    if name != "celery":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _built is None:
        _built = create_app(os.environ[PREFIX_ENV], os.environ[QUEUE_ENV])
    return _built[1]


# -- the round trips -------------------------------------------------------------------


def ours_submit(client: FlaskClient, headers: dict[str, str] | None = None) -> t.Any:
    response = client.post("/noop", json={}, headers=headers)
    if response.status_code not in (200, 202):
        raise RuntimeError(f"submit answered {response.status_code}: {response.get_data()!r}")
    return response


def ours_wait(client: FlaskClient, location: str) -> None:
    check(client.get(location + "?wait=10"))


def check(response: t.Any) -> None:
    if response.status_code != 200 or response.get_json() != RESULT:
        raise RuntimeError(f"answered {response.status_code}: {response.get_data()!r}")


def http_two_requests(client: FlaskClient) -> None:
    ours_wait(client, ours_submit(client).headers["Location"])


def http_prefer_wait(client: FlaskClient) -> None:
    check(ours_submit(client, {"Prefer": "wait=10"}))


class Executor:
    """Submit and await through the executor and the store, as ``AsyncState.submit``
    and a long-poll do, without a request through Flask in this process.

    The request is one context pushed for the whole run: in a web process, Flask
    has made it before any of this library's code runs.
    """

    def __init__(self, app: Flask) -> None:
        from flask_restful_async.state import get_state

        self.app = app
        self.state = get_state(app)
        self.context = app.test_request_context("/noop", method="POST", json={})
        self.context.push()

    def close(self) -> None:
        self.context.pop()

    def submit(self) -> tuple[int, Task]:
        """Record and send a task; returns it with the waiters' ticket taken
        before, as a long-poll would hold them (the task as created is its read)."""
        from flask_restful_async import waiting
        from flask_restful_async.snapshot import RequestSnapshot
        from flask_restful_async.task import new_task_id

        store = self.state.store
        task = Task(id=new_task_id())
        ticket = waiting.ticket(store)
        snapshot = RequestSnapshot.capture(b"{}", "post", (), {})
        store.create(task)
        self.state.executor.submit(self.app, task, snapshot)
        return ticket, task

    def wait(self, read: tuple[int, Task]) -> None:
        from flask_restful_async import waiting

        task = read[1]
        done = waiting.wait_finished(self.state.store, task.id, 10, read=read)
        if done is None or done.response is None or done.response.status != 200:
            raise RuntimeError(f"task {task.id} ended as {done!r}")

    def round_trip(self) -> None:
        self.wait(self.submit())


def raw_wait(result: t.Any) -> None:
    value = result.get(timeout=10)
    result.forget()
    if value != RESULT:
        raise RuntimeError(f"raw task returned {value!r}")


WAYS = ("raw", "executor", "http, Prefer: wait", "http, POST + GET ?wait")
THROUGHPUT_WAYS = ("raw", "executor", "http, POST + GET ?wait")


def latency_round(
    client: FlaskClient, executor: Executor, noop: t.Any, queue: str, n: int
) -> dict[str, list[float]]:
    ways: dict[str, t.Callable[[], None]] = {
        "raw": lambda: raw_wait(noop.apply_async(queue=queue)),
        "executor": executor.round_trip,
        "http, Prefer: wait": lambda: http_prefer_wait(client),
        "http, POST + GET ?wait": lambda: http_two_requests(client),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(n):
        # A different order each time: whoever goes first meets a worker at rest.
        names = WAYS[i % 4 :] + WAYS[: i % 4]
        for name in names:
            start = time.perf_counter()
            ways[name]()
            times[name].append(time.perf_counter() - start)
    return times


def throughput(
    name: str, client: FlaskClient, executor: Executor, noop: t.Any, queue: str, n: int
) -> float:
    start = time.perf_counter()
    if name == "raw":
        results = [noop.apply_async(queue=queue) for _ in range(n)]
        for result in results:
            raw_wait(result)
    elif name == "executor":
        reads = [executor.submit() for _ in range(n)]
        for read in reads:
            executor.wait(read)
    else:
        locations = [ours_submit(client).headers["Location"] for _ in range(n)]
        for location in locations:
            ours_wait(client, location)
    return n / (time.perf_counter() - start)


# -- the worker and the keys -------------------------------------------------------------


def runs(values: list[float]) -> list[int]:
    return sorted(round(x) for x in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=200, help="latency round trips each (200)")
    parser.add_argument("--burst", type=int, default=300, help="tasks per throughput run (300)")
    parser.add_argument("--bursts", type=int, default=6, help="throughput runs each (6)")
    args = parser.parse_args()

    token = secrets.token_hex(6)
    prefix = f"{{restful_async_bench_{token}}}:"
    queue = f"restful_async_bench_{token}"
    env = {PREFIX_ENV: prefix, QUEUE_ENV: queue}
    options = ["-P", "threads", "-c", "4", "-l", "warning"]
    app, _, noop = create_app(prefix, queue)
    client = app.test_client()
    executor = Executor(app)
    spec = "tests.benchmarks.bench_celery:celery"
    try:
        with (
            tempfile.TemporaryFile() as log,
            celery_worker(spec, queue, options, env, log) as worker,
        ):
            try:
                # Warm up every path (the worker's start, its lease, the connections).
                deadline = time.monotonic() + 30
                while True:
                    try:
                        latency_round(client, executor, noop, queue, 4)
                        break
                    except Exception:
                        if worker.poll() is not None or time.monotonic() > deadline:
                            raise
                latency_round(client, executor, noop, queue, 20)

                latency: dict[str, list[float]] = {name: [] for name in WAYS}
                for name, values in latency_round(client, executor, noop, queue, args.n).items():
                    latency[name] += values
                rates: dict[str, list[float]] = {name: [] for name in THROUGHPUT_WAYS}
                for i in range(args.bursts):
                    # Each way first in turn: the machine's drift spreads over all.
                    k = i % len(THROUGHPUT_WAYS)
                    for name in THROUGHPUT_WAYS[k:] + THROUGHPUT_WAYS[:k]:
                        rate = throughput(name, client, executor, noop, queue, args.burst)
                        rates[name].append(rate)
            except BaseException:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
                raise
    finally:
        from flask_restful_async.state import get_state

        executor.close()
        get_state(app).close()
        delete_redis_keys(REDIS_DB, prefix)

    python = sys.version.split()[0]
    print(f"Celery worker -P threads -c 4, Redis db {REDIS_DB} as broker; Python {python}")
    raw_ms = statistics.median(latency["raw"]) * 1000
    print(f"latency, median of {args.n} sequential round trips each, interleaved:")
    for name in WAYS:
        ms = statistics.median(latency[name]) * 1000
        print(f"  {name:<24} {ms:7.2f} ms   {ms / raw_ms:5.2f}x raw")
    print(f"throughput, {args.burst} submitted then awaited, {args.bursts} runs each:")
    for name in THROUGHPUT_WAYS:
        rate = statistics.median(rates[name])
        # The ratio: median over the rounds of (this way / raw in the same round).
        ratio = statistics.median(x / r for x, r in zip(rates[name], rates["raw"], strict=True))
        print(f"  {name:<24} {rate:7.0f} tasks/s   {ratio:5.2f}x raw   {runs(rates[name])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
