"""The task record, its ids and its status document."""

from __future__ import annotations

import base64
import random
import time
from datetime import UTC, datetime

import pytest

from flask_restful_async import Progress, Task, TaskState
from flask_restful_async.task import is_valid_task_id, isoformat, new_task_id


def test_ids_are_128_random_bits_url_safe() -> None:
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    for task_id in ids:
        assert is_valid_task_id(task_id)
        assert len(base64.urlsafe_b64decode(task_id + "==")) == 16


def test_only_ids_we_could_issue_are_valid() -> None:
    for bad in ("", "short", "a" * 23, "a" * 21 + "/", "a" * 21 + "=", "a" * 21 + "\n"):
        assert not is_valid_task_id(bad)


def test_states_know_whether_they_are_final() -> None:
    assert {s for s in TaskState if not s.finished} == {TaskState.QUEUED, TaskState.RUNNING}
    assert TaskState("lost") is TaskState.LOST


def test_status_document_shape_and_times() -> None:
    task = Task(id="x" * 22, created_at=0.0, progress=Progress(3, 10, "crunching"))
    assert task.status_document() == {
        "id": "x" * 22,
        "state": "queued",
        "created_at": "1970-01-01T00:00:00.000Z",
        "started_at": None,
        "finished_at": None,
        "progress": {"current": 3, "total": 10, "message": "crunching"},
    }
    assert isoformat(None) is None


def _by_datetime(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_isoformat_gives_what_datetime_gives() -> None:
    rng = random.Random(12)
    now = time.time()
    samples = [0.0, 0.0005, 0.9995, 0.9999995, 0.9999994, 59.9999996, 1e9 + 0.0004995]
    samples += [now + rng.uniform(-3, 3) for _ in range(2000)]
    samples += [rng.uniform(0, 4e9) for _ in range(2000)]
    # Fractions at the rounding edges of microseconds and of milliseconds.
    edges = (0.0000005, 0.0000015, 0.0009995, 0.0009999995, 0.999999, 0.9999995)
    samples += [whole + edge for whole in (1, 1_700_000_000, 4_000_000_000) for edge in edges]
    for timestamp in samples:
        assert isoformat(timestamp) == _by_datetime(timestamp), timestamp
    # In turn, so that each finds another second than the last one formatted.
    for timestamp in (5.25, 1e9 + 0.5, 5.75, 5.75):
        assert isoformat(timestamp) == _by_datetime(timestamp)
    # Past the cache's range, as datetime does: a negative time, and its error
    # past the year 9999.
    assert isoformat(-1.5) == _by_datetime(-1.5)
    with pytest.raises((ValueError, OverflowError, OSError)):
        isoformat(1e13)


def test_progress_keeps_the_time_of_its_report_out_of_the_document() -> None:
    progress = Progress(3, 10, "crunching", at=1700000000.5)
    assert progress.to_dict() == {"current": 3, "total": 10, "message": "crunching"}
    assert progress.to_stored() == {**progress.to_dict(), "at": 1700000000.5}
    assert Progress.from_dict(progress.to_stored()).at == 1700000000.5
    assert Progress.from_dict(progress.to_dict()).at is None  # a record of an earlier version
    for odd in ("1", True, None, float("nan"), [1]):
        assert Progress.from_dict({**progress.to_dict(), "at": odd}).at is None
    # The same report at another time is no change.
    assert progress == Progress(3, 10, "crunching", at=5.0)
    task = Task(id="x" * 22, progress=progress)
    assert task.status_document()["progress"] == progress.to_dict()


def test_status_document_tells_the_request_when_known() -> None:
    task = Task(id="x" * 22, endpoint="reports", method="POST", path="/reports")
    assert task.status_document()["request"] == {"method": "POST", "path": "/reports"}
    assert "request" not in Task(id="x" * 22).status_document()
