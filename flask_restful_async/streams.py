"""Server-Sent Events: a task's changes as they happen (CONTRACT section 6.5).

``GET <status URL>`` with ``Accept: text/event-stream`` answers ``200`` and a
stream of events::

    id: 3f0c7a9e51d2b4c8
    event: status
    data: {"id": "...", "state": "running", ..., "progress": {"current": 3, ...}}

    id: done
    event: done
    data: {"status": 201}

One ``status`` event with the status document at once, and one after every change
(start, progress, end); when the task has finished, a last ``done`` event whose
``status`` is the code the status URL now answers, and the stream ends. A status
event's ``id`` is a digest of its document: a client that reconnects with
``Last-Event-ID`` is sent the document only if it differs from the one it saw,
and a client that saw ``done`` is answered ``204 No Content`` (which tells a
browser's ``EventSource`` to stop reconnecting).

``GET <list URL>`` with ``Accept: text/event-stream`` (``?state=`` and ``?limit=``
as for the JSON list): the same events for every task of the caller on that
page, newest first, then as they change; a ``done`` event there names its task
(``{"id": ..., "status": ...}``), comes again if that code changes (the task is
forgotten: 404; its result expires: 410), and the stream goes on. Its ids carry the time of
the read that produced them (and, on the last event of each read, a digest of the
whole page): a reconnect is sent only the tasks that may have changed since
(created, started or finished after that time, or still queued or running, whose
progress keeps no time), or nothing when the page is as it was.

Both send a comment line (``: keep-alive``) after ``RESTFUL_ASYNC_STREAM_KEEPALIVE``
seconds without an event (15 by default, so that proxies keep the connection
open) and end after ``RESTFUL_ASYNC_MAX_STREAM`` seconds (a client reconnects).
A stream waits on :mod:`flask_restful_async.waiting` between events: it holds
no store connection then; streams on one task in a process share each read. A
store that stops answering mid-stream is read again (at most once a second)
until it answers or the stream's time is up, never ended with an error: a
browser does not reconnect after an error status.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing as t
from collections.abc import Iterator

from flask import Response, current_app, request

from . import stopping, waiting
from .exceptions import Unavailable
from .responses import NO_STORE, no_content
from .task import Task, TaskState

if t.TYPE_CHECKING:
    from .state import AsyncState

EVENT_STREAM = "text/event-stream"
#: The id of the ``done`` event of a task's stream.
DONE_ID = "done"
#: Seconds between two reads of the caller's tasks by a list stream, at least:
#: news of every change (with SQLite, of every commit) is taken in batches.
LIST_READ_INTERVAL = 0.05
#: Seconds between two reads of a followed task (or list) when nothing was heard:
#: a task whose process died reads ``lost`` only when read.
RECHECK_INTERVAL = waiting.RECHECK_INTERVAL
#: Seconds between two tries while the store does not answer.
RETRY_INTERVAL = 1.0
#: Seconds of clock difference between machines that a list stream's reconnect
#: allows for: tasks that changed this long before the time in ``Last-Event-ID``
#: are sent again.
CLOCK_SLACK = 1.0

_KEEP_ALIVE = b": keep-alive\n\n"
#: Headers of every stream: never cached, never buffered by nginx.
_STREAM_HEADERS = {**NO_STORE, "X-Accel-Buffering": "no"}


def wants_stream() -> bool:
    """Whether the request asks for an event stream rather than JSON: its
    ``Accept`` names ``text/event-stream`` (in any case: media types are not
    case-sensitive) and does not rank JSON above it. ``*/*`` alone, or
    ``text/*``, does not name it; with the two named alike (``text/event-stream,
    application/json``), the stream, which the client named, not the default."""
    accept = request.environ.get("HTTP_ACCEPT")
    if not accept or EVENT_STREAM not in accept.lower():
        return False
    accepted = request.accept_mimetypes
    wanted = accepted.quality(EVENT_STREAM)
    return wanted > 0 and wanted >= accepted.quality("application/json")


class Timing(t.NamedTuple):
    """How long a stream may last, and how long it may stay silent (seconds)."""

    max_stream: float
    keepalive: float

    @classmethod
    def from_config(cls) -> Timing:
        config = current_app.config
        return cls(
            float(config["RESTFUL_ASYNC_MAX_STREAM"]),
            float(config["RESTFUL_ASYNC_STREAM_KEEPALIVE"]),
        )


def answer_code(state: AsyncState, task: Task | None) -> int:
    """The code a plain ``GET`` of the task's status URL answers now."""
    if task is None:
        return 404
    if task.expired:
        return 410
    if not task.state.finished:
        return 202
    if task.response is None:
        return 409 if task.state is TaskState.CANCELLED else 500
    if state.result_redirect:
        return 303
    return task.response.status


def event(name: str, data: bytes, event_id: str | None) -> bytes:
    """One event; without an id line when ``event_id`` is None, which leaves the
    client's last event id as it was (the HTML standard's EventSource rules)."""
    if event_id is None:
        return b"event: %s\ndata: %s\n\n" % (name.encode(), data)
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), name.encode(), data)


def document_of(task: Task) -> tuple[bytes, str]:
    """A task's status document as one line of JSON, and its digest."""
    data = json.dumps(task.status_document(), separators=(",", ":")).encode()
    return data, hashlib.blake2b(data, digest_size=8).hexdigest()


def stream_response(events: Iterator[bytes], on_close: t.Callable[[], None]) -> Response:
    response: Response = current_app.response_class(
        events, status=200, mimetype=EVENT_STREAM, headers=_STREAM_HEADERS
    )
    # Also when the body is never iterated (the client left first).
    response.call_on_close(on_close)
    return response


def no_more_events() -> Response:
    """``204``: everything was seen; an ``EventSource`` stops reconnecting."""
    return no_content()


class _Clock:
    """When a stream ends, and when it owes a keep-alive comment."""

    def __init__(self, timing: Timing) -> None:
        now = time.monotonic()
        self.keepalive = timing.keepalive
        self.deadline = now + timing.max_stream
        self.ping_at = now + timing.keepalive
        self.recheck_at = now + RECHECK_INTERVAL

    def sent(self) -> None:
        self.ping_at = time.monotonic() + self.keepalive

    def timeout(self) -> float:
        """Seconds to wait for news before something is due (0: now)."""
        return max(0.0, min(self.deadline, self.ping_at, self.recheck_at) - time.monotonic())

    def over(self) -> bool:
        # A stopping process ends its streams: their clients reconnect elsewhere.
        return stopping.begun() or time.monotonic() >= self.deadline

    def ping_due(self) -> bool:
        return time.monotonic() >= self.ping_at

    def recheck_due(self) -> bool:
        return time.monotonic() >= self.recheck_at

    def checked(self, interval: float = RECHECK_INTERVAL) -> None:
        self.recheck_at = time.monotonic() + interval


def _next_look(
    clock: _Clock, subscription: waiting.Subscription
) -> t.Generator[bytes, None, bool | None]:
    """Keep-alive comments until it is time to read again: returns whether news
    was heard (False: only the periodic recheck is due), or None once the stream
    has lasted its time. Used as ``heard = yield from _next_look(...)``."""
    while True:
        if clock.over():
            return None
        if clock.ping_due():
            clock.sent()
            yield _KEEP_ALIVE
        heard = subscription.wait(clock.timeout())
        if heard or clock.recheck_due():
            return heard


# -- a task's stream -------------------------------------------------------------------


def task_stream(
    state: AsyncState,
    subscription: waiting.Subscription,
    task: Task,
    document: tuple[bytes, str] | None,
    last_id: str | None,
    timing: Timing,
) -> Response:
    """The stream of ``task`` and its ``document`` (:func:`document_of`, read
    through ``subscription`` after it was made), for a client that last saw the
    event ``last_id``; 204 if that was ``done``."""
    if last_id == DONE_ID and (task.state.finished or task.expired):
        subscription.close()
        return no_more_events()
    events = _task_events(state, subscription, task, document, last_id, _Clock(timing))
    return stream_response(events, subscription.close)


def _task_events(
    state: AsyncState,
    subscription: waiting.Subscription,
    task: Task | None,
    document: tuple[bytes, str] | None,
    seen: str | None,
    clock: _Clock,
) -> Iterator[bytes]:
    first = True
    try:
        while True:
            if document is not None:
                data, digest = document
                if digest != seen:
                    seen = digest
                    clock.sent()
                    yield event("status", data, digest)
                elif first:
                    # Nothing new since the client's last event (a reconnect): a
                    # comment, so that the answer's head goes out now rather than
                    # with the first keep-alive.
                    clock.sent()
                    yield _KEEP_ALIVE
            if task is None or task.expired or task.state.finished:
                code = answer_code(state, task)
                yield event("done", b'{"status":%d}' % code, DONE_ID)
                return
            first = False
            while True:
                heard = yield from _next_look(clock, subscription)
                if heard is None:
                    return
                try:
                    # Read afresh when nothing was heard: a lost task shows only then.
                    task, document = subscription.read(document_of, fresh=not heard)
                except Unavailable:
                    clock.checked(RETRY_INTERVAL)
                    continue
                clock.checked()
                break
    finally:
        subscription.close()


# -- the stream of a caller's tasks ------------------------------------------------------


class ListQuery(t.NamedTuple):
    """Which tasks a list stream follows: those ``GET /tasks`` would list; with
    ``every``, every owner's (an operator's dashboard)."""

    owner: str | None
    state: TaskState | None
    limit: int
    before: str | None
    every: bool = False

    def read(self, state: AsyncState) -> list[Task]:
        if self.every:
            return state.store.list_all(state=self.state, limit=self.limit, before=self.before)
        return state.store.list(
            owner=self.owner, state=self.state, limit=self.limit, before=self.before
        )

    def get(self, state: AsyncState, task_id: str) -> Task | None:
        """The task, if it is one this query may follow."""
        if self.every:
            return state.store.get(task_id)
        return state.store.get_owned(task_id, self.owner)


class _Seen(t.NamedTuple):
    """What a list stream's client saw of a task: its document's digest, and the
    code of the last ``done`` event (None before the task ended)."""

    digest: str
    code: int | None


def _ended_code(state: AsyncState, task: Task | None) -> int | None:
    """The code a ``done`` event gives for ``task``; None while it is active."""
    if task is None or task.expired or task.state.finished:
        return answer_code(state, task)
    return None


def list_stream(
    state: AsyncState,
    subscription: waiting.Subscription,
    query: ListQuery,
    tasks: list[Task],
    last_id: str | None,
    timing: Timing,
) -> Response:
    """The stream of the caller's tasks, first read (``tasks``) after
    ``subscription`` was made, for a client that last saw the event ``last_id``."""
    return stream_response(
        _list_events(state, subscription, query, tasks, last_id, _Clock(timing)),
        subscription.close,
    )


def _page_digest(tasks: list[Task], seen: dict[str, _Seen]) -> str:
    text = ",".join(f"{task.id}:{seen[task.id].digest}" for task in tasks)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _parse_list_id(last_id: str | None) -> tuple[float | None, str | None]:
    """``(time, page digest)`` of a list stream's event id; Nones if it is not one."""
    if not last_id:
        return None, None
    stamp, _, page = last_id.partition(".")
    if not (0 < len(stamp) <= 16 and stamp.isascii() and stamp.isdigit()):
        return None, None
    return int(stamp) / 1000, page or None


def _maybe_changed_since(task: Task, since: float) -> bool:
    if not task.state.finished and not task.expired:
        return True  # its progress keeps no time
    times = (task.created_at, task.started_at, task.finished_at)
    return max(moment for moment in times if moment is not None) >= since - CLOCK_SLACK


def _list_events(
    state: AsyncState,
    subscription: waiting.Subscription,
    query: ListQuery,
    tasks: list[Task],
    last_id: str | None,
    clock: _Clock,
) -> Iterator[bytes]:
    seen: dict[str, _Seen] = {}
    since, page = _parse_list_id(last_id)
    try:
        read_at = time.time()
        last_read = time.monotonic()
        if since is not None:
            # What the client saw before it reconnected: not sent again.
            for task in tasks:
                if page is not None or not _maybe_changed_since(task, since):
                    _, digest = document_of(task)
                    seen[task.id] = _Seen(digest, _ended_code(state, task))
            if page is not None and _page_digest(tasks, seen) != page:
                seen = {
                    task.id: seen[task.id]
                    for task in tasks
                    if not _maybe_changed_since(task, since)
                }
        first = True
        while True:
            batch = list(_list_changes(state, query, tasks, seen))
            if not batch and first:
                # Nothing to send yet (an empty list, or nothing new since the
                # client's last event): a comment, so that the answer's head goes
                # out now rather than with the first keep-alive.
                yield _KEEP_ALIVE
                clock.sent()
            first = False
            if batch:
                # Only the batch's last event carries an id: a client that left
                # in the middle of a batch comes back with the id of the batch
                # before, and gets the whole of this one again.
                stamp = str(int(read_at * 1000))
                last = len(batch) - 1
                for number, (name, data) in enumerate(batch):
                    event_id = None
                    if number == last:
                        event_id = f"{stamp}.{_page_digest(tasks, seen)}"
                    yield event(name, data, event_id)
                clock.sent()
            while True:
                if (yield from _next_look(clock, subscription)) is None:
                    return
                # News comes in bursts (SQLite: every commit): take it in batches.
                pause = last_read + LIST_READ_INTERVAL - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                    subscription.wait(0)  # what the pause covered is in this read
                try:
                    read_at, last_read = time.time(), time.monotonic()
                    tasks = query.read(state)
                except Unavailable:
                    clock.checked(RETRY_INTERVAL)
                    continue
                clock.checked()
                break
    finally:
        subscription.close()


def _list_changes(
    state: AsyncState, query: ListQuery, tasks: list[Task], seen: dict[str, _Seen]
) -> Iterator[tuple[str, bytes]]:
    """The events that bring a client who saw ``seen`` up to ``tasks`` (and
    update ``seen``): a status event for each task whose document changed, and a
    done event for each that finished (or went away)."""
    listed = set()
    for task in tasks:
        listed.add(task.id)
        yield from _task_changes(state, task.id, task, seen)
    for task_id in [task_id for task_id in seen if task_id not in listed]:
        # Gone from the page: deleted, expired, out of the state filter, or
        # pushed down by newer tasks. Only the last is not worth an event.
        try:
            gone = query.get(state, task_id)
        except Unavailable:
            continue  # asked again on the next read
        if gone is not None and not gone.expired and not gone.state.finished:
            del seen[task_id]  # pushed down the list, still active: no longer followed
            continue
        yield from _task_changes(state, task_id, gone, seen)
        del seen[task_id]


def _task_changes(
    state: AsyncState, task_id: str, task: Task | None, seen: dict[str, _Seen]
) -> Iterator[tuple[str, bytes]]:
    before = seen.get(task_id)
    if task is not None:
        data, digest = document_of(task)
        if before is None or before.digest != digest:
            yield "status", data
    else:
        digest = before.digest if before is not None else ""
    code = _ended_code(state, task)
    # Once when the task ends, and again if the answer changes (forgotten: 404).
    if code is not None and (before is None or before.code != code):
        yield "done", b'{"id":"%s","status":%d}' % (task_id.encode(), code)
    seen[task_id] = _Seen(digest, code)
