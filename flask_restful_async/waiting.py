"""How changes to tasks reach the requests that wait for them, in this process and
across processes: long-polls (which wait for a task to end) and event streams
(which follow every change: a start, each progress write, the end).

``GET /tasks/<id>?wait=N`` reads the task and, while it is queued or running,
blocks the request thread on a :class:`threading.Condition` (holding no store
connection, reading nothing in a loop) until the task may have ended, reads it
again, and so on until it has finished or ``N`` seconds have passed.

Who wakes the waiters:

- this process, directly: the runner calls :func:`notify` once a task has ended
  (and the status URL once a ``DELETE`` has cancelled one), so a wait in the very
  process that ran the task ends at once;
- other processes, through the store: one thread per store per process runs
  :meth:`TaskStore.listen <flask_restful_async.stores.base.TaskStore.listen>`
  (SQLite: a look at ``PRAGMA data_version`` every 20 ms; Redis: a subscription to
  the channel the task-ending scripts publish on) and calls :meth:`Waiters.notify`.
  A store that only this process sees (``memory://``) gets no such thread.

The listener thread is started by the first wait that has to block, and stops by
itself ``linger`` seconds after the last wait ended (so a burst of polls does not
start one per request, and an idle process holds no subscription, polls nothing);
the next wait starts it again. It is a daemon thread, stopped at interpreter exit
and by :func:`close` (call it where the store is closed); a forked child starts
its own. Every wait also reads its task again every ``recheck`` seconds, whatever
was heard: a task whose process died reads as ``lost`` only when read, and a
notification lost in an outage costs at most that long.

Streams (:func:`subscribe`) hear more than endings: :func:`changed` tells them of
a task created, started, or given progress here, and the listener passes on what
the store hears of such changes elsewhere (SQLite: any commit; Redis: a second
channel, which it subscribes to only while a stream watches in this process). A
long-poll is never woken by that news, and with no stream open in the process
:func:`changed` costs one dictionary lookup and one attribute read. The streams
on one task share their reads of it: one read per change per process, however
many streams follow the task. News that names no task (SQLite's) is one read of
every followed task, by the listener, which wakes only the streams whose task
changed (:meth:`Waiters._probe`).
"""

from __future__ import annotations

import atexit
import collections
import inspect
import logging
import os
import threading
import time
import typing as t
import weakref

from . import stopping
from .stores.base import Ending, TaskStore
from .task import Task

#: Seconds between two reads of a waited task when nothing was heard.
RECHECK_INTERVAL = 5.0
#: Seconds the listener thread keeps running after the last wait ended.
LISTENER_LINGER = 10.0
#: Endings (announced with their response, at most 4 KiB each) kept per store and
#: process for waits that start after the news.
REMEMBERED_ENDINGS = 1024
#: Notifications (which task, or all) kept per store and process, so that a wait
#: tells news of its own task from news of others since its ticket.
REMEMBERED_NEWS = 1024

_logger = logging.getLogger(__name__)
_T = t.TypeVar("_T")
#: Entries the listener takes to read itself: (task id, entry, its count of changes).
_Claims = list[tuple[str, "_Entry", int]]


def _settled(task: Task | None) -> bool:
    """True when there is nothing more to wait for: finished, expired or gone."""
    return task is None or task.expired or task.state.finished


