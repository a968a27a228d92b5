"""The Instagram Messaging channel plugin (entry point ``gateway.channels: instagram``)."""

from __future__ import annotations

from typing import Any, ClassVar

from channels.instagram import normalise, send
from gateway import Channel, hookimpl
from gateway import logging as gwlog
from gateway.config import ChannelConfig, GatewayConfig, require_positive, section
from gateway.errors import ConfigError
from gateway.events import Event
from gateway.outbound.http import GraphClient, SendResult
from gateway.outbound.request import OutboundRequest

log = gwlog.get("channels.instagram")


class InstagramConfig(ChannelConfig):
    """``[channels.instagram]``."""

    env: ClassVar = {
        "app_secret": ("INSTAGRAM_APP_SECRET", "META_APP_SECRET"),
        "verify_token": ("INSTAGRAM_VERIFY_TOKEN",),
        "access_token": ("INSTAGRAM_ACCESS_TOKEN",),
        "page_id": ("INSTAGRAM_PAGE_ID",),
    }
    page_id: str | None = None
    account_id: str | None = None  # the IG account id of webhooks (entry[].id) if not page_id
    # Meta (limits.md §8): 300 calls/s per account for text, links, reactions, stickers (and
    # the other types), 10 calls/s for audio or video; "too many messages to a single thread"
    # has no published figure, so one per thread_interval_seconds with a small burst.
    messages_per_second: float = 300.0
    audio_video_per_second: float = 10.0
    thread_interval_seconds: float = 6.0  # 0: no per-thread limit
    thread_burst: int = 5
    send_timeout: float = 10.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require_positive(self, prefix, "messages_per_second", "audio_video_per_second",
                         "send_timeout")
        if self.thread_interval_seconds < 0:
            raise ConfigError("must not be negative", f"{prefix}.thread_interval_seconds")
        if self.thread_burst < 1:
            raise ConfigError("must be at least 1", f"{prefix}.thread_burst")


class InstagramChannel(Channel):
    """Verifies and normalises Instagram Messaging webhooks; sends through the Send API."""

    name = "instagram"

    def __init__(self, config: InstagramConfig) -> None:
        super().__init__(app_secret=config.app_secret, verify_token=config.verify_token)
        self.config = config
        self.client: GraphClient | None = None
        # Sending as a Page whose IG account id is not configured: the ids webhooks name instead
        # (warned about once each; replies are keyed by the account the customer wrote to).
        self._unmapped: set[str] | None = (
            set() if config.page_id and not config.account_id and config.access_token else None)

    def check_envelope(self, body: bytes) -> None:
        normalise.parse_envelope(body)

    def may_be_alias(self, to: str) -> bool:
        """Instagram names a customer one way (the IGSID): no alias, no look-up."""
        return False

    def normalise(self, body: bytes) -> list[Event]:
        events = normalise.normalise(body)
        if self._unmapped is not None:
            for event in events:
                if event.account_id != self.config.page_id:
                    self._warn_unmapped(event.account_id)
        return events

    def _warn_unmapped(self, account_id: str) -> None:
        """webhooks.md §5: ``entry[].id`` is the IG professional account id, not the Facebook
        Page id of ``/{page_id}/messages``. Without ``account_id``, the channel's sending account
        is ``page_id``, so a customer who wrote to the IG account seems never to have written
        (422 outside_window) and the AI sink does not answer: say what to set, once per id."""
        if account_id in self._unmapped or len(self._unmapped) >= 100:
            return
        self._unmapped.add(account_id)
        log.warning("instagram_account_id_not_configured", account_id=account_id,
                    page_id=self.config.page_id,
                    hint=f"set channels.instagram.account_id = \"{account_id}\" if this is the "
                         "IG account of the Page: replies are checked against the window of "
                         "the account the customer wrote to")

    @property
    def account(self) -> str | None:
        return self.config.account_id or self.config.page_id

    def accounts(self) -> dict[str, dict[str, Any]]:
        if not (self.account and self.config.access_token):
            return {}
        c = self.config
        return {self.account: {
            "rate": c.messages_per_second, "scope": "ig_account",
            "type_limits": {"audio_video": (c.audio_video_per_second, ("audio", "video"))},
            "pair_interval": c.thread_interval_seconds or None, "pair_burst": c.thread_burst}}

    async def start(self) -> None:
        c = self.config
        if c.access_token:
            self.client = GraphClient(c.graph_base_url, c.graph_version, c.access_token,
                                      c.send_timeout)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def send(self, account_id: str, request: OutboundRequest,
                   callback_data: str | None) -> SendResult:
        body = send.build(request, callback_data)
        path = f"{self.config.page_id}/messages" if self.config.page_id else "me/messages"
        answer, headers = await self.client.post(path, body)
        return SendResult(send.message_id(answer), headers)


@hookimpl
def register_channels(config: GatewayConfig) -> list[Channel]:
    table = section(config, "channels", "instagram", InstagramConfig)
    return [InstagramChannel(table)] if table else []
