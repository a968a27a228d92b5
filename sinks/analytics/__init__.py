"""The ``analytics`` sink plugin: daily volumes and first-response times in SQLite
(``[sinks.analytics]``, entry point ``gateway.sinks: analytics``; see ``docs/analytics.md``)."""

from __future__ import annotations

import os

from gateway import Command, Sink, hookimpl
from gateway.config import GatewayConfig, section
from sinks.analytics.sink import AnalyticsConfig, AnalyticsSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = section(config, "sinks", "analytics", AnalyticsConfig)
    if table is None:
        return []
    if not table.path:
        table.path = os.path.join(config.server.data_dir, "analytics.db")
    return [AnalyticsSink(table)]


@hookimpl
def register_commands() -> list[Command]:
    from sinks.analytics.cli import COMMAND

    return [COMMAND]
