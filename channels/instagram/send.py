"""Instagram Send API request bodies (meta/outbound.md §3).

What Instagram cannot send (types, text length, media by id) is refused when the request is
accepted (``OutboundRequest.validate``: HTTP 422), so ``build`` only builds."""

from __future__ import annotations

from typing import Any

from channels.instagram.normalise import LABELS
from gateway.outbound.request import InvalidRequest, OutboundRequest

ATTACHMENT = {"image": "image", "audio": "audio", "video": "video", "document": "file"}
# emoji -> Instagram's label; the emoji without its variation selector too ("\u2764" for love)
LABEL_OF = {**{emoji.rstrip("\ufe0f"): label for label, emoji in LABELS.items()},
            **{emoji: label for label, emoji in LABELS.items()}}


def build(req: OutboundRequest, callback_data: str | None) -> dict[str, Any] | None:
    """The JSON body for ``POST /{version}/{page_id}/messages`` (or ``me/messages``)."""
    recipient = {"id": req.to}
    if req.type == "typing":
        return {"recipient": recipient, "sender_action": "typing_on" if req.on else "typing_off"}
    if req.type == "mark_read":
        return {"recipient": recipient, "sender_action": "mark_seen"}
    if req.type == "reaction":  # outbound.md §3: the reaction by its label ("love")
        if not req.emoji:
            return {"recipient": recipient, "sender_action": "unreact",
                    "payload": {"message_id": req.message_id}}
        return {"recipient": recipient, "sender_action": "react",
                "payload": {"message_id": req.message_id,
                            "reaction": LABEL_OF.get(req.emoji, req.emoji)}}
    body: dict[str, Any] = {"recipient": recipient, "message": _message(req)}
    if req.tag:
        body["messaging_type"], body["tag"] = "MESSAGE_TAG", req.tag
    else:
        body["messaging_type"] = "RESPONSE"
    return body


def _message(req: OutboundRequest) -> dict[str, Any]:
    if req.type == "text":
        return {"text": req.text}
    if req.type == "quick_replies":
        return {"text": req.text, "quick_replies": [
            {"content_type": "text", "title": q.title, "payload": q.payload}
            for q in req.quick_replies]}
    if req.type in ATTACHMENT:
        return {"attachment": {"type": ATTACHMENT[req.type], "payload": {"url": req.media.link}}}
    raise InvalidRequest("type", f"{req.type!r} cannot be sent on Instagram")  # validated before


def message_id(answer: dict[str, Any]) -> str | None:
    """The mid of an accepted message (sender actions have none)."""
    value = answer.get("message_id")
    return value if isinstance(value, str) else None
