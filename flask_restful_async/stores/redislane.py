"""The Redis store's scripts, run on connections it keeps at hand.

Through redis-py's client, every command takes a connection from the pool and
gives it back, past retry wrappers, argument checks and (since redis-py 8) the
observability hooks that count pool connections even when nothing collects them.
For a script call on loopback that bookkeeping costs about as much client CPU as
the round trip itself (measured with redis-py 8.1: 75 µs a call through
``Script``, 42 µs on a connection at hand). A task makes two or three such calls
and a poll one, so the store runs its scripts here: connections taken from the
client's pool once, kept in a list of free ones between calls (no lock: a
deque's ``pop`` and ``append`` are atomic). A call holds one only while it runs,
so threads or greenlets that wait (a long poll, a stream) hold none.

What the client did for these calls is done here too: ``EVALSHA``, then the
script's text when the server does not know it (a restarted or flushed server);
one quick retry when the connection drops (a socket that a restarted server
closed; the free ones are closed too, as that server closed them all), none
after a timeout. A connection that failed in any way is closed before it is used
again, so that no reply of one call can be read by the next.
"""

from __future__ import annotations

import collections
import os
import random
import time
import typing as t
from collections.abc import Sequence

from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

if t.TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

#: Seconds before the one retry of a call whose connection dropped: a random
#: step between these, as the client's backoff would take.
RETRY_DELAY = (0.05, 0.25)


#: Error replies of a server in the middle of a failover (MASTERDOWN is a kind of
#: CLUSTERDOWN for redis-py): the store answers them as an outage, and the
#: connection that got one is dropped, to reach the new master when next used.
FAILOVER_ERRORS = (ReadOnlyError, ClusterDownError, TryAgainError)

# The attribute that marks an error of a call whose command reached the server.
_SENT = "restful_async_sent"
# The attribute that marks an error reply to a new connection's set-up (AUTH,
# SELECT, HELLO): the store is misconfigured (a database out of range), no call ran.
_SETUP = "restful_async_setup"


def refused_setup(error: BaseException) -> bool:
    """Whether ``error`` (an error reply) came while a connection was set up: so
    marked by a lane, or raised (through the client's own calls) from redis-py's
    ``on_connect`` steps."""
    if getattr(error, _SETUP, False) is True:
        return True
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name.startswith("on_connect"):
            return True
        trace = trace.tb_next
    return False


def reached_server(error: BaseException) -> bool:
    """Whether the call that raised ``error`` (a dropped connection, a timeout)
    was sent whole before it failed: the script may have run, its reply lost."""
    return getattr(error, _SENT, False) is True


class ScriptLane:
    """Runs scripts registered on ``client`` with connections of its pool."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._free: collections.deque[t.Any] = collections.deque()
        self._pid = os.getpid()

    @property
    def free(self) -> int:
        """How many connections wait for the next call (none is held by a caller)."""
        return len(self._free)

    def call(self, script: Script, keys: Sequence[str], args: Sequence[t.Any]) -> t.Any:
        """What ``script(keys=keys, args=args)`` gives, raising what the client would."""
        try:
            return self._once(script, keys, args)
        except RedisConnectionError as first:
            # Dropped (or refused) once: perhaps the server restarted, which closed
            # the free connections too. The retry connects afresh; every script of
            # the store is safe to run twice.
            for connection in list(self._free):
                connection.disconnect()
            time.sleep(random.uniform(*RETRY_DELAY))
            try:
                return self._once(script, keys, args)
            except BaseException as second:
                if reached_server(first):
                    setattr(second, _SENT, True)  # the first try may have run it
                raise

    def _once(self, script: Script, keys: Sequence[str], args: Sequence[t.Any]) -> t.Any:
        if self._pid != os.getpid():
            # A forked child: its parent's sockets are not its own to use.
            self._free, self._pid = collections.deque(), os.getpid()
        try:
            connection = self._free.pop()
        except IndexError:
            connection = self._pool.get_connection()
        sent = False
        try:
            try:
                connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                sent = True
                reply = connection.read_response()
            except NoScriptError:
                # The server forgot it (restarted, or SCRIPT FLUSH): EVAL loads it again.
                sent = False
                connection.send_command("EVAL", script.script, len(keys), *keys, *args)
                sent = True
                reply = connection.read_response()
        except ResponseError as e:
            # An error reply, read whole: the connection is still in step; but one
            # of a failover may come from a demoted master: connect afresh next time.
            if isinstance(e, FAILOVER_ERRORS) or not sent:
                connection.disconnect()
            if not sent:
                setattr(e, _SETUP, True)  # to the set-up of a new connection
            self._free.append(connection)
            raise
        except BaseException as e:
            connection.disconnect()  # connects afresh when next used
            self._free.append(connection)
            if sent:
                # Sent whole (a command cut short in the sending is not run):
                # the server may have run the script and its reply got lost.
                setattr(e, _SENT, True)
            raise
        self._free.append(connection)
        return reply