class _Entry:
    """The waits on one task id: a condition on the shared lock, and a counter
    that every notification of that id bumps (so no wake-up is ever missed);
    ``deaf`` of the waits are not woken by news of every task (see ``listen``).

    And its streams (``watchers``): a condition and counter of their own
    (``changes``), bumped by every change, not only endings; and the last read of
    the task (``cached``, read at ``cached_at``, with what the streams made of
    it, ``derived``, by ``convert``), shared by them. News that may concern any
    task (SQLite's "the file changed") does not wake them all: the listener reads
    every followed task in one go (see :meth:`Waiters._probe`) and bumps the
    counters of those that changed; an entry it could not take marks itself
    ``stale`` and wakes one stream, whose read bumps the counter only if the task
    changed."""

    __slots__ = (
        "cached",
        "cached_at",
        "changes",
        "cond",
        "convert",
        "deaf",
        "derived",
        "read_done",
        "reading",
        "stale",
        "version",
        "waiters",
        "watch_cond",
        "watchers",
    )

    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.version = 0
        self.waiters = 0
        self.deaf = 0
        self.watch_cond = threading.Condition(lock)
        self.read_done = threading.Condition(lock)
        self.changes = 0
        self.watchers = 0
        self.cached: Task | None = None
        self.derived: object = None
        self.convert: t.Callable[[Task], object] | None = None
        self.cached_at = -1
        self.reading = False
        self.stale = False

    @property
    def unused(self) -> bool:
        return self.waiters == 0 and self.watchers == 0

    def bump(self) -> None:
        """A change for the streams; the caller holds the lock."""
        self.changes += 1
        self.watch_cond.notify_all()

    def probe(self) -> None:
        """Maybe a change: one stream is to read and tell the others if so; the
        caller holds the lock."""
        self.stale = True
        if not self.reading:
            self.watch_cond.notify()

    @property
    def probe_due(self) -> bool:
        return self.stale and not self.reading

    def take(
        self, task: Task | None, derived: object, version: int, convert: t.Callable[[Task], object]
    ) -> None:
        """End a read of the task made at ``version`` (what ``changes`` was when it
        began), by a stream or the listener: kept for the streams unless a newer
        read is, and if it finds a change nobody announced, the streams are told
        now. The caller holds the lock."""
        self.reading = False
        if self.cached_at <= version:
            if self.cached_at == version == self.changes and task != self.cached:
                version += 1
                self.bump()
            self.cached, self.derived, self.cached_at = task, derived, version
            self.convert = convert
        if self.stale:
            self.watch_cond.notify()  # news that came during the read
        self.read_done.notify_all()


class _Listener:
    """One run of a listener thread, and the stop signal its ``store.listen`` watches.

    It reads as set once :meth:`Waiters.close` (or a fork, or interpreter exit)
    retired it, or once nobody waited for ``linger`` seconds; from then on, for
    good: a new wait starts a new listener.
    """

    def __init__(self, waiters: Waiters) -> None:
        self._waiters = waiters
        self._retired = threading.Event()
        self.thread: threading.Thread | None = None

    def retire(self) -> None:
        self._retired.set()

    def is_set(self) -> bool:
        return self._retired.is_set() or self._waiters._should_stop(self)

    def wait(self, timeout: float | None = None) -> bool:
        # Sleep, but look at the idle deadline at least once a second.
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            remaining = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if remaining <= 0:
                return False
            self._retired.wait(remaining)
        return True


