"""The storage sink on its own (a real SQLite file): the same events give the same rows however
the dispatcher batches them."""

from __future__ import annotations

import json
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
    """The storage layout before ``messages`` had the ``schema`` and ``emoji`` columns (and the
    later ``messages.edited_at`` and ``messages.pricing``, ``contacts.name_at``,
    ``contacts.user_id`` and ``contacts.username``)."""
    from sinks.storage.schema import SCHEMA

    old = re.sub(r",(\s*--[^\n]*)\n\s*schema INTEGER, emoji TEXT[^\n]*(\n\s*edited_at TEXT[^\n]*)?"
                 r"(\n\s*pricing TEXT[^\n]*)?(\n\s*reactions_at TEXT[^\n]*)?",
                 r"\1", SCHEMA)
    old = re.sub(r",\s*name_at TEXT,[^\n]*\n\s*user_id TEXT,[^\n]*\n\s*user_id_at TEXT,[^\n]*"
                 r"\n\s*username TEXT,[^\n]*\n\s*username_at TEXT\) WITHOUT ROWID;[^\n]*",
                 ") WITHOUT ROWID;", old)
    for column in ("emoji TEXT", "schema INTEGER", "edited_at", "pricing", "reactions_at",
                   "name_at", "user_id", "username"):
        assert column not in old, column
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


def plugin_message(n: int, seconds: int, conversation: str = "telegram:bot/1:user/9",
                   name: str | None = None) -> Message:
    """A message of a plugin channel whose conversation id holds '/' (its own scheme)."""
    return Message(schema=1, id=f"tg-{n}", channel="telegram", direction="inbound",
                   account_id="bot/1", conversation_id=conversation,
                   sender=Party("user/9", name), recipient=Party("bot/1"),
                   timestamp=T0 + timedelta(seconds=seconds), message_id=f"tg/{n}", type="text",
                   text=f"message {n}")


async def test_conversation_ids_are_slash_free_keys_and_erasure_finds_their_messages(tmp_path):
    """CONTRACT §8 for a plugin's conversation ids: the row's id and every message's
    ``conversation_id`` are ``doc_id`` of it (Firestore's document id), so erasure, which follows
    the key, deletes the messages too."""
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    try:
        events = [plugin_message(1, 1), plugin_message(2, 2)]
        await sink.write([Record(i, e, encode(e), 1.0) for i, e in enumerate(events, 1)])
        assert await sink.query("SELECT id, message_count FROM conversations") == [
            ("telegram:bot_1:user_9", 2)]
        assert await sink.query("SELECT DISTINCT conversation_id FROM messages") == [
            ("telegram:bot_1:user_9",)]
        assert await sink.erase_contact("telegram", "user/9") == {
            "contacts": 1, "conversations": 1, "messages": 2}
        assert await sink.query("SELECT count(*) FROM messages") == [(0,)]
    finally:
        await sink.close()


async def test_an_earlier_database_gains_name_at_edited_at_and_slash_free_conversations(tmp_path):
    """Made before ``contacts.name_at``, ``messages.edited_at`` and slash-free conversation ids:
    the columns are added, a slashed conversation is renamed (merged into the slash-free row an
    upgraded writer already made) and its messages follow it."""
    import sqlite3

    path = tmp_path / "storage.db"
    with sqlite3.connect(path) as db:
        db.executescript(schema_without_schema_and_emoji())
        db.execute("INSERT INTO contacts(id, channel, contact_id, name, first_seen, last_seen)"
                   " VALUES ('telegram:user_9', 'telegram', 'user/9', 'Old', 'a', 'b')")
        db.executemany(
            "INSERT INTO conversations(id, channel, account_id, contact_id, message_count,"
            " last_message_at, last_text) VALUES (?, 'telegram', 'bot/1', 'user/9', ?, ?, ?)",
            [("telegram:bot/1:user/9", 2, "2026-01-01T00:00:02.000000Z", "message 2"),
             ("telegram:bot_1:user_9", 1, "2026-01-01T00:00:01.000000Z", "message 1")])
        db.executemany("INSERT INTO messages(id, message_id, channel, conversation_id)"
                       " VALUES (?, ?, 'telegram', ?)",
                       [("tg_2", "tg/2", "telegram:bot/1:user/9"),
                        ("tg_3", "tg/3", "telegram:bot/1:user/9"),
                        ("tg_1", "tg/1", "telegram:bot_1:user_9")])
    sink = StorageSink(StorageConfig(path=str(path)))
    await sink.start()
    try:
        assert await sink.query("SELECT id, message_count, last_message_at, last_text"
                                " FROM conversations") == [
            ("telegram:bot_1:user_9", 3, "2026-01-01T00:00:02.000000Z", "message 2")]
        assert await sink.query("SELECT DISTINCT conversation_id FROM messages") == [
            ("telegram:bot_1:user_9",)]
        late = plugin_message(0, -60, name="Older Name")  # older than the name it would replace
        newer = plugin_message(4, 60, name="New Name")
        for n, event in enumerate((newer, late), 1):
            await sink.write([Record(n, event, encode(event), 1.0)])
        assert await sink.query("SELECT name, name_at FROM contacts") == [
            ("New Name", "2026-01-01T00:01:00.000000Z")]
        assert await sink.query("SELECT edited_at FROM messages WHERE id = 'tg_4'") == [(None,)]
    finally:
        await sink.close()


