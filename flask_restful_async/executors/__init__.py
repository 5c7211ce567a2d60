"""Executors: what runs accepted tasks (threads here; Celery in ``flask_restful_async.celery``)."""

from __future__ import annotations

from .base import Executor as Executor
from .eager import EagerExecutor as EagerExecutor
from .threads import ThreadExecutor as ThreadExecutor
