"""Smooth rate limiting (GCRA) per account, per message type and per (account, recipient) pair,
with scopes Meta parks (throttling answers, usage headers) and exponential backoff per scope.

GCRA keeps a theoretical arrival time (TAT): a send is allowed when ``now >= TAT - tolerance``;
each send moves TAT by one emission interval. ``burst = 1`` gives perfectly even spacing (no
bursts), so a number limited to 80/s never sends more than 80 in any one-second window.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from typing import Any

# Sends are spaced for 96% of the configured rate: exact spacing puts rate+1 sends 1.000 s apart,
# and a little network jitter would then push Meta's one-second count over the limit. At 96% they
# are 1/0.96 = 1.0417 s apart, at any rate: a margin of 41.7 ms per one-second window.
SAFETY = 0.96
# A cell sent late may win back at most this much of its lateness (oversleeping timers must not
# cost throughput). It comes out of the margin above: whatever the lateness, rate+1 cells stay at
# least 1.0417 - 0.005 s apart, leaving over 35 ms for the requests' arrival jitter at Meta (a
# process stalled between the limiter and the wire: up to 30 ms seen on a loaded 2-core host).
CATCH_UP = 0.005
# A throttling answer saying the account's own throughput is over Meta's (RATE_CODES) lowers its
# rate to this share of what it was, at least MIN_RATE_SHARE of the configured rate; sends that go
# through win it back by RECOVER_PER_SECOND of the configured rate per second of sending (AIMD:
# a number whose real limit is below its configured rate probes it every few seconds, instead of
# hitting it again at once after each park).
DECREASE = 0.5
MIN_RATE_SHARE = 0.05
RECOVER_PER_SECOND = 0.01
# One congestion, one decrease: the answers of every send already in flight (up to
# outbound.concurrency) come back throttled too, and must not cut the rate once each.
DECREASE_EVERY = 0.5
# The codes that say the account's own throughput is over Meta's (the rate is lowered for them
# only: 131048 is message quality, 133016 registrations, 132069 a flow, whatever their scope)
RATE_CODES = frozenset({130429, 613})


class GCRA:
    """A generic cell-rate limiter: ``rate`` per second, ``burst`` cells of tolerance."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.burst = burst
        self.set_rate(rate)
        self.tat = 0.0
        self.parked_until = 0.0

    def set_rate(self, rate: float) -> None:
        """Space cells for ``rate`` per second from the next one on."""
        self.interval = 1.0 / rate
        self.tolerance = self.interval * (self.burst - 1)
        self.catch_up = min(CATCH_UP, self.interval)

    def wait(self, now: float) -> float:
        """Seconds until one more cell may go (0 when it may go now)."""
        return max(0.0, self.tat - self.tolerance - now, self.parked_until - now)

    def take(self, now: float) -> None:
        """Account for one cell sent at ``now``.

        The next cell may go one interval after ``now`` less this cell's lateness, of which at
        most :data:`CATCH_UP` (and at most one interval) is won back: a timer's usual
        oversleeping does not add up to lost throughput, and a cell sent very late (its worker
        was busy) is not followed by a quick one. Winning back up to one whole interval put
        ``rate + 1`` cells within little more than ``rate - 1`` intervals: at 4/s, 5
        audio/video sends within 0.81 s. An idle limiter restarts from ``now``.
        """
        self.tat = max(self.tat, now - self.catch_up) + self.interval

    def headroom(self, now: float) -> float:
        """1 when idle, 0 when the next cell must wait a full interval (or the scope is parked)."""
        if self.parked_until > now:
            return 0.0
        backlog = max(0.0, self.tat - now)
        return max(0.0, 1.0 - backlog / (self.interval + self.tolerance))

    def park(self, seconds: float, now: float) -> None:
        """Send nothing for ``seconds`` (Meta said so)."""
        self.parked_until = max(self.parked_until, now + seconds)


JITTER = 0.25  # throttle waits are stretched by up to 25%, never shortened below Meta's hint


