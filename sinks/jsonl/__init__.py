"""The ``jsonl`` sink plugin: one canonical event per line (entry point
``gateway.sinks: jsonl``)."""

from __future__ import annotations

import os

from gateway import Sink, hookimpl
from gateway.config import GatewayConfig, section
from sinks.jsonl.sink import JsonlConfig, JsonlSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = section(config, "sinks", "jsonl", JsonlConfig)
    if table is None:
        return []
    if not table.path:
        table.path = os.path.join(config.server.data_dir, "events.jsonl")
    return [JsonlSink(table)]
