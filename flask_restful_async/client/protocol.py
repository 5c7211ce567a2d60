"""What the client does, without doing it: the steps of a submit, a poll and a wait.

The sync and the async client share this one state machine. Each operation here is
a generator that yields :class:`Send`, :class:`Sleep` and :class:`Report` steps and
is sent back the ``httpx.Response`` of each ``Send`` (or has the transport error
thrown in); a driver in :mod:`.sync` or :mod:`.aio` does the I/O. Nothing here
reads a clock the driver could not see: times are ``time.monotonic()``.

The rules it follows:

- A ``202`` with a ``Location`` is an operation; anything else is the final answer.
  At the status URL, a ``202`` is the task at work only while its ``Location`` is
  that URL: one that sends elsewhere is the handler's own answer.
- The next poll never goes before the ``Retry-After`` of the last answer (seconds,
  or an HTTP date read against that answer's ``Date``). Without one, or after a
  ``Retry-After: 0`` that did not end the task, the pause starts at 0.1 s and doubles
  up to 5 s: a server that does not say is not busy-polled.
- A poll asks ``Prefer: wait=N`` (RFC 7240). A server that applied it
  (``Preference-Applied: wait=…``) held the request until the task finished or N
  seconds passed, so its own wait counts towards its ``Retry-After``: the next poll
  goes at once. A server that did not apply it is not asked again by that operation.
- ``429`` and ``503`` are retried after their ``Retry-After`` plus up to 10 % (so
  that clients turned away together do not come back together), or without one
  after an exponential pause with jitter; so are connection errors. A submit is sent
  again with the same ``Idempotency-Key``, so that a server that keeps keys makes
  one task of it even when the first answer was lost on the way.
- A ``303 See Other`` from the status URL is followed (``GET``) to the result.
"""

from __future__ import annotations

import math
import random
import secrets
import time
import typing as t
from collections.abc import Generator
from dataclasses import dataclass

import httpx
from werkzeug.http import parse_date, parse_dict_header

from .errors import TaskCancelled, TaskError, TaskFailed, TaskLost

#: Errors after which a request is sent again: the server may never have seen it,
#: or its answer was lost (a submit then relies on its ``Idempotency-Key``).
RETRYABLE = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
#: Answers that say "not now, come back": nothing was done.
UNAVAILABLE = frozenset((429, 503))
#: Headers of a submit that belong to it alone, not to the polls that follow it.
_SUBMIT_ONLY = frozenset(
    ("content-type", "content-length", "content-encoding", "transfer-encoding", "expect", "host")
) | {"idempotency-key", "prefer"}
#: Seconds between polls when the server gives no ``Retry-After``: the first, and
#: the most.
FIRST_PAUSE = 0.1
MAX_PAUSE = 5.0
#: The longest ``Retry-After`` taken as said (seconds): a day. A longer one, or one
#: past what a float holds, counts as a day.
MAX_RETRY_AFTER = 24 * 3600.0
#: Redirects one poll follows before it gives up (``httpx.TooManyRedirects``).
MAX_REDIRECTS = 20
#: What a status URL may answer to send the poll elsewhere: it follows with a ``GET``.
_REDIRECTS = frozenset((301, 302, 303, 307, 308))


@dataclass(frozen=True)
class Send:
    """Send ``request``; ``follow_redirects`` None means the client's own setting."""

    request: httpx.Request
    follow_redirects: bool | None = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Report:
    """Tell the caller's ``on_progress`` about new progress."""

    progress: Progress


Step = Send | Sleep | Report
T = t.TypeVar("T")
#: An operation of this module: the driver sends a ``Send`` its response.
Steps = Generator[Step, t.Any, T]


@dataclass(frozen=True)
class Progress:
    """The ``progress`` member of a status document: ``current`` of ``total`` (None
    when the handler did not say), and a ``message``."""

    current: float
    total: float | None = None
    message: str | None = None

    @classmethod
    def from_document(cls, document: t.Mapping[str, t.Any] | None) -> Progress | None:
        value = document.get("progress") if document is not None else None
        if not isinstance(value, dict):
            return None
        current, total, message = value.get("current"), value.get("total"), value.get("message")
        if not _is_number(current):
            return None
        return cls(
            current,
            total if _is_number(total) else None,
            message if isinstance(message, str) else None,
        )


