"""Task stores, chosen by URL: ``memory://`` (more in later releases)."""

from __future__ import annotations

from flask import Flask

from .base import TaskStore as TaskStore
from .memory import MemoryStore as MemoryStore


def open_store(url: str, app: Flask) -> TaskStore:
    """Make the store a ``RESTFUL_ASYNC_STORE`` URL names."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"store URL {url!r} has no scheme; use e.g. 'memory://'")
    if scheme == "memory":
        return MemoryStore()
    raise ValueError(f"unknown task store scheme {scheme!r} in {url!r}; use 'memory://'")
