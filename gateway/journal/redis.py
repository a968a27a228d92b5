"""The scale-out journal: Redis (Streams + Lua), shared by every gateway replica.

Keys, under a prefix (default ``gw``; ``?prefix=`` on the URL changes it):

- ``{p}:requests`` — stream of raw requests; consumer group ``processors``: each request is
  normalised by one replica; entries are deleted once processed (XLEN = unprocessed);
- ``{p}:seen:{event id}`` — de-duplication, expiring after ``dedupe_window_seconds``;
- ``{p}:events`` — stream of canonical events with explicit ids ``{seq}-0`` (``{p}:events:seq``);
- ``{p}:cursors`` — hash: sink name → last delivered seq (only ever moves forward);
- ``{p}:dead`` — hash: dead-letter id → JSON; ``{p}:lease:{name}`` — one replica delivers per sink.

Processing a batch is one Lua script: new ids are remembered, their events appended, the requests
acknowledged and deleted — all or nothing. Durability is Redis's: run it with ``appendonly yes``
and ``appendfsync always`` for per-write durability (``everysec`` may lose the last second).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from urllib.parse import parse_qs, urlsplit, urlunsplit

from gateway.config import GatewayConfig
from gateway.journal import DeadLetter, NewEvent, RawRequest, StoredEvent

GROUP = "processors"
STALE_MS = 30_000  # a request claimed this long ago by a replica that died is taken over

_COMMIT = """
local p, ttl, now, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local seqs = {}
local i = 5
for k = 1, n do
  local id, channel, conv, received, data = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4]
  i = i + 5
  if redis.call('SET', p .. ':seen:' .. id, now, 'NX', 'EX', ttl) then
    local seq = redis.call('INCR', p .. ':events:seq')
    redis.call('XADD', p .. ':events', seq .. '-0', 'id', id, 'channel', channel,
               'conversation_id', conv, 'received_at', received, 'data', data)
    seqs[k] = seq
  else
    seqs[k] = 0
  end
end
local acks = tonumber(ARGV[i])
for k = 1, acks do
  redis.call('XACK', p .. ':requests', 'processors', ARGV[i + k])
  redis.call('XDEL', p .. ':requests', ARGV[i + k])
end
i = i + acks + 1
local dead = tonumber(ARGV[i])
for k = 1, dead do
  local letter_id = redis.call('INCR', p .. ':dead:seq')
  redis.call('HSET', p .. ':dead', letter_id, ARGV[i + k])
