"""A Python client for 202 + ``Location`` APIs: submit, follow, get the final response.

Needs httpx (and tqdm for the command line): ``pip install 'flask-restful-async[client]'``.
It speaks the pattern, not this library: any server that answers ``202 Accepted``
with a ``Location`` to poll will do. ``python -m flask_restful_async.client --help``
runs it from the command line (see :mod:`.cli`).
"""

from __future__ import annotations

try:
    import httpx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "flask_restful_async.client needs httpx: pip install 'flask-restful-async[client]'"
    ) from e

from .aio import AsyncOperation as AsyncOperation
from .aio import AsyncTaskClient as AsyncTaskClient
from .errors import TaskCancelled as TaskCancelled
from .errors import TaskError as TaskError
from .errors import TaskFailed as TaskFailed
from .errors import TaskLost as TaskLost
from .protocol import Progress as Progress
from .protocol import retry_after as retry_after
from .sync import Operation as Operation
from .sync import TaskClient as TaskClient

__all__ = [
    "AsyncOperation",
    "AsyncTaskClient",
    "Operation",
    "Progress",
    "TaskCancelled",
    "TaskClient",
    "TaskError",
    "TaskFailed",
    "TaskLost",
    "retry_after",
]
