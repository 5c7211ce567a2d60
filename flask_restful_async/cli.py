"""``flask tasks``: see and operate every owner's tasks from a shell.

``register_async`` adds the group to the app's CLI (for an Api on a blueprint, to
each app the blueprint is registered on). The commands read and change the store
the app is configured with, from any process: the operator's shell needs the
same ``RESTFUL_ASYNC_STORE`` as the servers, nothing else.

Exit codes: 0 on success; 1, with a one-line message on stderr, for an unknown
task id, a ``cancel`` of a task that has finished, a ``forget`` of one that has
not, or a store that cannot serve (a SQLite file that does not exist included: the
commands never create one); 2 for bad usage.

The group is :data:`tasks_cli`; an app that has a ``tasks`` command of its own
keeps it, and may add this one under another name with
``app.cli.add_command(tasks_cli, "async-tasks")``.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import os
import re
import time
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from . import signals, waiting
from .exceptions import Unavailable
from .state import AsyncState, get_state
from .stores.outages import logger as _store_log
from .stores.sqlite import SQLiteStore
from .task import Task, TaskState, count_text, is_valid_task_id, isoformat

#: How much of a stored response body ``flask tasks show`` prints in its table
#: form (``--json`` gives all of it).
SHOWN_BODY = 4096
#: The most tasks one ``flask tasks list`` prints.
MAX_LIST = 10_000

# Task ids may start with "-": taken as they are rather than as unknown options.
_ID_COMMAND = {"ignore_unknown_options": True}

_FINISHED = [state.value for state in TaskState if state.finished]

tasks_cli = AppGroup("tasks", help="See and operate the background tasks of every owner.")

F = t.TypeVar("F", bound=t.Callable[..., t.Any])


class _LastRecord(logging.Handler):
    """Keeps the message of the last record it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()


def _store_errors(command: F) -> F:
    """Report a store that cannot serve, or cannot do what was asked, as one
    line on stderr and exit code 1, rather than a traceback."""

    @functools.wraps(command)
    def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
        # A store tells what went wrong (which store, what it said) to its log
        # only; the one line on stderr says it. Being a handler, this also keeps
        # logging's last resort from printing the same again where logging is not
        # configured; configured handlers still get the record.
        store = _state().store
        if isinstance(store, SQLiteStore) and not os.path.exists(store.path):
            # Opened, it would be made (with its folder): a mistyped path or another
            # instance folder would read as an empty, healthy store.
            _fail(
                f"no task store at {store.path}: no process of this app has used it"
                " (check RESTFUL_ASYNC_STORE, and the instance folder)"
            )
        detail = _LastRecord()
        _store_log.addHandler(detail)
        try:
            return command(*args, **kwargs)
        except Unavailable as e:
            _fail(detail.message or f"the task store {_state().store.url}: {e.message}")
        except NotImplementedError as e:
            _fail(str(e))
        finally:
            _store_log.removeHandler(detail)

    return t.cast(F, run)


def _fail(message: str) -> t.NoReturn:
    click.echo(f"Error: {message}", err=True)
    raise click.exceptions.Exit(1)


def _state() -> AsyncState:
    return get_state(current_app)


def _find(task_id: str) -> Task:
    """The task with that id, whoever owns it; exit 1 when there is none."""
    task = _state().store.get(task_id) if is_valid_task_id(task_id) else None
    if task is None:
        _fail(f"no task {task_id!r}")
    return task


def _document(task: Task) -> dict[str, t.Any]:
    """The status document, with what operators see besides: owner and endpoint."""
    return {
        **task.status_document(),
        "owner": task.owner,
        "endpoint": task.endpoint,
        "expired": task.expired,
    }


def _seconds(timestamp: float | None) -> str:
    text = isoformat(timestamp)
    return "-" if text is None else text[:19] + "Z"


def _progress(task: Task) -> str:
    progress = task.progress
    if progress is None:
        return "-"
    shown = count_text(progress.current)
    if progress.total is not None:
        shown += f"/{count_text(progress.total)}"
    if progress.message:
        shown += f" {progress.message}"
    return shown


