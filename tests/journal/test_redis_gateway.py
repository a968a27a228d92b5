"""Two gateway replicas on one Redis: every event reaches the sinks exactly once, whichever
replica received it, and a redelivery to the other replica is recognised as a duplicate."""

from __future__ import annotations

import asyncio
import json

from gateway import Sink, hookimpl, keys
from gateway.config import SinkConfig, section
from tests.conftest import fixture_bytes
from tests.expect import expected_files

FILES = [name for name in sorted(expected_files()) if name.startswith("whatsapp/")]


class Shared:
    """A sink plugin whose sinks (one per replica) record into one shared list."""

    def __init__(self) -> None:
        self.delivered: list[str] = []

    @hookimpl
    def register_sinks(self, config):
        table = section(config, "sinks", "rec", SinkConfig)
        if table is None:
            return []
        shared = self

        class Recording(Sink):
            name = "rec"

            async def write(self, records):
                shared.delivered.extend(r.event.id for r in records)

        return [Recording(table)]


async def test_two_replicas_deliver_every_event_exactly_once(gateway, redis_url):
    plugin = Shared()
    extra = f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
    replicas = [await gateway(extra=extra, extra_plugins=[plugin], sinks="[sinks.rec]\n")
                for _ in range(2)]
    assert all(r.app[keys.JOURNAL].shared for r in replicas)
    expected = 0
    for i, name in enumerate(FILES):
        body = fixture_bytes(name)
        assert (await replicas[i % 2].post("whatsapp", body))[0] == 200
        assert (await replicas[(i + 1) % 2].post("whatsapp", body))[0] == 200  # Meta redelivers
        expected += len(expected_files()[name]["events"])
    for _ in range(200):
        if len(plugin.delivered) >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a second delivery would show up now
    assert len(plugin.delivered) == expected == len(set(plugin.delivered))
    duplicates = sum(r.app[keys.METRICS].registry.get_sample_value(
        "gateway_duplicate_events_total", {"channel": "whatsapp"}) or 0 for r in replicas)
    assert duplicates == expected


async def test_readiness_reports_redis(gateway, redis_url):
    gw = await gateway(extra=f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"')
    status, body, _ = await gw.get("/readyz")
    assert status == 200 and body["checks"]["journal"] is True
    assert json.dumps(body)