def _is_number(value: object) -> t.TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class Policy:
    """How a client waits and retries (see :class:`~.sync.TaskClient`)."""

    long_poll: int = 20
    retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.long_poll < 0 or self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("long_poll, retries, backoff and max_backoff must not be negative")

    def pause(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry number ``attempt`` (1, 2, ...)."""
        if retry_after is not None:
            return retry_after + random.uniform(0, max(0.05, retry_after * 0.1))
        # "Equal jitter": at least half the exponential step, at most all of it.
        step = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(step / 2, step)


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` of ``response`` in seconds (RFC 9110 section 10.2.3), or
    None when absent or malformed.

    An HTTP date is read against the response's own ``Date`` when it has one, so
    that a client whose clock is off still waits as long as the server meant. At
    most :data:`MAX_RETRY_AFTER`.
    """
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return min(MAX_RETRY_AFTER, float(value))
    when = parse_date(value)
    if when is None:
        return None
    now = parse_date(response.headers.get("date")) if "date" in response.headers else None
    seconds = when.timestamp() - time.time() if now is None else (when - now).total_seconds()
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def within(timeout: dict[str, float | None] | None, seconds: float) -> dict[str, float | None]:
    """A request's ``timeout`` extension (httpx's per-phase seconds), none of them
    longer than ``seconds`` (at least 10 ms)."""
    seconds = max(0.01, seconds)
    phases = timeout or {}
    return {
        phase: seconds if phases.get(phase) is None else min(seconds, t.cast(float, phases[phase]))
        for phase in ("connect", "read", "write", "pool")
    }


def same_origin(url: httpx.URL, other: httpx.URL) -> bool:
    """Whether two URLs have one scheme, host and port: only there do the polls
    go, with the caller's headers and credentials."""
    return (url.scheme, url.host, url.port) == (other.scheme, other.host, other.port)


def location_of(response: httpx.Response) -> httpx.URL | None:
    """Where the ``Location`` of ``response`` points, or None when it has none, or
    one that is not a URL, or one on another origin (see :func:`same_origin`)."""
    location = response.headers.get("location")
    if not location:
        return None
    try:
        url = response.url.join(location)
    except httpx.InvalidURL:
        return None
    return url if same_origin(url, response.url) else None


def status_document(response: httpx.Response) -> dict[str, t.Any] | None:
    """The JSON object ``response`` carries if it has a ``state``, else None (a body
    without a ``Content-Type`` is tried as JSON too)."""
    content_type = response.headers.get("content-type")
    if content_type is not None and "json" not in content_type:
        return None
    try:
        document = response.json()
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get("state"), str):
        return document
    return None


def final_error(response: httpx.Response, operation: t.Any = None) -> TaskError | None:
    """The exception a final answer means, or None for a success (below 400).

    ``409`` with a status document in state ``cancelled`` is :class:`TaskCancelled`,
    ``500`` with one in state ``lost`` :class:`TaskLost`; any other ``4xx`` or
    ``5xx`` is :class:`TaskFailed`.
    """
    document = status_document(response)
    state = document.get("state") if document is not None else None
    if response.status_code == 409 and state == "cancelled":
        return TaskCancelled(response, document, operation)
    if response.status_code == 500 and state == "lost":
        return TaskLost(response, document, operation)
    if response.status_code >= 400:
        return TaskFailed(response, document, operation)
    return None


def new_idempotency_key() -> str:
    return secrets.token_urlsafe(18)


def submit_headers(
    headers: httpx.Headers, *, wait: int | None, idempotency_key: str | None
) -> httpx.Headers:
    """``headers`` of a submit with an ``Idempotency-Key`` (the caller's, or a new
    one) and, with ``wait``, ``Prefer: wait=N``."""
    headers = httpx.Headers(headers)
    if "idempotency-key" not in headers:
        headers["Idempotency-Key"] = idempotency_key or new_idempotency_key()
    if wait:
        headers["Prefer"] = f"wait={wait}"
    return headers


def poll_headers(headers: httpx.Headers) -> httpx.Headers:
    """The headers of a submit that its polls carry too: credentials, ``Accept``
    (the result is rendered for the submit's), and the like."""
    return httpx.Headers([(k, v) for k, v in headers.multi_items() if k not in _SUBMIT_ONLY])


