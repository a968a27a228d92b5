"""The storage sink on its own (a real SQLite file): the same events give the same rows however
the dispatcher batches them."""

from __future__ import annotations

import re
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


def schema_without_schema_and_emoji() -> str:
    """The storage layout before ``messages`` had the ``schema`` and ``emoji`` columns."""
    from sinks.storage.schema import SCHEMA

    old = re.sub(r",(\s*--[^\n]*)\n\s*schema INTEGER, emoji TEXT[^\n]*", r"\1", SCHEMA)
    assert "emoji TEXT" not in old and "schema INTEGER" not in old
    return old


def slashed(customer: str = "49/18") -> Message:
    return Message(schema=1, id=f"ev-{customer}", channel="whatsapp", direction="inbound",
                   account_id=FIRST, conversation_id=conversation_id("whatsapp", FIRST, customer),
                   sender=Party(customer, "Slash"), recipient=Party(FIRST), timestamp=T0,
                   message_id="wamid.D1", type="text", text="hi")


async def test_document_ids_never_hold_a_slash_and_messages_keep_every_field(tmp_path):
    """CONTRACT §8: ids never contain '/' (the contact's too, as Firestore has it); a message
    row holds the event's schema and emoji as well."""
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    event = slashed()
    await sink.write([Record(1, event, encode(event), 1.0)])
    ids = [row[0] for table in ("contacts", "conversations", "messages")
           for row in await sink.query(f"SELECT id FROM {table}")]
    assert ids == ["whatsapp:49_18", "whatsapp:100000000000001:49_18", "wamid.D1"]
    assert await sink.query("SELECT schema, emoji FROM messages") == [(1, None)]
    assert (await sink.erase_contact("whatsapp", "49/18"))["contacts"] == 1
    await sink.close()


async def test_a_database_of_the_earlier_layout_is_brought_up_to_date(tmp_path):
    """Made before contact ids were slash-free and messages had schema and emoji."""
    import sqlite3

    path = tmp_path / "storage.db"
    with sqlite3.connect(path) as db:
        db.executescript(schema_without_schema_and_emoji())
        db.execute("INSERT INTO contacts(id, channel, contact_id) VALUES ('whatsapp:49/18',"
                   " 'whatsapp', '49/18')")
    sink = StorageSink(StorageConfig(path=str(path)))
    await sink.start()
    event = slashed()
    await sink.write([Record(1, event, encode(event), 1.0)])
    assert await sink.query("SELECT id, name FROM contacts") == [("whatsapp:49_18", "Slash")]
    assert await sink.query("SELECT schema FROM messages") == [(1,)]
    await sink.close()
    with sqlite3.connect(path) as db:  # an older version, run again, adds one (and a conflict)
        db.execute("INSERT INTO contacts(id, channel, contact_id) VALUES ('whatsapp:49/18',"
                   " 'whatsapp', '49/18'), ('whatsapp:7/7', 'whatsapp', '7/7')")
    sink = StorageSink(StorageConfig(path=str(path)))
    await sink.start()
    assert await sink.query("SELECT id, name FROM contacts ORDER BY id") == [
        ("whatsapp:49_18", "Slash"), ("whatsapp:7_7", None)]
    await sink.close()


async def test_a_batch_is_on_disk_when_write_returns(tmp_path):
    """``synchronous=FULL``: the dispatcher moves the sink's cursor for good once ``write``
    returns, so a power loss must not roll the batch back (NORMAL would, in WAL mode)."""
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    try:
        assert await sink.query("PRAGMA synchronous") == [(2,)]  # 2 = FULL
        assert await sink.query("PRAGMA journal_mode") == [("wal",)]
    finally:
        await sink.close()
