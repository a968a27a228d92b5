"""What every Meta channel shares: the envelope check and tolerant decoding helpers."""

from __future__ import annotations

import re
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
    """Decode the envelope; raise BadPayload unless ``object`` is one of ``objects``.

    A string holding a lone UTF-16 surrogate escape (``"\\ud83d"``: half an emoji, as a text cut
    at a length limit leaves it) is valid JSON to most parsers but not to msgspec: such a body is
    read with each lone surrogate as U+FFFD (:func:`mend_surrogates`), so that one broken
    character does not cost the whole webhook (the raw body is journaled as it came)."""
    try:
        envelope = _envelope.decode(body)
    except RecursionError:  # msgspec's depth is Python's recursion limit
        raise BadPayload("body is not JSON this gateway accepts: nested too deeply") from None
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            raise BadPayload(f"not a Meta webhook envelope: {exc}") from None
        mended = mend_surrogates(body) if b"\\u" in body else body  # escapes at all?
        if mended == body:
            raise BadPayload(f"body is not JSON: {exc}") from None
        return parse_envelope(mended, objects)
    if envelope.object not in objects:
        expected = " or ".join(sorted(objects))
        raise BadPayload(f"envelope object is {envelope.object!r}, expected {expected}")
    return envelope


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw] | None)
_ESCAPE = re.compile(rb'"|\\u([0-9a-fA-F]{4})|\\.', re.DOTALL)


def mend_surrogates(body: bytes) -> bytes:
    """``body`` with every ``\\uXXXX`` escape of a lone UTF-16 surrogate (a high one not followed
    by a low one, or a low one alone) inside a JSON string replaced by ``\\ufffd``. Escaped
    backslashes are honoured; anything else is kept byte for byte."""
    lone: list[re.Match] = []  # the escapes to replace, in order
    high, in_string = None, False
    for match in _ESCAPE.finditer(body):
        unit = int(match.group(1), 16) if in_string and match.group(1) is not None else None
        if high is not None and not (unit is not None and 0xDC00 <= unit <= 0xDFFF
                                     and high.end() == match.start()):
            lone.append(high)  # a high surrogate not followed at once by a low one
        paired = high is not None and unit is not None and 0xDC00 <= unit <= 0xDFFF
        high = None
        if match.group(0) == b'"':
            in_string = not in_string
        elif unit is not None and 0xD800 <= unit <= 0xDBFF:
            high = match
        elif unit is not None and 0xDC00 <= unit <= 0xDFFF and not paired:
            lone.append(match)
    if high is not None:
        lone.append(high)
    if not lone:
        return body
    out, start = [], 0
    for match in lone:
        out += [body[start:match.start()], b"\\ufffd"]
        start = match.end()
    return b"".join(out) + body[start:]


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
