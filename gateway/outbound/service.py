"""The outbound service: accept → outbox → rate limiter → channel sender → Meta.

One worker per (channel, account) claims due records, waits for its limiter (account rate,
per-type rates, per-recipient pair limit, scopes Meta parked), and sends with up to
``outbound.concurrency`` requests in flight. A recipient whose pair limit is exhausted is
rescheduled without stalling the number.

What Meta answers decides the rest (``gateway.outbound.errors``):

- throttling codes park the scope Meta named with exponential backoff and jitter per scope (reset
  on success, never shorter than Meta's own hint); a message throttled too often or too long
  (``outbound.throttle_max_attempts`` / ``throttle_max_seconds``) fails with a clear error;
- usage headers park a scope Meta reports blocked (``X-Business-Use-Case-Usage``
  ``estimated_time_to_regain_access``; ``X-App-Usage`` at 100 %) and feed the headroom gauge;
- retryable errors back off with jitter, bounded by ``outbound.max_attempts`` (sends in all,
  timeouts after the request was written included: those fail as "outcome unknown");
- a failed status webhook follows the same table: a retryable or throttling code sends the
  message again (within ``max_attempts``), 131050 records the opt-out;
- an out-of-band throttling code (WhatsApp's value-level ``errors[]``, :meth:`notices`) parks its
  scope too;
- permanent errors fail the record with an operator hint;
- an expired token (190), a billing problem (131042) and the other account-level errors pause the
  account: its messages are held (no retry spent, nothing lost), one is sent as a probe every
  ``outbound.pause_probe_seconds``, and a message held longer than ``outbound.max_pause_seconds``
  fails with the original error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import logging as gwlog
from gateway.aio import wait_event
from gateway.consent import Consent
from gateway.events import customer_wrote
from gateway.identities import JournalUnavailable
from gateway.outbound import request as rq
from gateway.outbound.errors import (
    AccountPaused,
    MetaError,
    MetaThrottled,
    rule_for,
)
from gateway.outbound.http import SendUncertain
from gateway.outbound.outbox import Row
from gateway.outbound.pausing import Pause, Pausing
from gateway.outbound.python_api import PythonAPI
from gateway.outbound.ratelimit import AccountLimiter, headroom_from_headers
from gateway.outbound.redis_outbox import RedisOutbox
from gateway.outbound.store import account_lease, open_outbox
from gateway.redis_client import unavailable

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.config import GatewayConfig
    from gateway.events import Event, Notice
    from gateway.metrics import Metrics

log = gwlog.get("gateway.outbound")
READING_TTL = 3600.0  # a usage-header reading decays back to 1.0 over Meta's 1 h window
CATEGORIES = ("marketing", "utility", "authentication")
# A send waits at most this long for the webhooks acknowledged before it to be processed.
SETTLE_SECONDS = 2.0
WINDOW_RECHECK_SECONDS = 1.0  # a free-form message held longer is checked again before its send
OPTED_OUT_CODE = 131050  # "the user stopped marketing messages"
MARKETING_CAP_CODE = 131049  # Meta withheld a marketing message: the user's marketing cap
UNAVAILABLE_CODE = 551  # Instagram / Messenger: this person is not available (blocked, deactivated)
MARKETING_HOLD_SECONDS = 24 * 3600.0  # limits.md §9: no marketing to that user for 24 h
ALERT_HOLD_SECONDS = 3600.0  # an error code's gateway_alerts lasts this long after the last one
DEPTH_INTERVAL = 0.2  # s: gateway_queue_depth{queue="outbox"} is recounted at most this often
ANNOUNCE_SECONDS = 2.0  # a batch's out-of-band throttling codes reach the replicas within this


class Refused(rq.InvalidRequest):
    """A valid request the gateway will not send (window closed, opted out); ``code`` says why."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.code = code


class Unavailable(Exception):
    """A send could not be checked or stored now (the journal or the outbox did not answer):
    the API answers 503 with ``code``."""

    def __init__(self, message: str, code: str = "outbox_unavailable") -> None:
        super().__init__(message)
        self.code = code


