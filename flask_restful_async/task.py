"""The task record: its states, its progress, its stored final response."""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
import os
import re
import threading
import time
import typing as t
from datetime import UTC, datetime

#: Task ids are 16 random bytes (128 bits) in URL-safe base64, without padding.
TASK_ID_BYTES = 16
_TASK_ID_RE = re.compile(r"[A-Za-z0-9_-]{22}")


class TaskState(enum.StrEnum):
    """Where a task is in its life. ``str`` values are what the status document shows."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def finished(self) -> bool:
        """True once the task will never change state again."""
        return self not in _ACTIVE_STATES


_ACTIVE_STATES = frozenset((TaskState.QUEUED, TaskState.RUNNING))


class _RandomBytes:
    """os.urandom, read in blocks of 4 KiB and handed out 16 bytes at a time.

    ``os.urandom`` releases the GIL around its system call, and a worker thread
    waiting for the GIL then takes it: one such hand-over per submit costs more
    than the whole rest of the submit path. Reading a block at a time keeps the
    bytes the same quality (they all come from the kernel's CSPRNG) and makes the
    hand-over rare. The buffer is emptied in a forked child, so that parent and
    child never hand out the same bytes.
    """

    BLOCK = 4096

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._offset = 0

    def take(self, size: int) -> bytes:
        with self._lock:
            if self._offset + size > len(self._block):
                self._block = os.urandom(self.BLOCK)
                self._offset = 0
            chunk = self._block[self._offset : self._offset + size]
            self._offset += size
            return chunk


_random = _RandomBytes()


def new_task_id() -> str:
    """128 random bits, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(_random.take(TASK_ID_BYTES)).rstrip(b"=").decode("ascii")


def is_valid_task_id(value: str) -> bool:
    """Tell ids we could have issued from anything else, without touching a store."""
    return _TASK_ID_RE.fullmatch(value) is not None


def is_task_id_then(value: str, suffix: str) -> bool:
    """Whether ``value`` is a task id followed by ``suffix`` (``"/result"``): what a
    rule's path converter takes for an id when another rule serves that URL with
    other methods, and which deserves that URL's 405 rather than a 404."""
    return value.endswith(suffix) and is_valid_task_id(value[: -len(suffix)])


#: The first timestamp past the year 9999, which ``datetime`` refuses.
_TIMESTAMP_LIMIT = 253_402_300_800
#: The last whole second formatted, and its text: the times of a status document,
#: and of a page of them, mostly fall within a few seconds.
_last_second: tuple[int, str] = (-1, "")


def isoformat(timestamp: float | None) -> str | None:
    """``timestamp`` (seconds since the epoch) as ISO 8601 UTC to the millisecond,
    e.g. ``2026-11-24T10:00:00.123Z``; None for None.

    The same text as ``datetime.fromtimestamp(timestamp, UTC).isoformat(timespec=
    "milliseconds")`` with ``Z`` (microseconds rounded half to even, then cut to
    milliseconds), in a quarter of its time: on every status document, three
    times, and fifty documents to a page of the task list."""
    global _last_second
    if timestamp is None:
        return None
    if not 0 <= timestamp < _TIMESTAMP_LIMIT:
        moment = datetime.fromtimestamp(timestamp, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fraction, whole = math.modf(timestamp)
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{micros // 1000:03d}Z"


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the handler last reported through ``current_task.progress``."""

    current: float
    total: float | None = None
    message: str | None = None
    #: When the handler reported it (a POSIX time): the rate that ``Retry-After`` is
    #: estimated from is the one seen up to then, not up to a later poll's. Kept by
    #: the stores, never in the status document; None in a record of an earlier
    #: version. Not compared: the same report twice is no change.
    at: float | None = dataclasses.field(default=None, compare=False)

    def to_dict(self) -> dict[str, t.Any]:
        """As the status document shows it."""
        return {"current": self.current, "total": self.total, "message": self.message}

    def to_stored(self) -> dict[str, t.Any]:
        """As the stores keep it: :meth:`to_dict` and the time of the report."""
        stored = self.to_dict()
        if self.at is not None:
            stored["at"] = self.at
        return stored

    @classmethod
    def from_dict(cls, data: t.Mapping[str, t.Any]) -> Progress:
        at = data.get("at")
        if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
            at = None
        return cls(data["current"], data.get("total"), data.get("message"), at)


def count_text(value: float) -> str:
    """A progress count as people read it: ``3`` for 3 and 3.0, ``2.5`` for 2.5; an
    int too large for a float (a store or server of an earlier version may hold
    one) as it is."""
    try:
        return f"{value:g}"
    except (OverflowError, TypeError, ValueError):
        return str(value)


class StoredResponse(t.NamedTuple):
    """A finished task's response, serialized in the worker: status, headers, body
    bytes. Immutable, and cheap to make (one is made on every poll)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclasses.dataclass
class Task:
    """One background run of a resource method, as every store keeps it.

    Times are POSIX timestamps (seconds). ``response`` is set once the task has
    finished with a response of its own (succeeded or failed). ``expired`` marks a
    tombstone: the result is gone, only the fact that the task existed is kept.
    ``rerun`` says that the handler may run again if the process running it dies
    (the resource's ``rerun_on_crash``): such a task goes back to the queue rather
    than reading lost. ``endpoint``, ``method`` (upper case) and ``path`` tell
    which request made the task (None in records written before they were kept).
    """

    id: str
    state: TaskState = TaskState.QUEUED
    created_at: float = dataclasses.field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    owner: str | None = None
    idempotency_key: str | None = None
    fingerprint: str | None = None
    cancel_requested: bool = False
    worker: str | None = None
    response: StoredResponse | None = None
    expired: bool = False
    rerun: bool = False
    endpoint: str | None = None
    method: str | None = None
    path: str | None = None

    def status_document(self) -> dict[str, t.Any]:
        """The JSON body clients see while polling (CONTRACT section 3)."""
        doc: dict[str, t.Any] = {
            "id": self.id,
            "state": self.state.value,
            "created_at": isoformat(self.created_at),
            "started_at": isoformat(self.started_at),
            "finished_at": isoformat(self.finished_at),
            "progress": self.progress.to_dict() if self.progress is not None else None,
        }
        if self.method is not None and self.path is not None:
            doc["request"] = {"method": self.method, "path": self.path}
        if self.cancel_requested:
            doc["cancel_requested"] = True
        return doc
