"""``python -m flask_restful_async.client METHOD URL``: send a request, follow its task.

::

    python -m flask_restful_async.client POST http://127.0.0.1:8000/reports \\
        --json '{"year": 2026}' -H 'Authorization: Bearer s3cret' --timeout 600

Prints the request line, the ``202`` (status, ``Location``, ``Retry-After``), the
task's progress, then the final status line (code, reason, ``Content-Type``) and the
body. The progress is a bar (tqdm, on stderr) when stderr is a terminal, and a line
per new progress on stdout otherwise (``--progress`` chooses). ``-H`` headers go with
every request, polls included, so that authenticated APIs work.

Exit status: 0 when the final answer is a ``2xx``; 1 otherwise (another final status,
a timeout, a connection error); 2 for bad usage; 130 after Ctrl-C.

Ctrl-C while the task runs: on a terminal (stdin and stderr both ttys) it asks whether
to cancel the task (``DELETE`` on its status URL; the default is no). Elsewhere (a
pipe, a supervisor, CI) nobody can answer: the task is left running and its status
URL is printed, to be followed later with ``GET`` (``python -m
flask_restful_async.client GET <status URL>``), unless ``--cancel-on-interrupt``
says to cancel it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import typing as t

import httpx

from ..task import count_text
from .protocol import Progress
from .sync import Operation, TaskClient

PROGRESS_MODES = ("auto", "bar", "lines", "none")
#: The longest ``--timeout`` (seconds, a year): past that, a clock cannot add it.
MAX_TIMEOUT = 365 * 24 * 3600.0


def follow(
    method: str,
    url: str,
    *,
    json_text: str | None = None,
    headers: t.Mapping[str, str] | None = None,
    timeout: float | None = None,
    progress: str = "auto",
    cancel_on_interrupt: bool = False,
    long_poll: int = 20,
    wait: int | None = None,
    out: t.TextIO | None = None,
    err: t.TextIO | None = None,
    stdin: t.TextIO | None = None,
) -> int:
    """Send ``method url`` (with ``json_text`` as its JSON body, if given) and follow it to
    its final answer, printing as described above. Returns the exit status.

    ``timeout`` bounds the whole exchange, retries included (None: no bound).
    ``wait`` asks the server for the final response in answer to the submit itself,
    if it comes within that many seconds (``Prefer: wait=N``).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    stdin = stdin or sys.stdin
    if progress not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}")
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout

    def say(line: str, to: t.TextIO = out) -> None:
        print(line, file=to, flush=True)

    say(f"{method} {url}")
    options: dict[str, t.Any] = {}
    if json_text is not None:
        options = {"content": json_text.encode(), "headers": {"Content-Type": "application/json"}}
    # httpx's default of 5 s would cut a slow synchronous answer short.
    http_timeout = httpx.Timeout(timeout or 60.0, connect=min(timeout or 10.0, 10.0))
    with TaskClient(
        headers=dict(headers or {}), long_poll=long_poll, timeout=http_timeout
    ) as client:
        try:
            answer = client._submit(method, url, deadline=deadline, wait=wait, **options)
        except httpx.HTTPError as e:
            say(f"error: {url}: {str(e) or type(e).__name__}", err)
            return 1
        except KeyboardInterrupt:
            say("interrupted before the server answered: a task may have been made", err)
            return 130
        if isinstance(answer, httpx.Response):
            return final(answer, say)
        operation = answer
        show = Display(operation, started)
        try:
            accepted = operation.accepted
            assert accepted is not None
            say(
                f"{accepted.status_code} {accepted.reason_phrase}"
                f"  Location: {accepted.headers.get('location')}"
                f"  Retry-After: {accepted.headers.get('retry-after')}"
            )
            show = Display.choose(progress, operation, started, say, err)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            response = operation.wait(on_progress=show.update, timeout=remaining)
        except KeyboardInterrupt:
            show.close()
            return interrupted(operation, cancel_on_interrupt, say, err, stdin)
        except TimeoutError:
            show.close()
            say(f"error: no final response within {timeout:g} s; the task goes on:", err)
            say(f"  {operation.url}", err)
            return 1
        except httpx.HTTPError as e:
            show.close()
            say(f"error: {operation.url}: {str(e) or type(e).__name__}", err)
            return 1
        show.close(ended=response.status_code < 400)
        return final(response, say)