class Waiters:
    """The long-poll waits on one store in this process, and their listener thread.

    Get the one for a store with :func:`waiters_for` (or use :func:`wait_finished`
    and :func:`notify`); it keeps only a weak reference to the store.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        recheck: float = RECHECK_INTERVAL,
        linger: float = LISTENER_LINGER,
        remembered: int = REMEMBERED_ENDINGS,
    ) -> None:
        self._store = weakref.ref(store)
        self.recheck = recheck
        self.linger = linger
        self.remembered = remembered
        self._reset()
        _all.add(self)

    def _reset(self) -> None:
        """A fresh start, also in a forked child: the parent's waits and listener
        thread do not exist there, and its lock may have been held."""
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._waiting = 0
        self._notices = 0  # notifications ever made, of any task
        # The last notifications, as (number, task id or None for all): a wait
        # whose ticket is older reads again only if one of them was about its task.
        self._news: collections.deque[tuple[int, str | None]] = collections.deque(
            maxlen=REMEMBERED_NEWS
        )
        # The last endings the store announced, waited for or not: a wait whose
        # task ended between its read and its start takes the ending from here,
        # as Celery's result consumer keeps results it was sent.
        self._endings: collections.OrderedDict[str, Ending] = collections.OrderedDict()
        self._idle_since = time.monotonic()
        self._listener: _Listener | None = None
        # Streams on every task (task lists), and how many streams there are.
        self._every = _Entry(self._lock)
        self._watching = 0

    @property
    def waiting(self) -> int:
        """How many waits are blocked (or about to block) right now."""
        with self._lock:
            return self._waiting

    @property
    def watching(self) -> int:
        """How many streams (:meth:`subscribe`) are open right now."""
        with self._lock:
            return self._watching

    @property
    def listening(self) -> bool:
        """Whether a listener thread runs (or is about to) for this process."""
        with self._lock:
            listener = self._listener
        return listener is not None and not listener.is_set()

    def ticket(self) -> int:
        """A mark to take *before* reading a task that may then be waited on: pass
        both to :meth:`wait_finished`, which then reads again only if something
        was notified about that task (or all tasks) in between (an int read under
        the GIL: no lock needed)."""
        return self._notices

    def wait_finished(
        self,
        task_id: str,
        timeout: float,
        *,
        read: tuple[int, Task | None] | None = None,
        listen: bool = True,
    ) -> Task | None:
        """The task once it has finished (or expired, or is unknown: None), or as
        it reads after ``timeout`` seconds if it is still queued or running.

        ``read`` is ``(ticket, task)``: the task as the caller read it after taking
        :meth:`ticket`, which saves the first read when nothing ended meanwhile.
        With ``listen=False`` the wait neither starts the listener nor wakes for
        news of every task (SQLite's listener hears only that the file changed):
        only news of its own task wakes it, as this process gives when it ran the
        task. For short waits on this process's own tasks, which are read at
        their end anyway.
        Raises ``StoreUnavailable`` as :meth:`TaskStore.get` does, from the first
        read or from any later one.
        """
        store = self._store()
        if store is None:
            raise RuntimeError("the store of these waiters is gone")
        deadline = time.monotonic() + timeout
        if read is None:
            notices = self._notices
            task = store.get(task_id)
        else:
            notices, task = read
        if _settled(task) or timeout <= 0 or stopping.begun():
            return task
        entry, seen, missed = self._enter(task_id, store, notices, listen)
        try:
            while True:
                # Read after taking note of the counter (``seen``): a notification
                # from then on makes the wait below return at once. The read above
                # will do if nothing at all was notified since it began: what
                # happens from now on bumps the counter, the listener's start too.
                if missed:
                    ending = self._endings.get(task_id)
                    ended = None if ending is None or task is None else ending.apply(task)
                    if ended is not None:
                        # The news carried the end: what a read would give now.
                        task = store.retention_view(ended, time.time())
                    else:
                        task = store.get(task_id)
                missed = True
                remaining = deadline - time.monotonic()
                # The process is stopping: the task as it is, now (see stopping.py).
                if _settled(task) or remaining <= 0 or stopping.begun():
                    return task
                with self._lock:
                    # begun() again under the lock, which the stop's wake-up takes:
                    # a stop that begins after this look wakes the wait below.
                    if entry.version == seen and not stopping.begun():
                        entry.cond.wait(min(remaining, self.recheck))
                    seen = entry.version
        finally:
            self._leave(task_id, entry, listen)

    def notify(
        self,
        task_id: str | None = None,
        ending: Ending | None = None,
        *,
        claim: _Claims | None = None,
    ) -> None:
        """Wake the waits on ``task_id`` (on every task when None) to read it again,
        or, given how it ended, to take that instead of reading it; and tell the
        watchers (:func:`watch`) that something changed. ``claim``: see
        :meth:`_bump_streams`."""
        store = self._store()
        if store is not None:
            for watcher in _watchers.get(store, ()):
                watcher()
        with self._lock:
            if task_id is None:
                entries = [e for e in self._entries.values() if e.waiters > e.deaf]
            else:
                entry = self._entries.get(task_id)
                entries = [] if entry is None else [entry]
            self._notices += 1
            self._news.append((self._notices, task_id))
            # News of every task (SQLite: the file changed; a listener that
            # (re)subscribed) keeps the endings: each is a first outcome as a store
            # recorded it, which nothing but a forget or an expiry replaces, and a
            # wait that takes one answers as a read just before either would.
            if task_id is not None:
                if ending is None:
                    self._endings.pop(task_id, None)
                else:
                    self._endings[task_id] = ending
                    self._endings.move_to_end(task_id)
                    if len(self._endings) > self.remembered:
                        self._endings.popitem(last=False)
            for entry in entries:
                entry.version += 1
                entry.cond.notify_all()
            if self._watching:
                self._bump_streams(task_id, claim)

    def changed(self, task_id: str | None = None, *, claim: _Claims | None = None) -> None:
        """Wake the streams on ``task_id`` (on every task when None), and those on
        every task: it was created, started, or has new progress, but has not
        ended. Long-polls are not woken. Costs an attribute read while no stream
        is open. ``claim``: see :meth:`_bump_streams`."""
        if not self._watching:
            return
        with self._lock:
            self._bump_streams(task_id, claim)

    def _bump_streams(self, task_id: str | None, claim: _Claims | None = None) -> None:
        """Tell the streams of a change of ``task_id``, or of any task (None). Then,
        with a ``claim`` list, the entries whose last read is current go there for
        the caller to read again (:meth:`_probe`) rather than wake a stream each.
        The caller holds the lock."""
        if task_id is None:
            for key, entry in self._entries.items():
                if not entry.watchers:
                    continue
                if (
                    claim is not None
                    and not entry.reading
                    and not entry.stale
                    and entry.convert is not None
                    and entry.cached_at == entry.changes
                ):
                    entry.reading = True  # no stream reads meanwhile
                    claim.append((key, entry, entry.changes))
                else:
                    entry.probe()
        else:
            found = self._entries.get(task_id)
            if found is not None and found.watchers:
                found.bump()
        if self._every.watchers:
            self._every.bump()

    def subscribe(self, task_id: str | None = None) -> Subscription:
        """Follow every change of ``task_id`` (of every task when None) from now
        on: see :class:`Subscription`. Close it when done (it is a context
        manager)."""
        store = self._store()
        if store is None:
            raise RuntimeError("the store of these waiters is gone")
        stopping.listen()  # a stream must end as this process's stop begins
        with self._lock:
            if task_id is None:
                entry = self._every
            elif task_id in self._entries:
                entry = self._entries[task_id]
            else:
                entry = self._entries[task_id] = _Entry(self._lock)
            entry.watchers += 1
            self._watching += 1
            return Subscription(self, store, task_id, entry, entry.changes)

    def _unsubscribe(self, task_id: str | None, entry: _Entry) -> None:
        with self._lock:
            entry.watchers -= 1
            if entry.watchers == 0:
                entry.cached, entry.derived, entry.cached_at = None, None, -1
            if task_id is not None and entry.unused and self._entries.get(task_id) is entry:
                del self._entries[task_id]
            self._watching -= 1
            if self._waiting == 0 and self._watching == 0:
                self._idle_since = time.monotonic()

    def _ensure_listener(self, store: TaskStore) -> None:
        with self._lock:
            if self._listener is None and store.shared and not _exiting:
                self._start_listener(store)

    def _heard(
        self, task_id: str | None, ending: Ending | None = None, *, finished: bool = True
    ) -> None:
        """What the store's listener heard: an ending (or anything, when
        ``finished``), or a change short of an end. News of any task (None) is
        checked against every task that streams follow here, in one read."""
        claim: _Claims | None = [] if task_id is None else None
        if finished:
            self.notify(task_id, ending, claim=claim)
        else:
            self.changed(task_id, claim=claim)
        if claim:
            self._probe(claim)

    def _probe(self, claimed: _Claims) -> None:
        """Read the tasks of ``claimed`` entries at once, and wake the streams of
        those that changed since their last read (with the new read shared by
        them), and no other. Where the read fails, or news came meanwhile, one
        stream of the entry reads for itself, as after any news."""
        store = self._store()
        found: dict[str, Task] | None = None
        if store is not None:
            try:
                found = store.get_many([task_id for task_id, _, _ in claimed])
            except Exception:
                _logger.debug("Reading the followed tasks failed", exc_info=True)
        with self._lock:
            for task_id, entry, version in claimed:
                convert = entry.convert
                if found is not None and convert is not None and entry.changes == version:
                    task = found.get(task_id)
                    unchanged = task == entry.cached
                    # An unchanged task keeps what its streams made of it.
                    derived = entry.derived if unchanged else None
                    try:
                        if task is not None and not unchanged:
                            derived = convert(task)
                    except Exception:
                        _logger.exception("Rendering task %s for its streams failed", task_id)
                    else:
                        entry.take(task, derived, version, convert)
                        continue
                entry.reading = False
                entry.read_done.notify_all()
                entry.probe()

    def wake_all(self) -> None:
        """Wake every wait and stream, to look at whether the process is stopping
        (see :mod:`~flask_restful_async.stopping`); a long-poll reads its task once
        more, as after any wake-up, and answers with it."""
        with self._lock:
            for entry in [*self._entries.values(), self._every]:
                entry.cond.notify_all()
                entry.watch_cond.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the listener thread (waiting up to ``timeout`` seconds for it).

        Waits that are blocked go on, with only :func:`notify` and their periodic
        reads to wake them; the next wait starts a listener again.
        """
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.retire()
        thread = listener.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- bookkeeping ---------------------------------------------------------------

    def _enter(
        self, task_id: str, store: TaskStore, notices: int, listen: bool
    ) -> tuple[_Entry, int, bool]:
        """Register a wait: its entry, the entry's counter now, and whether anything
        was notified since ``notices`` was read (then the task must be read again)."""
        stopping.listen()  # a wait must end as this process's stop begins
        with self._lock:
            entry = self._entries.get(task_id)
            if entry is None:
                entry = self._entries[task_id] = _Entry(self._lock)
            entry.waiters += 1
            entry.deaf += not listen
            self._waiting += 1
            if listen and self._listener is None and store.shared and not _exiting:
                self._start_listener(store)
            return entry, entry.version, self._news_since(notices, task_id)

    def _news_since(self, notices: int, task_id: str) -> bool:
        """Whether a notification made since ``notices`` may concern ``task_id``;
        the caller holds the lock. Under load, other tasks end all the time
        between a ticket and its wait: news of them is no reason to read again."""
        if self._notices == notices:
            return False
        news = self._news
        if not news or news[0][0] > notices + 1:
            return True  # some of it is forgotten
        for number, about in reversed(news):
            if number <= notices:
                return False
            if about is None or about == task_id:
                return True
        return False

    def _leave(self, task_id: str, entry: _Entry, listen: bool) -> None:
        with self._lock:
            entry.waiters -= 1
            entry.deaf -= not listen
            if entry.unused and self._entries.get(task_id) is entry:
                del self._entries[task_id]
            self._waiting -= 1
            if self._waiting == 0 and self._watching == 0:
                self._idle_since = time.monotonic()

    def _start_listener(self, store: TaskStore) -> None:
        """Start a listener thread; the caller holds the lock."""
        listener = _Listener(self)
        listener.thread = threading.Thread(
            target=self._listen,
            args=(store, listener),
            name="restful-async-waiters",
            daemon=True,
        )
        self._listener = listener
        listener.thread.start()

    def _should_stop(self, listener: _Listener) -> bool:
        with self._lock:
            if self._listener is not listener:
                return True
            idle = self._waiting == 0 and self._watching == 0
            if idle and time.monotonic() - self._idle_since >= self.linger:
                self._listener = None  # retired: the next wait starts another
                listener.retire()
                return True
            return False

    def _wants_changes(self) -> bool:
        """Whether the store's listener should report every change, not only
        endings: while a stream is open here."""
        return self._watching > 0

    def _listen(self, store: TaskStore, listener: _Listener) -> None:
        # A store written before listen() took changes= hears ends only.
        options = {"changes": self._wants_changes} if _takes_changes(store) else {}
        try:
            while not listener.is_set():
                try:
                    store.listen(self._heard, listener, **options)
                except Exception:
                    # A store's listen() should not raise; if one does, it is
                    # logged and started again, never left to kill the thread.
                    _logger.exception("Listening to %s failed", store.url)
                    listener.wait(1.0)
                else:
                    # It returned: it saw the signal set, or (a faulty store)
                    # did not block; either way, no busy loop.
                    listener.wait(0.1)
        finally:
            with self._lock:
                if self._listener is listener:
                    self._listener = None


