"""The Firestore sink against Google's Firestore emulator, through a running gateway.

The SQLite ``storage`` sink is the reference: with both sinks on, every document of the three
collections must say field for field what the storage row says, and the message documents must
carry the fixtures' expected canonical fields.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import keys
from gateway.config import GatewayConfig, section
from gateway.errors import ConfigError, PermanentError, RetryableError
from gateway.events import Message, Party, Reaction, Read, Status, conversation_id, decode
from gateway.sink import Record
from sinks.firestore.model import EXTRA, doc_id
from sinks.firestore.sink import MAX_OPS, FirestoreConfig, FirestoreSink, _rounds, classify
from sinks.storage.schema import STATUS_RANK
from tests.conftest import SINKS_TOML, fixture_bytes
from tests.expect import as_stored, expected_files, pair_up
from tests.firestore.conftest import firestore_toml, storage_gateway

FILES = expected_files()
ROOT = Path(__file__).resolve().parents[2]
MESSAGE_COLUMNS = ("message_id", "event_id", "kind", "channel", "direction", "account_id",
                   "conversation_id", "sender_id", "sender_name", "recipient_id", "timestamp",
                   "type", "text", "payload", "reply_to", "media", "location", "error", "extra",
                   "status", "status_updated_at", "reactions", "edited_at", "pricing")
CONVERSATION_COLUMNS = ("channel", "account_id", "contact_id", "message_count",
                        "last_message_at", "last_inbound_at", "last_text")
CONTACT_COLUMNS = ("channel", "contact_id", "name", "name_at", "account_id", "first_seen",
                   "last_seen", "last_inbound_at", "opted_out", "opted_out_at")
JSON_COLUMNS = {"media", "location", "error", "extra", "reactions", "pricing"}
TIME_COLUMNS = {"timestamp", "status_updated_at", "last_message_at", "last_inbound_at",
                "first_seen", "last_seen", "edited_at", "name_at", "opted_out_at"}


# --- helpers ---------------------------------------------------------------------------------

async def start(gateway, table: str, extra: str = ""):
    gw = await gateway(extra, sinks=SINKS_TOML + table)
    return gw, gw.app[keys.SINKS]["firestore"]


async def documents(sink: FirestoreSink, collection: str, with_time: bool = False) -> dict:
    found = {}
    async for snap in sink.collection(collection).stream():
        found[snap.id] = (snap.to_dict(), snap.update_time) if with_time else snap.to_dict()
    return found


async def everything(sink: FirestoreSink, with_time: bool = False) -> dict:
    return {c: await documents(sink, c, with_time)
            for c in ("contacts", "conversations", "messages")}


def stamp(value: datetime | None) -> str | None:
    """The storage sink's fixed-width RFC 3339 text for an instant."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def as_row(collection: str, doc: dict) -> dict:
    """A Firestore document in the storage sink's row shape (JSON columns decoded)."""
    if collection == "messages":
        sender, recipient = doc.get("sender") or {}, doc.get("recipient") or {}
        row = {c: doc.get(c) for c in MESSAGE_COLUMNS}
        row.update(sender_id=sender.get("id"), sender_name=sender.get("name"),
                   recipient_id=recipient.get("id"),
                   extra={k: doc[k] for k in EXTRA if k in doc} or None)
    elif collection == "conversations":
        row = {c: doc.get(c) for c in CONVERSATION_COLUMNS}
    else:
        row = {c: doc.get(c) for c in CONTACT_COLUMNS}
    return {k: stamp(v) if k in TIME_COLUMNS else v for k, v in row.items()}


async def storage_rows(gw, collection: str) -> dict[str, dict]:
    columns = {"messages": MESSAGE_COLUMNS, "conversations": CONVERSATION_COLUMNS,
               "contacts": CONTACT_COLUMNS}[collection]
    rows = await gw.sql(f"SELECT id, {', '.join(columns)} FROM {collection}")
    out = {}
    for key, *values in rows:
        row = dict(zip(columns, values, strict=True))
        for name in JSON_COLUMNS & row.keys():
            row[name] = None if row[name] is None else json.loads(row[name])
        if "opted_out" in row:
            row["opted_out"] = bool(row["opted_out"])
        out[doc_id(key)] = row
    return out


async def assert_same_as_storage(gw, sink: FirestoreSink) -> dict:
    """Every collection: the same document ids, and every field equal to the storage row."""
    docs = await everything(sink)
    for collection, found in docs.items():
        want = await storage_rows(gw, collection)
        assert set(found) == set(want), f"{collection}: ids differ"
        for key, row in want.items():
            got = as_row(collection, found[key])
            diff = {k: (got[k], row[k]) for k in row if got[k] != row[k]}
            assert not diff, f"{collection}/{key}: (firestore, storage) {diff}"
    return docs


def event_view(doc: dict) -> dict:
    """A stored message document seen as a canonical event dict (for tests.expect). Like the
    storage sink, a message without a mid (an Instagram postback) is keyed by its event id."""
    mid = None if doc["message_id"] == doc["event_id"] else doc["message_id"]
    return {**doc, "id": doc["event_id"], "message_id": mid, "timestamp": stamp(doc["timestamp"])}


