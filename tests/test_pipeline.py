"""Every fixture through a running gateway into the jsonl and storage sinks."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway import Channel, hookimpl, keys
from gateway.events import Message, Party
from tests.conftest import fixture_bytes
from tests.expect import expected_files, pair_up, stored_as

FILES = expected_files()


@pytest.mark.parametrize("name", sorted(FILES))
async def test_fixture_reaches_both_sinks(gateway, name):
    gw = await gateway()
    channel = name.split("/")[0]
    status, _ = await gw.post(channel, fixture_bytes(name))
    assert status == 200
    await gw.settle()
    events = gw.jsonl()
    wanted = FILES[name]["events"]
    assert len(events) == len(wanted)
    pairs = pair_up(events, wanted)
    conversations = {}
    for event, want in pairs:
        assert event["schema"] == 1 and event["channel"] == channel
        triple = tuple(want["conversation"])
        conversations.setdefault(triple, set()).add(event["conversation_id"])
    assert all(len(ids) == 1 for ids in conversations.values())
    assert len({next(iter(ids)) for ids in conversations.values()}) == len(conversations)
    edited = {stored_as(e)["message_id"] for e in events if stored_as(e) is not e}
    for event in events:
        if event["kind"] in ("message", "postback") and event.get("message_id"):
            mid = stored_as(event)["message_id"]  # an edit: the row of the message it edits
            rows = await gw.sql("SELECT event_id, conversation_id, type, text FROM messages "
                                "WHERE message_id = ?", (mid,))
            assert rows, f"message {mid} not stored"
            replaced = mid in edited and stored_as(event) is event  # the edit's content shows
            if event.get("type") != "deleted" and not replaced:
                assert rows[0][1:] == (event["conversation_id"], event.get("type"),
                                       event.get("text"))


async def test_redelivery_yields_one_event_and_counts_duplicate(gateway):
    gw = await gateway()
    body = fixture_bytes("whatsapp/batch_mixed.json")
    for _ in range(3):
        assert (await gw.post("whatsapp", body))[0] == 200
        await gw.settle()
    assert len(gw.jsonl()) == 8
    registry = gw.app[keys.METRICS].registry
    assert registry.get_sample_value("gateway_webhook_requests_total",
                                     {"channel": "whatsapp", "outcome": "duplicate"}) == 2
    assert registry.get_sample_value("gateway_duplicate_events_total",
                                     {"channel": "whatsapp"}) == 16
    counts = await gw.sql("SELECT id, message_count FROM conversations ORDER BY id")
    assert sum(c for _, c in counts) == 3  # three inbound text messages, counted once


async def test_concurrent_redeliveries_store_once(gateway):
    import asyncio

    gw = await gateway()
    body = fixture_bytes("whatsapp/text.json")
    results = await asyncio.gather(*(gw.post("whatsapp", body) for _ in range(20)))
    assert {status for status, _ in results} == {200}
    await gw.settle()
    assert len(gw.jsonl()) == 1
    assert await gw.sql("SELECT message_count FROM conversations") == [(1,)]


async def test_three_messages_in_one_post_yield_three_events(gateway):
    gw = await gateway()
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    first = value["messages"][0]
    value["messages"] = [dict(first, id=f"wamid.TEST.THREE.{i}", text={"body": f"part {i}"})
                         for i in range(3)]
    body = json.dumps(envelope).encode()
    assert (await gw.post("whatsapp", body))[0] == 200
    await gw.settle()
    events = gw.jsonl()
    assert sorted(e["text"] for e in events) == ["part 0", "part 1", "part 2"]
    assert len({e["id"] for e in events}) == 3
    assert await gw.sql("SELECT message_count FROM conversations") == [(3,)]


async def test_status_never_moves_backwards(gateway):
    gw = await gateway()
    for name in ("status_read", "status_delivered", "status_sent"):
        assert (await gw.post("whatsapp", fixture_bytes(f"whatsapp/{name}.json")))[0] == 200
        await gw.settle()
    assert len(gw.jsonl()) == 3
    rows = await gw.sql("SELECT status FROM messages WHERE message_id = 'wamid.TEST.OUT.0007'")
    assert rows == [("read",)]


async def test_status_moves_forward(gateway):
    gw = await gateway()
    for name in ("status_sent", "status_delivered", "status_read"):
        await gw.post("whatsapp", fixture_bytes(f"whatsapp/{name}.json"))
        await gw.settle()
        status = name.split("_")[1]
        rows = await gw.sql("SELECT status FROM messages WHERE message_id = 'wamid.TEST.OUT.0007'")
        assert rows == [(status,)]


async def test_failed_status_keeps_meta_error(gateway):
    gw = await gateway()
    await gw.post("whatsapp", fixture_bytes("whatsapp/status_failed.json"))
    await gw.settle()
    (status, error), = await gw.sql(
        "SELECT status, error FROM messages WHERE message_id = 'wamid.TEST.OUT.0008'")
    assert status == "failed" and json.loads(error)["code"] == 131026


@pytest.mark.parametrize("channel,add,remove,mid,who", [
    ("whatsapp", "reaction", "reaction_removed", "wamid.TEST.OUT.0005", "15550001234"),
    ("instagram", "reaction_react", "reaction_unreact", "aWdfTEST_OUT_0002", "9000000000000001"),
])
async def test_reaction_then_removal(gateway, channel, add, remove, mid, who):
    gw = await gateway()
    await gw.post(channel, fixture_bytes(f"{channel}/{add}.json"))
    await gw.settle()
    (reactions,), = await gw.sql("SELECT reactions FROM messages WHERE message_id = ?", (mid,))
    assert who in json.loads(reactions)
    await gw.post(channel, fixture_bytes(f"{channel}/{remove}.json"))
    await gw.settle()
    (reactions,), = await gw.sql("SELECT reactions FROM messages WHERE message_id = ?", (mid,))
    assert json.loads(reactions) == {}


async def test_unsend_keeps_one_message_without_content(gateway):
    gw = await gateway()
    await gw.post("instagram", fixture_bytes("instagram/text.json"))
    await gw.post("instagram", fixture_bytes("instagram/deleted.json"))
    await gw.settle()
    events = gw.jsonl()
    assert len(events) == 2 and len({e["id"] for e in events}) == 2
    rows = await gw.sql("SELECT type, text FROM messages WHERE message_id = 'aWdfTEST_IN_0001'")
    assert rows == [("deleted", None)]
    assert await gw.sql("SELECT message_count FROM conversations") == [(1,)]


@pytest.mark.parametrize("first", ["original", "edit"])
@pytest.mark.parametrize("channel,edit,unsend,original,edited", [
    ("whatsapp", "edit", "revoke", "wamid.TEST.IN.TEXT.0001",
     "Hi, is my order on its way? (edited)"),
    ("instagram", "message_edit", "deleted", "aWdfTEST_IN_0001",
     "Do you ship to Lisbon or Porto?"),
])
async def test_an_edit_rewrites_its_original_and_is_not_counted(gateway, channel, edit, unsend,
                                                               original, edited, first):
    """Through the gateway, in either order: one row (the original's id) with the edited text,
    one message counted, the edited text as ``last_text``; an unsend then blanks both."""
    gw = await gateway()
    for name in ("text", edit) if first == "original" else (edit, "text"):
        assert (await gw.post(channel, fixture_bytes(f"{channel}/{name}.json")))[0] == 200
        await gw.settle()
    assert len(gw.jsonl()) == 2
    assert await gw.sql("SELECT message_id, type, text FROM messages") == [
        (original, "text", edited)]
    assert await gw.sql("SELECT message_count, last_text FROM conversations") == [(1, edited)]
    await gw.post(channel, fixture_bytes(f"{channel}/{unsend}.json"))
    await gw.settle()
    assert await gw.sql("SELECT type, text FROM messages") == [("deleted", None)]
    assert await gw.sql("SELECT message_count, last_text FROM conversations") == [(1, None)]


async def test_echo_of_our_send_is_stored_once(gateway):
    gw = await gateway()
    await gw.post("instagram", fixture_bytes("instagram/echo.json"))
    await gw.post("instagram", fixture_bytes("instagram/echo.json"))
    await gw.settle()
    rows = await gw.sql("SELECT direction, text FROM messages")
    assert rows == [("outbound", "Thanks! Your order ships today.")]


async def test_contacts_and_conversations_layout(gateway):
    gw = await gateway()
    for name in ("text", "image", "status_failed"):
        await gw.post("whatsapp", fixture_bytes(f"whatsapp/{name}.json"))
    await gw.settle()
    contacts = await gw.sql("SELECT id, name, first_seen, last_seen, last_inbound_at, opted_out "
                            "FROM contacts ORDER BY id")
    alex = [c for c in contacts if c[0] == "whatsapp:15550001234"][0]
    assert alex[1] == "Alex Example"
    assert alex[2].startswith("2025-10-09T08:53:20") and alex[3].startswith("2025-10-09T08:53:30")
    assert alex[4] == alex[3] and alex[5] == 0
    conv = await gw.sql("SELECT channel, account_id, contact_id, message_count, last_text "
                        "FROM conversations WHERE contact_id = '15550001234'")
    assert conv == [("whatsapp", "100000000000001", "15550001234", 2, "Photo of the damaged box")]


async def test_document_ids_never_contain_slash(gateway):
    gw = await gateway()
    await gw.post("whatsapp", fixture_bytes("whatsapp/text_base64_wamid.json"))
    await gw.settle()
    (doc, mid), = await gw.sql("SELECT id, message_id FROM messages")
    assert "/" in mid and "/" not in doc and doc == mid.replace("/", "_")


async def test_events_metric_counts_kinds(gateway):
    gw = await gateway()
    await gw.post("instagram", fixture_bytes("instagram/batch.json"))
    await gw.settle()
    registry = gw.app[keys.METRICS].registry
    assert registry.get_sample_value("gateway_events_total", {
        "channel": "instagram", "kind": "read", "type": ""}) == 1
    assert registry.get_sample_value("gateway_sink_deliveries_total", {
        "sink": "jsonl", "outcome": "ok"}) == 5
    assert registry.get_sample_value("gateway_sink_latency_seconds_count", {"sink": "storage"}) == 5


async def test_the_events_metric_keeps_a_plugin_channels_own_types_bounded(gateway):
    """A plugin channel's messages of types of its own count as ``type="other"``: a channel
    naming types freely (a widget id, a free text) cannot grow the metric without bound."""
    gw = await gateway(extra_plugins=[OddPlugin()])
    for shape in ("type text", "type widget-1", "type widget-2"):
        body = json.dumps({"shape": shape}).encode()
        assert (await gw.post("odd", body, secret="odd-secret"))[0] == 200
    await gw.settle()
    samples = {s.labels["type"]: s.value for m in gw.app[keys.METRICS].registry.collect()
               if m.name == "gateway_events" for s in m.samples
               if s.name == "gateway_events_total" and s.labels["channel"] == "odd"}
    assert samples == {"text": 1.0, "other": 2.0}


async def test_a_storage_database_of_the_earlier_layout_keeps_working(gateway, tmp_path):
    """Storage databases made before ``messages`` became a rowid table (WITHOUT ROWID, ``id``
    the primary key) are used as they are: the same rows, counts and status rules."""
    import sqlite3

    from tests.test_storage_sink import schema_without_schema_and_emoji

    earlier = schema_without_schema_and_emoji().replace(
        "id TEXT NOT NULL UNIQUE,             -- message_id",
        "id TEXT PRIMARY KEY,                 -- message_id")
    end = "-- JSON: {sender_id: emoji}\n);"
    earlier = earlier.replace(end, end.replace(");", ") WITHOUT ROWID;"))
    assert earlier.count("WITHOUT ROWID") == 3
    (tmp_path / "data").mkdir()
    with sqlite3.connect(tmp_path / "data" / "storage.db") as db:
        db.executescript(earlier)
    gw = await gateway()
    for name in ("text", "text", "status_delivered", "status_sent"):
        assert (await gw.post("whatsapp", fixture_bytes(f"whatsapp/{name}.json")))[0] == 200
    await gw.settle()
    assert await gw.sql("SELECT count(*) FROM messages WHERE type = 'text'") == [(1,)]
    assert await gw.sql("SELECT message_count FROM conversations "
                        "WHERE contact_id = '15550001234'") == [(1,)]
    statuses = await gw.sql("SELECT status FROM messages WHERE status IS NOT NULL")
    assert statuses == [("delivered",)]
    layout = await gw.sql("SELECT sql FROM sqlite_master WHERE name = 'messages'")
    assert "WITHOUT ROWID" in layout[0][0]


class OddChannel(Channel):
    """A plugin channel whose ``normalise`` goes wrong in the ways a plugin's can."""

    name = "odd"

    def __init__(self) -> None:
        super().__init__(app_secret="odd-secret", verify_token=None)

    def check_envelope(self, body: bytes) -> None:
        pass

    def normalise(self, body: bytes):
        shape = json.loads(body)["shape"]
        if shape == "lazy":  # a generator that fails once iterated
            yield from ()
            raise ValueError("bad payload found while iterating")
        if shape == "junk":
            yield {"not": "an event"}
        if shape.startswith("type "):  # a message of a type of this channel's own
            yield Message(schema=1, id=f"odd-{shape}", channel="odd", direction="inbound",
                          account_id="a", conversation_id="odd:a:1", sender=Party("1"),
                          recipient=Party("a"), timestamp=datetime(2026, 1, 1, tzinfo=UTC),
                          type=shape[5:], text="hi")
        if shape == "no id":
            yield Message(schema=1, id=None, channel="odd", direction="inbound", account_id="a",
                          conversation_id="odd:a:1", sender=Party("1"), recipient=Party("a"),
                          timestamp=datetime(2026, 1, 1, tzinfo=UTC), type="text", text="hi")


class OddPlugin:
    @hookimpl
    def register_channels(self, config):
        return [OddChannel()]


@pytest.mark.parametrize("shape", ["lazy", "junk", "no id"])
async def test_a_plugin_channel_whose_normalise_goes_wrong_dead_letters_only_its_request(
        gateway, shape):
    """Whether ``normalise`` raises while it is iterated or yields what the journal cannot keep,
    that request becomes a dead letter; the requests behind it (of any channel) are processed."""
    gw = await gateway(extra_plugins=[OddPlugin()])
    body = json.dumps({"shape": shape}).encode()
    assert (await gw.post("odd", body, secret="odd-secret"))[0] == 200
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200
    await gw.settle()
    assert [e["type"] for e in gw.jsonl()] == ["text"]
    [letter] = await gw.app[keys.JOURNAL].dead_letters()
    assert letter.sink == "normalise:odd" and letter.data == body
