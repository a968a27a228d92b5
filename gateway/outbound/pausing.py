"""Paused sending accounts: an answer that no retry can fix (an expired token, an unpaid account,
a restricted number) pauses the account instead of failing its messages one by one.

While paused, the account's messages are held (queued, with the error and the operator's
instructions on each); one held message is tried every ``outbound.pause_probe_seconds`` and the
account resumes when it goes through; a message held longer than ``outbound.max_pause_seconds``
fails with that error; ``gateway_alerts{reason}`` is 1 meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import logging as gwlog
from gateway.outbound.errors import AccountPaused, TokenExpired
from gateway.outbound.outbox import Row

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.config import OutboundConfig
    from gateway.metrics import Metrics
    from gateway.outbound.ratelimit import AccountLimiter

log = gwlog.get("gateway.outbound")


@dataclass
class Pause:
    """An account that cannot send until something is fixed (token, payment, ...)."""

    reason: str  # token_expired | code_<n>
    code: int
    error: dict[str, Any]  # the original error, with the operator's instructions and paused_at
    since: float  # epoch s: when the account was first paused (kept on held records)
    probe_at: float  # epoch s: the next probe send
    check_at: float  # epoch s: the next look for messages held too long
    probing: bool = False


class Pausing:
    """The pausing half of :class:`gateway.outbound.service.OutboundService` (a mixin: the
    service has the state it uses and the send methods it calls)."""

    config: OutboundConfig
    channels: dict[str, Channel]
    metrics: Metrics
    outbox: Any
    paused: dict[tuple[str, str], Pause]
    wakes: dict[tuple[str, str], asyncio.Event]
    limiters: dict[tuple[str, str], AccountLimiter]

    async def _pause(self, key: tuple[str, str], row: Row, exc: AccountPaused) -> None:
        """Hold ``row`` and pause the account (once: later answers only hold their message)."""
        channel, account = key
        now, cfg = time.time(), self.config
        pause = self.paused.get(key)
        if pause is None:
            earlier = row.stored_error() or {}
            since = now
            if earlier.get("code") == exc.code and isinstance(earlier.get("paused_at"), float):
                since = min(now, earlier["paused_at"])  # paused before a restart: keep counting
            reason = "token_expired" if isinstance(exc, TokenExpired) else f"code_{exc.code}"
            error = {**exc.describe(), "hint": self._pause_hint(channel, account, exc),
                     "paused_at": since}
            probe = cfg.pause_probe_seconds or float("inf")
            pause = self.paused[key] = Pause(reason, exc.code, error, since, now + probe,
                                             since + cfg.max_pause_seconds)
            self.metrics.alerts.labels(channel, account, reason).set(1)
            self.metrics.alerts.labels(channel, account, str(exc.code)).set(1)
            log.error("outbound_account_paused", channel=channel, account=account,
                      code=exc.code, reason=reason, fbtrace_id=exc.fbtrace_id,
                      hint=error["hint"], meta_message=str(exc))
        else:
            log.warning("outbound_pause_probe_failed", channel=channel, account=account,
                        code=exc.code, fbtrace_id=exc.fbtrace_id)
        await self.outbox.retry_at(row.id, row.next_at, pause.error, count_attempt=False)
        self.wakes[key].set()

    def _pause_hint(self, channel: str, account: str, exc: AccountPaused) -> str:
        cfg = self.config
        what = exc.hint
        if isinstance(exc, TokenExpired):  # where this account's token is configured
            config = getattr(self.channels.get(channel), "config", None)
            env = getattr(config, "env", {})
            names = env.get("access_token") if isinstance(env, dict) else None
            where = f"channels.{channel}.access_token"
            if getattr(config, "accounts", None):
                where += f" or this account's entry in [[channels.{channel}.accounts]]"
            if names:
                where += f"; env {names[0]}"
            what = what.replace("this account's access_token",
                                f"this account's access_token ({where})")
        probe = (f"one held message is tried every {cfg.pause_probe_seconds:g} s and sending "
                 "resumes when it goes through, or at the next restart"
                 if cfg.pause_probe_seconds else "sending resumes at the next restart")
        return (f"{what}. Sending from {channel} account {account} is paused (Meta error "
                f"{exc.code}): its messages are held, not failed; {probe}. A message held "
                f"longer than outbound.max_pause_seconds ({cfg.max_pause_seconds:g} s) fails "
                "with this error")

    def _resume(self, key: tuple[str, str], proven: bool) -> None:
        """An answer other than a pause came back: the account works again."""
        pause = self.paused.get(key)
        if pause is None or not proven:
            return
        del self.paused[key]
        channel, account = key
        self.metrics.alerts.labels(channel, account, pause.reason).set(0)
        self.metrics.alerts.labels(channel, account, str(pause.code)).set(0)
        log.warning("outbound_account_resumed", channel=channel, account=account,
                    code=pause.code, paused_seconds=round(time.time() - pause.since, 1))
        self.wakes[key].set()

    async def _paused_turn(self, key: tuple[str, str], pause: Pause,
                           gate: asyncio.Semaphore) -> float:
        """One turn of a paused account's worker: fail what was held too long, maybe send a
        probe. Returns how long to sleep (a new message or a probe's answer wakes it)."""
        now = time.time()
        if now >= pause.check_at:
            pause.check_at = await self._expire_held(key, pause, now)
        if now >= pause.probe_at and not pause.probing:
            pause.probe_at = now + self.config.pause_probe_seconds
            rows = await self.outbox.claim_due(*key, 1)
            if rows:
                pause.probing = True
                self.limiters[key].take(rows[0].recipient, kind=rows[0].type)
                await gate.acquire()
                self._spawn(self._send(key, rows[0], gate, probe=True))
        self._headroom(key)
        return max(0.005, min(pause.check_at, pause.probe_at, now + 60.0) - time.time())

    async def _expire_held(self, key: tuple[str, str], pause: Pause, now: float) -> float:
        """Fail held messages older than ``max_pause_seconds`` (oldest first); return when to
        look again. A message's hold starts when the pause began or when it was accepted."""
        limit = self.config.max_pause_seconds
        expired = 0
        while True:
            rows = await self.outbox.claim_due(*key, 200)
            keep = [r for r in rows if now - max(pause.since, r.created_at) < limit]
            kept = {r.id for r in keep}
            for row in rows:
                if row.id in kept:
                    await self.outbox.retry_at(row.id, row.next_at,
                                               row.stored_error() or pause.error,
                                               count_attempt=False)
                    continue
                held = now - max(pause.since, row.created_at)
                await self._fail(row, {**pause.error, "hint": (
                    f"{pause.error['hint']}. Not sent: held {held / 3600:.1f} h while the "
                    "account was paused, longer than outbound.max_pause_seconds")},
                    attempts=row.attempts)  # not sent: the claim's count is given back
                expired += 1
            if keep or len(rows) < 200:
                break
        if expired:
            log.error("outbound_pause_expired", channel=key[0], account=key[1],
                      code=pause.code, failed=expired, max_pause_seconds=limit)
        soonest = min((max(pause.since, r.created_at) + limit for r in keep), default=now + limit)
        return min(soonest, now + min(60.0, limit))
