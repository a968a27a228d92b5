"""multichannel-gateway: verified Meta webhooks → canonical events → sinks.

The public surface for plugin authors: ``hookimpl``, the channel and sink base classes, the
CLI ``Command``, the canonical events and the exception tree.
"""

from __future__ import annotations

import pluggy

from gateway.channel import Channel
from gateway.command import Command
from gateway.errors import (
    BadPayload,
    ConfigError,
    DeliveryError,
    GatewayError,
    PermanentError,
    PluginError,
    RateLimited,
    RetryableError,
)
from gateway.events import (
    Event,
    Handover,
    Message,
    Postback,
    Reaction,
    Read,
    Referral,
    Status,
)
from gateway.sink import Record, Sink

__version__ = "0.1.0"
hookimpl = pluggy.HookimplMarker("gateway")

__all__ = [
    "BadPayload",
    "Channel",
    "Command",
    "ConfigError",
    "DeliveryError",
    "Event",
    "GatewayError",
    "Handover",
    "Message",
    "PermanentError",
    "PluginError",
    "Postback",
    "RateLimited",
    "Reaction",
    "Read",
    "Record",
    "Referral",
    "RetryableError",
    "Sink",
    "Status",
    "hookimpl",
]
