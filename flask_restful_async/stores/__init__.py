"""Task stores, chosen by URL: ``memory://``, ``sqlite:///path``, ``redis://host:port/db``."""

from __future__ import annotations

import os

from flask import Flask

from .base import TaskStore as TaskStore
from .memory import MemoryStore as MemoryStore
from .sqlite import SQLiteStore as SQLiteStore

SCHEMES = "memory://, sqlite:///relative/or/sqlite:////absolute/path.db, redis://host:port/db"


def open_store(url: str, app: Flask) -> TaskStore:
    """Make the store a ``RESTFUL_ASYNC_STORE`` URL names.

    A relative SQLite path is inside the app's instance folder, as Flask-SQLAlchemy
    does: ``sqlite:///tasks.db`` is ``<instance_path>/tasks.db``, and
    ``sqlite:////var/lib/app/tasks.db`` is absolute.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"store URL {url!r} has no scheme; use one of: {SCHEMES}")
    if scheme == "memory":
        return MemoryStore()
    if scheme == "sqlite":
        path = rest[1:] if rest.startswith("/") else ""
        if not path or path == ":memory:":
            raise ValueError(
                f"store URL {url!r} names no file; use e.g. 'sqlite:///tasks.db'"
                " (or 'memory://' for a store in this process only)"
            )
        return SQLiteStore(path if os.path.isabs(path) else os.path.join(app.instance_path, path))
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        prefix = app.config.get("RESTFUL_ASYNC_REDIS_PREFIX")
        return RedisStore(url) if prefix is None else RedisStore(url, prefix=prefix)
    raise ValueError(f"unknown task store scheme {scheme!r} in {url!r}; use one of: {SCHEMES}")
