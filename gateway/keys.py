"""Typed ``web.AppKey`` constants: the running gateway's state, shared by handlers and plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy
from aiohttp import web

if TYPE_CHECKING:
    # The types the AppKey strings below name ("GatewayConfig", "dict[str, Channel]", ...): ruff
    # does not read those strings as annotations, hence the noqa. Not imported at runtime.
    from gateway.budget import ByteBudget  # noqa: F401
    from gateway.channel import Channel  # noqa: F401
    from gateway.config import GatewayConfig  # noqa: F401
    from gateway.dispatch import Dispatcher  # noqa: F401
    from gateway.journal import Journal  # noqa: F401
    from gateway.metrics import Metrics  # noqa: F401
    from gateway.processor import Processor  # noqa: F401
    from gateway.sink import Sink  # noqa: F401

CONFIG = web.AppKey("config", "GatewayConfig")
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
CHANNELS = web.AppKey("channels", "dict[str, Channel]")
SINKS = web.AppKey("sinks", "dict[str, Sink]")
# Which plugin provides each channel and sink: ``("channel" | "sink", NAME)`` -> plugin name.
OWNERS = web.AppKey("owners", "dict[tuple[str, str], str]")
JOURNAL = web.AppKey("journal", "Journal")
METRICS = web.AppKey("metrics", "Metrics")
DISPATCHER = web.AppKey("dispatcher", "Dispatcher")
PROCESSOR = web.AppKey("processor", "Processor")
READY = web.AppKey("ready", "dict[str, bool]")
# Request bytes the main port holds at once (gateway.budget): the lean path and aiohttp's bodies.
BUDGET = web.AppKey("budget", "ByteBudget")
# The outbound service (issue: outbound messaging): ``await app[OUTBOUND].send(body: dict)`` takes
# the body of ``POST /v1/messages`` and returns ``{"id": ..., "status": "queued"}``.
OUTBOUND = web.AppKey("outbound", object)
# requests aiohttp is serving on the main port (their bodies may still be arriving): at SIGTERM
# the gateway waits for them before aiohttp's own shutdown, which reads no more bytes
IN_FLIGHT = web.AppKey("in_flight", "dict[str, int]")