def assert_expected(docs: dict, wanted: list[dict], events: list[dict]) -> None:
    """The fixture's expected events, checked against the documents they produce (``events``:
    the fixture's own, which say which are edits, stored in their original's document)."""
    stored = [event_view(d) for d in docs["messages"].values() if d.get("event_id")]
    pair_up(stored, as_stored(wanted, events))
    statuses: dict[str, str] = {}
    for want in wanted:
        channel, account, customer = want["conversation"]
        conv = docs["conversations"][conversation_id(channel, account, customer)]
        assert (conv["channel"], conv["account_id"], conv["contact_id"]) == (channel, account,
                                                                            customer)
        if want["kind"] != "status":
            assert f"{channel}:{customer}" in docs["contacts"]
        status = want.get("status") or ("read" if want["kind"] == "read" else None)
        if status and want.get("message_id"):
            key = doc_id(want["message_id"])
            if STATUS_RANK[status] > STATUS_RANK.get(statuses.get(key, ""), 0):
                statuses[key] = status
        if want["kind"] == "reaction":
            reactions = docs["messages"][doc_id(want["message_id"])].get("reactions") or {}
            assert reactions.get(want["sender"]["id"]) == (want["emoji"] or None)
    for key, status in statuses.items():
        assert docs["messages"][key]["status"] == status


def records(events: list) -> list[Record]:
    from gateway.events import encode

    return [Record(i + 1, ev, encode(ev), time.time()) for i, ev in enumerate(events)]


def jsonl_records(gw) -> list[Record]:
    lines = (gw.data_dir / "events.jsonl").read_bytes().splitlines()
    return [Record(i + 1, decode(line), line, time.time()) for i, line in enumerate(lines)]


T0 = datetime(2025, 10, 9, 8, 0, tzinfo=UTC)


def message(n: int, customer: str, at: int, account: str = "100000000000001") -> Message:
    return Message(
        schema=1, id=f"ev-{account}-{customer}-{n}", channel="whatsapp", direction="inbound",
        account_id=account, conversation_id=conversation_id("whatsapp", account, customer),
        sender=Party(id=customer, name=f"Customer {customer}"), recipient=Party(id=account),
        timestamp=T0 + timedelta(seconds=at), message_id=f"wamid.B/{account}/{customer}/{n}",
        type="text", text=f"message {n} from {customer}")


def whatsapp_burst(post: int, customers: list[str]) -> bytes:
    """One webhook carrying message ``post`` of every customer (their own timestamps)."""
    return json.dumps({"object": "whatsapp_business_account", "entry": [{
        "id": "190000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001000",
                         "phone_number_id": "100000000000001"},
            "contacts": [{"profile": {"name": f"Customer {c}"}, "wa_id": c} for c in customers],
            "messages": [{"from": c, "id": f"wamid.BURST.{c}.{post}",
                          "timestamp": str(1_760_000_000 + post), "type": "text",
                          "text": {"body": f"burst {post} from {c}"}} for c in customers]}}]}]}
                      ).encode()


# --- every fixture ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FILES))
async def test_fixture_documents_field_by_field(gateway, firestore_table, name):
    gw, sink = await start(gateway, firestore_table)
    channel = name.split("/")[0]
    assert (await gw.post(channel, fixture_bytes(name)))[0] == 200
    await gw.settle()
    docs = await assert_same_as_storage(gw, sink)
    assert_expected(docs, FILES[name]["events"], gw.jsonl())
    assert await gw.app[keys.JOURNAL].dead_letters("firestore") == []


async def test_every_fixture_in_one_gateway_matches_storage(gateway, firestore_table):
    """Statuses, reactions, reads and deletions meeting the messages they refer to."""
    gw, sink = await start(gateway, firestore_table)
    for name in sorted(FILES):
        assert (await gw.post(name.split("/")[0], fixture_bytes(name)))[0] == 200
        await gw.settle()
    docs = await assert_same_as_storage(gw, sink)
    assert len(docs["messages"]) > 50 and len(docs["conversations"]) >= 5
    deleted = docs["messages"][doc_id("aWdfTEST_IN_0001")]
    assert deleted["type"] == "deleted" and deleted["text"] is None


async def test_message_documents_carry_every_canonical_field(gateway, firestore_table):
    gw, sink = await start(gateway, firestore_table)
    for name in ("whatsapp/location.json", "whatsapp/image.json", "instagram/story_reply.json",
                 "whatsapp/text_base64_wamid.json", "whatsapp/order.json"):
        await gw.post(name.split("/")[0], fixture_bytes(name))
    await gw.settle()
    docs = await documents(sink, "messages")
    for event in gw.jsonl():
        doc = docs[doc_id(event["message_id"])]
        assert "/" not in doc_id(event["message_id"])
        for key, value in event.items():
            if key == "id":
                assert doc["event_id"] == value
            elif key == "timestamp":
                assert stamp(doc["timestamp"]) == stamp(datetime.fromisoformat(value))
            else:
                assert doc[key] == value, key
        assert doc["conversation_id"] == event["conversation_id"]
        assert isinstance(doc["timestamp"], datetime)  # a Firestore timestamp, not text
        # §8's own fields are there from the start, null as storage's columns are
        assert {k: doc[k] for k in ("status", "status_updated_at", "reactions")} == dict.fromkeys(
            ("status", "status_updated_at", "reactions"))
    contacts = await documents(sink, "contacts")
    assert contacts and all(c["opted_out_at"] is None for c in contacts.values())


