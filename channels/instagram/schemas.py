"""msgspec Structs mirroring Instagram Messaging webhooks (meta/webhooks.md §5).

Tolerant like the WhatsApp schemas: unknown fields ignored, open strings, every event decoded on
its own so one malformed item cannot spoil a batch. Sub-objects we only carry through are dicts.
"""

from __future__ import annotations

from typing import Any

import msgspec

Obj = dict[str, Any]


class Entry(msgspec.Struct):
    """``entry[]``: one Instagram professional account's events."""

    id: str | int | None = None
    time: int | float | None = None
    messaging: list[msgspec.Raw] | None = None
    standby: list[msgspec.Raw] | None = None


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


entry_decoder = msgspec.json.Decoder(Entry)
item_decoder = msgspec.json.Decoder(Item)
# An item's top-level keys, values undecoded: finds the event key of a kind Item does not know.
fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
