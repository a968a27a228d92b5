"""WhatsApp Cloud API webhook → canonical events (CONTRACT §5, meta/webhooks.md §4).

Every entry × change × message / status yields one event; nothing is read at ``[0]`` only. Ids
come only from Meta's fields: a message's wamid, a status's (wamid, status), so a redelivery keeps
its ids. Mapping choices (shared/fixtures/README.md "Conventions"):

- inbound: ``account_id`` = ``recipient.id`` = ``metadata.phone_number_id``; ``sender.name`` from the
  ``value.contacts`` item whose ``wa_id`` equals ``from`` (never from a shared contact card);
- statuses: ``direction`` outbound, sender = the business number, recipient = ``recipient_id``;
- reactions: ``kind`` reaction, ``message_id`` = the message reacted to, ``emoji`` "" on removal;
- ``revoke`` (the user deleted a message) → ``type`` deleted for the original wamid;
- ``edit`` → a text message with its own wamid whose ``reply_to`` is the edited message;
- a referral rides on its message (extra field); value-level ``errors[]`` and other subscription
  fields (templates, account updates, ``user_preferences``) yield no event.
"""

from __future__ import annotations

from typing import Any

from channels.envelope import as_str, decode_each, parse_envelope as _parse
from channels.whatsapp import schemas
from channels.whatsapp.content import content, first_error
from gateway.events import (
    SCHEMA_VERSION,
    Event,
    Message,
    Party,
    Reaction,
    Status,
    conversation_id,
    event_id,
    from_epoch_seconds,
)

CHANNEL = "whatsapp"
OBJECTS = frozenset({"whatsapp_business_account"})


def parse_envelope(body: bytes) -> None:
    """The intake's cheap check: JSON with ``object: whatsapp_business_account`` and an entry list.

    Raises:
        BadPayload: not JSON, or not a WhatsApp envelope.
    """
    _parse(body, OBJECTS)


def normalise(body: bytes) -> list[Event]:
    """Every canonical event in one webhook body.

    Raises:
        BadPayload: not JSON, or not a WhatsApp envelope.
    """
    events: list[Event] = []
    for entry in decode_each(_parse(body, OBJECTS).entry, schemas.entry_decoder):
        for change in decode_each(entry.changes, schemas.change_decoder):
            if change.field == "messages":
                events.extend(_value(change.value))
    return events


def _value(raw: Any) -> list[Event]:
    value = decode_each([raw], schemas.value_decoder)
    if not value or value[0].metadata is None:
        return []
    value = value[0]
    account = as_str(value.metadata.phone_number_id)
    if account is None:
        return []
    names = {as_str(c.wa_id): c.profile.name for c in decode_each(value.contacts, schemas.contact_decoder)
             if c.profile is not None}
    events: list[Event] = []
    for message in decode_each(value.messages, schemas.message_decoder):
        event = _message(message, account, names)
        if event is not None:
            events.append(event)
    for status in decode_each(value.statuses, schemas.status_decoder):
        event = _status(status, account)
        if event is not None:
            events.append(event)
    return events


def _timestamp(value: Any):
    try:
        return from_epoch_seconds(value)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _customer(m: schemas.Message) -> str | None:
    customer = as_str(m.from_)
    if customer is None and isinstance(m.system, dict):  # user_changed_user_id has no "from"
        customer = as_str(m.system.get("user_id")) or as_str(m.system.get("previous_user_id"))
    return customer


def _message(m: schemas.Message, account: str, names: dict) -> Event | None:
    customer = _customer(m)
    when = _timestamp(m.timestamp)
    if not m.id or customer is None or when is None:
        return None
    common = dict(
        schema=SCHEMA_VERSION, channel=CHANNEL, direction="inbound", account_id=account,
        conversation_id=conversation_id(CHANNEL, account, customer),
        sender=Party(id=customer, name=names.get(customer)), recipient=Party(id=account),
        timestamp=when,
    )
    if m.type == "reaction":
        reaction = m.reaction or {}
        emoji = reaction.get("emoji")
        return Reaction(id=event_id(CHANNEL, "reaction", m.id), **common,
                        message_id=as_str(reaction.get("message_id")),
                        emoji=emoji if isinstance(emoji, str) else "")
    if m.type == "revoke":
        original = as_str((m.revoke or {}).get("original_message_id")) or m.id
        return Message(id=event_id(CHANNEL, "revoke", m.id), **common, message_id=original,
                       type="deleted")
    fields = content(m)
    context = m.context or {}
    fields.setdefault("reply_to", as_str(context.get("id")))
    return Message(id=event_id(CHANNEL, "message", m.id), **common, message_id=m.id,
                   referral=m.referral if isinstance(m.referral, dict) else None, **fields)


def _status(s: schemas.Status, account: str) -> Event | None:
    when = _timestamp(s.timestamp)
    customer = as_str(s.recipient_id)
    if not s.id or not s.status or when is None or customer is None:
        return None
    return Status(
        schema=SCHEMA_VERSION, id=event_id(CHANNEL, "status", s.id, s.status), channel=CHANNEL,
        direction="outbound", account_id=account,
        conversation_id=conversation_id(CHANNEL, account, customer),
        sender=Party(id=account), recipient=Party(id=customer), timestamp=when,
        message_id=s.id, status=s.status, error=first_error(s.errors),
        callback_data=s.biz_opaque_callback_data,
    )
