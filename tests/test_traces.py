"""OpenTelemetry traces (``flask_restful_async.traces``): the handler of a task runs
in a span that is a child of the submitting request's span, in a worker thread, in
an app that took the task over, and in a Celery worker process; the off switch; the
error that names the extra.

This process's spans go to the SDK's ``InMemorySpanExporter``; the Celery worker
(``tests/apps/celery_app.py``) exports its own to a file, one JSON line each.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, current_app, request
from flask.testing import FlaskClient
from flask_restful import abort
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flask_restful_async import AsyncResource, current_task, signals
from flask_restful_async.snapshot import RequestSnapshot
from flask_restful_async.state import get_state

from .conftest import AppFactory, wait_done, wait_for

tracer = trace.get_tracer("tests.test_traces")

#: The carrier each handler of this module saw (``current_task.carrier``), by task id.
CARRIERS: dict[str, dict[str, str]] = {}
#: The name of the app each handler of this module ran in, by task id.
RAN_IN: dict[str, str] = {}


class Report(AsyncResource):
    def post(self) -> t.Any:
        CARRIERS[current_task.id] = dict(current_task.carrier)
        RAN_IN[current_task.id] = current_app.name
        with tracer.start_as_current_span("inside the handler"):
            pass
        return {"ok": True}, 201


class Broken(AsyncResource):
    def post(self) -> t.Any:
        raise RuntimeError("the handler broke")


class Refused(AsyncResource):
    def put(self) -> t.Any:
        abort(409, message="no")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The SDK as this process's tracer provider (set once per process), its spans
    kept in memory while this module runs."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()  # keeps nothing of the tests that run after this module


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    exporter.clear()
    return exporter


def span_named(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The span named ``name``, once ended: a task's span ends after its outcome is
    stored, so just after a client sees the task finished."""
    found: list[ReadableSpan] = []

    def ended() -> bool:
        found[:] = [span for span in spans.get_finished_spans() if span.name == name]
        return bool(found)

    wait_for(ended)
    assert len(found) == 1, found
    return found[0]


def trace_requests(app: Flask) -> None:
    """A request span for every request of ``app``, child of the ``traceparent``
    the client sent: what an instrumentation of the web framework does."""

    @app.before_request
    def start() -> None:
        parent = propagate.extract({name.lower(): value for name, value in request.headers})
        span = tracer.start_span(f"{request.method} {request.path}", context=parent)
        request.environ["test.span"] = span
        request.environ["test.token"] = otel_context.attach(trace.set_span_in_context(span))

    @app.teardown_request
    def end(error: BaseException | None) -> None:
        if "test.span" not in request.environ:
            return  # a task's request, replayed in its worker: no before_request ran
        request.environ["test.span"].end()
        otel_context.detach(request.environ["test.token"])


def submit(
    client: FlaskClient, path: str, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """Submit and answer (task id, status URL) without waiting for the task."""
    response = client.open(
        path, method=method, headers={"Prefer": "respond-async", **(headers or {})}
    )
    assert response.status_code == 202, response.get_data()
    return response.json["id"], response.headers["Location"]


# -- a worker thread -----------------------------------------------------------------


@pytest.mark.parametrize("eager", [False, True], ids=["thread", "eager"])
def test_the_handler_runs_in_a_child_span_of_the_submitting_request(
    make_app: AppFactory, spans: InMemorySpanExporter, eager: bool
) -> None:
    # Eager (test mode) runs the task inside the submitting request itself: its
    # parent comes from the carrier all the same, not from what is current there.
    app, api = make_app(config={"RESTFUL_ASYNC_EAGER": eager})
    api.add_resource(Report, "/reports")
    trace_requests(app)
    client = app.test_client()
    with tracer.start_as_current_span("client") as outer:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        task_id, location = submit(client, "/reports", headers=carrier)
    assert wait_done(client, location).status_code == 201

    task_span = span_named(spans, "POST report (task)")
    request_span = span_named(spans, "POST /reports")
    assert request_span.parent is not None
    assert request_span.parent.span_id == outer.get_span_context().span_id
    assert task_span.parent is not None
    assert task_span.parent.span_id == request_span.context.span_id
    assert task_span.context.trace_id == outer.get_span_context().trace_id
    assert task_span.kind is trace.SpanKind.CONSUMER
    assert dict(task_span.attributes or {}) == {
        "restful_async.task_id": task_id,
        "restful_async.state": "succeeded",
        "http.response.status_code": 201,
    }
    assert task_span.status.status_code is trace.StatusCode.UNSET
    # The task's span is current while the handler runs: its own spans are children.
    inner = span_named(spans, "inside the handler")
    assert inner.parent is not None
    assert inner.parent.span_id == task_span.context.span_id
    # What travelled: the W3C trace context of the request's span.
    assert CARRIERS[task_id]["traceparent"].split("-")[2] == format(
        request_span.context.span_id, "016x"
    )


def test_a_task_submitted_outside_any_span_gets_a_root_span(
    make_app: AppFactory, spans: InMemorySpanExporter
) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Report, "/reports")
    client = app.test_client()
    task_id, location = submit(client, "/reports")
    assert wait_done(client, location).status_code == 201
    assert span_named(spans, "POST report (task)").parent is None
    assert CARRIERS[task_id] == {}


