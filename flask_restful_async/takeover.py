"""Taking over accepted tasks that the process which accepted them cannot run.

With the thread executor and a shared store (SQLite file, Redis), a submit
records the request with its task (:meth:`TaskStore.create
<flask_restful_async.stores.base.TaskStore.create>`), and the accepting process
runs the task from memory as before. The stored copy serves only when that
process cannot:

- on a graceful stop (SIGTERM, a gunicorn reload or ``--max-requests``
  recycling, the dev server's reloader) the executor takes no new task, lets
  running ones finish and hands the waiting ones back (:func:`hand_back`);
- on a hard death (SIGKILL, out of memory) its waiting tasks are free once its
  lease lapses; its running ones end ``lost``, unless their resource has
  ``rerun_on_crash = True``, when they wait again.

Every process with idle workers takes such tasks (:class:`Takeover`), oldest
first, each exactly once (the store's :meth:`claim` is atomic): at its first
request of any kind, at each renewal of its lease (every third of
``RESTFUL_ASYNC_LEASE``), and, while tasks wait, each time one of its own tasks
is done, and when this process hears that the store changed (while something
long-polls, see :mod:`flask_restful_async.waiting`), at most once a second. It
never reads the store per request for this. A task taken over runs
from its stored request, with a new instance of its resource, as a Celery worker
runs it. Tasks nobody takes wait in the store (a restart takes them) for at most
``RESTFUL_ASYNC_QUEUED_TTL`` seconds, then read ``lost``.

A task whose view arguments are not JSON data (a converter that returns an
object) is stored without its request: it cannot be handed over, and a stop ends
it ``lost`` as before.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing as t

from . import outbox, signals, waiting
from .exceptions import RestfulAsyncError, Saturated
from .lease import LeaseKeeper, worker_id
from .snapshot import RequestSnapshot
from .task import TaskState

if t.TYPE_CHECKING:
    from flask import Flask

    from .executors.base import Executor
    from .stores.base import TaskStore

#: The most tasks one claim asks for; fewer when fewer workers are idle.
MAX_CLAIM = 64
#: Seconds between two looks for waiting tasks prompted by news of the store.
CHANGE_INTERVAL = 1.0


class Takeover:
    """Takes over tasks that wait in ``store`` for a process, as many as
    ``executor`` has idle workers; called by the lease keeper (see the module)."""

    def __init__(
        self, app: Flask, store: TaskStore, executor: Executor, lease: LeaseKeeper
    ) -> None:
        self.app = app
        self.store = store
        self.executor = executor
        self.lease = lease
        # Whether the last claim took all it asked for: more may be waiting.
        self.backlog = False
        self._last_look = -math.inf
        # Claimed tasks there was no room for, to hand back (see claim).
        self._surplus: list[str] = []
        waiting.watch(store, self.changed)

    def done(self) -> None:
        """One of this process's tasks is done: while tasks wait, take another."""
        if self.backlog:
            self.lease.wake()

    def changed(self) -> None:
        """The store changed (see :func:`waiting.watch`): tasks may have been handed
        back. Look soon: at most once per :data:`CHANGE_INTERVAL` (news heard
        meanwhile waits for the end of it); a look with no idle worker does not
        read the store."""
        self.lease.wake(max(time.monotonic(), self._last_look + CHANGE_INTERVAL))

    def claim(self) -> int:
        """Take up to as many waiting tasks as there are idle workers and start
        them; return how many. Raises what the store raises. Called in the lease
        keeper's thread, right after the lease is renewed: a process never holds
        a task under a lease that may have lapsed."""
        self._last_look = time.monotonic()
        self._return_surplus()
        free = self.executor.idle(MAX_CLAIM)
        if not free:
            return 0
        claimed = self.store.claim(worker_id(), free)
        self.backlog = len(claimed) == free
        taken = 0
        for task, data in claimed:
            try:
                snapshot = RequestSnapshot.from_bytes(data)
            except ValueError:
                self.app.logger.exception(
                    "Task %s cannot be taken over", task.id, extra={"task_id": task.id}
                )
                recorded, _ = outbox.finish(
                    self.store, task.id, TaskState.LOST, None, worker_id(), self.app.logger
                )
                if signals.task_finished.receivers:
                    ended = dataclasses.replace(task, state=recorded, finished_at=time.time())
                    signals.send(signals.task_finished, self.app, task=ended)
                continue
            try:
                # Held from here until a worker starts it, as a submit's snapshot.
                self.executor.acquire(snapshot.held_bytes)
            except Saturated:
                # This process's own submits took the room since the look: the
                # task goes back to the store, for the next look or another process.
                self._surplus.append(task.id)
                continue
            task.worker = worker_id()
            self.executor.submit(self.app, task, snapshot, None)
            taken += 1
        self._return_surplus()
        if taken:
            self.app.logger.info("Took over %d waiting tasks", taken)
        return taken

    def _return_surplus(self) -> None:
        """Hand back the claimed tasks there was no room for. Kept for the next
        look if the store does not take them: held under this process's live
        lease, nobody else could take them."""
        if not self._surplus:
            return
        try:
            self.store.hand_back(worker_id(), self._surplus)
        except RestfulAsyncError:
            self.app.logger.warning(
                "Could not hand %d claimed tasks back to the store",
                len(self._surplus),
                exc_info=True,
            )
            return
        self._surplus = []


def hand_back(
    app: Flask,
    store: TaskStore,
    takeover: Takeover | None,
    jobs: t.Sequence[tuple[str, str | None, RequestSnapshot]],
) -> None:
    """Give back to ``store`` the tasks ``(task_id, holder, snapshot)`` of ``app``
    that this process accepted or took over and will not run (it is stopping), for
    another process, or the next one, to take over (where ``takeover`` is set up).
    Tasks that no other process can run (a store of this process only, view
    arguments that are not JSON data) end ``lost``. Never raises.
    """
    held: dict[str, list[str]] = {}
    for task_id, holder, snapshot in jobs:
        if takeover is not None and holder is not None and snapshot.portable:
            held.setdefault(holder, []).append(task_id)
        else:  # nobody else can run it: it ends as a stop always ended it
            _, ending = outbox.finish(store, task_id, TaskState.LOST, None, worker_id(), app.logger)
            box = outbox.existing_outbox(store)
            if ending is not None or (box is not None and box.waits(task_id)):
                # Not when it had ended already (cancelled while it waited): it
                # was told then.
                signals.send_given_up(app, task_id, snapshot)
    for holder, task_ids in held.items():
        try:
            count = store.hand_back(holder, task_ids)
        except RestfulAsyncError:
            # Still held by this process: free for others once its lease is
            # released at exit, or lapses.
            app.logger.warning(
                "Could not hand %d waiting tasks back to the store", len(task_ids), exc_info=True
            )
            continue
        app.logger.info("Handed %d waiting tasks back to the store", count)