async def test_close_does_not_wait_out_a_database_locked_by_another_process(tmp_path):
    """Another process holds the database (a backup, a migration, an operator's sqlite3): a
    shutdown closing the sink waits at most CLOSE_SECONDS, not the 10 s busy timeout of the
    write stuck behind the lock; the write it left is not acknowledged (it is redelivered)."""
    import asyncio
    import sqlite3
    import time

    from gateway import sink as gwsink

    path = tmp_path / "storage.db"
    sink = StorageSink(StorageConfig(path=str(path)))
    await sink.start()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        write = asyncio.ensure_future(sink.write(
            [Record(i, e, encode(e), 1.0) for i, e in enumerate(events(), 1)]))
        await asyncio.sleep(0.2)
        assert not write.done()  # waiting for the lock
        started = time.monotonic()
        await sink.close()
        assert time.monotonic() - started < gwsink.CLOSE_SECONDS + 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    write.cancel()


async def test_a_contacts_bsuid_is_kept_beside_the_wa_id_and_finds_the_contact(tmp_path):
    """webhooks.md §4.3: the wa_id stays the key, the BSUID is stored beside it (the latest one
    by timestamp), so that a later payload naming the BSUID alone can be matched."""
    def text(n: int, user_id: str | None, seconds: int) -> Message:
        return Message(schema=1, id=f"ev-bsuid-{n}", channel="whatsapp", direction="inbound",
                       account_id=FIRST, conversation_id=conversation_id("whatsapp", FIRST,
                                                                         CUSTOMER),
                       sender=Party(CUSTOMER, "Kerry", user_id), recipient=Party(FIRST),
                       timestamp=T0 + timedelta(seconds=seconds), message_id=f"wamid.U{n}",
                       type="text", text="hi")

    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    batches = [[text(1, None, 0)], [text(2, "US.1111", 10), text(3, None, 20)],
               [text(4, "US.0000", 5)],  # an older event's BSUID changes nothing
               [text(5, None, 30)]]
    for batch in batches:
        await sink.write([Record(i, e, encode(e), 1.0) for i, e in enumerate(batch, 1)])
    found = "SELECT contact_id FROM contacts WHERE channel = 'whatsapp' AND user_id = ?"
    assert await sink.query(found, ("US.1111",)) == [(CUSTOMER,)]
    await sink.write([Record(1, e, encode(e), 1.0) for e in [text(6, "US.2222", 40)]])
    assert await sink.query(found, ("US.2222",)) == [(CUSTOMER,)]  # user_changed_user_id
    assert await sink.query(found, ("US.1111",)) == []
    plan = await sink.query("EXPLAIN QUERY PLAN " + found, ("US.2222",))
    assert "contacts_user_id" in str(plan)
    await sink.close()


async def test_an_outbound_message_keeps_the_first_price_meta_gives_it(tmp_path):
    """webhooks.md §4.5: ``pricing`` rides on ``sent`` and again on one of delivered / read."""
    from gateway.events import Status

    def status(state: str, seconds: int, pricing: dict | None) -> Status:
        return Status(schema=1, id=f"st-{state}", channel="whatsapp", direction="outbound",
                      account_id=FIRST, conversation_id=conversation_id("whatsapp", FIRST,
                                                                        CUSTOMER),
                      sender=Party(FIRST), recipient=Party(CUSTOMER),
                      timestamp=T0 + timedelta(seconds=seconds), message_id="wamid.OUT.P",
                      status=state, pricing=pricing)

    utility = {"billable": True, "pricing_model": "PMP", "type": "regular",
               "category": "utility"}
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")))
    await sink.start()
    for batch in ([status("delivered", 2, None)],  # before the priced one: no price yet
                  [status("sent", 1, utility)],
                  [status("read", 3, {**utility, "category": "marketing"})]):
        await sink.write([Record(i, e, encode(e), 1.0) for i, e in enumerate(batch, 1)])
    [(state, pricing)] = await sink.query(
        "SELECT status, pricing FROM messages WHERE id = 'wamid.OUT.P'")
    assert (state, json.loads(pricing)) == ("read", utility)  # a key keeps its first value
    await sink.close()
