"""WhatsApp Cloud API request bodies for every outbound type (meta/outbound.md §2).

A customer is addressed by phone number (the wa_id) in ``to``, or by business-scoped user id
(BSUID: ``US.1349...``, or a parent BSUID ``US.ENT.1181...``) in ``recipient``: the customers
who hide their number behind a username are known by their BSUID alone.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.outbound.errors import MetaPermanent
from gateway.outbound.request import MEDIA, OutboundRequest

CAPTIONED = ("image", "video", "document")
BSUID = re.compile(r"[A-Z]{2}\.[A-Za-z0-9]+(\.[A-Za-z0-9]+)*")  # country code, '.', the id


def address(to: str) -> dict[str, str]:
    """The field naming the customer: ``recipient`` for a BSUID, else ``to``."""
    return {"recipient": to} if BSUID.fullmatch(to) else {"to": to}


def build(req: OutboundRequest, callback_data: str | None) -> dict[str, Any] | None:
    """The JSON body for ``POST /{version}/{phone_number_id}/messages``; None = nothing to send
    (``typing`` off: WhatsApp's indicator stops by itself)."""
    if req.type == "mark_read":
        return {"messaging_product": "whatsapp", "status": "read", "message_id": req.message_id}
    if req.type == "typing":
        if not req.on:
            return None
        return {"messaging_product": "whatsapp", "status": "read", "message_id": req.message_id,
                "typing_indicator": {"type": "text"}}
    kind = "interactive" if req.type == "quick_replies" else req.type  # sent as reply buttons
    body: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual",
                            **address(req.to), "type": kind}
    body[kind] = _content(req)
    if req.reply_to:
        body["context"] = {"message_id": req.reply_to}
    if callback_data:
        body["biz_opaque_callback_data"] = callback_data
    return body


def _content(req: OutboundRequest) -> Any:
    if req.type == "text":
        return {"body": req.text, "preview_url": req.preview_url}
    if req.type == "template":
        t = req.template
        language = t.language if isinstance(t.language, dict) else {"code": t.language}
        out: dict[str, Any] = {"name": t.name, "language": language}
        if t.components:
            out["components"] = t.components
        return out
    if req.type in MEDIA:
        m = req.media
        out = {"id": m.id} if m.id else {"link": m.link}
        if m.caption and req.type in CAPTIONED:
            out["caption"] = m.caption
        if m.filename and req.type == "document":
            out["filename"] = m.filename
        return out
    if req.type == "reaction":
        return {"message_id": req.message_id, "emoji": req.emoji}
    if req.type == "quick_replies":  # WhatsApp's equivalent: reply buttons (at most 3)
        return {"type": "button", "body": {"text": req.text}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": q.payload, "title": q.title}}
            for q in req.quick_replies]}}  # at most 3: the request is refused otherwise
    return {"interactive": req.interactive, "location": req.location,
            "contacts": req.contacts}[req.type]


def message_id(answer: dict[str, Any]) -> str | None:
    """The wamid of an accepted message (``messages[0].id``)."""
    messages = answer.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        value = messages[0].get("id")
        return value if isinstance(value, str) else None
    return None


def upload_fields(mime_type: str) -> dict[str, str]:
    """The form fields of a media upload besides the ``file`` part (meta/outbound.md §2.5)."""
    return {"messaging_product": "whatsapp", "type": mime_type}


def uploaded_id(answer: dict[str, Any]) -> str:
    """The media id of an upload's answer ``{"id": "..."}``."""
    value = answer.get("id")
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
        raise MetaPermanent(f"media upload answered without an id: {answer!r}")
    return str(value)


def media_url(info: dict[str, Any]) -> str:
    """The (5-minute) download URL of ``GET /{media_id}``'s answer."""
    url = info.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise MetaPermanent(f"media lookup answered without a url: {info!r}")
    return url
