"""gateway-webhook-forwarder: a ``[sinks.forward]`` sink for multichannel-gateway.

Registered through the entry point ``forward = "gateway_webhook_forwarder"`` in the group
``gateway.sinks``; installing this distribution next to the gateway is all it takes.
Receivers can check requests with :func:`verify`.
"""

from __future__ import annotations

from gateway import Sink, hookimpl
from gateway.config import GatewayConfig, section

from gateway_webhook_forwarder.sink import (
    EVENT_IDS_HEADER,
    SIGNATURE_HEADER,
    ForwardConfig,
    ForwardSink,
    sign,
    verify,
)

__version__ = "0.1.0"
__all__ = [
    "EVENT_IDS_HEADER",
    "SIGNATURE_HEADER",
    "ForwardConfig",
    "ForwardSink",
    "register_sinks",
    "sign",
    "verify",
]


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    """``[sinks.forward]`` present (and not disabled): one :class:`ForwardSink`."""
    table = section(config, "sinks", "forward", ForwardConfig)
    return [ForwardSink(table)] if table else []