# --- idempotence -----------------------------------------------------------------------------

async def test_redelivery_and_crash_replay_change_nothing(gateway, firestore_table):
    gw, sink = await start(gateway, firestore_table)
    body = fixture_bytes("whatsapp/batch_mixed.json")
    assert (await gw.post("whatsapp", body))[0] == 200
    await gw.settle()
    before = await everything(sink, with_time=True)
    commits = sink.commits
    assert (await gw.post("whatsapp", body))[0] == 200  # Meta redelivers the same payload
    await gw.settle()
    batch = jsonl_records(gw)
    assert len(batch) == 8
    await sink.write(batch)  # the dispatcher hands the last batch over again after a crash
    await sink.write(batch)
    await sink.write(batch[3:] + batch[:3])
    after = await everything(sink, with_time=True)
    assert after == before  # same data, same update_time: nothing was even rewritten
    assert sink.commits == commits
    counts = [d["message_count"] for d, _ in after["conversations"].values()]
    assert sum(counts) == 3


async def test_partly_written_batch_replayed_counts_once(firestore_emulator, firestore_project):
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        batch = records([message(n, "15550009999", n) for n in range(40)])
        await sink.write(batch[:25])  # a crash after these committed
        await sink.write(batch)
        conv = (await documents(sink, "conversations"))["whatsapp:100000000000001:15550009999"]
        assert conv["message_count"] == 40
        assert conv["last_text"] == "message 39 from 15550009999"
    finally:
        await sink.close()


async def test_late_delivered_after_read_does_not_downgrade(gateway, firestore_table):
    gw, sink = await start(gateway, firestore_table)
    for name in ("status_read", "status_delivered", "status_sent"):
        assert (await gw.post("whatsapp", fixture_bytes(f"whatsapp/{name}.json")))[0] == 200
        await gw.settle()
    doc = (await documents(sink, "messages"))[doc_id("wamid.TEST.OUT.0007")]
    read_at = [e for e in gw.jsonl() if e["status"] == "read"][0]["timestamp"]
    assert doc["status"] == "read"
    assert stamp(doc["status_updated_at"]) == stamp(datetime.fromisoformat(read_at))
    await assert_same_as_storage(gw, sink)


async def test_statuses_in_one_batch_keep_the_highest(firestore_emulator, firestore_project):
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        common = dict(schema=1, channel="whatsapp", direction="outbound", account_id="1",
                      conversation_id="whatsapp:1:2", sender=Party(id="1"),
                      recipient=Party(id="2"), message_id="wamid.OUT.1")
        await sink.write(records([
            Status(id="s1", status="sent", timestamp=T0, **common),
            Read(id="r1", timestamp=T0 + timedelta(seconds=5), **common),
            Status(id="s2", status="delivered", timestamp=T0 + timedelta(seconds=2), **common),
        ]))
        doc = (await documents(sink, "messages"))["wamid.OUT.1"]
        assert doc["status"] == "read" and doc["status_updated_at"] == T0 + timedelta(seconds=5)
        assert (await documents(sink, "conversations"))["whatsapp:1:2"]["message_count"] == 0
    finally:
        await sink.close()


# --- volume ----------------------------------------------------------------------------------

async def test_burst_of_1200_events_all_land(gateway, firestore_emulator, firestore_project):
    table = firestore_toml(firestore_project, firestore_emulator, batch_size=1500)
    gw, sink = await start(gateway, table)
    customers = [f"1555100{i:04d}" for i in range(50)]
    results = await asyncio.gather(*(gw.post("whatsapp", whatsapp_burst(p, customers))
                                     for p in range(24)))
    assert {status for status, _ in results} == {200}
    await gw.settle(timeout=120)
    docs = await everything(sink)
    assert len(docs["messages"]) == 1200
    assert len(docs["conversations"]) == 50 and len(docs["contacts"]) == 50
    for customer in customers:
        conv = docs["conversations"][f"whatsapp:100000000000001:{customer}"]
        assert conv["message_count"] == 24
        assert conv["last_text"] == f"burst 23 from {customer}"
        contact = docs["contacts"][f"whatsapp:{customer}"]
        assert contact["first_seen"] == datetime.fromtimestamp(1_760_000_000, UTC)
        assert contact["last_seen"] == datetime.fromtimestamp(1_760_000_023, UTC)
    assert sink.largest_commit <= MAX_OPS
    assert await gw.app[keys.JOURNAL].dead_letters("firestore") == []


async def test_one_write_of_1200_events_uses_several_full_commits(firestore_emulator,
                                                                  firestore_project):
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        events = [message(n, f"1555200{n % 50:04d}", n) for n in range(1200)]
        events += [message(n, "15552999999", n) for n in range(600)]  # one lane > 500 writes
        await sink.write(records(events))
        assert sink.commits >= 4 and sink.largest_commit <= MAX_OPS
        docs = await everything(sink)
        assert len(docs["messages"]) == 1800
        counts = {k: d["message_count"] for k, d in docs["conversations"].items()}
        assert counts.pop("whatsapp:100000000000001:15552999999") == 600
        assert set(counts.values()) == {24} and len(counts) == 50
        long = docs["conversations"]["whatsapp:100000000000001:15552999999"]
        assert long["last_text"] == "message 599 from 15552999999"  # written in order
    finally:
        await sink.close()