#: Control characters (C0, DEL, C1), what a terminal may take for a command, and
#: the invisible characters that reorder or hide text there (bidirectional marks,
#: embeddings, overrides and isolates; zero-width characters; line and paragraph
#: separators): a caller's "\u202e" in a path would show a listing's row reversed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _safe(text: str, keep: str = "") -> str:
    """``text`` with its control and invisible characters written as escapes
    (``\\x1b``, ``\\u202e``), but those in ``keep``: a task's path, message,
    headers and body come from API callers, and an escape sequence reaching the
    operator's terminal could clear it, retitle it, hide text or fake rows of a
    listing."""
    return _CONTROL.sub(
        lambda found: found[0] if found[0] in keep else found[0].encode("unicode_escape").decode(),
        text,
    )


def _table(header: t.Sequence[str], rows: t.Sequence[t.Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (every cell made
    safe for a terminal, see :func:`_safe`)."""
    rows = [[_safe(cell) for cell in row] for row in rows]
    every = [header, *rows] if header else list(rows)
    widths = [max(len(row[i]) for row in every) for i in range(len(every[0]))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in every)
    return "\n".join(line.rstrip() for line in lines)


def _echo_json(data: t.Any) -> None:
    click.echo(json.dumps(data, indent=2))


@tasks_cli.command("list")
@click.option(
    "--state", type=click.Choice([state.value for state in TaskState]), help="Only this state."
)
@click.option("--owner", help="Only the tasks of this owner (as the owner callable names it).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIST),
    default=50,
    show_default=True,
    help="The most tasks shown.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_store_errors
def list_command(state: str | None, owner: str | None, limit: int, as_json: bool) -> None:
    """Tasks of every owner (or of one), newest first."""
    store = _state().store
    wanted = TaskState(state) if state is not None else None
    if owner is not None:
        tasks = store.list(owner=owner, state=wanted, limit=limit)
    else:
        tasks = store.list_all(state=wanted, limit=limit)
    if as_json:
        _echo_json({"tasks": [_document(task) for task in tasks]})
        return
    if not tasks:
        click.echo("No tasks.")
        return
    rows = [
        [
            task.id,
            task.state.value,
            task.method or "-",
            task.path or "-",
            _seconds(task.created_at),
            _progress(task),
        ]
        for task in tasks
    ]
    click.echo(_table(["ID", "STATE", "METHOD", "PATH", "CREATED", "PROGRESS"], rows))


@tasks_cli.command("show", context_settings=_ID_COMMAND)
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@_store_errors
def show_command(task_id: str, as_json: bool) -> None:
    """A task's status and, once it has finished, its stored response."""
    task = _find(task_id)
    response = task.response
    if as_json:
        stored: dict[str, t.Any] | None = None
        if response is not None:
            stored = {"status": response.status, "headers": [list(h) for h in response.headers]}
            try:
                stored["body"] = response.body.decode()
            except UnicodeDecodeError:
                stored["body_base64"] = base64.b64encode(response.body).decode("ascii")
        _echo_json({"task": _document(task), "response": stored})
        return
    fields = [
        ("id", task.id),
        (
            "state",
            task.state.value + (" (cancellation requested)" if task.cancel_requested else ""),
        ),
        ("request", f"{task.method or '-'} {task.path or '-'}"),
        ("endpoint", task.endpoint or "-"),
        ("owner", task.owner if task.owner is not None else "-"),
        ("created", _seconds(task.created_at)),
        ("started", _seconds(task.started_at)),
        ("finished", _seconds(task.finished_at)),
        ("progress", _progress(task)),
    ]
    if task.expired:
        fields.append(("response", "expired (the status URL answers 410)"))
    elif response is None:
        fields.append(("response", "-"))
    click.echo(_table((), fields))
    if response is None:
        return
    click.echo(f"response  {response.status}")
    for name, value in response.headers:
        click.echo(f"  {_safe(name)}: {_safe(value)}")
    click.echo()
    shown = _safe(response.body[:SHOWN_BODY].decode(errors="replace"), keep="\n\t")
    click.echo(shown, nl=not shown.endswith("\n"))
    if len(response.body) > SHOWN_BODY:
        click.echo(f"[... {len(response.body) - SHOWN_BODY} more bytes; --json shows them all]")


@tasks_cli.command("cancel", context_settings=_ID_COMMAND)
@click.argument("task_id")
@_store_errors
def cancel_command(task_id: str) -> None:
    """Cancel a queued or running task, as DELETE on its status URL does.

    A queued task ends cancelled at once and its handler never runs; a running
    one is asked to stop (its handler sees ``current_task.cancelled``).
    """
    state = _state()
    task = _find(task_id)
    if task.state.finished:
        _fail(
            f"task {task.id} has already finished ({task.state.value}): nothing to cancel;"
            f" 'flask tasks forget {task.id}' deletes it"
        )
    cancelled = state.store.request_cancel(task.id)
    if cancelled is None:
        _fail(f"no task {task_id!r}")
    if cancelled.state is TaskState.CANCELLED:
        waiting.notify(state.store, cancelled.id)
        state.executor.cancel(state.app, cancelled.id)
        if signals.task_finished.receivers:
            # It ended here, as with DELETE: no worker will tell.
            signals.send(signals.task_finished, state.app, task=cancelled)
        click.echo(f"Cancelled task {cancelled.id}: it was queued, its handler will not run.")
    elif cancelled.state.finished:
        click.echo(f"Task {cancelled.id} finished meanwhile ({cancelled.state.value}).")
    else:
        click.echo(f"Asked running task {cancelled.id} to stop.")


@tasks_cli.command("forget", context_settings=_ID_COMMAND)
@click.argument("task_id")
@_store_errors
def forget_command(task_id: str) -> None:
    """Delete a finished task: its status URL then answers 404."""
    state = _state()
    task = _find(task_id)
    if not task.state.finished:
        _fail(
            f"task {task.id} is still {task.state.value}:"
            f" 'flask tasks cancel {task.id}' first, then forget it"
        )
    state.store.delete(task.id)
    waiting.notify(state.store, task.id)
    click.echo(f"Forgot task {task.id}.")


def _finite_seconds(value: float) -> float:
    # click's ranges let NaN through (it compares false with both bounds).
    if not math.isfinite(value):
        raise click.BadParameter("must be a finite number of seconds")
    return value


@tasks_cli.command("purge")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    callback=lambda ctx, param, value: _finite_seconds(value),
    default=0,
    metavar="SECONDS",
    help="Only tasks that finished more than this long ago (default: every finished task).",
)
@click.option("--state", type=click.Choice(_FINISHED), help="Only tasks that ended this way.")
@_store_errors
def purge_command(older_than: float, state: str | None) -> None:
    """Delete finished tasks (results and tombstones); queued and running ones stay."""
    store = _state().store
    count = store.purge_finished(
        older_than=older_than, state=TaskState(state) if state is not None else None
    )
    click.echo(f"Purged {count} finished task{'' if count == 1 else 's'}.")


@tasks_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@_store_errors
def stats_command(as_json: bool) -> None:
    """Live tasks counted by state, and the age of the oldest queued one."""
    stats = _state().store.stats()
    age = None if stats.oldest_queued_at is None else max(0.0, time.time() - stats.oldest_queued_at)
    if as_json:
        _echo_json(
            {
                "counts": {state.value: count for state, count in stats.counts.items()},
                "oldest_queued_age": None if age is None else round(age, 3),
            }
        )
        return
    rows = [[state.value, str(count)] for state, count in stats.counts.items()]
    click.echo(_table(["STATE", "TASKS"], rows))
    click.echo(f"oldest queued: {'-' if age is None else f'{age:.1f} s ago'}")
