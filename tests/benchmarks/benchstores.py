"""Stores for the benchmarks: a Redis store gets a prefix of its own, whose keys
are deleted afterwards, so that benchmarks leave nothing in the shared server."""

from __future__ import annotations

import contextlib
import secrets
import typing as t

from flask_restful_async.stores import TaskStore


@contextlib.contextmanager
def bench_store(url: str) -> t.Iterator[TaskStore | str]:
    """The store to pass to ``register_async``: the URL itself, or for ``redis://``
    a store under a fresh prefix that is emptied on exit."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        yield url
        return
    import redis

    from flask_restful_async.stores.redis import RedisStore

    prefix = f"{{bench-{secrets.token_hex(6)}}}:"
    try:
        yield RedisStore(url, prefix=prefix)
    finally:
        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