async def test_concurrent_writers_count_each_message_once(firestore_emulator, firestore_project):
    """Two replicas (and a retry) racing on one conversation and one contact: preconditions
    make the losers re-read, so nothing is counted twice or lost."""
    config = FirestoreConfig(project_id=firestore_project, emulator_host=firestore_emulator)
    one, two = FirestoreSink(config), FirestoreSink(config)
    await one.start()
    await two.start()
    try:
        events = [message(n, "15553000001", n) for n in range(300)]
        other = [message(n, "15553000001", 1000 + n, account="100000000000002") for n in range(50)]
        await asyncio.gather(one.write(records(events[:200])), two.write(records(events[100:])),
                             one.write(records(events[50:250] + other)), two.write(records(other)))
        docs = await everything(one)
        assert docs["conversations"]["whatsapp:100000000000001:15553000001"]["message_count"] == 300
        assert docs["conversations"]["whatsapp:100000000000002:15553000001"]["message_count"] == 50
        contact = docs["contacts"]["whatsapp:15553000001"]
        assert contact["first_seen"] == T0 and contact["last_seen"] == T0 + timedelta(seconds=1049)
    finally:
        await one.close()
        await two.close()


async def test_erase_contact_deletes_more_than_one_batch(firestore_emulator, firestore_project):
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        mine = [message(n, "15555000001", n) for n in range(620)]
        mine += [message(n, "15555000001", 700 + n, account="100000000000002") for n in range(5)]
        others = [message(n, "15555000002", n) for n in range(3)]
        await sink.write(records(mine + others))
        counts = await sink.erase_contact("whatsapp", "15555000001")
        assert counts == {"contacts": 1, "conversations": 2, "messages": 625}
        docs = await everything(sink)
        assert set(docs["contacts"]) == {"whatsapp:15555000002"}
        assert set(docs["conversations"]) == {"whatsapp:100000000000001:15555000002"}
        assert len(docs["messages"]) == 3
        assert await sink.erase_contact("whatsapp", "15555000001") == {
            "contacts": 0, "conversations": 0, "messages": 0}
    finally:
        await sink.close()


ERASED_CUSTOMER, KEPT_CUSTOMER = "15555100001", "15555100002"


async def erasure_setup(sink: FirestoreSink) -> tuple[dict, dict]:
    """A contact with more than two commits of documents (1100 messages on one number, 5 on
    another, a status stub), and others: another customer, and the same id on Instagram.
    Returns everything as stored (with update times) and the other contacts' part of it."""
    mine = [message(n, ERASED_CUSTOMER, n) for n in range(1100)]
    mine += [message(n, ERASED_CUSTOMER, 2000 + n, account="100000000000002") for n in range(5)]
    mine.append(Status(  # a status of an outbound message not seen: a stub document
        schema=1, id="st-1", channel="whatsapp", direction="outbound", status="delivered",
        account_id="100000000000001", sender=Party(id="100000000000001"),
        recipient=Party(id=ERASED_CUSTOMER), message_id="wamid.OUT.erased.1", timestamp=T0,
        conversation_id=conversation_id("whatsapp", "100000000000001", ERASED_CUSTOMER)))
    others = [message(n, KEPT_CUSTOMER, n) for n in range(3)]
    others.append(Message(  # the same id on another channel is someone else
        schema=1, id="ig-1", channel="instagram", direction="inbound", account_id="17841400001",
        conversation_id=conversation_id("instagram", "17841400001", ERASED_CUSTOMER),
        sender=Party(id=ERASED_CUSTOMER), recipient=Party(id="17841400001"), timestamp=T0,
        message_id="mid.ig.1", type="text", text="hello"))
    await sink.write(records(mine + others))
    before = await everything(sink, with_time=True)
    assert len(before["messages"]) == 1106 + 4
    return before, kept_part(before)


def kept_part(docs: dict) -> dict:
    """The documents that are not the erased contact's (WhatsApp ``ERASED_CUSTOMER``)."""
    convs = {k for k, (d, _) in docs["conversations"].items()
             if d["channel"] == "whatsapp" and d["contact_id"] == ERASED_CUSTOMER}
    return {"contacts": {k: v for k, v in docs["contacts"].items()
                         if k != f"whatsapp:{ERASED_CUSTOMER}"},
            "conversations": {k: v for k, v in docs["conversations"].items() if k not in convs},
            "messages": {k: v for k, v in docs["messages"].items()
                         if v[0]["conversation_id"] not in convs}}


def fail_commit(monkeypatch, sink: FirestoreSink, numbers: set[int]) -> None:
    """Make these commits (counting from 1, from now on) fail as a network failure would,
    before anything of them is applied; the others go to the emulator as they are."""
    real = sink.client.batch
    sent = itertools.count(1)

    def batch():
        created = real()
        commit = created.commit

        async def failing(*args, **kwargs):
            if next(sent) in numbers:
                raise ConnectionError("injected: the connection dropped before this commit")
            return await commit(*args, **kwargs)

        created.commit = failing
        return created

    monkeypatch.setattr(sink.client, "batch", batch)


