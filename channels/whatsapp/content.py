"""The content of one WhatsApp message by type → canonical fields (meta/webhooks.md §4.4, §4.7).

Each reader takes the decoded message and returns the canonical fields it sets: ``type``, ``text``,
``payload``, ``media``, ``location`` and extra fields. Unknown types become ``unsupported`` with the
raw type kept in ``raw_type``; Meta's own ``unsupported`` keeps the type Meta names in
``unsupported.type`` (e.g. ``poll``). Every field of the message arrives as whatever JSON Meta
sent (schemas.Content): one of an unexpected type is read as absent, and only the message's own
type's object is read, so an odd object of another type costs nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec

from channels.envelope import as_str
from channels.whatsapp.schemas import Content, Message
from gateway.events import ErrorInfo, Location, Media

MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")


def first_error(errors: Any) -> ErrorInfo | None:
    """The first item of an ``errors`` list that has an integer code, as the canonical error."""
    if not isinstance(errors, list):
        return None
    for item in errors:
        if isinstance(item, dict) and isinstance(item.get("code"), int) and not isinstance(
                item.get("code"), bool):
            return ErrorInfo(code=item["code"], title=_str(item.get("title")),
                             message=_str(item.get("message")))
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _obj(value: Any) -> dict[str, Any]:
    """A per-type object, or an empty one when it is absent or not an object."""
    return value if isinstance(value, dict) else {}


def _media(obj: Any) -> Media | None:
    if not isinstance(obj, dict):
        return None
    return Media(id=as_str(obj.get("id")), url=_str(obj.get("url")),
                 mime_type=_str(obj.get("mime_type")), sha256=_str(obj.get("sha256")),
                 caption=_str(obj.get("caption")), filename=_str(obj.get("filename")),
                 voice=obj.get("voice") is True, animated=obj.get("animated") is True)


def _text(m: Content) -> dict[str, Any]:
    return {"type": "text", "text": _str(_obj(m.text).get("body"))}


def _media_message(m: Content) -> dict[str, Any]:
    media = _media(getattr(m, m.type or ""))
    return {"type": m.type, "media": media, "text": media.caption if media else None}


def _coordinate(value: Any, bound: float) -> float | None:
    """A latitude (bound 90) or longitude (bound 180) as a float; None when it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer no float holds (e.g. 10**400)
        return None
    return number if -bound <= number <= bound else None  # NaN fails both comparisons


def _location(m: Content) -> dict[str, Any]:
    loc = _obj(m.location)
    lat, lon = _coordinate(loc.get("latitude"), 90.0), _coordinate(loc.get("longitude"), 180.0)
    if lat is None or lon is None:
        return {"type": "location"}
    return {"type": "location", "location": Location(
        latitude=lat, longitude=lon, name=_str(loc.get("name")), address=_str(loc.get("address")),
        url=_str(loc.get("url")))}


# The reply's keys that become canonical fields (text, payload); the others stay in ``interactive``.
_MAPPED = {"nfm_reply": ("body", "response_json")}


def _interactive(m: Content) -> dict[str, Any]:
    """A reply to an interactive message: ``text`` the title (a Flow's ``body``), ``payload`` the
    id (a Flow's ``response_json``), and ``interactive`` = the reply's ``type`` with whatever else
    it says (a list row's ``description``, a Flow's ``name``)."""
    inter = _obj(m.interactive)
    kind = inter.get("type")
    reply = inter.get(kind) if isinstance(kind, str) else None
    if not isinstance(reply, dict):
        return {"type": "interactive", "interactive": {"type": kind} if _str(kind) else None}
    text_key, payload_key = _MAPPED.get(kind, ("title", "id"))
    detail = {"type": kind, **{k: v for k, v in reply.items()
                               if k not in (text_key, payload_key) and k != "type"}}
    payload = reply.get(payload_key)
    return {"type": "interactive", "text": _str(reply.get(text_key)),
            "payload": _str(payload) if kind == "nfm_reply" else as_str(payload),
            "interactive": detail}


def _button(m: Content) -> dict[str, Any]:
    button = _obj(m.button)
    return {"type": "button", "text": _str(button.get("text")),
            "payload": as_str(button.get("payload"))}


def _order(m: Content) -> dict[str, Any]:
    order = m.order if isinstance(m.order, dict) else None
    text = _str((order or {}).get("text")) or None
    return {"type": "order", "text": text, "order": order}


def _system(m: Content) -> dict[str, Any]:
    system = m.system if isinstance(m.system, dict) else None
    return {"type": "system", "text": _str((system or {}).get("body")), "system": system}


def _contacts(m: Content) -> dict[str, Any]:
    return {"type": "contacts", "contacts": m.contacts if isinstance(m.contacts, list) else None}


def _unsupported(m: Content) -> dict[str, Any]:
    if m.type in ("unsupported", "unknown"):  # Meta's own: what was sent, when Meta names it
        inner = _obj(m.unsupported).get("type")
        raw = inner if isinstance(inner, str) and inner else None
    else:
        raw = _str(m.type)
    return {"type": "unsupported", "raw_type": raw, "error": first_error(m.errors)}


def _edit(m: Content) -> dict[str, Any]:
    """An edited message: a new message (its own wamid) replying to the original, with the
    replacement's content, whatever its type (a text, a captioned image, ...)."""
    edit = _obj(m.edit)
    inner = edit.get("message")
    fields: dict[str, Any] = {"type": "unsupported", "text": None}
    if isinstance(inner, dict) and inner.get("type") != "edit":  # never an edit of an edit
        replacement = msgspec.convert(inner, Content)  # every field Any: any object converts
        kind = _str(replacement.type)
        if kind in READERS:
            fields = READERS[kind](replacement)
        elif isinstance(inner.get("text"), dict):  # an older shape: text without a type
            body = inner["text"].get("body")
            fields = {"type": "text" if body is not None else "unsupported", "text": _str(body)}
    return {**fields, "raw_type": "edit", "reply_to": as_str(edit.get("original_message_id"))}


READERS = {
    "text": _text,
    **{t: _media_message for t in MEDIA_TYPES},
    "location": _location,
    "interactive": _interactive,
    "button": _button,
    "order": _order,
    "system": _system,
    "contacts": _contacts,
    "edit": _edit,
}


def content(m: Message) -> dict[str, Any]:
    """The canonical fields of one message's content."""
    fields = READERS.get(m.type if isinstance(m.type, str) else "", _unsupported)(m)
    if "error" not in fields:
        fields["error"] = first_error(m.errors)
    return fields
