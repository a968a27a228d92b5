"""The scale-out journal: Redis (Streams + Lua), shared by every gateway replica.

Keys, under a prefix ``p`` (default ``gw``; ``?prefix=NAME`` on the URL or ``prefix=`` changes it):

- ``{p}:requests`` — stream of raw requests (fields channel, received_at, body). Consumer group
  ``processors``: each entry is handed to one replica (``XREADGROUP``); an entry a dead replica
  had claimed is taken over after ``stale_ms`` (``XAUTOCLAIM``). Entries are acknowledged *and
  deleted* once processed, so ``XLEN`` is the number of unprocessed requests (``pending``).
  A request's ``seq`` is its stream id ``ms-n`` mapped to ``ms * 1_000_000 + n`` (increasing).
- ``{p}:seen:{event id}`` — de-duplication, ``SET NX`` with ``EX dedupe_window_seconds``.
- ``{p}:events`` — stream of canonical events (fields id, channel, conversation_id, received_at,
  data) with explicit entry ids ``{seq}-0``; ``{p}:events:seq`` is the counter (``INCR``) that
  gives each new event its int seq. The stream id *is* the index: ``events_after(seq)`` is
  ``XRANGE {seq+1}-0 +``, ``prune`` is ``XTRIM MINID``.
- ``{p}:cursors`` — hash: cursor name (``sink:{name}``) → last delivered seq (only moves forward).
- ``{p}:lease:{name}`` — which replica delivers to a sink right now (``SET NX PX``, renewed).
- dead letters: ``{p}:dead:letter:{id}`` (hash of the letter's fields), ``{p}:dead:seq`` (ids),
  ``{p}:dead:ids`` / ``{p}:dead:sink:{sink}`` (sorted sets of ids: all / per sink),
  ``{p}:dead:replay:{sink}`` (sorted set: marked for replay), ``{p}:dead:seqs:{sink}`` (sorted set:
  letter id scored by its event's seq), ``{p}:dead:counts`` (hash per sink).

Processing a batch is one Lua script (atomic; a script is never interleaved with other commands):
each event id not seen yet is remembered and its event appended, the batch's requests are
acknowledged and deleted, the requests no channel could normalise become dead letters.

Durability is Redis's own: run it with ``appendonly yes`` and ``appendfsync always`` and a 200 means
the request is on disk (Redis fsyncs the AOF before it replies); with ``appendfsync everysec`` a
Redis crash may lose up to one second of acknowledged webhooks. See ``docs/redis.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import TypeVar

from gateway import logging as gwlog
from gateway.config import GatewayConfig
from gateway.journal import DeadLetter, NewEvent, RawRequest, StoredEvent, contact_matcher
from gateway.redis_client import (
    ACQUIRE_LEASE,
    RELEASE_LEASE,
    as_str,
    connect,
    redis_ping,
    retry_through_outages,
    split_url,
)

log = gwlog.get("gateway.journal.redis")
T = TypeVar("T")

GROUP = "processors"
STALE_MS = 30_000  # an entry claimed this long ago by a replica that went away is taken over
IDLE_CONSUMER_MS = 3_600_000  # consumers without pending entries idle this long are forgotten
ERASE_CHUNK = 1_000

# A dead letter, in Lua: shared by the commit (requests no channel could normalise) and
# add_dead_letters (events a sink gave up on).
_ADD_DEAD = """
local function add_dead(p, sink, event_id, data, received_at, reason, attempts, failed_at, seq)
  if tonumber(seq) > 0 then  -- idempotent: a retried call (its reply lost) adds no second letter
    for _, known in ipairs(redis.call('ZRANGEBYSCORE', p .. ':dead:seqs:' .. sink, seq, seq)) do
      local letter = p .. ':dead:letter:' .. known
      if redis.call('HGET', letter, 'event_id') == event_id
          and redis.call('HGET', letter, 'state') == 'dead' then
        return tonumber(known)
      end
    end
  end
  local id = redis.call('INCR', p .. ':dead:seq')
  redis.call('HSET', p .. ':dead:letter:' .. id, 'sink', sink, 'event_id', event_id,
             'data', data, 'received_at', received_at, 'reason', reason, 'attempts', attempts,
             'failed_at', failed_at, 'state', 'dead', 'seq', seq)
  redis.call('ZADD', p .. ':dead:ids', id, id)
  redis.call('ZADD', p .. ':dead:sink:' .. sink, id, id)
  if tonumber(seq) > 0 then redis.call('ZADD', p .. ':dead:seqs:' .. sink, seq, id) end
  redis.call('HINCRBY', p .. ':dead:counts', sink, 1)
  return id