end
return {seqs, redis.call('XLEN', p .. ':requests')}
"""
_SET_CURSOR = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""
_CLAIM_REPLAYS = """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for k = 1, #all, 2 do
  if #out >= tonumber(ARGV[2]) then break end
  local letter = cjson.decode(all[k + 1])
  if letter.sink == ARGV[1] and letter.state == 'replay' then
    redis.call('HDEL', KEYS[1], all[k])
    out[#out + 1] = all[k]
    out[#out + 1] = all[k + 1]
  end
end
return out
"""
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def _split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    prefix = parse_qs(parts.query).get("prefix", ["gw"])[0]
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("prefix="))
    return urlunsplit(parts._replace(query=query)), prefix


def _seq(stream_id: bytes | str) -> int:
    ms, _, n = (stream_id.decode() if isinstance(stream_id, bytes) else stream_id).partition("-")
    return int(ms) * 1_000_000 + int(n or 0)


class RedisJournal:
    """The :class:`gateway.journal.Journal` on Redis, for several replicas."""

    shared = True  # other replicas add events too: the dispatcher reads them from here

    def __init__(self, config: GatewayConfig, prefix: str | None = None) -> None:
        self.url, url_prefix = _split_url(config.queue.redis_url)
        self.p = prefix or url_prefix
        self.ttl = max(1, config.queue.dedupe_window_seconds)
        self.pending = 0
        self.consumer = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.redis = None
        self._claimed: dict[int, str] = {}

    async def open(self) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(self.url)
        try:
            await self.redis.xgroup_create(f"{self.p}:requests", GROUP, id="0", mkstream=True)
        except Exception as exc:  # noqa: BLE001 - BUSYGROUP: it exists already
            if "BUSYGROUP" not in str(exc):
                raise
        self._commit = self.redis.register_script(_COMMIT)
        self._set_cursor = self.redis.register_script(_SET_CURSOR)
        self._claim_replays = self.redis.register_script(_CLAIM_REPLAYS)
        self._lease = self.redis.register_script(_LEASE)
        self.pending = await self.redis.xlen(f"{self.p}:requests")

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except Exception:  # noqa: BLE001 - readiness is a yes/no question
            return False

    async def append(self, channel: str, body: bytes, received_at: float) -> None:
        await self.redis.xadd(f"{self.p}:requests",
                              {"channel": channel, "received_at": repr(received_at), "body": body})
        self.pending += 1

    async def unprocessed(self, limit: int) -> list[RawRequest]:
        stream = f"{self.p}:requests"
        _, stale, _ = await self.redis.xautoclaim(stream, GROUP, self.consumer, STALE_MS,
                                                   "0-0", count=limit)
        fresh = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=limit)
        entries = list(stale or []) + [e for _, items in fresh or [] for e in items]
        found = []
        for stream_id, fields in entries:
            if not fields:
                continue
            seq = _seq(stream_id)
            self._claimed[seq] = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
            found.append(RawRequest(seq, fields[b"channel"].decode(),
                                    float(fields[b"received_at"]), fields[b"body"]))
        found.sort(key=lambda r: r.seq)
        self.pending = await self.redis.xlen(stream)
        return found

    async def commit_processed(self, upto: int, events: list[NewEvent],
                               failed: list[tuple[RawRequest, str]]) -> list[int | None]:
        acks = [sid for seq, sid in self._claimed.items() if seq <= upto]
        args: list = [self.p, self.ttl, repr(time.time()), len(events)]
        for ev in events:
            args += [ev.id, ev.channel, ev.conversation_id, repr(ev.received_at), ev.data]
        args += [len(acks), *acks, len(failed)]
        now = time.time()
        args += [json.dumps({"sink": f"normalise:{req.channel}", "event_id": f"request:{req.seq}",
                             "data": base64.b64encode(req.body).decode(), "received_at": req.received_at,
                             "reason": reason, "attempts": 1, "failed_at": now, "state": "dead"})
                 for req, reason in failed]
        seqs, pending = await self._commit(args=args)
        for seq in [s for s in self._claimed if s <= upto]:
            del self._claimed[seq]
        self.pending = int(pending)
        return [int(s) or None for s in seqs]

    async def events_after(self, seq: int, limit: int) -> list[StoredEvent]:
        entries = await self.redis.xrange(f"{self.p}:events", min=f"{seq + 1}-0", max="+",
                                          count=limit)
        return [StoredEvent(int(sid.split(b"-")[0]), fields[b"data"], float(fields[b"received_at"]))
                for sid, fields in entries]

    async def last_event_seq(self) -> int:
        return int(await self.redis.get(f"{self.p}:events:seq") or 0)

    async def cursor(self, name: str) -> int | None:
        value = await self.redis.hget(f"{self.p}:cursors", name)
        return None if value is None else int(value)

    async def set_cursor(self, name: str, seq: int) -> None:
        await self._set_cursor(keys=[f"{self.p}:cursors"], args=[name, seq])

    async def acquire_lease(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew the right to deliver to one sink (one replica at a time)."""
        return bool(await self._lease(keys=[f"{self.p}:lease:{name}"], args=[owner, ttl_ms]))

    async def add_dead_letters(self, sink: str, items: list[tuple[StoredEvent, str, str, int]]) -> None:
        now = time.time()
        for ev, event_id, reason, attempts in items:
            letter_id = await self.redis.incr(f"{self.p}:dead:seq")
            await self.redis.hset(f"{self.p}:dead", letter_id, json.dumps({
                "sink": sink, "event_id": event_id, "data": base64.b64encode(ev.data).decode(),
                "received_at": ev.received_at, "reason": reason[:2000], "attempts": attempts,
                "failed_at": now, "state": "dead"}))

    async def _letters(self) -> list[DeadLetter]:
        found = []
        for key, value in (await self.redis.hgetall(f"{self.p}:dead")).items():
            found.append(_letter(int(key), value))
        return sorted(found, key=lambda d: d.id)

    async def dead_letters(self, sink: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return [d for d in await self._letters() if sink in (None, d.sink)][:limit]

    async def dead_letter_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for letter in await self._letters():
            counts[letter.sink] = counts.get(letter.sink, 0) + 1
        return counts

    async def request_replay(self, sink: str | None = None, ids: list[int] | None = None) -> int:
        count = 0
        for letter in await self._letters():
            if letter.state != "dead" or letter.sink.startswith("normalise:"):
                continue
            if (sink and letter.sink != sink) or (ids and letter.id not in ids):
                continue
            raw = json.loads(await self.redis.hget(f"{self.p}:dead", letter.id))
            raw["state"] = "replay"
            await self.redis.hset(f"{self.p}:dead", letter.id, json.dumps(raw))
            count += 1
        return count

    async def claim_replays(self, sink: str, limit: int) -> list[DeadLetter]:
        flat = await self._claim_replays(keys=[f"{self.p}:dead"], args=[sink, limit])
        return [_letter(int(flat[k]), flat[k + 1]) for k in range(0, len(flat), 2)]

    async def prune(self, now: float) -> None:
        cursors = [int(v) for v in (await self.redis.hgetall(f"{self.p}:cursors")).values()]
        if cursors:
            await self.redis.xtrim(f"{self.p}:events", minid=f"{min(cursors) + 1}-0",
                                   approximate=False)

    async def forget_cursors(self, keep: set[str]) -> None:
        names = [n.decode() for n in await self.redis.hkeys(f"{self.p}:cursors")]
        stale = [n for n in names if n.startswith("sink:") and n[5:] not in keep]
        if stale:
            await self.redis.hdel(f"{self.p}:cursors", *stale)


def _letter(letter_id: int, raw: bytes | str) -> DeadLetter:
    d = json.loads(raw)
    return DeadLetter(letter_id, d["sink"], d["event_id"], base64.b64decode(d["data"]),
                      d["received_at"], d["reason"], d["attempts"], d["failed_at"], d["state"])
