"""What every Meta channel shares: the envelope check and tolerant decoding helpers."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from gateway.errors import BadPayload

T = TypeVar("T")


class Envelope(msgspec.Struct):
    """The outer shape of every Meta webhook: ``{"object": ..., "entry": [...]}``."""

    object: str
    entry: list[msgspec.Raw]


_envelope = msgspec.json.Decoder(Envelope)


def parse_envelope(body: bytes, objects: frozenset[str]) -> Envelope:
    """Decode the envelope; raise BadPayload unless ``object`` is one of ``objects``."""
    try:
        envelope = _envelope.decode(body)
    except RecursionError:  # msgspec's depth is Python's recursion limit
        raise BadPayload("body is not JSON this gateway accepts: nested too deeply") from None
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            raise BadPayload(f"not a Meta webhook envelope: {exc}") from None
        raise BadPayload(f"body is not JSON: {exc}") from None
    if envelope.object not in objects:
        expected = " or ".join(sorted(objects))
        raise BadPayload(f"envelope object is {envelope.object!r}, expected {expected}")
    return envelope


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw] | None)


def decode_or_none(raw: msgspec.Raw, decoder: msgspec.json.Decoder) -> Any:
    """``raw`` decoded, or None when it is absent or not of the decoder's shape."""
    if not raw:
        return None
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def raw_items(raw: msgspec.Raw) -> list[msgspec.Raw]:
    """The items of a list kept undecoded in a Struct (``msgspec.Raw``), each undecoded.

    Absent, ``null`` or not a list (a malformed shape): no items, like an invalid item, while the
    lists beside it, and the other entries, still count (typed as a list, it would fail the whole
    object that holds it)."""
    return decode_or_none(raw, _RAW_LIST) or []


def decode_each(raws: list[msgspec.Raw] | None, decoder: msgspec.json.Decoder) -> list[Any]:
    """Decode every item on its own; an item of the wrong shape is skipped, not fatal."""
    items = []
    for raw in raws or ():
        try:
            items.append(decoder.decode(raw))
        except (msgspec.DecodeError, RecursionError):
            continue
    return items


def as_str(value: Any) -> str | None:
    """Meta's ids arrive as strings, sometimes as numbers; anything else is absent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        return str(value) if str(value) else None
    return None
