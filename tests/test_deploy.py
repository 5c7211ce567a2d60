"""Deploys lose nothing (tests/benchmarks/deploy_run.py): 300 submits to
``gunicorn -w 4`` while it reloads, restarts, loses a worker to SIGKILL or recycles
its workers (``--max-requests 50``); every accepted task ends ``succeeded`` with the
right result, run once, except the tasks the killed worker was running (``lost``)."""

from __future__ import annotations

import pytest

from .benchmarks.deploy_run import SCENARIOS, run
from .services import require_redis

SUBMITS = 300


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_accepted_task_runs_once_through_a_deploy(scenario: str, store: str) -> None:
    if store == "redis":
        require_redis()
    # Tasks of 50 ms, 300 submits and a new server 2 s after the old one stopped (the
    # benchmark's defaults are 100 ms, 600 and 5 s): the submits still outpace the
    # task threads, so each strike (after 100) finds tasks queued and running, and
    # --max-requests 50 recycles each worker at least once, in less time.
    report = run(
        scenario, store, submits=SUBMITS, seconds=0.05, restart_pause=2.0, log=lambda line: None
    )
    print("\n".join(report.lines()))
    assert report.accepted == SUBMITS, report.lines()
    assert report.twice == [], report.lines()
    assert report.wrong == [], report.lines()
    assert report.active == [], report.lines()
    assert len(report.lost) <= report.allowed_lost, report.lines()
    assert report.lost_in_killed_worker, report.lines()
    assert report.outcomes["succeeded"] + len(report.lost) == report.accepted, report.lines()
