"""``redis://``: tasks in Redis, shared by every process and host that uses it.

``RESTFUL_ASYNC_STORE = "redis://127.0.0.1:6379/0"`` (also ``rediss://`` for TLS
and ``unix:///path/to/redis.sock?db=0``; a password in the URL is used but never
shown again: :attr:`RedisStore.url` leaves it out). Needs redis-py:
``pip install flask-restful-async[redis]``.

Key layout, every key under the store's ``prefix`` (``{restful_async}:`` by default):

``task:<id>``
    A hash per task: its fields as strings (progress and response headers as
    JSON, the response body as raw bytes). Queued and running tasks have no TTL;
    finishing sets one of ``result_ttl + tombstone_ttl``, so Redis itself forgets
    finished tasks.
``owner:-`` / ``owner:=<owner>``
    A sorted set per owner (``-`` for tasks without one): task ids scored by
    ``created_at``, for :meth:`RedisStore.list`, newest first.
``idem:-:<key>`` / ``idem:=<len(owner)>:<owner>:<key>``
    The id of the task an idempotency key named; it gets the task's TTL when the
    task finishes.
``lease:<worker>``
    Exists while ``worker`` renews its lease (``PX`` = ``lease`` seconds).
``worker:<worker>``
    A set of the queued and running tasks that ``worker`` holds, so that
    :meth:`RedisStore.release_lease` finds them without scanning.
``holders``
    The set of workers that hold tasks: :meth:`RedisStore.claim` looks at their
    leases, and takes the tasks of those whose lease lapsed out of their sets.
``snapshot:<id>``
    The request snapshot stored with a queued task (and kept while a task with
    ``rerun`` runs), for another process to run it; dropped when the task starts
    or ends.
``unheld``
    A sorted set of the queued tasks with a snapshot that no worker holds (handed
    back, or of a worker whose lease lapsed), scored by ``created_at``: what
    :meth:`RedisStore.claim` takes, oldest first.
``claim:<token>``
    The ids one :meth:`RedisStore.claim` call took, so that the call run again
    (its reply lost) returns the same tasks rather than more: kept for
    ``queued_ttl`` (at least a minute), as the next claim of the process whose
    reply was lost may come only once Redis answers again.
``blob:<key>``
    An opaque blob (:meth:`RedisStore.put_blob`), with its own TTL; once taken,
    a copy stays for a minute as ``blob:<key>:taken:<token>``, for that take run
    again (its reply lost).
``active``
    A sorted set of the queued and running tasks, scored by ``created_at``: what
    :meth:`RedisStore.stats` reads one by one (a task leaves it when it ends).
``done:<state>``
    A sorted set per final state of the tasks that ended so, scored by
    ``finished_at``: :meth:`RedisStore.stats` counts those that ended within
    ``result_ttl`` with ``ZCOUNT``, and the purge drops older entries.
``expiry``
    A sorted set of when finished results expire (their body and headers are
    then dropped, leaving a tombstone) and when the tombstones' index entries
    can be pruned: :meth:`RedisStore.purge_expired` works through it in batches.
``finished``
    Not a key: the pub/sub channel on which every script that ends a task
    publishes its id, for :meth:`RedisStore.listen` (long-polling waiters); a
    delete publishes there too.
``changed``
    Not a key: the channel on which the scripts that create or start a task, write
    its progress or flag it for cancelling publish its id, for event streams.
    Publishing to a channel nobody subscribes to costs Redis a lookup; listeners
    subscribe to it only while a stream is open in their process.

Every change is one Lua script (one round trip, atomic), so a change is either
whole or absent and concurrent changes never lose each other's writes.

Redis Cluster: a script may only touch keys of one hash slot, and these scripts
also reach keys named in a task record (its worker's lease, its idempotency key).
The default prefix contains the hash tag ``{restful_async}``, so every key of the
store hashes to the same slot: keep a ``{…}`` tag in any prefix you choose, and point the URL
at the node that serves that slot (this store uses a plain, non-cluster client,
which does not follow ``MOVED`` redirections). All task keys then live on one
shard: the cluster gives you replication and failover for them, not more
capacity. Apps that should use different shards use different tags.

Deployment notes. Run Redis with ``maxmemory-policy noeviction``: an evicted lease
makes its worker's tasks read as ``lost``, an evicted task reads as unknown.
Without persistence (``appendonly yes`` or snapshots) a Redis restart forgets
every task. Timestamps come from the clocks of the app servers (keep them in
sync); the TTLs are counted by Redis.
"""

from __future__ import annotations

import builtins
import contextlib
import heapq
import json
import logging
import random
import secrets
import threading
import time
import typing as t
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence

