"""A client for asynchronous APIs: send a request, follow its 202 to the final response.

Usage::

    python examples/client.py URL [--method GET] [--data JSON] [--timeout 60]

On ``202 Accepted`` it polls the ``Location`` (relative to the URL), waiting
``Retry-After`` seconds between polls and printing each poll's state and progress,
then prints the final status, Content-Type and body. Exit status: 0 if the final
status is below 400, 1 if not, 2 on a timeout or a connection error.

Standard library only, so it runs with any Python 3.11+.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import typing as t
from urllib.parse import urljoin, urlsplit

DEFAULT_RETRY_AFTER = 1.0
MIN_RETRY_AFTER = 0.1


class Reply(t.NamedTuple):
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes


class Timeout(Exception):
    pass


def request(
    method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float
) -> Reply:
    """One request on a new connection, read to the end and closed: never raises on a status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=headers)
        with connection.getresponse() as response:
            return Reply(response.status, response.reason, response.headers, response.read())
    finally:
        connection.close()


def retry_after(reply: Reply) -> float:
    """The Retry-After delay in seconds (whole seconds only; HTTP dates are not supported)."""
    value = (reply.headers.get("Retry-After") or "").strip()
    seconds = float(value) if value.isdigit() else DEFAULT_RETRY_AFTER
    return max(MIN_RETRY_AFTER, seconds)


def describe(reply: Reply) -> str:
    """One line for a 202: the state and progress of its status document."""
    try:
        document = json.loads(reply.body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or "state" not in document:
        return f"{reply.status} {reply.reason} (no status document)"
    line = f"{document['state']:<8}"
    progress = document.get("progress")
    if isinstance(progress, dict):
        line += f"  {number(progress.get('current'))}"
        if progress.get("total") is not None:
            line += f"/{number(progress['total'])}"
        if progress.get("message"):
            line += f"  {progress['message']}"
    return line


def number(value: object) -> str:
    """``3`` for 3 and 3.0, ``2.5`` for 2.5: progress counts may be floats."""
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def follow(
    url: str,
    method: str = "GET",
    data: str | None = None,
    timeout: float = 60,
    out: t.TextIO = sys.stdout,
) -> int:
    """Send ``method url`` (``data``: a JSON text) and poll until a final response.

    Returns the exit status: 0 if the final status is below 400, 1 if not, 2 on a
    timeout (``timeout`` seconds for the whole exchange) or a connection error.
    """
    started = time.monotonic()
    deadline = started + timeout

    def call(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout
        return request(method, url, body, headers, remaining)

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    body = data.encode() if data is not None else None
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    say(f"{method} {url}")
    try:
        reply = call(method, url, body, headers)
        if reply.status == 202:
            say(
                f"{reply.status} {reply.reason}  Location: {reply.headers.get('Location')}"
                f"  Retry-After: {reply.headers.get('Retry-After')}"
            )
        # A 202 without a Location has nothing to poll: it is the final response.
        while reply.status == 202 and reply.headers.get("Location"):
            say(f"  {time.monotonic() - started:5.1f}s  {describe(reply)}".rstrip())
            delay = retry_after(reply)
            if time.monotonic() + delay >= deadline:
                raise Timeout
            time.sleep(delay)
            url = urljoin(url, reply.headers["Location"])
            reply = call("GET", url, None, {"Accept": "application/json"})
    except Timeout:
        say(f"error: no final response after {timeout:g} s")
        return 2
    except (OSError, http.client.HTTPException, ValueError) as e:
        say(f"error: {url}: {str(e) or type(e).__name__}")
        return 2
    say(f"{reply.status} {reply.reason}  {reply.headers.get('Content-Type')}")
    text = reply.body.decode("utf-8", errors="replace").rstrip("\n")
    if text:
        say(text)
    return 0 if reply.status < 400 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("url", help="e.g. http://127.0.0.1:5000/hello/world")
    parser.add_argument("--method", default="GET", type=str.upper, help="default: GET")
    parser.add_argument("--data", metavar="JSON", help="request body, sent as application/json")
    parser.add_argument("--timeout", type=float, default=60, help="seconds in all (default: 60)")
    args = parser.parse_args(argv)
    if args.data is not None:
        try:
            json.loads(args.data)
        except ValueError as e:
            parser.error(f"--data is not valid JSON: {e}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return follow(args.url, method=args.method, data=args.data, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
