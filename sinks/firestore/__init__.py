"""The ``firestore`` sink plugin: contacts, conversations, messages in Firestore (CONTRACT §8).

Registered through the ``gateway.sinks`` entry point ``firestore = "sinks.firestore"``; on when
``[sinks.firestore]`` is present. See ``docs/firestore.md``.
"""

from __future__ import annotations

from gateway import Command, Sink, hookimpl
from gateway.config import GatewayConfig, section
from gateway.consent import Consent
from sinks.firestore.sink import FirestoreConfig, FirestoreSink


@hookimpl
def register_sinks(config: GatewayConfig) -> list[Sink]:
    table = section(config, "sinks", "firestore", FirestoreConfig)
    return [FirestoreSink(table, Consent.from_config(config))] if table is not None else []


@hookimpl
def register_commands() -> list[Command]:
    from sinks.firestore.cli import COMMAND

    return [COMMAND]
