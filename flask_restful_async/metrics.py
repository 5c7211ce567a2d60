"""Prometheus metrics (prometheus-client): receivers of the task signals, and the
tasks in the store by state, read when scraped.

``register_async`` connects them for the app when prometheus-client is
importable, unless ``RESTFUL_ASYNC_METRICS = False``
(``pip install 'flask-restful-async[metrics]'``). They live in prometheus-client's
default registry; serve it as you serve any (see the README, "Operating").

``restful_async_tasks_submitted_total{endpoint,method}``
    Submits accepted (``task_submitted``).
``restful_async_tasks_finished_total{endpoint,state}``
    Tasks that ended, by final state, counted in the process that saw the end
    (``task_finished``).
``restful_async_tasks_rejected_total{reason}``
    Submits answered ``503`` (``task_rejected``): ``saturated``, ``store``, ``broker``.
``restful_async_task_queued_seconds{endpoint}``
    Histogram: from submit to start (``task_started``).
``restful_async_task_run_seconds{endpoint}``
    Histogram: from start to end (``task_finished``, for tasks that started).
``restful_async_tasks{state}``
    Gauge: live tasks of every owner by the state they read as, counted by the
    store when scraped (:meth:`~flask_restful_async.stores.TaskStore.stats`), so
    it is the same whichever process or machine answers the scrape.
``restful_async_oldest_queued_seconds``
    Gauge: how long the oldest queued task has waited for a worker (0 when none
    is queued), read with the one above.

Task ids and owners are never labels: a series per task or per user would grow
without bound.

The two gauges come from :data:`store_collector`, a collector registered in the
default registry. prometheus-client's multi-process mode (``PROMETHEUS_MULTIPROC_DIR``,
gunicorn with several workers) merges the counters and histograms of every worker
from files and ignores the default registry's collectors: register
:data:`store_collector` in the registry you serve there, and the gauges are read
once per scrape, by the worker that answers it.
"""

from __future__ import annotations

import logging
import threading
import time
import typing as t
import weakref
from collections.abc import Iterable, Iterator

try:
    from prometheus_client import REGISTRY, Counter, Histogram
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
except ImportError as e:
    raise ImportError(
        "Prometheus metrics need prometheus-client:"
        " pip install 'flask-restful-async[metrics]'"
        " (or set RESTFUL_ASYNC_METRICS = False)"
    ) from e

from . import signals
from .exceptions import RestfulAsyncError
from .state import EXTENSION_KEY, AsyncState
from .stores.base import StoreStats
from .task import Task, TaskState

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["RUN_BUCKETS", "TaskStoreCollector", "connect", "store_collector"]

#: Histogram buckets (seconds) of queue and run times: background tasks take from
#: milliseconds to an hour, not an HTTP request's fraction of a second.
RUN_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)

_submitted = Counter(
    "restful_async_tasks_submitted_total",
    "Background tasks accepted (202), by endpoint and HTTP method.",
    ("endpoint", "method"),
)
_finished = Counter(
    "restful_async_tasks_finished_total",
    "Background tasks that ended, by endpoint and final state.",
    ("endpoint", "state"),
)
_rejected = Counter(
    "restful_async_tasks_rejected_total",
    "Submits answered 503 that left no task, by reason.",
    ("reason",),
)
_queued_seconds = Histogram(
    "restful_async_task_queued_seconds",
    "Seconds from a task's submit to its start, by endpoint.",
    ("endpoint",),
    buckets=RUN_BUCKETS,
)
_run_seconds = Histogram(
    "restful_async_task_run_seconds",
    "Seconds from a task's start to its end, by endpoint.",
    ("endpoint",),
    buckets=RUN_BUCKETS,
)

# Every reason has its series from the start, at 0: a rate() over a series that
# appears with its first increment misses that increment.
for _reason in signals.REJECTED_REASONS:
    _rejected.labels(_reason)

# Label children by label values. labels() validates and locks on every call; a
# dictionary lookup is what the submit path can afford. Endpoints, methods and
# states are few, so these stay small.
_submitted_children: dict[tuple[str, str], t.Any] = {}
_finished_children: dict[tuple[str, str], t.Any] = {}
_queued_children: dict[str, t.Any] = {}
_run_children: dict[str, t.Any] = {}


def _on_submitted(app: Flask, *, task: Task, **_: t.Any) -> None:
    key = (task.endpoint or "", task.method or "")
    child = _submitted_children.get(key)
    if child is None:
        child = _submitted_children[key] = _submitted.labels(*key)
    child.inc()


