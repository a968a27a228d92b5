"""Sink fan-out: retries, dead letters and replay, isolation of slow sinks, per-conversation
order."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from gateway import PermanentError, RetryableError, Sink, hookimpl, keys
from gateway.config import SinkConfig, section
from tests.conftest import CHANNELS_TOML, SINKS_TOML, fixture_bytes


class RecordingSink(Sink):
    """Records what it receives; fails on demand."""

    def __init__(self, name: str, config: SinkConfig) -> None:
        super().__init__(config)
        self.name = name
        self.fail_next = 0          # fail this many writes, then succeed
        self.broken = False         # fail every write while True
        self.delay = 0.0
        self.poison: set[str] = set()  # message ids refused permanently
        self.received: list[tuple[str, str, int]] = []  # (event id, conversation, seq)
        self.writes = 0

    async def write(self, records):
        self.writes += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if any(r.event.message_id in self.poison for r in records):
            raise PermanentError("this event is malformed for this sink")
        if self.broken or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            raise RetryableError(f"{self.name} is failing on purpose")
        self.received += [(r.event.id, r.event.conversation_id, r.seq) for r in records]


class RecordingPlugin:
    """A plugin providing [sinks.flaky], [sinks.broken], [sinks.slow], [sinks.order] as
    RecordingPlugin."""

    def __init__(self) -> None:
        self.sinks: dict[str, RecordingSink] = {}

    @hookimpl
    def register_sinks(self, config):
        found = []
        for name in ("flaky", "broken", "slow", "order"):
            table = section(config, "sinks", name, SinkConfig)
            if table:
                self.sinks[name] = RecordingSink(name, table)
                found.append(self.sinks[name])
        return found


FAST = "max_attempts = {n}\nbackoff_initial = 0.01\nbackoff_max = 0.05\n"


async def _start(gateway, tables: str):
    plugin = RecordingPlugin()
    gw = await gateway(extra_plugins=[plugin], sinks=SINKS_TOML + tables)
    return gw, plugin.sinks


async def test_sink_failing_twice_then_succeeding_gets_the_event_once(gateway):
    gw, sinks = await _start(gateway, "[sinks.flaky]\n" + FAST.format(n=5))
    sinks["flaky"].fail_next = 2
    await gw.post("whatsapp", fixture_bytes("whatsapp/text.json"))
    await gw.settle()
    assert [r[0] for r in sinks["flaky"].received] == [gw.jsonl()[0]["id"]]
    registry = gw.app[keys.METRICS].registry
    assert registry.get_sample_value("gateway_sink_deliveries_total",
                                     {"sink": "flaky", "outcome": "retry"}) == 2
    assert registry.get_sample_value("gateway_sink_deliveries_total",
                                     {"sink": "flaky", "outcome": "ok"}) == 1
    assert await gw.app[keys.JOURNAL].dead_letters() == []


async def test_always_failing_sink_dead_letters_then_replay_delivers(gateway, tmp_path):
    gw, sinks = await _start(gateway, "[sinks.broken]\n" + FAST.format(n=3))
    sinks["broken"].broken = True
    await gw.post("whatsapp", fixture_bytes("whatsapp/text.json"))
    await gw.settle()
    event_id = gw.jsonl()[0]["id"]  # the healthy sinks have it
    letters = await gw.app[keys.JOURNAL].dead_letters("broken")
    assert [(d.event_id, d.attempts) for d in letters] == [(event_id, 3)]
    assert "failing on purpose" in letters[0].reason
    registry = gw.app[keys.METRICS].registry
    assert registry.get_sample_value("gateway_sink_deliveries_total",
                                     {"sink": "broken", "outcome": "dead"}) == 1

    config = str(tmp_path / "gateway.toml")
    listing = await _cli("dead-letters", "list", "--config", config, "--json")
    rows = [json.loads(line) for line in listing.splitlines()]
    assert ([(r["sink"], r["event_id"], r["kind"]) for r in rows]
            == [("broken", event_id, "message")])

    sinks["broken"].broken = False  # the operator fixed the sink
    out = await _cli("dead-letters", "replay", "--config", config, "--sink", "broken")
    assert out.startswith("1 dead letters queued")
    for _ in range(100):
        if sinks["broken"].received:
            break
        await asyncio.sleep(0.05)
    assert [r[0] for r in sinks["broken"].received] == [event_id]
    assert await gw.app[keys.JOURNAL].dead_letters("broken") == []


async def _cli(*args: str, code: int = 0) -> str:
    """``gateway ARGS`` exiting with ``code``: its stdout (its stderr when ``code`` is not 0)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == code, err.decode()
    return (out if code == 0 else err).decode()


async def test_failing_sink_does_not_delay_the_others(gateway):
    gw, sinks = await _start(gateway, "[sinks.broken]\nmax_attempts = 4\nbackoff_initial = 1.0\n"
                                      "[sinks.slow]\n")
    sinks["broken"].broken = True
    sinks["slow"].delay = 3.0
    await gw.post("whatsapp", fixture_bytes("whatsapp/batch_mixed.json"))
    for _ in range(100):
        if len(gw.jsonl()) == 8:
            break
        await asyncio.sleep(0.02)
    assert len(gw.jsonl()) == 8, "jsonl was held up by a failing or slow sink"
    assert (await gw.sql("SELECT count(*) FROM messages"))[0][0] > 0
    assert sinks["slow"].received == [] and sinks["broken"].received == []