class Backoff:
    """Exponential backoff steps per key (a scope, or a recipient's pair), reset on success."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.steps: OrderedDict[str, int] = OrderedDict()
        self.max_keys = max_keys

    def next(self, key: str, initial: float, factor: float, cap: float,
             floor: float = 0.0) -> float:
        """The next wait for ``key``: ``initial * factor**step`` (at most ``cap``) with upward
        jitter, and never less than ``floor`` (Meta's own hint, which may exceed ``cap``)."""
        step = self.steps.pop(key, 0)
        self.steps[key] = step + 1
        if len(self.steps) > self.max_keys:
            self.steps.popitem(last=False)
        wait = min(cap, initial * factor ** min(step, 64)) * random.uniform(1.0, 1.0 + JITTER)
        return max(floor, min(wait, cap * (1.0 + JITTER)))

    def reset(self, key: str) -> None:
        self.steps.pop(key, None)


class AccountLimiter:
    """One account's limits: its own rate, per-type rates (Instagram audio/video), a pair (thread)
    limit per recipient, and named scopes Meta parked, each with its own throttle backoff.

    Args:
        rate: messages per second for the account (spaced for :data:`SAFETY` of it).
        pair_interval, pair_burst: one message per ``pair_interval`` seconds to one recipient,
            ``pair_burst`` at once; None: no pair limit.
        type_limits: name -> (rate, message types) for type classes limited below ``rate``.
        name: the account scope's name in :meth:`headroom` (``number``, ``account``).
    """

    def __init__(self, rate: float, pair_interval: float | None = None, pair_burst: int = 1,
                 max_pairs: int = 100_000,
                 type_limits: dict[str, tuple[float, tuple[str, ...]]] | None = None,
                 name: str = "number") -> None:
        self.name = name
        self.rate = rate  # as configured; the account is spaced for rate * share * SAFETY
        self.share = 1.0  # lowered by a throttling answer on the account's scope (AIMD)
        self._recovered_at = 0.0
        self._lowered_at = float("-inf")
        self.account = GCRA(rate * SAFETY)
        self.pair_interval = pair_interval
        self.pair_burst = pair_burst
        self.pairs: OrderedDict[str, GCRA] = OrderedDict()
        self.kinds: dict[str, tuple[str, GCRA]] = {}
        for scope, (kind_rate, types) in (type_limits or {}).items():
            gcra = GCRA(kind_rate * SAFETY)
            self.kinds.update({t: (f"type:{scope}", gcra) for t in types})
        self.scopes: dict[str, GCRA] = {}
        self.backoff = Backoff(max_pairs)
        self.max_pairs = max_pairs

    def _pair(self, recipient: str, create: bool = True) -> GCRA | None:
        if not recipient:  # a read receipt by message id alone: no one's pair to hold
            return None
        gcra = self.pairs.get(recipient)
        if gcra is None and create:
            rate = 1e9 if self.pair_interval is None else 1.0 / self.pair_interval
            gcra = self.pairs[recipient] = GCRA(rate, self.pair_burst)
            if len(self.pairs) > self.max_pairs:
                self.pairs.popitem(last=False)
        return gcra

    def wait(self, recipient: str, now: float | None = None, kind: str | None = None) -> float:
        """Seconds until a message (of type ``kind``) to ``recipient`` may go."""
        return max(self.waits(recipient, now, kind))

    def waits(self, recipient: str, now: float | None = None,
              kind: str | None = None) -> tuple[float, float]:
        """(shared, own): seconds every message of the account waits (its rate, parked scopes)
        and seconds this one waits on top for its own limits (its recipient's pair, its type
        class). A message held by its own limits should not hold the others."""
        now = time.monotonic() if now is None else now
        shared = max([self.account.wait(now), *(s.wait(now) for s in self.scopes.values())])
        own = 0.0
        pair = self._pair(recipient, create=self.pair_interval is not None)
        if pair is not None:
            own = pair.wait(now)
        if kind in self.kinds:
            own = max(own, self.kinds[kind][1].wait(now))
        return shared, own

    def interval(self, kind: str | None) -> float:
        """The spacing of ``kind``'s type class (0 when it has none)."""
        return self.kinds[kind][1].interval if kind in self.kinds else 0.0

    def take(self, recipient: str, now: float | None = None, kind: str | None = None) -> None:
        """Account for one message (of type ``kind``) sent to ``recipient``."""
        now = time.monotonic() if now is None else now
        self.account.take(now)
        pair = self._pair(recipient) if self.pair_interval is not None else None
        if pair is not None:
            pair.take(now)
        if kind in self.kinds:
            self.kinds[kind][1].take(now)

    def park(self, scope: str, seconds: float, recipient: str | None = None) -> float:
        """Send nothing in ``scope`` for ``seconds`` (``pair``: to ``recipient`` only)."""
        now = time.monotonic()
        if scope == "pair":  # one recipient's; none named (a read receipt): nothing to hold
            if recipient:
                self._pair(recipient).park(seconds, now)
        else:
            self.scopes.setdefault(scope, GCRA(1e9)).park(seconds, now)
        return seconds

    def throttle(self, scope: str, recipient: str | None, initial: float, factor: float,
                 cap: float, floor: float = 0.0, code: int | None = None) -> float:
        """Meta throttled ``scope``: park it for its next backoff step; return the wait.

        ``pair`` throttles only ``recipient`` (Meta: 4^X s, other recipients unaffected)."""
        key = f"pair:{recipient}" if scope == "pair" and recipient is not None else scope
        now = time.monotonic()
        if code in RATE_CODES and now - self._lowered_at >= DECREASE_EVERY:
            self._lowered_at = now  # the account's own throughput: Meta's limit is below ours
            self._set_share(max(MIN_RATE_SHARE, self.share * DECREASE), now)
        return self.park(scope, self.backoff.next(key, initial, factor, cap, floor), recipient)

    def sent_ok(self, recipient: str, now: float | None = None) -> None:
        """A successful send resets the backoff of the recipient's pair and of every account
        scope (the parks already served stay as they are), and wins back some of the rate a
        throttling answer took."""
        self.backoff.reset(f"pair:{recipient}")
        for scope in (self.name, *self.scopes):
            self.backoff.reset(scope)
        if self.share < 1.0:
            now = time.monotonic() if now is None else now
            gained = RECOVER_PER_SECOND * min(1.0, max(0.0, now - self._recovered_at))
            self._set_share(min(1.0, self.share + gained), now)

    def _set_share(self, share: float, now: float) -> None:
        self.share = share
        self._recovered_at = now  # recovery counts from the latest change
        self.account.set_rate(self.rate * share * SAFETY)

    @property
    def effective_rate(self) -> float:
        """Messages per second the account is spaced for now (before :data:`SAFETY`)."""
        return self.rate * self.share

    def parked(self, scope: str, now: float | None = None) -> float:
        """Seconds ``scope`` stays parked (0 when it is not)."""
        now = time.monotonic() if now is None else now
        found = self.scopes.get(scope)
        return max(0.0, found.parked_until - now) if found else 0.0

    def headroom(self, now: float | None = None) -> dict[str, float]:
        """Headroom per local scope, 0..1 (pairs are not reported: one per recipient)."""
        now = time.monotonic() if now is None else now
        found = {self.name: self.account.headroom(now)}
        for name, gcra in [*self.kinds.values(), *self.scopes.items()]:
            found[name] = min(found.get(name, 1.0), gcra.headroom(now))
        return found


def _frac(*pcts: Any) -> float:
    values = [float(p) for p in pcts if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return min(max(values, default=0.0), 100.0) / 100.0


def headroom_from_headers(headers: Any, now: float | None = None,
                          ) -> dict[str, tuple[float, float | None]]:
    """scope -> (headroom 0..1, blocked_until epoch s or None) from Meta's usage headers
    (limits.md §5). Missing or garbled headers are skipped: absence means unknown, not idle."""
    now = time.time() if now is None else now
    out: dict[str, tuple[float, float | None]] = {}
    headers = {str(k).lower(): v for k, v in headers.items()}  # names are case-insensitive
    raw = headers.get("x-app-usage")
    if raw:
        try:
            usage = json.loads(raw)
            out["app"] = (1.0 - _frac(usage.get("call_count"), usage.get("total_cputime"),
                                      usage.get("total_time")), None)
        except (ValueError, AttributeError):
            pass
    raw = headers.get("x-business-use-case-usage")
    if raw:
        try:
            for biz_id, items in json.loads(raw).items():
                for item in items:
                    wait = float(item.get("estimated_time_to_regain_access") or 0)
                    used = _frac(item.get("call_count"), item.get("total_cputime"),
                                 item.get("total_time"))
                    blocked = now + wait * 60 if wait > 0 else None
                    out[f"buc:{biz_id}:{item.get('type', 'unknown')}"] = (
                        0.0 if blocked else 1.0 - used, blocked)
        except (ValueError, AttributeError, TypeError):
            pass
    return out
