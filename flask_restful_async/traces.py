"""OpenTelemetry traces: each task's handler runs in a span that is a child of the
span of the request that submitted it.

Needs opentelemetry-api: ``pip install 'flask-restful-async[otel]'``. The app
chooses and configures the SDK and its exporters, as for any instrumented
library; without a configured SDK every span is a no-op. ``register_async`` turns
traces on for its app whenever opentelemetry-api is importable, and does nothing
when it is not. ``RESTFUL_ASYNC_TRACES = False`` turns them off;
``RESTFUL_ASYNC_TRACES = True`` asks for them, and then a missing package is an
``ImportError`` that names the extra.

What a trace shows: the request that submitted the task (its span made by the
app's own instrumentation, such as opentelemetry-instrumentation-flask), and under
it a span named ``<METHOD> <endpoint> (task)`` (``POST reports (task)``) of kind
``CONSUMER``, from just before the handler ran to the moment its outcome was
stored, in the process and thread that ran it. Its attributes:
``restful_async.task_id``; ``restful_async.state``, the state the task ended in;
``http.response.status_code``, the status of the stored response, if any. A task
that ended ``failed`` or ``lost`` has status ``ERROR``. Spans that the handler
makes (database calls, outgoing requests) are children of the task's span.

How it travels:

- At submit, in the request thread, the current context (the request's span) is
  written into the task's carrier with the global propagator (W3C
  ``traceparent`` and ``tracestate``, and ``baggage``, unless ``OTEL_PROPAGATORS``
  says otherwise). The carrier is part of the request snapshot, so it reaches a
  worker thread, a Celery worker (in the message) and a process that takes the
  task over (in the store) alike. This goes through
  :attr:`AsyncState.propagators <flask_restful_async.state.AsyncState.propagators>`,
  not a signal: the carrier must be written before the task is stored or sent,
  and ``task_submitted`` comes after.
- In the worker, ``task_started`` and ``task_finished`` are sent in the thread
  that runs the task, in the task's own :mod:`contextvars` context, just before
  and just after its handler: a receiver of the first starts the span, with the
  parent read back from ``current_task.carrier``, and makes it current; a
  receiver of the second records the final state, ends the span and restores
  the context. Nothing of this is on the submit or run path when traces are off.
"""

from __future__ import annotations

import contextvars
import typing as t

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "flask_restful_async.traces needs opentelemetry-api:"
        " pip install 'flask-restful-async[otel]'"
    ) from e

from . import signals
from .context import current_task
from .task import TaskState
from .version import __version__

if t.TYPE_CHECKING:
    from flask import Flask

    from .state import AsyncState
    from .task import Task

__all__ = ["ATTRIBUTE_STATE", "ATTRIBUTE_TASK_ID", "span_name"]

#: The attribute that holds the task's id.
ATTRIBUTE_TASK_ID = "restful_async.task_id"
#: The attribute that holds the state the task ended in.
ATTRIBUTE_STATE = "restful_async.state"

#: The states that end a task's span with status ``ERROR``.
_ERROR_STATES = frozenset((TaskState.FAILED, TaskState.LOST))

# A proxy until the app sets a tracer provider, then the provider's tracer.
_tracer = trace.get_tracer("flask_restful_async", __version__)

# The span of the task that runs in this context, and the token that restores the
# context it replaced. Each task runs in a fresh contextvars context (runner.py),
# so no value leaks from one task to the next.
_Running = tuple[str, trace.Span, "contextvars.Token[otel_context.Context]"]
_running: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "flask_restful_async.traces.running", default=None
)


def span_name(task: Task) -> str:
    """``<METHOD> <endpoint> (task)``, the name of a task's span."""
    return f"{task.method} {task.endpoint} (task)"


def connect(state: AsyncState) -> None:
    """Trace the tasks of ``state``'s app (called by ``register_async``)."""
    state.propagators.append(_inject)
    signals.task_started.connect(_start, sender=state.app)
    signals.task_finished.connect(_finish, sender=state.app)


def _inject(carrier: dict[str, str]) -> None:
    propagate.inject(carrier)


def _start(app: Flask, *, task: Task, **extra: t.Any) -> None:
    carrier = current_task.carrier
    parent = propagate.extract(carrier) if carrier else None
    span = _tracer.start_span(
        span_name(task),
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={ATTRIBUTE_TASK_ID: task.id},
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    _running.set((task.id, span, token))


def _finish(app: Flask, *, task: Task, **extra: t.Any) -> None:
    running = _running.get()
    # A queued task cancelled by DELETE, or one that failed before its handler,
    # ends without having started a span here.
    if running is None or running[0] != task.id:
        return
    _, span, token = running
    _running.set(None)
    try:
        span.set_attribute(ATTRIBUTE_STATE, task.state.value)
        if task.response is not None:
            span.set_attribute("http.response.status_code", task.response.status)
        if task.state in _ERROR_STATES:
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"the task {task.state.value}"))
        span.end()
    finally:
        otel_context.detach(token)
