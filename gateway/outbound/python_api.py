"""The Python API of the original system: send text / template / media on WhatsApp; text, quick
replies and typing on Instagram. Thin wrappers that build a ``POST /v1/messages`` body and hand it
to :meth:`OutboundService.send` (so the same validation, outbox, limits and statuses apply)."""

from __future__ import annotations

from typing import Any


class PythonAPI:
    """Mixed into :class:`gateway.outbound.service.OutboundService`."""

    channels: dict[str, Any]

    async def send(self, body: dict[str, Any] | bytes) -> dict[str, Any]:
        raise NotImplementedError  # OutboundService.send

    def _account(self, channel_name: str, account_id: str | None) -> str:
        raise NotImplementedError  # OutboundService._account

    async def send_whatsapp_text(self, to: str, text: str, **kw: Any) -> dict[str, Any]:
        """Send a WhatsApp text (``preview_url``, ``reply_to``, ``account_id`` ... in ``kw``)."""
        return await self.send({"channel": "whatsapp", "type": "text", "to": to, "text": text,
                                **kw})

    async def send_whatsapp_template(self, to: str, name: str, language: str,
                                     components: list | None = None,
                                     category: str | None = None, **kw: Any) -> dict[str, Any]:
        """Send an approved template; ``category`` (marketing / utility / authentication) is
        checked against the contact's opt-out."""
        template: dict[str, Any] = {"name": name, "language": language,
                                    "components": components or []}
        if category is not None:
            template["category"] = category
        return await self.send({"channel": "whatsapp", "type": "template", "to": to,
                                "template": template, **kw})

    async def send_whatsapp_media(self, to: str, kind: str, link: str | None = None,
                                  media_id: str | None = None, caption: str | None = None,
                                  filename: str | None = None, **kw: Any) -> dict[str, Any]:
        """Send image / audio / video / document / sticker by ``link`` or uploaded ``media_id``."""
        media = {k: v for k, v in {"link": link, "id": media_id, "caption": caption,
                                   "filename": filename}.items() if v is not None}
        return await self.send({"channel": "whatsapp", "type": kind, "to": to, "media": media,
                                **kw})

    async def upload_whatsapp_media(self, data: bytes, mime_type: str,
                                    filename: str | None = None,
                                    account_id: str | None = None) -> str:
        """Upload media to WhatsApp (``POST /{phone_number_id}/media``); return its media id,
        usable as ``send_whatsapp_media(..., media_id=...)`` for about 30 days."""
        account = self._account("whatsapp", account_id)
        return await self.channels["whatsapp"].upload_media(account, data, mime_type, filename)

    async def download_whatsapp_media(self, media_id: str, account_id: str | None = None,
                                      ) -> tuple[bytes, str | None]:
        """Fetch a media object's bytes (e.g. a customer's image): (bytes, mime type)."""
        account = self._account("whatsapp", account_id)
        return await self.channels["whatsapp"].download_media(account, media_id)

    async def send_instagram_text(self, to: str, text: str, **kw: Any) -> dict[str, Any]:
        """Send an Instagram text (at most 1000 bytes of UTF-8; ``tag`` in ``kw``)."""
        return await self.send({"channel": "instagram", "type": "text", "to": to, "text": text,
                                **kw})

    async def send_instagram_quick_replies(self, to: str, text: str, replies: list[dict],
                                           **kw: Any) -> dict[str, Any]:
        """Send text with quick replies (``[{title, payload}]``)."""
        return await self.send({"channel": "instagram", "type": "quick_replies", "to": to,
                                "text": text, "quick_replies": replies, **kw})

    async def send_instagram_typing(self, to: str, on: bool = True, **kw: Any) -> dict[str, Any]:
        """Show (``on``) or hide the typing indicator."""
        return await self.send({"channel": "instagram", "type": "typing", "to": to, "on": on,
                                **kw})
