"""Per-app state of the extension, kept in ``app.extensions`` and found through the app."""

from __future__ import annotations

import functools
import hashlib
import math
import time
import typing as t

from flask import Flask, Response, request
from flask_restful import Api, Resource

from . import outbox, signals, waiting
from .deferred import Recorder, Run
from .estimates import RunTimes
from .exceptions import Saturated, StoreUnavailable, Unavailable
from .lease import LeaseKeeper, worker_id
from .prefer import Preference, request_prefer, respond_async, wait_seconds
from .responses import (
    error_response,
    expired_response,
    status_response,
    stored_to_response,
)
from .snapshot import RequestSnapshot
from .stores.base import TaskStore
from .task import Task, TaskState, new_task_id

if t.TYPE_CHECKING:
    from .executors.base import Executor
    from .takeover import Takeover

EXTENSION_KEY = "restful_async"
RESULT_SUFFIX = "/result"

_ID_PLACEHOLDER = "0" * 22
_NO_PREFERENCES: dict[str, Preference] = {}
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# The Host header is the client's to choose: bound what it can make us remember.
_MAX_LOCATION_PREFIXES = 64

OwnerCallable = t.Callable[[], "str | None"]
#: Writes context into a submitted task's carrier (see :attr:`AsyncState.propagators`).
Propagator = t.Callable[[dict[str, str]], None]
AdminCallable = t.Callable[[], bool]


