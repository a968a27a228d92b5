"""The ``jsonl`` sink plugin: one canonical event per line (entry point
``gateway.sinks: jsonl``)."""

from __future__ import annotations

from gateway import Sink, hookimpl
from gateway.config import GatewayConfig, file_sink_section
from sinks.jsonl.sink import JsonlConfig, JsonlSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = file_sink_section(config, "jsonl", JsonlConfig, "events.jsonl")
    if table is None:
        return []
    return [JsonlSink(table)]
