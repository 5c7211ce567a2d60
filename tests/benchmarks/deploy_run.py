"""A deploy run: submits under load while gunicorn reloads, restarts, loses a
worker or recycles its workers; then every accepted task must have run once.

Runs ``tests/apps/tasks_app.py`` under ``gunicorn -k gthread -w 4`` on the default
SQLite store or on Redis (the shared server, db 13, keys under a prefix of the
run's own, deleted afterwards). Client threads submit ``/jobs/count`` (which
appends its task id to a file, sleeps a little and echoes the JSON body) until
``--submits`` were accepted, retrying a refused or unanswered submit; every other
submit says ``Prefer: wait=5``, so that, once the endpoint's run time is known,
its task runs in the submit's request thread and the answer is its result. Once a
third were accepted, the scenario strikes:

``reload``
    ``kill -HUP`` on the master: new workers start, the old ones stop gracefully.
``restart``
    SIGTERM on the master; 5 s later a new server on the same store.
``kill``
    SIGKILL of one worker: only the tasks it was running may end ``lost``.
``max-requests``
    ``--max-requests 50`` all along: each worker is replaced after 50 requests.

Then every accepted task is polled until it ends. Prints the figures (accepted,
succeeded, lost, run twice); exits 1 if a task ended otherwise than expected.

    python tests/benchmarks/deploy_run.py reload --store redis
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
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
from http import client as http_client
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.fault_run import Report, Submitted, _settle, classify
from tests.servers import http, serve
from tests.services import delete_redis_keys

SCENARIOS = ("reload", "restart", "kill", "max-requests")
STORES = ("sqlite", "redis")
REDIS_DB = 13
#: Seconds between the SIGTERM of the master and the start of the new server.
RESTART_PAUSE = 5.0
#: Seconds after the load within which every task must have ended.
SETTLE = 30.0
#: The Prefer: wait=N of every other submit.
WAIT = 5


@dataclasses.dataclass
class DeployReport(Report):
    scenario: str = ""
    store: str = ""
    max_workers: int = 0
    runs: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    lost: list[str] = dataclasses.field(default_factory=list)
    started: set[str] = dataclasses.field(default_factory=set)
    pids: dict[str, str] = dataclasses.field(default_factory=dict)
    killed: str | None = None
    #: Submits with Prefer: wait that got the task's final answer (no Location).
    answered: list[Submitted] = dataclasses.field(default_factory=list)

    @property
    def twice(self) -> list[str]:
        """Task ids whose handler ran more than once."""
        return [task_id for task_id, count in self.runs.items() if count > 1]

    @property
    def allowed_lost(self) -> int:
        """Tasks that may end lost: those running in a worker killed hard."""
        return self.max_workers if self.scenario == "kill" else 0

    @property
    def ok(self) -> bool:
        return (
            super().ok
            and not self.twice
            and self.outcomes["succeeded"] + len(self.lost) == self.accepted
            and len(self.lost) <= self.allowed_lost
            and all(self.runs[task_id] <= 1 for task_id in self.lost)
            and self.lost_in_killed_worker
        )

    @property
    def lost_in_killed_worker(self) -> bool:
        """Whether every lost task was running in the killed worker: its handler
        ran there, or it had started (in the store) and the kill came before the
        handler's first line; the killed worker is the only one that died."""
        return all(
            self.pids.get(task_id) == self.killed
            or (task_id not in self.pids and task_id in self.started)
            for task_id in self.lost
        )

    def figures(self) -> str:
        return (
            f"{self.scenario} on {self.store}: accepted {self.accepted},"
            f" succeeded {self.outcomes['succeeded']}, lost {len(self.lost)},"
            f" run twice {len(self.twice)}"
        )

    def lines(self) -> list[str]:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return [
            self.figures(),
            *(f"  {event}" for event in self.events),
            f"submits refused (503): {self.refused}; unanswered (retried): {self.unanswered};"
            f" answered with the result (Prefer: wait): {len(self.answered)}",
            f"outcomes: {outcomes}; wrong results: {len(self.wrong)}",
            f"still queued or running at the end: {len(self.active)}",
            f"time to settle after the load: {self.settle_seconds:.2f} s",
        ]