class AsyncState:
    """What ``register_async`` set up for one app: the Api, store, executor, owner,
    and the decorators of the status, result and list resources.

    It keeps its app so that the submit path can hand the real app object (not the
    ``current_app`` proxy) to a worker thread.
    """

    def __init__(
        self,
        *,
        app: Flask,
        api: Api,
        store: TaskStore,
        executor: Executor,
        owner: OwnerCallable | None,
        decorators: tuple[t.Callable[..., t.Any], ...],
        public_list: bool,
        status_resource: type[Resource],
        retry_after: int,
        max_retry_after: int,
        result_redirect: bool,
        max_wait: int,
        max_body: int,
        max_result: int,
        short_wait: float = 0.0,
        short_in_request: bool = False,
        admin: AdminCallable | None = None,
        cross_site_delete: bool = False,
    ) -> None:
        self.app = app
        self.api = api
        self.store = store
        self.executor = executor
        self.owner = owner
        self.decorators = decorators
        self.public_list = public_list
        self.status_resource = status_resource
        self.retry_after = retry_after
        self.max_retry_after = max_retry_after
        self.result_redirect = result_redirect
        self.max_wait = max_wait
        self.max_body = max_body
        self.max_result = max_result
        self.short_wait = short_wait
        self.short_in_request = short_in_request
        self.admin = admin
        self.cross_site_delete = cross_site_delete
        # Fed by a local executor's workers: which submits may wait (estimates.py).
        self.run_times = RunTimes()
        if executor.local:
            executor.on_ran = self.run_times.record
            executor.on_hand_back = self.hand_back
        # Only a process that holds tasks (threads) in a store that other
        # processes read needs a lease.
        self.lease = LeaseKeeper(app, store) if store.shared and executor.local else None
        # Tasks run in their request thread, written once as they end (deferred.py).
        self.recorder = Recorder(
            store,
            short_wait,
            app.logger,
            before_record=None if self.lease is None else self.lease.ensure,
        )
        # With a lease, tasks are stored with their request, for another process
        # to take over (set up by register_async).
        self.takeover: Takeover | None = None
        #: Called at each submit with the task's carrier (an empty dict of text
        #: fields), in the request thread, before the task is stored or handed to
        #: an executor: what they write travels with the request snapshot (to a
        #: thread, a Celery message, a process that takes the task over) and the
        #: worker reads it as ``current_task.carrier``. Traces put the request's
        #: trace context there (see :mod:`~flask_restful_async.traces`). One that
        #: raises is logged; the submit goes on.
        self.propagators: list[Propagator] = []
        self._location_prefixes: dict[tuple[t.Any, ...], str] = {}
        #: Logged (once) by the first identity() asked for without an owner callable.
        self.unowned_warning: str | None = None
        #: Set by :meth:`close`: what reads this app's store from outside (the
        #: metrics collector) leaves it alone from then on.
        self.closed = False

    def close(self, timeout: float = 5.0) -> None:
        """Stop what this app started in this process: its task threads (handing
        waiting tasks back to a shared store, giving running ones ``timeout``
        seconds), its lease, its long-poll listener; then close the store. For
        tests and embedding; a server process does the same at exit by itself."""
        self.closed = True
        self.executor.shutdown(timeout=timeout)
        if self.lease is not None:
            self.lease.release()
        waiting.close(self.store)
        self.store.close()

    def identity(self) -> str | None:
        """The caller's identity by the ``owner`` callable (None without one)."""
        if self.owner is None:
            if self.unowned_warning is not None:
                message, self.unowned_warning = self.unowned_warning, None
                self.app.logger.warning(message)
            return None
        identity = self.owner()
        if identity is not None and not isinstance(identity, str):
            raise TypeError(
                f"the owner callable must return a str or None, not {type(identity).__name__}"
            )
        return identity

    def is_admin(self) -> bool:
        """Whether the caller is an operator, who sees every owner's tasks on the
        dashboard and may cancel or forget any of them: the ``admin`` callable
        returned True (exactly; anything else counts as no)."""
        return self.admin is not None and self.admin() is True

    def location(self, task_id: str) -> str:
        """The status URL of a task, as ``api.url_for`` builds it for this request.

        ``url_for`` is the slowest step of a submit, and the URL differs between
        tasks only by the id: build it once per host and script root, then append.
        """
        # Keyed by what the URL adapter was bound from (raw environ values: cheaper
        # to read than request.host, which parses and checks the host each time).
        environ = request.environ
        key = (
            environ.get("HTTP_HOST"),
            environ.get("SERVER_NAME"),
            environ.get("SERVER_PORT"),
            environ.get("SCRIPT_NAME"),
            environ.get("wsgi.url_scheme"),
        )
        prefix = self._location_prefixes.get(key)
        if prefix is None:
            url = self.api.url_for(self.status_resource, task_id=_ID_PLACEHOLDER)
            if not url.endswith(_ID_PLACEHOLDER):
                return self.api.url_for(self.status_resource, task_id=task_id)
            prefix = url[: -len(_ID_PLACEHOLDER)]
            if len(self._location_prefixes) < _MAX_LOCATION_PREFIXES:
                self._location_prefixes[key] = prefix
        return prefix + task_id

    def submit(
        self,
        resource: Resource,
        method: str,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        body: bytes,
    ) -> Response:
        """Accept the current request as a task: record it, hand it over, answer 202.

        Runs in the request thread after the resource's ``method_decorators``.
        """
        task = Task(
            id=new_task_id(),
            owner=self.identity(),
            worker=worker_id() if self.executor.local else None,
        )
        environ = request.environ
        key = environ.get("HTTP_IDEMPOTENCY_KEY")
        if key is not None:
            if not _valid_idempotency_key(key):
                return error_response(
                    400,
                    "Idempotency-Key must be 1 to 255 printable ASCII characters.",
                )
            # Keys are scoped by owner (in the store), method and path (here). A key
            # may hold spaces, so the path holds none: one way to read the scope.
            path = request.path
            if " " in path or "%" in path:
                path = path.replace("%", "%25").replace(" ", "%20")
            task.idempotency_key = f"{request.method} {path} {key}"
            task.fingerprint = _fingerprint(body, environ.get("QUERY_STRING", ""))
        rule = request.url_rule
        endpoint = (rule.endpoint if rule is not None else None) or ""
        prefs = request_prefer(environ) if "HTTP_PREFER" in environ else _NO_PREFERENCES
        # Only a submit with Prefer may run its task in this thread (see plan_wait),
        # and not a form: its fields and files are parsed from the live request,
        # where the method decorators may have read their streams already; nor a
        # body a method decorator read in part, of which the live request keeps
        # only the rest. Such a task runs from its copy, in a task thread.
        here = (
            bool(prefs)
            and not environ.get("CONTENT_TYPE", "").lower().startswith(_FORM_TYPES)
            and request.get_data(cache=True) is body
        )
        hold, now = self.plan_wait(endpoint, method, prefs, here=here)
        try:
            snapshot, stored = self.prepare(
                task, resource, body, endpoint, method, args, kwargs, now
            )
        except BaseException:
            if now:
                self.executor.release_now()
            raise
        size = 0 if now else snapshot.held_bytes
        if now and task.idempotency_key is None and stored is None:
            # Nobody can learn its id before it ends (no key to repeat the submit
            # by, no copy for another process to run it again): it is recorded
            # once, as it ends, in one write rather than two. See run_now.
            run = self.recorder.begin(task)
            ended = self.run_now(task, snapshot, resource, unrecorded=run)
            # Not in the store (it did not take the task): the answer itself, never
            # a redirect to a URL that would not find it.
            return self.accepted(ended, prefs, redirect=run.stored)
        # With Prefer (perhaps wait=N), or a short wait ahead, the task as created
        # counts as a first read.
        ticket = waiting.ticket(self.store) if not now and (hold or prefs) else None
        repeated: Task | None = None
        try:
            if not now:
                self.executor.acquire(size)
            try:
                if self.lease is not None:
                    try:
                        self.lease.ensure()
                    except StoreUnavailable as e:
                        e.doubtful = False  # a renewal's lost reply: no task was written
                        raise
                recorded = self.store.create(task, stored)
            except BaseException:
                self.release(size, now)
                raise
        except Saturated as e:
            # No room for a new task; a repeat of an accepted one needs none.
            repeated = self.find_repeat(task)
            if repeated is None:
                return self.rejected(e, "saturated")
            recorded = repeated
        except Unavailable as e:
            if isinstance(e, StoreUnavailable) and e.doubtful:
                # Its reply was lost: the task may be there all the same. This
                # answer is a 503, so it must not be: taken back once the store
                # answers (with a key, kept for a repeat that may have seen it).
                running = task.worker if now else None  # recorded running, never run
                outbox.withdraw(
                    self.store, task.id, self.app.logger, now=False, running_under=running
                )
            return self.rejected(e, "store")
        if recorded.id != task.id:
            # A repeat of an earlier submit: answer as it was answered, create nothing.
            if repeated is None:
                self.release(size, now)
            if recorded.fingerprint != task.fingerprint:
                return error_response(
                    422,
                    "This Idempotency-Key was already used with a different request body"
                    " or query string.",
                )
            return self.accepted(recorded, prefs, ticket, hold)
        if now:
            return self.accepted(self.run_now(recorded, snapshot, resource), prefs)
        if self.executor.inline:
            recorded = self.run_inline(recorded, snapshot, resource)
        else:
            waiting.changed(self.store, task.id)  # list streams in this process
            try:
                self.executor.submit(self.app, task, snapshot, resource)
            except Unavailable as e:
                # The executor could not take the task over (a broker that is down,
                # no worker thread to be had): it is taken back from the store.
                outbox.withdraw(self.store, task.id, self.app.logger)
                self.executor.release(size)
                if isinstance(e, Saturated):
                    return self.rejected(e, "saturated")
                return self.rejected(e, "store" if isinstance(e, StoreUnavailable) else "broker")
            if signals.task_submitted.receivers:
                signals.send(signals.task_submitted, self.app, task=recorded)
        return self.accepted(recorded, prefs, ticket, hold)

    def find_repeat(self, task: Task) -> Task | None:
        """The task an earlier submit with ``task``'s idempotency key made, for a
        submit that found no room for a task of its own; None without a key, when
        there is none, or when the store does not answer."""
        if task.idempotency_key is None:
            return None
        try:
            return self.store.get_by_key(task.owner, task.idempotency_key)
        except Unavailable:
            return None

    def prepare(
        self,
        task: Task,
        resource: Resource,
        body: bytes,
        endpoint: str,
        method: str,
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        now: bool,
    ) -> tuple[RequestSnapshot, bytes | None]:
        """Fill in ``task`` before it is stored, and copy what its run needs: the
        request snapshot, and its bytes for the store when another process may
        have to run the task."""
        rerun = self.takeover is not None and bool(getattr(resource, "rerun_on_crash", False))
        if now:
            # Run in this thread, which would wait for the task anyway: recorded as
            # running from the start, it needs no start of its own, and no copy of
            # the request unless another process may have to run it again.
            task.state, task.started_at = TaskState.RUNNING, task.created_at
        if now and not rerun:
            snapshot = RequestSnapshot.in_place(body, endpoint, method, args, kwargs)
        else:
            snapshot = RequestSnapshot.capture(body, method, args, kwargs)
        if self.propagators:
            self.propagate(task, snapshot.carrier)
        task.endpoint, task.method, task.path = endpoint, method.upper(), request.path
        stored: bytes | None = None
        if self.takeover is not None and (not now or rerun):
            try:
                stored = snapshot.to_bytes()
            except TypeError:
                pass  # view arguments that are not JSON data: no other process can run it
            else:
                task.rerun = bool(getattr(resource, "rerun_on_crash", False))
        return snapshot, stored

    def release(self, size: int, now: bool) -> None:
        """Give back the executor room a submit took: for a task of ``size`` bytes
        to run in a worker, or (``now``) to run in the request thread."""
        if now:
            self.executor.release_now()
        else:
            self.executor.release(size)

    def plan_wait(
        self, endpoint: str, method: str, prefs: t.Mapping[str, Preference], *, here: bool = True
    ) -> tuple[float, bool]:
        """How a submit of ``endpoint`` and ``method`` with preferences ``prefs``
        waits for its task: the seconds of a short wait before its 202
        (``RESTFUL_ASYNC_SHORT_WAIT`` when the tasks there usually end within it, see
        :mod:`~flask_restful_async.estimates`; else 0), and whether its task runs in
        the request thread (see :meth:`submit`)."""
        if self.short_wait <= 0:
            return 0.0, False
        estimate = self.expected_run_time(endpoint, method)
        hold = self.short_wait if estimate is not None and estimate <= self.short_wait else 0.0
        if not (hold and here and self.short_in_request) or self.executor.inline:
            return hold, False
        # Only a client that asked to wait (Prefer: wait=N) for a task expected to
        # end within those N seconds: the request thread holds on for the answer
        # anyway, as it would for a synchronous call.
        seconds = wait_seconds(prefs) if prefs else None
        if not seconds or estimate is None or estimate > min(seconds, self.max_wait):
            return hold, False
        return hold, self.executor.acquire_now()

    def run_now(
        self,
        task: Task,
        snapshot: RequestSnapshot,
        resource: Resource,
        *,
        unrecorded: Run | None = None,
    ) -> Task:
        """Run ``task``, recorded as running, in this (request) thread, and return it
        as it ended (as it started if the store did not take its outcome: the
        client polls for it then). It holds the room :meth:`Executor.acquire_now`
        took meanwhile.

        With ``unrecorded`` (:meth:`Recorder.begin
        <flask_restful_async.deferred.Recorder.begin>`), the task is not in the
        store yet, and goes there as it ends, or as running if it runs long (see
        :mod:`~flask_restful_async.deferred`); it is returned as it ended, whether
        the store took it or not."""
        token = self.run_times.begin(snapshot.endpoint, snapshot.method)
        if unrecorded is not None:
            # Its run ends with its handler, not after the final write: a store that
            # stalls must not make the endpoint look slow, which would turn the next
            # such submits (which need no store until their end) to it, and to 503.
            unrecorded.on_end = functools.partial(self.run_times.end, token)
        handed = False
        try:
            if unrecorded is None:
                waiting.changed(self.store, task.id)  # list streams in this process
            if signals.task_submitted.receivers:
                signals.send(signals.task_submitted, self.app, task=task)
            handed = True
            ending = self.executor.run_now(
                self.app, task, snapshot, resource, unrecorded=unrecorded
            )
        finally:
            if not handed:
                self.executor.release_now()  # a receiver raised past Exception
            if unrecorded is None:
                self.run_times.end(token)
            else:
                # If the runner did not get to it: never recorded from now on (and
                # the run's time taken now).
                unrecorded.end()
                self.recorder.done(unrecorded)
        ended = None if ending is None else ending.apply(task)
        return task if ended is None else ended

    def run_inline(self, task: Task, snapshot: RequestSnapshot, resource: Resource) -> Task:
        """Test mode (``RESTFUL_ASYNC_EAGER``): run the recorded ``task`` here and
        now, and return it as the store has it once it ended (as recorded if the
        store does not answer: the ``202`` goes out all the same)."""
        if signals.task_submitted.receivers:
            # Told before it starts, in the order a worker elsewhere would see.
            signals.send(signals.task_submitted, self.app, task=task)
        self.executor.submit(self.app, task, snapshot, resource)
        try:
            ended = self.store.get(task.id)
        except Unavailable:
            return task
        return task if ended is None else ended

    def hand_back(self, jobs: t.Sequence[tuple[str, str | None, RequestSnapshot]]) -> None:
        """The executor's ``on_hand_back``: its waiting tasks, as it shuts down, go
        back to the store for another process (see :func:`takeover.hand_back`)."""
        from .takeover import hand_back

        hand_back(self.app, self.store, self.takeover, jobs)

    def propagate(self, task: Task, carrier: dict[str, str]) -> None:
        """Let each of :attr:`propagators` write into ``carrier``."""
        for propagator in self.propagators:
            try:
                propagator(carrier)
            except Exception:
                # Context for observers, never a reason to refuse the task.
                self.app.logger.exception(
                    "A propagator failed for task %s", task.id, extra={"task_id": task.id}
                )

    def rejected(self, error: Unavailable, reason: str) -> Response:
        """The 503 of a submit that left no task; ``task_rejected`` tells why."""
        if signals.task_rejected.receivers:
            signals.send(signals.task_rejected, self.app, reason=reason)
        return error_response(503, error.message, {"Retry-After": str(error.retry_after)})

    def expected_run_time(self, endpoint: str, method: str) -> float | None:
        """The run-time estimate of ``endpoint`` and ``method``; None when there is
        none yet, or when estimating failed (logged)."""
        try:
            return self.run_times.estimate(endpoint, method)
        except Exception:
            # A guess that fails costs the wait, never the submit.
            self.app.logger.exception("Estimating the run time of %s %s failed", method, endpoint)
            return None

    def accepted(
        self,
        task: Task,
        prefs: t.Mapping[str, Preference],
        ticket: int | None = None,
        hold: float = 0.0,
        *,
        redirect: bool = True,
    ) -> Response:
        """The answer to a submit: 202, or with ``Prefer: wait=N`` the task's final
        response if it finishes within N seconds (RFC 7240).

        Without ``Prefer: wait`` or ``respond-async``, a submit waits up to ``hold``
        seconds for its task before the 202: a task that ended meanwhile is shown
        finished, with ``Retry-After: 0``, and the first poll gets its response.
        """
        seconds = wait_seconds(prefs) if prefs else None
        response: Response | None = None
        if task.state.finished:
            pass  # run in this thread (or a repeat of a submit whose task ended)
        elif hold and seconds is None and not respond_async(prefs):
            task = self.wait_briefly(task, hold, ticket)
        elif seconds:
            limit = min(seconds, self.max_wait)
            # The first part of the wait as a short one: the end of a task that runs
            # in this process is told here directly, and quick tasks are spared the
            # news of every other (which SQLite's listener cannot tell apart).
            first = min(limit, self.short_wait) if self.executor.local else 0.0
            if first:
                task = self.wait_briefly(task, first, ticket)
                ticket = None  # read again at the end of that wait
            try:
                finished = self.wait(task, limit - first, ticket)
            except Unavailable:
                finished = None  # the task is accepted: answer 202 all the same
            if finished is not None:
                task = finished
        if seconds and task.state.finished:
            response = self.task_response(task, redirect=redirect)
            response.headers["Preference-Applied"] = f"wait={min(seconds, self.max_wait)}"
        if response is None:
            response = self.status(task, 202)
            if respond_async(prefs):
                response.headers["Preference-Applied"] = "respond-async"
        return response

    def task_response(self, task: Task, *, redirect: bool = True) -> Response:
        """What the status URL answers for ``task`` (CONTRACT section 4). Every
        answer carries ``Vary: Prefer``: ``Prefer: wait`` can change it. Not
        ``redirect``: the response itself even where ``RESTFUL_ASYNC_RESULT_REDIRECT``
        would send the client to the result's URL."""
        if task.expired:
            return expired_response(vary_on_prefer=True)
        if not task.state.finished:
            return self.status(task, 202)
        if task.response is None:
            code = 409 if task.state is TaskState.CANCELLED else 500
            return status_response(task, code, None, None, vary_on_prefer=True)
        if self.result_redirect and redirect:
            return status_response(
                task, 303, self.location(task.id) + RESULT_SUFFIX, None, vary_on_prefer=True
            )
        return stored_to_response(task.response)

    @staticmethod
    def result_response(task: Task) -> Response:
        """The response a finished task's handler gave, as stored."""
        assert task.response is not None
        return stored_to_response(task.response)

    def wait(self, task: Task, seconds: float, ticket: int | None = None) -> Task | None:
        """``task`` once finished, or as it reads after ``seconds`` (capped by
        ``RESTFUL_ASYNC_MAX_WAIT``); None if it went away meanwhile.

        With ``ticket`` (:func:`waiting.ticket`, taken before ``task`` was read or
        written), ``task`` counts as the first read. The request thread sleeps on
        a condition meanwhile: it holds no store connection and no task worker.
        """
        if task.state.finished or task.expired or seconds <= 0:
            return task
        return waiting.wait_finished(
            self.store,
            task.id,
            min(seconds, self.max_wait),
            read=None if ticket is None else (ticket, task),
        )

    def wait_briefly(self, task: Task, seconds: float, ticket: int | None) -> Task:
        """``task`` once finished, or as it was if it runs past ``seconds`` (or the
        store does not answer: the task is accepted all the same)."""
        read = None if ticket is None else (ticket, task)
        try:
            # The task runs in this process, which tells its end directly: nothing
            # to hear from other processes in so short a wait.
            waited = waiting.wait_finished(self.store, task.id, seconds, read=read, listen=False)
        except Unavailable:
            return task
        return task if waited is None else waited

    def status(self, task: Task, code: int) -> Response:
        """The status document as ``code``, with ``Location`` and ``Retry-After``."""
        return status_response(
            task,
            code,
            self.location(task.id),
            self.retry_after_for(task),
            vary_on_prefer=True,
        )

    def retry_after_for(self, task: Task) -> int:
        """Seconds a client should wait before its next poll.

        From the progress the handler reported, if any: the time the rest of the
        work should take at the rate seen up to that report, less the time since
        it, at least 1 s and at most ``RESTFUL_ASYNC_MAX_RETRY_AFTER``. Otherwise
        ``RESTFUL_ASYNC_RETRY_AFTER``. 0 for a task that has finished (a submit
        that waited for it).
        """
        if task.state.finished:
            return 0
        progress = task.progress
        if (
            progress is None
            or task.started_at is None
            or not progress.total
            or progress.current <= 0
            or progress.current >= progress.total
        ):
            return self.retry_after
        now = time.time()
        # Up to the report: a poll a while after it would otherwise count that
        # while as time spent on the work reported, and send its client back
        # well after the end (at 1 step of 10 after 1 s, a poll at 1.9 s said 18 s).
        reported = now if progress.at is None else min(progress.at, now)
        elapsed = reported - task.started_at
        try:
            remaining = elapsed * (progress.total - progress.current) / progress.current
            remaining -= now - reported
        except OverflowError:
            return self.max_retry_after
        if not math.isfinite(remaining):
            return self.max_retry_after
        return max(1, min(self.max_retry_after, math.ceil(remaining)))


def _valid_idempotency_key(key: str) -> bool:
    return 0 < len(key) <= 255 and all("!" <= char <= "~" or char == " " for char in key)


def _fingerprint(body: bytes, query: str = "") -> str:
    """What tells a repeat from a different request under the same key: its body
    and its query string. Without a query string, the body's digest alone, as
    earlier versions wrote it (a repeat across an upgrade still matches); with
    one, a digest of both, marked apart so that no body alone can give it."""
    if not query:
        return hashlib.sha256(body).hexdigest()
    encoded = query.encode("latin-1", "replace")
    digest = hashlib.sha256(b"%d:" % len(encoded) + encoded + body).hexdigest()
    return f"q:{digest}"


def get_state(app: Flask) -> AsyncState:
    try:
        return t.cast(AsyncState, app.extensions[EXTENSION_KEY])
    except KeyError:
        raise RuntimeError(
            "flask_restful_async is not set up for this app: call register_async(api)"
            " for the Api that holds your AsyncResources (in an app factory:"
            " register_async(api, app=app) in create_app())."
        ) from None