class Subscription:
    """A stream's view of the changes of one task (or of every task): made by
    :meth:`Waiters.subscribe`, it counts what was notified since it last looked.

    :meth:`wait` blocks (holding no store connection) until something changed
    since the previous call, or a timeout; :meth:`read` then reads the task, once
    for every stream on it in this process. The first :meth:`wait` starts the
    listener thread (see the module) if none runs.
    """

    def __init__(
        self,
        waiters: Waiters,
        store: TaskStore,
        task_id: str | None,
        entry: _Entry,
        seen: int,
    ) -> None:
        self._waiters = waiters
        self._store = store
        self.task_id = task_id
        self._entry = entry
        self._seen = seen
        self._closed = False

    def wait(self, timeout: float) -> bool:
        """Whether anything changed since the last call (or since the subscription
        was made), waiting up to ``timeout`` seconds for it."""
        waiters = self._waiters
        if waiters._listener is None:
            waiters._ensure_listener(self._store)
        entry = self._entry
        with waiters._lock:
            if (
                entry.changes == self._seen
                and not entry.probe_due
                and timeout > 0
                and not stopping.begun()  # see Waiters.wait_finished
            ):
                entry.watch_cond.wait(timeout)
            changed = entry.changes != self._seen or entry.probe_due
            self._seen = entry.changes
        return changed

    def read(
        self, convert: t.Callable[[Task], _T], *, fresh: bool = False
    ) -> tuple[Task | None, _T | None]:
        """The task as it reads now (None if unknown or gone) and ``convert`` of
        it (None for None), shared: a read made since the last change, by this
        stream or another on the same task (with the same ``convert``), is used
        again, unless ``fresh`` (a read the stream makes now and then whatever
        it heard: a task whose process died reads ``lost`` only when read).
        Raises what :meth:`TaskStore.get` raises."""
        if self.task_id is None:
            raise TypeError("a subscription to every task has no task to read")
        entry, lock = self._entry, self._waiters._lock
        with lock:
            while True:
                version = entry.changes
                if entry.cached_at == version and not fresh and not entry.stale:
                    return entry.cached, t.cast("_T | None", entry.derived)
                if not entry.reading:
                    entry.reading = True
                    entry.stale = False
                    break
                entry.read_done.wait(1.0)
        try:
            task = self._store.get(self.task_id)
            derived = None if task is None else convert(task)
        except BaseException:
            with lock:
                entry.reading = False
                entry.read_done.notify_all()
            raise
        with lock:
            entry.take(task, derived, version, convert)
        return task, derived

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._waiters._unsubscribe(self.task_id, self._entry)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one per store per process -----------------------------------------------------


