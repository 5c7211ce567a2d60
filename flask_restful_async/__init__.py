"""Flask-RESTful resources whose methods run in the background: 202, Location, poll."""

from __future__ import annotations

from .context import current_task as current_task
from .exceptions import RestfulAsyncError as RestfulAsyncError
from .exceptions import Saturated as Saturated
from .exceptions import StoreUnavailable as StoreUnavailable
from .exceptions import TaskCancelled as TaskCancelled
from .exceptions import Unavailable as Unavailable
from .executors import Executor as Executor
from .executors import ThreadExecutor as ThreadExecutor
from .extension import register_async as register_async
from .resource import AsyncResource as AsyncResource
from .signals import task_finished as task_finished
from .signals import task_progress as task_progress
from .signals import task_rejected as task_rejected
from .signals import task_started as task_started
from .signals import task_submitted as task_submitted
from .status import TaskListResource as TaskListResource
from .status import TaskResultResource as TaskResultResource
from .status import TaskStatusResource as TaskStatusResource
from .stores import MemoryStore as MemoryStore
from .stores import TaskStore as TaskStore
from .task import Progress as Progress
from .task import Task as Task
from .task import TaskState as TaskState
from .version import __version__ as __version__

__all__ = [
    "AsyncResource",
    "Executor",
    "MemoryStore",
    "Progress",
    "RestfulAsyncError",
    "Saturated",
    "StoreUnavailable",
    "Task",
    "TaskCancelled",
    "TaskListResource",
    "TaskResultResource",
    "TaskState",
    "TaskStatusResource",
    "TaskStore",
    "ThreadExecutor",
    "Unavailable",
    "current_task",
    "register_async",
    "task_finished",
    "task_progress",
    "task_rejected",
    "task_started",
    "task_submitted",
]
