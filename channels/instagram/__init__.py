"""The Instagram Messaging channel plugin (entry point ``gateway.channels: instagram``)."""

from __future__ import annotations

from typing import ClassVar

from channels.instagram import normalise
from gateway import Channel, hookimpl
from gateway.events import Event
from gateway.config import ChannelConfig, GatewayConfig, section


class InstagramConfig(ChannelConfig):
    """``[channels.instagram]``."""

    env: ClassVar = {
        "app_secret": ("INSTAGRAM_APP_SECRET", "META_APP_SECRET"),
        "verify_token": ("INSTAGRAM_VERIFY_TOKEN",),
        "access_token": ("INSTAGRAM_ACCESS_TOKEN",),
        "page_id": ("INSTAGRAM_PAGE_ID",),
    }
    page_id: str | None = None


class InstagramChannel(Channel):
    """Verifies and normalises Instagram Messaging webhooks."""

    name = "instagram"

    def __init__(self, config: InstagramConfig) -> None:
        super().__init__(app_secret=config.app_secret, verify_token=config.verify_token)
        self.config = config

    def check_envelope(self, body: bytes) -> None:
        normalise.parse_envelope(body)

    def normalise(self, body: bytes) -> list[Event]:
        return normalise.normalise(body)


@hookimpl
def register_channels(config: GatewayConfig) -> list[Channel]:
    table = section(config, "channels", "instagram", InstagramConfig)
    return [InstagramChannel(table)] if table else []
