"""msgspec Structs mirroring the WhatsApp Cloud API webhook (meta/webhooks.md §4).

Tolerant by construction: unknown fields are ignored, enum-like values (``type``, ``status``,
``field``) are plain strings, and lists are kept as raw items so that one malformed item is skipped
without spoiling the rest of the batch. Per-type objects (``text``, ``image``, ``interactive``, …)
stay dicts: Meta adds keys to them often and we read only a few.

Only fields the normaliser reads are declared: an undeclared field is ignored whatever its type,
while a declared one of an unexpected type fails the decode of its whole item (a ``Value`` with
every message and status in it). Fields read only as a fallback or as optional detail
(``Value.errors``, ``Status.recipient_user_id``, ``Message.unsupported``) are ``Any``, checked
where they are read, so an odd one never costs the item.
"""

from __future__ import annotations

from typing import Any

import msgspec

Obj = dict[str, Any]


class Entry(msgspec.Struct):
    """``entry[]``: one WhatsApp Business Account (its ``id`` is not read: route on the number)."""

    changes: list[msgspec.Raw] | None = None


class Change(msgspec.Struct):
    """``entry[].changes[]``: one subscription field's update."""

    field: Any = None
    value: msgspec.Raw = msgspec.Raw(b"null")


class Metadata(msgspec.Struct):
    """``value.metadata``: the business number the update belongs to (``display_phone_number``
    is not read, so not declared: an odd one must not drop the change)."""

    phone_number_id: Any = None  # read through as_str: a str or an int, anything else is absent


class Value(msgspec.Struct):
    """``changes[].value`` of the ``messages`` field."""

    metadata: Metadata | None = None
    contacts: list[msgspec.Raw] | None = None
    messages: list[msgspec.Raw] | None = None
    statuses: list[msgspec.Raw] | None = None
    errors: Any = None  # value-level errors[] (webhooks.md §4.6): a list of error objects


class Profile(msgspec.Struct):
    name: str | None = None


class Contact(msgspec.Struct):
    """``value.contacts[]``: the profile of a sender of ``messages[]``."""

    wa_id: str | int | None = None
    user_id: str | None = None  # BSUID (webhooks.md §4.3): newer payloads, maybe without wa_id
    profile: Profile | None = None


class Message(msgspec.Struct, rename={"from_": "from"}):
    """``value.messages[]``: common fields, and the per-type objects as dicts."""

    id: str | None = None
    timestamp: str | int | float | None = None  # epoch seconds: "1760000000", 1760000000(.0)
    type: str | None = None
    from_: str | int | None = None
    from_user_id: str | None = None  # BSUID: the sender when ``from`` is absent
    context: Obj | None = None
    referral: Obj | None = None
    errors: list[Any] | None = None
    text: Obj | None = None
    image: Obj | None = None
    audio: Obj | None = None
    video: Obj | None = None
    document: Obj | None = None
    sticker: Obj | None = None
    location: Obj | None = None
    contacts: list[Any] | None = None
    interactive: Obj | None = None
    button: Obj | None = None
    reaction: Obj | None = None
    order: Obj | None = None
    system: Obj | None = None
    revoke: Obj | None = None
    edit: Obj | None = None
    unsupported: Any = None  # Meta's own unsupported type: {"type": "poll"}


class Status(msgspec.Struct):
    """``value.statuses[]``: delivery status of one of our messages."""

    id: str | None = None
    status: str | None = None
    timestamp: str | int | float | None = None
    recipient_id: str | int | None = None
    recipient_user_id: Any = None  # BSUID when recipient_id is absent (field name unverified)
    recipient_participant_id: str | int | None = None  # group messages: whose receipt this is
    biz_opaque_callback_data: str | None = None
    errors: list[Any] | None = None


class FastValue(msgspec.Struct):
    """``Value`` with its lists decoded in the same pass (the fast path)."""

    metadata: Metadata | None = None
    contacts: list[Contact] | None = None
    messages: list[Message] | None = None
    statuses: list[Status] | None = None
    errors: Any = None


class FastChange(msgspec.Struct):
    field: str | None = None
    value: FastValue | None = None


class FastEntry(msgspec.Struct):
    changes: list[FastChange] | None = None


class FastEnvelope(msgspec.Struct):
    """The whole body in one typed decode. Any item of an unexpected shape fails it, and the
    normaliser then takes the tolerant path (each item on its own), which yields the same events
    for well-formed bodies."""

    object: str
    entry: list[FastEntry]


entry_decoder = msgspec.json.Decoder(Entry)
change_decoder = msgspec.json.Decoder(Change)
value_decoder = msgspec.json.Decoder(Value)
contact_decoder = msgspec.json.Decoder(Contact)
message_decoder = msgspec.json.Decoder(Message)
status_decoder = msgspec.json.Decoder(Status)
fast_decoder = msgspec.json.Decoder(FastEnvelope)
