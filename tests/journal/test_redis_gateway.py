"""Two gateway replicas on one Redis: every event reaches the sinks exactly once, whichever
replica received it, and a redelivery to the other replica is recognised as a duplicate."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from gateway import Sink, hookimpl, keys
from gateway.config import SinkConfig, section
from tests.conftest import fixture_bytes
from tests.expect import expected_files
from tests.test_listener import post, read_response

FILES = [name for name in sorted(expected_files()) if name.startswith("whatsapp/")]


class Shared:
    """A sink plugin whose sinks (one per replica) record into one shared list."""

    def __init__(self) -> None:
        self.delivered: list[tuple[int, str]] = []  # (which replica's sink, event id)
        self.instances = 0

    @hookimpl
    def register_sinks(self, config):
        table = section(config, "sinks", "rec", SinkConfig)
        if table is None:
            return []
        shared = self
        shared.instances += 1
        replica = shared.instances

        class Recording(Sink):
            name = "rec"

            async def write(self, records):
                shared.delivered.extend((replica, r.event.id) for r in records)

        return [Recording(table)]

    def ids(self) -> list[str]:
        return [event_id for _, event_id in self.delivered]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


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
    await wait_for(lambda: len(plugin.delivered) >= expected)
    for replica in replicas:  # both see the shared cursor: caught up, nothing pending
        await replica.settle()
    await asyncio.sleep(0.5)  # a second delivery would show up now
    assert len(plugin.ids()) == expected == len(set(plugin.ids()))
    assert len({who for who, _ in plugin.delivered}) == 1  # one replica holds the sink's lease
    registries = [r.app[keys.METRICS].registry for r in replicas]
    duplicates = sum(reg.get_sample_value("gateway_duplicate_events_total",
                                          {"channel": "whatsapp"}) or 0 for reg in registries)
    assert duplicates == expected
    fresh = sum(reg.get_sample_value("gateway_webhook_requests_total",
                                     {"channel": "whatsapp", "outcome": "accepted"}) or 0
                for reg in registries)
    assert fresh == 2 * len(FILES)


async def test_a_sink_slower_than_the_lease_is_still_delivered_by_one_replica(
        gateway, redis_url, monkeypatch):
    # The lease (here 0.6 s) is renewed while its holder delivers: a write that takes longer
    # (a slow backend, a sink retrying with backoff) never lets the other replica in to
    # deliver the same batch, or to dead-letter the same event.
    from gateway import dispatch

    monkeypatch.setattr(dispatch, "LEASE_MS", 600)
    plugin = Shared()
    extra = f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
    slow = {"first": True}
    original = plugin.register_sinks

    def register(config):
        [sink] = original(config)
        write = sink.write

        async def slow_write(records):
            if slow.pop("first", False):
                await asyncio.sleep(2.0)  # more than three lease lifetimes
            await write(records)

        sink.write = slow_write
        return [sink]

    plugin.register_sinks = hookimpl(register)
    replicas = [await gateway(extra=extra, extra_plugins=[plugin], sinks="[sinks.rec]\n")
                for _ in range(2)]
    assert (await replicas[0].post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200
    await wait_for(lambda: len(plugin.delivered) == 1)
    await asyncio.sleep(2.5)  # past the slow write: a second delivery would show up now
    assert len(plugin.delivered) == 1


async def test_the_other_replica_takes_over_the_sink_when_one_stops(gateway, redis_url):
    plugin = Shared()
    extra = f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
    replicas = [await gateway(extra=extra, extra_plugins=[plugin], sinks="[sinks.rec]\n")
                for _ in range(2)]
    first = fixture_bytes("whatsapp/text.json")
    assert (await replicas[1].post("whatsapp", first))[0] == 200
    await wait_for(lambda: len(plugin.delivered) == 1)
    holder = plugin.delivered[0][0]  # replica number (1-based) whose sink delivered
    stopping, staying = replicas[holder - 1], replicas[2 - holder]
    await stopping.session.close()
    await stopping.server.close()  # graceful: drains, then gives its leases back
    second = fixture_bytes("whatsapp/image.json")
    assert (await staying.post("whatsapp", second))[0] == 200
    assert (await staying.post("whatsapp", first))[0] == 200  # already delivered: a duplicate
    # well within the 10 s lease: the stopped replica released it rather than letting it expire
    await wait_for(lambda: len(plugin.delivered) == 2, timeout=5.0)
    await staying.settle()
    await asyncio.sleep(0.3)
    assert [who for who, _ in plugin.delivered] == [holder, 3 - holder]
    assert len(set(plugin.ids())) == 2


async def test_readiness_reports_redis(gateway, redis_url):
    gw = await gateway(extra=f'[queue]\nbackend = "redis"\nredis_url = "{redis_url}"')
    status, body, _ = await gw.get("/readyz")
    assert status == 200 and body["checks"]["journal"] is True
    assert json.dumps(body)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_burst_in_one_loop_turn_cannot_overfill_the_journal(gateway, redis_url, backend):
    """Webhooks that all arrive before the loop runs again are admitted in one turn: each must
    see the appends admitted before it (max_pending holds on both journals)."""
    extra = "[queue]\nmax_pending = 3\n"
    if backend == "redis":
        extra += f'backend = "redis"\nredis_url = "{redis_url}"\n'
    gw = await gateway(extra=extra)
    gw.app[keys.PROCESSOR].stop()  # returns once the journal is empty; nothing processed after
    await gw.settle()
    body = fixture_bytes("whatsapp/text.json")
    sockets = []
    for i in range(20):  # connected and sent from here, without yielding to the loop
        sock = socket.create_connection(("127.0.0.1", gw.server.port))
        sock.sendall(post(body.replace(b"wamid.", b"wamid.B%03d" % i)))
        sockets.append(sock)
    statuses = []
    for sock in sockets:
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        statuses.append((await read_response(reader))[0])
        writer.close()
    assert sorted(statuses) == [200] * 3 + [503] * 17
    assert gw.app[keys.JOURNAL].appending == 0


async def test_a_redis_outage_fails_sends_and_erasures_at_once_never_hangs(
        gateway, own_redis, monkeypatch):
    """With Redis down, a send answers 503 with Retry-After (whose id a BSUID is, the journal
    cannot tell; the outbox cannot store a send to a number), and an erasure answers with the
    journal failed: none of them waits for Redis to come back."""
    import time

    from gateway import erasure
    from gateway.testing.graph import GraphSimulator
    from tests.outbound.conftest import TOKEN, channels_toml

    monkeypatch.setattr(erasure, "BATCH_WAIT_SECONDS", 2.0)
    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    url, start = own_redis
    redis = start()
    bsuid, wa_id = "US.13491208655302741918", "16315551234"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with GraphSimulator() as sim:
        gw = await gateway(extra=f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\n'
                                 f'redis_url = "{url}"\nretry_after_seconds = 7',
                           channels=channels_toml(sim.url))
        assert (await gw.post("whatsapp", fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
                )[0] == 200
        await gw.settle()
        redis.terminate()
        redis.wait(10)
        for to, code in ((bsuid, "journal_unavailable"), (wa_id, "outbox_unavailable")):
            began = time.monotonic()
            async with gw.session.post(f"{gw.url}/v1/messages", headers=auth, json={
                    "channel": "whatsapp", "to": to, "type": "text", "text": "hi"}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "7", to
                assert (await resp.json())["error"]["code"] == code
            assert time.monotonic() - began < 10, to
        began = time.monotonic()
        async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{wa_id}",
                                     headers=auth) as resp:
            body = await resp.json()
        assert resp.status == 500 and "journal" in body["failed"], body
        assert time.monotonic() - began < 20
        start()  # back: the repeat the failed erasure asks for erases the person
        await gw.settle()
        async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{wa_id}",
                                     headers=auth) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["linked_ids"] == [bsuid], body
