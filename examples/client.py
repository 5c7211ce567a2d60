"""Send a request and follow its 202 Accepted to the final response.

Usage::

    python examples/client.py [METHOD] URL [--json DATA] [-H 'Name: value'] [--timeout S]

It is ``python -m flask_restful_async.client`` (see its ``--help``; the method is
GET unless given) with one addition for APIs behind authentication: ``API_TOKEN``,
if set, goes as ``Authorization: Bearer <token>`` with every request, the submit
and its polls. Needs ``pip install 'flask-restful-async[client]'``.
"""

from __future__ import annotations

import os
import sys
import typing as t

from flask_restful_async.client import cli


def auth_headers() -> dict[str, str]:
    token = os.environ.get("API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def follow(
    url: str,
    method: str = "GET",
    data: str | None = None,
    timeout: float = 60,
    out: t.TextIO = sys.stdout,
) -> int:
    """``method url`` (``data``: a JSON text) to its final answer, as the demos run it:
    progress as lines, everything on ``out``. Returns the exit status."""
    return cli.follow(
        method,
        url,
        json_text=data,
        headers=auth_headers(),
        timeout=timeout,
        progress="lines",
        out=out,
        err=out,
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and "://" in args[0]:
        args.insert(0, "GET")
    for name, value in auth_headers().items():
        args += ["-H", f"{name}: {value}"]
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
