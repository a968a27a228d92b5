"""Applies canonical events to the contacts / conversations / messages tables, one batch per
transaction, idempotently: a message is counted once however often it is delivered, a status never
moves backwards, ``first_seen`` is the earliest time ever seen.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from datetime import UTC, datetime
from typing import Any

import msgspec

from gateway.config import SinkConfig
from gateway.consent import Consent
from gateway.events import Event
from gateway.journal.writer import rows_in
from gateway.sink import Record, SqliteSink
from sinks.storage.schema import SCHEMA, STATUS_RANK, migrate

_EXTRA = ("raw_type", "standby", "story_id", "callback_data", "referral", "order", "system",
          "contacts", "handover")
_extra_values = operator.attrgetter(*_EXTRA)
_NO_EXTRA = tuple(False if name == "standby" else None for name in _EXTRA)  # the defaults
_RANK_SQL = " ".join(f"WHEN '{s}' THEN {r}" for s, r in STATUS_RANK.items())


class StorageConfig(SinkConfig):
    """``[sinks.storage]``: ``path`` (default ``<data_dir>/storage.db``)."""

    path: str = ""


def doc_id(value: str) -> str:
    """Document ids never contain ``/`` (CONTRACT §8)."""
    return value.replace("/", "_")


def iso(event: Event) -> str:
    """Fixed-width RFC 3339 UTC (microseconds, ``Z``), so that text comparison orders instants."""
    return _iso(event.timestamp)


@functools.lru_cache(maxsize=4096)  # the events of one second share their timestamp
def _iso(t: datetime) -> str:
    if t.utcoffset():
        t = t.astimezone(UTC)
    return t.isoformat(timespec="microseconds")[:26] + "Z"


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class StorageSink(SqliteSink):
    """The embedded default storage (SQLite)."""

    name = "storage"

    def __init__(self, config: StorageConfig, consent: Consent | None = None) -> None:
        super().__init__(config, config.path, SCHEMA)
        self.config: StorageConfig = config
        self.consent = consent

    async def start(self) -> None:
        await super().start()
        await self._db.run(migrate)

    async def write(self, records: list[Record]) -> None:
        events = [r.event for r in records]
        await self._db.run(lambda c: apply_all(c, events, self.consent))

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        return await self._db.run(lambda c: erase(c, channel, contact_id))



def apply_all(c: sqlite3.Connection, events: list[Event], consent: Consent | None = None) -> None:
    """Apply a batch in order, with one statement per kind of write where the batch allows.

    ``consent`` (the gateway's opt-out / opt-in keywords) sets ``contacts.opted_out`` from
    inbound messages; the latest decision by timestamp wins."""
    batch = _Batch(c, events, consent)
    for event in events:
        if event.kind in ("message", "postback"):
            batch.message(event)
        else:
            APPLY.get(event.kind, _touch_contact)(batch, event)
    batch.flush()


_MESSAGE_COLUMNS = (
    "message_id", "event_id", "kind", "channel", "direction", "account_id", "conversation_id",
    "sender_id", "sender_name", "recipient_id", "timestamp", "type", "text", "payload", "reply_to",
    "media", "location", "error", "extra", "schema", "emoji")
_INSERT_MESSAGE = (
    f"INSERT INTO messages(id, {', '.join(_MESSAGE_COLUMNS)}) "
    f"VALUES (?, {', '.join('?' * len(_MESSAGE_COLUMNS))}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{k} = excluded.{k}" for k in _MESSAGE_COLUMNS))
_UPSERT_CONVERSATION = (
    "INSERT INTO conversations(id, channel, account_id, contact_id, message_count,"
    " last_message_at, last_inbound_at, last_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET message_count = message_count + excluded.message_count,"
    " last_text = CASE WHEN excluded.last_message_at >= coalesce(last_message_at, '')"
    "   THEN excluded.last_text ELSE last_text END,"
    " last_message_at = max(coalesce(last_message_at, ''), excluded.last_message_at),"
    " last_inbound_at = CASE WHEN excluded.last_inbound_at IS NULL THEN last_inbound_at"
    "   ELSE max(coalesce(last_inbound_at, ''), excluded.last_inbound_at) END")
_NEWER_CONSENT = ("excluded.opted_out_at IS NOT NULL"
                  " AND excluded.opted_out_at >= coalesce(opted_out_at, '')")
_UPSERT_CONTACT = (
    "INSERT INTO contacts(id, channel, contact_id, name, account_id, first_seen, last_seen,"
    " last_inbound_at, opted_out, opted_out_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, 0), ?) "
    "ON CONFLICT(id) DO UPDATE SET name = coalesce(excluded.name, name),"
    " account_id = coalesce(account_id, excluded.account_id),"
    " first_seen = min(first_seen, excluded.first_seen),"
    " last_seen = max(last_seen, excluded.last_seen),"
    " last_inbound_at = CASE WHEN excluded.last_inbound_at IS NULL THEN last_inbound_at"
    "   ELSE max(coalesce(last_inbound_at, ''), excluded.last_inbound_at) END,"
    f" opted_out = CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out ELSE opted_out END,"
    f" opted_out_at = CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out_at"
    "   ELSE opted_out_at END")


def _later(a: str | None, b: str | None) -> str | None:
    return b if a is None or (b is not None and b > a) else a


class _Batch:
    """Collects a batch's message rows, conversation counts and contact times, then writes each
    with one executemany. Rows already stored (a redelivery) are skipped, so counts never grow."""

    def __init__(self, c: sqlite3.Connection, events: list[Event],
                 consent: Consent | None = None) -> None:
        self.c = c
        self.consent = consent
        keys = list({doc_id(e.message_id or e.id) for e in events
                     if e.kind in ("message", "postback")})
        self.state: dict[str, tuple[str | None, str | None]] = {  # doc id -> (event_id, type)
            key: (eid, kind) for key, eid, kind in rows_in(
                c, "SELECT id, event_id, type FROM messages WHERE id IN ({marks})", keys)}
        self.rows: dict[str, list[Any]] = {}
        self.conversations: dict[str, list[Any]] = {}
        self.contacts: dict[str, list[Any]] = {}

    def message(self, ev: Event) -> None:
        mid = ev.message_id or ev.id
        key = doc_id(mid)
        known = self.state.get(key)
        if known is not None and known[0] is not None:
            if ev.type == "deleted" and known[1] != "deleted":
                self._delete(key)
            return  # already stored: a redelivery or a second event for the same message
        self.state[key] = (ev.id, ev.type)
        ts = iso(ev)
        self.rows[key] = _message_row(ev, key, mid, ts)
        self._count(ev, ts)
        self.contact(ev, ts)

    def _delete(self, key: str) -> None:
        self.state[key] = (self.state[key][0], "deleted")
        row = self.rows.get(key)
        if row is None:
            _mark_deleted(self.c, key)
            return
        for column in ("type", "text", "payload", "media", "location", "extra"):
            row[1 + _MESSAGE_COLUMNS.index(column)] = "deleted" if column == "type" else None

    def _count(self, ev: Event, ts: str) -> None:
        inbound = ts if ev.direction == "inbound" else None
        conv = self.conversations.get(ev.conversation_id)
        if conv is None:
            self.conversations[ev.conversation_id] = [
                ev.conversation_id, ev.channel, ev.account_id, ev.customer_id, 1, ts, inbound,
                ev.text]
            return
        conv[4] += 1
        if ts >= conv[5]:
            conv[5], conv[7] = ts, ev.text
        conv[6] = _later(conv[6], inbound)

    def contact(self, ev: Event, ts: str | None = None) -> None:
        ts = ts or iso(ev)
        inbound = ts if ev.direction == "inbound" else None
        name = ev.sender.name if ev.direction == "inbound" else None
        key = doc_id(f"{ev.channel}:{ev.customer_id}")
        opted_out = self.consent.of(ev) if self.consent is not None else None
        consent_at = ts if opted_out is not None else None
        row = self.contacts.get(key)
        if row is None:
            self.contacts[key] = [key, ev.channel, ev.customer_id, name, ev.account_id, ts, ts,
                                  inbound, opted_out, consent_at]
            return
        row[3] = name or row[3]
        row[5], row[6] = min(row[5], ts), max(row[6], ts)
        row[7] = _later(row[7], inbound)
        if consent_at is not None and (row[9] is None or consent_at >= row[9]):
            row[8], row[9] = opted_out, consent_at  # the latest word on consent wins

    def flush(self) -> None:
        if self.rows:
            self.c.executemany(_INSERT_MESSAGE, list(self.rows.values()))
        if self.conversations:
            self.c.executemany(_UPSERT_CONVERSATION, list(self.conversations.values()))
        if self.contacts:
            self.c.executemany(_UPSERT_CONTACT, list(self.contacts.values()))


def _message_row(ev: Event, key: str, mid: str, ts: str) -> list[Any]:
    """The ``messages`` row: ``key`` then the values of ``_MESSAGE_COLUMNS`` in order."""
    extra = None
    values = _extra_values(ev)
    if values != _NO_EXTRA:
        extra = {name: value for name, value in zip(_EXTRA, values, strict=True)
                 if value is not None and value is not False} or None
    return [key, mid, ev.id, ev.kind, ev.channel, ev.direction, ev.account_id, ev.conversation_id,
            ev.sender.id, ev.sender.name, ev.recipient.id, ts, ev.type, ev.text, ev.payload,
            ev.reply_to, _json(ev.media), _json(ev.location), _json(ev.error), _json(extra),
            ev.schema, ev.emoji]


def _mark_deleted(c: sqlite3.Connection, key: str) -> None:
    c.execute("UPDATE messages SET type = 'deleted', text = NULL, payload = NULL, media = NULL, "
              "location = NULL, extra = NULL WHERE id = ?", (key,))


def _ensure_conversation(c: sqlite3.Connection, ev: Event) -> None:
    c.execute("INSERT OR IGNORE INTO conversations(id, channel, account_id, contact_id) "
              "VALUES (?, ?, ?, ?)",
              (ev.conversation_id, ev.channel, ev.account_id, ev.customer_id))


def _touch_contact(batch: _Batch, ev: Event) -> None:
    """A reaction, read, referral or handover: the contact was active; the conversation exists.
    The contact's row joins the batch's, so that the batch's events apply in their order (the
    latest name, the first account), as Firestore applies them."""
    batch.contact(ev)
    _ensure_conversation(batch.c, ev)


def _stub(c: sqlite3.Connection, ev: Event, mid: str, direction: str) -> str:
    """The row of a message we may not have seen yet (statuses and reactions can come first)."""
    key = doc_id(mid)
    c.execute("INSERT OR IGNORE INTO messages(id, message_id, channel, direction, account_id,"
              " conversation_id) VALUES (?, ?, ?, ?, ?, ?)",
              (key, mid, ev.channel, direction, ev.account_id, ev.conversation_id))
    return key


def _apply_status(batch: _Batch, ev: Event, status: str | None = None) -> None:
    c = batch.c
    status = status or ev.status
    if not ev.message_id or status not in STATUS_RANK:
        return
    key = _stub(c, ev, ev.message_id, "outbound")
    c.execute(
        f"UPDATE messages SET status = ?, status_updated_at = ?, error = coalesce(?, error) "
        f"WHERE id = ? AND (CASE status {_RANK_SQL} ELSE 0 END) < (CASE ? {_RANK_SQL} ELSE 0 END)",
        (status, iso(ev), _json(ev.error), key, status))
    _ensure_conversation(c, ev)


def _apply_read(batch: _Batch, ev: Event) -> None:
    _apply_status(batch, ev, "read")
    _touch_contact(batch, ev)


def _apply_reaction(batch: _Batch, ev: Event) -> None:
    c = batch.c
    if not ev.message_id:
        return
    key = _stub(c, ev, ev.message_id, "outbound" if ev.direction == "inbound" else "inbound")
    path = '$."' + ev.sender.id.replace('"', "") + '"'
    if ev.emoji:
        c.execute("UPDATE messages SET reactions = json_set(coalesce(reactions, '{}'), ?, ?) "
                  "WHERE id = ?", (path, ev.emoji, key))
    else:
        c.execute("UPDATE messages SET reactions = json_remove(coalesce(reactions, '{}'), ?) "
                  "WHERE id = ?", (path, key))
    _touch_contact(batch, ev)


APPLY = {
    "status": _apply_status,
    "read": _apply_read,
    "reaction": _apply_reaction,
}


def erase(c: sqlite3.Connection, channel: str, contact_id: str) -> dict[str, int]:
    """Delete one contact, their conversations and messages; return the counts removed."""
    convs = [r[0] for r in c.execute(
        "SELECT id FROM conversations WHERE channel = ? AND contact_id = ?", (channel, contact_id))]
    messages = 0
    for conv in convs:
        messages += c.execute("DELETE FROM messages WHERE conversation_id = ?", (conv,)).rowcount
    conversations = c.execute("DELETE FROM conversations WHERE channel = ? AND contact_id = ?",
                              (channel, contact_id)).rowcount
    contacts = c.execute("DELETE FROM contacts WHERE id = ?",
                         (doc_id(f"{channel}:{contact_id}"),)).rowcount
    return {"contacts": contacts, "conversations": conversations, "messages": messages}