def _takes_changes(store: TaskStore) -> bool:
    """Whether ``store.listen`` takes the ``changes`` keyword (every store of this
    package does; a custom one may predate it, and is then told only of ends)."""
    try:
        parameters = inspect.signature(store.listen).parameters
    except (TypeError, ValueError):
        return True  # no signature to read: call it as documented
    if "changes" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    ):
        return True
    if type(store) not in _told_without_changes:
        # Once per class: the listener starts again whenever waiters come back.
        _told_without_changes.add(type(store))
        _logger.warning(
            "%s.listen() takes no changes= keyword: event streams in this process hear"
            " only when tasks end, not their other changes",
            type(store).__name__,
        )
    return False


#: Store classes whose ``listen`` takes no ``changes=``, already told of in the log.
_told_without_changes: set[type[TaskStore]] = set()


_registry: weakref.WeakKeyDictionary[TaskStore, Waiters] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()
_all: weakref.WeakSet[Waiters] = weakref.WeakSet()
_watchers: weakref.WeakKeyDictionary[TaskStore, list[t.Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)
_exiting = False


def waiters_for(store: TaskStore) -> Waiters:
    """This process's :class:`Waiters` of ``store``, made on first use."""
    found = _registry.get(store)
    if found is not None:
        return found
    with _registry_lock:
        found = _registry.get(store)
        if found is None:
            found = _registry[store] = Waiters(store)
        return found


def wait_finished(
    store: TaskStore,
    task_id: str,
    timeout: float,
    *,
    read: tuple[int, Task | None] | None = None,
    listen: bool = True,
) -> Task | None:
    """:meth:`Waiters.wait_finished` on this process's waiters of ``store``."""
    return waiters_for(store).wait_finished(task_id, timeout, read=read, listen=listen)


def ticket(store: TaskStore) -> int:
    """:meth:`Waiters.ticket` of this process's waiters of ``store``."""
    return waiters_for(store).ticket()


def notify(store: TaskStore, task_id: str | None = None, ending: Ending | None = None) -> None:
    """Wake this process's waits on ``task_id`` of ``store`` (all when None); with
    ``ending`` (how it ended, as just recorded), they take that instead of reading
    the task again.

    Cheap when nothing ever waited on ``store`` here: one dictionary lookup.
    """
    found = _registry.get(store)
    if found is not None:
        found.notify(task_id, ending)


def changed(store: TaskStore, task_id: str) -> None:
    """Tell this process's streams on ``task_id`` of ``store`` (and on every task)
    that it was created, started or has new progress (see :meth:`Waiters.changed`).

    Cheap when no stream is open here: a dictionary lookup and an attribute read.
    """
    found = _registry.get(store)
    if found is not None and found._watching:
        found.changed(task_id)


def subscribe(store: TaskStore, task_id: str | None = None) -> Subscription:
    """:meth:`Waiters.subscribe` on this process's waiters of ``store``."""
    return waiters_for(store).subscribe(task_id)


def watch(store: TaskStore, watcher: t.Callable[[], None]) -> None:
    """Call ``watcher`` (in the listener thread: it must be quick and never raise)
    whenever this process hears of a change in ``store``: a task ended here or in
    another process (Redis), or the file changed (SQLite). Heard only while a
    listener runs, i.e. while something long-polls (see the module)."""
    _watchers.setdefault(store, []).append(watcher)


def close(store: TaskStore, timeout: float = 2.0) -> None:
    """Stop this process's listener thread of ``store``, if one runs: call it where
    the store is closed (a later wait starts one again)."""
    found = _registry.get(store)
    if found is not None:
        found.close(timeout)


def _close_all() -> None:
    global _exiting
    _exiting = True
    for waiters in list(_all):
        waiters.close(timeout=1.0)


def _wake_all() -> None:
    for waiters in stopping.members(_all):
        waiters.wake_all()


def _reset_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for waiters in list(_all):
        waiters._reset()


atexit.register(_close_all)
stopping.on_stop(_wake_all)
os.register_at_fork(after_in_child=_reset_after_fork)