async def test_each_conversation_stays_in_order_through_retries(gateway):
    gw, sinks = await _start(gateway, "[sinks.order]\n" + FAST.format(n=6) + "batch_size = 500\n")
    order = sinks["order"]
    gw.app[keys.PROCESSOR].stop()
    await gw.settle()
    for name in ("whatsapp/batch_mixed.json", "whatsapp/status_sent.json",
                 "whatsapp/status_delivered.json", "whatsapp/status_read.json",
                 "whatsapp/text.json", "whatsapp/image.json", "whatsapp/reaction.json"):
        assert (await gw.post("whatsapp", fixture_bytes(name)))[0] == 200
    order.fail_next = 3  # the batch fails, then lanes retry: some events fail once more
    gw.app[keys.PROCESSOR]._stopping = False
    task = asyncio.create_task(gw.app[keys.PROCESSOR].run())
    await gw.settle()
    gw.app[keys.PROCESSOR].stop()
    await task
    assert len(order.received) == len(gw.jsonl()) == 14
    per_conversation: dict[str, list[int]] = {}
    for _, conversation, seq in order.received:
        per_conversation.setdefault(conversation, []).append(seq)
    assert len(per_conversation) >= 3
    for seqs in per_conversation.values():
        assert seqs == sorted(seqs)


async def test_one_poison_event_does_not_dead_letter_its_batch(gateway):
    gw, sinks = await _start(gateway, "[sinks.flaky]\n" + FAST.format(n=5))
    sinks["flaky"].poison = {"wamid.TEST.IN.BATCH.0002"}
    await gw.post("whatsapp", fixture_bytes("whatsapp/batch_mixed.json"))
    await gw.settle()
    letters = await gw.app[keys.JOURNAL].dead_letters("flaky")
    assert len(letters) == 1 and "malformed" in letters[0].reason and letters[0].attempts == 1
    assert len(sinks["flaky"].received) == 7
    poisoned = [e["id"] for e in gw.jsonl() if e.get("message_id") == "wamid.TEST.IN.BATCH.0002"]
    assert letters[0].event_id == poisoned[0]


def test_dead_letters_list_says_when_it_shows_only_the_oldest_and_replay_names_unknown_ids(
        tmp_path):
    from gateway.config import GatewayConfig, ServerConfig
    from gateway.journal import StoredEvent
    from gateway.journal.sqlite import SqliteJournal

    async def fill() -> None:
        journal = SqliteJournal(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
        await journal.open()
        await journal.add_dead_letters("storage", [(StoredEvent(i, b"{}", 1.0), f"e{i}", "r", 1)
                                                   for i in range(1, 6)])
        await journal.add_dead_letters("removed", [(StoredEvent(9, b"{}", 1.0), "e9", "r", 1)])
        await journal.close()

    asyncio.run(fill())
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[sinks.storage]\n')

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gateway", "dead-letters", *args,
                               "--config", str(config)], capture_output=True, text=True)

    listed = cli("list", "--limit", "3")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 3
    assert "3 of 6 dead letters" in listed.stderr and "--limit" in listed.stderr
    assert "6 dead letters" in cli("list").stderr
    replay = cli("replay", "1", "99999")
    assert replay.returncode == 2 and "1 of the ids given are not dead letters" in replay.stderr
    assert replay.stdout.startswith("1 dead letters queued")
    # a sink the config does not run: nothing would redeliver its letters, so none is marked
    replay = cli("replay", "--sink", "removed")
    assert replay.returncode == 2 and "'removed' is not enabled in this config" in replay.stderr
    replay = cli("replay")
    assert replay.returncode == 0 and replay.stdout.startswith("4 dead letters queued")
    assert "sinks this config does not enable: removed (1)" in replay.stderr
    assert "removed" in cli("list", "--sink", "removed").stdout  # still listed


async def test_requests_of_a_channel_not_running_are_replayed_once_it_runs(gateway, tmp_path):
    """Requests acknowledged for a channel that the next start does not run become
    ``normalise:<channel>`` dead letters with their raw bodies; once the channel runs again,
    ``dead-letters replay`` has them journaled again and processed into every sink."""
    from gateway import config as gwconfig
    from gateway.journal.sqlite import SqliteJournal

    data_dir = tmp_path / "data"
    body = fixture_bytes("instagram/text.json")
    path = tmp_path / "journal.toml"
    path.write_text(f'[server]\ndata_dir = "{data_dir}"\n')
    journal = SqliteJournal(gwconfig.load(str(path), environ={}))
    await journal.open()
    await journal.append("instagram", body, 1_760_000_000.0)  # acknowledged before a restart
    await journal.close()
    whatsapp_only = CHANNELS_TOML.split("[channels.instagram]")[0]
    gw = await gateway(channels=whatsapp_only)
    await gw.settle()
    [letter] = await gw.app[keys.JOURNAL].dead_letters()
    assert letter.sink == "normalise:instagram" and "not enabled" in letter.reason
    config = str(tmp_path / "gateway.toml")
    refused = await _cli("dead-letters", "replay", "--config", config,
                         "--sink", "normalise:instagram", code=2)
    assert "channels.instagram" in refused
    await gw.server.close()

    gw = await gateway()  # instagram runs again
    out = await _cli("dead-letters", "replay", "--config", config)
    assert out.startswith("1 dead letters queued")
    for _ in range(200):
        if gw.jsonl():
            break
        await asyncio.sleep(0.05)
    await gw.settle()
    [event] = gw.jsonl()
    assert event["channel"] == "instagram" and event["kind"] == "message"
    assert await gw.app[keys.JOURNAL].dead_letters() == []
    again = await _cli("dead-letters", "replay", "--config", config)  # nothing left to replay
    assert again.startswith("0 dead letters queued")
