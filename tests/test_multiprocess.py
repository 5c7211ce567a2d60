"""Several processes on one task store: real gunicorn servers and in-test apps.

The app is ``tests/apps/tasks_app.py``. Each test keeps its store in a temporary
instance folder (SQLite, the default store) or in Redis database
:data:`REDIS_DB` on 127.0.0.1:6379, under a key prefix of its own (deleted
afterwards; the database is never flushed). Redis variants skip
while ``flask_restful_async/stores/redis.py`` does not exist, and when no Redis
answers (they fail instead with ``RESTFUL_ASYNC_REQUIRE_SERVICES=1``).

An "in-test app" is a second app instance made in this process by
``tasks_app.create_app`` on the same store: with a server, that is two processes
and two apps sharing tasks.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from flask_restful_async.state import get_state
from flask_restful_async.task import Task, TaskState

from .apps.tasks_app import REDIS_PREFIX_KEY, create_app
from .conftest import wait_done
from .servers import ROOT, Response, ServerError, http, poll_until_done, serve
from .services import (
    REDIS_HOST,
    REDIS_PORT,
    free_port,
    redis_server,
    require_redis,
    services_required,
)

APP = "tests.apps.tasks_app:app"
SERVER = "gunicorn-gthread"
#: The Redis database these tests use (one of services.REDIS_TEST_DBS); each test
#: keeps its keys under a prefix of its own and deletes them, never flushing.
REDIS_DB = 13
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
JSON_HEADERS = {"Content-Type": "application/json"}
STORES = ("sqlite", "redis")


# -- stores ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Store:
    """Where a test's tasks live: how to point servers and in-test apps at them.

    SQLite: a file in the instance folder. Redis: database :data:`REDIS_DB`, every
    key under a ``prefix`` of the test's own.
    """

    kind: str
    instance: Path
    prefix: str | None = None

    def config(self, **config: t.Any) -> dict[str, t.Any]:
        """Config for ``create_app``: only the store (Redis) besides ``config``."""
        if self.kind == "redis":
            config.setdefault("RESTFUL_ASYNC_STORE", REDIS_URL)
            config.setdefault(REDIS_PREFIX_KEY, self.prefix)
        return config

    def server_env(self, **config: t.Any) -> dict[str, str]:
        """The same, as a server's environment (``FLASK_`` variables, JSON values)."""
        env = {"TASKS_APP_INSTANCE": str(self.instance)}
        for key, value in self.config(**config).items():
            env[f"FLASK_{key}"] = value if isinstance(value, str) else json.dumps(value)
        return env


@contextlib.contextmanager
def redis_store(instance: Path) -> Iterator[Store]:
    """A Redis store under a fresh prefix, whose keys are deleted afterwards."""
    require_redis()
    import redis

    prefix = f"{{restful_async_mp_{secrets.token_hex(6)}}}:"
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, socket_timeout=5)
    try:
        yield Store("redis", instance, prefix)
    finally:
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        yield Store("sqlite", tmp_path / "instance")
    else:
        with redis_store(tmp_path / "instance") as store:
            yield store


# -- in-test apps --------------------------------------------------------------------

LocalApp = t.Callable[..., Flask]


def close_app(app: Flask) -> None:
    """Stop an in-test app's threads and lease, close its store (again is harmless)."""
    get_state(app).close()


@pytest.fixture
def local_app() -> Iterator[LocalApp]:
    """``local_app(store, **config)``: an in-test app on ``store``, closed afterwards."""
    made: list[Flask] = []

    def make(store: Store, **config: t.Any) -> Flask:
        app = create_app(str(store.instance), **store.config(**config))
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