@pytest.mark.parametrize(
    ("resource", "method", "code"), [(Broken, "POST", 500), (Refused, "PUT", 409)]
)
def test_a_failed_task_has_an_error_span(
    make_app: AppFactory,
    spans: InMemorySpanExporter,
    resource: type[AsyncResource],
    method: str,
    code: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(resource, "/work")
    client = app.test_client()
    with caplog.at_level(logging.CRITICAL), tracer.start_as_current_span("request") as parent:
        task_id, location = submit(client, "/work", method)
    assert wait_done(client, location).status_code == code
    span = span_named(spans, f"{method} {resource.__name__.lower()} (task)")
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["restful_async.task_id"] == task_id
    assert span.attributes["restful_async.state"] == "failed"
    assert span.attributes["http.response.status_code"] == code
    assert span.status.status_code is trace.StatusCode.ERROR


class Held(AsyncResource):
    def post(self) -> t.Any:
        HELD.set()
        RELEASE.wait(10)
        return {"held": True}


HELD, RELEASE = threading.Event(), threading.Event()


def test_a_task_taken_over_by_another_app_keeps_its_parent(
    make_app: AppFactory, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    # App "a" accepts a task that waits behind a held one, and stops: it hands the
    # waiting task back to the store, with its request. App "b", on the same file,
    # takes it over and runs it from what the store kept, carrier included.
    config = {"RESTFUL_ASYNC_STORE": f"sqlite:///{tmp_path / 'tasks.db'}"}
    a, api_a = make_app(config={**config, "RESTFUL_ASYNC_MAX_WORKERS": 1})
    api_a.add_resource(Report, "/reports")
    api_a.add_resource(Held, "/held")
    client_a = a.test_client()
    HELD.clear()
    RELEASE.clear()
    submit(client_a, "/held")
    assert HELD.wait(10)
    with tracer.start_as_current_span("request") as parent:
        task_id, location = submit(client_a, "/reports")
    threading.Timer(0.2, RELEASE.set).start()
    get_state(a).close(timeout=5)

    b, api_b = make_app(config=config)
    api_b.add_resource(Report, "/reports")
    api_b.add_resource(Held, "/held")
    assert wait_done(b.test_client(), location).status_code == 201
    span = span_named(spans, "POST report (task)")
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.attributes is not None
    assert span.attributes["restful_async.task_id"] == task_id
    assert "traceparent" in CARRIERS[task_id]
    assert RAN_IN[task_id] == b.name != a.name


# -- on, off, absent -----------------------------------------------------------------


def test_traces_off_leave_the_submit_and_the_run_alone(
    make_app: AppFactory, spans: InMemorySpanExporter
) -> None:
    # (Metrics off too: their receivers listen to the same signals.)
    app, api = make_app(
        store="memory://",
        config={"RESTFUL_ASYNC_TRACES": False, "RESTFUL_ASYNC_METRICS": False},
    )
    api.add_resource(Report, "/reports")
    assert get_state(app).propagators == []
    assert not list(signals.task_started.receivers_for(app))
    assert not list(signals.task_finished.receivers_for(app))
    client = app.test_client()
    with tracer.start_as_current_span("request"):
        task_id, location = submit(client, "/reports")
    assert wait_done(client, location).status_code == 201
    # The handler's own span is no child of anything: no task span, no context.
    assert span_named(spans, "inside the handler").parent is None
    assert not [span for span in spans.get_finished_spans() if span.name.endswith("(task)")]
    assert CARRIERS[task_id] == {}


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Imports of opentelemetry fail, as when the package is not installed."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "flask_restful_async.traces", raising=False)


@pytest.mark.usefixtures("without_opentelemetry")
def test_without_opentelemetry_traces_asked_for_name_the_extra(make_app: AppFactory) -> None:
    with pytest.raises(ImportError, match=r"pip install 'flask-restful-async\[otel\]'"):
        make_app(store="memory://", config={"RESTFUL_ASYNC_TRACES": True})


@pytest.mark.usefixtures("without_opentelemetry")
def test_without_opentelemetry_traces_on_by_default_do_nothing(make_app: AppFactory) -> None:
    app, api = make_app(store="memory://")
    api.add_resource(Report, "/reports")
    assert get_state(app).propagators == []
    client = app.test_client()
    _, location = submit(client, "/reports")
    assert wait_done(client, location).status_code == 201


@pytest.mark.parametrize("value", ["maybe", 2, 0.5])
def test_traces_setting_must_be_a_bool_or_none(make_app: AppFactory, value: object) -> None:
    with pytest.raises(ValueError, match="RESTFUL_ASYNC_TRACES must be"):
        make_app(store="memory://", config={"RESTFUL_ASYNC_TRACES": value})


@pytest.mark.parametrize("value", ["false", "False", 0, "off"])
def test_traces_off_as_the_environment_spells_it(make_app: AppFactory, value: object) -> None:
    app, _ = make_app(store="memory://", config={"RESTFUL_ASYNC_TRACES": value})
    assert not get_state(app).propagators


def test_a_propagator_that_raises_is_logged_and_the_task_runs(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, api = make_app(store="memory://", config={"RESTFUL_ASYNC_TRACES": False})
    api.add_resource(Report, "/reports")

    def broken(carrier: dict[str, str]) -> None:
        carrier["x-first"] = "1"
        raise RuntimeError("the propagator broke")

    get_state(app).propagators.extend([broken, lambda carrier: carrier.update(second="2")])
    client = app.test_client()
    task_id, location = submit(client, "/reports")
    assert wait_done(client, location).status_code == 201
    assert CARRIERS[task_id] == {"x-first": "1", "second": "2"}
    failures = [r for r in caplog.records if r.getMessage().startswith("A propagator failed")]
    assert [getattr(record, "task_id", None) for record in failures] == [task_id]


# -- the carrier in the snapshot ------------------------------------------------------


def test_the_carrier_travels_in_both_forms_of_the_snapshot() -> None:
    carrier = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "tracestate": "a=b"}
    snapshot = RequestSnapshot(
        environ={}, body=b"xyz", endpoint="e", method="post", carrier=carrier
    )
    assert RequestSnapshot.from_bytes(snapshot.to_bytes()).carrier == carrier
    assert RequestSnapshot.from_json(snapshot.to_json()).carrier == carrier
    # A snapshot written without one (as before carriers existed) reads with none.
    bare = RequestSnapshot(environ={}, body=b"", endpoint="e", method="post")
    assert b"carrier" not in bare.to_bytes()
    assert RequestSnapshot.from_bytes(bare.to_bytes()).carrier == {}


@pytest.mark.parametrize("carrier", [[], {"a": 1}, "traceparent"])
def test_a_snapshot_with_a_malformed_carrier_is_refused(carrier: t.Any) -> None:
    header = {"v": 1, "environ": {}, "endpoint": "e", "method": "post", "args": [], "kwargs": {}}
    text = json.dumps({**header, "g": {}, "body": "", "carrier": carrier})
    with pytest.raises(ValueError, match="carrier must map str to str"):
        RequestSnapshot.from_json(text)


# -- a Celery worker process ---------------------------------------------------------


def test_a_celery_worker_runs_the_handler_in_a_child_span(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from .apps.celery_app import TRACES_ENV, create_app
    from .services import require_redis
    from .test_celery import WORKER_READY_TIMEOUT, poll, run_worker

    require_redis()
    exported = tmp_path / "spans.jsonl"
    exported.touch()

    def worker_spans() -> dict[str, dict[str, t.Any]]:
        lines = exported.read_text(encoding="utf-8").splitlines()
        return {
            span["attributes"]["restful_async.task_id"]: span
            for span in map(json.loads, lines)
            if span["name"].endswith("(task)")
        }

    with run_worker(**{TRACES_ENV: str(exported)}) as worker:
        app, _, _ = create_app(worker.prefix, worker.queue)
        client = app.test_client()
        try:
            with tracer.start_as_current_span("request") as parent:
                ok, ok_location = submit(client, "/echo")
                failed, failed_location = submit(client, "/echo?fail=502")
            assert poll(client, worker, ok_location, WORKER_READY_TIMEOUT).status_code == 200
            assert poll(client, worker, failed_location).status_code == 502
            wait_for(lambda: {ok, failed} <= set(worker_spans()))
        finally:
            get_state(app).close()
    found = worker_spans()
    context = parent.get_span_context()
    for task_id, state, status in ((ok, "succeeded", "UNSET"), (failed, "failed", "ERROR")):
        span = found[task_id]
        assert span["name"] == "POST echo (task)"
        assert span["pid"] == worker.process.pid
        assert span["trace_id"] == format(context.trace_id, "032x")
        assert span["parent_id"] == format(context.span_id, "016x")
        assert span["attributes"]["restful_async.state"] == state
        assert span["status"] == status
