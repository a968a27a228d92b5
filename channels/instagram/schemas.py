"""msgspec Structs mirroring Instagram Messaging webhooks (meta/webhooks.md §5).

Tolerant like the WhatsApp schemas: unknown fields ignored, open strings, every event decoded on
its own so one malformed item cannot spoil a batch. Sub-objects we only carry through are dicts.
"""

from __future__ import annotations

from typing import Any

import msgspec

Obj = dict[str, Any]


class Entry(msgspec.Struct):
    """``entry[]``: one Instagram professional account's events.

    ``messaging`` and ``standby`` stay undecoded (``envelope.raw_items``): typed as lists, one of
    the wrong shape (an object, a string) would fail the whole entry and lose the valid list beside
    it. ``time`` and ``changes`` (comments / mentions, which this channel does not model) are not
    declared, so their shape cannot fail an entry either.
    """

    id: str | int | None = None
    messaging: msgspec.Raw = msgspec.Raw()
    standby: msgspec.Raw = msgspec.Raw()


class Ref(msgspec.Struct):
    id: str | int | None = None


class Item(msgspec.Struct):
    """``messaging[]`` / ``standby[]``: exactly one of the event objects is set."""

    sender: Ref | None = None
    recipient: Ref | None = None
    timestamp: int | float | str | None = None
    message: Obj | None = None
    postback: Obj | None = None
    reaction: Obj | None = None
    read: Obj | None = None
    referral: Obj | None = None
    pass_thread_control: Obj | None = None
    take_thread_control: Obj | None = None
    request_thread_control: Obj | None = None
    message_edit: Obj | None = None


entry_decoder = msgspec.json.Decoder(Entry, float_hook=float)
item_decoder = msgspec.json.Decoder(Item, float_hook=float)
# An item's top-level keys, values undecoded: finds the event key of a kind Item does not know.
fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
