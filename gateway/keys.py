"""Typed ``web.AppKey`` constants: the running gateway's state, shared by handlers and plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy
from aiohttp import web

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.config import GatewayConfig
    from gateway.dispatch import Dispatcher
    from gateway.journal import Journal
    from gateway.metrics import Metrics
    from gateway.processor import Processor
    from gateway.sink import Sink

CONFIG = web.AppKey("config", "GatewayConfig")
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
CHANNELS = web.AppKey("channels", "dict[str, Channel]")
SINKS = web.AppKey("sinks", "dict[str, Sink]")
JOURNAL = web.AppKey("journal", "Journal")
METRICS = web.AppKey("metrics", "Metrics")
DISPATCHER = web.AppKey("dispatcher", "Dispatcher")
PROCESSOR = web.AppKey("processor", "Processor")
READY = web.AppKey("ready", "dict[str, bool]")
# The outbound service (issue: outbound messaging): ``await app[OUTBOUND].send(body: dict)`` takes
# the body of ``POST /v1/messages`` and returns ``{"id": ..., "status": "queued"}``.
OUTBOUND = web.AppKey("outbound", object)