end
local function drop_dead(p, id)
  local key = p .. ':dead:letter:' .. id
  local sink = redis.call('HGET', key, 'sink')
  redis.call('ZREM', p .. ':dead:ids', id)
  if not sink then return false end
  redis.call('DEL', key)
  redis.call('ZREM', p .. ':dead:sink:' .. sink, id)
  redis.call('ZREM', p .. ':dead:replay:' .. sink, id)
  redis.call('ZREM', p .. ':dead:seqs:' .. sink, id)
  if redis.call('HINCRBY', p .. ':dead:counts', sink, -1) <= 0 then
    redis.call('HDEL', p .. ':dead:counts', sink)
  end
  return true
end
"""

# ARGV: prefix, ttl, now, group, n, n * (id, channel, conversation_id, received_at, data),
#       acks, acks * stream id, failed, failed * (sink, event_id, data, received_at, reason,
#       stream id).
# Returns {seqs (0 = already seen), XLEN of the requests}.
_COMMIT = _ADD_DEAD + """
local p, ttl, now, group, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], tonumber(ARGV[5])
local seqs = {}
local i = 6
for k = 1, n do
  local id, channel, conv, received, data = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  i = i + 5
  local seen = p .. ':seen:' .. id
  if redis.call('EXISTS', seen) == 0 then
    local seq = redis.call('INCR', p .. ':events:seq')
    redis.call('XADD', p .. ':events', seq .. '-0', 'id', id, 'channel', channel,
               'conversation_id', conv, 'received_at', received, 'data', data)
    redis.call('SET', seen, now, 'EX', ttl)
    seqs[k] = seq
  else
    seqs[k] = 0
  end
end
local requests = p .. ':requests'
local acks = tonumber(ARGV[i])
local acked = {}
for k = 1, acks do
  if redis.call('XACK', requests, group, ARGV[i + k]) == 1 then acked[ARGV[i + k]] = true end
  redis.call('XDEL', requests, ARGV[i + k])
end
i = i + acks + 1
local failed = tonumber(ARGV[i])
i = i + 1
for k = 1, failed do
  -- only the replica whose acknowledgement took the request keeps its dead letter: a replica
  -- that commits late (or a retried script) finds it acknowledged already
  if acked[ARGV[i+5]] then
    add_dead(p, ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], 1, now, 0)
  end
  i = i + 6
end
return {seqs, redis.call('XLEN', requests)}
"""

# ARGV: prefix, now, n, n letter ids it replaces (dropped), then (sink, event_id, data,
# received_at, reason, attempts, seq) per letter.
_ADD_DEAD_LETTERS = _ADD_DEAD + """
local p, now, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 4, 3 + n do drop_dead(p, ARGV[i]) end
for i = 4 + n, #ARGV, 7 do
  add_dead(p, ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], now, ARGV[i+6])
end
return 1
"""

# ARGV: prefix, sink ('' = every sink), ids... (none = every letter). Returns how many.
_REQUEST_REPLAY = """
local p, sink = ARGV[1], ARGV[2]
local ids = {}
if #ARGV > 2 then
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
elseif sink ~= '' then
  ids = redis.call('ZRANGE', p .. ':dead:sink:' .. sink, 0, -1)
else
  ids = redis.call('ZRANGE', p .. ':dead:ids', 0, -1)
end
local count = 0
for _, id in ipairs(ids) do
  local key = p .. ':dead:letter:' .. id
  local f = redis.call('HMGET', key, 'sink', 'state')
  if f[1] and f[2] == 'dead' and (sink == '' or f[1] == sink) then
    redis.call('HSET', key, 'state', 'replay')
    redis.call('ZADD', p .. ':dead:replay:' .. f[1], id, id)
    count = count + 1
  end