def _on_started(app: Flask, *, task: Task, **_: t.Any) -> None:
    if task.started_at is None:
        return
    endpoint = task.endpoint or ""
    child = _queued_children.get(endpoint)
    if child is None:
        child = _queued_children[endpoint] = _queued_seconds.labels(endpoint)
    child.observe(max(0.0, task.started_at - task.created_at))


def _on_finished(app: Flask, *, task: Task, **_: t.Any) -> None:
    endpoint = task.endpoint or ""
    key = (endpoint, task.state.value)
    child = _finished_children.get(key)
    if child is None:
        child = _finished_children[key] = _finished.labels(*key)
    child.inc()
    if task.started_at is not None and task.finished_at is not None:
        run = _run_children.get(endpoint)
        if run is None:
            run = _run_children[endpoint] = _run_seconds.labels(endpoint)
        run.observe(max(0.0, task.finished_at - task.started_at))


def _on_rejected(app: Flask, *, reason: str, **_: t.Any) -> None:
    _rejected.labels(reason).inc()


_RECEIVERS = (
    (signals.task_submitted, _on_submitted),
    (signals.task_started, _on_started),
    (signals.task_finished, _on_finished),
    (signals.task_rejected, _on_rejected),
)


class TaskStoreCollector:
    """The tasks by state, and the wait of the oldest queued one, as the stores of
    the connected apps count them when scraped.

    Each store (by URL, and key prefix for Redis) is read once per scrape, however
    many apps use it; the counts of different stores are added up. A store that
    does not answer (or cannot count) leaves its tasks out of that scrape rather
    than failing it; with no store read at all, the gauges have no sample (an
    ``absent()`` alert sees that) rather than zeros that would read as an empty
    queue.
    """

    def __init__(self) -> None:
        self._apps: weakref.WeakSet[Flask] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, app: Flask) -> None:
        with self._lock:
            self._apps.add(app)

    def describe(self) -> Iterable[Metric]:
        # Without it the default registry would call collect() (a store read) to
        # learn the names when the collector is registered.
        return self._families()

    def collect(self) -> Iterator[Metric]:
        tasks, oldest = self._families()
        counts = dict.fromkeys(TaskState, 0)
        oldest_at: float | None = None
        read = False
        for stats in self._read_stores():
            read = True
            for state, count in stats.counts.items():
                counts[state] += count
            if stats.oldest_queued_at is not None:
                oldest_at = (
                    stats.oldest_queued_at
                    if oldest_at is None
                    else min(oldest_at, stats.oldest_queued_at)
                )
        if read:
            for state, count in counts.items():
                tasks.add_metric([state.value], count)
            age = 0.0 if oldest_at is None else max(0.0, time.time() - oldest_at)
            oldest.add_metric([], age)
        yield tasks
        yield oldest

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "restful_async_tasks",
                "Live background tasks of every owner, by the state they read as.",
                labels=("state",),
            ),
            GaugeMetricFamily(
                "restful_async_oldest_queued_seconds",
                "Seconds the oldest queued background task has waited (0 if none).",
            ),
        )

    def _read_stores(self) -> Iterator[StoreStats]:
        with self._lock:
            apps = list(self._apps)
        seen: set[t.Hashable] = set()
        for app in apps:
            state: AsyncState | None = app.extensions.get(EXTENSION_KEY)
            if state is None or state.closed:
                continue
            # Stores that share their tasks are the same tasks by URL (and a Redis
            # store's key prefix); a memory:// store only by itself.
            store = state.store
            key = (store.url, getattr(store, "prefix", None)) if store.shared else id(store)
            if key in seen:
                continue
            seen.add(key)
            try:
                yield state.store.stats()
            except (RestfulAsyncError, NotImplementedError) as e:
                # The store logs its outages itself (at most so often).
                _logger.debug("Cannot count the tasks of %s: %s", state.store.url, e)


#: The collector of ``restful_async_tasks`` and ``restful_async_oldest_queued_seconds``,
#: in the default registry. In multi-process mode, register it in the registry you
#: serve: ``registry.register(store_collector)``.
store_collector = TaskStoreCollector()
REGISTRY.register(store_collector)


def connect(app: Flask) -> None:
    """Count ``app``'s task signals and read its store when scraped.

    ``register_async`` calls this; calling it again for the same app does nothing.
    """
    for signal, receiver in _RECEIVERS:
        # Weakly held by blinker, strongly by this module; connected per app, so
        # that another app's tasks are counted only if that app is connected too.
        signal.connect(receiver, sender=app)
    store_collector.add(app)


_logger = logging.getLogger(__name__)
