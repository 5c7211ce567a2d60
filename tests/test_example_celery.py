"""``make demo-celery``: examples/demo_celery.py end to end (a Celery worker, gunicorn, Redis)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .servers import ROOT
from .services import require_redis


def test_demo_celery_runs_the_job_in_the_worker() -> None:
    require_redis()
    env = {**os.environ, "CATCHALL_SECONDS": "1"}
    env.pop("RESTFUL_ASYNC_REQUIRE_SERVICES", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo_celery.py")],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "202 ACCEPTED  Location: /status/" in output
    # each 202 shows the task's state (and its progress, once the worker reports it)
    assert re.search(r"^ +\d+\.\ds  (queued|running)", output, re.MULTILINE), output
    assert "200 OK  application/json" in output
    assert '"The answer is: hello/celery"' in output
    assert "starting processing task, path: 'hello/celery'" in output
    assert "The handler ran in pid" in output
    assert ": the Celery worker (web pids:" in output
    assert "deleted" in output
    assert "Redis keys." in output
