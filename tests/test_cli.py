"""``flask tasks``: every command through Flask's CLI runner on each store, and the
real ``flask`` command in another process than the one that wrote the tasks."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
import typing as t
from pathlib import Path

import pytest
from click.testing import Result
from flask import Blueprint, Flask, request
from flask_restful import Api, abort

from flask_restful_async import AsyncResource, current_task, register_async, signals
from flask_restful_async.cli import SHOWN_BODY, tasks_cli
from flask_restful_async.state import get_state
from flask_restful_async.task import StoredResponse, Task, TaskState, new_task_id

from .conftest import AppFactory, wait_for
from .services import delete_redis_keys, free_port, require_redis

ROOT = Path(__file__).resolve().parent.parent
FLASK = str(Path(sys.executable).with_name("flask"))


class Echo(AsyncResource):
    def post(self) -> t.Any:
        body = request.get_json()
        if body.get("fail"):
            abort(409, message="refused")
        return {"echo": body}, 201, {"X-Echo": "yes"}


class Big(AsyncResource):
    def post(self) -> t.Any:
        return {"text": "x" * (SHOWN_BODY + 1000)}


class Hold(AsyncResource):
    """Runs until the test sets ``release`` or cancels it."""

    release = threading.Event()
    started = threading.Event()
    saw_cancel = threading.Event()

    def post(self) -> t.Any:
        type(self).started.set()
        current_task.progress(1, total=4, message="holding")
        while not type(self).release.wait(0.01):
            if current_task.cancelled:
                type(self).saw_cancel.set()
                current_task.raise_if_cancelled()
        return {"held": True}


@pytest.fixture
def cli_app(make_app_any_store: AppFactory) -> t.Iterator[Flask]:
    """An app on each store, one worker thread, owners from ``X-User``."""
    Hold.release, Hold.started, Hold.saw_cancel = (threading.Event() for _ in range(3))
    app, api = make_app_any_store(
        owner=lambda: request.headers.get("X-User"),
        config={"RESTFUL_ASYNC_MAX_WORKERS": 1, "RESTFUL_ASYNC_SHORT_WAIT": 0},
    )
    api.add_resource(Echo, "/echo")
    api.add_resource(Big, "/big")
    api.add_resource(Hold, "/hold")
    yield app
    Hold.release.set()


def submit(app: Flask, path: str, body: t.Any = None, user: str = "alice") -> str:
    response = app.test_client().post(path, json=body or {}, headers={"X-User": user})
    assert response.status_code == 202, response.data
    return t.cast(str, response.json["id"])


def finish(app: Flask, path: str, body: t.Any = None, user: str = "alice") -> str:
    task_id = submit(app, path, body, user)
    store = get_state(app).store

    def finished() -> bool:
        task = store.get(task_id)
        return task is not None and task.state.finished

    wait_for(finished)
    return task_id


def run(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["tasks", *args])


def as_json(result: Result) -> t.Any:
    assert result.exit_code == 0, (result.output, result.stderr)
    return json.loads(result.stdout)


def held(app: Flask) -> tuple[str, str]:
    """A running task (holding the only worker) and a queued one behind it."""
    running = submit(app, "/hold")
    assert Hold.started.wait(5)
    queued = submit(app, "/echo", {"n": "queued"}, user="bob")
    return running, queued


def test_list_newest_first_in_a_table_and_as_json(cli_app: Flask) -> None:
    first = finish(cli_app, "/echo", {"n": 1})
    second = finish(cli_app, "/echo", {"n": 2}, user="bob")
    running, queued = held(cli_app)

    result = run(cli_app, "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "METHOD", "PATH", "CREATED", "PROGRESS"]
    assert [line.split()[:4] for line in lines[1:]] == [
        [queued, "queued", "POST", "/echo"],
        [running, "running", "POST", "/hold"],
        [second, "succeeded", "POST", "/echo"],
        [first, "succeeded", "POST", "/echo"],
    ]
    assert lines[2].split()[5:] == ["1/4", "holding"]
    assert lines[1].split()[4].endswith("Z")

    tasks = as_json(run(cli_app, "list", "--json"))["tasks"]
    assert [task["id"] for task in tasks] == [queued, running, second, first]
    assert tasks[1]["request"] == {"method": "POST", "path": "/hold"}
    assert tasks[1]["progress"] == {"current": 1, "total": 4, "message": "holding"}
    assert [task["owner"] for task in tasks] == ["bob", "alice", "bob", "alice"]
    assert tasks[0]["endpoint"] == "echo"


def test_list_filters_by_state_and_owner_and_limits(cli_app: Flask) -> None:
    first = finish(cli_app, "/echo", {"n": 1})
    second = finish(cli_app, "/echo", {"n": 2}, user="bob")
    running, queued = held(cli_app)

    def ids(*args: str) -> list[str]:
        return [task["id"] for task in as_json(run(cli_app, "list", "--json", *args))["tasks"]]

    assert ids("--state", "succeeded") == [second, first]
    assert ids("--state", "queued") == [queued]
    assert ids("--state", "running") == [running]
    assert ids("--state", "failed") == []
    assert ids("--owner", "alice") == [running, first]
    assert ids("--owner", "bob", "--state", "succeeded") == [second]
    assert ids("--owner", "nobody") == []
    assert ids("--limit", "3") == [queued, running, second]
    assert run(cli_app, "list", "--owner", "nobody").stdout == "No tasks.\n"


def test_list_all_pages_after_a_task(cli_app: Flask) -> None:
    made = [finish(cli_app, "/echo", {"n": n}, user=f"user{n % 3}") for n in range(7)]
    store = get_state(cli_app).store
    newest_first = made[::-1]
    assert [task.id for task in store.list_all(limit=3)] == newest_first[:3]
    assert [task.id for task in store.list_all(limit=3, before=made[4])] == newest_first[3:6]
    assert [task.id for task in store.list_all(before=made[0])] == []
    assert store.list_all(before="A" * 22) == []


def test_show_a_finished_task_with_its_response(cli_app: Flask) -> None:
    task_id = finish(cli_app, "/echo", {"n": 1})
    result = run(cli_app, "show", task_id)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"id        {task_id}" in text
    assert "state     succeeded" in text
    assert "request   POST /echo" in text
    assert "owner     alice" in text
    assert "response  201" in text
    assert "  X-Echo: yes" in text
    assert text.rstrip().endswith('{"echo": {"n": 1}}')

    shown = as_json(run(cli_app, "show", task_id, "--json"))
    assert shown["task"]["state"] == "succeeded"
    assert shown["task"]["id"] == task_id
    assert shown["response"]["status"] == 201
    assert ["X-Echo", "yes"] in shown["response"]["headers"]
    assert json.loads(shown["response"]["body"]) == {"echo": {"n": 1}}


def test_show_cuts_a_long_body_in_the_table_only(cli_app: Flask) -> None:
    task_id = finish(cli_app, "/big")
    text = run(cli_app, "show", task_id).stdout
    assert "x" * 100 in text
    assert "more bytes; --json shows them all]" in text
    body = as_json(run(cli_app, "show", task_id, "--json"))["response"]["body"]
    assert len(body) > SHOWN_BODY + 1000
    assert len(text) < SHOWN_BODY + 1000


def test_show_an_active_and_a_failed_task(cli_app: Flask) -> None:
    failed = finish(cli_app, "/echo", {"fail": True})
    shown = as_json(run(cli_app, "show", failed, "--json"))
    assert shown["task"]["state"] == "failed"
    assert shown["response"]["status"] == 409
    running, queued = held(cli_app)
    text = run(cli_app, "show", running).stdout
    assert "state     running" in text
    assert "progress  1/4 holding" in text
    assert "response  -" in text
    assert as_json(run(cli_app, "show", queued, "--json"))["response"] is None


@pytest.mark.parametrize("command", ["show", "cancel", "forget"])
@pytest.mark.parametrize("task_id", ["A" * 22, "not-an-id", "../x"])
def test_an_unknown_id_exits_1_with_a_message(cli_app: Flask, command: str, task_id: str) -> None:
    finish(cli_app, "/echo", {"n": 1})  # a store in use (a SQLite file that exists)
    result = run(cli_app, command, task_id)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: no task {task_id!r}\n"


def test_cancel_a_queued_and_a_running_task(cli_app: Flask) -> None:
    running, queued = held(cli_app)
    client = cli_app.test_client()

    finished: list[tuple[str, TaskState]] = []

    def told(sender: Flask, task: Task) -> None:
        finished.append((task.id, task.state))

    with signals.task_finished.connected_to(told, cli_app):
        result = run(cli_app, "cancel", queued)
    assert result.exit_code == 0, result.output
    assert "its handler will not run" in result.stdout
    assert finished == [(queued, TaskState.CANCELLED)]  # as DELETE tells it
    answer = client.get(f"/tasks/{queued}", headers={"X-User": "bob"})
    assert answer.status_code == 409
    assert answer.json["state"] == "cancelled"

    result = run(cli_app, "cancel", running)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Asked running task {running} to stop.\n"
    assert Hold.saw_cancel.wait(5)
    answer = client.get(f"/tasks/{running}?wait=5", headers={"X-User": "alice"})
    assert answer.status_code == 409

    result = run(cli_app, "cancel", running)
    assert result.exit_code == 1
    assert "has already finished (cancelled)" in result.stderr


class Sly(AsyncResource):
    def post(self, where: str) -> t.Any:
        current_task.progress(1, message="\x1b]0;pwned\x07done\nfake-row\u202eworb")
        return {"ok": True}, 200, {"X-Sly": "\x1b[8mhidden"}


def test_list_and_show_never_pass_control_characters_to_the_terminal(
    make_app: AppFactory,
) -> None:
    # A path, a message, headers, a body: all from API callers.
    app, api = make_app(config={"RESTFUL_ASYNC_PUBLIC_LIST": True})
    api.add_resource(Sly, "/sly/<path:where>")
    task_id = finish(app, "/sly/%1B[2Jx")
    for args in (("list",), ("show", task_id)):
        result = run(app, *args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout
        assert "\x07" not in result.stdout
        assert "\\x1b" in result.stdout  # shown as an escape
        assert "\u202e" not in result.stdout  # nor a right-to-left override
        assert "\\u202e" in result.stdout
    listed = run(app, "list").stdout.splitlines()
    assert len(listed) == 2  # the header and one row: none of the message's making


def test_forget_a_finished_task_but_not_an_active_one(cli_app: Flask) -> None:
    task_id = finish(cli_app, "/echo", {"n": 1})
    result = run(cli_app, "forget", task_id)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Forgot task {task_id}.\n"
    assert (
        cli_app.test_client().get(f"/tasks/{task_id}", headers={"X-User": "alice"}).status_code
        == 404
    )
    assert run(cli_app, "forget", task_id).exit_code == 1

    running, _ = held(cli_app)
    result = run(cli_app, "forget", running)
    assert result.exit_code == 1
    assert "is still running" in result.stderr
    assert get_state(cli_app).store.get(running) is not None


def test_purge_finished_tasks_by_age_and_state(cli_app: Flask) -> None:
    done = [finish(cli_app, "/echo", {"n": n}) for n in range(3)]
    failed = finish(cli_app, "/echo", {"fail": True})
    running, queued = held(cli_app)
    store = get_state(cli_app).store

    assert run(cli_app, "purge", "--older-than", "3600").stdout == "Purged 0 finished tasks.\n"
    assert run(cli_app, "purge", "--state", "failed").stdout == "Purged 1 finished task.\n"
    assert store.get(failed) is None
    assert all(store.get(task_id) is not None for task_id in done)
    assert run(cli_app, "purge").stdout == "Purged 3 finished tasks.\n"
    assert all(store.get(task_id) is None for task_id in done)
    assert store.get(running) is not None
    assert store.get(queued) is not None


def test_purge_takes_tombstones_too(cli_app: Flask) -> None:
    task_id = finish(cli_app, "/echo", {"n": 1})
    store = get_state(cli_app).store
    store.result_ttl = 0.0
    time.sleep(0.01)
    store.purge_expired()
    tombstone = store.get(task_id)
    assert tombstone is not None
    assert tombstone.expired
    assert "expired (the status URL answers 410)" in run(cli_app, "show", task_id).stdout
    assert run(cli_app, "purge", "--state", "succeeded").stdout == "Purged 1 finished task.\n"
    assert store.get(task_id) is None


def test_stats_counts_by_state_and_ages_the_oldest_queued(cli_app: Flask) -> None:
    finish(cli_app, "/echo", {"n": 1})
    finish(cli_app, "/echo", {"n": 2}, user="bob")
    finish(cli_app, "/echo", {"fail": True})
    empty = as_json(run(cli_app, "stats", "--json"))
    assert empty["oldest_queued_age"] is None
    held(cli_app)
    time.sleep(0.2)
    stats = as_json(run(cli_app, "stats", "--json"))
    assert stats["counts"] == {
        "queued": 1,
        "running": 1,
        "succeeded": 2,
        "failed": 1,
        "cancelled": 0,
        "lost": 0,
    }
    assert 0.2 <= stats["oldest_queued_age"] < 30

    result = run(cli_app, "stats")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["STATE", "TASKS"]
    assert lines[1].split() == ["queued", "1"]
    assert lines[3].split() == ["succeeded", "2"]
    assert lines[-1].startswith("oldest queued: ")
    assert lines[-1].endswith(" s ago")


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--limit", "0"],
        ["list", "--limit", "many"],
        ["list", "--state", "sleeping"],
        ["list", "--bogus"],
        ["show"],
        ["cancel"],
        ["purge", "--state", "queued"],
        ["purge", "--older-than", "-1"],
        ["purge", "--older-than", "nan"],
        ["stats", "extra"],
        ["nonsense"],
    ],
)
def test_bad_usage_exits_2(cli_app: Flask, args: list[str]) -> None:
    result = run(cli_app, *args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.stderr


@pytest.mark.parametrize("command", [["list"], ["stats"], ["purge"], ["show", "A" * 22]])
def test_a_redis_that_is_down_is_one_line_and_exit_1(
    make_app: AppFactory, command: list[str]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/12"
    app, _ = make_app(store=url)
    result = app.test_cli_runner().invoke(args=["tasks", *command])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: Task store {url}: Redis did not answer: ")
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("command", [["list"], ["stats"], ["show", "a" * 22]])
def test_a_redis_database_out_of_range_is_one_line_and_exit_1(
    make_app: AppFactory, command: list[str]
) -> None:
    require_redis()
    url = "redis://127.0.0.1:6379/999"
    app, _ = make_app(store=url)
    result = app.test_cli_runner().invoke(args=["tasks", *command])
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_a_sqlite_file_that_is_not_a_store_is_one_line_and_exit_1(
    make_app: AppFactory, tmp_path: Path
) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database, " * 512)
    app, _ = make_app(store=f"sqlite:///{path}")
    result = app.test_cli_runner().invoke(args=["tasks", "stats"])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr
        == f"Error: Task store sqlite:///{path}: DatabaseError: file is not a database\n"
    )


@pytest.mark.parametrize("command", [["list"], ["stats"], ["purge"], ["show", "a" * 22]])
def test_a_sqlite_file_that_does_not_exist_is_one_line_and_exit_1_and_not_made(
    make_app: AppFactory, tmp_path: Path, command: list[str]
) -> None:
    # Opened, the file was made, with its folder: a mistyped path or another
    # instance folder read as an empty, healthy store ("No tasks.", exit 0).
    path = tmp_path / "typo" / "tasks.db"
    app, _ = make_app(store=f"sqlite:///{path}")
    result = app.test_cli_runner().invoke(args=["tasks", *command])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: no task store at {path}: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert not path.parent.exists()


def test_the_group_is_added_for_a_blueprint_and_an_app_factory(tmp_path: Path) -> None:
    blueprint = Blueprint("api", __name__)
    register_async(Api(blueprint), store="memory://")
    on_blueprint = Flask("on_blueprint", instance_path=str(tmp_path / "a"))
    assert "tasks" not in on_blueprint.cli.commands
    on_blueprint.register_blueprint(blueprint, url_prefix="/v1")
    assert on_blueprint.cli.commands["tasks"] is tasks_cli

    api = Api()
    factory_made = Flask("factory_made", instance_path=str(tmp_path / "b"))
    api.init_app(factory_made)
    register_async(api, app=factory_made, store="memory://")
    assert factory_made.cli.commands["tasks"] is tasks_cli
    result = factory_made.test_cli_runner().invoke(args=["tasks", "stats", "--json"])
    assert json.loads(result.stdout)["counts"]["queued"] == 0
    for app in (on_blueprint, factory_made):
        get_state(app).close()


def test_an_apps_own_tasks_command_is_kept(tmp_path: Path) -> None:
    app = Flask("own_tasks", instance_path=str(tmp_path))

    @app.cli.command("tasks")
    def own() -> None:
        print("mine")

    register_async(Api(app), store="memory://")
    assert app.test_cli_runner().invoke(args=["tasks"]).stdout == "mine\n"
    app.cli.add_command(tasks_cli, "async-tasks")
    result = app.test_cli_runner().invoke(args=["async-tasks", "list"])
    assert result.stdout == "No tasks.\n"
    get_state(app).close()


# -- the real ``flask`` command, in another process than the server -----------------

# A process that serves tasks_app in its own threads: it finishes one task, holds
# another running until that is cancelled, says so on stdout, and ends when the
# held task has ended.
_WRITER = textwrap.dedent(
    """
    import json, sys, time
    from tests.apps.tasks_app import app

    client = app.test_client()
    done = client.post("/jobs/echo", json={"n": 1}).json["id"]
    client.get(f"/tasks/{done}?wait=10")
    held = client.post("/jobs/sleep?seconds=60").json["id"]
    while client.get(f"/tasks/{held}").json.get("state") != "running":
        time.sleep(0.01)
    print(json.dumps({"done": done, "held": held}), flush=True)
    answer = client.get(f"/tasks/{held}?wait=15")
    print(json.dumps({"status": answer.status_code}), flush=True)
    """
)


def _flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FLASK, "--app", "tests.apps.tasks_app", "tasks", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _operate_from_another_process(env: dict[str, str]) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        ids = json.loads(writer.stdout.readline() or "{}")
        assert ids, writer.communicate(timeout=10)
        done, held = ids["done"], ids["held"]

        listed = _flask(env, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        tasks = json.loads(listed.stdout)["tasks"]
        assert [(task["id"], task["state"]) for task in tasks] == [
            (held, "running"),
            (done, "succeeded"),
        ]
        assert tasks[0]["request"] == {"method": "POST", "path": "/jobs/sleep"}

        stats = json.loads(_flask(env, "stats", "--json").stdout)
        assert stats["counts"]["running"] == 1
        assert stats["counts"]["succeeded"] == 1

        shown = _flask(env, "show", done)
        assert shown.returncode == 0, shown.stderr
        assert "response  200" in shown.stdout
        assert '"echo": {' in shown.stdout

        cancelled = _flask(env, "cancel", held)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout == f"Asked running task {held} to stop.\n"
        answer = json.loads(writer.stdout.readline() or "{}")
        assert answer == {"status": 409}, writer.communicate(timeout=10)
        assert writer.wait(timeout=15) == 0

        forgot = _flask(env, "forget", done)
        assert forgot.returncode == 0, forgot.stderr
        purged = _flask(env, "purge", "--state", "cancelled")
        assert purged.stdout == "Purged 1 finished task.\n", purged.stderr
        assert json.loads(_flask(env, "list", "--json").stdout) == {"tasks": []}
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=10)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASK_")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_flask_tasks_on_a_sqlite_file_of_another_process(tmp_path: Path) -> None:
    env = _env(TASKS_APP_INSTANCE=str(tmp_path), FLASK_RESTFUL_ASYNC_SHORT_WAIT="0")
    _operate_from_another_process(env)
    assert (tmp_path / "restful_async.db").exists()


@pytest.mark.slow
def test_flask_tasks_on_redis(tmp_path: Path) -> None:
    require_redis()
    prefix = f"{{cli-{secrets.token_hex(6)}}}:"
    env = _env(
        TASKS_APP_INSTANCE=str(tmp_path),
        FLASK_RESTFUL_ASYNC_SHORT_WAIT="0",
        FLASK_RESTFUL_ASYNC_STORE='"redis://127.0.0.1:6379/13"',
        FLASK_TASKS_APP_REDIS_PREFIX=json.dumps(prefix),
    )
    try:
        _operate_from_another_process(env)
    finally:
        delete_redis_keys(13, prefix)


def test_an_id_that_starts_with_a_dash_is_an_id(cli_app: Flask) -> None:
    store = get_state(cli_app).store
    task = Task("-" + new_task_id()[1:], owner="alice")
    store.create(task)
    store.start(task.id, "a-worker")
    store.finish(task.id, TaskState.SUCCEEDED, StoredResponse(200, [], b"done"))
    assert as_json(run(cli_app, "show", task.id, "--json"))["response"]["body"] == "done"
    assert run(cli_app, "show", "--json", task.id).exit_code == 0
    assert run(cli_app, "cancel", task.id).exit_code == 1
    assert run(cli_app, "forget", "--", task.id).stdout == f"Forgot task {task.id}.\n"