async def orphans(sink: FirestoreSink) -> list[str]:
    """Messages whose conversation's document is gone: an erasure, which finds messages only
    through it, would never find them again."""
    docs = await everything(sink)
    return [k for k, d in docs["messages"].items()
            if d["conversation_id"] not in docs["conversations"]]


@pytest.mark.parametrize("failing", [1, 2, 3])
async def test_erase_contact_failed_part_way_is_finished_by_a_repeat(
        firestore_emulator, firestore_project, monkeypatch, failing):
    """The erasure's commit number ``failing`` (of three) fails: the erasure raises (the
    endpoint answers 500 erasure_incomplete, "repeat the request"), and the repeat erases
    every message, conversation and contact of that contact left, and nothing else."""
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        before, kept = await erasure_setup(sink)
        fail_commit(monkeypatch, sink, {failing})
        with pytest.raises(RetryableError, match="ConnectionError"):
            await sink.erase_contact("whatsapp", ERASED_CUSTOMER)
        monkeypatch.undo()
        left = await everything(sink, with_time=True)
        deleted = sum(len(before[c]) - len(left[c]) for c in before)
        assert deleted == MAX_OPS * (failing - 1)  # the commits before the failed one went through
        unreachable = await orphans(sink)

        counts = await sink.erase_contact("whatsapp", ERASED_CUSTOMER)
        after = await everything(sink, with_time=True)
        assert {c: len(d) for c, d in after.items()} == {c: len(d) for c, d in kept.items()}
        assert after == kept  # the contact's documents are all gone; the others untouched
        assert unreachable == []  # nothing was ever out of the repeat's reach
        assert sum(counts.values()) == 1109 - deleted  # 1106 messages, 2 conversations, 1 contact
        assert await sink.erase_contact("whatsapp", ERASED_CUSTOMER) == {
            "contacts": 0, "conversations": 0, "messages": 0}
    finally:
        await sink.close()


async def test_erase_contact_failing_again_and_again_still_finishes(
        firestore_emulator, firestore_project, monkeypatch):
    """Every attempt's second commit fails: each repeat still finds what is left, deletes a
    commit more, and the last one (fewer than two commits left) completes."""
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        _, kept = await erasure_setup(sink)
        outcomes, unreachable = [], []
        for _ in range(5):
            fail_commit(monkeypatch, sink, {2})
            try:
                outcomes.append(await sink.erase_contact("whatsapp", ERASED_CUSTOMER))
            except RetryableError:
                outcomes.append("failed")
            monkeypatch.undo()
            unreachable += await orphans(sink)
            if outcomes[-1] != "failed":
                break
        after = await everything(sink, with_time=True)
        assert {c: len(d) for c, d in after.items()} == {c: len(d) for c, d in kept.items()}
        assert after == kept
        assert unreachable == []
        assert outcomes == ["failed", "failed",
                            {"contacts": 1, "conversations": 2, "messages": 106}]
    finally:
        await sink.close()


async def test_order_within_a_conversation_holds_across_the_commit_split(firestore_emulator,
                                                                         firestore_project):
    """One conversation needing more than 500 writes is cut into two commits (two rounds). A
    reaction added in the first and removed in the second, and a message written in the first
    and unsent (WhatsApp revoke) in the second, end as they would one event at a time — which
    they would not if the second round were applied first (or raced the first)."""
    customer, account = "15556100001", "100000000000001"
    conv = conversation_id("whatsapp", account, customer)
    party, business = Party(id=customer, name="Order Test"), Party(id=account)
    target = message(0, customer, 0)
    common = dict(schema=1, channel="whatsapp", direction="inbound", account_id=account,
                  conversation_id=conv, sender=party, recipient=business)
    added = Reaction(id="react-add", timestamp=T0 + timedelta(seconds=1),
                     message_id="wamid.OURS.1", emoji="\U0001f44d", **common)
    filler = [message(n, customer, n) for n in range(1, 498)]  # 497: round 1 is then 500 writes
    revoke = Message(id="revoke-0", timestamp=T0 + timedelta(seconds=900),
                     message_id=target.message_id, type="deleted", **common)
    removed = Reaction(id="react-remove", timestamp=T0 + timedelta(seconds=901),
                       message_id="wamid.OURS.1", emoji="", **common)
    events = [target, added, *filler, revoke, removed]
    rounds = list(_rounds(events))
    assert [len(r) for r in rounds] == [498, 3]  # filler[-1], revoke, removed in round 2
    assert target in rounds[0] and added in rounds[0]
    assert revoke in rounds[1] and removed in rounds[1]

    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                         emulator_host=firestore_emulator))
    await sink.start()
    try:
        await sink.write(records(events))
        assert sink.commits == 2 and sink.largest_commit == MAX_OPS
        docs = await everything(sink)
        ours = docs["messages"]["wamid.OURS.1"]
        assert ours["reactions"] == {}  # added, then removed
        unsent = docs["messages"][doc_id(target.message_id)]
        assert unsent["type"] == "deleted" and unsent["text"] is None
        assert unsent["event_id"] == target.id  # the message itself came first
        assert docs["conversations"][conv]["message_count"] == 498  # the revoke is not counted
    finally:
        await sink.close()


