"""How canonical events change the three Firestore collections (CONTRACT §8), as pure functions.

The meaning is the SQLite ``storage`` sink's, rule for rule: a message is stored and counted once
however often it is delivered (a document with an ``event_id`` is stored), a status never moves
backwards (``STATUS_RANK``), ``first_seen`` is the earliest time ever seen and ``last_seen`` /
``last_inbound_at`` the latest, a contact's ``name`` is that of the latest named event
(``name_at``), an unsent message keeps its row but loses its content (and its text leaves
``last_text`` when it was the latest), an edit rewrites the original's content in place
(``edit_target``), reactions are a map by sender id, and every event touching a conversation makes
sure its document exists. A message document's ``conversation_id`` is its conversation's document
id (``doc_id``), which the erasure's query relies on.

A :class:`Plan` starts from documents as read and applies events in order; :meth:`Plan.changes`
then says which documents to create and which top-level fields to update. Nothing changes for an
event already applied, so a redelivered or crash-replayed batch produces no write at all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from gateway.consent import Consent
from gateway.events import STORED_EXTRAS, Event, customer_wrote, edit_target
from sinks.storage.schema import STATUS_RANK, doc_id

MESSAGES, CONVERSATIONS, CONTACTS = "messages", "conversations", "contacts"
# Canonical fields of CONTRACT §5 written on every message document (null when absent).
CANONICAL = ("schema", "kind", "channel", "direction", "account_id", "conversation_id", "sender",
             "recipient", "timestamp", "message_id", "type", "text", "payload", "reply_to", "media",
             "location", "error", "emoji")
# Meta's detail the contract has no field for: written only when present.
EXTRA = STORED_EXTRAS
BLANKED = ("text", "payload", "media", "location")  # an unsent message loses these and EXTRA
DELETE = object()  # marks a field to remove (the sink maps it to firestore.DELETE_FIELD)


class Key(NamedTuple):
    """A document: its collection (without prefix) and id."""

    collection: str
    id: str


class Change(NamedTuple):
    """One write: ``create`` a new document with ``fields``, or update these top-level fields."""

    key: Key
    create: bool
    fields: dict[str, Any]


def message_key(ev: Event) -> Key:
    """The document of the message ``ev`` is about: an edit's is the edited message's."""
    return Key(MESSAGES, doc_id(edit_target(ev) or ev.message_id or ev.id))


def conversation_key(ev: Event) -> Key:
    return Key(CONVERSATIONS, doc_id(ev.conversation_id))


def contact_key(ev: Event) -> Key:
    return Key(CONTACTS, doc_id(f"{ev.channel}:{ev.customer_id}"))


def keys_of(ev: Event) -> list[Key]:
    """Every document ``ev`` may change (what to read, and a bound on its writes)."""
    keys = [conversation_key(ev)]
    if ev.kind in ("message", "postback") or (ev.message_id and ev.kind in ("status", "read",
                                                                           "reaction")):
        keys.append(message_key(ev))
    if ev.kind != "status":
        keys.append(contact_key(ev))
    return keys


def keys_to_read(ev: Event) -> list[Key]:
    """What must be read before applying ``ev``. A new message's own document is assumed
    absent and created with a precondition: if it exists after all (a redelivery), the commit
    fails and the sink re-reads everything (``keys_of``) — one read fewer per fresh message.
    An unsend or an edit is about a message usually stored: its document is read."""
    keys = keys_of(ev)
    if ev.kind not in ("message", "postback") or ev.type == "deleted" or edit_target(ev):
        return keys
    return [k for k in keys if k.collection != MESSAGES]


# A message document's own fields (CONTRACT §8), null until a status or reaction sets them, as
# the storage sink's columns are: ``where("status", "==", None)`` finds what ``IS NULL`` finds.
UNSET: dict[str, Any] = {"status": None, "status_updated_at": None, "reactions": None,
                         "edited_at": None, "pricing": None}


def message_document(ev: Event) -> dict[str, Any]:
    """Every canonical field of a message event; nested values as maps, instants as timestamps."""
    doc = {name: getattr(ev, name) for name in CANONICAL}
    for name in ("sender", "recipient", "media", "location", "error"):
        if doc[name] is not None:
            doc[name] = msgspec.to_builtins(doc[name])
    doc.update(kind=ev.kind, event_id=ev.id, message_id=ev.message_id or ev.id,
               conversation_id=doc_id(ev.conversation_id))
    for name in EXTRA:
        value = getattr(ev, name)
        if value not in (None, False):
            doc[name] = msgspec.to_builtins(value)
    return doc


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a


def _rank(status: str | None) -> int:
    return STATUS_RANK.get(status or "", 0)


class Plan:
    """Documents as read (``base``: None = absent) and the events applied to working copies."""

    def __init__(self, base: dict[Key, dict[str, Any] | None],
                 consent: Consent | None = None) -> None:
        self.base = base
        self.consent = consent  # sets contacts' opted_out from inbound keywords
        self.docs: dict[Key, dict[str, Any] | None] = {}

    def doc(self, key: Key) -> dict[str, Any] | None:
        if key not in self.docs:
            base = self.base.get(key)  # nested values are replaced, never changed in place
            self.docs[key] = None if base is None else dict(base)
        return self.docs[key]

    def apply(self, ev: Event) -> None:
        """Apply one event (events of one conversation in their order)."""
        if ev.kind in ("message", "postback"):
            self._message(ev)
        elif ev.kind == "status":
            self._status(ev, ev.status)
        elif ev.kind == "read":
            self._status(ev, "read")
            self._touch(ev)
        elif ev.kind == "reaction":
            self._reaction(ev)
        else:  # referral, handover: the contact was active
            self._touch(ev)

    def changes(self) -> list[Change]:
        """The writes that take ``base`` to the working copies (none for what did not change)."""
        out = []
        for key, doc in self.docs.items():
            before = self.base.get(key)
            if doc is None or doc == before:
                continue
            if before is None:
                out.append(Change(key, True, doc))
                continue
            fields: dict[str, Any] = {k: v for k, v in doc.items()
                                      if k not in before or before[k] != v}
            fields.update({k: DELETE for k in before if k not in doc})
            out.append(Change(key, False, fields))
        return out

    def _message(self, ev: Event) -> None:
        target = edit_target(ev)
        if target is not None:
            self._edit(ev, target)
            return
        key = message_key(ev)
        current = self.doc(key)
        if current is not None and current.get("event_id"):
            if ev.type == "deleted":
                if current.get("type") != "deleted":
                    _blank(current)
                    self._last_text(ev, current.get("timestamp"), None)
                self._contact(ev)  # the customer's doing, as when the unsend came first
            elif current["event_id"] != ev.id:  # the message itself, after its unsend or edit
                self._original(ev, current)
            return  # stored already: a redelivery, or a second event for the same message
        self._new(ev, key, current, stand_in=ev.type == "deleted")

    def _new(self, ev: Event, key: Key, current: dict[str, Any] | None,
             edited_at: datetime | None = None, stand_in: bool = False) -> None:
        """A message's document; ``stand_in``: made by its unsend or edit, which came first:
        no ``timestamp`` and no conversation time until its original comes (the storage
        sink's rule)."""
        doc = self.docs[key] = {**UNSET, **(current or {}), **message_document(ev)}
        if doc["error"] is None and current:  # a failed status's error, on its stub, stays
            doc["error"] = current.get("error")
        if edited_at is not None:
            doc["edited_at"] = edited_at
        if stand_in:
            doc["timestamp"] = None
        conv = self._conversation(ev)
        conv["message_count"] = (conv.get("message_count") or 0) + 1
        if not stand_in:
            self._merge_times(ev, conv, ev.text)
        self._contact(ev)

    def _original(self, ev: Event, doc: dict[str, Any]) -> None:
        """The original of a message whose unsend or edit came first: it takes the original's
        ``event_id``, ``timestamp`` and ``reply_to`` and keeps its content; the conversation
        takes the original's time with that content's text."""
        doc.update(event_id=ev.id, timestamp=ev.timestamp, reply_to=ev.reply_to)
        self._merge_times(ev, self._conversation(ev), doc.get("text"))
        self._contact(ev)  # still the customer's word: times, name, consent

    @staticmethod
    def _merge_times(ev: Event, conv: dict[str, Any], text: str | None) -> None:
        last = conv.get("last_message_at")
        if last is None or ev.timestamp >= last:
            conv["last_message_at"], conv["last_text"] = ev.timestamp, text
        if ev.direction == "inbound":
            conv["last_inbound_at"] = _later(conv.get("last_inbound_at"), ev.timestamp)

    def _edit(self, ev: Event, target: str) -> None:
        """An edit replaces the original's content (in place, uncounted); one that comes first
        stands in for the original, under its id; an older edit than the last applied, or one of
        an unsent message, changes nothing but the contact's times."""
        key = message_key(ev)
        current = self.doc(key)
        if current is None or not current.get("event_id"):
            original = msgspec.structs.replace(ev, message_id=target, reply_to=None, raw_type=None)
            self._new(original, key, current, edited_at=ev.timestamp, stand_in=True)
            return
        edited = current.get("edited_at")
        if current.get("type") != "deleted" and (edited is None or ev.timestamp >= edited):
            media = None if ev.media is None else msgspec.to_builtins(ev.media)
            current.update(type=ev.type, text=ev.text, payload=ev.payload, media=media,
                           edited_at=ev.timestamp)
            self._last_text(ev, current.get("timestamp"), ev.text)
        self._contact(ev)

    def _last_text(self, ev: Event, at: datetime | None, text: str | None) -> None:
        """``text`` becomes ``last_text`` if the message of timestamp ``at`` is the latest."""
        conv = self.doc(conversation_key(ev))
        if conv is not None and at is not None and conv.get("last_message_at") == at:
            conv["last_text"] = text

    def _stub(self, ev: Event, direction: str) -> dict[str, Any]:
        """The document of a message not seen yet (statuses and reactions can come first)."""
        key = message_key(ev)
        doc = self.doc(key)
        if doc is None:
            doc = self.docs[key] = {
                **UNSET, "message_id": ev.message_id, "channel": ev.channel,
                "direction": direction, "account_id": ev.account_id,
                "conversation_id": doc_id(ev.conversation_id)}
        return doc

    def _status(self, ev: Event, status: str | None) -> None:
        if not ev.message_id or status not in STATUS_RANK:
            return
        doc = self._stub(ev, "outbound")
        if _rank(doc.get("status")) < STATUS_RANK[status]:
            doc["status"], doc["status_updated_at"] = status, ev.timestamp
            if ev.error is not None:
                doc["error"] = msgspec.to_builtins(ev.error)
        if ev.pricing is not None:  # merged: a key keeps its first value (the storage rule)
            doc["pricing"] = {**ev.pricing, **(doc.get("pricing") or {})}
        self._conversation(ev)

    def _reaction(self, ev: Event) -> None:
        if not ev.message_id:
            return
        doc = self._stub(ev, "outbound" if ev.direction == "inbound" else "inbound")
        times = dict(doc.get("reactions_at") or {})  # each sender's latest reaction: an older
        latest = times.get(ev.sender.id)  # one arriving later changes nothing (no order kept);
        reactions = dict(doc.get("reactions") or {})  # in one second the greater emoji wins
        if latest is None or ev.timestamp > latest or (
                ev.timestamp == latest and ev.emoji >= reactions.get(ev.sender.id, "")):
            if ev.emoji:
                reactions[ev.sender.id] = ev.emoji
            else:
                reactions.pop(ev.sender.id, None)
            times[ev.sender.id] = ev.timestamp
            doc["reactions"], doc["reactions_at"] = reactions, times
        self._touch(ev)

    def _touch(self, ev: Event) -> None:
        self._contact(ev)
        self._conversation(ev)

    def _conversation(self, ev: Event) -> dict[str, Any]:
        key = conversation_key(ev)
        doc = self.doc(key)
        if doc is None:
            doc = self.docs[key] = {
                "channel": ev.channel, "account_id": ev.account_id, "contact_id": ev.customer_id,
                "message_count": 0, "last_message_at": None, "last_inbound_at": None,
                "last_text": None}
        return doc

    def _contact(self, ev: Event) -> None:
        key = contact_key(ev)
        doc = self.doc(key)
        inbound = ev.direction == "inbound"
        if doc is None:
            doc = self.docs[key] = {
                "channel": ev.channel, "contact_id": ev.customer_id, "name": None,
                "name_at": None, "account_id": ev.account_id, "first_seen": ev.timestamp,
                "last_seen": ev.timestamp, "last_inbound_at": None, "opted_out": False,
                "opted_out_at": None, "user_id": None, "user_id_at": None, "username": None,
                "username_at": None}
        user_id = (ev.sender if inbound else ev.recipient).user_id
        if user_id is not None:
            given = doc.get("user_id_at")
            if given is None or ev.timestamp >= given:  # the BSUID of the latest event naming one
                doc["user_id"], doc["user_id_at"] = user_id, ev.timestamp
        if inbound and ev.sender.username:
            given = doc.get("username_at")
            if given is None or ev.timestamp >= given:  # the username of the latest event
                doc["username"], doc["username_at"] = ev.sender.username, ev.timestamp
        if inbound and ev.sender.name:
            named = doc.get("name_at")
            if named is None or ev.timestamp >= named:  # the name of the latest event
                doc["name"], doc["name_at"] = ev.sender.name, ev.timestamp
        if doc.get("account_id") is None:
            doc["account_id"] = ev.account_id
        first = doc.get("first_seen")
        doc["first_seen"] = ev.timestamp if first is None else min(first, ev.timestamp)
        doc["last_seen"] = _later(doc.get("last_seen"), ev.timestamp)
        if customer_wrote(ev):
            doc["last_inbound_at"] = _later(doc.get("last_inbound_at"), ev.timestamp)
        opted_out = self.consent.of(ev) if self.consent is not None else None
        if opted_out is not None:
            at = doc.get("opted_out_at")
            if at is None or ev.timestamp >= at:  # the latest word on consent wins
                doc["opted_out"], doc["opted_out_at"] = opted_out, ev.timestamp


def _blank(doc: dict[str, Any]) -> None:
    doc["type"] = "deleted"
    doc.update({name: None for name in BLANKED})
    for name in EXTRA:
        doc.pop(name, None)
