"""The ``outbox`` sink: what the outbound service learns from the event stream.

Inbound messages open the customer-service window and may carry an opt-out keyword (a WhatsApp
marketing preference carries consent alone); statuses,
Instagram reads and echoes move outbox records forward, so ``GET /v1/messages/{id}`` tells the
truth; a failed status goes to the service, which applies Meta's error table to it as to a
synchronous answer (retry, record an opt-out, fail). Registered by the core whenever a channel
can send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import SinkConfig
from gateway.events import customer_wrote
from gateway.sink import Record, Sink

if TYPE_CHECKING:
    from gateway.outbound.service import OutboundService


class OutboxSink(Sink):
    """Feeds the outbound service from events (idempotent: every update is monotonic)."""

    name = "outbox"

    def __init__(self, service: OutboundService) -> None:
        super().__init__(SinkConfig(batch_size=500))
        self.service = service
        self.consent = service.consent  # the rule observe() applies first, so both agree

    async def write(self, records: list[Record]) -> None:
        outbox = self.service.outbox
        for record in records:
            ev = record.event
            if customer_wrote(ev):
                await outbox.inbound(ev.channel, ev.account_id, ev.customer_id,
                                     ev.timestamp.timestamp(), ev.message_id,
                                     self.consent.of(ev))
            elif ev.kind in ("message", "postback"):  # an echo, or an unsend: no window
                continue
            elif ev.kind == "preference":  # consent only: no message, so no window
                opted_out = self.consent.of(ev)
                if opted_out is not None:
                    await outbox.set_opted_out(ev.channel, ev.account_id, ev.customer_id,
                                               opted_out, ev.timestamp.timestamp())
            elif ev.kind == "status" and ev.status:
                record_id = (ev.callback_data if (ev.callback_data or "").startswith("msg_")
                             else None)
                if ev.status == "failed":
                    await self.service.failed_status(ev, record_id)
                    continue
                await outbox.status(provider_message_id=ev.message_id, record_id=record_id,
                                    status=ev.status,
                                    error=None if ev.error is None else {
                                        "code": ev.error.code, "message": ev.error.title})
            elif ev.kind == "read" and ev.message_id:
                await outbox.status(provider_message_id=ev.message_id, record_id=None,
                                    status="read", error=None)

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        self.service.forget_contact(channel, contact_id)
        return await self.service.outbox.erase_contact(channel, contact_id)