class ObservedSink(FirestoreSink):
    """The real sink, recording how many commits are in flight at once (observation only)."""

    def __init__(self, config: FirestoreConfig) -> None:
        super().__init__(config)
        self.in_flight = 0
        self.most_in_flight = 0

    async def _send(self, changes, state):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await super()._send(changes, state)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("concurrency", [1, 2, 3])
async def test_commits_run_concurrently_up_to_the_limit(firestore_emulator, firestore_project,
                                                        concurrency):
    """800 conversations of one message each: 5 commits of one round, at most ``concurrency``
    of them in flight at once, and more than one when the limit allows it."""
    sink = ObservedSink(FirestoreConfig(project_id=firestore_project, concurrency=concurrency,
                                        emulator_host=firestore_emulator))
    await sink.start()
    try:
        events = [message(0, f"1555620{n:04d}", n) for n in range(800)]
        assert len(list(_rounds(events))) == 1
        await sink.write(records(events))
        assert sink.commits == 5
        assert sink.most_in_flight == concurrency
        counts = [d["message_count"] for d in (await documents(sink, "conversations")).values()]
        assert counts == [1] * 800
    finally:
        await sink.close()


# --- first_seen --------------------------------------------------------------------------------

@pytest.mark.parametrize("backends", ["storage", "storage+firestore"])
async def test_first_seen_is_the_earliest_timestamp_in_both_sinks(gateway, request, backends):
    """Redelivery and replay never change ``first_seen``, a later event does not either, and a
    late event that happened earlier lowers it — in the storage rows and the Firestore documents."""
    gw = await storage_gateway(gateway, request, backends, "first")
    sinks = gw.app[keys.SINKS]
    customer = "15556300001"
    base = 1_760_000_000

    async def seen() -> set[tuple[str, str]]:
        """(first_seen, last_seen) as each sink holds it."""
        found = set(await gw.sql("SELECT first_seen, last_seen FROM contacts WHERE id = ?",
                                 (f"whatsapp:{customer}",)))
        if "firestore" in sinks:
            doc = (await documents(sinks["firestore"], "contacts"))[f"whatsapp:{customer}"]
            found.add((stamp(doc["first_seen"]), stamp(doc["last_seen"])))
        return found

    def at(offset: int) -> str:
        return stamp(datetime.fromtimestamp(base + offset, UTC))

    async def post(offset: int) -> None:
        assert (await gw.post("whatsapp", whatsapp_burst(offset, [customer])))[0] == 200
        await gw.settle()

    await post(0)
    assert await seen() == {(at(0), at(0))}
    await post(0)  # Meta redelivers it
    for sink in sinks.values():  # and the dispatcher replays the batch after a crash
        if sink.name in ("storage", "firestore"):
            await sink.write(jsonl_records(gw))
    assert await seen() == {(at(0), at(0))}
    await post(600)  # a later message
    assert await seen() == {(at(0), at(600))}
    await post(-3600)  # one that happened an hour earlier, delivered late
    assert await seen() == {(at(-3600), at(600))}
    for sink in sinks.values():
        if sink.name in ("storage", "firestore"):
            await sink.write(jsonl_records(gw)[::-1])  # every event again, in any order
    assert await seen() == {(at(-3600), at(600))}


# --- unsends, edits, stubs, names, consent: the same as storage -------------------------------

class StorageRows:
    """A storage sink seen as ``assert_same_as_storage`` reads a gateway's (``sql``)."""

    def __init__(self, sink) -> None:
        self.sql = sink.query