def submit(
    build: t.Callable[[], httpx.Request], policy: Policy, deadline: float | None = None
) -> Steps[httpx.Response]:
    """Send the request ``build`` makes until it is answered, retrying connection
    errors, ``429`` and ``503`` up to ``policy.retries`` times (and not past
    ``deadline``). Returns the last answer (a ``429`` or ``503`` too, once the
    retries are spent); raises the last connection error.

    The same request goes each time, with the same ``Idempotency-Key``.
    """
    request = build()
    attempt = 0
    while True:
        try:
            response: httpx.Response = yield Send(request)
        except RETRYABLE:
            attempt += 1
            pause = policy.pause(attempt, None)
            if attempt > policy.retries or _past(deadline, pause):
                raise
            yield Sleep(pause)
            continue
        if response.status_code in UNAVAILABLE:
            attempt += 1
            pause = policy.pause(attempt, retry_after(response))
            if attempt > policy.retries or _past(deadline, pause):
                return response
            yield Sleep(pause)
            continue
        return response


def _past(deadline: float | None, pause: float) -> bool:
    return deadline is not None and time.monotonic() + pause > deadline


class OperationState:
    """What is known of one operation: its status URL, the last status document, the
    final response once seen, and when the next poll may go."""

    def __init__(self, url: httpx.URL, headers: httpx.Headers, policy: Policy) -> None:
        self.url = url
        self.headers = headers
        self.policy = policy
        self.document: dict[str, t.Any] | None = None
        self.progress: Progress | None = None
        self.response: httpx.Response | None = None
        #: ``time.monotonic()`` before which no poll goes.
        self.next_at = 0.0
        #: The last ``Retry-After`` (seconds), which a progress wait asks to wait for.
        self.retry_after: float | None = None
        #: None until a long-poll was answered; then whether the server applied it.
        self.long_poll: bool | None = None
        #: Answers in a row that asked for no pause (or did not say).
        self.quick = 0

    @property
    def id(self) -> str:
        document_id = self.document.get("id") if self.document is not None else None
        if isinstance(document_id, str):
            return document_id
        return self.url.path.rstrip("/").rsplit("/", 1)[-1]

    def accepted(self, response: httpx.Response, sent: float, waited: int) -> bool:
        """Take in a ``202`` at the status URL (or of the submit); True when its
        progress is new. ``sent`` is when the request went, ``waited`` the
        ``Prefer: wait`` it asked for (0: none)."""
        document = status_document(response)
        if document is not None:
            self.document = document
        progress = Progress.from_document(document)
        changed = progress is not None and progress != self.progress
        if progress is not None:
            self.progress = progress
        pause = retry_after(response)
        self.retry_after = pause
        now = time.monotonic()
        if waited:
            applied = "wait" in parse_dict_header(response.headers.get("preference-applied", ""))
            if self.long_poll is None or applied:
                self.long_poll = applied
        if waited and self.long_poll and (pause is not None or now - sent >= waited / 2):
            # The server held the request: its wait counts towards the pause it asks.
            # (One that says it applied the wait but answered at once, with no
            # Retry-After, is polled as a server that does not hold: below.)
            self.next_at = sent + (pause or 0.0)
            self.quick = 0
        elif pause is not None and (pause > 0 or self.quick == 0):
            self.next_at = now + pause
            self.quick = 0 if pause > 0 else 1
        else:
            self.next_at = now + min(MAX_PAUSE, FIRST_PAUSE * 2**self.quick)
            self.quick += 1
        return changed

    def finished(self) -> dict[str, t.Any]:
        """A status document for a task whose final response has been seen: the one
        it carries (cancelled, lost), else the last one seen with ``state`` set from
        the status code (``succeeded`` below 400, ``failed`` from 400)."""
        assert self.response is not None
        document = status_document(self.response)
        if document is not None and self.response.status_code in (409, 500):
            return document
        state = "succeeded" if self.response.status_code < 400 else "failed"
        return {"id": self.id, **(self.document or {}), "state": state}

    def long_poll_wait(self, deadline: float | None, reporting: bool) -> int:
        """The ``Prefer: wait`` of the next poll: the client's long-poll (while
        reporting progress, the last ``Retry-After``, so that progress comes as
        often as the server is willing to tell), within ``deadline``."""
        if self.long_poll is False or not self.policy.long_poll:
            return 0
        wait = self.policy.long_poll
        if reporting:
            wait = min(wait, max(1, math.ceil(self.retry_after or 1)))
        if deadline is not None:
            wait = min(wait, int(deadline - max(time.monotonic(), self.next_at)))
        return max(0, wait)


