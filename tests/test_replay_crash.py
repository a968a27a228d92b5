"""A dead-letter replay cut short (the process dies while the sink writes) is replayed after the
restart: the letter leaves the store only once the event was delivered, never when it is read."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from gateway import Sink
from gateway import config as gwconfig
from gateway.config import SinkConfig
from gateway.dispatch import Dispatcher
from gateway.events import Message, Party, conversation_id, encode
from gateway.journal import StoredEvent
from gateway.journal.sqlite import SqliteJournal
from gateway.metrics import Metrics


class HangingSink(Sink):
    """Its write never returns (the process is about to die)."""

    name = "s"

    def __init__(self) -> None:
        super().__init__(SinkConfig())
        self.entered = asyncio.Event()

    async def write(self, records):
        self.entered.set()
        await asyncio.Event().wait()


class RecordingSink(Sink):
    name = "s"

    def __init__(self) -> None:
        super().__init__(SinkConfig())
        self.ids: list[str] = []

    async def write(self, records):
        self.ids += [r.event.id for r in records]


def event() -> bytes:
    conv = conversation_id("whatsapp", "acct", "15550001")
    return encode(Message(schema=1, id="ev-1", channel="whatsapp", direction="inbound",
                          account_id="acct", conversation_id=conv, sender=Party("15550001"),
                          recipient=Party("acct"), timestamp=datetime(2026, 1, 1, tzinfo=UTC),
                          type="text", text="hi"))


async def test_a_replay_interrupted_before_delivery_is_replayed_after_restart(tmp_path):
    cfg = gwconfig.GatewayConfig(server=gwconfig.ServerConfig(data_dir=str(tmp_path)))
    journal = SqliteJournal(cfg)
    await journal.open()
    await journal.add_dead_letters("s", [(StoredEvent(1, event(), 1.0), "ev-1", "Boom", 3)])
    assert await journal.request_replay("s") == 1

    hanging = HangingSink()
    dispatcher = Dispatcher(journal, {"s": hanging}, Metrics())
    await dispatcher.start()
    await asyncio.wait_for(hanging.entered.wait(), 5)
    for task in dispatcher.tasks:  # the process dies mid-write: no cleanup runs
        task.cancel()
    await asyncio.gather(*dispatcher.tasks, return_exceptions=True)
    await journal.close()

    journal = SqliteJournal(cfg)  # the restart
    await journal.open()
    recording = RecordingSink()
    dispatcher = Dispatcher(journal, {"s": recording}, Metrics())
    await dispatcher.start()
    for _ in range(100):
        if recording.ids:
            break
        await asyncio.sleep(0.05)
    await dispatcher.stop(5)
    assert recording.ids == ["ev-1"]
    assert await journal.dead_letters("s") == []
    await journal.close()
