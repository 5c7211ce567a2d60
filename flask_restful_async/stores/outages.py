"""What a store that fails tells, and to whom: clients get a generic 503 message,
the server's log gets the detail (which store, where, what went wrong)."""

from __future__ import annotations

import logging
import threading
import time

from ..exceptions import StoreUnavailable

#: The message of every :class:`StoreUnavailable` a store raises, as clients read it
#: in a 503: where the store lives (URL, host, port, user, file) is for the log only.
MESSAGE = "The task store is not available; try again later."
#: Seconds during which one kind of failure of one store is logged once; the next
#: record says how many were left out meanwhile.
LOG_INTERVAL = 10.0

#: Where store failures are logged.
logger = logging.getLogger("flask_restful_async.stores")


class OutageLog:
    """The failures of one store, logged at most once per ``interval`` seconds and
    kind of failure (an outage fails every request: the log must not drown)."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        # kind -> (monotonic time before which the kind is not logged again, left out)
        self._windows: dict[str, tuple[float, int]] = {}

    def unavailable(
        self, kind: str, detail: str, *, retry_after: int = 1, level: int = logging.WARNING
    ) -> StoreUnavailable:
        """Log ``detail`` (rate-limited) and return the error clients may see."""
        now = time.monotonic()
        with self._lock:
            until, left_out = self._windows.get(kind, (0.0, 0))
            if now < until:
                self._windows[kind] = (until, left_out + 1)
                return StoreUnavailable(MESSAGE, retry_after=retry_after)
            self._windows[kind] = (now + self.interval, 0)
        if left_out:
            detail = f"{detail} (and {left_out} more like it not logged in {self.interval:g} s)"
        logger.log(level, "%s", detail)
        return StoreUnavailable(MESSAGE, retry_after=retry_after)
