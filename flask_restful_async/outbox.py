"""The writes that keep a ``202``'s promise through a store outage: a task's start,
its outcome, and the taking back of a task whose submit was answered ``503``.

A store that does not answer for a few seconds must not leave a task ``queued``
or ``running`` for ever, nor kill its handler. So the runner starts a task
through :func:`start`, which tries again until the store answers, and records
its end through :func:`finish`, which hands an outcome the store did not take to
this process's :class:`Outbox` for that store: a thread of its own writes it as
soon as the store answers again (within about a second), and wakes the waiters.

A submit answered ``503`` must leave no task behind, even when the store's
reply to its create, or the executor's hand-over, was lost after the task was
written: :func:`withdraw` takes such a task back (see :meth:`TaskStore.withdraw
<flask_restful_async.stores.base.TaskStore.withdraw>`), now or, through the
outbox, once the store answers again. Withdrawals are not given up with time
(a task left behind would wait for ``RESTFUL_ASYNC_QUEUED_TTL``), only to the
bound on how many wait.

Retrying is bounded. An outcome is kept for at most :data:`GIVE_UP_LEASES` leases
and, per store and process, :data:`MAX_BYTES` of responses (beyond that, the
oldest outcomes lose their response and end as ``lost``) and :data:`MAX_TASKS`
outcomes; an outcome the store refuses (an error reply, not an outage) for a whole
lease loses its response too. An outcome given up is handed to the lease (see
:meth:`flask_restful_async.lease.LeaseKeeper`), which stops renewing the name its
task runs under and releases it, so that the task reads ``lost``: the renewal never
keeps alive a task whose end this process will not write. A process that exits
with outcomes unwritten releases its lease, or lets it lapse, to the same effect.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import threading
import time
import typing as t
import weakref

from . import waiting
from .exceptions import StoreUnavailable
from .stores.base import Ending
from .task import Task, TaskState

if t.TYPE_CHECKING:
    import logging

    from .stores.base import TaskStore
    from .task import StoredResponse

#: Leases (``RESTFUL_ASYNC_LEASE``) that an outcome, or a task's start, is retried
#: for while the store does not take it.
GIVE_UP_LEASES = 4
#: Bytes of responses kept waiting, per store and process.
MAX_BYTES = 64 * 1024 * 1024
#: Outcomes kept waiting, per store and process.
MAX_TASKS = 10_000
#: Seconds between two tries: the first pause, and the longest.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
#: Bytes of response body up to which a recorded outcome is handed to this
#: process's long-polls with the news, sparing them a read (each process keeps
#: the last ``waiting.REMEMBERED_ENDINGS`` of these).
ANNOUNCED_BODY_MAX = 16 * 1024


class Backoff:
    """The pauses between tries of a write the store did not take: from
    :data:`RETRY_FIRST`, doubling up to :data:`RETRY_MAX`, each cut by a random
    part of up to a half (so that processes that failed together try apart)."""

    def __init__(self) -> None:
        self.pause = RETRY_FIRST

    def sleep(self) -> None:
        time.sleep(self.pause * random.uniform(0.5, 1.0))
        self.pause = min(RETRY_MAX, self.pause * 2)

    def reset(self) -> None:
        self.pause = RETRY_FIRST


def warn_failed(logger: logging.Logger, message: str, task_id: str, error: Exception) -> None:
    """Log ``message`` (``%s`` for the task id, then for what failed) as a warning:
    an outage by its message, which says it all; any other error with its traceback."""
    if isinstance(error, StoreUnavailable):
        text, trace = error.message, False
    else:
        text, trace = repr(error), True
    logger.warning(message, task_id, text, extra={"task_id": task_id}, exc_info=trace)


def is_refusal(error: Exception) -> bool:
    """Whether ``error``, raised by a store's write, is a refusal of that write (an
    error reply, which may pass: Redis out of memory, busy) rather than an outage."""
    return not isinstance(error, StoreUnavailable) or error.refused


def give_up_after(store: TaskStore) -> float:
    """Seconds a start or an outcome is retried for in ``store``."""
    return GIVE_UP_LEASES * store.lease


def start(
    store: TaskStore,
    task_id: str,
    worker: str,
    logger: logging.Logger,
    on_give_up: t.Callable[[], None] | None = None,
    before: t.Callable[[], None] | None = None,
) -> Task | None:
    """Move a queued task to running under ``worker``; None if it is not to run.

    ``before`` runs before each try (the lease's ``ensure``: ``worker`` must be
    live in the store before a task runs under it); what it raises counts as a
    failed try.

    Tries again, with backoff, while the store does not answer (or answers an
    error, which may pass too: out of memory, busy). A start whose
    reply was lost after it took effect shows on the next try as the task
    running under ``worker`` already: that is this start, and the task runs.
    Past :func:`give_up_after`, the task is handed to the outbox as ``lost``,
    and ``on_give_up`` is called.
    """
    deadline = time.monotonic() + give_up_after(store)
    backoff = Backoff()
    tried = False
    while True:
        try:
            if before is not None:
                before()
            started = store.start(task_id, worker)
            if started is not None or not tried:
                return started
            found = store.get(task_id)
            if found is not None and found.state is TaskState.RUNNING and found.worker == worker:
                return found
            return None  # cancelled, or lost meanwhile
        except Exception as e:
            # An outage, or an error reply that may pass as well (Redis out of
            # memory, or busy with a long script): tried again the same way.
            if not tried:
                warn_failed(logger, "Task %s cannot start yet, trying again: %s", task_id, e)
            tried = True
            if time.monotonic() >= deadline:
                logger.error(
                    "Task %s could not be started; it ends as lost",
                    task_id,
                    extra={"task_id": task_id},
                )
                outbox_for(store).put(task_id, TaskState.LOST, None, worker, logger)
                if on_give_up is not None:
                    on_give_up()
                return None
        backoff.sleep()


def finish(
    store: TaskStore,
    task_id: str,
    state: TaskState,
    response: StoredResponse | None,
    worker: str | None,
    logger: logging.Logger,
    started_at: float | None = None,
) -> tuple[TaskState, Ending | None]:
    """Record a task's outcome now, or, if the store does not take it, in the outbox.

    Never raises. An error other than an outage (the store refused this outcome:
    out of memory, busy) is logged, and the outcome waits in the outbox as in an
    outage; refused for a lease or more, it is tried without its response, as
    ``lost`` (the response may be what the store refuses). Returns the state
    recorded (or waiting in the outbox), ``state``; and the ending as the store
    recorded it: None if it did not (the outcome waits in the outbox, or the task
    had ended already). ``started_at``, when the task started, goes with the ending.
    """
    try:
        finished_at = store.finish(task_id, state, response)
    except Exception as e:
        refused = is_refusal(e)
        if refused:
            # Tried again as an outage is, with its response for a while (see
            # Outbox._write_all); with its traceback unless the store said why
            # (its detail went to the store's own log, at most once in a while).
            logger.error(
                "The store refused the outcome of task %s; trying again",
                task_id,
                exc_info=not isinstance(e, StoreUnavailable),
                extra={"task_id": task_id},
            )
        else:
            logger.warning(
                "The outcome of task %s waits for the store, which did not take it: %s",
                task_id,
                e,
                extra={"task_id": task_id},
            )
        outbox_for(store).put(task_id, state, response, worker, logger, refused=refused)
        return state, None
    # Long-polls in this process wake at once, and take the outcome as recorded
    # rather than read it back (unless it is large: they keep a few of these).
    ending = None if finished_at is None else Ending(state, finished_at, response, started_at)
    if response is None or len(response.body) <= ANNOUNCED_BODY_MAX:
        waiting.notify(store, task_id, ending)
    else:
        waiting.notify(store, task_id)
    return state, ending


def withdraw(
    store: TaskStore,
    task_id: str,
    logger: logging.Logger,
    *,
    now: bool = True,
    running_under: str | None = None,
) -> None:
    """Take back the task ``task_id`` whose submit is answered ``503`` (see
    :meth:`TaskStore.withdraw <flask_restful_async.stores.base.TaskStore.withdraw>`
    for ``running_under``): at once (unless not ``now``: the store just failed),
    else as soon as the store answers again. Never raises."""
    if now:
        try:
            store.withdraw(task_id, running_under=running_under)
            return
        except StoreUnavailable:
            pass
        except Exception:
            # An error reply that may pass (Redis busy, out of memory): tried
            # again like an outage, as a task left behind could run later.
            logger.exception("Could not take back task %s", task_id, extra={"task_id": task_id})
    logger.warning(
        "Task %s, whose submit was refused, is taken back once the store answers",
        task_id,
        extra={"task_id": task_id},
    )
    outbox_for(store).put(task_id, TaskState.QUEUED, None, running_under, logger)


@dataclasses.dataclass
class _Outcome:
    task_id: str
    #: A final state; ``queued`` for a task to take back (see :func:`withdraw`).
    state: TaskState
    response: StoredResponse | None
    #: The worker its task runs under; for a task to take back, ``running_under``.
    worker: str | None
    logger: logging.Logger
    since: float
    #: Whether the store refused it once (logged then, not at every try).
    refused: bool = False
    #: When (``time.monotonic()``) the store first refused it.
    refused_since: float | None = None

    @property
    def withdrawal(self) -> bool:
        return self.state is TaskState.QUEUED

    @property
    def size(self) -> int:
        return 0 if self.response is None else len(self.response.body)


class Outbox:
    """Outcomes of this process that ``store`` has not taken yet; see the module."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._waiting: collections.OrderedDict[str, _Outcome] = collections.OrderedDict()
        self._bytes = 0
        self._given_up: set[str] = set()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def put(
        self,
        task_id: str,
        state: TaskState,
        response: StoredResponse | None,
        worker: str | None,
        logger: logging.Logger,
        *,
        refused: bool = False,
    ) -> None:
        """Keep an outcome until the store takes it (or it is given up); ``refused``:
        the store answered it with an error (logged already)."""
        now = time.monotonic()
        outcome = _Outcome(task_id, state, response, worker, logger, now)
        if refused:
            outcome.refused, outcome.refused_since = True, now
        with self._lock:
            self._remove(task_id)
            self._waiting[task_id] = outcome
            self._bytes += outcome.size
            self._bound()
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="restful-async-outbox", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    # At interpreter exit no thread starts (Python 3.12+): the
                    # lease's release drains what waits, in its own thread.
                    return
                self._thread = thread

    def waits(self, task_id: str) -> bool:
        """Whether an outcome (or a withdrawal) of ``task_id`` waits here."""
        with self._lock:
            return task_id in self._waiting

    def given_up(self) -> set[str]:
        """The worker names whose tasks' outcomes were given up since the last call."""
        with self._lock:
            names, self._given_up = self._given_up, set()
        return names

    def withdrawals(self) -> list[str]:
        """The ids of the tasks waiting here to be taken back."""
        with self._lock:
            return [outcome.task_id for outcome in self._waiting.values() if outcome.withdrawal]

    def drain(self, timeout: float) -> int:
        """Try to write every waiting outcome for up to ``timeout`` seconds (at
        exit); return how many are left."""
        deadline = time.monotonic() + timeout
        while self._waiting and not self._write_all() and time.monotonic() < deadline:
            time.sleep(min(RETRY_MAX / 4, max(0.0, deadline - time.monotonic())))
        return len(self._waiting)

    def clear(self) -> None:
        """Drop every waiting outcome: the lease of their tasks is released or
        left to lapse (see :meth:`LeaseKeeper.release`), so they read ``lost``."""
        with self._lock:
            self._waiting.clear()
            self._bytes = 0

    def _run(self) -> None:
        backoff = Backoff()
        while True:
            with self._lock:
                if not self._waiting:
                    self._thread = None
                    return
            if self._write_all():
                backoff.reset()
            else:
                self._give_up_old()
                backoff.sleep()

    def _write_all(self) -> bool:
        """Write the waiting outcomes, oldest first; False at the first outage, or
        when a withdrawal met an error (it stays, to be tried again)."""
        with self._lock:
            pending = list(self._waiting.values())
        written = True
        for outcome in pending:
            try:
                if outcome.withdrawal:
                    taken = self.store.withdraw(outcome.task_id, running_under=outcome.worker)
                else:
                    finished = self.store.finish(outcome.task_id, outcome.state, outcome.response)
                    taken = finished is not None
            except Exception as e:
                if not is_refusal(e):
                    return False  # an outage: the next round, after a pause
                # An error reply (Redis busy, out of memory) is tried again, as an
                # outage is: a withdrawal never given up (the task left behind could
                # be claimed and run, though its submit was answered 503), an
                # outcome until give_up_after, even "lost" (given up at once, it
                # gave up the lease of every task of this process).
                if not outcome.refused:
                    outcome.refused, outcome.refused_since = True, time.monotonic()
                    outcome.logger.exception(
                        "The store refused to take back task %s; trying again"
                        if outcome.withdrawal
                        else "The store refused the outcome of task %s",
                        outcome.task_id,
                        extra={"task_id": outcome.task_id},
                    )
                if outcome.response is not None and _refused_long(outcome, self.store):
                    with self._lock:
                        if self._waiting.get(outcome.task_id) is outcome:
                            # The response may be what it refuses (too large): without.
                            outcome.logger.error(
                                "The store refused the outcome of task %s for %.0f s; it"
                                " is tried again without its response, as lost",
                                outcome.task_id,
                                self.store.lease,
                                extra={"task_id": outcome.task_id},
                            )
                            self._degrade(outcome)
                written = False
                continue
            with self._lock:
                if self._waiting.get(outcome.task_id) is outcome:
                    self._remove(outcome.task_id)
            if outcome.withdrawal:
                done = (
                    "Task %s is taken back"
                    if taken
                    else "Task %s has nothing to take back (never written, or started since)"
                )
            else:
                done = (
                    "Task %s's outcome is stored"
                    if taken
                    else "Task %s's outcome is not stored: the store has it ended, or never had it"
                )
            outcome.logger.info(
                done,
                outcome.task_id,
                extra={"task_id": outcome.task_id},
            )
            waiting.notify(self.store, outcome.task_id)
        return written

    def _give_up_old(self) -> None:
        oldest = time.monotonic() - give_up_after(self.store)
        with self._lock:
            for outcome in list(self._waiting.values()):
                if outcome.since > oldest:
                    break
                if not outcome.withdrawal:
                    self._abandon(outcome)

    def _bound(self) -> None:
        # Called with the lock held.
        if self._bytes > MAX_BYTES:
            for outcome in list(self._waiting.values()):
                if self._bytes <= MAX_BYTES:
                    break
                if outcome.response is not None:
                    outcome.logger.error(
                        "Too many outcomes wait for the store: the response of task %s is"
                        " dropped, it ends as lost",
                        outcome.task_id,
                        extra={"task_id": outcome.task_id},
                    )
                    self._degrade(outcome)
        while len(self._waiting) > MAX_TASKS:
            self._abandon(next(iter(self._waiting.values())))

    def _degrade(self, outcome: _Outcome) -> None:
        self._bytes -= outcome.size
        outcome.state, outcome.response = TaskState.LOST, None

    def _abandon(self, outcome: _Outcome) -> None:
        self._remove(outcome.task_id)
        if outcome.withdrawal:
            outcome.logger.error(
                "Gave up taking back task %s; if it was written, it reads as lost once"
                " RESTFUL_ASYNC_QUEUED_TTL has passed",
                outcome.task_id,
                extra={"task_id": outcome.task_id},
            )
            return
        outcome.logger.error(
            "Gave up writing the outcome of task %s; the lease it was held under is"
            " given up, so that it reads as lost (or, if it never started and another"
            " process can run it, waits for one)",
            outcome.task_id,
            extra={"task_id": outcome.task_id},
        )
        if outcome.worker is not None:
            self._given_up.add(outcome.worker)

    def _remove(self, task_id: str) -> None:
        outcome = self._waiting.pop(task_id, None)
        if outcome is not None:
            self._bytes -= outcome.size


_outboxes: weakref.WeakKeyDictionary[TaskStore, Outbox] = weakref.WeakKeyDictionary()
_outboxes_lock = threading.Lock()


def outbox_for(store: TaskStore) -> Outbox:
    """This process's :class:`Outbox` of ``store``, made on first use."""
    with _outboxes_lock:
        found = _outboxes.get(store)
        if found is None:
            found = _outboxes[store] = Outbox(store)
        return found


def existing_outbox(store: TaskStore) -> Outbox | None:
    """This process's outbox of ``store`` if one was ever needed: a dictionary lookup."""
    return _outboxes.get(store)


def _refused_long(outcome: _Outcome, store: TaskStore) -> bool:
    """Whether the store has refused ``outcome`` for a lease or more: long enough
    for a passing refusal (out of memory, busy) to have passed, so that the
    response itself may be what it refuses."""
    since = outcome.refused_since
    return since is not None and time.monotonic() - since >= store.lease


def _reset_after_fork() -> None:
    # Outcomes of the parent are the parent's to write; the child starts empty.
    global _outboxes_lock
    _outboxes_lock = threading.Lock()
    _outboxes.clear()


os.register_at_fork(after_in_child=_reset_after_fork)