try:
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import (
        BusyLoadingError,
        InvalidResponse,
        OutOfMemoryError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ImportError as e:
    raise ImportError(
        "The redis:// task store needs redis-py: pip install flask-restful-async[redis]"
    ) from e

from ..exceptions import StoreUnavailable
from ..task import Progress, StoredResponse, Task, TaskState
from .base import ChangeCallback, Claimed, Ending, StopSignal, StoreStats, TaskStore
from .redislane import FAILOVER_ERRORS, ScriptLane, reached_server, refused_setup

#: Index entries one list() script looks at, at most; it is called again from
#: where it stopped until the page is full, so work per call stays bounded.
LIST_SCAN = 200
#: Expiry entries one purge script handles, and how many such batches one
#: purge_expired() call runs at most.
PURGE_BATCH = 500
PURGE_MAX_BATCHES = 20
#: Tasks one release_lease() script marks lost (or hands back) at a time.
RELEASE_BATCH = 256
#: How long (ms) a taken blob stays for a take that runs again (see _TAKE_BLOB).
TAKEN_BLOB_MS = 60_000
#: Tasks of workers whose lease lapsed that one claim() takes out of their sets
#: at most (the next claim goes on).
ORPHAN_BATCH = 1000
#: :meth:`RedisStore.listen`: seconds one read of the subscription waits (and so
#: at most how long it takes to see that it should stop), and seconds between two
#: PINGs on it; three intervals without any answer count as a lost connection.
LISTEN_TIMEOUT = 0.25
LISTEN_PING_INTERVAL = 5.0
#: Bytes of response (headers and body) up to which a finish publishes the
#: response itself to every listening process, sparing waiters a read.
ANNOUNCED_RESPONSE_MAX = 4096

# Each script starts with this. ARGV[1..5] are the same for every script that
# uses it: the key prefix, the caller's clock, result_ttl (seconds), the TTL of a
# finished task (milliseconds) and when a result finished now expires. Times
# arrive as strings and are written back unchanged: Lua would format numbers with
# 14 significant digits and so round the timestamps.
_PRELUDE = """
local prefix, now, result_ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ttl_ms, result_due = ARGV[4], ARGV[5]
local schedule = prefix .. 'expiry'
local unheld, holders = prefix .. 'unheld', prefix .. 'holders'
local active = prefix .. 'active'
local META = {
  'id', 'state', 'worker', 'ix', 'ik', 'finished_at', 'expired', 'owner', 'created_at',
  'rerun', 'cancel'
}

local function load(key)
  local values = redis.call('HMGET', key, unpack(META))
  if not values[1] then return nil end
  local h = {}
  for i, name in ipairs(META) do
    if values[i] then h[name] = values[i] end
  end
  return h
end

local function is_active(state)
  return state == 'queued' or state == 'running'
end

-- The same rule as TaskStore.retention_view: past result_ttl, a result is gone.
local function is_expired(h)
  if h['expired'] then return true end
  if is_active(h['state']) or not h['finished_at'] then return false end
  return tonumber(now) - tonumber(h['finished_at']) > result_ttl
end

-- An expiry entry names the owner index too, to prune it once the hash is gone.
local function schedule_member(kind, id, ix)
  return kind .. #id .. ':' .. id .. ix
end

local function snapshot_key(id)
  return prefix .. 'snapshot:' .. id
end

-- End an active task: it gets its TTL (and so does its idempotency key), leaves
-- its worker's set, the queue and the active tasks, joins the ended ones of its
-- state, loses its snapshot and is scheduled for expiry.
local function conclude(key, h, state, news)
  redis.call('HSET', key, 'state', state, 'finished_at', now)
  h['state'], h['finished_at'] = state, now
  redis.call('ZREM', active, h['id'])
  redis.call('ZADD', prefix .. 'done:' .. state, now, h['id'])
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('DEL', snapshot_key(h['id']))
  redis.call('ZREM', unheld, h['id'])
  if h['ik'] and redis.call('GET', h['ik']) == h['id'] then
    redis.call('PEXPIRE', h['ik'], ttl_ms)
  end
  if h['worker'] then
    redis.call('SREM', prefix .. 'worker:' .. h['worker'], h['id'])
  end
  redis.call('ZADD', schedule, result_due, schedule_member('r', h['id'], h['ix']))
  -- For long-polling waiters (RedisStore.listen). pcall: a user whom an ACL
  -- forbids the channel still ends the task, and the waiters still poll.
  redis.pcall('PUBLISH', prefix .. 'finished', news or h['id'])
end

-- A queued task that its worker no longer holds: any process may claim it.
local function unhold(key, h)
  redis.call('HDEL', key, 'worker')
  redis.call('SREM', prefix .. 'worker:' .. h['worker'], h['id'])
  h['worker'] = nil
  redis.call('ZADD', unheld, h['created_at'], h['id'])
end

-- An active task whose worker is gone: queued with a snapshot, it waits for
-- another process to claim it; running with rerun, it goes back to the queue
-- (or ends cancelled, if that was asked); otherwise it is lost.
local function orphan(key, h)
  local has_snapshot = redis.call('EXISTS', snapshot_key(h['id'])) == 1
  if h['state'] == 'queued' and has_snapshot then
    unhold(key, h)
  elseif h['state'] == 'running' and h['rerun'] and has_snapshot then
    if h['cancel'] then
      conclude(key, h, 'cancelled')
    else
      redis.call('HSET', key, 'state', 'queued')
      redis.call('HDEL', key, 'started_at', 'progress')
      h['state'] = 'queued'
      unhold(key, h)
    end
  else
    conclude(key, h, 'lost')
  end
end

-- A task still queued that was created before queued_before (a number) is lost,
-- and recorded so: no worker started it within queued_ttl. An active task whose
-- worker no longer holds a lease is orphaned (see there).
local function check_alive(key, h, queued_before)
  if h['state'] == 'queued' and tonumber(h['created_at']) < queued_before then
    conclude(key, h, 'lost')
  elseif h['worker'] and is_active(h['state'])
      and redis.call('EXISTS', prefix .. 'lease:' .. h['worker']) == 0 then
    orphan(key, h)
  end
end

-- Record that worker holds the task id, for claim() to look at its lease.
local function hold(id, worker)
  redis.call('SADD', prefix .. 'worker:' .. worker, id)
  redis.call('SADD', holders, worker)
end
"""

# KEYS: task, owner index[, idempotency key]. ARGV[6..]: id, created_at, worker
# ('' for none), the lease (ms), queued_before (see check_alive), '1' and the
# snapshot or '0' and '', then the hash's fields and values.
_CREATE = (
    _PRELUDE
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- This very task: a retried call whose first attempt did get through.
  return {0, redis.call('HGETALL', KEYS[1])}
end
local id, worker = ARGV[6], ARGV[8]
if KEYS[3] then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    local key = prefix .. 'task:' .. existing
    local h = load(key)
    if h then
      check_alive(key, h, tonumber(ARGV[10]))
      if not is_expired(h) then return {0, redis.call('HGETALL', key)} end
    end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('ZADD', KEYS[2], ARGV[7], id)
redis.call('ZADD', active, ARGV[7], id)
if KEYS[3] then redis.call('SET', KEYS[3], id) end
if ARGV[11] == '1' then
  redis.call('SET', snapshot_key(id), ARGV[12])
  if worker == '' then redis.call('ZADD', unheld, ARGV[7], id) end
end
if worker ~= '' then
  hold(id, worker)
  -- Only the living worker itself creates its tasks: if Redis lost its lease
  -- (a restart without persistence, a flush), take it up again now rather than
  -- let the new task read as lost until the next renewal.
  redis.call('SET', prefix .. 'lease:' .. worker, '1', 'PX', ARGV[9], 'NX')
end
redis.pcall('PUBLISH', prefix .. 'changed', id)
return {1}
"""
)

# KEYS: task. ARGV[6]: worker, ARGV[7]: queued_before (see check_alive).
# started_at is the caller's clock.
_START = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
local worker = ARGV[6]
if h['state'] == 'running' and h['worker'] == worker
    and redis.call('HGET', KEYS[1], 'started_at') == now then
  -- This very call again (its reply was lost and redis-py retried it).
  return redis.call('HGETALL', KEYS[1])
end
if h['state'] ~= 'queued' then return false end
if tonumber(h['created_at']) < tonumber(ARGV[7]) then
  -- Queued past queued_ttl: it reads lost, and is recorded so; it never runs.
  conclude(KEYS[1], h, 'lost')
  return false
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', now, 'worker', worker)
if h['worker'] and h['worker'] ~= worker then
  redis.call('SREM', prefix .. 'worker:' .. h['worker'], h['id'])
end
hold(h['id'], worker)
redis.call('ZREM', unheld, h['id'])
if not h['rerun'] then redis.call('DEL', snapshot_key(h['id'])) end
redis.pcall('PUBLISH', prefix .. 'changed', h['id'])
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: task. ARGV[1]: progress as JSON, ARGV[2]: the ``changed`` channel.
_SET_PROGRESS = """
local found = redis.call('HMGET', KEYS[1], 'state', 'cancel', 'id')
if not found[1] then return 0 end
if found[1] == 'running' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  redis.pcall('PUBLISH', ARGV[2], found[3])
end
if found[2] then return 1 end
return 0
"""

# KEYS: task. ARGV[6..]: state, then '1', status, headers, body when there is a response.
_FINISH = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h or not is_active(h['state']) then return 0 end
local news = nil
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[1], 'status', ARGV[8], 'headers', ARGV[9], 'body', ARGV[10])
  if ARGV[11] == '1' then
    -- A small response goes out with the news: waiters need not read it back.
    news = table.concat({h['id'], ARGV[6], now, ARGV[8], ARGV[9], ARGV[10]}, '\0')
  end
end
conclude(KEYS[1], h, ARGV[6], news)
return 1
"""
)

# KEYS: task, owner index. ARGV[6..]: id, created_at, the final state, then '1',
# status, headers and body to announce with the news (small) or '0' and three
# blanks, then the hash's fields and values: a task that ran before it was
# recorded, ended.
_CREATE_FINISHED = (
    _PRELUDE
    + """
local id, state = ARGV[6], ARGV[8]
local news = nil
if ARGV[9] == '1' then
  news = table.concat({id, state, now, ARGV[10], ARGV[11], ARGV[12]}, '\0')
end
-- There already: a retried call whose first attempt did get through (ended), or
-- recorded as running after all (that call's reply was lost): it ends now, and
-- leaves the indexes of the worker it ran under (read before the fields change).
local h = load(KEYS[1])
if h and not is_active(h['state']) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
if not h then
  redis.call('ZADD', KEYS[2], ARGV[7], id)
  h = load(KEYS[1])
end
conclude(KEYS[1], h, state, news)
return 1
"""
)

# KEYS: task. ARGV[6]: queued_before (see check_alive).
_REQUEST_CANCEL = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
check_alive(KEYS[1], h, tonumber(ARGV[6]))
if is_expired(h) then return false end
redis.call('HSET', KEYS[1], 'cancel', '1')
if h['state'] == 'queued' then
  conclude(KEYS[1], h, 'cancelled')
elseif h['state'] == 'running' then
  redis.pcall('PUBLISH', prefix .. 'changed', h['id'])
end
return redis.call('HGETALL', KEYS[1])
"""
)

# Forget a task entirely: its hash, index entries, idempotency key, snapshot and
# schedule; waits and streams on it read it once more, and stop.
_FORGET = """
local function forget(key, h)
  redis.call('DEL', key)
  redis.call('ZREM', h['ix'], h['id'])
  redis.call('ZREM', is_active(h['state']) and active or prefix .. 'done:' .. h['state'], h['id'])
  if h['ik'] and redis.call('GET', h['ik']) == h['id'] then redis.call('DEL', h['ik']) end
  if h['worker'] then redis.call('SREM', prefix .. 'worker:' .. h['worker'], h['id']) end
  redis.call('DEL', snapshot_key(h['id']))
  redis.call('ZREM', unheld, h['id'])
  redis.call('ZREM', schedule, schedule_member('r', h['id'], h['ix']),
    schedule_member('f', h['id'], h['ix']))
  redis.pcall('PUBLISH', prefix .. 'finished', h['id'])
end
"""

# KEYS: task.
_DELETE = (
    _PRELUDE
    + _FORGET
    + """
local h = load(KEYS[1])
if not h then return 0 end
forget(KEYS[1], h)
return 1
"""
)

# KEYS: task. ARGV[6]: the worker under which a running task is taken back too
# ('' for none). Returns 1 when the task was taken back (see TaskStore.withdraw):
# one without idempotency key is forgotten; one with a key is queued for any
# process to claim if it has its snapshot, else it ends lost and lets go of the
# key. 0 when it is not there, or neither queued nor running under that worker.
_WITHDRAW = (
    _PRELUDE
    + _FORGET
    + """
local h = load(KEYS[1])
if not h then return 0 end
if h['state'] ~= 'queued'
    and not (h['state'] == 'running' and ARGV[6] ~= '' and h['worker'] == ARGV[6]) then
  return 0
end
if not h['ik'] then
  forget(KEYS[1], h)
  return 1
end
if redis.call('EXISTS', snapshot_key(h['id'])) == 1 then
  if h['cancel'] then
    -- Cancelling was asked while it read running: it ends so.
    conclude(KEYS[1], h, 'cancelled')
    return 1
  end
  if h['state'] == 'running' then
    redis.call('HSET', KEYS[1], 'state', 'queued')
    redis.call('HDEL', KEYS[1], 'started_at', 'progress')
    h['state'] = 'queued'
  end
  if h['worker'] then
    unhold(KEYS[1], h)
  else
    redis.call('ZADD', unheld, h['created_at'], h['id'])
  end
  redis.pcall('PUBLISH', prefix .. 'changed', h['id'])
  return 1
end
if redis.call('GET', h['ik']) == h['id'] then redis.call('DEL', h['ik']) end
redis.call('HDEL', KEYS[1], 'ik', 'idempotency_key')
h['ik'] = nil
conclude(KEYS[1], h, 'lost')
return 1
"""
)

# KEYS: task. ARGV[6]: '' for any owner, else '-' for none or '=' and the owner:
# another owner's task is not there (nor is its response sent). ARGV[7]:
# queued_before (see check_alive).
_GET = (
    _PRELUDE
    + """
local h = load(KEYS[1])
if not h then return false end
local wanted = ARGV[6]
if wanted and wanted ~= '' and (h['owner'] and '=' .. h['owner'] or '-') ~= wanted then
  return false
end
check_alive(KEYS[1], h, tonumber(ARGV[7]))
return redis.call('HGETALL', KEYS[1])
"""
)

# A task as a list shows it: of its response the status code alone (see
# TaskStore.list), with empty headers and body; never the response's own, which a
# page of status documents does not need and which may weigh megabytes each.
_LISTED = """
local LISTED = {
  'id', 'state', 'created_at', 'started_at', 'finished_at', 'progress', 'owner',
  'idempotency_key', 'fingerprint', 'cancel', 'worker', 'expired', 'rerun', 'endpoint',
  'method', 'path', 'status'
}
local function listed(key)
  local values = redis.call('HMGET', key, unpack(LISTED))
  local flat = {}
  for i, name in ipairs(LISTED) do
    if values[i] then
      flat[#flat + 1] = name
      flat[#flat + 1] = values[i]
    end
  end
  if values[#LISTED] then
    flat[#flat + 1] = 'headers'
    flat[#flat + 1] = '[]'
    flat[#flat + 1] = 'body'
    flat[#flat + 1] = ''
  end
  return flat
end
"""

# KEYS: owner index. ARGV[6..]: cursor id ('' to start at the newest), the
# cursor's score ('' if unknown), how many tasks are wanted, how many index
# entries to look at at most, the state wanted ('' for any), queued_before (see
# check_alive).
# Returns {next cursor id or '', its score or '', task hashes...}.
_LIST = (
    _PRELUDE
    + _LISTED
    + """
local cursor, cursor_score = ARGV[6], ARGV[7]
local want, scan, wanted_state = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10]
local queued_before = tonumber(ARGV[11])
local first = 0
if cursor ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], cursor)
  if rank then
    first = rank + 1
  elseif cursor_score ~= '' then
    -- The cursor was deleted between two calls: go on after its score (tasks
    -- created in the very same microsecond as it may then be skipped).
    first = redis.call('ZCOUNT', KEYS[1], cursor_score, '+inf')
  else
    return {'', ''}
  end
end
local entries = redis.call('ZREVRANGE', KEYS[1], first, first + scan - 1, 'WITHSCORES')
local out = {'', ''}
for i = 1, #entries, 2 do
  local id = entries[i]
  local key = prefix .. 'task:' .. id
  local h = load(key)
  if not h then
    -- Redis expired (or evicted) the task: drop its index entry on the way.
    redis.call('ZREM', KEYS[1], id)
  else
    check_alive(key, h, queued_before)
    if not is_expired(h) and (wanted_state == '' or h['state'] == wanted_state) then
      out[#out + 1] = listed(key)
    end
  end
  if #out - 2 >= want or (i + 1 == #entries and #entries == 2 * scan) then
    out[1], out[2] = id, entries[i + 1]
    return out
  end
end
return out
"""
)

# Orphan (see there) up to ARGV[7] tasks of the worker whose set is KEYS[2] and
# name ARGV[6]; forget the worker as a holder once its set is empty. Returns how
# many tasks it took from the set.
_ORPHAN_TASKS = """
local function orphan_tasks(worker_set, worker, batch)
  local ids = redis.call('SPOP', worker_set, batch)
  for _, id in ipairs(ids) do
    local key = prefix .. 'task:' .. id
    local h = load(key)
    if h and is_active(h['state']) and h['worker'] == worker then
      -- SPOP took it out of the set already: unhold's SREM finds nothing.
      orphan(key, h)
    end
  end
  if redis.call('SCARD', worker_set) == 0 then redis.call('SREM', holders, worker) end
  return #ids
end
"""

# KEYS: lease, worker's set. ARGV[6..]: worker, batch size.
_RELEASE = (
    _PRELUDE
    + _ORPHAN_TASKS
    + """
redis.call('DEL', KEYS[1])
return orphan_tasks(KEYS[2], ARGV[6], tonumber(ARGV[7]))
"""
)

# KEYS: the claim's record. ARGV[6..]: worker, limit, queued_before (see
# check_alive), how many tasks of lapsed workers to orphan at most, how long the
# record is kept (ms).
# Returns {task hash, snapshot, task hash, snapshot, ...}.
_CLAIM = (
    _PRELUDE
    + _ORPHAN_TASKS
    + """
local worker, limit, queued_before = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
local function take(key, id)
  out[#out + 1] = redis.call('HGETALL', key)
  out[#out + 1] = redis.call('GET', snapshot_key(id))
end
local done = redis.call('LRANGE', KEYS[1], 0, -1)
if #done > 0 then
  -- This very call again (its reply was lost and redis-py retried it).
  for _, id in ipairs(done) do
    local key = prefix .. 'task:' .. id
    local h = load(key)
    if h and h['state'] == 'queued' and h['worker'] == worker then take(key, id) end
  end
  return out
end
-- The tasks of workers whose lease lapsed become claimable first.
local budget = tonumber(ARGV[9])
for _, holder in ipairs(redis.call('SMEMBERS', holders)) do
  if budget <= 0 then break end
  if redis.call('EXISTS', prefix .. 'lease:' .. holder) == 0 then
    budget = budget - orphan_tasks(prefix .. 'worker:' .. holder, holder, budget)
  end
end
local taken = {}
while #taken < limit do
  local first = redis.call('ZRANGE', unheld, 0, limit - #taken - 1)
  if #first == 0 then break end
  for _, id in ipairs(first) do
    redis.call('ZREM', unheld, id)
    local key = prefix .. 'task:' .. id
    local h = load(key)
    if h and h['state'] == 'queued' and not h['worker'] and not h['cancel']
        and redis.call('EXISTS', snapshot_key(id)) == 1 then
      if tonumber(h['created_at']) < queued_before then
        conclude(key, h, 'lost')
      else
        redis.call('HSET', key, 'worker', worker)
        hold(id, worker)
        taken[#taken + 1] = id
        take(key, id)
      end
    end
  end
end
if #taken > 0 then
  redis.call('RPUSH', KEYS[1], unpack(taken))
  redis.call('PEXPIRE', KEYS[1], ARGV[10])
end
return out
"""
)

# KEYS: the blob, and where this take keeps a copy. ARGV: how long the copy lasts
# (ms). Returns the blob, or nil. The copy's name holds a token of the call: run
# again with it (its reply was lost), the take gives the same bytes; any other
# take finds nothing. A blob is taken once, and never lost to a retry.
_TAKE_BLOB = """
local data = redis.call('GET', KEYS[1])
if data then
  redis.call('SET', KEYS[2], data, 'PX', ARGV[1])
  redis.call('DEL', KEYS[1])
  return data
end
return redis.call('GET', KEYS[2])
"""

# KEYS: the worker's set. ARGV[1..]: worker, task ids. Returns how many it let go.
_HAND_BACK = """
local prefix, worker = ARGV[1], ARGV[2]
local unheld = prefix .. 'unheld'
local count, last = 0, nil
for i = 3, #ARGV do
  local id = ARGV[i]
  local key = prefix .. 'task:' .. id
  local found = redis.call('HMGET', key, 'state', 'worker', 'created_at')
  if found[1] == 'queued' and found[2] == worker then
    redis.call('HDEL', key, 'worker')
    redis.call('SREM', KEYS[1], id)
    if redis.call('EXISTS', prefix .. 'snapshot:' .. id) == 1 then
      redis.call('ZADD', unheld, found[3], id)
    end
    count = count + 1
    last = id
  end
end
if last then
  -- News for the listeners of other processes: tasks wait to be taken over.
  redis.pcall('PUBLISH', prefix .. 'finished', last)
end
return count
"""

# KEYS: expiry schedule. ARGV[6..]: batch size, tombstone_ttl (seconds).
# Returns {records changed, entries handled}.
_PURGE = (
    _PRELUDE
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[6])
local changed = 0
-- Past result_ttl, an ended task is no longer counted (stats) and its entry goes.
for _, state in ipairs({'succeeded', 'failed', 'cancelled', 'lost'}) do
  redis.call('ZREMRANGEBYSCORE', prefix .. 'done:' .. state, '-inf',
    '(' .. (tonumber(now) - result_ttl))
end
for i = 1, #due, 2 do
  local member = due[i]
  local colon = string.find(member, ':', 2, true)
  local size = tonumber(string.sub(member, 2, colon - 1))
  local id = string.sub(member, colon + 1, colon + size)
  local ix = string.sub(member, colon + size + 1)
  local key = prefix .. 'task:' .. id
  redis.call('ZREM', KEYS[1], member)
  if redis.call('EXISTS', key) == 0 then
    changed = changed + redis.call('ZREM', ix, id)
  elseif string.sub(member, 1, 1) == 'r' then
    -- The result expired: keep a tombstone, free the response.
    redis.call('HDEL', key, 'status', 'headers', 'body', 'progress')
    redis.call('HSET', key, 'expired', '1')
    redis.call('ZADD', KEYS[1], tonumber(due[i + 1]) + tonumber(ARGV[7]),
      schedule_member('f', id, ix))
    changed = changed + 1
  else
    -- Redis has not expired the tombstone yet (clocks differ): look again then.
    local pttl = redis.call('PTTL', key)
    if pttl > 0 then
      redis.call('ZADD', KEYS[1], tonumber(now) + pttl / 1000, member)
    end
  end
end
return {changed, #due / 2}
"""
)

# The operator's view of every owner's tasks (see RedisStore.list_all). The owner
# indexes are found with SCAN; each script below works on a bounded batch.

# ARGV[6..]: the state wanted ('' for any), queued_before (see check_alive), then
# task ids. Returns the hashes of those that are live and in that state, in order.
_READ_LIVE = (
    _PRELUDE
    + _LISTED
    + """
local wanted, queued_before = ARGV[6], tonumber(ARGV[7])
local out = {}
for i = 8, #ARGV do
  local key = prefix .. 'task:' .. ARGV[i]
  local h = load(key)
  if h then
    check_alive(key, h, queued_before)
    if not is_expired(h) and (wanted == '' or h['state'] == wanted) then
      out[#out + 1] = listed(key)
    end
  end
end
return out
"""
)

# KEYS: the active tasks. ARGV[6..]: first rank, how many entries, queued_before
# (see check_alive). Returns {entries looked at, entries that left the active
# tasks (ended by check_alive, or gone), then the tasks among them still active
# by state (queued, running), then the created_at of the oldest queued one ('' if
# none)}. Those that ended here are counted in their done set, as every ended task.
_COUNT_ACTIVE = (
    _PRELUDE
    + """
local first, count, queued_before = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ids = redis.call('ZRANGE', KEYS[1], first, first + count - 1)
local out = {#ids, 0, 0, 0, ''}
local oldest = nil
for _, id in ipairs(ids) do
  local key = prefix .. 'task:' .. id
  local h = load(key)
  if h then check_alive(key, h, queued_before) end
  if not h or not is_active(h['state']) then
    -- Ended here (conclude took it out already), or gone, or ended by a version
    -- of this script that kept no such set.
    redis.call('ZREM', KEYS[1], id)
    out[2] = out[2] + 1
  elseif h['state'] == 'queued' then
    out[3] = out[3] + 1
    if not oldest or tonumber(h['created_at']) < tonumber(oldest) then
      oldest = h['created_at']
    end
  else
    out[4] = out[4] + 1
  end
end
if oldest then out[5] = oldest end
return out
"""
)
# One owner's tasks counted by the state they read as, through the owner's index:
# every entry of it, ended ones included (one script per OPERATE_BATCH entries).
_OWNER_STATS = (
    _PRELUDE
    + """
local first, count, queued_before = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ids = redis.call('ZRANGE', KEYS[1], first, first + count - 1)
local slots = {queued = 2, running = 3, succeeded = 4, failed = 5, cancelled = 6, lost = 7}
local out = {#ids, 0, 0, 0, 0, 0, 0, ''}
local oldest = nil
for _, id in ipairs(ids) do
  local key = prefix .. 'task:' .. id
  local h = load(key)
  if h then
    check_alive(key, h, queued_before)
    local slot = slots[h['state']]
    if slot and not is_expired(h) then
      out[slot] = out[slot] + 1
      if h['state'] == 'queued'
          and (not oldest or tonumber(h['created_at']) < tonumber(oldest)) then
        oldest = h['created_at']
      end
    end
  end
end
if oldest then out[8] = oldest end
return out
"""
)
_OWNER_STAT_STATES = (
    TaskState.QUEUED,
    TaskState.RUNNING,
    TaskState.SUCCEEDED,
    TaskState.FAILED,
    TaskState.CANCELLED,
    TaskState.LOST,
)
_ENDED_STATES = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST)
#: Index entries one stats() script counts, and tasks one purge_finished() step
#: looks at.
OPERATE_BATCH = 500


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN ``MATCH`` pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _ms(seconds: float) -> int:
    """Milliseconds for PX/PEXPIRE, at least 1 (0 would delete the key at once)."""
    return max(1, round(seconds * 1000))


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority part or the query string)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        username = userinfo.partition(":")[0]
        netloc = f"{username}@{host}" if username else host
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, v) for k, v in pairs if k != "password"])
    # Put together by hand: urlunsplit() would turn "unix:///path" into "unix:/path".
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        shown += f"?{query}"
    if parts.fragment:
        shown += f"#{parts.fragment}"
    return shown


class RedisStore(TaskStore):
    """Tasks in Redis: every process of every host that shares the URL sees them.

    Each method is one round trip (besides :meth:`list` and :meth:`purge_expired`,
    which work in bounded pages) and atomic. A server that is down or does not
    answer makes a method raise :class:`~flask_restful_async.exceptions.StoreUnavailable`
    within about ``socket_timeout`` seconds (a refused connection is retried once,
    a timeout is not); other Redis errors propagate. The client connects lazily:
    making the store does not touch the server.

    :param url: ``redis://[user[:password]@]host[:port]/db``, ``rediss://…`` or
        ``unix://[user[:password]@]/path?db=N``; any redis-py URL option works.
    :param prefix: Put before every key. Keep a ``{hash tag}`` in it for Redis
        Cluster (see the module documentation).
    :param socket_timeout: Seconds to wait for a connection and for each reply.
    """

    shared = True

    def __init__(
        self, url: str, *, prefix: str = "{restful_async}:", socket_timeout: float = 2.0
    ) -> None:
        self.url = redact_url(url)
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One quick retry on a dropped connection (a pooled socket that a
            # restarted server closed) and none on timeouts: a timeout already
            # took socket_timeout, and retrying would multiply it. Every script
            # is safe to run twice. (redis-py's own default from a URL is no
            # retry at all; Redis() without a URL retries 10 times with backoff.)
            retry=Retry(
                ExponentialWithJitterBackoff(base=0.05, cap=0.25),
                retries=1,
                supported_errors=(RedisConnectionError,),
            ),
            # RESP2 works with every server version (RESP3's HELLO needs Redis 6)
            # and is all these commands need. A ?protocol=3 in the URL wins.
            protocol=2,
        )
        pool = self._client.connection_pool
        try:
            # redis-py passes unknown URL parameters on to each connection it makes,
            # and fails only then, at the first request. Build one now (building
            # does not connect) so that a typo fails here, where it was made.
            pool.connection_class(**pool.connection_kwargs)
        except TypeError as e:
            raise ValueError(
                f"RedisStore: {self.url} has a query parameter that redis-py does not know"
                f" ({e}); the key prefix is an argument: RedisStore(url, prefix=...)"
            ) from None
        self._lane = ScriptLane(self._client)
        # The token of the last claim() if its reply was lost (see there).
        self._lost_claim: str | None = None
        self._claim_lock = threading.Lock()
        register = self._client.register_script
        self._create = register(_CREATE)
        self._start = register(_START)
        self._set_progress = register(_SET_PROGRESS)
        self._finish = register(_FINISH)
        self._create_finished = register(_CREATE_FINISHED)
        self._request_cancel = register(_REQUEST_CANCEL)
        self._delete = register(_DELETE)
        self._withdraw = register(_WITHDRAW)
        self._get = register(_GET)
        self._list = register(_LIST)
        self._release = register(_RELEASE)
        self._claim = register(_CLAIM)
        self._hand_back = register(_HAND_BACK)
        self._purge = register(_PURGE)
        self._read_live = register(_READ_LIVE)
        self._count_active = register(_COUNT_ACTIVE)
        self._owner_stats = register(_OWNER_STATS)
        self._take_blob = register(_TAKE_BLOB)

    # Key names. Owners and workers are arbitrary strings: the markers ("-" for
    # no owner, "=" and a length otherwise) keep every (owner, key) pair apart.

    @property
    def _changed_channel(self) -> str:
        return f"{self.prefix}changed"

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def _owner_key(self, owner: str | None) -> str:
        return f"{self.prefix}owner:-" if owner is None else f"{self.prefix}owner:={owner}"

    def _idempotency_key(self, owner: str | None, key: str) -> str:
        scope = "-" if owner is None else f"={len(owner)}:{owner}"
        return f"{self.prefix}idem:{scope}:{key}"

    def _lease_key(self, worker: str) -> str:
        return f"{self.prefix}lease:{worker}"

    def _worker_key(self, worker: str) -> str:
        return f"{self.prefix}worker:{worker}"

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """Turn "Redis cannot be reached" into StoreUnavailable; let other errors through."""
        try:
            yield
        except BusyLoadingError as e:
            raise self.unavailable("loading", "Redis is loading its data set", retry_after=5) from e
        except FAILOVER_ERRORS as e:
            # A failover under way: a master demoted to a replica answers writes with
            # READONLY, a replica cut off from its master MASTERDOWN, a cluster in
            # the middle of it TRYAGAIN or CLUSTERDOWN. It passes; nothing was written.
            raise self.unavailable(type(e).__name__, f"Redis is failing over: {e}") from e
        except (RedisConnectionError, RedisTimeoutError) as e:
            error = self.unavailable(type(e).__name__, f"Redis did not answer: {e}")
            error.doubtful = reached_server(e)
            raise error from e
        except InvalidResponse as e:
            # What answers at that address does not speak Redis's protocol.
            raise self.unavailable("InvalidResponse", f"not a Redis server: {e}") from e
        except ResponseError as e:
            if isinstance(e, OutOfMemoryError) or str(e).startswith("BUSY "):
                # Past maxmemory (noeviction), or a script that runs long: the
                # write is refused before it runs, and it may pass.
                error = self.unavailable("refused", f"Redis refused the write: {e}")
                error.refused = True
                raise error from e
            if not refused_setup(e):
                raise
            # AUTH, SELECT or HELLO refused (a database number out of range): a
            # configuration to mend, answered as any store that cannot serve.
            raise self.unavailable(
                "setup", f"Redis refused a new connection's set-up: {e}", level=logging.ERROR
            ) from e

    def _clock(self, now: float) -> list[str | int]:
        """The arguments every script's prelude reads (see _PRELUDE)."""
        return [
            self.prefix,
            repr(now),
            repr(float(self.result_ttl)),
            _ms(self.result_ttl + self.tombstone_ttl),
            repr(now + self.result_ttl),
        ]

    def _queued_before(self, now: float) -> str:
        """The creation time before which a task still queued is lost."""
        return repr(now - self.queued_ttl)

    def create(self, task: Task, snapshot: bytes | None = None) -> Task:
        fields = _encode(task)
        keys = [self._task_key(task.id), self._owner_key(task.owner)]
        if task.idempotency_key is not None:
            idempotency_key = self._idempotency_key(task.owner, task.idempotency_key)
            keys.append(idempotency_key)
            fields += [b"ik", idempotency_key.encode()]
        fields += [b"ix", keys[1].encode()]
        args = [
            *self._clock(time.time()),
            task.id,
            repr(float(task.created_at)),
            task.worker or "",
            _ms(self.lease_hold),
            self._queued_before(time.time()),
            *(("0", "") if snapshot is None else ("1", snapshot)),
            *fields,
        ]
        with self._reaching():
            reply = self._lane.call(self._create, keys, args)
        if reply[0] == 1:
            return task
        return _decode(reply[1])

    def get(self, task_id: str) -> Task | None:
        return self._read(task_id, "")

    def get_by_key(self, owner: str | None, key: str) -> Task | None:
        with self._reaching():
            task_id = self._client.get(self._idempotency_key(owner, key))
        if task_id is None:
            return None
        text = task_id.decode() if isinstance(task_id, bytes) else str(task_id)
        found = self.get_owned(text, owner)
        return None if found is None or found.expired else found

    def get_owned(self, task_id: str, owner: str | None) -> Task | None:
        return self._read(task_id, "-" if owner is None else f"={owner}")

    def _read(self, task_id: str, owner: str) -> Task | None:
        now = time.time()
        with self._reaching():
            args = [*self._clock(now), owner, self._queued_before(now)]
            reply = self._lane.call(self._get, [self._task_key(task_id)], args)
        if reply is None:
            return None
        return self.retention_view(_decode(reply), now)

    def start(self, task_id: str, worker: str) -> Task | None:
        now = time.time()
        args = [*self._clock(now), worker, self._queued_before(now)]
        with self._reaching():
            reply = self._lane.call(self._start, [self._task_key(task_id)], args)
        return None if reply is None else _decode(reply)

    def claim(self, worker: str, limit: int) -> list[Claimed]:
        if limit < 1:
            raise ValueError(f"claim limit must be 1 or more, not {limit}")
        now = time.time()
        args = [
            *self._clock(now),
            worker,
            limit,
            self._queued_before(now),
            ORPHAN_BATCH,
            _ms(max(60.0, self.queued_ttl)),
        ]
        # The token tells a retry of this call (same token) from the next call. A
        # call whose reply was lost leaves its tasks held by this process, which
        # does not know them: the next claim runs it again, to learn them.
        with self._claim_lock:
            token, self._lost_claim = self._lost_claim, None
        if token is None:
            token = f"{self.prefix}claim:{secrets.token_urlsafe(12)}"
        try:
            with self._reaching():
                reply = self._lane.call(self._claim, [token], args)
        except StoreUnavailable as e:
            if e.doubtful:
                with self._claim_lock:
                    self._lost_claim = token
            raise
        claimed = [Claimed(_decode(reply[i]), bytes(reply[i + 1])) for i in range(0, len(reply), 2)]
        claimed.sort(key=lambda each: (each.task.created_at, each.task.id))
        return claimed

    def hand_back(self, worker: str, task_ids: Sequence[str]) -> int:
        if not task_ids:
            return 0
        with self._reaching():
            return int(
                self._lane.call(
                    self._hand_back, [self._worker_key(worker)], [self.prefix, worker, *task_ids]
                )
            )

    def set_progress(self, task_id: str, progress: Progress) -> bool:
        with self._reaching():
            reply = self._lane.call(
                self._set_progress,
                [self._task_key(task_id)],
                [json.dumps(progress.to_stored()), self._changed_channel],
            )
        return bool(reply)

    def cancel_requested(self, task_id: str) -> bool:
        with self._reaching():
            flag = self._client.hget(self._task_key(task_id), "cancel")
        return flag is not None

    def finish(
        self, task_id: str, state: TaskState, response: StoredResponse | None = None
    ) -> float | None:
        if not state.finished:
            # Finishing gives the record a TTL: an "active" one would then vanish.
            raise ValueError(f"finish() needs a final state, not {state.value!r}")
        now = time.time()
        args: list[str | int | bytes] = [*self._clock(now), state.value]
        if response is not None:
            headers = _encode_headers(response.headers)
            small = len(headers) + len(response.body) <= ANNOUNCED_RESPONSE_MAX
            args += ["1", response.status, headers, response.body, "1" if small else "0"]
        else:
            args.append("0")
        with self._reaching():
            # 0 when it had ended already, or when this is redis-py's retry of a
            # call whose reply was lost: then the caller reads how it ended.
            recorded = self._lane.call(self._finish, [self._task_key(task_id)], args)
        return now if recorded == 1 else None

    def create_finished(self, task: Task) -> float | None:
        if not task.state.finished:
            raise ValueError(f"create_finished() needs a final state, not {task.state.value!r}")
        now = time.time()
        owner_index = self._owner_key(task.owner)
        response = task.response
        announce: list[str | int | bytes] = ["0", "", "", ""]
        if response is not None:
            headers = _encode_headers(response.headers)
            if len(headers) + len(response.body) <= ANNOUNCED_RESPONSE_MAX:
                announce = ["1", response.status, headers, response.body]
        args = [
            *self._clock(now),
            task.id,
            repr(float(task.created_at)),
            task.state.value,
            *announce,
            *_encode(task),
            b"ix",
            owner_index.encode(),
        ]
        with self._reaching():
            # 0 when it had ended already: a retried call whose first attempt did
            # get through, whose finish time the caller reads if it needs it.
            recorded = self._lane.call(
                self._create_finished, [self._task_key(task.id), owner_index], args
            )
        return now if recorded == 1 else None

    def request_cancel(self, task_id: str) -> Task | None:
        now = time.time()
        with self._reaching():
            args = [*self._clock(now), self._queued_before(now)]
            reply = self._lane.call(self._request_cancel, [self._task_key(task_id)], args)
        if reply is None:
            return None
        view = self.retention_view(_decode(reply), now)
        return None if view is None or view.expired else view

    def delete(self, task_id: str) -> None:
        with self._reaching():
            self._lane.call(self._delete, [self._task_key(task_id)], self._clock(time.time()))

    def withdraw(self, task_id: str, *, running_under: str | None = None) -> bool:
        with self._reaching():
            args = [*self._clock(time.time()), running_under or ""]
            return bool(self._lane.call(self._withdraw, [self._task_key(task_id)], args))

    def list(
        self,
        *,
        owner: str | None,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Task]:
        """Newest first (by ``created_at``; ties by id, descending), after ``before``.

        A ``before`` id that is not (or no longer) in the owner's index gives an
        empty list, as the end of the listing would.
        """
        found: list[Task] = []
        if limit <= 0:
            return found
        now = time.time()
        owner_key = self._owner_key(owner)
        cursor, cursor_score = before or "", ""
        while len(found) < limit:
            args = [
                *self._clock(now),
                cursor,
                cursor_score,
                limit - len(found),
                LIST_SCAN,
                state.value if state is not None else "",
                self._queued_before(now),
            ]
            with self._reaching():
                reply = self._lane.call(self._list, [owner_key], args)
            for raw in reply[2:]:
                view = self.retention_view(_decode(raw), now)
                if view is not None and not view.expired:
                    found.append(view)
            if not reply[0]:
                break
            cursor, cursor_score = reply[0].decode(), reply[1].decode()
        return found[:limit]

    def renew_lease(self, worker: str) -> None:
        with self._reaching():
            self._client.set(self._lease_key(worker), repr(time.time()), px=_ms(self.lease_hold))

    def release_lease(self, worker: str) -> None:
        args = [*self._clock(time.time()), worker, RELEASE_BATCH]
        keys = [self._lease_key(worker), self._worker_key(worker)]
        with self._reaching():
            while self._lane.call(self._release, keys, args) >= RELEASE_BATCH:
                pass

    def put_blob(self, key: str, data: bytes, ttl: float) -> None:
        with self._reaching():
            self._client.set(f"{self.prefix}blob:{key}", data, px=_ms(ttl))

    def take_blob(self, key: str, *, call: str | None = None) -> bytes | None:
        name = f"{self.prefix}blob:{key}"
        with self._reaching():
            # One script, safe to run twice: a take whose reply was lost and that
            # runs again (the lane retries a dropped connection, or the caller
            # with the same ``call``) finds its copy.
            copy = f"{name}:taken:{call or secrets.token_hex(8)}"
            data = self._lane.call(self._take_blob, [name, copy], [TAKEN_BLOB_MS])
        return None if data is None else bytes(data)

    def purge_expired(self, now: float | None = None) -> int:
        """Drop expired results (keeping tombstones) and prune index entries of
        tasks Redis has forgotten, at most ``PURGE_BATCH * PURGE_MAX_BATCHES`` per call.

        The task hashes themselves expire by their Redis TTL.
        """
        now = time.time() if now is None else now
        args = [*self._clock(now), PURGE_BATCH, repr(float(self.tombstone_ttl))]
        changed = 0
        with self._reaching():
            for _ in range(PURGE_MAX_BATCHES):
                done, handled = self._lane.call(self._purge, [f"{self.prefix}expiry"], args)
                changed += int(done)
                if handled < PURGE_BATCH:
                    break
        return changed

    def close(self) -> None:
        """Disconnect the pool's connections; the next call connects again."""
        self._client.connection_pool.disconnect()

    # -- change notifications --------------------------------------------------------

    def listen(
        self,
        on_change: ChangeCallback,
        stop: StopSignal,
        *,
        changes: t.Callable[[], bool] | None = None,
    ) -> None:
        """Call ``on_change(task_id)`` for every task that ends, in any process.

        Every script that ends a task (finish, cancelling a queued task, a lapsed
        lease found by any read, a released lease) publishes the task's id on the
        channel ``<prefix>finished``; a finish with a response of at most
        :data:`ANNOUNCED_RESPONSE_MAX` bytes publishes the response with it, and
        the waiters get it as an :class:`Ending`, with no read of their own. This
        subscribes to the channel on a connection of its own, taken from the
        store's pool for as long as it listens. After each
        (re)subscription it calls ``on_change(None)``: what was published while
        it was not subscribed is lost. A connection that fails, or that answers
        no PING for ``3 * LISTEN_PING_INTERVAL`` seconds, is replaced, with
        backoff; nothing is raised.

        While ``changes()`` is true it also subscribes to ``<prefix>changed``
        (task ids of tasks created, started, given progress or flagged for
        cancelling), checked at least every ``LISTEN_TIMEOUT`` seconds, and
        reports them with ``finished=False``; it unsubscribes when that turns
        false, so that a process where nothing streams is not sent every
        progress write.
        """
        channel = f"{self.prefix}finished"
        changed = self._changed_channel.encode()
        failures = 0
        while not stop.is_set():
            pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
            following = False  # subscribed (or subscribing) to the changed channel
            try:
                pubsub.subscribe(channel)
                heard = pinged = time.monotonic()
                while not stop.is_set():
                    wanted = changes is not None and changes()
                    if wanted != following:
                        if wanted:
                            pubsub.subscribe(changed)
                        else:
                            pubsub.unsubscribe(changed)
                        following = wanted
                    message = pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    now = time.monotonic()
                    if message is not None:
                        heard = now
                        if message["type"] == "message":
                            if message["channel"] == changed:
                                on_change(message["data"].decode(), finished=False)
                            else:
                                _announce(on_change, message["data"])
                        elif message["type"] == "subscribe" and message["channel"] == changed:
                            # What changed before was not heard.
                            on_change(None, finished=False)
                        elif message["type"] == "subscribe":
                            if failures:
                                _logger.info("Listening to %s again", self.url)
                            failures = 0
                            on_change(None)  # what was published before was not seen
                    if now - heard > 3 * LISTEN_PING_INTERVAL:
                        raise RedisConnectionError("no answer to PING on the subscription")
                    if now - pinged >= LISTEN_PING_INTERVAL:
                        pubsub.ping()
                        pinged = now
            except Exception:
                # Not only RedisError: close() disconnects every connection of the
                # pool, this one too, possibly in the middle of a read.
                failures += 1
                if failures == 1:
                    _logger.warning("Cannot listen to %s", self.url, exc_info=True)
                stop.wait(min(2.0, 0.05 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    # -- operating (see TaskStore.list_all) ----------------------------------------

    def _owner_indexes(self) -> builtins.list[str]:
        """Every owner index, found with SCAN (never KEYS: it would block Redis)."""
        match = _glob_escape(self.prefix) + "owner:*"
        return sorted({key.decode() for key in self._client.scan_iter(match=match, count=1000)})

    def _entries(self, index: str, bound: tuple[float, str] | None) -> Iterator[tuple[float, str]]:
        """(created_at, id) of an owner index, newest first, after ``bound``,
        fetched ``LIST_SCAN`` at a time."""
        top = "+inf" if bound is None else repr(bound[0])
        offset = 0
        while True:
            with self._reaching():
                page: builtins.list[tuple[bytes, float]] = self._client.zrevrangebyscore(  # type: ignore[assignment]
                    index, top, "-inf", start=offset, num=LIST_SCAN, withscores=True
                )
            for member, score in page:
                task_id = member.decode()
                # Same created_at as the cursor: Redis orders those by id, descending.
                if bound is None or score < bound[0] or task_id < bound[1]:
                    yield score, task_id
            if len(page) < LIST_SCAN:
                return
            offset += len(page)

    def list_all(
        self,
        *,
        state: TaskState | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """Every owner's live tasks, newest first: the owner indexes merged, and
        the tasks read in batches, filtered by state in Redis."""
        found: builtins.list[Task] = []
        if limit <= 0:
            return found
        now = time.time()
        with self._reaching():
            bound = None
            if before is not None:
                created = self._client.hget(self._task_key(before), "created_at")
                if created is None:
                    return found
                bound = (float(created), before)
            indexes = self._owner_indexes()
        merged: Iterable[tuple[float, str]] = heapq.merge(
            *(self._entries(index, bound) for index in indexes), reverse=True
        )
        ids = (task_id for _, task_id in merged)
        while len(found) < limit:
            batch = [task_id for _, task_id in zip(range(LIST_SCAN), ids, strict=False)]
            if not batch:
                break
            args = [*self._clock(now), state.value if state else "", self._queued_before(now)]
            with self._reaching():
                reply = self._lane.call(self._read_live, [], [*args, *batch])
            for raw in reply:
                view = self.retention_view(_decode(raw), now)
                if view is not None and not view.expired:
                    found.append(view)
        return found[:limit]

    def stats(self) -> StoreStats:
        """The active tasks one by one (``OPERATE_BATCH`` per script, each checked
        for a lapsed lease as a read would), then one ``ZCOUNT`` per final state:
        the cost follows the number of queued and running tasks, not of those
        kept. Tasks recorded by a version of this store before the ``active`` and
        ``done:<state>`` sets existed are not counted."""
        counts = dict.fromkeys(TaskState, 0)
        oldest: float | None = None
        now = time.time()
        with self._reaching():
            first = 0
            while True:
                args = [*self._clock(now), first, OPERATE_BATCH, self._queued_before(now)]
                looked, left, queued, running, created = self._lane.call(
                    self._count_active, [f"{self.prefix}active"], args
                )
                counts[TaskState.QUEUED] += int(queued)
                counts[TaskState.RUNNING] += int(running)
                if created:
                    oldest = float(created) if oldest is None else min(oldest, float(created))
                if int(looked) < OPERATE_BATCH:
                    break
                # Those that ended here left the set: the next ranks moved down.
                first += int(looked) - int(left)
            pipe = self._client.pipeline(transaction=False)
            fresh_after = repr(now - self.result_ttl)
            for state in _ENDED_STATES:
                pipe.zcount(f"{self.prefix}done:{state.value}", fresh_after, "+inf")
            for state, count in zip(_ENDED_STATES, pipe.execute(), strict=True):
                counts[state] += int(count)
        return StoreStats(counts, oldest)

    def owner_stats(self, owner: str | None) -> StoreStats:
        """One script per ``OPERATE_BATCH`` entries of the owner's index: the
        counting happens in Redis, and only numbers come back."""
        counts = dict.fromkeys(TaskState, 0)
        oldest: float | None = None
        now = time.time()
        with self._reaching():
            first = 0
            while True:
                args = [*self._clock(now), first, OPERATE_BATCH, self._queued_before(now)]
                reply = self._lane.call(self._owner_stats, [self._owner_key(owner)], args)
                for state, count in zip(_OWNER_STAT_STATES, reply[1:7], strict=True):
                    counts[state] += int(count)
                if reply[7]:
                    created = float(reply[7])
                    oldest = created if oldest is None else min(oldest, created)
                if int(reply[0]) < OPERATE_BATCH:
                    break
                first += OPERATE_BATCH
        return StoreStats(counts, oldest)

    def purge_finished(self, *, older_than: float = 0.0, state: TaskState | None = None) -> int:
        """Through the ``expiry`` schedule, where every finished task has its
        entry (scored at most ``result_ttl + tombstone_ttl`` after its end):
        ``OPERATE_BATCH`` entries at a time, each task deleted by the same script
        as :meth:`delete`."""
        state = self._finished_state(state)
        now = time.time()
        cutoff = now - older_than
        schedule = f"{self.prefix}expiry"
        top = repr(cutoff + self.result_ttl + self.tombstone_ttl)
        deleted = kept = 0
        with self._reaching():
            while True:
                members: builtins.list[bytes] = self._client.zrangebyscore(  # type: ignore[assignment]
                    schedule, "-inf", top, start=kept, num=OPERATE_BATCH
                )
                ids = [_scheduled_id(member) for member in members]
                pipe = self._client.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hmget(self._task_key(task_id), "state", "finished_at")
                doomed = [
                    task_id
                    for task_id, (found, finished_at) in zip(ids, pipe.execute(), strict=True)
                    if found is not None
                    and finished_at is not None
                    and float(finished_at) < cutoff
                    and (state is None or found.decode() == state.value)
                ]
                pipe = self._client.pipeline(transaction=False)
                for task_id in doomed:
                    self._delete(keys=[self._task_key(task_id)], args=self._clock(now), client=pipe)
                pipe.execute()
                deleted += len(doomed)
                kept += len(members) - len(doomed)
                if len(members) < OPERATE_BATCH:
                    return deleted


_logger = logging.getLogger(__name__)


def _announce(on_change: ChangeCallback, data: bytes) -> None:
    """Pass on a message of the ``finished`` channel: a task id, or a task id,
    state, finish time, status, headers and body joined by NUL characters (the
    body, last, may hold more of them)."""
    if b"\0" not in data:
        on_change(data.decode())
        return
    try:
        task_id, state, finished_at, status, headers, body = data.split(b"\0", 5)
        ending = Ending(
            TaskState(state.decode()),
            float(finished_at),
            StoredResponse(int(status), _decode_headers(headers), body),
        )
    except ValueError:
        # Not ours to understand: treat it as news of some task.
        on_change(None)
        return
    on_change(task_id.decode(), ending)


def _decode_headers(data: bytes) -> builtins.list[tuple[str, str]]:
    return [(str(name), str(value)) for name, value in json.loads(data)]


def _encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    return json.dumps([[name, value] for name, value in headers])


def _encode(task: Task) -> builtins.list[bytes]:
    """The hash fields of a task, as alternating names and values."""
    fields: dict[str, str | bytes] = {
        "id": task.id,
        "state": task.state.value,
        "created_at": repr(float(task.created_at)),
    }
    if task.started_at is not None:
        fields["started_at"] = repr(float(task.started_at))
    if task.finished_at is not None:
        fields["finished_at"] = repr(float(task.finished_at))
    if task.progress is not None:
        fields["progress"] = json.dumps(task.progress.to_stored())
    for name in ("owner", "idempotency_key", "fingerprint", "worker", "endpoint", "method", "path"):
        value = getattr(task, name)
        if value is not None:
            fields[name] = value
    if task.cancel_requested:
        fields["cancel"] = "1"
    if task.rerun:
        fields["rerun"] = "1"
    if task.response is not None:
        fields["status"] = str(task.response.status)
        fields["headers"] = _encode_headers(task.response.headers)
        fields["body"] = task.response.body
    if task.expired:
        fields["expired"] = "1"
    flat: builtins.list[bytes] = []
    for name, value in fields.items():
        flat.append(name.encode())
        flat.append(value.encode() if isinstance(value, str) else value)
    return flat


def _decode(flat: Sequence[bytes]) -> Task:
    """A task from HGETALL's alternating names and values."""
    h = dict(zip(flat[::2], flat[1::2], strict=True))

    def text(name: bytes) -> str | None:
        value = h.get(name)
        return None if value is None else value.decode()

    def number(name: bytes) -> float | None:
        value = h.get(name)
        return None if value is None else float(value)

    progress = h.get(b"progress")
    response = None
    if b"status" in h:
        headers = _decode_headers(h[b"headers"])
        response = StoredResponse(int(h[b"status"]), headers, h[b"body"])
    created_at = number(b"created_at")
    return Task(
        id=h[b"id"].decode(),
        state=TaskState(h[b"state"].decode()),
        created_at=created_at if created_at is not None else 0.0,
        started_at=number(b"started_at"),
        finished_at=number(b"finished_at"),
        progress=Progress.from_dict(json.loads(progress)) if progress is not None else None,
        owner=text(b"owner"),
        idempotency_key=text(b"idempotency_key"),
        fingerprint=text(b"fingerprint"),
        cancel_requested=b"cancel" in h,
        worker=text(b"worker"),
        response=response,
        expired=b"expired" in h,
        rerun=b"rerun" in h,
        endpoint=text(b"endpoint"),
        method=text(b"method"),
        path=text(b"path"),
    )


def _scheduled_id(member: bytes) -> str:
    """The task id in an ``expiry`` entry: a kind letter, the id's length, ``:``,
    the id, then the owner index."""
    text = member.decode()
    colon = text.index(":", 1)
    size = int(text[1:colon])
    return text[colon + 1 : colon + 1 + size]
