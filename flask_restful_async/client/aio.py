"""``AsyncTaskClient`` and its ``AsyncOperation``: the same client for asyncio code."""

from __future__ import annotations

import asyncio
import inspect
import typing as t

import httpx

from . import protocol
from .protocol import OperationBase, OperationState, Policy, Progress, Requests, Send, Sleep, Steps

T = t.TypeVar("T")
#: Called with each new progress; may be a coroutine function.
AsyncProgressCallback = t.Callable[[Progress], object]


async def run(
    http: httpx.AsyncClient, steps: Steps[T], on_progress: AsyncProgressCallback | None = None
) -> T:
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
                    response = await http.send(step.request, follow_redirects=follow)
                except protocol.RETRYABLE as e:
                    step = steps.throw(e)
                    continue
                step = steps.send(response)
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                step = steps.send(None)
            else:
                if on_progress is not None:
                    called = on_progress(step.progress)
                    if inspect.isawaitable(called):
                        await called
                step = steps.send(None)
    except StopIteration as stop:
        return t.cast(T, stop.value)
    finally:
        steps.close()


class AsyncTaskClient:
    """:class:`~.sync.TaskClient` for asyncio: the same options, over an
    ``httpx.AsyncClient``; its methods are coroutines. Use it with ``async with``,
    or await :meth:`aclose`."""

    def __init__(
        self,
        base_url: httpx.URL | str = "",
        *,
        long_poll: int = 20,
        retries: int = 6,
        backoff: float = 0.5,
        **options: t.Any,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, **options)
        self.policy = Policy(long_poll=long_poll, retries=retries, backoff=backoff)
        self._requests = Requests(self.http, self.policy)

    async def __aenter__(self) -> AsyncTaskClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        wait: int | None = None,
        idempotency_key: str | None = None,
        headers: t.Mapping[str, str] | None = None,
        **options: t.Any,
    ) -> AsyncOperation | httpx.Response:
        """As :meth:`TaskClient.request <.sync.TaskClient.request>`."""
        given = httpx.Headers(headers)
        options["headers"] = protocol.submit_headers(
            given, wait=wait, idempotency_key=idempotency_key
        )
        steps = protocol.submit(self._requests.submit(method, url, options, wait), self.policy)
        response = await run(self.http, steps)
        state = self._requests.accepted(response, given)
        return response if state is None else AsyncOperation(self, state, response)

    async def get(self, url: httpx.URL | str, **options: t.Any) -> AsyncOperation | httpx.Response:
        return await self.request("GET", url, **options)

    async def post(self, url: httpx.URL | str, **options: t.Any) -> AsyncOperation | httpx.Response:
        return await self.request("POST", url, **options)

    async def put(self, url: httpx.URL | str, **options: t.Any) -> AsyncOperation | httpx.Response:
        return await self.request("PUT", url, **options)

    async def patch(
        self, url: httpx.URL | str, **options: t.Any
    ) -> AsyncOperation | httpx.Response:
        return await self.request("PATCH", url, **options)

    async def delete(
        self, url: httpx.URL | str, **options: t.Any
    ) -> AsyncOperation | httpx.Response:
        return await self.request("DELETE", url, **options)

    def operation(
        self, url: httpx.URL | str, *, headers: t.Mapping[str, str] | None = None
    ) -> AsyncOperation:
        """As :meth:`TaskClient.operation <.sync.TaskClient.operation>`."""
        return AsyncOperation(self, self._requests.operation(url, httpx.Headers(headers)), None)


class AsyncOperation(OperationBase):
    """:class:`~.sync.Operation` for asyncio: the same properties; ``status``,
    ``done``, ``wait``, ``result`` and ``cancel`` are coroutines. ``on_progress``
    may be a coroutine function."""

    def __init__(
        self, client: AsyncTaskClient, state: OperationState, accepted: httpx.Response | None
    ) -> None:
        super().__init__(state, accepted)
        self.client = client

    async def status(self) -> dict[str, t.Any]:
        await self._run(protocol.refresh(self._state, self.client._requests.poll))
        return self._status()

    async def done(self) -> bool:
        await self._run(protocol.refresh(self._state, self.client._requests.poll))
        return self._state.response is not None

    async def wait(
        self, on_progress: AsyncProgressCallback | None = None, timeout: float | None = None
    ) -> httpx.Response:
        steps = protocol.wait(
            self._state,
            self.client._requests.poll,
            timeout=timeout,
            reporting=on_progress is not None,
        )
        return await self._run(steps, on_progress)

    async def result(
        self, timeout: float | None = None, *, on_progress: AsyncProgressCallback | None = None
    ) -> httpx.Response:
        response = await self.wait(on_progress, timeout)
        error = protocol.final_error(response, self)
        if error is not None:
            raise error
        return response

    async def cancel(self) -> bool:
        return await self._run(
            protocol.cancel(self._state, self.client._requests.delete(self._state))
        )

    async def _run(self, steps: Steps[T], on_progress: AsyncProgressCallback | None = None) -> T:
        return await run(self.client.http, steps, on_progress)