def final(response: httpx.Response, say: t.Callable[[str], None]) -> int:
    """Print the final answer; its exit status."""
    say(
        f"{response.status_code} {response.reason_phrase}"
        f"  {response.headers.get('content-type', '(no Content-Type)')}"
    )
    text = response.text.rstrip("\n")
    if text:
        say(text)
    return 0 if 200 <= response.status_code < 300 else 1


def interrupted(
    operation: Operation,
    cancel: bool,
    say: t.Callable[..., None],
    err: t.TextIO,
    stdin: t.TextIO,
) -> int:
    """Ctrl-C while waiting: cancel the task if asked to (or if the user says so on a
    terminal), else leave it running and tell where it is."""
    if not cancel and stdin.isatty() and err.isatty():
        try:
            print(f"\nCancel the task at {operation.url}? [y/N] ", end="", file=err, flush=True)
            cancel = stdin.readline().strip().lower() in ("y", "yes")
        except KeyboardInterrupt:
            cancel = False
    if not cancel:
        say("interrupted: the task goes on; follow it with", err)
        say(f"  python -m flask_restful_async.client GET {operation.url}", err)
        return 130
    try:
        cancelled = operation.cancel()
    except httpx.HTTPError as e:
        say(f"interrupted: cancelling failed: {str(e) or type(e).__name__}", err)
        return 130
    if cancelled:
        say(f"interrupted: the task is cancelled ({operation.url})", err)
    else:
        say(f"interrupted: the task had already finished ({operation.url})", err)
    return 130


class Display:
    """How progress is shown: nothing, a line per report, or a tqdm bar."""

    def __init__(self, operation: Operation, started: float) -> None:
        self.operation = operation
        self.started = started

    @staticmethod
    def choose(
        mode: str,
        operation: Operation,
        started: float,
        say: t.Callable[[str], None],
        err: t.TextIO,
    ) -> Display:
        if mode == "auto":
            mode = "bar" if err.isatty() and _has_tqdm() else "lines"
        if mode == "bar":
            return Bar(operation, started, err)
        if mode == "lines":
            return Lines(operation, started, say)
        return Display(operation, started)

    def update(self, progress: Progress) -> None:
        pass

    def close(self, *, ended: bool = False) -> None:
        """Stop showing; ``ended``: the task succeeded (its last report may not
        have been seen: polls see what is there when they come)."""


class Lines(Display):
    """A line per report: seconds since the start, state, ``current/total``, message.
    The first line is the state the ``202`` told."""

    def __init__(self, operation: Operation, started: float, say: t.Callable[[str], None]) -> None:
        super().__init__(operation, started)
        self.say = say
        if operation.progress is None:
            self.line(None)

    def update(self, progress: Progress) -> None:
        self.line(progress)

    def line(self, progress: Progress | None) -> None:
        text = f"{self.operation.state or '?':<8}"
        if progress is not None:
            text += f"  {count_text(progress.current)}"
            if progress.total is not None:
                text += f"/{count_text(progress.total)}"
            if progress.message:
                text += f"  {progress.message}"
        self.say(f"  {time.monotonic() - self.started:5.1f}s  {text}".rstrip())


