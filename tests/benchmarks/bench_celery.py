"""Our CeleryExecutor against raw Celery, through the same broker and worker.

One Celery worker subprocess (``-P threads -c 4``) serves this module; Redis
database 12 on 127.0.0.1:6379 is the broker, our task store and (for the raw task
only) Celery's result backend, every key under a fresh prefix, deleted at the end.

- ``ours``: ``POST /noop`` (an :class:`AsyncResource` returning a small JSON)
  through an in-process Flask test client, then ``GET <Location>?wait=10`` until
  the result: a task through :class:`CeleryExecutor` and the store.
- ``raw``: ``apply_async`` of an equivalent no-op task of the same Celery app,
  then ``AsyncResult.get(timeout=10)``.

Latency: the median of N sequential round trips each, interleaved in rounds.
Throughput: N tasks submitted back to back, then all awaited (tasks/s), the
median of a few alternating rounds. Run with ``make bench-celery``; prints
figures, asserts nothing. Needs Redis.

The worker imports this module as ``tests.benchmarks.bench_celery`` and builds
its apps from ``BENCH_CELERY_PREFIX`` and ``BENCH_CELERY_QUEUE``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
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


# -- the two round trips ---------------------------------------------------------------


def ours_submit(client: FlaskClient) -> str:
    response = client.post("/noop", json={})
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.get_data()!r}")
    return str(response.headers["Location"])


def ours_wait(client: FlaskClient, location: str) -> None:
    response = client.get(location + "?wait=10")
    if response.status_code != 200 or response.get_json() != RESULT:
        raise RuntimeError(f"{location} answered {response.status_code}: {response.get_data()!r}")


def raw_wait(result: t.Any) -> None:
    value = result.get(timeout=10)
    result.forget()
    if value != RESULT:
        raise RuntimeError(f"raw task returned {value!r}")


def latency_round(client: FlaskClient, noop: t.Any, queue: str, n: int) -> tuple[list[float], ...]:
    ours: list[float] = []
    raw: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        ours_wait(client, ours_submit(client))
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        raw_wait(noop.apply_async(queue=queue))
        raw.append(time.perf_counter() - start)
    return ours, raw


def throughput_ours(client: FlaskClient, n: int) -> float:
    start = time.perf_counter()
    locations = [ours_submit(client) for _ in range(n)]
    for location in locations:
        ours_wait(client, location)
    return n / (time.perf_counter() - start)


def throughput_raw(noop: t.Any, queue: str, n: int) -> float:
    start = time.perf_counter()
    results = [noop.apply_async(queue=queue) for _ in range(n)]
    for result in results:
        raw_wait(result)
    return n / (time.perf_counter() - start)


# -- the worker and the keys -------------------------------------------------------------


def delete_keys(prefix: str) -> int:
    import redis

    with redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=5) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def runs(values: list[float]) -> list[int]:
    return sorted(round(x) for x in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=200, help="latency round trips each (200)")
    parser.add_argument("--burst", type=int, default=400, help="tasks per throughput run (400)")
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds (10)")
    parser.add_argument("--bursts", type=int, default=3, help="throughput runs each (3)")
    args = parser.parse_args()

    token = secrets.token_hex(6)
    prefix = f"{{restful_async_bench_{token}}}:"
    queue = f"restful_async_bench_{token}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        PREFIX_ENV: prefix,
        QUEUE_ENV: queue,
    }
    command = [
        sys.executable, "-m", "celery", "-A", "tests.benchmarks.bench_celery:celery", "worker",
        "-P", "threads", "-c", "4", "-Q", queue, "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-l", "warning",
    ]  # fmt: skip
    app, _, noop = create_app(prefix, queue)
    client = app.test_client()
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # Warm up both paths (the worker's start, its lease, the connections).
            deadline = time.monotonic() + 30
            while True:
                try:
                    latency_round(client, noop, queue, 1)
                    break
                except Exception:
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise
            latency_round(client, noop, queue, 20)

            ours_lat: list[float] = []
            raw_lat: list[float] = []
            per_round = max(1, args.n // args.rounds)
            for _ in range(args.rounds):
                ours, raw = latency_round(client, noop, queue, per_round)
                ours_lat += ours
                raw_lat += raw
            ours_tp: list[float] = []
            raw_tp: list[float] = []
            for i in range(args.bursts):
                # alternate which goes first
                if i % 2:
                    raw_tp.append(throughput_raw(noop, queue, args.burst))
                    ours_tp.append(throughput_ours(client, args.burst))
                else:
                    ours_tp.append(throughput_ours(client, args.burst))
                    raw_tp.append(throughput_raw(noop, queue, args.burst))
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            try:
                stop(worker)
            finally:
                from flask_restful_async.state import get_state

                get_state(app).close()
                delete_keys(prefix)

    ours_ms = statistics.median(ours_lat) * 1000
    raw_ms = statistics.median(raw_lat) * 1000
    ours_s = statistics.median(ours_tp)
    raw_s = statistics.median(raw_tp)
    python = sys.version.split()[0]
    print(f"Celery worker -P threads -c 4, Redis db {REDIS_DB} as broker; Python {python}")
    print(f"latency, median of {len(ours_lat)} sequential round trips each ({args.rounds} rounds):")
    print(f"  ours (POST + GET ?wait=10)   {ours_ms:8.2f} ms")
    print(f"  raw  (apply_async + get)     {raw_ms:8.2f} ms")
    print(f"  ours/raw                     {ours_ms / raw_ms:8.2f}x")
    print(f"throughput, {args.burst} submitted then awaited, median of {args.bursts} runs each:")
    print(f"  ours                         {ours_s:8.0f} tasks/s   {runs(ours_tp)}")
    print(f"  raw                          {raw_s:8.0f} tasks/s   {runs(raw_tp)}")
    print(f"  ours/raw                     {ours_s / raw_s:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