end
return count
"""

# ARGV: prefix, sink, limit. Takes the oldest letters marked for replay out of the store.
# ARGV: prefix, sink, limit. The letters marked for replay (read only: they are deleted once
# redelivered, so a crash in between replays them again); ids whose letter is gone are dropped.
_REPLAYS_DUE = """
local p, sink = ARGV[1], ARGV[2]
local ids = redis.call('ZRANGE', p .. ':dead:replay:' .. sink, 0, tonumber(ARGV[3]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local fields = redis.call('HGETALL', p .. ':dead:letter:' .. id)
  if #fields > 0 then
    out[#out + 1] = id
    out[#out + 1] = fields
  else
    redis.call('ZREM', p .. ':dead:replay:' .. sink, id)
  end
end
return out
"""

# ARGV: prefix, ids... Deletes dead letters; returns how many existed.
_DROP_DEAD = _ADD_DEAD + """
local count = 0
for i = 2, #ARGV do
  if drop_dead(ARGV[1], ARGV[i]) then count = count + 1 end
end
return count
"""

_SET_CURSOR = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""

def request_seq(stream_id: bytes | str) -> int:
    """A request stream id ``ms-n`` as an increasing int (``ms * 1_000_000 + n``)."""
    ms, _, n = as_str(stream_id).partition("-")
    return int(ms) * 1_000_000 + int(n or 0)


class RedisJournal:
    """The :class:`gateway.journal.Journal` on Redis, shared by several gateway replicas."""

    shared = True  # other replicas add events too: the dispatcher reads them from here

    def __init__(self, config: GatewayConfig, prefix: str | None = None,
                 stale_ms: int = STALE_MS, consumer: str | None = None) -> None:
        self.url, url_prefix = split_url(config.queue.redis_url)
        self.p = prefix or url_prefix or "gw"
        self.ttl = max(1, config.queue.dedupe_window_seconds)
        self.stale_ms = stale_ms
        self.consumer = consumer or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.pending = 0  # unprocessed requests, all replicas: XLEN, refreshed on every round trip
        self.appending = 0  # this replica's appends awaiting Redis's answer
        self.redis = None
        self._claimed: dict[int, str] = {}  # seq → stream id: handed to us, not yet acked
        self._next_autoclaim = 0.0
        self._leases: dict[str, str] = {}  # leases this instance holds: released on close
        self.k_requests = f"{self.p}:requests"
        self.k_events = f"{self.p}:events"
        self.k_erasures = f"{self.p}:erasures"  # [channel, contact id] -> last request seq
        self.k_aliases = f"{self.p}:aliases"  # [channel, alias] -> customer id (identities.py)
        self.k_retired = f"{self.p}:aliases:retired"  # [channel, id] -> ids erased with it
        self.k_cursors = f"{self.p}:cursors"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create the consumer group, count what is unprocessed."""
        self.redis = connect(self.url)
        await self._create_group()
        register = self.redis.register_script
        self._commit = register(_COMMIT)
        self._add_dead = register(_ADD_DEAD_LETTERS)
        self._request_replay = register(_REQUEST_REPLAY)
        self._replays_due = register(_REPLAYS_DUE)
        self._drop_dead = register(_DROP_DEAD)
        self._set_cursor = register(_SET_CURSOR)
        self._acquire = register(ACQUIRE_LEASE)
        self._release = register(RELEASE_LEASE)
        self._retire = register(_RETIRE_ALIASES)
        self._forget_retired = register(_FORGET_RETIRED)
        self.pending = await self.redis.xlen(self.k_requests)

    async def close(self) -> None:
        """Give back this instance's sink leases and forget this consumer if it owes nothing."""
        if self.redis is None:
            return
        try:
            for name, owner in list(self._leases.items()):
                await self.release_lease(name, owner)
            info = await self.redis.xinfo_consumers(self.k_requests, GROUP)
            if any(as_str(c["name"]) == self.consumer and not c["pending"] for c in info):
                await self.redis.xgroup_delconsumer(self.k_requests, GROUP, self.consumer)
        except Exception:  # noqa: BLE001, S110 - best effort: leases expire, consumers are pruned
            pass
        await self.redis.aclose()
        self.redis = None

    async def ping(self) -> bool:
        """Whether Redis answers (within 2 s)."""
        return await redis_ping(self.redis)

    async def _create_group(self) -> None:
        from redis.exceptions import ResponseError

        try:
            await self.redis.xgroup_create(self.k_requests, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- requests ----------------------------------------------------------------------------

    def append(self, channel: str, body: bytes, received_at: float) -> asyncio.Future[None]:
        """XADD the raw request (durable once Redis answers, with appendfsync always); one round
        trip that also refreshes ``pending`` (XLEN: every replica's unprocessed requests).

        Counted in ``appending`` from the call until the task is done, so that the intake's
        ``max_pending`` check of a request admitted in the same loop turn already sees it."""
        self.appending += 1
        task = asyncio.ensure_future(self._append(channel, body, received_at))
        task.add_done_callback(self._appended)
        return task

    def _appended(self, _task: asyncio.Future) -> None:
        self.appending -= 1

    async def _append(self, channel: str, body: bytes, received_at: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.k_requests,
                      {"channel": channel, "received_at": repr(received_at), "body": body})
            pipe.xlen(self.k_requests)
            _, self.pending = await pipe.execute()

    async def _outage(self, what: str, call):
        """``await call()``, waiting out Redis outages (:func:`retry_through_outages`): the
        processor and the sink workers pause instead of dying."""
        return await retry_through_outages(log, what, call)

    async def unprocessed(self, limit: int) -> list[RawRequest]:
        """Requests for this replica to process, oldest first: those it was handed and has not
        committed yet, those of replicas idle for ``stale_ms`` (taken over), then new ones.
        Waits while Redis is unreachable."""
        return await self._outage("unprocessed", lambda: self._unprocessed(limit))

    async def _unprocessed(self, limit: int) -> list[RawRequest]:
        from redis.exceptions import ResponseError

        try:
            entries = await self._read(limit)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self._create_group()  # the stream was deleted (FLUSHDB?): start over
            entries = await self._read(limit)
        self._claimed = {}
        found = []
        gone = []
        for stream_id, fields in entries:
            if not fields:  # deleted (processed by a replica that took it over): forget it
                gone.append(stream_id)
                continue
            seq = request_seq(stream_id)
            self._claimed[seq] = as_str(stream_id)
            found.append(RawRequest(seq, as_str(fields[b"channel"]), float(fields[b"received_at"]),
                                    bytes(fields[b"body"])))
        if gone:
            await self.redis.xack(self.k_requests, GROUP, *gone)
        found.sort(key=lambda r: r.seq)
        self.pending = await self.redis.xlen(self.k_requests)
        return found

    async def _read(self, limit: int) -> list:
        stream = self.k_requests
        entries: list = []
        # Handed to us before and not committed: again. Read on every batch, not only after an
        # error we saw: the client retries a command whose reply was lost by itself, and the
        # entries of the lost reply are ours then, though nobody here was told (they would wait
        # for stale_ms, until a takeover). One round trip, answered at once when there are none.
        mine = await self.redis.xreadgroup(GROUP, self.consumer, {stream: "0"}, count=limit)
        entries += [e for _, items in mine or [] for e in items]
        now = time.monotonic()
        if len(entries) < limit and now >= self._next_autoclaim:
            self._next_autoclaim = now + min(5.0, self.stale_ms / 2000)
            claimed = await self.redis.xautoclaim(stream, GROUP, self.consumer, self.stale_ms,
                                                  "0-0", count=limit - len(entries))
            entries += list(claimed[1] or [])
        if len(entries) < limit:
            fresh = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"},
                                                count=limit - len(entries))
            entries += [e for _, items in fresh or [] for e in items]
        return entries

    async def commit_processed(self, upto: int, events: list[NewEvent],
                               failed: list[tuple[RawRequest, str]]) -> list[int | None]:
        """Atomically: store the events whose ids are new (``SET NX``-style on ``seen``, ``XADD``),
        acknowledge and delete the requests handed to us up to ``upto``, dead-letter ``failed``.

        Returns each event's new sequence number, or None where its id was already seen. Waits
        while Redis is unreachable (a retried script that had run reports its events as seen).
        """
        return await self._outage("commit_processed",
                                  lambda: self._commit_processed(upto, events, failed))

    async def _commit_processed(self, upto: int, events: list[NewEvent],
                                failed: list[tuple[RawRequest, str]]) -> list[int | None]:
        acks = [sid for seq, sid in self._claimed.items() if seq <= upto]
        args: list = [self.p, self.ttl, repr(time.time()), GROUP, len(events)]
        for ev in events:
            args += [ev.id, ev.channel, ev.conversation_id, repr(ev.received_at), ev.data]
        args += [len(acks), *acks, len(failed)]
        for req, reason in failed:
            args += [f"normalise:{req.channel}", f"request:{req.seq}", req.body,
                     repr(req.received_at), reason, self._claimed.get(req.seq, "")]
        seqs, pending = await self._commit(args=args)
        for seq in [s for s in self._claimed if s <= upto]:
            del self._claimed[seq]
        self.pending = int(pending)
        return [int(s) or None for s in seqs]

    # -- events and cursors ------------------------------------------------------------------

    async def events_after(self, seq: int, limit: int) -> list[StoredEvent]:
        """Events with a sequence number above ``seq``, oldest first."""
        entries = await self._outage("events_after", lambda: self.redis.xrange(
            self.k_events, min=f"{seq + 1}-0", max="+", count=limit))
        return [StoredEvent(int(as_str(sid).split("-")[0]), bytes(fields[b"data"]),
                            float(fields[b"received_at"])) for sid, fields in entries]

    async def last_event_seq(self) -> int:
        """The newest event's sequence number (0 when none was ever stored)."""
        return int(await self.redis.get(f"{self.p}:events:seq") or 0)

    async def cursor(self, name: str) -> int | None:
        """A named position (a sink's last delivered event); None when never set."""
        value = await self._outage("cursor", lambda: self.redis.hget(self.k_cursors, name))
        return None if value is None else int(value)

    async def set_cursor(self, name: str, seq: int) -> None:
        """Move a named position forward (never back)."""
        await self._outage("set_cursor", lambda: self._set_cursor(keys=[self.k_cursors],
                                                                   args=[name, int(seq)]))

    async def forget_cursors(self, keep: set[str]) -> None:
        """Drop the cursors of sinks no longer configured, so they do not pin old events."""
        names = [as_str(n) for n in await self.redis.hkeys(self.k_cursors)]
        stale = [n for n in names if n.startswith("sink:") and n[5:] not in keep]
        if stale:
            await self.redis.hdel(self.k_cursors, *stale)

    async def prune(self, now: float) -> None:
        """Drop events every sink cursor has passed (``seen`` ids expire by themselves), and
        forget consumers of replicas long gone that hold nothing."""
        cursors = await self.redis.hgetall(self.k_cursors)
        low = [int(v) for k, v in cursors.items() if as_str(k).startswith("sink:")]
        if low:
            await self.redis.xtrim(self.k_events, minid=f"{min(low) + 1}-0", approximate=False)
        try:
            consumers = await self.redis.xinfo_consumers(self.k_requests, GROUP)
        except Exception:  # noqa: BLE001 - no group yet: nothing to forget
            return
        for c in consumers:
            name = as_str(c["name"])
            if name != self.consumer and not c["pending"] and c["idle"] > IDLE_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.k_requests, GROUP, name)

    # -- sink leases (one replica delivers to a sink at a time) --------------------------------

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take, or renew if ``owner`` holds it, the lease ``name`` for ``ttl_ms``; True if held.
        False too when Redis cannot be reached: whoever cannot renew must stop delivering."""
        from redis.exceptions import RedisError

        try:
            held = bool(await self._acquire(keys=[f"{self.p}:lease:{name}"], args=[owner, ttl_ms]))
        except (RedisError, OSError) as exc:
            log.warning("redis_unavailable", operation="acquire_lease", error=repr(exc))
            await asyncio.sleep(0.5)
            held = False
        if held:
            self._leases[name] = owner
        elif self._leases.get(name) == owner:
            del self._leases[name]
        return held

    async def release_lease(self, name: str, owner: str) -> bool:
        """Give the lease back if ``owner`` holds it (another replica may take it at once)."""
        if self._leases.get(name) == owner:
            del self._leases[name]
        return bool(await self._release(keys=[f"{self.p}:lease:{name}"], args=[owner]))

    # -- dead letters ------------------------------------------------------------------------

    async def add_dead_letters(self, sink: str, items: list[tuple[StoredEvent, str, str, int]],
                               replacing: Sequence[int] = ()) -> None:
        """Store (event, event id, reason, attempts) tuples a sink gave up on, and delete the
        letters ``replacing`` names (replayed, failed again), atomically."""
        if not items:
            return
        args: list = [self.p, repr(time.time()), len(replacing), *replacing]
        for ev, event_id, reason, attempts in items:
            args += [sink, event_id, ev.data, repr(ev.received_at), reason[:2000], attempts,
                     ev.seq]
        await self._outage("add_dead_letters", lambda: self._add_dead(args=args))

    async def dead_lettered_after(self, sink: str, seq: int) -> set[int]:
        """The event seqs above ``seq`` that ``sink`` has dead letters for (dead-lettered while
        its cursor had not yet passed them: the worker must not deliver them again)."""
        found = await self._outage("dead_lettered_after", lambda: self.redis.zrangebyscore(
            f"{self.p}:dead:seqs:{sink}", f"({seq}", "+inf", withscores=True))
        return {int(score) for _, score in found}

    async def dead_letters(self, sink: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one sink."""
        index = f"{self.p}:dead:sink:{sink}" if sink else f"{self.p}:dead:ids"
        ids = [int(i) for i in await self.redis.zrange(index, 0, limit - 1)]
        return await self._letters(ids)

    async def _letters(self, ids: list[int]) -> list[DeadLetter]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for letter_id in ids:
                pipe.hgetall(f"{self.p}:dead:letter:{letter_id}")
            found = await pipe.execute() if ids else []
        return [_letter(i, f) for i, f in zip(ids, found, strict=True) if f]

    async def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters per sink (those waiting for replay included)."""
        counts = await self.redis.hgetall(f"{self.p}:dead:counts")
        return {as_str(k): int(v) for k, v in counts.items() if int(v) > 0}

    async def request_replay(self, sink: str | None = None, ids: list[int] | None = None) -> int:
        """Mark dead letters for redelivery by the running gateways; return how many."""
        return int(await self._request_replay(args=[self.p, sink or "", *(ids or [])]))

    async def replays_due(self, sink: str, limit: int) -> list[DeadLetter]:
        """Dead letters marked for replay, oldest first; they stay until :meth:`finish_replays`
        (the caller holds the sink's lease, so one replica replays them)."""
        flat = await self._outage("replays_due",
                                  lambda: self._replays_due(args=[self.p, sink, limit]))
        return [_letter(int(flat[k]), _pairs(flat[k + 1])) for k in range(0, len(flat), 2)]

    async def finish_replays(self, ids: list[int]) -> None:
        """Delete replayed dead letters (redelivered, or dead-lettered anew)."""
        if ids:
            await self._outage("finish_replays", lambda: self._drop_dead(args=[self.p, *ids]))

    # -- GDPR ----------------------------------------------------------------------------------

    async def erasures(self) -> dict[tuple[str, str], int]:
        """Erased contacts whose events the processor must drop: (channel, contact_id) -> the
        newest request seq in the stream at the erasure. One round trip per batch (two while
        an erasure waits); a record goes once no request up to its seq is left in the stream."""
        found = await self._outage("erasures", lambda: self.redis.hgetall(self.k_erasures))
        if not found:
            return {}
        first = await self._outage("erasures", lambda: self.redis.xrange(
            self.k_requests, min="-", max="+", count=1))
        oldest = request_seq(first[0][0]) if first else None
        live, passed = {}, []
        for field, upto in found.items():
            if oldest is None or int(upto) < oldest:
                passed.append(field)
            else:
                live[tuple(json.loads(field))] = int(upto)
        if passed:
            await self._drop_passed(passed, found)
        return live

    async def _drop_passed(self, passed: list, found: dict) -> None:
        """Delete the records ``passed`` unless one was changed since ``found`` was read (a
        replica erasing the same contact again meanwhile): then they stay for the next batch."""
        from redis.exceptions import WatchError

        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.k_erasures)
                now = await pipe.hmget(self.k_erasures, passed)
                if list(now) != [found[f] for f in passed]:
                    return
                pipe.multi()
                pipe.hdel(self.k_erasures, *passed)
                await pipe.execute()
            except WatchError:
                return

    async def _record_erasure(self, field: str, upto: int) -> None:
        """Set the record to ``upto`` unless it holds a newer one: a compare-and-set (another
        replica may erase the same contact at once), retried when the hash changed meanwhile."""
        from redis.exceptions import WatchError

        while True:
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(self.k_erasures)
                    known = int(await pipe.hget(self.k_erasures, field) or 0)
                    if known >= upto:
                        return
                    pipe.multi()
                    pipe.hset(self.k_erasures, field, upto)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    def _k_aliases_of(self, channel: str, contact_id: str) -> str:
        """The set of the alias fields once seen beside a customer (kept when an alias moves to
        another customer: :meth:`aliases_of` checks each against the hash)."""
        return f"{self.k_aliases}:of:{json.dumps([channel, contact_id])}"

    async def learn_aliases(self, pairs: dict[tuple[str, str], str]) -> None:
        """Store (channel, alias) -> customer id pairs (:mod:`gateway.identities`)."""
        async def work() -> None:
            pipe = self.redis.pipeline(transaction=True)
            for (channel, alias), contact in pairs.items():
                field = json.dumps([channel, alias])
                pipe.hset(self.k_aliases, field, contact)
                pipe.sadd(self._k_aliases_of(channel, contact), field)
            await pipe.execute()

        await self._outage("learn_aliases", work)

    async def aliases_of(self, channel: str, contact_id: str) -> list[str]:
        """The aliases seen beside ``contact_id`` and still pointing at it (for an erasure: an
        outage raises, as :meth:`erase_contact`'s do)."""
        fields = sorted(await self.redis.smembers(self._k_aliases_of(channel, contact_id)))
        if not fields:
            return []
        owners = await self.redis.hmget(self.k_aliases, fields)
        return [json.loads(f)[1] for f, owner in zip(fields, owners, strict=True)
                if owner is not None and as_str(owner) == contact_id]

    async def aliases(self, keys: list[tuple[str, str]], *,
                      wait: bool = True) -> dict[tuple[str, str], str]:
        """The customer ids of the (channel, alias) keys that are known. ``wait``: wait out a
        Redis outage (the processor); else an outage raises (a send, which answers 503)."""
        fields = [json.dumps(list(key)) for key in keys]

        def read():
            return self.redis.hmget(self.k_aliases, fields)

        values = await (self._outage("aliases", read) if wait else read())
        return {key: as_str(v) for key, v in zip(keys, values, strict=True) if v is not None}

    async def retire_aliases(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure: drop the pairs naming any of ``contact_ids`` either way (found through each
        one's set, not by reading every pair), and add to each id's record the others, until
        :meth:`forget_retired`; in one script, so another replica's :meth:`learn_aliases` lands
        wholly before or after it. An outage raises."""
        args = [self.k_aliases, self.k_retired, len(contact_ids)]
        for one in contact_ids:
            args += [one, json.dumps([channel, one]), self._k_aliases_of(channel, one)]
        await self._retire(args=args)

    async def retired_with(self, channel: str, contact_id: str) -> list[str]:
        """The ids retired with ``contact_id`` by an erasure not yet finished."""
        found = await self.redis.hget(self.k_retired, json.dumps([channel, contact_id]))
        return json.loads(found) if found else []

    async def forget_retired(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure, once every sink has erased ``contact_ids``: take them out of those ids'
        records; a record left empty goes (as the SQLite journal's)."""
        await self._forget_retired(args=[self.k_retired, len(contact_ids),
                                         *(json.dumps([channel, one]) for one in contact_ids),
                                         *contact_ids])

    async def erase_contact(self, channel: str, *contact_ids: str) -> dict[str, int]:
        """GDPR: delete the contacts' events and dead letters (one person's ids, in one pass);
        return how many of each.

        Requests in the stream (not yet processed by any replica) are not rewritten: the erasure
        is recorded instead, up to the newest request in the stream, and every replica's
        processor drops the contacts' events of those requests (:meth:`erasures`).

        Same rules as :meth:`gateway.journal.sqlite.SqliteJournal.erase_contact`: an event belongs
        to a contact when its channel matches and its customer is one of ``contact_ids``; a raw
        request dead letter when it came from ``channel`` and its body holds one of them as a
        JSON string (their aliases go with :meth:`retire_aliases`). The ``seen`` ids stay (opaque
        hashes, expiring with the de-duplication window).
        """
        mine = contact_matcher(channel, *contact_ids)
        # conversation ids end with the customer
        suffixes = tuple({":" + one.replace("/", "_") for one in contact_ids})
        newest = await self.redis.xrevrange(self.k_requests, max="+", min="-", count=1)
        if newest:
            for one in contact_ids:
                await self._record_erasure(json.dumps([channel, one]), request_seq(newest[0][0]))

        events = 0
        start = "-"
        while True:
            entries = await self.redis.xrange(self.k_events, min=start, max="+", count=ERASE_CHUNK)
            doomed = [sid for sid, f in entries
                      if as_str(f[b"channel"]) == channel
                      and as_str(f[b"conversation_id"]).endswith(suffixes)
                      and mine(f[b"data"], "")]
            if doomed:
                events += await self.redis.xdel(self.k_events, *doomed)
            if len(entries) < ERASE_CHUNK:
                break
            start = "(" + as_str(entries[-1][0])
        letters = 0
        ids = [int(i) for i in await self.redis.zrange(f"{self.p}:dead:ids", 0, -1)]
        for chunk in range(0, len(ids), ERASE_CHUNK):
            found = await self._letters(ids[chunk:chunk + ERASE_CHUNK])
            doomed_letters = [d.id for d in found if mine(d.data, d.sink)]
            if doomed_letters:
                letters += int(await self._drop_dead(args=[self.p, *doomed_letters]))
        return {"events": events, "dead_letters": letters}


# ARGV: aliases hash, retired hash, n, then per id: id, its field, its aliases:of set.
_RETIRE_ALIASES = """
local aliases, retired, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ids = {}
for i = 0, n - 1 do ids[ARGV[4 + 3 * i]] = true end
for i = 0, n - 1 do
  local id, field, set = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  redis.call('HDEL', aliases, field)
  for _, f in ipairs(redis.call('SMEMBERS', set)) do
    if redis.call('HGET', aliases, f) == id then redis.call('HDEL', aliases, f) end
  end
  redis.call('DEL', set)
  local linked = {}
  local old = redis.call('HGET', retired, field)
  if old then for _, x in ipairs(cjson.decode(old)) do linked[x] = true end end
  for other in pairs(ids) do if other ~= id then linked[other] = true end end
  local list = {}
  for x in pairs(linked) do table.insert(list, x) end
  if #list > 0 then
    table.sort(list)
    redis.call('HSET', retired, field, cjson.encode(list))
  end
end
return 1
"""

# ARGV: retired hash, n, the ids' fields (n), the ids (n).
_FORGET_RETIRED = """
local retired, n = ARGV[1], tonumber(ARGV[2])
local erased = {}
for i = 1, n do erased[ARGV[2 + n + i]] = true end
for i = 1, n do
  local field = ARGV[2 + i]
  local old = redis.call('HGET', retired, field)
  if old then
    local left = {}
    for _, x in ipairs(cjson.decode(old)) do
      if not erased[x] then table.insert(left, x) end
    end
    if #left > 0 then
      redis.call('HSET', retired, field, cjson.encode(left))
    else
      redis.call('HDEL', retired, field)
    end
  end
end
return 1
"""


def _pairs(flat: list) -> dict[bytes, bytes]:
    return {flat[k]: flat[k + 1] for k in range(0, len(flat), 2)}


def _letter(letter_id: int, f: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(letter_id, as_str(f[b"sink"]), as_str(f[b"event_id"]), bytes(f[b"data"]),
                      float(f[b"received_at"]), as_str(f[b"reason"]), int(f[b"attempts"]),
                      float(f[b"failed_at"]), as_str(f[b"state"]), int(f.get(b"seq", b"0")))
