"""``TaskClient`` and its ``Operation``: the client for code that does not use asyncio."""

from __future__ import annotations

import time
import typing as t

import httpx

from . import protocol
from .protocol import OperationBase, OperationState, Policy, Progress, Requests, Send, Sleep, Steps

T = t.TypeVar("T")
ProgressCallback = t.Callable[[Progress], object]


def run(http: httpx.Client, steps: Steps[T], on_progress: ProgressCallback | None = None) -> T:
    """Carry out the steps of an operation of :mod:`.protocol` with ``http``."""
    try:
        step = next(steps)
        while True:
            if isinstance(step, Send):
                follow = (
                    http.follow_redirects
                    if step.follow_redirects is None
                    else step.follow_redirects
                )
                try:
                    response = http.send(step.request, follow_redirects=follow)
                except protocol.RETRYABLE as e:
                    step = steps.throw(e)
                    continue
                step = steps.send(response)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
                step = steps.send(None)
            else:
                if on_progress is not None:
                    on_progress(step.progress)
                step = steps.send(None)
    except StopIteration as stop:
        return t.cast(T, stop.value)
    finally:
        steps.close()


class TaskClient:
    """A client for APIs that answer ``202 Accepted`` with a ``Location`` to poll.

    ``base_url`` and every other keyword (``headers``, ``auth``, ``cookies``,
    ``timeout``, ``verify``, ``transport``, ``event_hooks``...) go to the
    ``httpx.Client`` it uses (:attr:`http`): credentials set there are sent with
    every request, polls included.

    - ``long_poll``: the ``Prefer: wait=N`` of each poll (0: never ask). A server
      that applies it answers as soon as the task finishes.
    - ``retries``: how many times a request is sent again after a connection error,
      a ``429`` or a ``503`` before giving up.
    - ``backoff``: the first pause (seconds) between such retries when the server
      gives no ``Retry-After``; it doubles each time, with jitter, up to 30 s.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: httpx.URL | str = "",
        *,
        long_poll: int = 20,
        retries: int = 6,
        backoff: float = 0.5,
        **options: t.Any,
    ) -> None:
        self.http = httpx.Client(base_url=base_url, **options)
        self.policy = Policy(long_poll=long_poll, retries=retries, backoff=backoff)
        self._requests = Requests(self.http, self.policy)

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        wait: int | None = None,
        idempotency_key: str | None = None,
        headers: t.Mapping[str, str] | None = None,
        **options: t.Any,
    ) -> Operation | httpx.Response:
        """Send a request: an :class:`Operation` if it is answered ``202`` with a
        ``Location``, else the response itself.

        ``options`` are those of ``httpx.Client.build_request`` (``json``,
        ``content``, ``data``, ``files``, ``params``, ``cookies``, ``timeout``).
        ``headers`` are sent with the request and, except those that only describe
        its body (``Content-Type``...), with each poll of its operation.
        The request carries an ``Idempotency-Key`` (``idempotency_key``, or a new
        random one), the same for each time it is sent again. ``wait`` asks the
        server to answer with the final response if the task finishes within that
        many seconds (``Prefer: wait=N``).
        """
        return self._submit(
            method, url, wait=wait, idempotency_key=idempotency_key, headers=headers, **options
        )

    def _submit(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        deadline: float | None = None,
        wait: int | None = None,
        idempotency_key: str | None = None,
        headers: t.Mapping[str, str] | None = None,
        **options: t.Any,
    ) -> Operation | httpx.Response:
        # request(), with retries that stop at ``deadline`` (time.monotonic()).
        given = httpx.Headers(headers)
        options["headers"] = protocol.submit_headers(
            given, wait=wait, idempotency_key=idempotency_key
        )
        steps = protocol.submit(
            self._requests.submit(method, url, options, wait), self.policy, deadline
        )
        response = run(self.http, steps)
        state = self._requests.accepted(response, given)
        return response if state is None else Operation(self, state, response)

    def get(self, url: httpx.URL | str, **options: t.Any) -> Operation | httpx.Response:
        return self.request("GET", url, **options)

    def post(self, url: httpx.URL | str, **options: t.Any) -> Operation | httpx.Response:
        return self.request("POST", url, **options)

    def put(self, url: httpx.URL | str, **options: t.Any) -> Operation | httpx.Response:
        return self.request("PUT", url, **options)

    def patch(self, url: httpx.URL | str, **options: t.Any) -> Operation | httpx.Response:
        return self.request("PATCH", url, **options)

    def delete(self, url: httpx.URL | str, **options: t.Any) -> Operation | httpx.Response:
        return self.request("DELETE", url, **options)

    def operation(
        self, url: httpx.URL | str, *, headers: t.Mapping[str, str] | None = None
    ) -> Operation:
        """The operation whose status URL is ``url`` (:attr:`Operation.url`, kept from
        an earlier run): nothing is sent until it is asked for. ``headers`` go with
        each of its requests."""
        return Operation(self, self._requests.operation(url, httpx.Headers(headers)), None)


class Operation(OperationBase):
    """A task on the server, followed through its status URL.

    No method sends a poll before the ``Retry-After`` of the last answer: within it,
    :meth:`status` and :meth:`done` answer from what was last seen.
    """

    def __init__(
        self, client: TaskClient, state: OperationState, accepted: httpx.Response | None
    ) -> None:
        super().__init__(state, accepted)
        self.client = client

    def status(self) -> dict[str, t.Any]:
        """The task's status document, polled afresh if the server's ``Retry-After``
        allows. Once finished: the document the final answer carries (cancelled,
        lost), or the last one seen with ``state`` ``succeeded`` (final status below
        400) or ``failed``."""
        self._run(protocol.refresh(self._state, self._requests().poll))
        return self._status()

    def done(self) -> bool:
        """Whether the task has finished (a poll, if the ``Retry-After`` allows)."""
        self._run(protocol.refresh(self._state, self._requests().poll))
        return self._state.response is not None

    def wait(
        self, on_progress: ProgressCallback | None = None, timeout: float | None = None
    ) -> httpx.Response:
        """The final response, whatever it is, once the task has finished.

        Long-polls where the server allows it, otherwise polls as its
        ``Retry-After`` says. ``on_progress(progress)`` is called with each new
        :class:`Progress`, in order. Raises :class:`TimeoutError` after ``timeout``
        seconds; the task goes on and the operation may be waited for again.
        """
        steps = protocol.wait(
            self._state, self._requests().poll, timeout=timeout, reporting=on_progress is not None
        )
        return self._run(steps, on_progress)

    def result(
        self, timeout: float | None = None, *, on_progress: ProgressCallback | None = None
    ) -> httpx.Response:
        """As :meth:`wait`, but only a success (below 400) is returned: raises
        :class:`TaskCancelled`, :class:`TaskLost` or :class:`TaskFailed` with the
        final response otherwise."""
        response = self.wait(on_progress, timeout)
        error = protocol.final_error(response, self)
        if error is not None:
            raise error
        return response

    def cancel(self) -> bool:
        """``DELETE`` the status URL. True when the task was cancelled (it was
        queued: its handler never runs) or its cancellation was asked (it runs, and
        sees ``current_task.cancelled``). False when it had already finished: then
        the server forgets it, and its result is gone unless this operation has
        already read it (then nothing is sent)."""
        return self._run(protocol.cancel(self._state, self._requests().delete(self._state)))

    def _requests(self) -> Requests:
        return self.client._requests

    def _run(self, steps: Steps[T], on_progress: ProgressCallback | None = None) -> T:
        return run(self.client.http, steps, on_progress)
