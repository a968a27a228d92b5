"""Applies canonical events to the contacts / conversations / messages tables, one batch per
transaction, idempotently: a message is counted once however often it is delivered, a status never
moves backwards, ``first_seen`` is the earliest time ever seen, a contact's ``name`` is that of
their latest named event. An unsent message keeps its row without content; an edit rewrites the
original's row (``edit_target``). Ids never hold ``/`` (``doc_id``), conversation ids included.
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
from gateway.events import STORED_EXTRAS, Event, customer_wrote, edit_target
from gateway.journal.writer import rows_in
from gateway.sink import Record, SqliteSink
from sinks.storage.schema import (
    CONVERSATION_MERGE,
    SCHEMA,
    STATUS_RANK,
    doc_id,
    migrate,
)

_EXTRA = STORED_EXTRAS
_extra_values = operator.attrgetter(*_EXTRA)
_NO_EXTRA = tuple(False if name == "standby" else None for name in _EXTRA)  # the defaults
_RANK_SQL = " ".join(f"WHEN '{s}' THEN {r}" for s, r in STATUS_RANK.items())


class StorageConfig(SinkConfig):
    """``[sinks.storage]``: ``path`` (default ``<data_dir>/storage.db``)."""

    path: str = ""


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
        return await self.erase_with(lambda c: erase(c, channel, contact_id))



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
    "media", "location", "error", "extra", "schema", "emoji", "edited_at")
_AT = {name: 1 + i for i, name in enumerate(_MESSAGE_COLUMNS)}  # a column's place in a row
_INSERT_MESSAGE = (  # over a stub (a status or reaction came first), which may hold an error
    f"INSERT INTO messages(id, {', '.join(_MESSAGE_COLUMNS)}) "
    f"VALUES (?, {', '.join('?' * len(_MESSAGE_COLUMNS))}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join("error = coalesce(excluded.error, error)" if k == "error" else f"{k} = excluded.{k}"
                for k in _MESSAGE_COLUMNS))
_UPSERT_CONVERSATION = (
    "INSERT INTO conversations(id, channel, account_id, contact_id, message_count,"
    " last_message_at, last_inbound_at, last_text) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    f"ON CONFLICT(id) DO UPDATE SET {CONVERSATION_MERGE}")
_NEWER_CONSENT = ("excluded.opted_out_at IS NOT NULL"
                  " AND excluded.opted_out_at >= coalesce(opted_out_at, '')")
_NEWER_NAME = "excluded.name_at >= coalesce(name_at, '')"  # NULL (no name): not newer
_NEWER_USER_ID = "excluded.user_id_at >= coalesce(user_id_at, '')"  # the same for the BSUID
_NEWER_USERNAME = "excluded.username_at >= coalesce(username_at, '')"  # ... and the username
_UPSERT_CONTACT = (
    "INSERT INTO contacts(id, channel, contact_id, name, account_id, first_seen, last_seen,"
    " last_inbound_at, opted_out, opted_out_at, name_at, user_id, user_id_at, username,"
    " username_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, 0), ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET"
    f" name = CASE WHEN {_NEWER_NAME} THEN excluded.name ELSE name END,"
    f" name_at = CASE WHEN {_NEWER_NAME} THEN excluded.name_at ELSE name_at END,"
    " account_id = coalesce(account_id, excluded.account_id),"
    " first_seen = min(first_seen, excluded.first_seen),"
    " last_seen = max(last_seen, excluded.last_seen),"
    " last_inbound_at = CASE WHEN excluded.last_inbound_at IS NULL THEN last_inbound_at"
    "   ELSE max(coalesce(last_inbound_at, ''), excluded.last_inbound_at) END,"
    f" opted_out = CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out ELSE opted_out END,"
    f" opted_out_at = CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out_at"
    "   ELSE opted_out_at END,"
    f" user_id = CASE WHEN {_NEWER_USER_ID} THEN excluded.user_id ELSE user_id END,"
    f" user_id_at = CASE WHEN {_NEWER_USER_ID} THEN excluded.user_id_at ELSE user_id_at END,"
    f" username = CASE WHEN {_NEWER_USERNAME} THEN excluded.username ELSE username END,"
    f" username_at = CASE WHEN {_NEWER_USERNAME} THEN excluded.username_at"
    "   ELSE username_at END")
_EDIT_MESSAGE = ("UPDATE messages SET type = ?, text = ?, payload = ?, media = ?, edited_at = ?"
                 " WHERE id = ?")
_SET_LAST_TEXT = "UPDATE conversations SET last_text = ? WHERE id = ? AND last_message_at = ?"


def _later(a: str | None, b: str | None) -> str | None:
    return b if a is None or (b is not None and b > a) else a


# What the batch knows of a message row, a plain tuple (the hot path builds one per message):
# (event_id: None for a stub, type, timestamp, edited_at).
_EVENT_ID, _TYPE, _TIMESTAMP, _EDITED_AT = range(4)


class _Batch:
    """Collects a batch's message rows, conversation counts and contact times, then writes each
    with one executemany. Rows already stored (a redelivery) are skipped, so counts never grow.
    The rarer changes to stored rows (an unsend, an edit) are written at once, in event order."""

    def __init__(self, c: sqlite3.Connection, events: list[Event],
                 consent: Consent | None = None) -> None:
        self.c = c
        self.consent = consent
        keys = list({doc_id(e.raw_type is not None and edit_target(e) or e.message_id or e.id)
                     for e in events if e.kind in ("message", "postback")})
        self.state: dict[str, tuple[str | None, ...]] = {
            key: tuple(known) for key, *known in rows_in(
                c, "SELECT id, event_id, type, timestamp, edited_at FROM messages"
                   " WHERE id IN ({marks})", keys)}
        self.rows: dict[str, list[Any]] = {}
        self.conversations: dict[str, list[Any]] = {}
        self.contacts: dict[str, list[Any]] = {}

    def message(self, ev: Event) -> None:
        if ev.raw_type is not None:  # most messages have none: no call
            target = edit_target(ev)
            if target is not None:
                self._edit(ev, target)
                return
        mid = ev.message_id or ev.id
        key = doc_id(mid)
        known = self.state.get(key)
        if known is not None and known[_EVENT_ID] is not None:
            if ev.type == "deleted":
                if known[_TYPE] != "deleted":
                    self._delete(key, ev)
                self.contact(ev)  # the customer's doing, as when the unsend came first
            elif known[_EVENT_ID] != ev.id:  # the message itself, after its unsend or edit
                self._original(ev, key, known)
            return  # already stored: a redelivery or a second event for the same message
        self._new(ev, key, mid, iso(ev), stand_in=ev.type == "deleted")

    def _new(self, ev: Event, key: str, mid: str, ts: str, edited_at: str | None = None,
             stand_in: bool = False) -> None:
        """A message's row; ``stand_in``: made by its unsend or edit, which came first. A
        stand-in has no ``timestamp`` and moves no conversation time until its original comes
        (:meth:`_original`): Meta keeps no order, and the unsend's or edit's time is not the
        message's."""
        conv = doc_id(ev.conversation_id)
        at = None if stand_in else ts
        self.state[key] = (ev.id, ev.type, at, edited_at)
        self.rows[key] = _message_row(ev, key, mid, conv, at, edited_at)
        self._count(ev, conv, at, ev.text)
        self.contact(ev, ts)

    def _original(self, ev: Event, key: str, known: tuple[str | None, ...]) -> None:
        """The original of a message whose unsend or edit came first: its row takes the
        original's ``event_id``, ``timestamp`` and ``reply_to`` and keeps its (blanked or
        edited) content; the conversation takes the original's time, with that content's text,
        as if the two had come in order."""
        ts = iso(ev)
        self.state[key] = (ev.id, known[_TYPE], ts, known[_EDITED_AT])
        row = self.rows.get(key)
        if row is None:
            text = self.c.execute(
                "UPDATE messages SET event_id = ?, timestamp = ?, reply_to = ? WHERE id = ?"
                " RETURNING text", (ev.id, ts, ev.reply_to, key)).fetchone()[0]
        else:
            row[_AT["event_id"]], row[_AT["timestamp"]] = ev.id, ts
            row[_AT["reply_to"]], text = ev.reply_to, row[_AT["text"]]
        self._count(ev, doc_id(ev.conversation_id), ts, text, 0)
        self.contact(ev, ts)  # still the customer's word: times, name, consent

    def _delete(self, key: str, ev: Event) -> None:
        event_id, _, at, edited_at = self.state[key]
        self.state[key] = (event_id, "deleted", at, edited_at)
        row = self.rows.get(key)
        if row is None:
            _mark_deleted(self.c, key)
        else:
            for column in ("text", "payload", "media", "location", "extra"):
                row[_AT[column]] = None
            row[_AT["type"]] = "deleted"
        self._last_text(ev, at, None, stored=row is None)

    def _edit(self, ev: Event, target: str) -> None:
        """An edit replaces the original's content (in place, uncounted); one that comes first
        stands in for the original, under its id; an older edit than the last applied, or one of
        an unsent message, changes nothing but the contact's times."""
        key, ts = doc_id(target), iso(ev)
        known = self.state.get(key)
        if known is None or known[_EVENT_ID] is None:
            self._new(msgspec.structs.replace(ev, message_id=target, reply_to=None,
                                              raw_type=None), key, target, ts, edited_at=ts,
                      stand_in=True)
            return
        if known[_TYPE] != "deleted" and (known[_EDITED_AT] is None or ts >= known[_EDITED_AT]):
            self.state[key] = (known[_EVENT_ID], ev.type, known[_TIMESTAMP], ts)
            media, row = _json(ev.media), self.rows.get(key)
            if row is None:
                self.c.execute(_EDIT_MESSAGE, (ev.type, ev.text, ev.payload, media, ts, key))
            else:
                for column, value in (("type", ev.type), ("text", ev.text),
                                      ("payload", ev.payload), ("media", media), ("edited_at", ts)):
                    row[_AT[column]] = value
            self._last_text(ev, known[_TIMESTAMP], ev.text, stored=row is None)
        self.contact(ev, ts)

    def _last_text(self, ev: Event, at: str | None, text: str | None, stored: bool) -> None:
        """``text`` becomes the conversation's ``last_text`` if the message of timestamp ``at``
        is its latest (``at`` equals ``last_message_at``), in the batch and on disk."""
        if at is None:  # a stand-in: not the conversation's latest until its original comes
            return
        conv_id = doc_id(ev.conversation_id)
        conv = self.conversations.get(conv_id)
        if conv is not None and conv[5] == at:
            conv[7] = text
        if stored:
            self.c.execute(_SET_LAST_TEXT, (text, conv_id, at))

    def _count(self, ev: Event, conv_id: str, ts: str | None, text: str | None,
               count: int = 1) -> None:
        """Add ``count`` messages to the conversation, and one of time ``ts`` (None: a stand-in,
        no time yet) and ``text``."""
        inbound = ts if ev.direction == "inbound" else None
        conv = self.conversations.get(conv_id)
        if conv is None:
            self.conversations[conv_id] = [
                conv_id, ev.channel, ev.account_id, ev.customer_id, count, ts, inbound,
                None if ts is None else text]
            return
        conv[4] += count
        if ts is not None and (conv[5] is None or ts >= conv[5]):
            conv[5], conv[7] = ts, text
        conv[6] = _later(conv[6], inbound)

    def contact(self, ev: Event, ts: str | None = None) -> None:
        ts = ts or iso(ev)
        inbound = ts if customer_wrote(ev) else None
        name = ev.sender.name if ev.direction == "inbound" else None
        name_at = ts if name else None
        key = doc_id(f"{ev.channel}:{ev.customer_id}")
        opted_out = self.consent.of(ev) if self.consent is not None else None
        consent_at = ts if opted_out is not None else None
        user_id = (ev.sender if ev.direction == "inbound" else ev.recipient).user_id
        user_id_at = ts if user_id else None
        username = ev.sender.username if ev.direction == "inbound" else None
        username_at = ts if username else None
        row = self.contacts.get(key)
        if row is None:
            self.contacts[key] = [key, ev.channel, ev.customer_id, name, ev.account_id, ts, ts,
                                  inbound, opted_out, consent_at, name_at, user_id, user_id_at,
                                  username, username_at]
            return
        if user_id_at is not None and (row[12] is None or user_id_at >= row[12]):
            row[11], row[12] = user_id, user_id_at  # the BSUID of the latest event naming one
        if username_at is not None and (row[14] is None or username_at >= row[14]):
            row[13], row[14] = username, username_at  # ... and the username
        if name_at is not None and (row[10] is None or name_at >= row[10]):
            row[3], row[10] = name, name_at  # the name of the latest event by timestamp
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


