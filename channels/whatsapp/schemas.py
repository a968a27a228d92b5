"""msgspec Structs mirroring the WhatsApp Cloud API webhook (meta/webhooks.md §4).

Tolerant by construction: unknown fields are ignored, enum-like values (``type``, ``status``,
``field``) are plain strings, and lists are kept undecoded so that one malformed part is skipped
without spoiling anything beside it. Per-type objects (``text``, ``image``, ``interactive``, …)
stay dicts: Meta adds keys to them often and we read only a few.

Only fields the normaliser reads are declared (an undeclared field is ignored whatever its type),
and only the fields an event cannot exist without are typed: a message's or status's ``id`` and
``timestamp``, a status's ``status``. One of those of an unexpected type fails the decode of its
own item, which is skipped. Every other field (a sender or recipient, a per-type object,
``errors``, ``context``, ``biz_opaque_callback_data``, ...) is ``Any``, checked where it is read,
so an odd one is treated as absent and never costs its item. A ``changes`` / ``contacts`` /
``messages`` / ``statuses`` that is not a list counts as empty (``envelope.raw_items``): typed as a
list, it would fail its entry or value and lose the valid lists beside it.

Two shapes of the same body: the tolerant one (``Entry`` ... ``Value``, lists undecoded, each item
decoded on its own) and the fast one (``FastEnvelope``: the whole body in one typed decode). They
share ``Contact``, ``Message`` and ``Status``, so a body the fast decode accepts yields the same
events on either path.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Entry(msgspec.Struct):
    """``entry[]``: one WhatsApp Business Account (its ``id`` is not read: route on the number)."""

    changes: msgspec.Raw = msgspec.Raw()


class Change(msgspec.Struct):
    """``entry[].changes[]``: one subscription field's update."""

    field: Any = None
    value: msgspec.Raw = msgspec.Raw()


class Metadata(msgspec.Struct):
    """``value.metadata``: the business number the update belongs to (``display_phone_number``
    is not read, so not declared: an odd one must not drop the change)."""

    phone_number_id: Any = None  # read through as_str: a str or an int, anything else is absent


class Value(msgspec.Struct):
    """``changes[].value`` of the ``messages`` field, each part undecoded."""

    metadata: msgspec.Raw = msgspec.Raw()
    contacts: msgspec.Raw = msgspec.Raw()
    messages: msgspec.Raw = msgspec.Raw()
    statuses: msgspec.Raw = msgspec.Raw()
    errors: Any = None  # value-level errors[] (webhooks.md §4.6): a list of error objects
    user_preferences: msgspec.Raw = msgspec.Raw()  # of the ``user_preferences`` field (§4.8)


class Contact(msgspec.Struct):
    """``value.contacts[]``: the profile of a sender of ``messages[]`` (keys read via as_str)."""

    wa_id: Any = None
    user_id: Any = None  # BSUID (webhooks.md §4.3): newer payloads, maybe without wa_id
    parent_user_id: Any = None  # the parent BSUID (US.ENT...) of a business portfolio
    profile: Any = None  # {name, username}: an object, else it names no one (the rest counts)


class Content(msgspec.Struct):
    """What a message holds: its ``type`` and the per-type objects, each of any JSON type (the
    readers check). An edit's replacement is one of these too, without the message's own ids."""

    type: Any = None  # a str, else absent (an unsupported message without a raw type)
    errors: Any = None
    text: Any = None
    image: Any = None
    audio: Any = None
    video: Any = None
    document: Any = None
    sticker: Any = None
    location: Any = None
    contacts: Any = None
    interactive: Any = None
    button: Any = None
    reaction: Any = None
    order: Any = None
    system: Any = None
    revoke: Any = None
    edit: Any = None
    unsupported: Any = None  # Meta's own unsupported type: {"type": "poll"}


class Message(Content, rename={"from_": "from"}):
    """``value.messages[]``: the message's own fields beside its content."""

    id: str | None = None
    timestamp: str | int | float | None = None  # epoch seconds: "1760000000", 1760000000(.0)
    from_: Any = None  # read through as_str, like from_user_id
    from_user_id: Any = None  # BSUID: the sender when ``from`` is absent
    context: Any = None
    referral: Any = None
    identity: Any = None  # customer_identity_changed: {acknowledged, created_timestamp, hash}


class Status(msgspec.Struct):
    """``value.statuses[]``: delivery status of one of our messages."""

    id: str | None = None
    status: str | None = None
    timestamp: str | int | float | None = None
    recipient_id: Any = None
    recipient_user_id: Any = None  # BSUID when recipient_id is absent (field name unverified)
    recipient_participant_id: Any = None  # group messages: whose receipt this is
    biz_opaque_callback_data: Any = None  # a str, else absent
    errors: Any = None
    pricing: Any = None  # {billable, pricing_model, type, category}: what Meta charges
    conversation: Any = None  # {id, expiration_timestamp, origin{type}}: before v24.0, or CBP


class Preference(msgspec.Struct):
    """``value.user_preferences[]`` (webhooks.md §4.8): a customer stopped or resumed a category
    of messages (``marketing_messages``), its ``timestamp`` an integer."""

    timestamp: str | int | float | None = None
    wa_id: Any = None
    user_id: Any = None  # BSUID, by analogy with from_user_id (unverified)
    category: Any = None
    value: Any = None  # "stop" | "resume"
    detail: Any = None


class FastValue(msgspec.Struct):
    """``Value`` with its lists decoded in the same pass (the fast path)."""

    metadata: Metadata | None = None
    contacts: list[Contact] | None = None
    messages: list[Message] | None = None
    statuses: list[Status] | None = None
    errors: Any = None
    user_preferences: list[Preference] | None = None


class FastChange(msgspec.Struct):
    field: str | None = None
    value: FastValue | None = None


class FastEntry(msgspec.Struct):
    changes: list[FastChange] | None = None


class FastEnvelope(msgspec.Struct):
    """The whole body in one typed decode. Any part of an unexpected shape (a list that is not
    one, an item whose id or timestamp is of the wrong type) fails it, and the normaliser then
    takes the tolerant path (each part on its own), which yields the same events for bodies this
    decode accepts."""

    object: str
    entry: list[FastEntry]


entry_decoder = msgspec.json.Decoder(Entry, float_hook=float)
change_decoder = msgspec.json.Decoder(Change, float_hook=float)
value_decoder = msgspec.json.Decoder(Value, float_hook=float)
metadata_decoder = msgspec.json.Decoder(Metadata, float_hook=float)
contact_decoder = msgspec.json.Decoder(Contact, float_hook=float)
message_decoder = msgspec.json.Decoder(Message, float_hook=float)
status_decoder = msgspec.json.Decoder(Status, float_hook=float)
preference_decoder = msgspec.json.Decoder(Preference, float_hook=float)
fast_decoder = msgspec.json.Decoder(FastEnvelope, float_hook=float)