def run(
    scenario: str,
    store: str = "sqlite",
    *,
    submits: int = 600,
    clients: int = 16,
    workers: int = 4,
    max_workers: int = 2,
    lease: float = 2.0,
    seconds: float = 0.1,
    log: t.Callable[[str], None] = print,
    server_log: t.IO[bytes] | None = None,
    restart_pause: float = RESTART_PAUSE,
) -> DeployReport:
    """Run one scenario; see the module documentation."""
    if scenario not in SCENARIOS or store not in STORES:
        raise ValueError(f"scenario in {SCENARIOS}, store in {STORES}")
    report = DeployReport(
        duration=0.0, lease=lease, scenario=scenario, store=store, max_workers=max_workers
    )
    prefix = f"{{deploy-run-{secrets.token_hex(6)}}}:"
    with (
        tempfile.TemporaryDirectory(prefix="deploy-run-") as folder,
        contextlib.ExitStack() as stack,
    ):
        root = Path(folder)
        runs = root / "runs"
        runs.touch()
        env = {
            "TASKS_APP_INSTANCE": str(root / "instance"),
            "TASKS_APP_RUNS": str(runs),
            "FLASK_RESTFUL_ASYNC_LEASE": str(lease),
            "FLASK_RESTFUL_ASYNC_MAX_WORKERS": str(max_workers),
            "FLASK_RESTFUL_ASYNC_MAX_PENDING": "256",
        }
        if store == "redis":
            env["FLASK_RESTFUL_ASYNC_STORE"] = f"redis://127.0.0.1:6379/{REDIS_DB}"
            env["FLASK_TASKS_APP_REDIS_PREFIX"] = prefix
            stack.callback(delete_redis_keys, REDIS_DB, prefix)
        options = ("--max-requests", "50") if scenario == "max-requests" else ()

        def start() -> str:
            return stack.enter_context(
                serve("gunicorn-gthread", "tests.apps.tasks_app:app", env=env, workers=workers,
                      threads=8, options=options, may_exit=True, log=server_log)
            )  # fmt: skip

        started = time.monotonic()
        base = [start()]
        submitted = _load(
            base, start, report, scenario, submits, clients, seconds, log, restart_pause
        )
        _settle(base[0], submitted, report, lease=SETTLE / 2)
        for done in report.answered:
            report.outcomes[done.outcome or "still active"] += 1
            if done.outcome == "wrong":
                report.wrong.append("(answered by its submit)")
        report.duration = time.monotonic() - started
        report.runs.update(line.split()[0] for line in runs.read_text().splitlines())
        report.pids = dict(line.split() for line in runs.read_text().splitlines())
        report.lost = [
            task.location.rsplit("/", 1)[-1] for task in submitted if task.outcome == "lost"
        ]
        report.started = {task.location.rsplit("/", 1)[-1] for task in submitted if task.started}
    return report


def _load(
    base: list[str],
    start: t.Callable[[], str],
    report: DeployReport,
    scenario: str,
    submits: int,
    clients: int,
    seconds: float,
    log: t.Callable[[str], None],
    restart_pause: float,
) -> list[Submitted]:
    submitted: list[Submitted] = []
    lock = threading.Lock()
    numbers = iter(range(submits))
    strike = threading.Event()
    began = time.monotonic()

    def note(event: str) -> None:
        line = f"{time.monotonic() - began:5.1f} s: {event}"
        report.events.append(line)
        log(line)

    def client() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            payload = {"n": number, "token": secrets.token_hex(8)}
            # Every other submit waits for its answer: once the endpoint's run time
            # is known, such a task runs in the request thread of its submit.
            sent = {"Content-Type": "application/json"}
            if number % 2:
                sent["Prefer"] = f"wait={WAIT}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    status, headers, answer = http(
                        "POST", f"{base[0]}/jobs/count?seconds={seconds}",
                        body=json.dumps(payload).encode(), headers=sent, timeout=10,
                    )  # fmt: skip
                except (OSError, http_client.HTTPException):
                    with lock:
                        report.unanswered += 1
                    time.sleep(0.1)
                    continue
                if status == 503:
                    with lock:
                        report.refused += 1
                    time.sleep(0.1)
                    continue
                if status == 200 and "Prefer" in sent:
                    # The final answer within the wait: the task ran to its end.
                    done = Submitted("", "count", {"echo": payload})
                    done.outcome, done.settled_at = classify(200, answer, done), time.monotonic()
                    with lock:
                        report.accepted += 1
                        report.answered.append(done)
                        if report.accepted == submits // 3:
                            strike.set()
                    break
                if status != 202:
                    raise AssertionError(f"submit answered {status}: {answer!r}")
                path = urllib.parse.urlsplit(headers["location"]).path
                with lock:
                    report.accepted += 1
                    submitted.append(Submitted(path, "count", {"echo": payload}))
                    if report.accepted == submits // 3:
                        strike.set()
                break

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    if scenario != "max-requests" and strike.wait(60):
        _, _, body = http("GET", base[0] + "/pid")
        pids = json.loads(body)
        if scenario == "reload":
            os.kill(pids["ppid"], signal.SIGHUP)
            note(f"kill -HUP {pids['ppid']} (the master) after {report.accepted} accepted")
        elif scenario == "kill":
            os.kill(pids["pid"], signal.SIGKILL)
            report.killed = str(pids["pid"])
            note(f"SIGKILL of worker {pids['pid']} after {report.accepted} accepted")
        else:
            os.kill(pids["ppid"], signal.SIGTERM)
            note(f"SIGTERM of the master {pids['ppid']} after {report.accepted} accepted")
            time.sleep(restart_pause)
            base[0] = start()
            note("a new server started on the same store")
    for thread in threads:
        thread.join(90)
    note(f"load ended: {report.accepted} tasks accepted")
    return submitted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--store", choices=STORES, default="sqlite")
    parser.add_argument("--submits", type=int, default=600)
    parser.add_argument("--max-workers", type=int, default=2, help="RESTFUL_ASYNC_MAX_WORKERS")
    parser.add_argument("--lease", type=float, default=2.0, help="RESTFUL_ASYNC_LEASE")
    parser.add_argument("--server-log", type=argparse.FileType("w+b"), help="gunicorn's output")
    options = parser.parse_args()
    report = run(
        options.scenario,
        options.store,
        submits=options.submits,
        max_workers=options.max_workers,
        lease=options.lease,
        log=lambda line: print(line, flush=True),
        server_log=options.server_log,
    )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
