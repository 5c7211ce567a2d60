"""The public names (CONTRACT section 1) stay importable from the package root."""

from __future__ import annotations

import importlib.metadata

import flask_restful_async


def test_contract_names_are_exported() -> None:
    for name in ("AsyncResource", "TaskStatusResource", "register_async", "current_task"):
        assert hasattr(flask_restful_async, name), name


def test_exported_members_are_the_documented_ones() -> None:
    for name in flask_restful_async.__all__:
        assert hasattr(flask_restful_async, name), name
    assert set(flask_restful_async.__all__) == {
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
    }


def test_the_version_is_the_installed_distributions() -> None:
    # One version, in flask_restful_async/version.py: the packaging metadata reads
    # it from there, so what pip reports is what the package says.
    assert flask_restful_async.__version__ == importlib.metadata.version("flask-restful-async")
