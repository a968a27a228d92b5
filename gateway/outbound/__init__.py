"""Outbound messaging: the durable outbox, rate limits, Meta's errors, ``/v1/messages``."""

from __future__ import annotations

from gateway.outbound.service import OutboundService, Refused
from gateway.outbound.sink import OutboxSink

__all__ = ["OutboundService", "OutboxSink", "Refused"]
