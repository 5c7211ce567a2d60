"""A fault run: submits under load while the Redis store is stopped and started
again, and while a gunicorn worker is SIGKILLed; then every accepted task must
end ``succeeded`` with the right result, ``failed``, ``cancelled`` or ``lost``,
none ``queued`` or ``running`` 2 x ``RESTFUL_ASYNC_LEASE`` after the load.

Runs ``tests/apps/tasks_app.py`` under ``gunicorn -k gthread`` on a private
redis-server (never the shared one) that is stopped with ``SHUTDOWN SAVE`` and
started again on the same port and folder, its data kept, as a restart does.
Client threads submit ``/jobs/echo`` (a payload of their own, which the result
must echo) and ``/jobs/sleep`` (which reports progress per step) at a steady
rate. The timeline, as fractions of ``--duration``: the store stops at 0.25 for
``--outage`` seconds; a worker is killed at 0.6.

    python tests/benchmarks/fault_run.py --duration 60

Prints the tasks (accepted, refused with 503, unanswered), their outcomes, and
the time from the end of the load until no task read queued or running; exits
1 if any task is still active after 2 x lease, or a result is wrong.
``tests/test_fault_run.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
import typing as t
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.servers import http as send
from tests.servers import serve
from tests.services import RestartableRedis, free_port


@dataclasses.dataclass
class Submitted:
    location: str
    kind: str
    expected: t.Any
    outcome: str | None = None
    settled_at: float | None = None
    # For a lost task: whether it had started (it was running, not waiting).
    started: bool = False


@dataclasses.dataclass
class Report:
    duration: float
    lease: float
    accepted: int = 0
    refused: int = 0
    unanswered: int = 0
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    wrong: list[str] = dataclasses.field(default_factory=list)
    active: list[str] = dataclasses.field(default_factory=list)
    settle_seconds: float = 0.0
    events: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.active and not self.wrong

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        lines = [
            f"fault run of {self.duration:.0f} s, lease {self.lease:g} s",
            *(f"  {event}" for event in self.events),
            f"tasks accepted (202): {self.accepted}; refused (503): {self.refused};"
            f" no answer (worker killed mid-request): {self.unanswered}",
            f"outcomes: {outcomes}",
            f"wrong results: {len(self.wrong)}",
            f"still queued or running {2 * self.lease:g} s after the load: {len(self.active)}",
            f"time to settle after the load: {self.settle_seconds:.2f} s",
        ]
        return lines


def classify(status: int, body: bytes, task: Submitted) -> str | None:
    """The outcome a final answer tells, or None while the task is active."""
    if status == 202 or status == 503:
        return None
    document = json.loads(body) if body else None
    if status == 200:
        assert isinstance(document, dict)
        result = {key: value for key, value in document.items() if key != "pid"}
        return "succeeded" if result == task.expected else "wrong"
    if status == 409:
        return "cancelled"
    if isinstance(document, dict) and document.get("state") == "lost":
        task.started = document.get("started_at") is not None
        return "lost"
    return "failed"


def run(
    duration: float = 60.0,
    *,
    outage: float = 5.0,
    lease: float = 10.0,
    workers: int = 2,
    clients: int = 4,
    rate: float = 40.0,
    log: t.Callable[[str], None] = print,
) -> Report:
    """Run the fault run; see the module documentation."""
    report = Report(duration=duration, lease=lease)
    with tempfile.TemporaryDirectory(prefix="fault-run-") as folder:
        root = Path(folder)
        (root / "redis").mkdir()
        with RestartableRedis(free_port(), root / "redis") as redis:
            env = {
                "TASKS_APP_INSTANCE": str(root / "instance"),
                "FLASK_RESTFUL_ASYNC_STORE": redis.url,
                "FLASK_RESTFUL_ASYNC_LEASE": str(lease),
                "FLASK_RESTFUL_ASYNC_MAX_PENDING": "256",
            }
            with serve("gunicorn-gthread", "tests.apps.tasks_app:app", env=env, workers=workers,
                       threads=8) as base:  # fmt: skip
                submitted = _load(base, redis, report, duration, outage, clients, rate, log)
                _settle(base, submitted, report, lease)
    return report


def _load(
    base: str,
    redis: RestartableRedis,
    report: Report,
    duration: float,
    outage: float,
    clients: int,
    rate: float,
    log: t.Callable[[str], None],
) -> list[Submitted]:
    submitted: list[Submitted] = []
    lock = threading.Lock()
    started = time.monotonic()
    stop = threading.Event()

    def note(event: str) -> None:
        line = f"{time.monotonic() - started:5.1f} s: {event}"
        report.events.append(line)
        log(line)

    def client(number: int) -> None:
        pause = clients / rate
        count = 0
        while not stop.is_set():
            count += 1
            kind: str
            expected: dict[str, t.Any]
            if count % 4 == 0:  # a quarter sleep, reporting progress per step
                seconds = round(0.1 + (count % 5) * 0.2, 1)
                kind, path, body = "sleep", f"/jobs/sleep?seconds={seconds}", b"{}"
                expected = {"slept": seconds}
            else:
                payload = {"client": number, "n": count, "token": secrets.token_hex(8)}
                kind, path, body = "echo", "/jobs/echo", json.dumps(payload).encode()
                expected = {"echo": payload}
            try:
                status, headers, _ = send(
                    "POST", base + path, body=body,
                    headers={"Content-Type": "application/json"}, timeout=10,
                )  # fmt: skip
            except (OSError, http.client.HTTPException):
                with lock:
                    report.unanswered += 1
            else:
                with lock:
                    if status == 202:
                        report.accepted += 1
                        submitted.append(Submitted(headers["location"], kind, expected))
                    elif status == 503:
                        report.refused += 1
                    else:
                        raise AssertionError(f"submit answered {status}")
            stop.wait(pause)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(duration * 0.25)
        note("Redis store stopped (SHUTDOWN SAVE)")
        redis.stop()
        time.sleep(outage)
        redis.start()
        note(f"Redis store started again after {outage:g} s, its data loaded")
        time.sleep(max(0.0, duration * 0.6 - (time.monotonic() - started)))
        _, _, body = send("GET", base + "/pid")
        pid = json.loads(body)["pid"]
        os.kill(pid, signal.SIGKILL)
        note(f"gunicorn worker {pid} SIGKILLed")
        time.sleep(max(0.0, duration - (time.monotonic() - started)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    note(f"load ended: {report.accepted} tasks accepted")
    return submitted


def _settle(base: str, submitted: list[Submitted], report: Report, lease: float) -> None:
    load_ended = time.monotonic()
    deadline = load_ended + 2 * lease
    active = list(submitted)
    while True:
        still: list[Submitted] = []
        for task in active:
            url = urllib.parse.urljoin(base + "/", task.location)
            try:
                status, _, body = send("GET", url, timeout=10)
            except (OSError, http.client.HTTPException):
                still.append(task)
                continue
            outcome = classify(status, body, task)
            if outcome is None:
                still.append(task)
            else:
                task.outcome, task.settled_at = outcome, time.monotonic()
        active = still
        if not active or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    report.active = [task.location for task in active]
    for task in submitted:
        if task.outcome == "wrong":
            report.wrong.append(task.location)
        report.outcomes[task.outcome or "still active"] += 1
    settled = [task.settled_at for task in submitted if task.settled_at is not None]
    report.settle_seconds = max(settled, default=load_ended) - load_ended


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds the store is down")
    parser.add_argument("--lease", type=float, default=10.0, help="RESTFUL_ASYNC_LEASE")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--rate", type=float, default=40.0, help="submits per second")
    options = parser.parse_args()
    report = run(
        options.duration,
        outage=options.outage,
        lease=options.lease,
        workers=options.workers,
        clients=options.clients,
        rate=options.rate,
        log=lambda line: print(line, flush=True),
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
