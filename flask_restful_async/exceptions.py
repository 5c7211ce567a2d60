"""The library's exceptions: one root, each subclass carrying what a caller needs."""

from __future__ import annotations


class RestfulAsyncError(Exception):
    """Root of every error this library raises on purpose."""


class Unavailable(RestfulAsyncError):
    """The task could not be accepted or read now; the client should retry later.

    Answered as ``503`` with ``Retry-After: retry_after``.
    """

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class Saturated(Unavailable):
    """The executor's bounded backlog is full."""


class StoreUnavailable(Unavailable):
    """The task store did not answer (connection refused, timed out, locked too long).

    ``doubtful`` is True when the write may have taken effect all the same (the
    request reached the store, its reply did not come back): the caller must not
    take it for undone (see :meth:`TaskStore.withdraw
    <flask_restful_async.stores.base.TaskStore.withdraw>`). ``refused`` is True
    when the store answered and refused the write, which may pass (Redis out of
    memory, or busy with a script): nothing was written, and what is refused may
    be the write itself (a large response) rather than the store's state.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 1,
        doubtful: bool = False,
        refused: bool = False,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.doubtful = doubtful
        self.refused = refused


class TaskCancelled(RestfulAsyncError):
    """Raised by :meth:`current_task.raise_if_cancelled` to end a task as ``cancelled``."""


class ResultTooLarge(RestfulAsyncError):
    """A handler's response is larger than ``RESTFUL_ASYNC_MAX_RESULT`` bytes: the
    task fails instead of filling the store."""

    def __init__(self, max_size: int) -> None:
        super().__init__(f"the result is larger than {max_size} bytes")
        self.max_size = max_size
