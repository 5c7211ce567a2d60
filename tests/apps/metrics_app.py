"""An app that serves Prometheus metrics at ``/metrics`` beside its tasks, as the
README shows: prometheus-client's own WSGI app, mounted with werkzeug's
``DispatcherMiddleware``.

``POST /echo`` (an :class:`AsyncResource`) returns ``{"pid": <pid>}``: the process
that ran it. The instance folder (where the default SQLite store lives) comes
from ``METRICS_APP_INSTANCE``. With ``PROMETHEUS_MULTIPROC_DIR`` set (several
gunicorn workers), ``/metrics`` merges every worker's counters and histograms from
that folder and adds the store's gauges, read once by the worker that answers;
without it (one process), ``/metrics`` serves the default registry.
"""

from __future__ import annotations

import os
import typing as t

from flask import Flask
from flask_restful import Api
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app, multiprocess
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from flask_restful_async import AsyncResource, register_async
from flask_restful_async.metrics import store_collector


class Echo(AsyncResource):
    def post(self) -> dict[str, t.Any]:
        return {"pid": os.getpid()}


def create_app(instance: str) -> Flask:
    app = Flask(__name__, instance_path=instance)
    api = Api(app)
    register_async(api)
    api.add_resource(Echo, "/echo")
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(store_collector)
    else:
        registry = REGISTRY
    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/metrics": make_wsgi_app(registry)}
    )
    return app


_app: Flask | None = None


def __getattr__(name: str) -> t.Any:
    # PEP 562: ``app`` is made on first access (``gunicorn tests.apps.metrics_app:app``),
    # so that a test may import create_app without building an app.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = create_app(os.environ["METRICS_APP_INSTANCE"])
    return _app
