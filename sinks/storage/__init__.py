"""The ``storage`` sink plugin: contacts, conversations, messages in SQLite (CONTRACT §8)."""

from __future__ import annotations

from gateway import Sink, hookimpl
from gateway.config import GatewayConfig, file_sink_section
from gateway.consent import Consent
from sinks.storage.sink import StorageConfig, StorageSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = file_sink_section(config, "storage", StorageConfig, "storage.db")
    if table is None:
        return []
    return [StorageSink(table, Consent.from_config(config))]
