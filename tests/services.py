"""Real services the tests talk to: skip when absent, fail when CI requires them.

``RESTFUL_ASYNC_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns "service absent"
from a skip into a failure, so that CI never passes by skipping.
"""

from __future__ import annotations

import os
import socket

import pytest

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
#: The databases the tests may use and flush; never any other.
REDIS_TEST_DBS = (12, 13, 14, 15)


def services_required() -> bool:
    return os.environ.get("RESTFUL_ASYNC_REQUIRE_SERVICES") == "1"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or, when services are required, fail) unless ``host:port`` answers."""
    if port_open(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if services_required():
        pytest.fail(f"{message}, and RESTFUL_ASYNC_REQUIRE_SERVICES=1")
    pytest.skip(message)


def require_redis() -> None:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
