"""The storage sink on its own (a real SQLite file): the same events give the same rows however
the dispatcher batches them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from gateway.events import Message, Party, Reaction, conversation_id, encode
from gateway.sink import Record
from sinks.storage.sink import StorageConfig, StorageSink

CUSTOMER, FIRST, SECOND = "15550002222", "100000000000001", "100000000000002"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def events() -> list:
    conversation = conversation_id("whatsapp", FIRST, CUSTOMER)
    message = Message(schema=1, id="ev-1", channel="whatsapp", direction="inbound",
                      account_id=FIRST, conversation_id=conversation,
                      sender=Party(CUSTOMER, "Old Name"), recipient=Party(FIRST), timestamp=T0,
                      message_id="wamid.1", type="text", text="hi")
    reaction = Reaction(schema=1, id="ev-2", channel="whatsapp", direction="inbound",
                        account_id=SECOND,
                        conversation_id=conversation_id("whatsapp", SECOND, CUSTOMER),
                        sender=Party(CUSTOMER, "New Name"), recipient=Party(SECOND),
                        timestamp=T0 + timedelta(seconds=10), message_id="wamid.biz.1", emoji="x")
    return [message, reaction]


async def contact_after(tmp_path, batches: list[list]) -> tuple:
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    for batch in batches:
        await sink.write([Record(i, e, encode(e), 1.0) for i, e in enumerate(batch, 1)])
    rows = await sink.query("SELECT name, account_id, first_seen, last_seen, last_inbound_at"
                            " FROM contacts WHERE id = ?", (f"whatsapp:{CUSTOMER}",))
    await sink.close()
    return rows[0]


async def test_a_contact_is_the_same_whether_its_events_came_in_one_batch_or_two(tmp_path):
    message, reaction = events()
    together = await contact_after(tmp_path / "one", [[message, reaction]])
    apart = await contact_after(tmp_path / "two", [[message], [reaction]])
    assert together == apart
    assert together[:2] == ("New Name", FIRST)  # the latest name, the first account seen