def _message_row(ev: Event, key: str, mid: str, conv: str, ts: str | None,
                 edited_at: str | None = None) -> list[Any]:
    """The ``messages`` row: ``key`` then the values of ``_MESSAGE_COLUMNS`` in order."""
    extra = None
    values = _extra_values(ev)
    if values != _NO_EXTRA:
        extra = {name: value for name, value in zip(_EXTRA, values, strict=True)
                 if value is not None and value is not False} or None
    return [key, mid, ev.id, ev.kind, ev.channel, ev.direction, ev.account_id, conv,
            ev.sender.id, ev.sender.name, ev.recipient.id, ts, ev.type, ev.text, ev.payload,
            ev.reply_to, _json(ev.media), _json(ev.location), _json(ev.error), _json(extra),
            ev.schema, ev.emoji, edited_at]


def _mark_deleted(c: sqlite3.Connection, key: str) -> None:
    c.execute("UPDATE messages SET type = 'deleted', text = NULL, payload = NULL, media = NULL, "
              "location = NULL, extra = NULL WHERE id = ?", (key,))


def _ensure_conversation(c: sqlite3.Connection, ev: Event) -> None:
    c.execute("INSERT OR IGNORE INTO conversations(id, channel, account_id, contact_id) "
              "VALUES (?, ?, ?, ?)",
              (doc_id(ev.conversation_id), ev.channel, ev.account_id, ev.customer_id))


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
              (key, mid, ev.channel, direction, ev.account_id, doc_id(ev.conversation_id)))
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
    if ev.pricing is not None:  # on sent and again on delivered or read: merged, a key once
        c.execute("UPDATE messages SET pricing = json_patch(?, coalesce(pricing, '{}'))"
                  " WHERE id = ?", (_json(ev.pricing), key))  # set keeps its value (any order)
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
    at = iso(ev)
    # Meta does not keep order (webhooks.md §3): a sender's older reaction or removal, arriving
    # after a newer one, changes nothing (reactions_at keeps the time of each sender's latest);
    # in the same second (whole seconds on WhatsApp) the greater emoji wins, a removal ("") last
    newer = ("reactions_at = json_set(coalesce(reactions_at, '{}'), ?, ?) WHERE id = ?"
             " AND (? > coalesce(json_extract(reactions_at, ?), '') OR (? = json_extract("
             "reactions_at, ?) AND ? >= coalesce(json_extract(reactions, ?), '')))")
    order = (at, path, at, path, ev.emoji, path)
    if ev.emoji:
        c.execute("UPDATE messages SET reactions = json_set(coalesce(reactions, '{}'), ?, ?), "
                  + newer, (path, ev.emoji, path, at, key, *order))
    else:
        c.execute("UPDATE messages SET reactions = json_remove(coalesce(reactions, '{}'), ?), "
                  + newer, (path, path, at, key, *order))
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
