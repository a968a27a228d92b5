"""The ``ai`` sink plugin: the default responder (entry point ``gateway.sinks: ai``).

``[sinks.ai]`` turns it on; ``provider = "rules"`` (default) answers with deterministic keyword
rules, ``provider = "openai"`` through the official OpenAI SDK. See ``docs/ai.md``.
"""

from __future__ import annotations

from aiohttp import web

from gateway import Sink, hookimpl, keys
from gateway.config import GatewayConfig, section
from sinks.ai.sink import AIConfig, AISink

__all__ = ["AIConfig", "AISink"]


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = section(config, "sinks", "ai", AIConfig)
    return [AISink(table)] if table else []


@hookimpl
def gateway_started(app: web.Application, config: GatewayConfig) -> None:
    """Give this app's AI sink the running app, so that it can reach ``app[keys.OUTBOUND]``."""
    sink = app[keys.SINKS].get(AISink.name)
    if isinstance(sink, AISink):
        sink.attach(app)
