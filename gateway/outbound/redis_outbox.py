"""The scale-out outbox: the durable outbox on Redis, shared by every gateway replica.

:class:`RedisOutbox` has the interface and the semantics of :class:`gateway.outbound.outbox.Outbox`
(same methods, arguments, :class:`Row` and :class:`Customer` results): any replica accepts a send,
any replica answers ``GET /v1/messages/{id}``, status webhooks processed anywhere move the record,
and the service window / consent state is one per customer for the whole cluster.
:class:`AccountLease` lets one replica at a time run the send loop of a (channel, account), so
the local rate limiter of that replica is the account's limiter cluster-wide.

Keys, under the journal's prefix ``p`` (default ``gw``; ``?prefix=NAME`` on the URL):

- ``{p}:out:rec:{id}`` — hash, one record: the :class:`Row` fields (absent ones are None)
  but ``request`` and ``error``, ``owner``, the replica that claimed it last, and
  ``superseded``, the provider ids (one per line) of the sends a failed status webhook made
  it replace (``requeue``), whose late statuses move nothing;
  ``{p}:out:req:{id}`` / ``{p}:out:err:{id}`` — its request and its error (JSON), strings of
  their own so that the hash of small fields stays compact (a listpack).
- ``{p}:out:idem:{idempotency key}`` — string → record id (one record per key, ever: set in the
  same script that creates the record).
- ``{p}:out:pmid:{provider message id}`` — string → record id, for status webhooks naming
  Meta's wamid / mid.
- ``{p}:out:due:{channel}:{account}`` — sorted set, the account's ``queued`` and ``uncertain``
  records scored by ``next_at``: what ``claim_due`` takes and ``next_due`` reads.
- ``{p}:out:to:{channel}:{recipient}`` — sorted set, the recipient's records (for
  ``erase_contact``), scored by when they expire (far future while not settled).
- ``{p}:out:sending:{owner}`` — set, records a replica claimed and has not settled;
  ``{p}:out:owners`` — set of replicas that may have some; ``{p}:out:alive:{owner}`` — the
  replica's heartbeat (``SET PX``, renewed every third of ``alive_ms``). Records of a replica
  whose heartbeat expired become ``uncertain``, as a crash leaves them in the SQLite outbox.
- ``{p}:out:claim:{token}`` — hash, what one ``claim_due`` call handed out (kept 10 minutes), so
  that a call retried after its reply was lost hands out the same records instead of stranding
  them in ``sending``.
- ``{p}:out:customer:{channel}:{contact}`` — hash, per account ``at:{account}`` (latest inbound
  message time), ``mid:{account}`` (its message id), ``opt:{account}`` (``1`` opted out).
- ``{p}:out:wake`` — pub/sub channel: ``{channel}\\n{account}`` when a record is added, so the
  replica sending for that account starts at once (see :meth:`RedisOutbox.watch`).
- ``{p}:lease:outbound:{channel}:{account}`` — :class:`AccountLease` (``SET NX PX``, renewed).

Retention: a record is *settled* once it will not be sent again (``sent``, ``delivered``,
``read``, ``played``, ``failed``); from then on its keys (record, request, error, idempotency
key, provider id index) expire ``retention_seconds`` (default 30 days) after its latest change.
Records still queued, sending or uncertain never expire. Customer state (window, opt-out) does
not expire: only ``erase_contact`` removes it. An idempotency key lives as long as its record.

Every script is atomic (Redis never interleaves a script with other commands): two replicas adding
the same idempotency key get one record; a due record is claimed by exactly one caller; a status
only moves a record forward (:data:`RANK`). Durability is Redis's own (``appendfsync always``:
an acknowledged ``add`` is on disk), see ``docs/redis.md``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from gateway import logging as gwlog
from gateway.aio import wait_event
from gateway.journal.redis import (
    _ACQUIRE_LEASE,
    _RELEASE_LEASE,
    OUTAGE_BACKOFF_MAX,
    _str,
    cancellable,
    connect,
    redis_ping,
    retry_through_outages,
    split_url,
    unavailable,
)
from gateway.outbound.outbox import RANK, Customer, Row

log = gwlog.get("gateway.outbound.redis")

T = TypeVar("T")
RETENTION_SECONDS = 30 * 24 * 3600  # settled records are kept this long after their last change
ALIVE_MS = 15_000  # a replica whose heartbeat is this old is gone: its sends become uncertain
LEASE_MS = 10_000  # an account's sending lease; renewed every third of it
CLAIM_TOKEN_MS = 600_000  # how long a claim_due call can be retried after a lost reply
_UNSETTLED = "9000000000000000"  # the `to` index score of records that do not expire (yet)

_COMMON = "local RANK = {" + ", ".join(f"{s} = {r}" for s, r in RANK.items()) + "}\n" + """
local function rank(state) return RANK[state] or 0 end
-- A record's fields, with its request and error (kept as strings of their own, so that the hash
-- of small fields stays compact) appended; {} when there is no such record.
local function record(p, id)
  local f = redis.call('HGETALL', p .. ':out:rec:' .. id)
  if #f == 0 then return f end
  f[#f + 1] = 'request'
  f[#f + 1] = redis.call('GET', p .. ':out:req:' .. id) or ''
  local err = redis.call('GET', p .. ':out:err:' .. id)
  if err then
    f[#f + 1] = 'error'
    f[#f + 1] = err
  end
  return f
end
-- Whether `pmid` is one of the provider ids in `list` (one per line; nil: none).
local function superseded(list, pmid)
  if not list or pmid == '' then return false end
  return string.find('\\n' .. list .. '\\n', '\\n' .. pmid .. '\\n', 1, true) ~= nil
end
local function open_state(state)
  return state == 'queued' or state == 'sending' or state == 'uncertain'
end
-- The record will not be sent again: out of the queue; it and its idempotency key and provider id
-- index entry expire after the retention period (renewed by every later change).
local function settle(p, id, ttl_ms, expire_at_ms)
  local rec = p .. ':out:rec:' .. id
  local f = redis.call('HMGET', rec, 'channel', 'account_id', 'recipient', 'idempotency_key',
                       'provider_message_id', 'owner')
  redis.call('ZREM', p .. ':out:due:' .. f[1] .. ':' .. f[2], id)
  if f[6] then redis.call('SREM', p .. ':out:sending:' .. f[6], id) end
  redis.call('PEXPIRE', rec, ttl_ms)
  redis.call('PEXPIRE', p .. ':out:req:' .. id, ttl_ms)
  redis.call('PEXPIRE', p .. ':out:err:' .. id, ttl_ms)
  if f[4] then redis.call('PEXPIRE', p .. ':out:idem:' .. f[4], ttl_ms) end
  if f[5] then redis.call('SET', p .. ':out:pmid:' .. f[5], id, 'PX', ttl_ms) end
  local to = p .. ':out:to:' .. f[1] .. ':' .. f[3]
  redis.call('ZADD', to, expire_at_ms, id)
  local top = redis.call('ZRANGE', to, -1, -1, 'WITHSCORES')
  if tonumber(top[2]) < 9e15 then redis.call('PEXPIREAT', to, top[2]) end
end
-- Records a replica claimed and never settled become uncertain (due at `at`).
local function orphan(p, owner, at)
  local set = p .. ':out:sending:' .. owner
  local n = 0
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local rec = p .. ':out:rec:' .. id
    local f = redis.call('HMGET', rec, 'state', 'owner', 'channel', 'account_id')
    if f[1] == 'sending' and f[2] == owner then
      redis.call('HSET', rec, 'state', 'uncertain', 'next_at', at)
      redis.call('ZADD', p .. ':out:due:' .. f[3] .. ':' .. f[4], at, id)
      n = n + 1
    end
  end
  redis.call('DEL', set)
  redis.call('SREM', p .. ':out:owners', owner)
  return n
end
"""

# ARGV: prefix, id, idempotency key ('' none), channel, account, recipient, type, request, now,
# now_ms. Returns {1 new | 0 existing, the record's fields}.
_ADD = _COMMON + """
local p, id, key = ARGV[1], ARGV[2], ARGV[3]
local rec = p .. ':out:rec:' .. id
if redis.call('EXISTS', rec) == 1 then return {1, record(p, id)} end  -- a retry
if key ~= '' then
  local idem = p .. ':out:idem:' .. key
  local existing = redis.call('GET', idem)
  if existing then
    local fields = record(p, existing)
    if #fields > 0 then return {0, fields} end
  end
  redis.call('SET', idem, id)
end
local channel, account, recipient, now = ARGV[4], ARGV[5], ARGV[6], ARGV[9]
redis.call('HSET', rec, 'id', id, 'channel', channel, 'account_id', account,
           'recipient', recipient, 'type', ARGV[7], 'state', 'queued',
           'attempts', 0, 'next_at', now, 'created_at', now, 'updated_at', now)
redis.call('SET', p .. ':out:req:' .. id, ARGV[8])
if key ~= '' then redis.call('HSET', rec, 'idempotency_key', key) end
redis.call('ZADD', p .. ':out:due:' .. channel .. ':' .. account, now, id)
local to = p .. ':out:to:' .. channel .. ':' .. recipient
redis.call('ZREMRANGEBYSCORE', to, '-inf', '(' .. ARGV[10])  -- records that expired meanwhile
redis.call('ZADD', to, '""" + _UNSETTLED + """', id)
redis.call('PERSIST', to)
redis.call('PUBLISH', p .. ':out:wake', channel .. '\\n' .. account)
return {1, record(p, id)}
"""

# ARGV: prefix, channel, account, now, limit, owner, token, token ttl ms.
# Returns, per record handed out: its fields (now `sending`), 'state attempts updated_at' before.
_CLAIM = _COMMON + """
local p, now, owner = ARGV[1], ARGV[4], ARGV[6]
local token = p .. ':out:claim:' .. ARGV[7]
local out = {}
local before = redis.call('HGETALL', token)
if #before > 0 then  -- this very call ran and its reply was lost: the same records again
  for i = 1, #before, 2 do
    local rec = p .. ':out:rec:' .. before[i]
    local f = redis.call('HMGET', rec, 'state', 'owner')
    if f[1] == 'sending' and f[2] == owner then
      out[#out + 1] = record(p, before[i])
      out[#out + 1] = before[i + 1]
    end
  end
  return out
end
local due = p .. ':out:due:' .. ARGV[2] .. ':' .. ARGV[3]
local mine = p .. ':out:sending:' .. owner
local left = tonumber(ARGV[5])
while left > 0 do
  local ids = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'LIMIT', 0, left)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    redis.call('ZREM', due, id)  -- every id read is removed: the loop ends
    local rec = p .. ':out:rec:' .. id
    local f = redis.call('HMGET', rec, 'state', 'attempts', 'updated_at')
    if f[1] == 'queued' or f[1] == 'uncertain' then
      local snapshot = f[1] .. ' ' .. f[2] .. ' ' .. f[3]
      redis.call('HSET', rec, 'state', 'sending', 'updated_at', now, 'owner', owner)
      redis.call('HINCRBY', rec, 'attempts', 1)
      redis.call('SADD', mine, id)
      redis.call('HSET', token, id, snapshot)
      out[#out + 1] = record(p, id)
      out[#out + 1] = snapshot
      left = left - 1
    end
  end
end
if #out > 0 then
  redis.call('PEXPIRE', token, ARGV[8])
  redis.call('SADD', p .. ':out:owners', owner)
end
return out
"""

# ARGV: prefix, id, provider message id ('' none), now, ttl ms, expire at ms.
_SENT = _COMMON + """
local p, id, pmid, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'sent_at')
if not f[1] then return 0 end
if open_state(f[1]) then redis.call('HSET', rec, 'state', 'sent') end
if not f[2] and pmid ~= '' then redis.call('HSET', rec, 'provider_message_id', pmid) end
if not f[3] then redis.call('HSET', rec, 'sent_at', now) end
redis.call('HSET', rec, 'updated_at', now)
redis.call('DEL', p .. ':out:err:' .. id)
settle(p, id, ARGV[5], ARGV[6])
return 1
"""

# ARGV: prefix, id, error, now, ttl ms, expire at ms, attempts ('' unchanged).
_FAILED = _COMMON + """
local p, id = ARGV[1], ARGV[2]
local rec = p .. ':out:rec:' .. id
if redis.call('EXISTS', rec) == 0 then return 0 end
redis.call('HSET', rec, 'state', 'failed', 'updated_at', ARGV[4])
if ARGV[7] ~= '' then redis.call('HSET', rec, 'attempts', ARGV[7]) end
redis.call('SET', p .. ':out:err:' .. id, ARGV[3])
settle(p, id, ARGV[5], ARGV[6])
return 1
"""

# ARGV: prefix, id, at, error ('' none), now, '1' to give back the attempt the claim counted.
# Only a record still in the queue (queued, sending, uncertain) goes back to `queued`: a status
# that made it sent/delivered/read/failed meanwhile is never undone.
_RETRY = _COMMON + """
local p, id, at = ARGV[1], ARGV[2], ARGV[3]
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'owner', 'channel', 'account_id')
if not open_state(f[1]) then return 0 end
redis.call('HSET', rec, 'state', 'queued', 'next_at', at, 'updated_at', ARGV[5])
if ARGV[4] ~= '' then redis.call('SET', p .. ':out:err:' .. id, ARGV[4])
else redis.call('DEL', p .. ':out:err:' .. id) end
if ARGV[6] == '1' and f[1] == 'sending' then redis.call('HINCRBY', rec, 'attempts', -1) end
if f[2] then redis.call('SREM', p .. ':out:sending:' .. f[2], id) end
redis.call('ZADD', p .. ':out:due:' .. f[3] .. ':' .. f[4], at, id)
return 1
"""

# ARGV: prefix, record id ('' = by provider id), provider message id ('' none), status,
# error ('' none), now, ttl ms, expire at ms. Moves the record forward only, and never by a
# status of a send it superseded (see _REQUEUE); returns its fields if it moved, {} if not.
_STATUS = _COMMON + """
local p, id, pmid, status, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if id == '' then
  if pmid == '' then return {} end
  id = redis.call('GET', p .. ':out:pmid:' .. pmid)
  if not id then return {} end
end
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'sent_at', 'superseded')
if not f[1] then return {} end
if ARGV[2] == '' and f[2] ~= pmid then return {} end
if rank(f[1]) >= rank(status) then return {} end
if superseded(f[4], pmid) then return {} end
redis.call('HSET', rec, 'state', status, 'updated_at', now)
if ARGV[5] ~= '' then redis.call('SET', p .. ':out:err:' .. id, ARGV[5]) end
if not f[2] and pmid ~= '' then redis.call('HSET', rec, 'provider_message_id', pmid) end
if not f[3] then redis.call('HSET', rec, 'sent_at', now) end
settle(p, id, ARGV[7], ARGV[8])
return record(p, id)
"""

# ARGV: prefix, id ('' = by provider id), provider message id, at, error, now, max attempts,
# ttl ms, expire at ms, error when it fails. A `sent` record with that provider id goes back to
# the queue (due at `at`, its provider id forgotten and added to `superseded`, so that a late
# status of that send moves nothing) or, after max attempts, fails. Returns its fields, or {}.
_REQUEUE = _COMMON + """
local p, id, pmid, at, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if id == '' then
  id = redis.call('GET', p .. ':out:pmid:' .. pmid)
  if not id then return {} end
end
local rec = p .. ':out:rec:' .. id
local f = redis.call('HMGET', rec, 'state', 'provider_message_id', 'attempts', 'channel',
                     'account_id', 'recipient', 'idempotency_key', 'superseded')
if f[1] ~= 'sent' or f[2] ~= pmid then return {} end
if tonumber(f[3]) >= tonumber(ARGV[7]) then
  redis.call('SET', p .. ':out:err:' .. id, ARGV[10])
  redis.call('HSET', rec, 'state', 'failed', 'updated_at', now)
  settle(p, id, ARGV[8], ARGV[9])
  return record(p, id)
end
redis.call('SET', p .. ':out:err:' .. id, ARGV[5])
redis.call('HSET', rec, 'state', 'queued', 'next_at', at, 'updated_at', now)
redis.call('HDEL', rec, 'provider_message_id', 'sent_at')
redis.call('HSET', rec, 'superseded', f[8] and (f[8] .. '\\n' .. pmid) or pmid)
redis.call('PERSIST', rec)
redis.call('PERSIST', p .. ':out:req:' .. id)
if f[7] then redis.call('PERSIST', p .. ':out:idem:' .. f[7]) end
if redis.call('GET', p .. ':out:pmid:' .. pmid) == id then
  redis.call('DEL', p .. ':out:pmid:' .. pmid)
end
redis.call('ZADD', p .. ':out:due:' .. f[4] .. ':' .. f[5], at, id)
local to = p .. ':out:to:' .. f[4] .. ':' .. f[6]
redis.call('ZADD', to, '""" + _UNSETTLED + """', id)
redis.call('PERSIST', to)
redis.call('PUBLISH', p .. ':out:wake', f[4] .. '\\n' .. f[5])
return record(p, id)
"""

# ARGV: prefix, then channel and account pairs. Records waiting to be sent: due (queued,
# uncertain) on those accounts, and claimed but not settled (sending) by any replica.
_WAITING = """
local p, n = ARGV[1], 0
for i = 2, #ARGV, 2 do
  n = n + redis.call('ZCARD', p .. ':out:due:' .. ARGV[i] .. ':' .. ARGV[i + 1])
end
for _, owner in ipairs(redis.call('SMEMBERS', p .. ':out:owners')) do
  n = n + redis.call('SCARD', p .. ':out:sending:' .. owner)
end
return n
"""

# ARGV: prefix, channel, account, contact, opted out ('1', '0'), said at. Consent said earlier
# than what is stored changes nothing (the latest word wins, by its time).
_CONSENT = """
local p, account, at = ARGV[1], ARGV[3], ARGV[6]
local key = p .. ':out:customer:' .. ARGV[2] .. ':' .. ARGV[4]
local said = redis.call('HGET', key, 'optat:' .. account)
if said and tonumber(at) < tonumber(said) then return 0 end
redis.call('HSET', key, 'opt:' .. account, ARGV[5], 'optat:' .. account, at)
return 1
"""

# ARGV: prefix, channel, account, contact, at, message id, '1' if there is a message id,
# opted out ('' unknown, '1', '0'). Consent is kept with its time (`optat:`): an older word does
# not replace a newer one.
_INBOUND = """
local p, account, at = ARGV[1], ARGV[3], ARGV[5]
local key = p .. ':out:customer:' .. ARGV[2] .. ':' .. ARGV[4]
local old = redis.call('HGET', key, 'at:' .. account)
local said = redis.call('HGET', key, 'optat:' .. account)
if ARGV[8] ~= '' then
  if not said or tonumber(at) >= tonumber(said) then
    redis.call('HSET', key, 'opt:' .. account, ARGV[8], 'optat:' .. account, at)
  end
elseif redis.call('HEXISTS', key, 'opt:' .. account) == 0 then
  redis.call('HSET', key, 'opt:' .. account, '0')
end
if not old or tonumber(at) >= tonumber(old) then
  redis.call('HSET', key, 'at:' .. account, at)
  if ARGV[7] == '1' then redis.call('HSET', key, 'mid:' .. account, ARGV[6])
  else redis.call('HDEL', key, 'mid:' .. account) end
end
return 1
"""

# ARGV: prefix, channel, contact. Returns {records deleted, customer rows deleted}.
_ERASE = """
local p, channel, contact = ARGV[1], ARGV[2], ARGV[3]
local to = p .. ':out:to:' .. channel .. ':' .. contact
local sends = 0
for _, id in ipairs(redis.call('ZRANGE', to, 0, -1)) do
  local rec = p .. ':out:rec:' .. id
  local f = redis.call('HMGET', rec, 'channel', 'recipient', 'account_id', 'idempotency_key',
                       'provider_message_id', 'owner')
  if f[1] == channel and f[2] == contact then
    redis.call('ZREM', p .. ':out:due:' .. channel .. ':' .. f[3], id)
    if f[6] then redis.call('SREM', p .. ':out:sending:' .. f[6], id) end
    local idem = f[4] and (p .. ':out:idem:' .. f[4])
    if idem and redis.call('GET', idem) == id then redis.call('DEL', idem) end
    local pmid = f[5] and (p .. ':out:pmid:' .. f[5])
    if pmid and redis.call('GET', pmid) == id then redis.call('DEL', pmid) end
    redis.call('DEL', rec, p .. ':out:req:' .. id, p .. ':out:err:' .. id)
    sends = sends + 1
  end
end
redis.call('DEL', to)
local customer = p .. ':out:customer:' .. channel .. ':' .. contact
local known = 0
for _, field in ipairs(redis.call('HKEYS', customer)) do
  if string.sub(field, 1, 3) == 'at:' then known = known + 1 end
end
redis.call('DEL', customer)
return {sends, known}
"""

# ARGV: prefix, id. One record, read consistently.
_GET = _COMMON + """
return record(ARGV[1], ARGV[2])
"""

# ARGV: prefix, owner, alive ms, now, reconcile at. The heartbeat: records of replicas whose
# heartbeat expired (this one's too, if it lapsed) become uncertain; then this one is alive.
_BEAT = _COMMON + """
local p, me = ARGV[1], ARGV[2]
local n = 0
for _, owner in ipairs(redis.call('SMEMBERS', p .. ':out:owners')) do
  if redis.call('EXISTS', p .. ':out:alive:' .. owner) == 0 then
    n = n + orphan(p, owner, ARGV[5])
  end
end
redis.call('SET', p .. ':out:alive:' .. me, ARGV[4], 'PX', ARGV[3])
redis.call('SADD', p .. ':out:owners', me)
return n
"""

# ARGV: prefix, owner, reconcile at. A graceful stop: what is still sending becomes uncertain.
_RETIRE = _COMMON + """
local n = orphan(ARGV[1], ARGV[2], ARGV[3])
redis.call('DEL', ARGV[1] .. ':out:alive:' .. ARGV[2])
return n
"""


def _pairs(flat: list) -> dict[bytes, bytes]:
    return {flat[k]: flat[k + 1] for k in range(0, len(flat), 2)}


def _opt_str(value: bytes | None) -> str | None:
    return None if value is None else _str(value)


def _opt_float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _row(f: dict[bytes, bytes], before: bytes | None = None) -> Row:
    """A record hash as the SQLite outbox's :class:`Row`; ``before`` is the claim's snapshot
    (``state attempts updated_at`` before the claim), which is what ``claim_due`` returns."""
    state, attempts, updated_at = _str(f[b"state"]), int(f[b"attempts"]), float(f[b"updated_at"])
    if before is not None:
        old_state, old_attempts, old_updated = _str(before).split(" ")
        state, attempts, updated_at = old_state, int(old_attempts), float(old_updated)
    return Row(_str(f[b"id"]), _opt_str(f.get(b"idempotency_key")), _str(f[b"channel"]),
               _str(f[b"account_id"]), _str(f[b"recipient"]), _str(f[b"type"]),
               bytes(f[b"request"]), state, attempts, float(f[b"next_at"]),
               _opt_str(f.get(b"provider_message_id")),
               None if f.get(b"error") is None else bytes(f[b"error"]),
               float(f[b"created_at"]), updated_at, _opt_float(f.get(b"sent_at")))


class RedisOutbox:
    """The :class:`gateway.outbound.outbox.Outbox` on Redis, shared by several gateway replicas.

    Calls made by the send loop and the outbox sink (``claim_due``, ``next_due``, ``sent``,
    ``failed``, ``retry_at``, ``status``, ``inbound``) wait while Redis is unreachable, so the
    workers pause instead of dying; calls made for an HTTP request (``add``, ``get``,
    ``customer``, ``erase_contact``) raise, and the request answers 500.
    """

    shared = True  # other replicas read and write the same records

    def __init__(self, url: str, *, prefix: str | None = None,
                 retention_seconds: float = RETENTION_SECONDS, alive_ms: int = ALIVE_MS,
                 owner: str | None = None) -> None:
        if retention_seconds < 1:
            raise ValueError("retention_seconds must be at least 1")
        self.url, url_prefix = split_url(url)
        self.p = prefix or url_prefix or "gw"
        self.retention_ms = int(retention_seconds * 1000)
        self.alive_ms = int(alive_ms)
        self.owner = owner or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reconcile_seconds = 60.0
        self.redis = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.k_wake = f"{self.p}:out:wake"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, reconcile_seconds: float) -> int:
        """Connect; turn records left in ``sending`` by replicas that are gone (their heartbeat
        expired) into ``uncertain``, due in ``reconcile_seconds``. Returns how many.

        A replica that dies while others run is noticed by their heartbeats within ``alive_ms``
        (plus a third of it); the same reconciliation then applies.
        """
        self.reconcile_seconds = reconcile_seconds
        self._closing = False
        self.redis = connect(self.url)
        register = self.redis.register_script
        self._add = register(_ADD)
        self._get = register(_GET)
        self._claim = register(_CLAIM)
        self._sent = register(_SENT)
        self._failed = register(_FAILED)
        self._retry = register(_RETRY)
        self._status = register(_STATUS)
        self._requeue = register(_REQUEUE)
        self._waiting = register(_WAITING)
        self._consent = register(_CONSENT)
        self._inbound = register(_INBOUND)
        self._erase = register(_ERASE)
        self._beat = register(_BEAT)
        self._retire = register(_RETIRE)
        self._acquire = register(_ACQUIRE_LEASE)
        self._release = register(_RELEASE_LEASE)
        try:
            found = await self.heartbeat()
        except BaseException:
            await self.redis.aclose()
            self.redis = None
            raise
        self._tasks.append(asyncio.create_task(self._keep_alive(), name="outbox:heartbeat"))
        return found

    async def close(self) -> None:
        """Stop the heartbeat; records this replica still has in ``sending`` (sends that did not
        finish in time) become ``uncertain`` at once, as a restart would make them."""
        if self.redis is None:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._tasks = []
        try:
            at = repr(time.time() + self.reconcile_seconds)
            left = int(await self._retire(args=[self.p, self.owner, at]))
            if left:
                log.warning("outbox_uncertain_at_stop", count=left,
                            reconcile_seconds=self.reconcile_seconds)
        except Exception as exc:  # noqa: BLE001 - best effort: the heartbeat expires by itself
            log.warning("redis_unavailable", operation="outbox_close", error=repr(exc))
        await self.redis.aclose()
        self.redis = None

    async def ping(self) -> bool:
        """Whether Redis answers (within 2 s)."""
        return await redis_ping(self.redis)

    async def heartbeat(self) -> int:
        """Renew this replica's heartbeat; reconcile the records of replicas whose heartbeat
        expired. Returns how many records became ``uncertain``. Run every third of
        ``alive_ms`` by a background task between :meth:`open` and :meth:`close`."""
        at = repr(time.time() + self.reconcile_seconds)
        return int(await self._beat(args=[self.p, self.owner, self.alive_ms,
                                          repr(time.time()), at]))

    async def _keep_alive(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.alive_ms / 3000)
            try:
                found = await cancellable(self.heartbeat())
            except unavailable() as exc:
                log.warning("redis_unavailable", operation="outbox_heartbeat", error=repr(exc))
                continue
            except Exception:  # noqa: BLE001 - keep beating; a bug is logged, not fatal
                log.exception("outbox_heartbeat_failed")
                continue
            if found:
                log.warning("outbox_uncertain_after_replica_loss", count=found,
                            reconcile_seconds=self.reconcile_seconds)

    def watch(self, wake: Callable[[str, str], None]) -> None:
        """Call ``wake(channel, account)`` whenever any replica adds a record (Redis pub/sub on
        ``{p}:out:wake``), so the replica holding that account's lease sends it at once. Call
        after :meth:`open`; stops at :meth:`close`. Resubscribes after an outage."""
        self._tasks.append(asyncio.create_task(self._listen(wake), name="outbox:wake"))

    async def _listen(self, wake: Callable[[str, str], None]) -> None:
        delay = 0.1
        while not self._closing:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await cancellable(pubsub.subscribe(self.k_wake))
                delay = 0.1
                while not self._closing:
                    message = await cancellable(pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=1.0))
                    if message and message.get("type") == "message":
                        channel, _, account = _str(message["data"]).partition("\n")
                        wake(channel, account)
            except unavailable() as exc:
                log.warning("redis_unavailable", operation="outbox_watch", error=repr(exc),
                            retry_in=delay)
            except Exception:  # noqa: BLE001 - keep listening; a bug is logged, not fatal
                log.exception("outbox_watch_failed")
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001, S110 - the connection is gone anyway
                    pass
            await asyncio.sleep(delay)
            delay = min(OUTAGE_BACKOFF_MAX, delay * 2)

    async def _outage(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, waiting out Redis outages (as the journal does)."""
        return await retry_through_outages(log, what, call)

    def _expiry(self) -> tuple[int, int]:
        """(ttl ms, expire-at ms) for a record settled now."""
        return self.retention_ms, int(time.time() * 1000) + self.retention_ms

    # -- the Outbox interface ----------------------------------------------------------------

    async def add(self, channel: str, account_id: str, recipient: str, kind: str,
                  request: bytes, idempotency_key: str | None) -> tuple[Row, bool]:
        """Store a new send (durably); with a known idempotency key, return the existing one.
        The bool says whether the record is new."""
        now = time.time()
        new_id = "msg_" + uuid.uuid4().hex
        new, fields = await self._add(args=[
            self.p, new_id, idempotency_key or "", channel, account_id, recipient, kind, request,
            repr(now), int(now * 1000)])
        return _row(_pairs(fields)), bool(new)

    async def get(self, record_id: str) -> Row | None:
        flat = await self._get(args=[self.p, record_id])
        return _row(_pairs(flat)) if flat else None

    async def claim_due(self, channel: str, account_id: str, limit: int) -> list[Row]:
        """Due records of one account, oldest first, moved to ``sending`` (each handed to exactly
        one caller, whichever replica asks). Like the SQLite outbox, the rows show the records as
        they were before the claim."""
        if limit < 1:
            return []
        token = uuid.uuid4().hex  # the same for every retry of this call

        async def claim() -> list:
            return await self._claim(args=[self.p, channel, account_id, repr(time.time()), limit,
                                           self.owner, token, CLAIM_TOKEN_MS])

        flat = await self._outage("claim_due", claim)
        rows = [_row(_pairs(flat[k]), flat[k + 1]) for k in range(0, len(flat), 2)]
        rows.sort(key=lambda r: (r.next_at, r.created_at))
        return rows

    async def next_due(self, channel: str, account_id: str) -> float | None:
        """When the account's next record falls due (epoch s), or None."""
        found = await self._outage("next_due", lambda: self.redis.zrange(
            f"{self.p}:out:due:{channel}:{account_id}", 0, 0, withscores=True))
        return float(found[0][1]) if found else None

    async def sent(self, record_id: str, provider_message_id: str | None) -> None:
        ttl, until = self._expiry()
        now = repr(time.time())
        await self._outage("sent", lambda: self._sent(args=[
            self.p, record_id, provider_message_id or "", now, ttl, until]))

    async def failed(self, record_id: str, error: dict[str, Any],
                     attempts: int | None = None) -> None:
        """Fail the record; ``attempts`` as :meth:`Outbox.failed`."""
        ttl, until = self._expiry()
        now = repr(time.time())
        await self._outage("failed", lambda: self._failed(args=[
            self.p, record_id, msgspec.json.encode(error), now, ttl, until,
            "" if attempts is None else int(attempts)]))

    async def retry_at(self, record_id: str, at: float, error: dict[str, Any] | None,
                       count_attempt: bool = True) -> None:
        now = repr(time.time())
        await self._outage("retry_at", lambda: self._retry(args=[
            self.p, record_id, repr(float(at)), msgspec.json.encode(error) if error else "", now,
            "0" if count_attempt else "1"]))

    async def status(self, *, provider_message_id: str | None, record_id: str | None, status: str,
                     error: dict[str, Any] | None) -> Row | None:
        """A delivery status from a webhook: move the record forward (never backwards).
        Returns the record as moved, or None when it did not move."""
        if status not in RANK:
            return None
        ttl, until = self._expiry()
        now = repr(time.time())
        flat = await self._outage("status", lambda: self._status(args=[
            self.p, record_id or "", provider_message_id or "", status,
            msgspec.json.encode(error) if error else "", now, ttl, until]))
        return _row(_pairs(flat)) if flat else None

    async def requeue(self, *, record_id: str | None, provider_message_id: str, at: float,
                      error: dict[str, Any], final_error: dict[str, Any],
                      max_attempts: int) -> Row | None:
        """Send a ``sent`` record again at ``at`` (Meta failed it later with an error worth
        retrying), or fail it after ``max_attempts`` sends; as :meth:`Outbox.requeue`."""
        ttl, until = self._expiry()
        now = repr(time.time())
        flat = await self._outage("requeue", lambda: self._requeue(args=[
            self.p, record_id or "", provider_message_id, repr(float(at)),
            msgspec.json.encode(error), now, int(max_attempts), ttl, until,
            msgspec.json.encode(final_error)]))
        return _row(_pairs(flat)) if flat else None

    async def waiting(self, accounts: list[tuple[str, str]]) -> int:
        """How many records wait to be sent (queued, sending or uncertain) on ``accounts``."""
        args = [self.p] + [part for key in accounts for part in key]
        return int(await self._outage("waiting", lambda: self._waiting(args=args)))

    async def inbound(self, channel: str, account_id: str, contact_id: str, at: float,
                      message_id: str | None, opted_out: bool | None) -> None:
        """Remember a customer's latest inbound message (the service window) and consent."""
        opted = "" if opted_out is None else ("1" if opted_out else "0")
        await self._outage("inbound", lambda: self._inbound(args=[
            self.p, channel, account_id, contact_id, repr(float(at)), message_id or "",
            "0" if message_id is None else "1", opted]))

    async def set_opted_out(self, channel: str, account_id: str, contact_id: str,
                            opted_out: bool, at: float | None = None) -> None:
        """Record consent learnt outside an inbound message (Meta's 131050 answer), said at
        ``at`` (epoch s; default now); consent said later is kept."""
        said = repr(float(time.time() if at is None else at))
        await self._outage("set_opted_out", lambda: self._consent(args=[
            self.p, channel, account_id, contact_id, "1" if opted_out else "0", said]))

    async def customer(self, channel: str, account_id: str, contact_id: str) -> Customer:
        at, mid, opt, said = await self.redis.hmget(
            f"{self.p}:out:customer:{channel}:{contact_id}",
            [f"at:{account_id}", f"mid:{account_id}", f"opt:{account_id}", f"optat:{account_id}"])
        return Customer(None if at is None else float(at), _opt_str(mid), opt == b"1",
                        _opt_float(said))

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """GDPR: forget a contact's outbound records and window/consent state."""
        sends, known = await self._erase(args=[self.p, channel, contact_id])
        return {"outbox": int(sends), "customers": int(known)}


class AccountLease:
    """Only one replica at a time runs the send loop of one (channel, account).

    ``{p}:lease:outbound:{channel}:{account}`` is taken with ``SET NX PX ttl_ms`` and renewed every
    third of ``ttl_ms`` by a background task (:meth:`start`). :attr:`held` is true only while the
    last successful renewal is recent enough that the key cannot have expired yet (with a 10 %
    margin), so a replica that cannot renew (Redis unreachable, event loop stalled) stops sending
    before another replica can take over. A graceful :meth:`close` gives the lease back at once.
    """

    def __init__(self, outbox: RedisOutbox, channel: str, account: str,
                 ttl_ms: int = LEASE_MS) -> None:
        self.outbox = outbox
        self.key = f"{outbox.p}:lease:outbound:{channel}:{account}"
        self.owner = outbox.owner
        self.ttl_ms = int(ttl_ms)
        self._until = 0.0  # monotonic deadline of the current lease (0: not ours)
        self._won = asyncio.Event()
        self._failed = False  # the last attempt could not reach Redis
        self._task: asyncio.Task | None = None

    @property
    def held(self) -> bool:
        """Whether this replica may send for the account right now."""
        return time.monotonic() < self._until

    async def acquire(self) -> bool:
        """One attempt to take the lease, or renew it if ours; True if it is ours now.

        False when another replica holds it or Redis cannot be reached (then :attr:`held` stays
        true until the lease, as last renewed, could expire)."""
        from redis.exceptions import RedisError

        started = time.monotonic()
        try:
            ok = bool(await cancellable(self.outbox._acquire(keys=[self.key],
                                                              args=[self.owner, self.ttl_ms])))
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", operation="acquire_account_lease", error=repr(exc))
            self._failed = True
            return False
        self._failed = False
        if ok:
            self._until = started + self.ttl_ms * 0.9 / 1000
            self._won.set()
        else:
            self._until = 0.0
            self._won.clear()
        return ok

    async def release(self) -> bool:
        """Give the lease back if ours (another replica may take it at once)."""
        self._until = 0.0
        self._won.clear()
        return bool(await self.outbox._release(keys=[self.key], args=[self.owner]))

    async def start(self) -> bool:
        """Try to take the lease now, then keep trying / renewing in the background.
        Returns whether it is held."""
        await self.acquire()
        if self._task is None:
            self._task = asyncio.create_task(self._keep(), name=f"lease:{self.key}")
        return self.held

    async def _keep(self) -> None:
        renew = self.ttl_ms / 3000
        while True:
            # Renew every third of the ttl; a failed renewal of a lease still held is retried
            # every 0.5 s until it lapses; a lease held elsewhere is asked for every third.
            await asyncio.sleep(min(0.5, renew) if self.held and self._failed else renew)
            await self.acquire()

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the lease to be ours; return :attr:`held`."""
        deadline = time.monotonic() + timeout
        while not self.held:  # an acquisition that took too long to answer does not count
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._won.clear()
            if not await wait_event(self._won, left):
                return self.held
        return True

    async def close(self) -> None:
        """Stop renewing and give the lease back (best effort: otherwise it expires)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
            self._task = None
        try:
            await self.release()
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            log.warning("redis_unavailable", operation="release_account_lease", error=repr(exc))
