"""The outbound service: accept → outbox → rate limiter → channel sender → Meta.

One worker per (channel, account) claims due records, waits for its limiter (account rate and
per-recipient pair limit), and sends with up to ``outbound.concurrency`` requests in flight. A
recipient whose pair limit is exhausted is rescheduled without stalling the number. Throttling
errors park the scope Meta named; retryable errors back off with jitter; permanent errors fail the
record with an operator hint; an expired token or a blocked account pauses that account.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from gateway import logging as gwlog
from gateway.outbound import request as rq
from gateway.outbound.errors import AccountPaused, MetaError, MetaThrottled, TokenExpired
from gateway.outbound.http import SendUncertain
from gateway.outbound.outbox import Outbox, Row
from gateway.outbound.ratelimit import AccountLimiter, headroom_from_headers

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.config import GatewayConfig
    from gateway.metrics import Metrics

log = gwlog.get("gateway.outbound")


class Refused(rq.InvalidRequest):
    """A valid request the gateway will not send (window closed, opted out); ``code`` says why."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(field, message)
        self.code = code


class OutboundService:
    """Owns the outbox, the limiters and one worker per sending account."""

    def __init__(self, config: GatewayConfig, channels: dict[str, Channel], metrics: Metrics) -> None:
        self.config = config.outbound
        self.channels = channels
        self.metrics = metrics
        self.outbox = Outbox(config.server.data_dir)
        self.limiters: dict[tuple[str, str], AccountLimiter] = {}
        self.wakes: dict[tuple[str, str], asyncio.Event] = {}
        self.paused: dict[tuple[str, str], str] = {}
        self.tasks: list[asyncio.Task] = []
        self.inflight: set[asyncio.Task] = set()
        self.accepted_at: dict[str, float] = {}  # outbox id -> accept time (bench, metrics)
        # Inbound messages seen by the processor but maybe not yet by the outbox sink.
        self.recent: OrderedDict[tuple[str, str, str], tuple[float, str | None]] = OrderedDict()

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
            self.limiters[key] = AccountLimiter(limits["rate"], limits.get("pair_interval"),
                                                limits.get("pair_burst", 1))
            self.wakes[key] = asyncio.Event()
            self.tasks.append(asyncio.create_task(self._worker(key), name=f"outbound:{channel}:{account}"))

    async def stop(self, timeout: float = 5.0) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=timeout)
        await self.outbox.close()

    # -- accepting ------------------------------------------------------------------------------

    async def send(self, body: dict[str, Any] | bytes) -> dict[str, Any]:
        """Accept one message (the ``POST /v1/messages`` body). Stored before returning.

        Raises:
            InvalidRequest: naming the field; Refused: window closed or contact opted out.
        """
        req = rq.parse(body)
        channel = self.channels.get(req.channel)
        if channel is None:
            raise rq.InvalidRequest("channel", f"no enabled channel is named {req.channel!r}")
        accounts = channel.accounts()
        account = req.account_id or (next(iter(accounts)) if len(accounts) == 1 else None)
        if account is None or account not in accounts:
            raise rq.InvalidRequest("account_id", "unknown sending account" if account else
                                    f"required: channel {req.channel!r} has {len(accounts)} accounts")
        req = await self._check(req, account)
        row, new = await self.outbox.add(req.channel, account, req.to or "", req.type,
                                         rq.encode(req), req.idempotency_key)
        if new:
            self.accepted_at[row.id] = time.monotonic()
            self.wakes[(req.channel, account)].set()
        return {"id": row.id, "status": row.public()["status"]}

    def observe(self, records: list) -> None:
        """Dispatcher observer: note inbound messages the moment they are processed, so a reply
        written by another sink is never refused because the outbox sink has not run yet."""
        for record in records:
            ev = record.event
            if ev.direction == "inbound" and ev.kind in ("message", "postback"):
                key = (ev.channel, ev.account_id, ev.customer_id)
                self.recent[key] = (ev.timestamp.timestamp(), ev.message_id)
                self.recent.move_to_end(key)
                if len(self.recent) > 100_000:
                    self.recent.popitem(last=False)

    async def _check(self, req: rq.OutboundRequest, account: str) -> rq.OutboundRequest:
        customer = await self.outbox.customer(req.channel, account, req.to or "")
        seen = self.recent.get((req.channel, account, req.to or ""))
        if seen is not None and seen[0] > (customer.last_inbound_at or 0):
            customer = customer._replace(last_inbound_at=seen[0], last_inbound_message_id=seen[1])
        if req.type in ("mark_read", "typing") and not req.message_id:
            if not customer.last_inbound_message_id:
                raise rq.InvalidRequest("message_id", "required: no inbound message is known")
            import msgspec

            req = msgspec.structs.replace(req, message_id=customer.last_inbound_message_id)
        if req.type == "template":
            if customer.opted_out and (req.template.category or "").lower() == "marketing":
                raise Refused("opted_out", "to", "the contact opted out of marketing messages")
            return req
        if req.type in rq.NO_WINDOW or not self.config.enforce_window:
            return req
        hours = self.config.window_hours
        if req.tag == "HUMAN_AGENT" and req.channel == "instagram":
            hours = self.config.human_agent_days * 24
        last = customer.last_inbound_at
        if last is None or time.time() - last > hours * 3600:
            since = "never wrote" if last is None else f"last wrote {(time.time() - last) / 3600:.1f} h ago"
            raise Refused("outside_window", "type",
                          f"free-form message outside the {hours:g}-hour customer-service window "
                          f"(the contact {since}): send an approved template"
                          + (" or use tag HUMAN_AGENT (7 days)" if req.channel == "instagram" else ""))
        return req

    async def status(self, record_id: str) -> dict[str, Any] | None:
        row = await self.outbox.get(record_id)
        return row.public() if row else None

    # -- the Python API of the original system -------------------------------------------------

    async def send_whatsapp_text(self, to: str, text: str, **kw: Any) -> dict[str, Any]:
        return await self.send({"channel": "whatsapp", "type": "text", "to": to, "text": text, **kw})

    async def send_whatsapp_template(self, to: str, name: str, language: str,
                                     components: list | None = None, **kw: Any) -> dict[str, Any]:
        return await self.send({"channel": "whatsapp", "type": "template", "to": to, "template": {
            "name": name, "language": language, "components": components or []}, **kw})

    async def send_whatsapp_media(self, to: str, kind: str, link: str | None = None,
                                  media_id: str | None = None, caption: str | None = None,
                                  filename: str | None = None, **kw: Any) -> dict[str, Any]:
        media = {k: v for k, v in {"link": link, "id": media_id, "caption": caption,
                                   "filename": filename}.items() if v is not None}
        return await self.send({"channel": "whatsapp", "type": kind, "to": to, "media": media, **kw})

    async def send_instagram_text(self, to: str, text: str, **kw: Any) -> dict[str, Any]:
        return await self.send({"channel": "instagram", "type": "text", "to": to, "text": text, **kw})

    async def send_instagram_quick_replies(self, to: str, text: str, replies: list[dict],
                                           **kw: Any) -> dict[str, Any]:
        return await self.send({"channel": "instagram", "type": "quick_replies", "to": to,
                                "text": text, "quick_replies": replies, **kw})

    async def send_instagram_typing(self, to: str, on: bool = True, **kw: Any) -> dict[str, Any]:
        return await self.send({"channel": "instagram", "type": "typing", "to": to, "on": on, **kw})

    # -- sending --------------------------------------------------------------------------------

    async def _worker(self, key: tuple[str, str]) -> None:
        channel, account = key
        limiter, wake = self.limiters[key], self.wakes[key]
        gate = asyncio.Semaphore(self.config.concurrency)
        while True:
            wake.clear()
            rows = [] if key in self.paused else await self.outbox.claim_due(channel, account, 200)
            for row in rows:
                wait = limiter.wait(row.recipient)
                if wait > 0.5:  # a parked scope or this recipient's pair limit: come back later,
                    await self.outbox.retry_at(row.id, time.time() + wait, None, count_attempt=False)
                    continue  # and never stall the whole number meanwhile
                if wait > 0:
                    await asyncio.sleep(wait)
                limiter.take(row.recipient)
                await gate.acquire()
                task = asyncio.create_task(self._send(key, row, gate))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            self._headroom(key)
            if rows:
                continue
            due = await self.outbox.next_due(channel, account)
            timeout = 1.0 if due is None else max(0.005, min(1.0, due - time.time()))
            try:
                await asyncio.wait_for(wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _send(self, key: tuple[str, str], row: Row, gate: asyncio.Semaphore) -> None:
        channel_name, account = key
        req = rq.decode(row.request)
        try:
            result = await self.channels[channel_name].send(account, req, row.id)
        except rq.InvalidRequest as exc:
            await self._fail(row, {"code": "invalid_request", "message": str(exc)})
        except MetaError as exc:
            await self._meta_error(key, row, exc)
        except Exception as exc:  # noqa: BLE001 - a bug or an unexpected failure: retry, bounded
            await self._retry(row, {"code": "internal", "message": repr(exc)}, None)
        else:
            await self.outbox.sent(row.id, result.message_id)
            self.limiters[key].sent_ok(row.recipient)
            self._usage(key, result.headers)
            self.metrics.outbound_messages.labels(channel_name, row.type, "sent").inc()
            log.info("outbound_sent", channel=channel_name, account=account, id=row.id,
                     provider_message_id=result.message_id)
        finally:
            gate.release()

    async def _meta_error(self, key: tuple[str, str], row: Row, exc: MetaError) -> None:
        channel, account = key
        self._usage(key, getattr(exc, "headers", {}))
        error = exc.describe()
        if exc.alert:
            self.metrics.alerts.labels(channel, account, str(exc.code)).set(1)
            log.error("outbound_alert", channel=channel, account=account, code=exc.code,
                      fbtrace_id=exc.fbtrace_id, hint=exc.hint)
        if isinstance(exc, AccountPaused):
            reason = "token_expired" if isinstance(exc, TokenExpired) else f"code_{exc.code}"
            self.paused[key] = reason
            self.metrics.alerts.labels(channel, account, reason).set(1)
            log.error("outbound_account_paused", channel=channel, account=account, reason=reason,
                      hint=exc.hint)
            await self.outbox.retry_at(row.id, time.time(), error, count_attempt=False)
            return  # kept queued until an operator fixes the account and restarts
        if isinstance(exc, MetaThrottled):
            limiter = self.limiters[key]
            waited = limiter.park(exc.scope or "number", exc.retry_after or 1.0, row.recipient)
            self.metrics.outbound_messages.labels(channel, row.type, "retried").inc()
            await self.outbox.retry_at(row.id, time.time() + waited, error, count_attempt=False)
            return
        if isinstance(exc, SendUncertain):
            await self.outbox.retry_at(row.id, time.time() + self.config.reconcile_seconds, error)
            return
        if exc.retryable:
            await self._retry(row, error, exc.retry_after)
            return
        await self._fail(row, error)

    async def _retry(self, row: Row, error: dict[str, Any], hint: float | None) -> None:
        if row.attempts >= self.config.max_attempts:
            await self._fail(row, error)
            return
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** (row.attempts - 1))
        delay = max(hint or 0.0, delay * random.uniform(0.5, 1.0))
        self.metrics.outbound_messages.labels(row.channel, row.type, "retried").inc()
        await self.outbox.retry_at(row.id, time.time() + delay, error)

    async def _fail(self, row: Row, error: dict[str, Any]) -> None:
        await self.outbox.failed(row.id, error)
        self.metrics.outbound_messages.labels(row.channel, row.type, "failed").inc()
        log.warning("outbound_failed", channel=row.channel, id=row.id, code=error.get("code"),
                    hint=error.get("hint"))

    def _usage(self, key: tuple[str, str], headers: dict[str, str]) -> None:
        channel, account = key
        for scope, (headroom, _) in headroom_from_headers(headers).items():
            self.metrics.ratelimit_headroom.labels(channel, account, scope).set(headroom)

    def _headroom(self, key: tuple[str, str]) -> None:
        channel, account = key
        for scope, headroom in self.limiters[key].headroom().items():
            self.metrics.ratelimit_headroom.labels(channel, account, scope).set(headroom)
