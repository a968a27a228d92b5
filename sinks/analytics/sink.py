"""Aggregates canonical events into per-day figures, one transaction per batch.

- ``daily``: events per UTC day (of Meta's timestamp), channel, account, direction, kind, type.
- ``active``: which conversations had any event on a day (``count(*)`` per day = active ones).
- ``responses``: per day, channel and account, how many customer messages got a first reply and
  how long that took (sum, and counts under 1 min / 5 min / 1 h), by the same rule as
  ``gateway_response_time_seconds``: an inbound message starts the wait, the next outbound
  message or ``sent`` status of that conversation ends it.
- ``billing``: per day, channel and account, the messages Meta priced (WhatsApp statuses'
  ``pricing``), by category, pricing type and model, billable or not; each message once, on the
  day of its earliest priced status by Meta's timestamp whatever the order they come in
  (``priced`` keeps where each message is counted, for :data:`PRICED_KEEP_DAYS` at least: a
  message may be delivered, and priced again, days after it was sent).

Counting is exactly once: every counted event id is kept (``counted``, pruned after
``keep_days``), so the batch handed over again after a crash, a replayed dead letter, or the
concurrent retry lanes of a failed batch never count twice.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC

from gateway.config import SinkConfig
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.journal.writer import rows_in
from gateway.sink import Record, SqliteSink

SCHEMA = """
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL, channel TEXT NOT NULL, account_id TEXT NOT NULL, direction TEXT NOT NULL,
    kind TEXT NOT NULL, type TEXT NOT NULL, events INTEGER NOT NULL,
    PRIMARY KEY (day, channel, account_id, direction, kind, type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS active (
    day TEXT NOT NULL, channel TEXT NOT NULL, account_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (day, channel, account_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS responses (
    day TEXT NOT NULL, channel TEXT NOT NULL, account_id TEXT NOT NULL,
    replies INTEGER NOT NULL, seconds REAL NOT NULL, under_1m INTEGER NOT NULL,
    under_5m INTEGER NOT NULL, under_1h INTEGER NOT NULL,
    PRIMARY KEY (day, channel, account_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS waiting (
    conversation_id TEXT PRIMARY KEY, since REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replied (
    conversation_id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counted (id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counted_at ON counted(at);
CREATE TABLE IF NOT EXISTS billing (
    day TEXT NOT NULL, channel TEXT NOT NULL, account_id TEXT NOT NULL,
    category TEXT NOT NULL, pricing_type TEXT NOT NULL, pricing_model TEXT NOT NULL,
    billable INTEGER NOT NULL, messages INTEGER NOT NULL,
    PRIMARY KEY (day, channel, account_id, category, pricing_type, pricing_model, billable)
) WITHOUT ROWID;
"""
# where each priced message is counted (apart: a database of the first billing version remade it)
PRICED = """
CREATE TABLE IF NOT EXISTS priced (
    message_id TEXT PRIMARY KEY, at REAL NOT NULL,  -- when it was counted (for the prune)
    timestamp REAL NOT NULL, day TEXT NOT NULL,     -- the status it is counted by
    category TEXT NOT NULL, pricing_type TEXT NOT NULL, pricing_model TEXT NOT NULL,
    billable INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS priced_at ON priced(at);
"""
SCHEMA += PRICED
PRICED_KEEP_DAYS = 31  # WhatsApp keeps an undelivered message for 30 days: priced again then
_BUMP_DAILY = ("INSERT INTO daily VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
               "SET events = events + excluded.events")
_BUMP_BILLING = ("INSERT INTO billing VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                 "SET messages = messages + excluded.messages")
_BUMP_RESPONSES = (
    "INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
    "replies = replies + excluded.replies, seconds = seconds + excluded.seconds, "
    "under_1m = under_1m + excluded.under_1m, under_5m = under_5m + excluded.under_5m, "
    "under_1h = under_1h + excluded.under_1h")
PRUNE_SECONDS = 3600.0  # how often counted ids older than keep_days are dropped


DB_FILE = "analytics.db"  # under data_dir, unless [sinks.analytics] path says otherwise


class AnalyticsConfig(SinkConfig):
    """``[sinks.analytics]``: ``path`` (default ``<data_dir>/analytics.db``), ``keep_days``."""

    path: str = ""
    keep_days: int = 8  # counted event ids kept this long: redeliveries come within minutes

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.keep_days < 1:
            raise ConfigError("must be at least 1", f"{prefix}.keep_days")


class AnalyticsSink(SqliteSink):
    """The built-in analytics sink (SQLite)."""

    name = "analytics"

    def __init__(self, config: AnalyticsConfig) -> None:
        super().__init__(config, config.path, SCHEMA)
        self.config: AnalyticsConfig = config
        self._pruned = 0.0

    async def start(self) -> None:
        await super().start()
        await self._db.run(_migrate)

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """GDPR: the day tables' conversation ids name the customer; their rows go. The daily
        counts are anonymous and stay, and so do the opaque counted event ids."""
        suffix = ":" + contact_id.replace("/", "_")  # conversation ids end with the customer
        return await self.erase_with(lambda c: erase(c, channel, suffix))

    async def write(self, records: list[Record]) -> None:
        now = time.time()
        prune = now - self._pruned > PRUNE_SECONDS
        if prune:
            self._pruned = now
        cutoff = now - self.config.keep_days * 86400.0
        priced = now - max(self.config.keep_days, PRICED_KEEP_DAYS) * 86400.0
        events = [r.event for r in records]
        await self._db.run(lambda c: count(c, events, now, cutoff if prune else None,
                                           priced if prune else None))


def count(c: sqlite3.Connection, events: list[Event], now: float,
          prune_before: float | None = None, priced_before: float | None = None) -> None:
    """Add the events not counted yet, in order, to the day tables."""
    done = {row[0] for row in rows_in(c, "SELECT id FROM counted WHERE id IN ({marks})",
                                      list({e.id for e in events}))}
    daily: dict[tuple, int] = {}
    active: set[tuple] = set()
    for event in events:
        if event.id in done:
            continue
        done.add(event.id)
        c.execute("INSERT INTO counted VALUES (?, ?)", (event.id, now))
        day = event.timestamp.astimezone(UTC).strftime("%Y-%m-%d")
        where = (day, event.channel, event.account_id)
        key = (*where, event.direction, event.kind, event.type or "")
        daily[key] = daily.get(key, 0) + 1
        active.add((*where, event.conversation_id))
        _response(c, event, where)
        if event.pricing is not None and event.kind == "status" and event.message_id:
            _price(c, event, where, now)
    c.executemany(_BUMP_DAILY, [(*key, n) for key, n in daily.items()])
    c.executemany("INSERT OR IGNORE INTO active VALUES (?, ?, ?, ?)", list(active))
    if prune_before is not None:
        c.execute("DELETE FROM counted WHERE at < ?", (prune_before,))
    if priced_before is not None:
        c.execute("DELETE FROM priced WHERE at < ?", (priced_before,))


def _price(c: sqlite3.Connection, event: Event, where: tuple, now: float) -> None:
    """Count a priced message once: Meta prices it on ``sent`` and again on ``delivered`` or
    ``read``. It is counted on the day (and by the pricing) of its earliest priced status by
    Meta's timestamp: a later-stamped one changes nothing, an earlier-stamped one arriving
    after moves the count to its own day."""
    pricing = event.pricing or {}
    text = [pricing.get(key) for key in ("category", "type", "pricing_model")]
    key = (*(v if isinstance(v, str) else "" for v in text), int(pricing.get("billable") is True))
    ts = event.timestamp.timestamp()
    day, channel, account = where
    known = c.execute("SELECT timestamp, day, category, pricing_type, pricing_model, billable"
                      " FROM priced WHERE message_id = ?", (event.message_id,)).fetchone()
    if known is not None:
        if ts >= known[0]:
            return
        was = (known[1], channel, account, *known[2:])
        c.execute(_BUMP_BILLING, (*was, -1))
        c.execute("DELETE FROM billing WHERE day = ? AND channel = ? AND account_id = ?"
                  " AND category = ? AND pricing_type = ? AND pricing_model = ? AND billable = ?"
                  " AND messages <= 0", was)
    c.execute("INSERT INTO priced VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
              " timestamp = excluded.timestamp, day = excluded.day,"
              " category = excluded.category, pricing_type = excluded.pricing_type,"
              " pricing_model = excluded.pricing_model, billable = excluded.billable",
              (event.message_id, now, ts, day, *key))
    c.execute(_BUMP_BILLING, (day, channel, account, *key, 1))


def _migrate(c: sqlite3.Connection) -> None:
    """``priced`` as the first billing version made it (ids only): its ids are kept, counted
    where they are (a timestamp before any: a later status neither counts nor moves them)."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(priced)")}
    if "day" not in columns:
        c.execute("ALTER TABLE priced RENAME TO priced_ids")
        c.execute("DROP INDEX IF EXISTS priced_at")
        for statement in PRICED.split(";")[:-1]:  # not executescript: it would commit
            c.execute(statement)
        c.execute("INSERT OR IGNORE INTO priced SELECT message_id, at, -1e300, '', '', '', '',"
                  " 0 FROM priced_ids")
        c.execute("DROP TABLE priced_ids")


def _response(c: sqlite3.Connection, event: Event, where: tuple) -> None:
    """Start or end a conversation's wait for its first reply."""
    at = event.timestamp.timestamp()
    conversation = event.conversation_id
    if event.kind == "message" and event.direction == "inbound":
        last = c.execute("SELECT at FROM replied WHERE conversation_id = ?",
                         (conversation,)).fetchone()
        if last is None or last[0] <= at:  # not a message older than a reply counted already
            c.execute("INSERT OR IGNORE INTO waiting VALUES (?, ?)", (conversation, at))
        return
    replied = (event.kind == "message" and event.direction == "outbound") or (
        event.kind == "status" and event.status == "sent")
    if not replied:
        return
    c.execute("INSERT INTO replied VALUES (?, ?) ON CONFLICT DO UPDATE "
              "SET at = max(at, excluded.at)", (conversation, at))
    row = c.execute("DELETE FROM waiting WHERE conversation_id = ? AND since <= ? "
                    "RETURNING since", (conversation, at)).fetchone()
    if row is None:  # nobody waiting, or a late older reply: the wait stands
        return
    took = at - row[0]
    c.execute(_BUMP_RESPONSES, (*where, 1, took, int(took < 60), int(took < 300),
                                int(took < 3600)))


def erase(c: sqlite3.Connection, channel: str, suffix: str) -> dict[str, int]:
    """Delete the conversation rows of one customer (``suffix``: ``:<contact_id>``)."""
    mine = "substr(conversation_id, 1, ?) = ? AND substr(conversation_id, ?) = ?"
    args = (len(channel) + 1, channel + ":", -len(suffix), suffix)
    active = c.execute(f"DELETE FROM active WHERE channel = ? AND {mine}",
                       (channel, *args)).rowcount
    pending = sum(c.execute(f"DELETE FROM {table} WHERE {mine}", args).rowcount
                  for table in ("waiting", "replied"))
    return {"conversation_days": active, "conversation_states": pending}