async def test_unsends_edits_stub_errors_names_and_consent_match_storage(
        firestore_emulator, firestore_project, tmp_path):
    """The real sink on the emulator (its reads, preconditions and commits) and the storage sink,
    fed the same batches: every document equals its row, and the rules of
    ``tests/test_sink_parity.py`` hold — an unsent latest message leaves ``last_text``, an edit
    rewrites its original (read first, or standing in for it), a failed status's error survives
    its message, a late older name is not taken, an opt-out counts after its unsend, and a
    plugin's conversation with '/' is erased with its messages. A redelivery writes nothing."""
    from gateway.consent import Consent
    from gateway.events import ErrorInfo
    from sinks.storage.sink import StorageConfig, StorageSink
    from tests.test_sink_parity import CONTACT, CONV, CUSTOMER, at, edit, failed, msg, revoke

    consent = Consent(["STOP"], ["START"])
    fs = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                       emulator_host=firestore_emulator), consent)
    storage = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")), consent)
    await fs.start()
    await storage.start()
    plugin = msg("tg1", "tg/1", 1, "hello", channel="telegram", conv="telegram:bot/1:user/9")
    batches = [
        [msg("e1", "m1", 10, "first", name="Alex"), msg("e2", "m2", 20, "second", name="Alex New"),
         failed("wamid.O1", 30), plugin],
        [edit("ed2", "wamid.E2", "m2", 50, "second (edited)"),
         msg("eo1", "wamid.O1", 5, "ours", direction="outbound"),
         edit("ed9", "wamid.E9", "m9", 60, "ninth (edited)"), msg("e0", "m0", 1, name="Ancient")],
        [revoke("rv9", "m9", 70), msg("e9", "m9", 40, "ninth")],
        [revoke("rv7", "m7", 80)],
        [msg("e7", "m7", 35, "STOP")],
    ]
    try:
        for n, batch in enumerate(batches):
            await fs.write(records(batch))
            await storage.write(records(batch))
            if n == 1:  # m9's edit stands in for it: counted, but no time of its own yet
                conv = (await documents(fs, "conversations"))[CONV]
                assert (conv["last_message_at"], conv["last_text"]) == (at(20), "second (edited)")
            if n == 2:  # m9 came (at 40, after its unsend): the latest, with no text
                conv = (await documents(fs, "conversations"))[CONV]
                assert (conv["last_message_at"], conv["last_text"]) == (at(40), None)
        docs = await assert_same_as_storage(StorageRows(storage), fs)
        assert docs["conversations"][CONV]["message_count"] == 6  # m1 m2 O1 m9 m0 m7
        assert docs["conversations"][CONV]["last_text"] is None  # m9, unsent, is the latest
        assert docs["messages"]["m7"]["timestamp"] == at(35)  # its own time, not its unsend's
        messages = docs["messages"]
        assert (messages["m2"]["text"], messages["m2"]["edited_at"]) == ("second (edited)", at(50))
        assert messages["m9"]["type"] == "deleted" and messages["m9"]["text"] is None
        assert not {"wamid.E2", "wamid.E9"} & set(messages)  # edits have no document
        assert messages["wamid.O1"]["error"] == msgspec_builtins(
            ErrorInfo(code=131026, title="Message undeliverable"))
        contact = docs["contacts"][CONTACT]
        assert (contact["name"], contact["opted_out"]) == ("Alex New", True)
        assert docs["messages"]["tg_1"]["conversation_id"] == "telegram:bot_1:user_9"
        commits = fs.commits
        for batch in batches:  # redelivered: nothing changes, nothing is written
            await fs.write(records(batch))
            await storage.write(records(batch))
        assert fs.commits == commits
        assert await assert_same_as_storage(StorageRows(storage), fs) == docs
        erased = {"contacts": 1, "conversations": 1, "messages": 1}
        assert await fs.erase_contact("telegram", CUSTOMER) == erased
        assert await storage.erase_contact("telegram", CUSTOMER) == erased
        await assert_same_as_storage(StorageRows(storage), fs)
    finally:
        await fs.close()
        await storage.close()


def msgspec_builtins(value):
    import msgspec

    return msgspec.to_builtins(value)


# --- errors ----------------------------------------------------------------------------------

async def test_permanent_error_goes_to_dead_letters_with_reason(gateway, firestore_table):
    gw, sink = await start(gateway, firestore_table)
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    msg = envelope["entry"][0]["changes"][0]["value"]["messages"][0]
    msg.update(id="wamid.TOO.BIG", text={"body": "x" * 1_100_000})  # over Firestore's 1 MiB
    assert (await gw.post("whatsapp", json.dumps(envelope).encode()))[0] == 200
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/image.json")))[0] == 200
    await gw.settle(timeout=30)
    dead = await gw.app[keys.JOURNAL].dead_letters("firestore")
    assert len(dead) == 1 and "InvalidArgument" in dead[0].reason
    assert decode(dead[0].data).message_id == "wamid.TOO.BIG"
    docs = await documents(sink, "messages")
    assert set(docs) == {"wamid.TEST.IN.IMAGE.0001"}  # the rest of the traffic still lands
    assert await gw.sql("SELECT count(*) FROM messages") == [(2,)]  # storage took both


async def test_unreachable_firestore_is_retryable(firestore_project):
    from gateway.testing import free_port

    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project, retry_seconds=0,
                                         timeout=3, emulator_host=f"127.0.0.1:{free_port()}"))
    await sink.start()
    try:
        with pytest.raises(RetryableError):
            await sink.write(records([message(1, "15554000001", 1)]))
        assert await sink.ready() is False
    finally:
        await sink.close()


def test_error_classes_map_onto_retryable_and_permanent():
    from google.api_core import exceptions as gexc

    for exc in (gexc.ServiceUnavailable("x"), gexc.DeadlineExceeded("x"), gexc.Aborted("x"),
                gexc.ResourceExhausted("x"), gexc.InternalServerError("x")):
        assert isinstance(classify(exc), RetryableError), exc
    for exc in (gexc.PermissionDenied("x"), gexc.InvalidArgument("x"), gexc.NotFound("x"),
                gexc.FailedPrecondition("the database is in Datastore mode"),
                gexc.Unauthenticated("x")):
        assert isinstance(classify(exc), PermanentError), exc
    # A commit whose preconditions keep failing after re-reads: a race, unless it is not one.
    from sinks.firestore.sink import _gave_up

    race = gexc.FailedPrecondition("the stored version (2) does not match the required base "
                                   "version (1)")
    assert isinstance(_gave_up(race), RetryableError)
    assert isinstance(_gave_up(gexc.AlreadyExists("entity already exists")), RetryableError)
    assert isinstance(_gave_up(gexc.FailedPrecondition("Datastore mode")), PermanentError)