@dataclasses.dataclass(frozen=True)
class Served:
    base: str
    store: Store


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``gunicorn -w 4 -k gthread`` with the default configuration (SQLite)."""
    store = Store("sqlite", tmp_path_factory.mktemp("default") / "instance")
    with serve(SERVER, APP, env=store.server_env(), workers=4, threads=8) as base:
        yield Served(base, store)


# -- helpers -------------------------------------------------------------------------


def as_json(response: Response) -> t.Any:
    return json.loads(response[2])


#: States a submit's 202 may show after waiting for a short task.
FINISHED = ("succeeded", "failed")


def submit(base: str, path: str, document: t.Any = None) -> str:
    """POST ``document`` to the server; check the 202 and return the ``Location``."""
    body = json.dumps(document).encode()
    status, headers, data = http("POST", base + path, body=body, headers=JSON_HEADERS)
    assert status == 202, (status, data)
    assert headers["location"].startswith("/tasks/")
    state = json.loads(data)["state"]
    # Once a process has seen an endpoint's tasks end quickly, a submit waits for the
    # next one (RESTFUL_ASYNC_SHORT_WAIT): its 202 then reads finished, to poll at once.
    assert state == "queued" or (state in FINISHED and headers["retry-after"] == "0"), state
    return headers["location"]


def submit_local(client: FlaskClient, path: str, document: t.Any = None) -> str:
    response = client.post(path, json=document)
    assert response.status_code == 202, response.get_data()
    location = response.headers["Location"]
    assert location.startswith("/tasks/")
    return location


def task_id(location: str) -> str:
    return location.rsplit("/", 1)[1]


def wait_for_state(client: FlaskClient, location: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(location)
        if response.status_code == 202 and response.json["state"] == state:  # type: ignore[index]
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{location} not {state} after {timeout} s: {response.json}")
        time.sleep(0.01)


# -- a. two processes, two apps, one store -------------------------------------------


def check_both_ways(base: str, client: FlaskClient) -> None:
    # Submitted on the server, run there, polled here.
    document = {"from": "server", "text": "naïve ☃"}
    location = submit(base, "/jobs/echo", document)
    response = wait_done(client, location)
    assert response.status_code == 200, response.get_data()
    result = response.json
    assert result is not None
    assert result["echo"] == document
    assert result["pid"] != os.getpid()

    # Submitted here, run here, polled on the server.
    document = {"from": "test", "n": "1 2 3"}
    location = submit_local(client, "/jobs/echo", document)
    status, _, data = poll_until_done(base, location)
    assert status == 200, data
    assert json.loads(data) == {"echo": document, "pid": os.getpid()}


def test_server_and_in_test_app_share_tasks_sqlite(
    default_server: Served, local_app: LocalApp
) -> None:
    check_both_ways(default_server.base, local_app(default_server.store).test_client())


def test_server_and_in_test_app_share_tasks_redis(local_app: LocalApp, tmp_path: Path) -> None:
    with (
        redis_store(tmp_path / "instance") as store,
        serve(SERVER, APP, env=store.server_env(), workers=2, threads=4) as base,
    ):
        check_both_ways(base, local_app(store).test_client())


# -- b. gunicorn -w 4 -k gthread, default configuration ------------------------------


def test_default_config_serves_polls_from_every_worker(default_server: Served) -> None:
    base = default_server.base

    def pair(i: int) -> tuple[int, t.Any, t.Any]:
        document = {"i": i, "pad": "x" * (i % 7)}
        status, _, data = poll_until_done(base, submit(base, "/jobs/echo", document))
        return status, document, json.loads(data)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(pair, range(200)))

    statuses = collections.Counter(status for status, _, _ in results)
    assert statuses == {200: 200}, [r for r in results if r[0] != 200][:5]
    assert all(result["echo"] == document for _, document, result in results)
    pids = collections.Counter(result["pid"] for _, _, result in results)
    print(f"results of 200 tasks came from {len(pids)} processes: {dict(pids)}")


# -- c. results survive a restart ----------------------------------------------------


def test_result_survives_restart(store: Store) -> None:
    document = {"survive": "restart"}
    with serve(SERVER, APP, env=store.server_env(), workers=1) as base_a:
        location = submit(base_a, "/jobs/echo", document)
        status, _, first = poll_until_done(base_a, location)
        assert status == 200, first
        pid_a = as_json(http("GET", base_a + "/pid"))["pid"]
    assert json.loads(first) == {"echo": document, "pid": pid_a}

    with serve(SERVER, APP, env=store.server_env(), workers=1) as base_b:
        assert as_json(http("GET", base_b + "/pid"))["pid"] != pid_a
        status, headers, again = http("GET", base_b + location)
    assert status == 200, again
    assert again == first
    assert headers["cache-control"] == "no-store"


# -- d. a killed process's tasks are lost within the lease ---------------------------

LEASE = 1.0
#: What "within the lease" may take beyond it: polling and the renewal's phase.
LOST_SLACK = 1.5


def run_and_kill(store: Store, client: FlaskClient, outcome: list[t.Any]) -> None:
    """Start a long task and one queued behind it, then SIGKILL the whole server.

    Appends the two status URLs and the ``time.monotonic()`` of the kill to
    ``outcome``: the server's ``with`` then ends with ``ServerError`` ("died
    while in use"), so nothing can be returned.
    """
    env = store.server_env(RESTFUL_ASYNC_LEASE=LEASE, RESTFUL_ASYNC_MAX_WORKERS=1)
    with serve(SERVER, APP, env=env, workers=1, threads=4) as base:
        worker_pid = as_json(http("GET", base + "/pid"))["pid"]
        running = submit(base, "/jobs/sleep?seconds=60")
        queued = submit(base, "/jobs/sleep?seconds=0.1")
        wait_for_state(client, running, "running")
        wait_for_state(client, queued, "queued")
        # The worker is in the session (and process group) of the gunicorn master,
        # which servers.serve started; never this test's own group.
        group = os.getpgid(worker_pid)
        assert group not in (os.getpgrp(), worker_pid)
        killed_at = time.monotonic()
        os.killpg(group, signal.SIGKILL)
        outcome.append(([running, queued], killed_at))
        # The group id is the master's pid, a child of this process: wait (without
        # reaping it, which serve() does) until it is dead.
        deadline = time.monotonic() + 10
        while os.waitid(os.P_PID, group, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            assert time.monotonic() < deadline, "the server survived SIGKILL"
            time.sleep(0.01)


def test_killed_process_running_task_is_lost_within_lease_and_its_queue_taken_over(
    store: Store, local_app: LocalApp
) -> None:
    client = local_app(store, RESTFUL_ASYNC_LEASE=LEASE).test_client()
    outcome: list[tuple[list[str], float]] = []
    with pytest.raises(ServerError, match="died while in use"):
        run_and_kill(store, client, outcome)
    ((locations, killed_at),) = outcome
    queued = locations.pop()

    lost_after: dict[str, float] = {}
    deadline = killed_at + LEASE + LOST_SLACK + 3  # past the bound, to report by how much
    while len(lost_after) < len(locations) and time.monotonic() < deadline:
        for location in locations:
            if location in lost_after:
                continue
            response = client.get(location)
            if response.status_code == 202:
                continue
            lost_after[location] = time.monotonic() - killed_at
            assert response.status_code == 500, response.get_data()
            document = response.json
            assert document is not None
            assert document["state"] == "lost"
            assert document["id"] == task_id(location)
            assert response.headers["Cache-Control"] == "no-store"
        time.sleep(0.02)
    print(f"tasks read as lost {sorted(round(s, 2) for s in lost_after.values())} s after kill")
    assert len(lost_after) == len(locations), "tasks of the killed process never read lost"
    assert max(lost_after.values()) <= LEASE + LOST_SLACK, lost_after
    # The queued task is taken over by this process (its app shares the store).
    taken_over = wait_done(client, queued)
    assert taken_over.status_code == 200, taken_over.get_data()
    assert taken_over.json == {"slept": 0.1, "pid": os.getpid()}


# -- e. retention: 410, then 404 -----------------------------------------------------

TTL = 1.0
#: How late a transition may be observed (polling every 50 ms, plus slow machines).
RETENTION_SLACK = 0.5


@dataclasses.dataclass(frozen=True)
class Observation:
    before: float  # time.time() before the request
    after: float  # and after its response
    status: int
    body: t.Any
    cache_control: str | None


def test_expired_result_answers_410_then_404(store: Store, local_app: LocalApp) -> None:
    app = local_app(store, RESTFUL_ASYNC_RESULT_TTL=TTL, RESTFUL_ASYNC_TOMBSTONE_TTL=TTL)
    client = app.test_client()
    location = submit_local(client, "/jobs/echo", {"keep": "briefly"})
    assert wait_done(client, location).status_code == 200
    task = get_state(app).store.get(task_id(location))
    assert task is not None
    assert task.finished_at is not None
    finished = task.finished_at

    seen: list[Observation] = []
    deadline = finished + 2 * TTL + RETENTION_SLACK + 2
    while time.time() < deadline:
        before = time.time()
        response = client.get(location)
        seen.append(
            Observation(
                before,
                time.time(),
                response.status_code,
                response.json,
                response.headers.get("Cache-Control"),
            )
        )
        if response.status_code == 404:
            break
        time.sleep(0.05)

    statuses = [o.status for o in seen]
    # 200s, then 410s, then a 404; never back.
    assert statuses == sorted(statuses, key=[200, 410, 404].index), statuses
    assert 410 in statuses
    assert statuses[-1] == 404, statuses
    for o in seen:
        assert o.cache_control == "no-store"
        if o.status == 200:  # the result was still there: the server saw age <= TTL
            assert o.before - finished <= TTL, o
    gone = next(o for o in seen if o.status == 410)
    assert gone.after - finished >= TTL, gone
    assert gone.before - finished <= TTL + RETENTION_SLACK, gone
    assert isinstance(gone.body, dict)
    assert isinstance(gone.body.get("message"), str)
    assert "echo" not in gone.body
    unknown = seen[-1]
    assert unknown.after - finished >= 2 * TTL, unknown
    assert unknown.before - finished <= 2 * TTL + RETENTION_SLACK, unknown
    assert unknown.body == {"message": "No such task."}


# -- f. 1,000 concurrent submits across 4 processes ----------------------------------

SUBMITS = 1000


def all_task_ids(app: Flask) -> set[str]:
    """Every task id the store lists (they all have no owner), page by page."""
    store = get_state(app).store
    ids: set[str] = set()
    before = None
    while True:
        page: list[Task] = store.list(owner=None, limit=500, before=before)
        if not page:
            return ids
        ids.update(task.id for task in page)
        before = page[-1].id


def test_thousand_concurrent_submits(store: Store, local_app: LocalApp) -> None:
    env = store.server_env(RESTFUL_ASYNC_MAX_PENDING=2 * SUBMITS)
    with serve(SERVER, APP, env=env, workers=4, threads=16) as base:

        def submit_one(i: int) -> tuple[int, str | None, bytes]:
            body = json.dumps({"i": i}).encode()
            status, headers, data = http(
                "POST", base + "/jobs/echo", body=body, headers=JSON_HEADERS
            )
            return status, headers.get("location"), data

        def poll_one(location: str) -> Response:
            return poll_until_done(base, location, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            submitted = list(pool.map(submit_one, range(SUBMITS)))
            refused = [(status, data) for status, _, data in submitted if status != 202]
            assert not refused, refused[:5]
            locations = [t.cast(str, location) for _, location, _ in submitted]
            results = list(pool.map(poll_one, locations))

    wrong = [
        (i, status, data)
        for i, (status, _, data) in enumerate(results)
        if status != 200 or json.loads(data)["echo"] != {"i": i}
    ]
    assert not wrong, wrong[:5]
    pids = collections.Counter(json.loads(data)["pid"] for _, _, data in results)
    print(f"{SUBMITS} tasks ran in {len(pids)} processes: {dict(pids)}")

    ids = {task_id(location) for location in locations}
    assert len(ids) == SUBMITS
    app = local_app(store)
    assert all_task_ids(app) == ids
    tasks = [get_state(app).store.get(i) for i in ids]
    assert all(task is not None and task.state is TaskState.SUCCEEDED for task in tasks)


# In a new process (a gunicorn worker) the first submits run at once in several
# threads, and each must record the worker id that the lease is taken for: once,
# a lazily made id gave tasks a name without a lease, and they read as lost.
_WORKER_ID_SCRIPT = """\
import os, sys, threading
from flask_restful_async.lease import worker_id
disagreed = 0
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        sys.setswitchinterval(1e-6)  # switch threads often, as on a busy server
        barrier = threading.Barrier(16)
        seen = []
        def first_call():
            barrier.wait()
            seen.append(worker_id())
        threads = [threading.Thread(target=first_call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        os._exit(len(set(seen)) > 1)
    disagreed += os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(disagreed)
"""


def test_threads_of_a_new_process_agree_on_its_worker_id() -> None:
    forks = 20
    done = subprocess.run(
        [sys.executable, "-c", _WORKER_ID_SCRIPT, str(forks)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    disagreed = int(done.stdout)
    assert disagreed == 0, f"in {disagreed} of {forks} new processes, threads got different ids"


# -- g. Redis unreachable, then back -------------------------------------------------


def assert_unavailable(response: t.Any) -> None:
    assert response.status_code == 503, response.get_data()
    assert int(response.headers["Retry-After"]) >= 1
    assert "Location" not in response.headers
    document = response.json
    assert isinstance(document, dict)
    assert set(document) == {"message"}, document
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> tuple[int, Path]:
    """A free port and a folder for :func:`redis_server` (needs the redis store)."""
    if shutil.which("redis-server") is None:
        if services_required():
            pytest.fail("redis-server is not installed, and RESTFUL_ASYNC_REQUIRE_SERVICES=1")
        pytest.skip("redis-server is not installed")
    return free_port(), tmp_path


def app_on_port(local_app: LocalApp, port: int, workdir: Path) -> Flask:
    # Three slots (one worker, two waiting): submits refused for the store must not
    # keep one, or the submits after the outage would be refused as "busy".
    return local_app(
        Store("redis", workdir / "instance"),
        RESTFUL_ASYNC_STORE=f"redis://127.0.0.1:{port}/0",
        RESTFUL_ASYNC_MAX_WORKERS=1,
        RESTFUL_ASYNC_MAX_PENDING=2,
    )


def test_redis_unreachable_answers_503_then_recovers(
    local_app: LocalApp, throwaway_redis: tuple[int, Path]
) -> None:
    port, workdir = throwaway_redis
    app = app_on_port(local_app, port, workdir)
    client = app.test_client()

    with redis_server(port, workdir) as proc:
        earlier = submit_local(client, "/jobs/echo", {"before": "outage"})
        assert wait_done(client, earlier).json == {"echo": {"before": "outage"}, "pid": os.getpid()}
        proc.kill()
        proc.wait(timeout=10)
        for _ in range(5):
            assert_unavailable(client.post("/jobs/echo", json={"during": "outage"}))
        assert_unavailable(client.get(earlier))

    with redis_server(port, workdir):
        # A new, empty server: the earlier task is gone; submits are accepted again.
        assert client.get(earlier).status_code == 404
        location = submit_local(client, "/jobs/echo", {"after": "outage"})
        response = wait_done(client, location)
        assert response.status_code == 200, response.get_data()
        assert response.json == {"echo": {"after": "outage"}, "pid": os.getpid()}
        close_app(app)  # while Redis is up: the lease is released cleanly


def test_task_submitted_after_redis_restart_completes(
    local_app: LocalApp, throwaway_redis: tuple[int, Path]
) -> None:
    """A Redis restart (without persistence) forgets this process's lease; tasks
    submitted afterwards must not read as lost until the next renewal."""
    port, workdir = throwaway_redis
    app = app_on_port(local_app, port, workdir)
    client = app.test_client()
    with redis_server(port, workdir):
        first = submit_local(client, "/jobs/echo", {"n": 1})  # takes this process's lease
        assert wait_done(client, first).status_code == 200
    with redis_server(port, workdir):
        try:
            # Long enough to be polled while it runs.
            location = submit_local(client, "/jobs/sleep?seconds=0.3")
            response = wait_done(client, location)
            assert response.status_code == 200, response.get_data()
            assert response.json == {"slept": 0.3, "pid": os.getpid()}
        finally:
            close_app(app)
