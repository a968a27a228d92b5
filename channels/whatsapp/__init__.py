"""The WhatsApp Cloud API channel plugin (entry point ``gateway.channels: whatsapp``)."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

from channels.whatsapp import normalise, send
from gateway import Channel, hookimpl
from gateway.config import (
    ChannelConfig,
    GatewayConfig,
    require_not_blank,
    require_positive,
    section,
)
from gateway.errors import ConfigError
from gateway.events import Event, Notice
from gateway.outbound.http import GraphClient, SendResult
from gateway.outbound.request import OutboundRequest

_PHONE_PUNCTUATION = re.compile(r"^\+|[\s().\-]")  # what people write around a number's digits


class Account(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One more business phone number: ``[[channels.whatsapp.accounts]]``."""

    phone_number_id: str
    access_token: str | None = None
    messages_per_second: float | None = None


class WhatsAppConfig(ChannelConfig):
    """``[channels.whatsapp]``."""

    env: ClassVar = {
        "app_secret": ("WHATSAPP_APP_SECRET", "META_APP_SECRET"),
        "verify_token": ("WHATSAPP_VERIFY_TOKEN",),
        "access_token": ("WHATSAPP_ACCESS_TOKEN",),
        "phone_number_id": ("WHATSAPP_PHONE_NUMBER_ID",),
    }
    phone_number_id: str | None = None
    accounts: list[Account] = msgspec.field(default_factory=list)
    messages_per_second: float = 80.0  # Meta's default throughput per number (up to 1000)
    pair_interval_seconds: float = 6.0  # about one message per 6 s to one user
    pair_burst: int = 5  # small bursts to one user without borrowing against the future
    send_timeout: float = 10.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        # one number configured twice would be merged silently, one token and rate winning
        where = {self.phone_number_id: f"{prefix}.phone_number_id"} if self.phone_number_id else {}
        for i, account in enumerate(self.accounts):
            key = f"{prefix}.accounts[{i}]"
            require_not_blank(account, key, "access_token")
            if not account.phone_number_id.strip():
                raise ConfigError("must not be empty", f"{key}.phone_number_id")
            if account.phone_number_id in where:
                raise ConfigError(f"{account.phone_number_id!r} is already configured by "
                                  f"{where[account.phone_number_id]}", f"{key}.phone_number_id")
            where[account.phone_number_id] = f"{key}.phone_number_id"
        for rate in [self.messages_per_second, *(a.messages_per_second for a in self.accounts)]:
            if rate is not None and not 0 < rate <= 1000:
                raise ConfigError("must be between 0 and 1000 (Meta's maximum)",
                                  f"{prefix}.messages_per_second")
        if not 1 <= self.pair_burst <= 45:
            raise ConfigError("must be between 1 and 45", f"{prefix}.pair_burst")
        # Meta's pair limit always applies (131056): there is no 0 turning it off, as on Instagram
        require_positive(self, prefix, "pair_interval_seconds", "send_timeout")


class WhatsAppChannel(Channel):
    """Verifies and normalises WhatsApp Cloud API webhooks; sends through the Graph API."""

    name = "whatsapp"

    def __init__(self, config: WhatsAppConfig) -> None:
        super().__init__(app_secret=config.app_secret, verify_token=config.verify_token)
        self.config = config
        self.clients: dict[str, GraphClient] = {}
        self._notices: list[Notice] = []  # value-level errors met since notices() was called

    def check_envelope(self, body: bytes) -> None:
        normalise.parse_envelope(body)

    def recipient(self, to: str) -> str:
        """A phone number as the wa_id inbound events carry: ``+1 (555) 000-1234`` -> digits.
        Anything else (a BSUID, a group id) is kept as written."""
        digits = _PHONE_PUNCTUATION.sub("", to.strip())
        return digits if digits.isdigit() and digits.isascii() else to

    def may_be_alias(self, to: str) -> bool:
        """A BSUID can be; a wa_id (digits) never is: no look-up for most sends."""
        return send.BSUID.fullmatch(to) is not None

    def previous_alias(self, event: Event) -> str | None:
        """The BSUID a ``user_changed_user_id`` system message says its customer had."""
        system = event.system or {}
        if system.get("type") != "user_changed_user_id":
            return None
        old = system.get("previous_user_id")
        return old if isinstance(old, str) and old else None

    def normalise(self, body: bytes) -> list[Event]:
        return normalise.normalise(body, self._notices)

    def notices(self) -> list[Notice]:
        """The value-level ``errors[]`` normalised since the last call (webhooks.md §4.6)."""
        taken, self._notices = self._notices, []
        return taken

    def _tokens(self) -> dict[str, tuple[str | None, float]]:
        c = self.config
        found = {}
        if c.phone_number_id:
            found[c.phone_number_id] = (c.access_token, c.messages_per_second)
        for a in c.accounts:
            found[a.phone_number_id] = (a.access_token or c.access_token,
                                        a.messages_per_second or c.messages_per_second)
        return {k: v for k, v in found.items() if v[0]}

    def accounts(self) -> dict[str, dict[str, Any]]:
        return {pid: {"rate": rate, "pair_interval": self.config.pair_interval_seconds,
                      "pair_burst": self.config.pair_burst}
                for pid, (_, rate) in self._tokens().items()}

    async def start(self) -> None:
        c = self.config
        self.clients = {pid: GraphClient(c.graph_base_url, c.graph_version, token, c.send_timeout)
                        for pid, (token, _) in self._tokens().items()}

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()

    async def send(self, account_id: str, request: OutboundRequest,
                   callback_data: str | None) -> SendResult:
        body = send.build(request, callback_data)
        if body is None:
            return SendResult(None)
        answer, headers = await self.clients[account_id].post(f"{account_id}/messages", body)
        return SendResult(send.message_id(answer), headers)

    async def upload_media(self, account_id: str, data: bytes, mime_type: str,
                           filename: str | None = None) -> str:
        """Upload media (``POST /{phone_number_id}/media``, multipart); return its media id.

        Raises:
            MetaError: Meta's answer (e.g. 100 naming a bad parameter, 190 expired token).
        """
        answer, _ = await self.clients[account_id].upload(
            f"{account_id}/media", send.upload_fields(mime_type), filename or "upload", data,
            mime_type)
        return send.uploaded_id(answer)

    async def download_media(self, account_id: str, media_id: str) -> tuple[bytes, str | None]:
        """A media object's bytes and mime type: ``GET /{media_id}`` for its short-lived URL,
        then that URL with the same bearer token."""
        client = self.clients[account_id]
        info, _ = await client.get(media_id, params={"phone_number_id": account_id})
        data, content_type = await client.download(send.media_url(info))
        return data, info.get("mime_type") if isinstance(info.get("mime_type"), str) else (
            content_type)


@hookimpl
def register_channels(config: GatewayConfig) -> list[Channel]:
    table = section(config, "channels", "whatsapp", WhatsAppConfig)
    return [WhatsAppChannel(table)] if table else []