async def test_firestore_emulator_host_from_the_environment_alone(gateway, firestore_emulator,
                                                                  firestore_project, monkeypatch,
                                                                  tmp_path):
    """No ``emulator_host`` in the table, only ``FIRESTORE_EMULATOR_HOST``: the sink writes to
    that emulator, with no credentials (Application Default Credentials would fail here)."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-file.json"))
    table = f'[sinks.firestore]\nproject_id = "{firestore_project}"\nmax_attempts = 2\n'
    gw, sink = await start(gateway, table)
    assert sink.config.emulator_host is None
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200
    await gw.settle()
    assert await gw.app[keys.JOURNAL].dead_letters("firestore") == []
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST")
    reader = FirestoreSink(FirestoreConfig(project_id=firestore_project,
                                           emulator_host=firestore_emulator))
    await reader.start()
    try:  # read back from the emulator itself, by a client told its address explicitly
        assert set(await documents(reader, "messages")) == {"wamid.TEST.IN.TEXT.0001"}
        assert len(await documents(reader, "contacts")) == 1
    finally:
        await reader.close()


async def test_emulator_host_in_the_table_wins_over_the_environment(firestore_emulator,
                                                                    firestore_project,
                                                                    monkeypatch):
    from gateway.testing import free_port

    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing there
    sink = FirestoreSink(FirestoreConfig(project_id=firestore_project, retry_seconds=0,
                                         timeout=5, emulator_host=firestore_emulator))
    await sink.start()
    try:
        await sink.write(records([message(1, "15556400001", 1)]))
        assert len(await documents(sink, "messages")) == 1
    finally:
        await sink.close()


# --- configuration, readiness, indexes --------------------------------------------------------

def test_config_names_bad_keys():
    def load(table: dict) -> FirestoreConfig | None:
        return section(GatewayConfig(sinks={"firestore": table}), "sinks", "firestore",
                       FirestoreConfig)

    with pytest.raises(ConfigError) as missing:
        load({})
    assert missing.value.key == "sinks.firestore.project_id"
    with pytest.raises(ConfigError) as typo:
        load({"project_id": "p", "colection_prefix": "x"})
    assert typo.value.key == "sinks.firestore.colection_prefix"
    with pytest.raises(ConfigError) as creds:
        load({"project_id": "p", "credentials": "/nonexistent/key.json"})
    assert creds.value.key == "sinks.firestore.credentials"
    table = load({"project_id": "p", "database": "chat", "collection_prefix": "gw_"})
    assert table.database == "chat" and table.collection_prefix == "gw_"


async def test_readyz_and_collection_prefix(gateway, firestore_emulator, firestore_project):
    table = firestore_toml(firestore_project, firestore_emulator, collection_prefix="gw_")
    gw, sink = await start(gateway, table)
    status, body, _ = await gw.get("/readyz")
    assert status == 200 and body["checks"]["sink:firestore"] is True
    await gw.post("whatsapp", fixture_bytes("whatsapp/text.json"))
    await gw.settle()
    names = sorted([c.id async for c in sink.client.collections()])
    assert names == ["gw_contacts", "gw_conversations", "gw_messages"]


async def test_public_api_fallback_writes_the_same(gateway, firestore_emulator):
    """The direct protobuf encoding (wire.py) and the client's public API store the same."""
    import os

    before = os.environ.get("FIRESTORE_EMULATOR_HOST")
    sinks = [FirestoreSink(FirestoreConfig(project_id=f"wire-{uuid.uuid4().hex[:10]}",
                                           emulator_host=firestore_emulator)) for _ in range(2)]
    for sink in sinks:
        await sink.start()
    assert os.environ.get("FIRESTORE_EMULATOR_HOST") == before  # not left behind for others
    assert sinks[0].fast is True  # the installed client encodes as wire.py does
    sinks[1].fast = False
    try:
        gw = await gateway()  # jsonl + storage: the events to replay into both sinks
        for name in sorted(FILES):
            await gw.post(name.split("/")[0], fixture_bytes(name))
            await gw.settle()
        batch = jsonl_records(gw)
        for sink in sinks:
            for i in range(0, len(batch), 7):
                await sink.write(batch[i:i + 7])
        fast, public = await everything(sinks[0]), await everything(sinks[1])
        assert fast == public and len(fast["messages"]) > 50
    finally:
        for sink in sinks:
            await sink.close()


def test_indexes_command_applies_the_prefix(capsys, tmp_path):
    from sinks.firestore.cli import main

    config = tmp_path / "gateway.toml"
    config.write_text('[sinks.firestore]\nproject_id = "p"\ncollection_prefix = "gw_"\n')
    assert main(["indexes", "--config", str(config)]) == 0
    spec = json.loads(capsys.readouterr().out)
    groups = {i["collectionGroup"] for i in spec["indexes"] + spec["fieldOverrides"]}
    assert groups == {"gw_conversations", "gw_messages"}


def test_indexes_file_covers_the_queries():
    spec = json.loads((ROOT / "sinks/firestore/indexes.json").read_text())
    composite = {(i["collectionGroup"], tuple(f["fieldPath"] for f in i["fields"]))
                 for i in spec["indexes"]}
    assert ("conversations", ("channel", "contact_id")) in composite  # erase_contact
    assert ("messages", ("conversation_id", "timestamp")) in composite  # a conversation's history
    for index in spec["indexes"]:
        assert index["queryScope"] == "COLLECTION"
        assert all(f.get("order") in ("ASCENDING", "DESCENDING") for f in index["fields"])