def poll(
    state: OperationState,
    build: t.Callable[[httpx.URL, httpx.Headers, float], httpx.Request],
    *,
    deadline: float | None = None,
    wait: int = 0,
) -> Steps[bool]:
    """One poll of the status URL, when the last answer allows it: returns whether
    it brought new progress. The final response lands in ``state.response``.

    ``build(url, headers, wait)`` makes a ``GET`` whose read timeout covers
    ``wait``. Raises :class:`TimeoutError` rather than sleep past ``deadline``.
    """
    url = state.url
    attempt = redirects = 0
    while True:
        pause = state.next_at - time.monotonic()
        if deadline is not None and time.monotonic() + max(0.0, pause) > deadline:
            raise TimeoutError(f"{state.url} has not finished in time")
        if pause > 0:
            yield Sleep(pause)
        headers = httpx.Headers(state.headers)
        asked = wait if url == state.url else 0
        if asked:
            headers["Prefer"] = f"wait={asked}"
        sent = time.monotonic()
        try:
            request = build(url, headers, asked)
            if deadline is not None:
                # No answer awaited past the deadline: a request still out then
                # times out (and the next turn raises TimeoutError).
                request.extensions["timeout"] = within(
                    request.extensions.get("timeout"), deadline - time.monotonic()
                )
            response: httpx.Response = yield Send(request, False)
        except RETRYABLE:
            attempt += 1
            if attempt > state.policy.retries:
                raise
            state.next_at = time.monotonic() + state.policy.pause(attempt, None)
            continue
        if response.status_code in UNAVAILABLE:
            attempt += 1
            if attempt > state.policy.retries:
                response.raise_for_status()
            state.next_at = time.monotonic() + state.policy.pause(attempt, retry_after(response))
            continue
        location = location_of(response)
        if response.status_code in _REDIRECTS and location is not None:
            # The result on a URL of its own (303), or the status URL moved: GET it
            # at once, on the same origin only.
            redirects += 1
            if redirects > MAX_REDIRECTS:
                raise httpx.TooManyRedirects(
                    f"{state.url}: more than {MAX_REDIRECTS} redirects", request=response.request
                )
            url = location
            continue
        # A task still at work answers 202 with its own URL as Location; a 202
        # whose Location is elsewhere is the handler's own final answer.
        if (
            response.status_code == 202
            and url == state.url
            and (
                "location" not in response.headers
                or (location is not None and location.path == state.url.path)
            )
        ):
            return state.accepted(response, sent, asked)
        state.response = response
        return False


def wait(
    state: OperationState,
    build: t.Callable[[httpx.URL, httpx.Headers, float], httpx.Request],
    *,
    timeout: float | None,
    reporting: bool,
) -> Steps[httpx.Response]:
    """Poll until the final response, reporting each new progress. Raises
    :class:`TimeoutError` after ``timeout`` seconds (the operation goes on)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    if reporting and state.progress is not None:
        yield Report(state.progress)
    while state.response is None:
        asked = state.long_poll_wait(deadline, reporting)
        if (yield from poll(state, build, deadline=deadline, wait=asked)) and reporting:
            assert state.progress is not None
            yield Report(state.progress)
    return state.response


def refresh(
    state: OperationState, build: t.Callable[[httpx.URL, httpx.Headers, float], httpx.Request]
) -> Steps[None]:
    """One poll without waiting, if the last answer's ``Retry-After`` has passed."""
    if state.response is None and time.monotonic() >= state.next_at:
        yield from poll(state, build)


