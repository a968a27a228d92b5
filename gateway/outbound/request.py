"""The body of ``POST /v1/messages`` (CONTRACT §4) as a msgspec Struct, validated per type."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

TYPES = ("text", "template", "image", "audio", "video", "document", "sticker", "interactive",
         "reaction", "quick_replies", "mark_read", "typing", "location", "contacts")
MEDIA = ("image", "audio", "video", "document", "sticker")
NO_WINDOW = ("template", "mark_read", "typing")  # allowed whatever the service window says
# Instagram types that go as a message, which a tag (HUMAN_AGENT) rides on; the others are
# sender actions (react, mark_seen, typing), which carry none: a reaction keeps the 24 h window.
INSTAGRAM_TAGGED = ("text", "quick_replies", "image", "audio", "video", "document")
# What Instagram's Send API takes (meta/outbound.md §3): no templates, stickers, interactive,
# location or contacts; attachments by URL only; text at most 1000 bytes of UTF-8.
INSTAGRAM_TYPES = ("text", "quick_replies", "image", "audio", "video", "document", "reaction",
                   "mark_read", "typing")
INSTAGRAM_TEXT_BYTES = 1000
# quick_replies: WhatsApp sends them as reply buttons (at most 3), Instagram as quick replies (at
# most 13); a title of at most 20 characters on both (meta/outbound.md §2, §3)
QUICK_REPLIES = {"whatsapp": 3, "instagram": 13}
QUICK_REPLY_TITLE = 20
BUTTON_ID = 256  # a WhatsApp reply button's id (the payload): unique, at most this long


class InvalidRequest(ValueError):
    """A send request that cannot be sent as given; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class MediaRef(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    link: str | None = None
    id: str | None = None
    caption: str | None = None
    filename: str | None = None


class Template(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    language: str | dict[str, Any]
    components: list[dict[str, Any]] = []
    # Ours, not sent to Meta: to an opted-out contact only "utility" / "authentication" go
    # ("marketing" and a template without a category are refused).
    category: str | None = None


class QuickReply(msgspec.Struct, forbid_unknown_fields=True):
    title: str
    payload: str


class OutboundRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """One message to send."""

    channel: str
    type: Literal[TYPES]  # type: ignore[valid-type]
    to: str | None = None
    account_id: str | None = None
    text: str | None = None
    preview_url: bool = False
    template: Template | None = None
    media: MediaRef | None = None
    interactive: dict[str, Any] | None = None
    message_id: str | None = None
    emoji: str | None = None
    quick_replies: list[QuickReply] | None = None
    on: bool = True
    location: dict[str, Any] | None = None
    contacts: list[dict[str, Any]] | None = None
    reply_to: str | None = None
    tag: str | None = None
    idempotency_key: str | None = None

    def validate(self) -> None:
        """Per-type checks; raise InvalidRequest naming the field."""
        if not self.to and self.type != "mark_read":
            raise InvalidRequest("to", "required")
        need = {"text": "text", "template": "template", "interactive": "interactive",
                "quick_replies": "quick_replies", "location": "location", "contacts": "contacts",
                **{m: "media" for m in MEDIA}}.get(self.type)
        if need and getattr(self, need) in (None, "", []):
            raise InvalidRequest(need, f"required for type {self.type!r}")
        if self.type in MEDIA and not (self.media.link or self.media.id):
            raise InvalidRequest("media", "needs link or id")
        if self.type == "reaction" and (not self.message_id or self.emoji is None):
            raise InvalidRequest("message_id" if not self.message_id else "emoji",
                                 "required for type 'reaction'")
        if self.type == "mark_read" and not (self.message_id or self.to):
            raise InvalidRequest("message_id", "required for type 'mark_read' (or give 'to': "
                                 "the customer's latest inbound message is read)")
        if self.type == "quick_replies":
            self._validate_quick_replies()
        if self.type == "template" and (self.template.category or "marketing").lower() not in (
                "marketing", "utility", "authentication"):
            raise InvalidRequest("template.category",
                                 "must be \"marketing\", \"utility\" or \"authentication\"")
        if self.tag is not None and self.tag != "HUMAN_AGENT":
            raise InvalidRequest("tag", "only HUMAN_AGENT is supported")
        if self.channel == "instagram":
            self._validate_instagram()

    def _validate_quick_replies(self) -> None:
        if not self.text:
            raise InvalidRequest("text", "required for type 'quick_replies'")
        most = QUICK_REPLIES.get(self.channel)
        if most is not None and len(self.quick_replies) > most:
            raise InvalidRequest("quick_replies", f"{self.channel} takes at most {most}"
                                 + (" (sent as reply buttons)" if self.channel == "whatsapp"
                                    else ""))
        seen: set[str] = set()
        for i, reply in enumerate(self.quick_replies):
            if not reply.title or len(reply.title) > QUICK_REPLY_TITLE:
                raise InvalidRequest(f"quick_replies[{i}].title",
                                     f"needs 1 to {QUICK_REPLY_TITLE} characters")
            if not reply.payload:
                raise InvalidRequest(f"quick_replies[{i}].payload", "required")
            if self.channel == "whatsapp" and (reply.payload in seen
                                               or len(reply.payload) > BUTTON_ID):
                raise InvalidRequest(f"quick_replies[{i}].payload", "a reply button's id: unique "
                                     f"and at most {BUTTON_ID} characters on WhatsApp")
            seen.add(reply.payload)

    def _validate_instagram(self) -> None:
        """What Instagram cannot send is refused here, before it is accepted, not at send time."""
        if self.type not in INSTAGRAM_TYPES:
            raise InvalidRequest("type", f"{self.type!r} cannot be sent on Instagram (it takes "
                                 f"{', '.join(INSTAGRAM_TYPES)})")
        if not self.to:  # a sender action names the thread, never a message
            raise InvalidRequest("to", "required on Instagram (the IGSID whose thread is read)")
        if self.text and len(self.text.encode("utf-8")) > INSTAGRAM_TEXT_BYTES:
            raise InvalidRequest("text", f"Instagram allows at most {INSTAGRAM_TEXT_BYTES} bytes "
                                 "of UTF-8")
        if self.type in MEDIA and not self.media.link:
            raise InvalidRequest("media.link", "Instagram attachments are sent by URL: give "
                                 "media.link (an uploaded media id cannot be sent)")
        if self.tag is not None and self.type not in INSTAGRAM_TAGGED:
            raise InvalidRequest("tag", f"a {self.type!r} is a sender action, which carries no "
                                 "tag: HUMAN_AGENT (7 days) is for messages ("
                                 f"{', '.join(INSTAGRAM_TAGGED)})")


_decoder = msgspec.json.Decoder(OutboundRequest)


def parse(body: bytes | dict[str, Any]) -> OutboundRequest:
    """Decode and validate; raise InvalidRequest naming the first bad field."""
    try:
        request = (msgspec.convert(body, OutboundRequest) if isinstance(body, dict)
                   else _decoder.decode(body))
    except RecursionError:
        raise InvalidRequest("body", "JSON nested too deeply") from None
    except msgspec.DecodeError as exc:
        text = str(exc)
        message, _, where = text.rpartition(" - at `")
        field = where.rstrip("`").removeprefix("$").lstrip(".") if message else ""
        if "unknown field `" in text or "missing required field `" in text:
            name = text.split("`")[1]
            field = ".".join(p for p in (field, name) if p)
        raise InvalidRequest(field or "body", message or text) from None
    request.validate()
    return request


def encode(request: OutboundRequest) -> bytes:
    return msgspec.json.encode(request)


def decode(data: bytes) -> OutboundRequest:
    return _decoder.decode(data)
