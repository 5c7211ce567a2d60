"""The fault run (tests/benchmarks/fault_run.py), short: submits under load while
the Redis store is stopped and started again and a gunicorn worker is SIGKILLed;
every accepted task ends, with the right result if it succeeded."""

from __future__ import annotations

import pytest

from .benchmarks.fault_run import run


@pytest.mark.slow
def test_a_short_fault_run_leaves_no_task_queued_or_running() -> None:
    report = run(15, outage=3, lease=5, rate=30, log=lambda line: None)
    print("\n".join(report.lines()))
    assert report.accepted > 100, report.lines()
    assert report.refused > 0, "the store outage should have refused some submits"
    assert report.active == [], report.lines()
    assert report.wrong == [], report.lines()
    assert set(report.outcomes) <= {"succeeded", "failed", "cancelled", "lost"}, report.lines()
    assert report.outcomes["succeeded"] >= report.accepted * 0.9, report.lines()