class OperationBase:
    """What :class:`~.sync.Operation` and :class:`~.aio.AsyncOperation` tell without
    a request: the task's id, status URL, and state and progress as last seen."""

    def __init__(self, state: OperationState, accepted: httpx.Response | None) -> None:
        self._state = state
        #: The ``202`` that started the operation (None when resumed from a URL).
        self.accepted = accepted

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} {self.state or 'unknown'}>"

    @property
    def id(self) -> str:
        """The task's id: from its status document, else the status URL's last segment."""
        return self._state.id

    @property
    def url(self) -> str:
        """The absolute status URL: keep it to resume with ``client.operation(url)``."""
        return str(self._state.url)

    @property
    def state(self) -> str | None:
        """The task's state as last seen (None if nothing was seen yet)."""
        if self._state.response is not None:
            return str(self._state.finished()["state"])
        document = self._state.document
        state = document.get("state") if document is not None else None
        return state if isinstance(state, str) else None

    @property
    def progress(self) -> Progress | None:
        """The task's progress as last seen."""
        return self._state.progress

    def _status(self) -> dict[str, t.Any]:
        if self._state.response is not None:
            return self._state.finished()
        return dict(self._state.document or {"id": self.id, "state": None})


class Requests:
    """The requests of a client's operations, made by its ``httpx`` client (with its
    base URL, headers, cookies and timeouts)."""

    def __init__(self, http: httpx.Client | httpx.AsyncClient, policy: Policy) -> None:
        self.http = http
        self.policy = policy

    def submit(
        self,
        method: str,
        url: httpx.URL | str,
        options: dict[str, t.Any],
        wait: int | None = None,
    ) -> t.Callable[[], httpx.Request]:
        """The submit's request; with ``wait`` (its ``Prefer: wait``), a read timeout
        that also covers the wait the server may hold it, unless the caller gave a
        ``timeout`` of its own."""
        if wait and "timeout" not in options:
            options = {**options, "timeout": self._covering(wait)}
        return lambda: self.http.build_request(method, url, **options)

    def poll(self, url: httpx.URL, headers: httpx.Headers, wait: float) -> httpx.Request:
        """A ``GET`` whose read timeout also covers the ``wait`` the server may hold it."""
        return self.http.build_request("GET", url, headers=headers, timeout=self._covering(wait))

    def _covering(self, wait: float) -> httpx.Timeout:
        """The client's timeouts, the read one lengthened by ``wait`` seconds."""
        timeout = self.http.timeout
        if wait and timeout.read is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect,
                read=timeout.read + wait,
                write=timeout.write,
                pool=timeout.pool,
            )
        return timeout

    def delete(self, state: OperationState) -> t.Callable[[], httpx.Request]:
        return lambda: self.http.build_request("DELETE", state.url, headers=state.headers)

    def operation(
        self, url: httpx.URL | str, headers: httpx.Headers | None = None
    ) -> OperationState:
        """The state of an operation known by its status URL (relative to the base
        URL), with nothing seen of it yet."""
        return OperationState(
            self.http.build_request("GET", url).url, headers or httpx.Headers(), self.policy
        )

    def accepted(self, response: httpx.Response, headers: httpx.Headers) -> OperationState | None:
        """The operation a submit's answer starts: a ``202`` with a ``Location``.
        ``headers`` are those the caller gave the submit: its polls carry them too,
        to a status URL on the submit's origin only (a ``202`` whose ``Location`` is
        elsewhere, or not a URL, is a final answer)."""
        location = location_of(response) if response.status_code == 202 else None
        if location is None:
            return None
        state = OperationState(location, poll_headers(headers), self.policy)
        state.accepted(response, time.monotonic(), 0)
        return state


def cancel(state: OperationState, build: t.Callable[[], httpx.Request]) -> Steps[bool]:
    """``DELETE`` the status URL: True when the task was cancelled (it was queued) or
    its cancellation was asked (it runs). False when it had already finished, in
    which case the server forgets it: its result is gone unless already read here.
    A task whose final response this client has seen is not touched."""
    if state.response is not None:
        return False
    response: httpx.Response = yield from submit(build, state.policy)
    if response.status_code in UNAVAILABLE or response.status_code >= 500:
        response.raise_for_status()
    if response.status_code not in (200, 202):
        return False
    # Its status document, and when to come back (the task ends soon).
    state.accepted(response, time.monotonic(), 0)
    return True
