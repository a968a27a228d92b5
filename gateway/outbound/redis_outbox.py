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
  replica sending for that account starts at once (see :meth:`RedisOutbox.watch`); and
  ``{channel}\\n{account}\\n{code}`` for an out-of-band throttling code (:meth:`announce`).
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
from gateway.outbound import redis_scripts as lua
from gateway.outbound.outbox import RANK, Customer, Row
from gateway.redis_client import (
    ACQUIRE_LEASE,
    OUTAGE_BACKOFF_MAX,
    RELEASE_LEASE,
    as_str,
    cancellable,
    connect,
    redis_ping,
    retry_through_outages,
    split_url,
    unavailable,
)

log = gwlog.get("gateway.outbound.redis")

T = TypeVar("T")
RETENTION_SECONDS = 30 * 24 * 3600  # settled records are kept this long after their last change
ALIVE_MS = 15_000  # a replica whose heartbeat is this old is gone: its sends become uncertain
LEASE_MS = 10_000  # an account's sending lease; renewed every third of it
CLAIM_TOKEN_MS = 600_000  # how long a claim_due call can be retried after a lost reply

def _pairs(flat: list) -> dict[bytes, bytes]:
    return {flat[k]: flat[k + 1] for k in range(0, len(flat), 2)}


def _opt_str(value: bytes | None) -> str | None:
    return None if value is None else as_str(value)


def _opt_float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _row(f: dict[bytes, bytes], before: bytes | None = None) -> Row:
    """A record hash as the SQLite outbox's :class:`Row`; ``before`` is the claim's snapshot
    (``state attempts updated_at`` before the claim), which is what ``claim_due`` returns."""
    state, attempts, updated_at = as_str(f[b"state"]), int(f[b"attempts"]), float(f[b"updated_at"])
    if before is not None:
        old_state, old_attempts, old_updated = as_str(before).split(" ")
        state, attempts, updated_at = old_state, int(old_attempts), float(old_updated)
    return Row(as_str(f[b"id"]), _opt_str(f.get(b"idempotency_key")), as_str(f[b"channel"]),
               as_str(f[b"account_id"]), as_str(f[b"recipient"]), as_str(f[b"type"]),
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
        self._add = register(lua.ADD)
        self._get = register(lua.GET)
        self._claim = register(lua.CLAIM)
        self._sent = register(lua.SENT)
        self._failed = register(lua.FAILED)
        self._retry = register(lua.RETRY)
        self._status = register(lua.STATUS)
        self._requeue = register(lua.REQUEUE)
        self._waiting = register(lua.WAITING)
        self._consent = register(lua.CONSENT)
        self._inbound = register(lua.INBOUND)
        self._erase = register(lua.ERASE)
        self._beat = register(lua.BEAT)
        self._retire = register(lua.RETIRE)
        self._acquire = register(ACQUIRE_LEASE)
        self._release = register(RELEASE_LEASE)
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

    def watch(self, wake: Callable[[str, str], None],
              throttled: Callable[[str, str, int], None] | None = None) -> None:
        """Call ``wake(channel, account)`` whenever any replica adds a record (Redis pub/sub on
        ``{p}:out:wake``), so the replica holding that account's lease sends it at once; and
        ``throttled(channel, account, code)`` for each out-of-band throttling code a replica
        :meth:`announce` names. Call after :meth:`open`; stops at :meth:`close`. Resubscribes
        after an outage."""
        self._tasks.append(asyncio.create_task(self._listen(wake, throttled),
                                               name="outbox:wake"))

    async def announce(self, channel: str, account_id: str, code: int) -> None:
        """Tell every replica that Meta reported throttling ``code`` for the account out of
        band (``{channel}\n{account}\n{code}`` on ``{p}:out:wake``): the one sending for it
        parks it. Fire and forget, as a wake is."""
        await self.redis.publish(self.k_wake, f"{channel}\n{account_id}\n{code}")

    async def _listen(self, wake: Callable[[str, str], None],
                      throttled: Callable[[str, str, int], None] | None = None) -> None:
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
                        channel, _, rest = as_str(message["data"]).partition("\n")
                        account, _, code = rest.partition("\n")
                        if not code:
                            wake(channel, account)
                        elif throttled is not None and code.isdigit():
                            throttled(channel, account, int(code))
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

    async def by_key(self, idempotency_key: str) -> Row | None:
        """The record an idempotency key was first given to, if any."""
        record_id = await self.redis.get(f"{self.p}:out:idem:{idempotency_key}")
        return None if record_id is None else await self.get(as_str(record_id))

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

    async def sent(self, record_id: str, provider_message_id: str | None,
                   max_attempts: int | None = None) -> str:
        """As :meth:`Outbox.sent`."""
        ttl, until = self._expiry()
        now = repr(time.time())
        done = await self._outage("sent", lambda: self._sent(args=[
            self.p, record_id, provider_message_id or "", now, ttl, until,
            "" if max_attempts is None else max_attempts]))
        return {1: "sent", 2: "queued", 3: "failed"}.get(int(done), "kept")

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
