"""Smooth rate limiting (GCRA) per account and per (account, recipient) pair, with parking.

GCRA keeps a theoretical arrival time (TAT): a send is allowed when ``now >= TAT - tolerance``;
each send moves TAT by one emission interval. ``burst = 1`` gives perfectly even spacing (no
bursts), so a number limited to 80/s never sends more than 80 in any one-second window.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any

# Sends are spaced for 96% of the configured rate: exact spacing puts rate+1 sends 1.000 s apart,
# and a little network jitter would then push Meta's one-second count over the limit.
SAFETY = 0.96


class GCRA:
    """A generic cell-rate limiter: ``rate`` per second, ``burst`` cells of tolerance."""

    def __init__(self, rate: float, burst: int = 1) -> None:
        self.interval = 1.0 / rate
        self.tolerance = self.interval * (burst - 1)
        self.tat = 0.0
        self.parked_until = 0.0

    def wait(self, now: float) -> float:
        """Seconds until one more cell may go (0 when it may go now)."""
        return max(0.0, self.tat - self.tolerance - now, self.parked_until - now)

    def take(self, now: float) -> None:
        """Account for one cell sent at ``now``.

        A cell sent a little late (less than one interval: a timer that woke up late) keeps the
        schedule instead of restarting it from ``now``, so oversleeping does not accumulate into
        lost throughput; an idle limiter restarts from ``now`` (no burst after idling).
        """
        late = now - self.tat
        self.tat = (self.tat if 0 <= late < self.interval else max(self.tat, now)) + self.interval

    def headroom(self, now: float) -> float:
        """1 when idle, 0 when the next cell must wait a full interval (or the scope is parked)."""
        if self.parked_until > now:
            return 0.0
        backlog = max(0.0, self.tat - now)
        return max(0.0, 1.0 - backlog / (self.interval + self.tolerance))

    def park(self, seconds: float, now: float) -> None:
        """Send nothing for ``seconds`` (Meta said so)."""
        self.parked_until = max(self.parked_until, now + seconds)


class AccountLimiter:
    """One account's limits: its own rate, a pair limit per recipient, and named parked scopes."""

    def __init__(self, rate: float, pair_interval: float | None = None, pair_burst: int = 1,
                 max_pairs: int = 100_000) -> None:
        self.account = GCRA(rate * SAFETY)
        self.pair_interval = pair_interval
        self.pair_burst = pair_burst
        self.pairs: OrderedDict[str, GCRA] = OrderedDict()
        self.pair_backoff: dict[str, int] = {}
        self.scopes: dict[str, GCRA] = {}
        self.max_pairs = max_pairs

    def _pair(self, recipient: str) -> GCRA | None:
        if self.pair_interval is None:
            return None
        gcra = self.pairs.get(recipient)
        if gcra is None:
            gcra = self.pairs[recipient] = GCRA(1.0 / self.pair_interval, self.pair_burst)
            if len(self.pairs) > self.max_pairs:
                self.pairs.popitem(last=False)
        return gcra

    def wait(self, recipient: str, now: float | None = None) -> float:
        """Seconds until a message to ``recipient`` may go."""
        now = time.monotonic() if now is None else now
        waits = [self.account.wait(now), *(s.wait(now) for s in self.scopes.values())]
        pair = self._pair(recipient)
        if pair is not None:
            waits.append(pair.wait(now))
        return max(waits)

    def take(self, recipient: str, now: float | None = None) -> None:
        """Account for one message sent to ``recipient``."""
        now = time.monotonic() if now is None else now
        self.account.take(now)
        pair = self._pair(recipient)
        if pair is not None:
            pair.take(now)

    def park(self, scope: str, seconds: float, recipient: str | None = None) -> float:
        """Park a scope. ``pair`` parks only that recipient, with Meta's 4^X s backoff."""
        now = time.monotonic()
        if scope == "pair" and recipient is not None:
            step = self.pair_backoff.get(recipient, 0)
            self.pair_backoff[recipient] = step + 1
            seconds = max(seconds, 4.0 ** step)
            pair = self._pair(recipient) or self.scopes.setdefault(f"pair:{recipient}", GCRA(1e9))
            pair.park(seconds, now)
            return seconds
        self.scopes.setdefault(scope, GCRA(1e9)).park(seconds, now)
        return seconds

    def sent_ok(self, recipient: str) -> None:
        """A successful send resets that recipient's pair backoff."""
        self.pair_backoff.pop(recipient, None)

    def headroom(self, now: float | None = None) -> dict[str, float]:
        """Headroom per local scope, 0..1."""
        now = time.monotonic() if now is None else now
        found = {"number": self.account.headroom(now)}
        for name, scope in self.scopes.items():
            if not name.startswith("pair:"):
                found[name] = scope.headroom(now)
        return found


def _frac(*pcts: Any) -> float:
    values = [float(p) for p in pcts if isinstance(p, (int, float)) and not isinstance(p, bool)]
    return min(max(values, default=0.0), 100.0) / 100.0


def headroom_from_headers(headers: Any, now: float | None = None) -> dict[str, tuple[float, float | None]]:
    """scope -> (headroom 0..1, blocked_until epoch s or None) from Meta's usage headers
    (limits.md §5). Missing or garbled headers are skipped: absence means unknown, not idle."""
    now = time.time() if now is None else now
    out: dict[str, tuple[float, float | None]] = {}
    raw = headers.get("X-App-Usage")
    if raw:
        try:
            usage = json.loads(raw)
            out["app"] = (1.0 - _frac(usage.get("call_count"), usage.get("total_cputime"),
                                      usage.get("total_time")), None)
        except (ValueError, AttributeError):
            pass
    raw = headers.get("X-Business-Use-Case-Usage")
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
