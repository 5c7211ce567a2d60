"""``make demo``: serve examples/catchall.py with gunicorn on 127.0.0.1, run the client, stop.

The job takes ``CATCHALL_SECONDS`` (3 by default here). The exit status is the
client's: 0 when the final response is below 400. The server runs in debug mode
(``FLASK_DEBUG=1``), which turns the dashboard on; the demo prints its URL and,
run from a terminal, keeps the server up until Enter is pressed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from client import follow  # examples/client.py: this script's directory is on sys.path
from demo_support import HOST, exit_on_sigterm, free_port, stop, wait_for_web

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
DEFAULT_SECONDS = "3"  # the job's length, unless CATCHALL_SECONDS is set


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.setdefault("CATCHALL_SECONDS", DEFAULT_SECONDS)
    env["FLASK_DEBUG"] = "1"  # the dashboard is on in debug mode (examples/catchall.py)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "4"]
    # --log-level warning: no boot chatter; the app's own log lines still show.
    command += ["-b", f"{HOST}:{port}", "--log-level", "warning", "examples.catchall:app"]
    # A session of its own: a Ctrl-C meant for us does not reach it; we stop it below.
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


def main() -> int:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    port = free_port()
    base = f"http://{HOST}:{port}"
    server = start_server(port)
    try:
        error = wait_for_web(server, port, START_TIMEOUT)
        if error is not None:
            print(f"error: {error}", flush=True)
            return 2
        seconds = os.environ.get("CATCHALL_SECONDS", DEFAULT_SECONDS)
        print(
            f"gunicorn serves examples/catchall.py on {base}: 2 processes with 4 threads\n"
            "each, sharing the task store (a SQLite file in examples/instance/).\n"
            f"GET /hello/world starts a {seconds} s job: the server answers 202 Accepted at"
            " once,\nthe client polls the Location every Retry-After seconds until the"
            " answer is ready.\n"
            f"The dashboard shows it live: {base}/dashboard\n",
            flush=True,
        )
        status = follow(base + "/hello/world")
        if sys.stdin.isatty():
            # Someone is watching: leave the server up for the dashboard.
            input(f"\nThe dashboard: {base}/dashboard (press Enter to stop the server) ")
        return status
    except KeyboardInterrupt:
        print("interrupted: stopping the server", flush=True)
        return 130
    finally:
        stop(server)


if __name__ == "__main__":
    sys.exit(main())