class OutboundService(PythonAPI, Pausing):
    """Owns the outbox, the limiters and one worker per sending account."""

    def __init__(self, config: GatewayConfig, channels: dict[str, Channel],
                 metrics: Metrics) -> None:
        self.config = config.outbound
        self.channels = channels
        self.metrics = metrics
        self.outbox = open_outbox(config)  # SQLite, or Redis shared by every replica
        self.leases: dict[tuple[str, str], Any] = {}  # who sends for an account (Redis: one)
        self.limiters: dict[tuple[str, str], AccountLimiter] = {}
        self.wakes: dict[tuple[str, str], asyncio.Event] = {}
        self.paused: dict[tuple[str, str], Pause] = {}
        self.readings: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
        # out-of-band throttling codes announced while this replica did not send for the account:
        # account -> scope -> when the first backoff step of the codes would end (monotonic)
        self._pending_parks: dict[tuple[str, str], dict[str, float]] = {}
        self.tasks: list[asyncio.Task] = []
        self.inflight: set[asyncio.Task] = set()
        self.accepted_at: dict[str, float] = {}  # outbox id -> accept time (bench, metrics)
        # Error codes that set gateway_alerts for an account (not its pauses, pausing.py's) ->
        # from when (monotonic) the account's next successful send clears them.
        self._alerted: dict[tuple[str, str], dict[str, float]] = {}
        # Inbound messages seen by the processor but maybe not yet by the outbox sink: the
        # latest message (window) and the latest word on consent (time, opted out).
        self.recent: OrderedDict[tuple[str, str, str], tuple[float, str | None]] = OrderedDict()
        self.said: OrderedDict[tuple[str, str, str], tuple[float, bool]] = OrderedDict()
        # (channel, account, contact) -> until when marketing to them is held: Meta answered 131049
        # (its per-user marketing cap); this replica's memory, as the outbox sink's caches are
        self.marketing_held: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # (channel, account, contact) -> since when Meta says the person is unavailable (551:
        # blocked or deactivated, limits.md §9): no send to them until they write again
        self.unreachable: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self.consent = Consent(self.config.opt_out_keywords, self.config.opt_in_keywords)
        self.depth_changed = asyncio.Event()
        # Set by the app to Processor.caught_up: a send is checked once the webhooks acknowledged
        # before it are processed (a STOP journaled a millisecond earlier is honoured).
        self.inbound_caught_up: Callable[[float], Awaitable[bool]] | None = None
        # Set by the app to Identities.resolve: a customer known by an alias (a BSUID seen beside
        # a wa_id) is addressed, and checked, as the customer (gateway/identities.py).
        self.resolve_customer: Callable[[str, str], Awaitable[str]] | None = None
        # Set by the app to Identities.aliases_of: the aliases (BSUIDs) seen beside a customer,
        # whose word on consent counts for a template sent to the customer's own id.
        self.aliases_of: Callable[[str, str], Awaitable[list[str]]] | None = None
        self._unsettled, self._unsettled_logged = 0, float("-inf")  # sends that waited in vain

    def accounts(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(name, account, limits) for name, ch in self.channels.items()
                for account, limits in ch.accounts().items()]

    async def start(self) -> None:
        uncertain = await self.outbox.open(self.config.reconcile_seconds)
        if uncertain:
            log.warning("outbox_uncertain_after_restart", count=uncertain,
                        reconcile_seconds=self.config.reconcile_seconds)
        for channel, account, limits in self.accounts():
            key = (channel, account)
            self.limiters[key] = AccountLimiter(
                limits["rate"], limits.get("pair_interval"), limits.get("pair_burst", 1),
                type_limits=limits.get("type_limits"), name=limits.get("scope", "number"))
            self.wakes[key] = asyncio.Event()
            self.leases[key] = account_lease(self.outbox, channel, account)
            await self.leases[key].start()
            self.tasks.append(asyncio.create_task(self._worker(key),
                                                  name=f"outbound:{channel}:{account}"))
        self.tasks.append(asyncio.create_task(self._depth(), name="outbound:depth"))
        if isinstance(self.outbox, RedisOutbox):  # a send accepted by another replica
            self.outbox.watch(self._woken, self._out_of_band)

    async def stop(self, timeout: float = 5.0) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=timeout)
        for lease in self.leases.values():  # after the sends in flight: then another replica
            await lease.close()             # may take over the account's rate at once
        await self.outbox.close()

    def _woken(self, channel: str, account: str) -> None:
        wake = self.wakes.get((channel, account))
        if wake is not None:
            wake.set()

    # -- accepting ------------------------------------------------------------------------------

    async def send(self, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """Accept one message (the ``POST /v1/messages`` body). Stored before returning.

        Raises:
            InvalidRequest: naming the field; Refused: window closed or contact opted out;
            Unavailable: the journal did not say whose id an alias ``to`` is, or the outbox
            could not store the message (a Redis outage).
        """
        req = rq.parse(body)
        channel = self.channels.get(req.channel)
        if channel is None:
            raise rq.InvalidRequest("channel", f"no enabled channel is named {req.channel!r}")
        if req.to:  # as inbound events name the customer: "+1 555..." is wa_id "1555..."
            req = msgspec.structs.replace(req, to=channel.recipient(req.to))
        account = self._account(req.channel, req.account_id)
        if req.idempotency_key:  # a retry of an accepted send: its record, however it went
            try:  # (checked again, a STOP or the window's end since would refuse it)
                known = await self.outbox.by_key(req.idempotency_key)
            except unavailable() as exc:
                raise Unavailable(f"the outbox could not be read ({type(exc).__name__}); "
                                  "retry later") from exc
            if known is not None:
                return {"id": known.id, "status": known.public()["status"]}
        if self.inbound_caught_up is not None and not await self.inbound_caught_up(SETTLE_SECONDS):
            self._unsettled += 1
            if time.monotonic() - self._unsettled_logged > 60:  # a backlog: once a minute
                self._unsettled_logged = time.monotonic()
                log.warning("inbound_not_caught_up", seconds=SETTLE_SECONDS, sends=self._unsettled,
                            detail="sends checked against the consent and window known so far")
                self._unsettled = 0
        also: list[str] = []  # the person's other ids: looked up after the catch-up, so that
        try:  # a pair in a webhook acknowledged before this send is known
            if req.to and channel.may_be_alias(req.to):
                also = await self._alias_owner(req.channel, req.to)
            elif req.to and self.aliases_of is not None and _consent_counts(req):
                # a STOP the customer sent by BSUID alone, before it was seen beside this id
                also = [a for a in await self.aliases_of(req.channel, req.to) if a != req.to]
        except JournalUnavailable as exc:
            raise Unavailable(f"the journal did not say whose id {req.to!r} is ({exc}); "
                              "retry later", "journal_unavailable") from exc
        try:
            req = await self._check(req, account, also)
            row, new = await self.outbox.add(req.channel, account, req.to or "", req.type,
                                             rq.encode(req), req.idempotency_key)
        except unavailable() as exc:  # a Redis outbox that is down or read-only: not stored
            raise Unavailable(f"the outbox could not store the message ({type(exc).__name__}); "
                              "retry later") from exc
        if new:
            self.accepted_at[row.id] = time.monotonic()
            self.depth_changed.set()
            pause = self.paused.get((req.channel, account))
            if pause is not None:  # held from the start: its record says why and what to do
                await self.outbox.retry_at(row.id, row.next_at, pause.error)  # attempts stay 0
            self.wakes[(req.channel, account)].set()
        return {"id": row.id, "status": row.public()["status"]}

    def _account(self, channel_name: str, account_id: str | None) -> str:
        accounts = self.channels[channel_name].accounts()
        account = account_id or (next(iter(accounts)) if len(accounts) == 1 else None)
        if account is None or account not in accounts:
            raise rq.InvalidRequest("account_id", "unknown sending account" if account else
                                    f"required: channel {channel_name!r} has {len(accounts)} "
                                    "accounts")
        return account

    def observe(self, records: list) -> None:
        """Dispatcher observer: note inbound messages the moment they are processed, so a reply
        written by another sink is never refused because the outbox sink has not run yet, and a
        STOP is honoured from then on (the outbox sink stores both later)."""
        for record in records:
            ev = record.event
            if customer_wrote(ev) or (ev.kind == "preference" and ev.direction == "inbound"):
                key = (ev.channel, ev.account_id, ev.customer_id)
                at = ev.timestamp.timestamp()
                if ev.kind != "preference":  # a preference says consent, opens no window
                    _remember(self.recent, key, (at, ev.message_id))
                opted_out = self.consent.of(ev)
                said = self.said.get(key)
                if opted_out is not None and (said is None or at >= said[0]):
                    _remember(self.said, key, (at, opted_out))

    def forget_contact(self, channel: str, contact_id: str) -> None:
        """GDPR: drop what :meth:`observe` remembers of a contact (its latest message, its word
        on consent), as the outbox erases its stored copy of both, its marketing hold and
        whether it was unreachable."""
        for cache in (self.recent, self.said, self.marketing_held, self.unreachable):
            for key in [k for k in cache if k[0] == channel and k[2] == contact_id]:
                del cache[key]

    async def _check(self, req: rq.OutboundRequest, account: str,
                     also: Sequence[str] = ()) -> rq.OutboundRequest:
        """Window and consent, as the outbox and :meth:`observe` know them: of ``req.to``, and
        of ``also`` (the customer an alias ``to`` was last seen beside, or the aliases seen
        beside ``to``). The latest message and the latest word on consent of any of them count:
        one person, several ids."""
        customer = await self._customer(req.channel, account, req.to or "")
        for other_id in also:
            other = await self._customer(req.channel, account, other_id)
            if (other.last_inbound_at or 0) > (customer.last_inbound_at or 0):
                customer = customer._replace(last_inbound_at=other.last_inbound_at,
                                             last_inbound_message_id=other.last_inbound_message_id)
            # the later word wins; at the same time (or neither dated: a record migrated from
            # before opted_out_at was kept), the opt-out
            if ((other.opted_out_at or float("-inf")), bool(other.opted_out)) > (
                    (customer.opted_out_at or float("-inf")), bool(customer.opted_out)):
                customer = customer._replace(opted_out=other.opted_out,
                                             opted_out_at=other.opted_out_at)
        since = self.unreachable.get((req.channel, account, req.to or ""))
        # Meta's times are whole seconds (WhatsApp): a message in the 551's second lifts it
        if since is not None and (customer.last_inbound_at or 0.0) < int(since):
            raise Refused("unreachable", "to", (
                "Meta answered 551 for this person (not available: they blocked the account or "
                "deactivated) at " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
                + ": nothing is sent to them until they write again"))
        if req.type in ("mark_read", "typing") and not req.message_id:
            if customer.last_inbound_message_id:
                req = msgspec.structs.replace(req, message_id=customer.last_inbound_message_id)
            elif req.channel != "instagram" and (req.type == "mark_read" or req.on):
                # WhatsApp marks (and shows typing on) a message; Instagram's sender actions
                # name none, and WhatsApp's typing off sends nothing
                raise rq.InvalidRequest("message_id", "required: no inbound message is known")
        if req.type == "template":
            if customer.opted_out:
                _check_consent(req.template)
            held = self.marketing_held.get((req.channel, account, req.to or ""), 0.0)
            if held > time.time() and _consent_counts(req):
                raise Refused("marketing_held", "to", (
                    f"Meta withheld a marketing message to this contact (131049, its marketing "
                    f"cap): no marketing template to them for 24 h, until "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(held))} (set "
                    "template.category to \"utility\" or \"authentication\" if it is not "
                    "marketing)"))
            return req
        if req.type in rq.NO_WINDOW or not self.config.enforce_window:
            return req
        hours = self._window_hours(req)
        last = customer.last_inbound_at
        if last is None or time.time() - last > hours * 3600:
            since = ("never wrote" if last is None
                     else f"last wrote {(time.time() - last) / 3600:.1f} h ago")
            raise Refused("outside_window", "type",
                          f"free-form message outside the {hours:g}-hour customer-service window "
                          f"(the contact {since}): send an approved template"
                          + (" or use tag HUMAN_AGENT (7 days)" if req.channel == "instagram"
                             else ""))
        return req

    async def _alias_owner(self, channel: str, alias: str) -> list[str]:
        """The customer an alias (a BSUID) was last seen beside, as a one-item list; [] when it
        was seen beside none. Raises JournalUnavailable as :meth:`Identities.resolve` does."""
        if self.resolve_customer is None:
            return []
        owner = await self.resolve_customer(channel, alias)
        return [owner] if owner != alias else []

    def _window_hours(self, req: rq.OutboundRequest) -> float:
        if req.tag == "HUMAN_AGENT" and req.channel == "instagram":
            return self.config.human_agent_days * 24
        return self.config.window_hours

    async def _window_closed(self, row: Row, req: rq.OutboundRequest) -> bool:
        """Whether the window of a free-form message, open when it was accepted, has closed
        while it waited (retries, limits, a pause): Meta would refuse it (131047). Asked only of
        one held longer than :data:`WINDOW_RECHECK_SECONDS`; a look-up that fails says no (Meta's
        answer will tell)."""
        if (req.type in rq.NO_WINDOW or not self.config.enforce_window
                or time.time() - row.created_at < WINDOW_RECHECK_SECONDS):
            return False
        try:
            ids = [row.recipient]
            if self.channels[row.channel].may_be_alias(row.recipient):
                ids += await self._alias_owner(row.channel, row.recipient)
            times = [(await self._customer(row.channel, row.account_id, cid)).last_inbound_at
                     for cid in ids]
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises
            log.warning("window_recheck_failed", channel=row.channel, id=row.id, error=repr(exc))
            return False
        last = max((t for t in times if t), default=None)
        return last is not None and time.time() - last > self._window_hours(req) * 3600

    async def _customer(self, channel: str, account: str, contact_id: str):
        """The outbox's window and consent of one contact, with what :meth:`observe` saw since."""
        customer = await self.outbox.customer(channel, account, contact_id)
        seen = self.recent.get((channel, account, contact_id))
        if seen is not None and seen[0] > (customer.last_inbound_at or 0):
            customer = customer._replace(last_inbound_at=seen[0], last_inbound_message_id=seen[1])
        said = self.said.get((channel, account, contact_id))
        if said is not None and said[0] >= (customer.opted_out_at or float("-inf")):
            customer = customer._replace(opted_out=said[1], opted_out_at=said[0])
        return customer

    async def status(self, record_id: str) -> dict[str, Any] | None:
        row = await self.outbox.get(record_id)
        return row.public() if row else None

    # -- sending --------------------------------------------------------------------------------

    async def _worker(self, key: tuple[str, str]) -> None:
        channel, account = key
        wake, lease = self.wakes[key], self.leases[key]
        gate = asyncio.Semaphore(self.config.concurrency)
        while True:
            wake.clear()
            if not lease.held:  # another replica sends for this account (or Redis is away)
                await lease.wait(1.0)
                continue
            if key in self._pending_parks:  # announced while the lease was not ours: ours now
                self._replay_parks(key, self._pending_parks.pop(key))
            try:
                timeout = await self._turn(key, gate)
            except Exception:  # noqa: BLE001 - a bug must not stop the account's sending for good
                log.exception("outbound_worker_error", channel=channel, account=account)
                timeout = 1.0
            if timeout == 0:
                continue
            await wait_event(wake, timeout)

    async def _turn(self, key: tuple[str, str], gate: asyncio.Semaphore) -> float:
        """Claim and dispatch what is due; return how long to sleep (0: more may be due)."""
        pause = self.paused.get(key)
        if pause is not None:
            return await self._paused_turn(key, pause, gate)
        rows = await self.outbox.claim_due(*key, 200)
        await self._dispatch(key, rows, gate)
        self._headroom(key)
        if rows:
            return 0.0
        due = await self.outbox.next_due(*key)
        return 1.0 if due is None else max(0.005, min(1.0, due - time.time()))

    async def _dispatch(self, key: tuple[str, str], rows: list[Row],
                        gate: asyncio.Semaphore) -> None:
        limiter = self.limiters[key]
        slots: dict[str, float] = {}  # type class -> the next free slot for a deferred message
        lease = self.leases[key]
        for index, row in enumerate(rows):
            if not lease.held:  # lost the lease mid-batch: the next holder sends the rest
                for rest in rows[index:]:
                    await self.outbox.retry_at(rest.id, rest.next_at, rest.stored_error(),
                                               count_attempt=False)
                return
            if row.state == "uncertain" and row.attempts >= self.config.max_attempts:
                # Every send it may make was made (Meta may have one of them): this claim
                # counted a send that is not made, so the record keeps row.attempts.
                await self._fail(row, self._unknown(row, row.stored_error() or {
                    "code": "uncertain", "message": "interrupted by a restart during the send"},
                    sends=row.attempts), attempts=row.attempts)
                continue
            shared, own = limiter.waits(row.recipient, kind=row.type)
            if own > shared:  # its recipient's pair or its type class is busy: come back later
                at = time.time() + own  # and never stall the whole account meanwhile
                step = limiter.interval(row.type)
                if step:  # spread deferred messages of a slow type over their future slots
                    at = slots[row.type] = max(at, slots.get(row.type, 0.0) + step)
                await self.outbox.retry_at(row.id, at, row.stored_error(), count_attempt=False)
                continue
            if 0 < shared <= 0.5:
                await asyncio.sleep(shared)
            pause = self.paused.get(key)
            if pause is not None:  # an answer just paused the account: hold the rest
                for held in rows[index:]:
                    await self.outbox.retry_at(held.id, held.next_at, pause.error,
                                               count_attempt=False)
                return
            if shared > 0.5:  # a parked scope: the account waits, the records keep their order
                await self.outbox.retry_at(row.id, time.time() + shared, row.stored_error(),
                                           count_attempt=False)
                continue
            await gate.acquire()  # first: the limiter must record when the send really starts
            limiter.take(row.recipient, kind=row.type)
            self._spawn(self._send(key, row, gate))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _send(self, key: tuple[str, str], row: Row, gate: asyncio.Semaphore,
                    probe: bool = False) -> None:
        channel_name, account = key
        try:
            req = rq.decode(row.request)
            if await self._window_closed(row, req):
                await self._fail(row, {
                    "code": "outside_window",
                    "message": "the customer-service window closed while the message waited "
                               "(retries, rate limits or a pause) before it could be sent",
                    "hint": "send an approved template"}, attempts=row.attempts)
                return
            result = await self.channels[channel_name].send(account, req, row.id)
        except rq.InvalidRequest as exc:  # refused before reaching Meta: proves nothing
            await self._fail(row, {"code": "invalid_request", "message": str(exc)})
        except MetaError as exc:
            # Any answer of Meta's but a pause shows the account works again (a network
            # error or an answer without an error body does not).
            self._resume(key, probe and bool(exc.code) and not isinstance(exc, AccountPaused))
            await self._meta_error(key, row, exc)
        except Exception as exc:  # noqa: BLE001 - a bug or an unexpected failure: retry, bounded
            await self._retry(row, {"code": "internal", "message": repr(exc)}, None)
        else:
            self._resume(key, True)
            alerted = self._alerted.get(key)
            if alerted:  # the account sends again: an alert whose hold has passed is over
                now = time.monotonic()
                for code in [c for c, until in alerted.items() if until <= now]:
                    self.metrics.alerts.labels(channel_name, account, code).set(0)
                    del alerted[code]
            outcome = await self.outbox.sent(row.id, result.message_id, self.config.max_attempts)
            self.depth_changed.set()
            self.limiters[key].sent_ok(row.recipient)
            self._usage(key, result.headers)
            if outcome in ("queued", "failed"):  # Meta failed this send before it answered
                self.metrics.outbound_messages.labels(
                    channel_name, row.type, "retried" if outcome == "queued" else "failed").inc()
                log.info("outbound_failed_before_answer", channel=channel_name, account=account,
                         id=row.id, provider_message_id=result.message_id, outcome=outcome)
                self._woken(channel_name, account)
            elif outcome == "sent" or not await self._failed_already(row.id):
                self.metrics.outbound_messages.labels(channel_name, row.type, "sent").inc()
                log.info("outbound_sent", channel=channel_name, account=account, id=row.id,
                         provider_message_id=result.message_id)
        finally:
            gate.release()
            pause = self.paused.get(key)
            if probe and pause is not None:
                pause.probing = False

    async def _failed_already(self, record_id: str) -> bool:
        """Whether a failed status settled the record before its send's answer came (counted
        ``failed`` then: not ``sent`` now as well). Asked only when the answer changed nothing."""
        try:
            found = await self.outbox.get(record_id)
        except Exception:  # noqa: BLE001 - a metric must not fail the send's bookkeeping
            return False
        return found is not None and found.state == "failed"

    async def _meta_error(self, key: tuple[str, str], row: Row, exc: MetaError) -> None:
        channel, account = key
        self._usage(key, exc.headers, throttled=exc.scope if isinstance(exc, MetaThrottled)
                    else None)
        if isinstance(exc, AccountPaused):
            await self._pause(key, row, exc)
            return
        error = exc.describe()
        if exc.alert:
            self.metrics.alerts.labels(channel, account, str(exc.code)).set(1)
            # up for an hour after the last one: a success of another message proves nothing
            # of a code about one recipient (131030) or one template (132015), nor does the
            # retry that gets through undo a throttling one (131048, low quality)
            self._alerted.setdefault(key, {})[str(exc.code)] = (time.monotonic()
                                                                + ALERT_HOLD_SECONDS)
            log.error("outbound_alert", channel=channel, account=account, code=exc.code,
                      fbtrace_id=exc.fbtrace_id, hint=exc.hint)
        if isinstance(exc, MetaThrottled):
            await self._throttled(key, row, exc, error)
            return
        if isinstance(exc, SendUncertain):  # bounded like any retry: it may have been sent
            if _sends(row) >= self.config.max_attempts:
                await self._fail(row, self._unknown(row, error))
                return
            self.metrics.outbound_messages.labels(row.channel, row.type, "retried").inc()
            await self._reschedule(row, time.time() + self.config.reconcile_seconds, error)
            return
        if exc.retryable:
            await self._retry(row, {**error, **_throttle_marks(row)}, exc.retry_after)
            return
        if exc.code == OPTED_OUT_CODE:  # Meta knows of an opt-out we missed (limits.md §9)
            await self._meta_opt_out(channel, account, row.recipient, time.time())
        if exc.code == MARKETING_CAP_CODE:
            self._hold_marketing(channel, account, row.recipient, time.time())
        if exc.code == UNAVAILABLE_CODE:
            self._unreachable(channel, account, row.recipient, time.time())
        await self._fail(row, error)

    def _unreachable(self, channel: str, account: str, contact: str, at: float) -> None:
        """Meta says the person is not available (551: they blocked the account or
        deactivated): refuse sends to them until they write again (limits.md §9: "mark the
        contact unreachable"), instead of sending each one for Meta to refuse."""
        key = (channel, account, contact)
        if at > self.unreachable.get(key, 0.0):
            _remember(self.unreachable, key, at)
            log.info("contact_unreachable", channel=channel, account=account, source="meta_551")

    def _hold_marketing(self, channel: str, account: str, contact: str, at: float) -> None:
        """Meta withheld a marketing message to ``contact`` (131049): refuse marketing to them
        for 24 h from then (limits.md §9), instead of spending calls Meta withholds too."""
        key = (channel, account, contact)
        until = at + MARKETING_HOLD_SECONDS
        if until > self.marketing_held.get(key, 0.0):
            _remember(self.marketing_held, key, until)
            log.info("marketing_held", channel=channel, account=account,
                     until=round(until), source="meta_131049")

    async def _meta_opt_out(self, channel: str, account: str, contact: str, at: float) -> None:
        await self.outbox.set_opted_out(channel, account, contact, True, at)
        log.info("contact_opted_out", channel=channel, account=account, source="meta_131050")

    def _unknown(self, row: Row, error: dict[str, Any],
                 sends: int | None = None) -> dict[str, Any]:
        """The error of a message given up while its last send's outcome is unknown; ``sends``:
        how many were made (default :func:`_sends`, the one just made included)."""
        sends = _sends(row) if sends is None else sends
        return {**error, "outcome": "unknown", "hint": (
            f"outcome unknown: the last send was interrupted after the request was written (a "
            f"timeout or a restart), so Meta may have accepted it, and no status webhook named "
            f"it; not sent again: {sends} sends made (outbound.max_attempts = "
            f"{self.config.max_attempts}). Check the conversation before sending it again")}

    # -- failed status webhooks -----------------------------------------------------------------

    async def failed_status(self, ev: Event, record_id: str | None) -> Row | None:
        """A failed status webhook: Meta failed a message after accepting it. Same table as a
        synchronous answer (webhooks.md §4.5): a retryable or throttling code sends it again
        (within ``max_attempts``; a throttling code also parks its scope), 131050 records the
        opt-out, anything else fails it. Counted once per message (a redelivered status moves
        nothing). Returns the record if it moved."""
        if ev.error is None:  # no code: nothing to apply the table to
            return await self._status_failed(ev, record_id, None)
        code = ev.error.code
        rule = rule_for(code, None, 0)
        error = {"code": code, "message": ev.error.title, "hint": rule.hint or None}
        key = (ev.channel, ev.account_id)
        if code == OPTED_OUT_CODE:
            await self._meta_opt_out(*key, ev.customer_id, ev.timestamp.timestamp())
        if code == MARKETING_CAP_CODE:
            self._hold_marketing(*key, ev.customer_id, ev.timestamp.timestamp())
        if code == UNAVAILABLE_CODE:
            self._unreachable(*key, ev.customer_id, ev.timestamp.timestamp())
        if not (rule.kind.retryable and ev.message_id):
            return await self._status_failed(ev, record_id, error)
        row = await self._retry_failed(key, ev, record_id, rule, error)
        if row is not None and row.state == "failed":
            self._failed_by_status(row, error)
        return row  # None: unknown, or a redelivered status of an earlier send

    async def _status_failed(self, ev: Event, record_id: str | None,
                             error: dict[str, Any] | None) -> Row | None:
        row = await self.outbox.status(provider_message_id=ev.message_id, record_id=record_id,
                                       status="failed", error=error)
        if row is not None:  # None: unknown, or already failed (a redelivered status)
            self._failed_by_status(row, error or {})
        return row

    def _failed_by_status(self, row: Row, error: dict[str, Any]) -> None:
        self.depth_changed.set()
        self.metrics.outbound_messages.labels(row.channel, row.type, "failed").inc()
        log.warning("outbound_failed", channel=row.channel, id=row.id, code=error.get("code"),
                    hint=error.get("hint"), source="status")

    async def _retry_failed(self, key: tuple[str, str], ev: Event, record_id: str | None,
                            rule: Any, error: dict[str, Any]) -> Row | None:
        """Queue a message Meta failed with a retryable code again, or fail it when it used
        its ``max_attempts`` sends; None when the status names no sent record (a redelivered
        status of an earlier send)."""
        cfg = self.config
        found = await self.outbox.get(record_id) if record_id else None
        sends = found.attempts if found is not None else 1
        wait = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (max(1, sends) - 1))
        wait *= random.uniform(0.5, 1.0)
        if issubclass(rule.kind, MetaThrottled) and key in self.limiters:
            wait = max(wait, self._throttle(key, rule.scope or "number", ev.customer_id,
                                            rule.backoff, 0.0, error["code"]))
        given_up = {**error, "hint": (
            f"{rule.hint or 'retryable error'} (code {error['code']} in a failed status "
            f"webhook): not sent again, outbound.max_attempts = {cfg.max_attempts} sends made")}
        row = await self.outbox.requeue(
            record_id=record_id, provider_message_id=ev.message_id, at=time.time() + wait,
            error=error, final_error=given_up, max_attempts=cfg.max_attempts)
        if row is not None and row.state == "queued":
            self.metrics.outbound_messages.labels(row.channel, row.type, "retried").inc()
            log.info("outbound_retry_after_status", channel=row.channel, id=row.id,
                     code=error["code"], wait=round(wait, 3), attempts=row.attempts)
            self._woken(row.channel, row.account_id)
        return row

    # -- throttling -------------------------------------------------------------------------------

    async def notices(self, notices: list[Notice]) -> None:
        """Processor observer: Meta's out-of-band account errors (WhatsApp's value-level
        ``errors[]``, e.g. 130429 "Rate limit hit"). A throttling code of the number, business
        account or app parks that scope of the account for its next backoff step, as the same
        code in a send's answer does; a pair code names no recipient, so it parks nothing. Other
        codes are only counted (``gateway_meta_errors_total``) and logged by the channel.

        The replica that sends for the account parks it: with the Redis outbox the codes go to
        every replica (``{p}:out:wake``), within :data:`ANNOUNCE_SECONDS` for the whole batch,
        and only the lease holder acts. A code Redis did not take in that time is handled here
        as an announcement received (:meth:`_out_of_band`)."""
        throttling = [n for n in notices if (n.channel, n.account_id) in self.limiters
                      and _out_of_band_scope(n.error.code) is not None]
        if not throttling:
            return
        if isinstance(self.outbox, RedisOutbox):
            sent = {asyncio.ensure_future(self.outbox.announce(
                n.channel, n.account_id, n.error.code)): n for n in throttling}
            done, late = await asyncio.wait(sent, timeout=ANNOUNCE_SECONDS)
            for task in late:  # the processor waits for this: never for long
                task.cancel()
            throttling = [n for task, n in sent.items() if task in late
                          or task.cancelled() or task.exception() is not None]
            if not throttling:
                return
            log.warning("outbound_throttle_not_announced", codes=len(throttling),
                        error=next((repr(t.exception()) for t in done
                                    if not t.cancelled() and t.exception()), "timeout"))
        for notice in throttling:
            self._out_of_band(notice.channel, notice.account_id, notice.error.code)

    def _out_of_band(self, channel: str, account: str, code: int) -> None:
        """Park the account's scope that the out-of-band throttling ``code`` names, on the
        replica that holds the account's lease. Another replica notes when the code's first
        backoff step would end (the latest end of each scope), and parks the rest of it if it
        takes the lease over (:meth:`_replay_parks`: the holder may have gone before serving
        it)."""
        key = (channel, account)
        scope = _out_of_band_scope(code)
        if scope is None or key not in self.limiters:
            return
        rule = rule_for(code, None, 0)
        lease = self.leases.get(key)
        if lease is None or not lease.held:
            pending = self._pending_parks.setdefault(key, {})
            until = time.monotonic() + self._first_step(rule.backoff)
            pending[scope] = max(pending.get(scope, 0.0), until)
            return
        wait = self._throttle(key, scope, None, rule.backoff, 0.0, code)
        self._headroom(key)
        log.warning("outbound_throttled_out_of_band", channel=channel, account=account,
                    code=code, scope=scope, wait=round(wait, 3))

    def _first_step(self, backoff: str | None) -> float:
        """The first backoff step of a throttling code (as :meth:`_throttle` caps it)."""
        return min(self._initial_step(backoff), self.config.throttle_backoff_max)

    def _initial_step(self, backoff: str | None) -> float:
        """A backoff policy's first step (``long``: Meta asks for at least a minute)."""
        cfg = self.config
        return cfg.throttle_backoff_long if backoff == "long" else cfg.throttle_backoff_initial

    def _replay_parks(self, key: tuple[str, str], pending: dict[str, float]) -> None:
        """A lease just taken over: park each scope for what is left of the first backoff step
        of the codes announced meanwhile (the step, not a further one: the replica that held
        the lease may have served it; nothing once it is over)."""
        now = time.monotonic()
        for scope, until in pending.items():
            if until > now:
                self.limiters[key].park(scope, until - now)
                self._headroom(key)
                log.info("outbound_throttled_out_of_band", channel=key[0], account=key[1],
                         scope=scope, wait=round(until - now, 3), taken_over=True)

    async def _throttled(self, key: tuple[str, str], row: Row, exc: MetaThrottled,
                         error: dict[str, Any]) -> None:
        """Park the scope Meta named for its next backoff step, or give the message up."""
        cfg, now = self.config, time.time()
        marks = _throttle_marks(row)
        count = marks.get("throttled", 0) + 1
        since = marks.get("throttled_since", now)
        error = {**error, "throttled": count, "throttled_since": since}
        if count >= cfg.throttle_max_attempts or now - since >= cfg.throttle_max_seconds:
            error["hint"] = (
                f"not sent: Meta throttled it {count} times over {now - since:.0f} s (limits: "
                f"outbound.throttle_max_attempts = {cfg.throttle_max_attempts}, "
                f"outbound.throttle_max_seconds = {cfg.throttle_max_seconds:g}); last answer "
                f"{exc.code}: {exc.hint}. Lower the send rate or volume for this "
                f"{exc.scope or 'account'}, then send it again")
            log.warning("outbound_throttle_gave_up", channel=key[0], account=key[1], id=row.id,
                        code=exc.code, scope=exc.scope, throttled=count,
                        seconds=round(now - since, 1), fbtrace_id=exc.fbtrace_id)
            await self._fail(row, error)
            return
        wait = self._throttle(key, exc.scope or "number", row.recipient, exc.backoff,
                              exc.retry_after or 0.0, exc.code)
        self.metrics.outbound_messages.labels(row.channel, row.type, "retried").inc()
        log.info("outbound_throttled", channel=key[0], account=key[1], id=row.id, code=exc.code,
                 scope=exc.scope, wait=round(wait, 3), throttled=count)
        self._headroom(key)
        await self._reschedule(row, time.time() + wait, error, count_attempt=False)

    def _throttle(self, key: tuple[str, str], scope: str, recipient: str | None,
                  backoff: str | None, floor: float, code: int | None = None) -> float:
        factor = 4.0 if backoff == "pair" else 2.0  # Meta: 4^X s for the pair limit
        limiter = self.limiters[key]
        share = limiter.share
        wait = limiter.throttle(scope, recipient, self._initial_step(backoff), factor,
                                self.config.throttle_backoff_max, floor, code)
        if scope == "app":  # the app's limit (code 4, X-App-Usage) is every account's of it
            for other, each in self.limiters.items():
                if other != key and self._same_app(other[0], key[0]):
                    each.park("app", wait)
        elif limiter.share < share:
            log.info("outbound_rate_lowered", channel=key[0], account=key[1], code=code,
                     rate=round(limiter.effective_rate, 2), configured=limiter.rate)
        return wait

    def _same_app(self, a: str, b: str) -> bool:
        """Whether two channels are one Meta app: the same channel, or the same app secret (one
        app with both WhatsApp and Instagram, ``META_APP_SECRET``)."""
        if a == b:
            return True
        secret = getattr(self.channels.get(a), "app_secret", None)
        return secret is not None and secret == getattr(self.channels.get(b), "app_secret", None)

    # -- retries, failures, usage -----------------------------------------------------------------

    async def _retry(self, row: Row, error: dict[str, Any], hint: float | None) -> None:
        if _sends(row) >= self.config.max_attempts:
            await self._fail(row, error)
            return
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (_sends(row) - 1))
        delay = max(hint or 0.0, delay * random.uniform(0.5, 1.0))
        self.metrics.outbound_messages.labels(row.channel, row.type, "retried").inc()
        await self._reschedule(row, time.time() + delay, error)

    async def _reschedule(self, row: Row, at: float, error: dict[str, Any] | None,
                          count_attempt: bool = True) -> None:
        """Put a record back for ``at`` and wake its worker to look at the new due time."""
        await self.outbox.retry_at(row.id, at, error, count_attempt=count_attempt)
        wake = self.wakes.get((row.channel, row.account_id))
        if wake is not None:
            wake.set()

    async def _fail(self, row: Row, error: dict[str, Any], attempts: int | None = None) -> None:
        """Fail ``row``; ``attempts``: the sends made, when the claim of ``row`` counted one that
        is not made (it is given up before its send)."""
        await self.outbox.failed(row.id, error, attempts)
        self.depth_changed.set()
        self.metrics.outbound_messages.labels(row.channel, row.type, "failed").inc()
        log.warning("outbound_failed", channel=row.channel, id=row.id, code=error.get("code"),
                    hint=error.get("hint"))

    async def _depth(self) -> None:
        """``gateway_queue_depth{queue="outbox"}``: records waiting to be sent (queued, being
        sent, or uncertain after a crash), recounted when one is accepted, sent or failed."""
        gauge = self.metrics.queue_depth.labels("outbox")
        keys = [(channel, account) for channel, account, _ in self.accounts()]
        while True:
            self.depth_changed.clear()
            try:
                gauge.set(await self.outbox.waiting(keys))
            except Exception as exc:  # noqa: BLE001 - a gauge must never stop anything
                log.warning("outbox_depth_failed", error=repr(exc))
            await asyncio.sleep(DEPTH_INTERVAL)  # a burst of sends is one recount
            await wait_event(self.depth_changed, 30.0)  # retries and other replicas too

    def _usage(self, key: tuple[str, str], headers: dict[str, str],
               throttled: str | None = None) -> None:
        """Meta's usage headers: remember the readings (for the gauge) and park what they say
        is blocked: a BUC scope until ``estimated_time_to_regain_access``, the app scope at 100 %
        (with the long backoff: Meta gives no time for it). ``throttled`` is the scope the
        answer's error already parked."""
        now = time.time()
        readings = self.readings[key]
        for scope, (headroom, blocked) in headroom_from_headers(headers, now).items():
            readings[scope] = (headroom, now)
            if blocked is not None and blocked > now:
                self.limiters[key].park(scope, blocked - now)
            elif scope == "app" and headroom <= 0.0 and throttled != "app":
                self._throttle(key, "app", None, "long", 0.0)

    def _headroom(self, key: tuple[str, str]) -> None:
        """``gateway_ratelimit_headroom_ratio`` per scope: the lower of the local limiter's and
        the last usage-header reading (which decays back to 1 over Meta's one-hour window)."""
        channel, account = key
        now = time.time()
        found = self.limiters[key].headroom()
        for scope, (headroom, at) in self.readings[key].items():
            decayed = headroom + (1.0 - headroom) * min(1.0, max(0.0, now - at) / READING_TTL)
            found[scope] = min(found.get(scope, 1.0), decayed)
        for scope, value in found.items():
            self.metrics.ratelimit_headroom.labels(channel, account, scope).set(value)


