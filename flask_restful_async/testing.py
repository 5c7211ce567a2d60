"""Testing resources with Flask's test client: follow a ``202`` to the final response.

::

    from flask_restful_async.testing import follow

    def test_report(client):
        response = follow(client, client.post("/reports", json={"month": "2026-11"}))
        assert response.status_code == 201
        assert response.json == {"rows": 42}

With ``RESTFUL_ASYNC_EAGER = True`` the first poll is already final. With the
thread executor each poll is a long-poll (``?wait=N``), so a test waits no longer
than its task runs and never spins.
"""

from __future__ import annotations

import math
import time
import typing as t
from urllib.parse import urlsplit

from werkzeug.datastructures import Headers
from werkzeug.http import parse_date

from .state import RESULT_SUFFIX

if t.TYPE_CHECKING:
    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse

#: The longest single poll (seconds): the server caps it too, at ``RESTFUL_ASYNC_MAX_WAIT``.
POLL_WAIT = 10


def follow(
    client: FlaskClient,
    response: TestResponse,
    *,
    timeout: float = 10.0,
    headers: t.Mapping[str, str] | Headers | None = None,
) -> TestResponse:
    """The final response of the task that ``response`` (a submit's) accepted.

    A response other than a ``202`` with a ``Location`` is returned as it is: a
    synchronous method, a refused request, a submit answered within its
    ``Prefer: wait``. Otherwise the ``Location`` is polled with ``GET ?wait=N``
    (a long-poll: it answers as soon as the task ends) until it stops answering
    ``202``; a ``303 See Other`` to the task's ``/result`` (with
    ``RESTFUL_ASYNC_RESULT_REDIRECT``) is followed, any other answer is the
    task's own and returned as it is, a handler's redirect included, and so is a
    handler's own ``202`` whose ``Location`` is not the status URL. A poll that
    came back early without news waits out its ``Retry-After`` first.

    ``headers`` go with every poll: the credentials an ``owner`` callable reads.
    Raises :class:`TimeoutError` when the task has not finished within
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    status: str | None = None  # the path of the task's status URL, once known
    get = _getter(client, response, headers)
    while response.status_code == 202 and "Location" in response.headers:
        location = response.headers["Location"]
        if status is None:
            status = urlsplit(location).path
        elif urlsplit(location).path != status:
            # The status URL of a task still at work names itself; a 202 that
            # sends elsewhere is the handler's own answer.
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"the task at {location} has not finished within {timeout} s;"
                f" it last read {response.get_data(as_text=True)!r}"
            )
        wait = max(1, min(POLL_WAIT, math.ceil(remaining)))
        asked = time.monotonic()
        separator = "&" if "?" in location else "?"
        response = get(f"{location}{separator}wait={wait}")
        if response.status_code == 303 and _is_result_of(
            response.headers.get("Location"), location
        ):
            response = get(response.headers["Location"])
        elif response.status_code == 202:
            # A server that does not wait (RESTFUL_ASYNC_MAX_WAIT = 0) asks for a
            # pause instead: never poll faster than it asks.
            pause = _retry_after(response.headers.get("Retry-After")) - (time.monotonic() - asked)
            if pause > 0:
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
    return response


def _getter(
    client: FlaskClient,
    submitted: TestResponse,
    headers: t.Mapping[str, str] | Headers | None,
) -> t.Callable[[str], TestResponse]:
    """``GET`` of a URL the app gave in answer to ``submitted``, as a browser would
    resolve it: an app mounted under a script root (``base_url=".../prefix/"``)
    names its URLs with that root, which the test client must not see twice."""
    request = getattr(submitted, "request", None)
    if request is None or not request.script_root:
        return lambda url: client.get(url, headers=headers)
    root, base_url = request.script_root, request.root_url

    def get(url: str) -> TestResponse:
        parts = urlsplit(url)
        path = parts.path[len(root) :] if parts.path.startswith(root + "/") else parts.path
        target = f"{path}?{parts.query}" if parts.query else path
        return client.get(target, headers=headers, base_url=base_url)

    return get


def _is_result_of(target: str | None, location: str) -> bool:
    """Whether ``target`` is the ``/result`` URL of the status URL ``location``."""
    return target is not None and urlsplit(target).path == urlsplit(location).path + RESULT_SUFFIX


def _retry_after(value: str | None) -> float:
    """A ``Retry-After`` header's seconds (it is a number or an HTTP date); 0 if
    there is none or it is neither."""
    value = (value or "").strip()
    if value.isdigit():
        return float(value)
    when = parse_date(value)
    return 0.0 if when is None else max(0.0, when.timestamp() - time.time())
