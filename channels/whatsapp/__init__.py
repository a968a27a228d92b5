"""The WhatsApp Cloud API channel plugin (entry point ``gateway.channels: whatsapp``)."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from channels.whatsapp import normalise
from gateway import Channel, hookimpl
from gateway.events import Event
from gateway.config import ChannelConfig, GatewayConfig, section


class Account(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One more business phone number: ``[[channels.whatsapp.accounts]]``."""

    phone_number_id: str
    access_token: str | None = None


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


class WhatsAppChannel(Channel):
    """Verifies and normalises WhatsApp Cloud API webhooks."""

    name = "whatsapp"

    def __init__(self, config: WhatsAppConfig) -> None:
        super().__init__(app_secret=config.app_secret, verify_token=config.verify_token)
        self.config = config

    def check_envelope(self, body: bytes) -> None:
        normalise.parse_envelope(body)

    def normalise(self, body: bytes) -> list[Event]:
        return normalise.normalise(body)


@hookimpl
def register_channels(config: GatewayConfig) -> list[Channel]:
    table = section(config, "channels", "whatsapp", WhatsAppConfig)
    return [WhatsAppChannel(table)] if table else []
