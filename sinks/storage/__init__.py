"""The ``storage`` sink plugin: contacts, conversations, messages in SQLite (CONTRACT §8)."""

from __future__ import annotations

import os

from gateway import Sink, hookimpl
from gateway.config import GatewayConfig, section
from gateway.consent import Consent
from sinks.storage.sink import StorageConfig, StorageSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = section(config, "sinks", "storage", StorageConfig)
    if table is None:
        return []
    if not table.path:
        table.path = os.path.join(config.server.data_dir, "storage.db")
    return [StorageSink(table, Consent.from_config(config))]
