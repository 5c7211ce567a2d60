"""How long the tasks of each endpoint take, as this process has seen them.

A client that polls as ``Retry-After`` tells it waits at least a second (the
header counts whole seconds) for a task that may take 20 ms. So a submit whose
task will most likely end within ``RESTFUL_ASYNC_SHORT_WAIT`` seconds waits for
it in the request thread, through the long-poll machinery (see
:mod:`flask_restful_async.waiting`), before it answers ``202``: the status
document then already reads finished and ``Retry-After`` is ``0``, so the
client's first poll gets the result. Whether a task will likely end soon is
told by :class:`RunTimes`: per endpoint and method, an exponentially weighted
average of the time from submit to end of the tasks this process ran.

Samples come from a local executor (threads), which calls :meth:`RunTimes.record`
as each task is done; what a sample measures includes the time the task waited
for a worker, so a backlog makes submits stop waiting by itself. With an
executor that runs tasks elsewhere (Celery), nothing is sampled and no submit
waits.

A task that runs in its submit's request thread (``RESTFUL_ASYNC_SHORT_IN_REQUEST``)
is followed while it runs (:meth:`RunTimes.begin`): the estimate is at least the
time the oldest of those has run so far, so one that hangs stops the next submits
from running theirs in the request thread, and from waiting, as soon as it has run
longer than the bound, not when it ends. Its sample is its handler's time, not the
final write's: a store that stalls must not turn away the one kind of submit that
needs no store until its end.
"""

from __future__ import annotations

import itertools
import time

#: Weight of the newest sample in the average: about the last ten tasks count.
WEIGHT = 0.2


class RunTimes:
    """Seconds from submit to end, per ``(endpoint, method)``, in this process."""

    def __init__(self, weight: float = WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError("weight must be above 0 and at most 1")
        self.weight = weight
        self._averages: dict[tuple[str, str], float] = {}
        # Runs followed while they run: token -> (endpoint, method), start.
        self._running: dict[int, tuple[tuple[str, str], float]] = {}
        self._tokens = itertools.count()

    def begin(self, endpoint: str, method: str) -> int:
        """A task of ``endpoint`` and ``method`` starts now; returns the token that
        :meth:`end` takes when it is done."""
        token = next(self._tokens)
        self._running[token] = ((endpoint, method), time.monotonic())
        return token

    def end(self, token: int) -> None:
        """The run :meth:`begin` returned ``token`` for is done: record it (as a
        sample of its endpoint)."""
        key, started = self._running.pop(token)
        self.record(*key, time.monotonic() - started)

    def record(self, endpoint: str, method: str, seconds: float) -> None:
        """One task of ``endpoint`` and ``method`` (lower case) took ``seconds``."""
        # No lock: two workers recording at once may lose one sample of an average,
        # which costs nothing, where a lock would have to be remade after a fork.
        key = (endpoint, method)
        average = self._averages.get(key)
        if average is None:
            self._averages[key] = seconds
        else:
            self._averages[key] = average + self.weight * (seconds - average)

    def estimate(self, endpoint: str, method: str) -> float | None:
        """The expected seconds from submit to end; None before the first sample.
        At least the time the oldest run of that endpoint and method followed
        (:meth:`begin`) has run so far."""
        key = (endpoint, method)
        average = self._averages.get(key)
        if average is None or not self._running:
            return average
        # A copy taken in one step: other threads begin and end runs meanwhile.
        runs = list(self._running.values())
        starts = [started for run, started in runs if run == key]
        if not starts:
            return average
        return max(average, time.monotonic() - min(starts))