def _consent_counts(req: rq.OutboundRequest) -> bool:
    """Whether an opt-out (or a marketing hold) can refuse ``req``: a marketing template, or one
    of no category."""
    return (req.type == "template" and req.template is not None
            and (req.template.category or "").lower() in ("", "marketing"))


def _check_consent(template: rq.Template) -> None:
    """A template to an opted-out contact goes only when it says it is not marketing."""
    category = (template.category or "").lower()
    if category == "marketing":
        raise Refused("opted_out", "to", "the contact opted out of marketing messages")
    if not category:
        raise Refused("opted_out", "template.category",
                      "the contact opted out of marketing messages and this template has no "
                      "category: set template.category to \"utility\" or \"authentication\" if "
                      "it is not a marketing template (marketing templates are refused)")


def _sends(row: Row) -> int:
    """How many sends of ``row`` were made, the one just made included: ``claim_due`` counted
    it, but its rows show the record as it was before the claim."""
    return row.attempts + 1


def _remember(cache: OrderedDict, key: tuple[str, str, str], value: tuple) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > 100_000:
        cache.popitem(last=False)


def _out_of_band_scope(code: int) -> str | None:
    """The limiter scope an out-of-band throttling ``code`` parks, or None (not a throttling
    code, or one of a recipient's pair, which an out-of-band error does not name)."""
    rule = rule_for(code, None, 0)
    if not issubclass(rule.kind, MetaThrottled) or rule.scope == "pair":
        return None
    return rule.scope or "number"


def _throttle_marks(row: Row) -> dict[str, Any]:
    """How often, and since when, Meta throttled this message (kept across retries)."""
    error = row.stored_error() or {}
    return {k: error[k] for k in ("throttled", "throttled_since") if k in error}
