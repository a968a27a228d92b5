"""WhatsApp Cloud API webhook → canonical events (CONTRACT §5, meta/webhooks.md §4).

Every entry × change × message / status yields one event; nothing is read at ``[0]`` only. Ids
come only from Meta's fields: a message's wamid, a status's (wamid, status), so a redelivery keeps
its ids. A malformed part loses only itself: an entry, change or item that is no object, or a
``changes`` / ``contacts`` / ``messages`` / ``statuses`` that is no list, is skipped (the list
counts as empty) while every valid part beside it still counts. Mapping choices
(shared/fixtures/README.md "Conventions"):

- an item is dropped only when it lacks what its event cannot exist without: a message's ``id``,
  customer and ``timestamp``, a status's ``id``, ``status``, ``timestamp`` and recipient. Any other
  field of an unexpected type is read as absent and loses only itself (an odd
  ``biz_opaque_callback_data``: no ``callback_data``; an odd ``from_user_id`` beside ``from``, or
  an odd object of another message type beside the message's own: ignored; an odd
  ``contacts[].user_id``: the contact still names its ``wa_id``; an odd ``type``: ``unsupported``
  without ``raw_type``, as a message without one);
- inbound: ``account_id`` = ``recipient.id`` = ``metadata.phone_number_id``; ``sender.name`` from
  the ``value.contacts`` item whose ``wa_id`` equals ``from`` (never from a shared contact card);
  the customer is ``from``, else the BSUID ``from_user_id`` (``system.user_id`` on a
  ``user_changed_user_id`` system message, which has neither). The customer's BSUID, when Meta
  sends one (``from_user_id``, else the ``user_id`` of the customer's ``contacts`` item), is kept
  beside the wa_id as ``sender.user_id`` (webhooks.md §4.3), and so is a status's
  ``recipient_user_id`` as ``recipient.user_id``;
- timestamps: epoch seconds as a string or a JSON number; a number with a fraction keeps its
  whole seconds;
- statuses: ``direction`` outbound, sender = the business number, recipient = the customer:
  ``recipient_id``, else ``recipient_user_id`` (a BSUID, by analogy with ``from_user_id``; the
  field name is unverified). A status with neither cannot be addressed to a conversation: it
  yields no event and is logged as a warning (``whatsapp_status_without_recipient``, with its
  wamid and status). Meta's ``played`` (a voice message listened to) is ``read`` with
  ``raw_type`` ``played`` (CONTRACT §5 names sent, delivered, read, failed, deleted);
- reactions: ``kind`` reaction, ``message_id`` = the message reacted to, ``emoji`` "" on removal;
- ``revoke`` (the user deleted a message) → ``type`` deleted for the original wamid;
- ``edit`` → a message of the replacement's type (text, captioned media, ...) with its own wamid
  whose ``reply_to`` is the edited message;
- an unknown ``type`` → ``unsupported`` with ``raw_type`` = that type; Meta's own
  ``unsupported`` (and older ``unknown``) keeps its ``errors[0]`` and has ``raw_type`` =
  ``unsupported.type`` (e.g. ``poll``) when Meta names it;
- ``error``: a message's own ``errors[0]``; a message (reaction and revoke included) whose own
  ``errors[]`` give none (absent, or no item with an integer code) carries the value-level
  ``errors[0]`` (webhooks.md §4.6, e.g. 131000 next to a message with no body). A value with
  ``errors[]`` is logged as a warning (``whatsapp_value_errors``: the phone_number_id and each
  error's code and title); alone it yields no event. Each one with an integer code is also a
  :class:`gateway.events.Notice` of its phone_number_id (:meth:`Channel.notices`): counted, and
  a throttling code slows the account's sending down. Statuses keep only their own errors;
- a referral rides on its message (extra field);
- ``user_preferences`` (webhooks.md §4.8: a customer stopped or resumed marketing messages) →
  kind ``preference`` (an extra kind), one per item: ``type`` = ``category``, ``payload`` =
  ``value`` (``stop`` / ``resume``), ``text`` = ``detail``, inbound from the customer (``wa_id``,
  else ``user_id``) to the number, its id from (customer, category, value, timestamp); an item
  without a customer, a string category and value, or a timestamp yields nothing;
- other subscription fields (templates, account updates, calls) yield no event.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from channels.envelope import as_str, decode_each, decode_or_none, raw_items
from channels.envelope import parse_envelope as _parse
from channels.whatsapp import schemas
from channels.whatsapp.content import content, first_error
from gateway import logging as gwlog
from gateway.events import (
    SCHEMA_VERSION,
    ErrorInfo,
    Event,
    Message,
    Notice,
    Party,
    Preference,
    Reaction,
    Status,
    conversation_id,
    event_id,
    from_epoch_seconds,
)

CHANNEL = "whatsapp"
OBJECTS = frozenset({"whatsapp_business_account"})
# Meta's statuses that CONTRACT §5 does not name, as the one they imply (raw_type keeps Meta's):
# a voice message "played" has been read.
STATUS_AS = {"played": "read"}

log = gwlog.get("channels.whatsapp")


def parse_envelope(body: bytes) -> None:
    """The intake's cheap check: JSON with ``object: whatsapp_business_account`` and an entry list.

    Raises:
        BadPayload: not JSON, or not a WhatsApp envelope.
    """
    _parse(body, OBJECTS)


def normalise(body: bytes, notices: list[Notice] | None = None) -> list[Event]:
    """Every canonical event in one webhook body; each value-level error is appended to
    ``notices`` (when given) as a :class:`gateway.events.Notice`.

    One typed decode of the whole body on the fast path; a body with any item of an unexpected
    shape is decoded again item by item (the tolerant path), skipping only what is malformed.

    Raises:
        BadPayload: not JSON, or not a WhatsApp envelope.
    """
    try:
        envelope = schemas.fast_decoder.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return _tolerant(body, notices)
    if envelope.object not in OBJECTS:
        _parse(body, OBJECTS)  # raises the envelope error
    events: list[Event] = []
    for entry in envelope.entry:
        for change in entry.changes or ():
            value = change.value
            if value is None:
                continue
            if change.field == "messages":
                _value(value.metadata, value.errors, value.contacts or (), value.messages or (),
                       value.statuses or (), events, notices)
            elif change.field == "user_preferences":
                _preferences(value.metadata, value.contacts or (), value.user_preferences or (),
                             events)
    return events


def _tolerant(body: bytes, notices: list[Notice] | None = None) -> list[Event]:
    """Every part decoded on its own: a malformed one (an entry, change or item of the wrong
    shape, a list that is not one) is skipped, and only it."""
    events: list[Event] = []
    for entry in decode_each(_parse(body, OBJECTS).entry, schemas.entry_decoder):
        for change in decode_each(raw_items(entry.changes), schemas.change_decoder):
            if change.field not in ("messages", "user_preferences"):
                continue
            value = decode_or_none(change.value, schemas.value_decoder)
            if value is None:
                continue
            metadata = decode_or_none(value.metadata, schemas.metadata_decoder)
            contacts = decode_each(raw_items(value.contacts), schemas.contact_decoder)
            if change.field == "user_preferences":
                _preferences(metadata, contacts, decode_each(
                    raw_items(value.user_preferences), schemas.preference_decoder), events)
                continue
            _value(metadata, value.errors, contacts,
                   decode_each(raw_items(value.messages), schemas.message_decoder),
                   decode_each(raw_items(value.statuses), schemas.status_decoder), events,
                   notices)
    return events


def _preferences(metadata: schemas.Metadata | None, contacts, preferences,
                 events: list[Event]) -> None:
    """Append the events of one ``user_preferences`` change (webhooks.md §4.8)."""
    account = None if metadata is None else as_str(metadata.phone_number_id)
    if account is None:
        return
    people = _people(contacts)
    for p in preferences:
        customer = as_str(p.wa_id) or as_str(p.user_id)
        when = _timestamp(p.timestamp)
        if (customer is None or when is None or not isinstance(p.category, str)
                or not isinstance(p.value, str)):
            continue
        events.append(Preference(
            id=event_id(CHANNEL, "preference", customer, p.category, p.value,
                        str(int(when.timestamp()))),  # one instant, one id (1760000300(.0))
            schema=SCHEMA_VERSION, channel=CHANNEL, direction="inbound", account_id=account,
            conversation_id=conversation_id(CHANNEL, account, customer),
            sender=_party(customer, as_str(p.user_id), people), recipient=Party(id=account),
            timestamp=when, type=p.category, payload=p.value,
            text=p.detail if isinstance(p.detail, str) else None))


def _value(metadata: schemas.Metadata | None, errors: Any, contacts, messages, statuses,
           events: list[Event], notices: list[Notice] | None = None) -> None:
    """Append the events of one ``messages`` change (its lists already decoded), and its
    value-level errors to ``notices``."""
    account = None if metadata is None else as_str(metadata.phone_number_id)
    value_error = _value_error(errors, account, notices)
    if account is None:
        return
    people = _people(contacts)
    for message in messages:
        event = _message(message, account, people, value_error)
        if event is not None:
            events.append(event)
    for status in statuses:
        event = _status(status, account)
        if event is not None:
            events.append(event)


class Person(NamedTuple):
    """What a ``value.contacts[]`` item says of a customer (each field a str, else None)."""

    name: str | None
    user_id: str | None  # BSUID
    username: str | None
    wa_id: str | None
    parent_user_id: str | None


def _people(contacts) -> dict[str, Person]:
    """Each contact, by wa_id and by BSUID; a field that is no string (or an empty username) is
    none, and a ``profile`` that is no object names no one while the ids beside it count."""
    people = {}
    for c in contacts:
        name = username = None
        if isinstance(c.profile, dict):
            name, username = c.profile.get("name"), c.profile.get("username")
            name = name if isinstance(name, str) else None
            username = username if isinstance(username, str) and username else None
        user_id, wa_id = as_str(c.user_id), as_str(c.wa_id)
        parent = as_str(c.parent_user_id)
        if name is None and user_id is None and username is None and parent is None:
            continue
        person = Person(name, user_id, username, wa_id, parent)
        for key in (wa_id, user_id):
            if key is not None:
                people[key] = person
    return people


def _party(customer: str, user_id: str | None, people: dict[str, Person]) -> Party:
    """The customer as a party: their contact's name, username and parent BSUID, and their
    BSUID (``user_id``: the item's own, else the contact's)."""
    known = people.get(customer)
    if known is None:
        return Party(id=customer, user_id=user_id)
    return Party(id=customer, name=known.name, user_id=user_id or known.user_id,
                 username=known.username, parent_user_id=known.parent_user_id)


def _value_error(errors: Any, account: str | None,
                 notices: list[Notice] | None = None) -> ErrorInfo | None:
    """Log a value's own ``errors[]`` (out of band, no message id), append each one with an
    integer code to ``notices`` (for the account, when the value names it), and return the first.

    Only the code and title of each error are logged: ``message`` and ``error_data`` are Meta's
    prose, never needed to tell one error from another.
    """
    if not isinstance(errors, list) or not errors:
        return None
    log.warning("whatsapp_value_errors", channel=CHANNEL, phone_number_id=account,
                errors=[{"code": e.get("code"), "title": e.get("title")}
                        for e in errors if isinstance(e, dict)])
    if notices is not None and account is not None:
        for item in errors:
            error = first_error([item])
            if error is not None:
                notices.append(Notice(CHANNEL, account, error))
    return first_error(errors)


def _timestamp(value: Any):
    try:
        return from_epoch_seconds(value)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _customer(m: schemas.Message, people: dict[str, Person]) -> str | None:
    """The wa_id while present (``from``, else the wa_id of the contact the BSUID
    ``from_user_id`` names: webhooks.md §4.3 "keep wa_id as the contact key while it is
    present"), else the BSUID."""
    customer = as_str(m.from_)
    if customer is not None:
        return customer
    customer = as_str(m.from_user_id)
    if customer is not None:
        known = people.get(customer)
        return known.wa_id if known is not None and known.wa_id else customer
    if isinstance(m.system, dict):  # user_changed_user_id has no "from"
        customer = as_str(m.system.get("user_id")) or as_str(m.system.get("previous_user_id"))
    return customer


def _message(m: schemas.Message, account: str, people: dict,
             value_error: ErrorInfo | None) -> Event | None:
    customer = _customer(m, people)
    when = _timestamp(m.timestamp)
    if not m.id or customer is None or when is None:
        return None
    conversation = conversation_id(CHANNEL, account, customer)
    sender, recipient = _party(customer, as_str(m.from_user_id), people), Party(id=account)
    if m.type == "reaction" or m.type == "revoke":
        return _reaction_or_revoke(m, dict(
            schema=SCHEMA_VERSION, channel=CHANNEL, direction="inbound", account_id=account,
            conversation_id=conversation, sender=sender, recipient=recipient, timestamp=when,
            error=first_error(m.errors) or value_error))
    try:
        fields = content(m)
    except OverflowError:  # a number no float holds (e.g. a location's latitude 1e400 as an int)
        fields = {"type": "unsupported", "raw_type": m.type if isinstance(m.type, str) else None,
                  "error": first_error(m.errors)}
    if fields["error"] is None:
        fields["error"] = value_error
    if isinstance(m.context, dict):  # most messages have none
        fields.setdefault("reply_to", as_str(m.context.get("id")))
        fields["context"] = _context(m.context)
    elif "reply_to" not in fields:
        fields["reply_to"] = None
    # the common fields spelt out, not merged from a dict: this is the path of nearly every event
    return Message(id=event_id(CHANNEL, "message", m.id), schema=SCHEMA_VERSION, channel=CHANNEL,
                   direction="inbound", account_id=account, conversation_id=conversation,
                   sender=sender, recipient=recipient, timestamp=when, message_id=m.id,
                   referral=m.referral if isinstance(m.referral, dict) else None,
                   identity=m.identity if isinstance(m.identity, dict) else None, **fields)


PRODUCT = ("catalog_id", "product_retailer_id")


def _context(context: dict[str, Any]) -> dict[str, Any] | None:
    """What a message's ``context`` says beside the message it replies to (webhooks.md §4.4):
    ``forwarded`` / ``frequently_forwarded`` (true, else absent) and ``referred_product``
    ``{catalog_id, product_retailer_id}`` (the product a customer asks about); None when none."""
    out: dict[str, Any] = {}
    for flag in ("forwarded", "frequently_forwarded"):
        if context.get(flag) is True:
            out[flag] = True
    product = context.get("referred_product")
    if isinstance(product, dict):
        ids = {key: product[key] for key in PRODUCT if isinstance(product.get(key), str)}
        if ids:
            out["referred_product"] = ids
    return out or None


def _reaction_or_revoke(m: schemas.Message, common: dict) -> Event:
    if m.type == "reaction":
        reaction = m.reaction if isinstance(m.reaction, dict) else {}
        emoji = reaction.get("emoji")
        return Reaction(id=event_id(CHANNEL, "reaction", m.id), **common,
                        message_id=as_str(reaction.get("message_id")),
                        emoji=emoji if isinstance(emoji, str) else "")
    revoke = m.revoke if isinstance(m.revoke, dict) else {}
    original = as_str(revoke.get("original_message_id")) or m.id
    return Message(id=event_id(CHANNEL, "revoke", m.id), **common, message_id=original,
                   type="deleted")


def _status(s: schemas.Status, account: str) -> Event | None:
    when = _timestamp(s.timestamp)
    if not s.id or not s.status or when is None:
        return None
    customer = as_str(s.recipient_id) or as_str(s.recipient_user_id)  # wa_id, else the BSUID
    if customer is None:
        log.warning("whatsapp_status_without_recipient", channel=CHANNEL,
                    phone_number_id=account, message_id=s.id, status=s.status)
        return None
    callback = s.biz_opaque_callback_data
    return Status(
        schema=SCHEMA_VERSION, id=_status_id(s), channel=CHANNEL,
        direction="outbound", account_id=account,
        conversation_id=conversation_id(CHANNEL, account, customer),
        sender=Party(id=account), recipient=Party(id=customer,
                                                  user_id=as_str(s.recipient_user_id)),
        timestamp=when,
        message_id=s.id, status=STATUS_AS.get(s.status, s.status), error=first_error(s.errors),
        raw_type=s.status if s.status in STATUS_AS else None,
        callback_data=callback if isinstance(callback, str) else None,
        pricing=_pricing(s.pricing, s.conversation),
        participant=as_str(s.recipient_participant_id),
    )


PRICING_TEXT = ("pricing_model", "type", "category")


def _pricing(pricing: Any, conversation: Any) -> dict[str, Any] | None:
    """A status's ``pricing`` and pricing ``conversation`` (webhooks.md §4.5) as one flat
    object: ``billable``, ``pricing_model``, ``type``, ``category`` and, when Meta sends the
    conversation, ``conversation_id``, ``origin`` and ``expires_at`` (RFC 3339). A field of an
    unexpected type is left out; None when nothing is left."""
    out: dict[str, Any] = {}
    if isinstance(pricing, dict):
        if isinstance(pricing.get("billable"), bool):
            out["billable"] = pricing["billable"]
        for key in PRICING_TEXT:
            if isinstance(pricing.get(key), str):
                out[key] = pricing[key]
    if isinstance(conversation, dict):
        if (cid := as_str(conversation.get("id"))) is not None:
            out["conversation_id"] = cid
        origin = conversation.get("origin")
        if isinstance(origin, dict) and isinstance(origin.get("type"), str):
            out["origin"] = origin["type"]
        expires = _timestamp(conversation.get("expiration_timestamp"))
        if expires is not None:
            out["expires_at"] = expires.isoformat().replace("+00:00", "Z")
    return out or None


def _status_id(s: schemas.Status) -> str:
    """(wamid, status); in a group, each participant's receipt is an event of its own."""
    participant = as_str(s.recipient_participant_id)
    if participant is None:
        return event_id(CHANNEL, "status", s.id, s.status)
    return event_id(CHANNEL, "status", s.id, s.status, participant)
