"""A process that claims orphaned tasks from a shared store, for the claim races.

``python -m tests.apps.claimer URL PREFIX WORKER START_AT``: waits until the
wall clock reaches ``START_AT`` (so that every claimer starts at once), then
claims in batches of 1 to 10 tasks, a millisecond or so apart (as the processes
of a service would, rather than one holding the store), until two claims in a row
find nothing, and prints the ids it claimed, one per line. ``PREFIX`` is the Redis key prefix
(ignored for SQLite).
"""

from __future__ import annotations

import random
import sys
import time

from flask_restful_async.stores import SQLiteStore, TaskStore


def store_at(url: str, prefix: str) -> TaskStore:
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"))
    from flask_restful_async.stores.redis import RedisStore

    return RedisStore(url, prefix=prefix)


def main(url: str, prefix: str, worker: str, start_at: str) -> None:
    store = store_at(url, prefix)
    store.renew_lease(worker)
    time.sleep(max(0.0, float(start_at) - time.time()))
    claimed: list[str] = []
    empty = 0
    while empty < 2:
        found = store.claim(worker, random.randint(1, 10))
        empty = 0 if found else empty + 1
        claimed.extend(each.task.id for each in found)
        time.sleep(random.uniform(0, 0.002))
    store.close()
    print("\n".join(claimed))


if __name__ == "__main__":
    main(*sys.argv[1:])
