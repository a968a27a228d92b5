"""The ``analytics`` sink plugin: daily volumes and first-response times in SQLite
(``[sinks.analytics]``, entry point ``gateway.sinks: analytics``; see ``docs/analytics.md``)."""

from __future__ import annotations

from gateway import Command, Sink, hookimpl
from gateway.config import GatewayConfig, file_sink_section
from sinks.analytics.sink import DB_FILE, AnalyticsConfig, AnalyticsSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = file_sink_section(config, "analytics", AnalyticsConfig, DB_FILE)
    if table is None:
        return []
    return [AnalyticsSink(table)]


@hookimpl
def register_commands() -> list[Command]:
    from sinks.analytics.cli import COMMAND

    return [COMMAND]
