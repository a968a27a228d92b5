"""Request validation of the Graph simulator, as Meta does it (meta/outbound.md §2-3).

Each check raises :class:`BadParam` naming the parameter; the simulator answers it as Meta does:
HTTP 400, code 100, ``(#100) Param <name> is invalid`` with the detail in ``error_data``. Limits
follow Meta's interactive-message reference: reply buttons 1-3 (id ≤ 256, title ≤ 20 characters,
both unique), lists 1-10 sections and ≤ 10 rows in all (button ≤ 20, section and row title ≤ 24,
row id ≤ 200, description ≤ 72), CTA URL ``display_text`` ≤ 20; body ≤ 1024 (list 4096),
header and footer text ≤ 60; Instagram text ≤ 1000 bytes, quick replies 1-13 (title ≤ 20).
"""

from __future__ import annotations

from typing import Any

MEDIA_TYPES = ("image", "audio", "video", "document", "sticker")
IG_ATTACHMENTS = ("image", "audio", "video", "file")


class BadParam(Exception):
    """A request parameter Meta would refuse; ``param`` names it."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param


def _need(cond: bool, param: str, detail: str) -> None:
    if not cond:
        raise BadParam(param, detail)


def _text(obj: Any, key: str, param: str, limit: int, required: bool = True) -> None:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and not required:
        return
    _need(isinstance(value, str) and value.strip() != "", param, f"{param} is required")
    _need(len(value) <= limit, param, f"{param} is longer than {limit} characters")


def check_content(kind: str, content: Any) -> None:
    """The `<type>` object of a WhatsApp message (`content` is `body[kind]`)."""
    if kind == "contacts":
        _need(isinstance(content, list) and bool(content), "contacts",
              "contacts must be a non-empty list")
        return
    _need(isinstance(content, dict), kind, f"{kind} object is required")
    if kind == "text":
        _text(content, "body", "text.body", 4096)
    elif kind == "template":
        _need(isinstance(content.get("name"), str), "template.name", "template.name is required")
        _need(isinstance((content.get("language") or {}).get("code"), str),
              "template.language", "template.language.code is required")
    elif kind in MEDIA_TYPES:
        _need(bool(content.get("id") or content.get("link")), kind, f"{kind} needs id or link")
        _need("caption" not in content or kind in ("image", "video", "document"),
              f"{kind}.caption", f"caption is not allowed on {kind}")
        _need("filename" not in content or kind == "document", f"{kind}.filename",
              "filename is only allowed on documents")
    elif kind == "reaction":
        _need(isinstance(content.get("message_id"), str), "reaction.message_id",
              "reaction.message_id is required")
    elif kind == "interactive":
        _check_interactive(content)
    elif kind == "location":
        for key in ("latitude", "longitude"):
            _need(isinstance(content.get(key), (int, float)), f"location.{key}",
                  f"location.{key} is required")


def _check_interactive(inter: dict[str, Any]) -> None:
    """Reply buttons (≤ 3), lists (≤ 10 sections, ≤ 10 rows in all) and CTA URL buttons, with
    the length limits of Meta's interactive-message reference."""
    kind = inter.get("type")
    _need(kind in ("button", "list", "cta_url", "product", "product_list", "flow"),
          "interactive.type", "interactive.type is invalid")
    if kind not in ("button", "list", "cta_url"):
        return
    _text(inter.get("body"), "text", "interactive.body.text", 4096 if kind == "list" else 1024)
    _text(inter.get("footer"), "text", "interactive.footer.text", 60, required=False)
    header = inter.get("header")
    if isinstance(header, dict) and header.get("type") == "text":
        _text(header, "text", "interactive.header.text", 60)
    action = inter.get("action")
    _need(isinstance(action, dict), "interactive.action", "interactive.action is required")
    if kind == "button":
        buttons = action.get("buttons")
        _need(isinstance(buttons, list) and 1 <= len(buttons) <= 3, "interactive.action.buttons",
              "interactive.action.buttons must hold 1 to 3 buttons")
        ids, titles = set(), set()
        for i, button in enumerate(buttons):
            where = f"interactive.action.buttons[{i}]"
            _need(isinstance(button, dict) and button.get("type") == "reply", f"{where}.type",
                  "button type must be reply")
            reply = button.get("reply")
            _text(reply, "id", f"{where}.reply.id", 256)
            _text(reply, "title", f"{where}.reply.title", 20)
            _need(reply["id"] not in ids and reply["title"] not in titles, f"{where}.reply",
                  "button ids and titles must be unique")
            ids.add(reply["id"])
            titles.add(reply["title"])
    elif kind == "list":
        _text(action, "button", "interactive.action.button", 20)
        sections = action.get("sections")
        _need(isinstance(sections, list) and 1 <= len(sections) <= 10,
              "interactive.action.sections", "interactive.action.sections must hold 1 to 10")
        rows = 0
        for i, section in enumerate(sections):
            where = f"interactive.action.sections[{i}]"
            _need(isinstance(section, dict), where, "a section must be an object")
            _text(section, "title", f"{where}.title", 24, required=len(sections) > 1)
            items = section.get("rows")
            _need(isinstance(items, list) and bool(items), f"{where}.rows",
                  "every section needs rows")
            for j, row in enumerate(items):
                _text(row, "id", f"{where}.rows[{j}].id", 200)
                _text(row, "title", f"{where}.rows[{j}].title", 24)
                _text(row, "description", f"{where}.rows[{j}].description", 72, required=False)
            rows += len(items)
        _need(rows <= 10, "interactive.action.sections", "at most 10 rows in all sections")
    else:
        _need(action.get("name") == "cta_url", "interactive.action.name",
              "interactive.action.name must be cta_url")
        params = action.get("parameters")
        _need(isinstance(params, dict), "interactive.action.parameters",
              "interactive.action.parameters is required")
        _text(params, "display_text", "interactive.action.parameters.display_text", 20)
        _text(params, "url", "interactive.action.parameters.url", 2000)
        _need(params["url"].startswith(("https://", "http://")),
              "interactive.action.parameters.url", "url must be an http(s) URL")


def check_ig_message(message: Any) -> bool:
    """Validate an Instagram ``message``; return whether it is audio or video."""
    _need(isinstance(message, dict) and bool(message.get("text") or message.get("attachment")),
          "message", "message needs text or attachment")
    if isinstance(message.get("text"), str):
        _need(len(message["text"].encode()) <= 1000, "message.text",
              "text longer than 1000 bytes")
    replies = message.get("quick_replies")
    if replies is not None:
        _need(isinstance(replies, list) and 1 <= len(replies) <= 13, "message.quick_replies",
              "quick_replies must hold 1 to 13 items")
        for i, reply in enumerate(replies):
            where = f"message.quick_replies[{i}]"
            _need(isinstance(reply, dict) and reply.get("content_type") == "text",
                  f"{where}.content_type", "content_type must be text")
            _text(reply, "title", f"{where}.title", 20)
            _text(reply, "payload", f"{where}.payload", 1000)
    attachment = message.get("attachment")
    if attachment is None:
        return False
    _need(isinstance(attachment, dict) and attachment.get("type") in IG_ATTACHMENTS,
          "message.attachment.type", f"attachment type must be one of {IG_ATTACHMENTS}")
    url = (attachment.get("payload") or {}).get("url")
    _need(isinstance(url, str) and url.startswith(("https://", "http://")),
          "message.attachment.payload.url", "attachment payload.url is required")
    return attachment["type"] in ("audio", "video")