class Bar(Display):
    """A tqdm bar on stderr: ``current`` of ``total``, the state and the message."""

    def __init__(self, operation: Operation, started: float, err: t.TextIO) -> None:
        super().__init__(operation, started)
        try:
            from tqdm import tqdm
        except ImportError as e:
            raise ImportError(
                "the progress bar needs tqdm: pip install 'flask-restful-async[client]'"
            ) from e
        self.bar = tqdm(
            file=err, desc=operation.state or "", total=None, unit="", dynamic_ncols=True
        )

    def update(self, progress: Progress) -> None:
        bar = self.bar
        if progress.total is not None and bar.total != progress.total:
            bar.total = progress.total
        bar.n = progress.current
        bar.set_description(self.operation.state or "", refresh=False)
        bar.set_postfix_str(progress.message or "", refresh=False)
        bar.refresh()

    def close(self, *, ended: bool = False) -> None:
        bar = self.bar
        if ended:
            if bar.total is not None:
                bar.n = bar.total  # a bar left at 60 % would read as work left undone
            bar.set_description(self.operation.state or "", refresh=False)
            bar.refresh()
        bar.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def parse_header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"not a header: {text!r} (write 'Name: value')")
    if not text.isascii():
        # What HTTP/1.1 clients send: httpx refuses other characters in headers.
        raise argparse.ArgumentTypeError(f"not an ASCII header: {text!r}")
    return name.strip(), value.strip()


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flask_restful_async.client",
        description="Send a request and follow its 202 Accepted to the final response.",
        epilog="Exit status: 0 for a final 2xx, 1 otherwise, 2 for bad usage, 130 on Ctrl-C.",
    )
    parser.add_argument("method", type=str.upper, help="GET, POST, PUT, PATCH, DELETE...")
    parser.add_argument("url", help="e.g. http://127.0.0.1:8000/reports")
    parser.add_argument("--json", metavar="DATA", help="request body, sent as application/json")
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        type=parse_header,
        metavar="'NAME: VALUE'",
        help="a header for every request (the submit and its polls); repeatable",
    )
    parser.add_argument("--timeout", type=float, help="seconds for the whole exchange")
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="a bar (on stderr), a line per report (stdout), or nothing; auto: a bar"
        " when stderr is a terminal, else lines",
    )
    parser.add_argument(
        "--cancel-on-interrupt",
        action="store_true",
        help="on Ctrl-C, cancel the task without asking",
    )
    parser.add_argument(
        "--long-poll",
        type=int,
        default=20,
        metavar="SECONDS",
        help="the Prefer: wait=N of each poll (0: never ask); default 20",
    )
    parser.add_argument(
        "--wait",
        type=int,
        metavar="SECONDS",
        help="ask for the final response in answer to the submit itself if it comes"
        " within N seconds (Prefer: wait=N): one request for a short task",
    )
    args = parser.parse_args(argv)
    if args.json is not None:
        try:
            json.loads(args.json)
            args.json.encode()
        except ValueError as e:  # UnicodeEncodeError included (a lone surrogate)
            parser.error(f"--json is not valid JSON: {e}")
    if args.timeout is not None and not (0 < args.timeout < MAX_TIMEOUT):
        parser.error(f"--timeout must be a number of seconds above 0 and below {MAX_TIMEOUT:g}")
    try:
        target = httpx.URL(args.url)
    except httpx.InvalidURL as e:
        parser.error(f"not a URL: {args.url!r} ({e})")
    if target.scheme not in ("http", "https") or not target.host:
        parser.error(f"not an http:// or https:// URL: {args.url!r}")
    if args.long_poll < 0:
        parser.error("--long-poll must not be negative")
    if args.wait is not None and args.wait < 1:
        parser.error("--wait must be 1 or more")
    headers: dict[str, str] = {}
    for name, value in args.header:
        headers[name] = value
    return follow(
        args.method,
        args.url,
        json_text=args.json,
        headers=headers,
        timeout=args.timeout,
        progress=args.progress,
        cancel_on_interrupt=args.cancel_on_interrupt,
        long_poll=args.long_poll,
        wait=args.wait,
    )
