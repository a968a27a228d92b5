"""``DELETE /v1/contacts/{channel}/{contact_id}``: erasure from every sink and the journal.

Run with the SQLite storage sink alone, and again with Firestore on the emulator too (skipped,
naming the package, when the emulator is not installed).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from gateway import Channel, Sink, hookimpl, keys
from gateway import config as gwconfig
from gateway.config import SinkConfig, section
from gateway.errors import ConfigError
from gateway.events import Message, Party, decode
from gateway.journal import StoredEvent
from gateway.testing.graph import GraphSimulator
from tests.conftest import CHANNELS_TOML, SINKS_TOML, fixture_bytes
from tests.firestore.conftest import firestore_emulator, firestore_toml  # noqa: F401
from tests.sinks.test_ai_sink import channels_toml, meta  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "erasure-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ERASED = "15550001234"
CONTACTS = {("whatsapp", ERASED), ("whatsapp", "15550005678"), ("whatsapp", "15550009876"),
            ("instagram", "9000000000000001")}


def second_account_text() -> bytes:
    """The erased contact writing to a second WhatsApp number: a second conversation."""
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = "100000000000002"
    value["messages"][0]["id"] = "wamid.TEST.IN.TEXT.SECOND.0001"
    return json.dumps(envelope).encode()


def new_text(message_id: str, timestamp: int) -> bytes:
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    message = envelope["entry"][0]["changes"][0]["value"]["messages"][0]
    message.update(id=message_id, timestamp=str(timestamp), text={"body": "I am back"})
    return json.dumps(envelope).encode()


@pytest.fixture(params=["storage", "storage+firestore"])
def backends(request) -> str:
    """The sinks tables: storage (always) and Firestore on the emulator (when installed)."""
    if request.param == "storage":
        return SINKS_TOML
    host = request.getfixturevalue("firestore_emulator")
    return SINKS_TOML + firestore_toml(f"erasure-{uuid.uuid4().hex[:12]}", host)


async def start(gateway, sinks: str, token: str | None = TOKEN):
    extra = f'api_token = "{token}"' if token else ""
    return await gateway(extra, sinks=sinks)


async def post_all(gw, settle: bool = True) -> None:
    for channel, body in (("whatsapp", fixture_bytes("whatsapp/text.json")),
                          ("whatsapp", fixture_bytes("whatsapp/batch_mixed.json")),
                          ("whatsapp", second_account_text()),
                          ("instagram", fixture_bytes("instagram/text.json"))):
        assert (await gw.post(channel, body))[0] == 200
    if settle:
        await gw.settle()


def customer(event) -> tuple[str, str]:
    return event.channel, event.customer_id


async def storage_state(gw) -> dict[str, list[tuple]]:
    return {
        "contacts": await gw.sql("SELECT * FROM contacts ORDER BY id"),
        "conversations": await gw.sql("SELECT * FROM conversations ORDER BY id"),
        "messages": await gw.sql("SELECT * FROM messages ORDER BY id"),
    }


async def firestore_state(gw) -> dict[str, dict] | None:
    sink = gw.app[keys.SINKS].get("firestore")
    if sink is None:
        return None
    state = {}
    for name in ("contacts", "conversations", "messages"):
        state[name] = {d.id: d.to_dict() async for d in sink.collection(name).stream()}
    return state


async def journal_state(gw) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    journal = gw.app[keys.JOURNAL]
    events = [e.data for e in await journal.events_after(0, 10_000)]
    dead = [(d.sink, bytes(d.data)) for d in await journal.dead_letters(limit=10_000)]
    return events, dead


def is_erased_row(collection: str, row: tuple) -> bool:
    """Whether a storage row belongs to the erased contact (by the table's own columns)."""
    if collection == "contacts":
        return row[0] == f"whatsapp:{ERASED}"
    if collection == "conversations":
        return row[1:4:2] == ("whatsapp", ERASED)
    return row[7].startswith("whatsapp:") and row[7].endswith(f":{ERASED}")  # conversation_id


def is_erased_doc(collection: str, key: str, doc: dict) -> bool:
    if collection == "contacts":
        return key == f"whatsapp:{ERASED}"
    if collection == "conversations":
        return (doc["channel"], doc["contact_id"]) == ("whatsapp", ERASED)
    return doc["conversation_id"].startswith("whatsapp:") and doc["conversation_id"].endswith(
        f":{ERASED}")


async def add_dead_letters(gw) -> None:
    """Dead letters of both kinds for the erased contact and for others."""
    journal = gw.app[keys.JOURNAL]
    lines = (gw.data_dir / "events.jsonl").read_bytes().splitlines()
    items = [(StoredEvent(0, line, time.time()), decode(line).id, "test", 3) for line in lines]
    await journal.add_dead_letters("storage", items)
    def raw(body: bytes) -> list:
        return [(StoredEvent(0, body, time.time()), "request:1", "bad", 1)]

    text = fixture_bytes("whatsapp/text.json")
    await journal.add_dead_letters("normalise:whatsapp", raw(text))  # the contact's: erased
    await journal.add_dead_letters("normalise:whatsapp", raw(text.replace(
        ERASED.encode(), b"15550005678")))  # someone else's: kept
    ig = fixture_bytes("instagram/text.json").replace(b"9000000000000001", ERASED.encode())
    await journal.add_dead_letters("normalise:instagram", raw(ig))  # another channel: kept


async def test_erasure_removes_exactly_one_contact_everywhere(gateway, backends):
    gw = await start(gateway, backends)
    await post_all(gw)
    await add_dead_letters(gw)
    storage, firestore = await storage_state(gw), await firestore_state(gw)
    events, dead = await journal_state(gw)
    assert {customer(decode(e)) for e in events} == CONTACTS
    live = gw.data_dir / "events.jsonl"
    lines = live.read_bytes().splitlines(keepends=True)
    rotated = gw.data_dir / "events.jsonl.1.gz"  # as logrotate leaves it: purged too
    with gzip.open(rotated, "wb") as handle:
        handle.writelines(lines)
    other = gw.data_dir / "events.jsonl.bak"  # a copy made by hand: purged too
    other.write_bytes(b"".join(lines))

    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200, body
    assert body["channel"] == "whatsapp" and body["contact_id"] == ERASED
    assert body["erased"]["storage"] == {"contacts": 1, "conversations": 2, "messages": 4}
    if firestore is not None:
        assert body["erased"]["firestore"] == {"contacts": 1, "conversations": 2, "messages": 4}
    assert body["journal"] == {"events": 4, "dead_letters": 5}
    assert body["erased"]["jsonl"] == {"events": 12}  # 4 lines, in the file and its 2 copies
    assert "jsonl" not in body["not_stored"] and body["failed"] == {}
    assert body["warnings"] == []
    assert body["erasure_id"].startswith("era_") and body["settled"] is True
    kept = [line for line in lines if customer(decode(line.rstrip())) != ("whatsapp", ERASED)]
    assert live.read_bytes().splitlines(keepends=True) == kept
    with gzip.open(rotated, "rb") as handle:
        assert handle.read().splitlines(keepends=True) == kept
    assert other.read_bytes() == b"".join(kept)

    after = await storage_state(gw)
    for name, rows in storage.items():
        assert after[name] == [r for r in rows if not is_erased_row(name, r)], name
        assert len(after[name]) < len(rows)
    if firestore is not None:
        now = await firestore_state(gw)
        for name, docs in firestore.items():
            assert now[name] == {k: d for k, d in docs.items() if not is_erased_doc(name, k, d)}
            assert len(now[name]) < len(docs)
    events_after, dead_after = await journal_state(gw)
    assert events_after == [e for e in events if customer(decode(e)) != ("whatsapp", ERASED)]
    assert len(dead_after) == len(dead) - 5
    assert [(s, d) for s, d in dead_after if ERASED.encode() in d] == [
        ("normalise:instagram", fixture_bytes("instagram/text.json").replace(
            b"9000000000000001", ERASED.encode()))]

    status, again = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")  # idempotent
    assert status == 200 and all(set(c.values()) == {0} for c in again["erased"].values())
    later = fixture_bytes("whatsapp/image.json").replace(ERASED.encode(), b"15550004444")
    assert (await gw.post("whatsapp", later))[0] == 200
    await gw.settle()  # the sink goes on appending, to the rewritten file
    assert len(live.read_bytes().splitlines()) == len(kept) + 1


async def test_the_erased_text_is_in_no_file_left_behind(gateway):
    """Deleted rows are overwritten (``secure_delete``) and the WAL files, which keep the pages
    as they were before the deletion, are emptied: the text is in no database file."""
    gw = await start(gateway, SINKS_TOML + "[sinks.analytics]\n")
    marker = "please forget 7f3a9c my address is 12 Elm Street"
    body = new_text("wamid.TEST.IN.TEXT.FORGET.0001", 1760000100).replace(
        b"I am back", marker.encode())
    assert (await gw.post("whatsapp", body))[0] == 200
    await post_all(gw)
    files = [gw.data_dir / f"{db}{suffix}" for db in ("journal.db", "storage.db", "analytics.db")
             for suffix in ("", "-wal")]
    assert any(marker.encode() in f.read_bytes() for f in files if f.exists())

    status, result = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200 and result["erased"]["storage"]["messages"] == 5, result
    for f in files:
        if f.exists():
            data = f.read_bytes()
            assert marker.encode() not in data, f.name
            assert f"whatsapp:100000000000001:{ERASED}".encode() not in data, f.name
    assert (await storage_state(gw))["messages"]  # the other customers' rows are all there
    other = fixture_bytes("whatsapp/image.json").replace(ERASED.encode(), b"15550004444")
    assert (await gw.post("whatsapp", other))[0] == 200  # every database is still written
    await gw.settle()


def hmac_hex(key: bytes, contact_id: str) -> str:
    return hmac.new(key, contact_id.encode(), hashlib.sha256).hexdigest()


async def test_audit_line_has_no_personal_data(gateway):
    gw = await start(gateway, SINKS_TOML)
    await post_all(gw)
    assert not (gw.data_dir / "erasure-audit.key").exists()
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200
    text = (gw.data_dir / "erasures.jsonl").read_text()
    assert ERASED not in text and "Alex" not in text and "order" not in text.lower()
    # Not a plain hash either: hashing every phone number would find it.
    assert hashlib.sha256(ERASED.encode()).hexdigest() not in text
    (line,) = [json.loads(x) for x in text.splitlines()]
    assert line["erasure_id"] == body["erasure_id"] and line["channel"] == "whatsapp"
    assert "contact_sha256" not in line
    # The key was generated once into the data directory: 32 random bytes (hex), mode 0600.
    key_path = gw.data_dir / "erasure-audit.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = key_path.read_bytes().strip()
    assert len(bytes.fromhex(key.decode())) == 32
    assert line["contact_hmac"] == hmac_hex(key, ERASED)
    assert line["key_id"] == hmac.new(key, b"erasure-audit-key-id", hashlib.sha256).hexdigest()[:16]
    assert line["erased"] == body["erased"] and line["journal"] == body["journal"]
    assert line["at"].endswith("Z")
    # A second erasure uses the same key (the file is not regenerated).
    assert (await delete(gw, "/v1/contacts/whatsapp/15550005678"))[0] == 200
    assert key_path.read_bytes().strip() == key
    second = json.loads((gw.data_dir / "erasures.jsonl").read_text().splitlines()[1])
    assert second["contact_hmac"] == hmac_hex(key, "15550005678")
    assert second["key_id"] == line["key_id"]


async def test_configured_audit_key_is_used_and_no_key_file_is_made(gateway):
    key = "a-configured-audit-key-0123456789"
    gw = await gateway(f'api_token = "{TOKEN}"\nerasure_audit_key = "{key}"', sinks=SINKS_TOML)
    assert (await delete(gw, f"/v1/contacts/whatsapp/{ERASED}"))[0] == 200
    (line,) = [json.loads(x) for x in (gw.data_dir / "erasures.jsonl").read_text().splitlines()]
    assert line["contact_hmac"] == hmac_hex(key.encode(), ERASED)
    assert not (gw.data_dir / "erasure-audit.key").exists()


def test_audit_key_from_environment_is_validated_and_redacted(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text("[server]\nerasure_audit_key = \"short\"\n")
    with pytest.raises(ConfigError) as info:
        gwconfig.load(str(path), environ={})
    assert info.value.key == "server.erasure_audit_key"
    env = {"GATEWAY_ERASURE_AUDIT_KEY": "from-the-environment-0123456789"}
    config = gwconfig.load(str(path), environ=env)  # the environment wins over the file
    assert config.server.erasure_audit_key == env["GATEWAY_ERASURE_AUDIT_KEY"]
    shown = gwconfig.redacted(msgspec.to_builtins(config))
    assert shown["server"]["erasure_audit_key"] == "***"
    assert "from-the-environment" not in json.dumps(shown)


def erasure_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_ERASURE_AUDIT_KEY"}
    return subprocess.run([sys.executable, str(ROOT / "scripts/erasure-check.py"), *args],
                          capture_output=True, text=True, env={**environ, **(env or {})})


async def test_erasure_check_script_answers_was_this_contact_erased(gateway, tmp_path):
    gw = await start(gateway, SINKS_TOML)
    await post_all(gw)
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200
    data = str(gw.data_dir)
    found = erasure_check("--data-dir", data, ERASED)
    assert found.returncode == 0, found.stderr
    assert body["erasure_id"] in found.stdout and "on whatsapp" in found.stdout
    assert erasure_check("--data-dir", data, "--channel", "instagram", ERASED).returncode == 1
    never = erasure_check("--data-dir", data, "15550005678")
    assert never.returncode == 1 and "no erasure recorded" in never.stdout
    both = erasure_check("--data-dir", data, ERASED, "15550005678")
    assert both.returncode == 1 and body["erasure_id"] in both.stdout
    # Another key (a wrong secret, another replica's key) cannot match: the line is opaque.
    other = tmp_path / "other.key"
    other.write_text("another-key-0123456789abcdef\n")
    wrong = erasure_check("--data-dir", data, "--key-file", str(other), ERASED)
    assert wrong.returncode == 1 and "1 made with another key" in wrong.stdout
    key = (gw.data_dir / "erasure-audit.key").read_text().strip()
    by_env = erasure_check("--data-dir", data, "--print-hmac", ERASED,
                           env={"GATEWAY_ERASURE_AUDIT_KEY": key})
    assert by_env.returncode == 0 and hmac_hex(key.encode(), ERASED) in by_env.stdout
    assert erasure_check("--data-dir", str(tmp_path / "nowhere"), ERASED).returncode == 2


async def delete(gw, path: str, headers: dict | None = AUTH) -> tuple[int, dict]:
    async with gw.session.delete(gw.url + path, headers=headers or {}) as resp:
        return resp.status, await resp.json()


class KeepingSink(Sink):
    """A third-party sink that keeps every event and implements ``erase_contact``; raises
    ``fail`` from it while set (a CRM that is down)."""

    def __init__(self, name: str, config: SinkConfig) -> None:
        super().__init__(config)
        self.name = name
        self.events: dict[str, object] = {}
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None  # while set and unopened, writes wait (lagging)

    async def write(self, records) -> None:
        if self.gate is not None:
            await self.gate.wait()
        for record in records:
            self.events[record.event.id] = record.event

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        if self.fail is not None:
            raise self.fail
        doomed = [k for k, e in self.events.items() if customer(e) == (channel, contact_id)]
        for key in doomed:
            del self.events[key]
        return {"events": len(doomed)}

    def of(self, who: tuple[str, str]) -> int:
        return sum(customer(e) == who for e in self.events.values())


class ThirdPartyPlugin:
    """``[sinks.crm]`` and ``[sinks.archive]``: two KeepingSinks, as a pip-installed plugin."""

    def __init__(self) -> None:
        self.sinks: dict[str, KeepingSink] = {}

    @hookimpl
    def register_sinks(self, config):
        found = []
        for name in ("crm", "archive"):
            table = section(config, "sinks", name, SinkConfig)
            if table:
                self.sinks[name] = KeepingSink(name, table)
                found.append(self.sinks[name])
        return found


async def test_plugin_sinks_and_the_outbox_report_what_they_erased(gateway):
    graph = await GraphSimulator().start()
    try:
        plugin = ThirdPartyPlugin()
        channels = CHANNELS_TOML.replace(
            "[channels.instagram]",
            f'access_token = "test-access-token"\nphone_number_id = "100000000000001"\n'
            f'graph_base_url = "{graph.url}"\n[channels.instagram]')
        gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                           sinks=SINKS_TOML + "[sinks.crm]\n[sinks.archive]\n", channels=channels)
        crm, archive = plugin.sinks["crm"], plugin.sinks["archive"]
        await post_all(gw)
        template = {"channel": "whatsapp", "to": ERASED, "type": "template",
                    "template": {"name": "order_update", "language": "en"}}
        async with gw.session.post(f"{gw.url}/v1/messages", json=template, headers=AUTH) as resp:
            assert resp.status == 202, await resp.text()
            sent = (await resp.json())["id"]
        outbox = gw.app[keys.OUTBOUND].outbox
        assert (await outbox.customer("whatsapp", "100000000000001", ERASED)).last_inbound_at
        mine = crm.of(("whatsapp", ERASED))
        others = len(crm.events) - mine
        assert mine == 4 and others > 0 and archive.of(("whatsapp", ERASED)) == 4

        archive.fail = RuntimeError("the archive is down")
        status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
        assert status == 500, body
        assert body["error"]["code"] == "erasure_incomplete"
        assert "archive" in body["error"]["message"]
        assert body["failed"] == {"archive": "RuntimeError: the archive is down"}
        # Every other sink erased all the same, each under its own name.
        assert body["erased"]["crm"] == {"events": 4}
        assert body["erased"]["storage"] == {"contacts": 1, "conversations": 2, "messages": 4}
        assert body["erased"]["outbox"] == {"outbox": 1, "customers": 2}
        assert crm.of(("whatsapp", ERASED)) == 0 and len(crm.events) == others
        assert archive.of(("whatsapp", ERASED)) == 4
        assert await gw.sql("SELECT count(*) FROM contacts WHERE contact_id = ?", (ERASED,)) == [
            (0,)]
        status, _, _ = await gw.get(f"/v1/messages/{sent}", headers=AUTH)
        assert status == 404  # the outbound record is gone
        for account in ("100000000000001", "100000000000002"):
            assert (await outbox.customer("whatsapp", account, ERASED)).last_inbound_at is None
        (line,) = [json.loads(x) for x in (gw.data_dir / "erasures.jsonl").read_text().splitlines()]
        assert line["failed"] == {"archive": "RuntimeError"}

        archive.fail = None  # fixed: repeating the request completes the erasure
        status, again = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
        assert status == 200 and again["failed"] == {}
        assert again["erased"]["archive"] == {"events": 4}
        assert again["erased"]["crm"] == {"events": 0}
        assert archive.of(("whatsapp", ERASED)) == 0
    finally:
        await graph.stop()


async def test_refused_without_the_right_token(gateway):
    gw = await start(gateway, SINKS_TOML)
    await post_all(gw)
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}", headers=None)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, _ = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}",
                             headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert await gw.sql("SELECT count(*) FROM contacts WHERE contact_id = ?", (ERASED,)) == [(1,)]
    assert not (gw.data_dir / "erasures.jsonl").exists()


async def test_closed_when_no_api_token_is_configured(gateway):
    gw = await start(gateway, SINKS_TOML, token=None)
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 503 and body["error"]["code"] == "api_disabled"


async def test_unknown_channel_is_404(gateway):
    gw = await start(gateway, SINKS_TOML)
    status, body = await delete(gw, f"/v1/contacts/telegram/{ERASED}")
    assert status == 404 and body["error"]["code"] == "unknown_channel"


async def test_contact_writing_again_is_stored_afresh(gateway, backends):
    gw = await start(gateway, backends)
    await post_all(gw)
    assert (await delete(gw, f"/v1/contacts/whatsapp/{ERASED}"))[0] == 200
    # The very same old payload again: a duplicate (its event ids are remembered, not its
    # content), so nothing about the erased contact comes back.
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200
    await gw.settle()
    assert await gw.sql("SELECT count(*) FROM contacts WHERE contact_id = ?", (ERASED,)) == [(0,)]
    # A new message: stored afresh, as a new contact.
    body = new_text("wamid.TEST.IN.AFTER.0001", 1_760_100_000)
    assert (await gw.post("whatsapp", body))[0] == 200
    await gw.settle()
    rows = await gw.sql("SELECT message_count FROM conversations WHERE contact_id = ?", (ERASED,))
    assert rows == [(1,)]
    (first_seen,), = await gw.sql("SELECT first_seen FROM contacts WHERE contact_id = ?", (ERASED,))
    assert first_seen.startswith("2025-10-10T12:40:00")
    assert await gw.sql("SELECT id FROM messages WHERE conversation_id LIKE ?",
                        (f"%:{ERASED}",)) == [("wamid.TEST.IN.AFTER.0001",)]
    firestore = await firestore_state(gw)
    if firestore is not None:
        assert list(firestore["messages"]).count("wamid.TEST.IN.AFTER.0001") == 1
        assert firestore["contacts"][f"whatsapp:{ERASED}"]["first_seen"].isoformat().startswith(
            "2025-10-10T12:40:00")
        mine = [c for c in firestore["conversations"].values() if c["contact_id"] == ERASED]
        assert [c["message_count"] for c in mine] == [1]


async def test_purge_jsonl_script_removes_only_that_contact(gateway, tmp_path):
    gw = await start(gateway, SINKS_TOML)
    await post_all(gw)
    path = gw.data_dir / "events.jsonl"
    before = [json.loads(x) for x in path.read_text().splitlines()]
    script = [sys.executable, str(ROOT / "scripts/purge-jsonl.py"), "--channel", "whatsapp",
              "--contact", ERASED]
    dry = subprocess.run([*script, "--dry-run", str(path)], capture_output=True, text=True,
                         check=True)
    assert "would remove 4 line(s)" in dry.stdout and len(path.read_text().splitlines()) == 11
    done = subprocess.run([*script, str(path)], capture_output=True, text=True, check=True)
    assert "removed 4 line(s), kept 7" in done.stdout
    after = [json.loads(x) for x in path.read_text().splitlines()]

    def erased(e: dict) -> bool:
        party = e["sender"] if e["direction"] == "inbound" else e["recipient"]
        return e["channel"] == "whatsapp" and party["id"] == ERASED

    assert after == [e for e in before if not erased(e)]
    assert ERASED not in path.read_text()


def test_purge_jsonl_script_reports_a_truncated_gz_and_purges_the_other_files(tmp_path):
    line = json.dumps({"channel": "whatsapp", "direction": "inbound", "sender": {"id": ERASED},
                       "recipient": {"id": "biz"}}) + "\n"
    kept = json.dumps({"channel": "whatsapp", "direction": "inbound", "sender": {"id": "other"},
                       "recipient": {"id": "biz"}}) + "\n"
    whole = gzip.compress((line + kept).encode() * 50)
    torn = tmp_path / "events.jsonl.1.gz"
    torn.write_bytes(whole[:len(whole) // 2])  # a rotated copy still being compressed
    main = tmp_path / "events.jsonl"
    main.write_text(line + kept)
    done = subprocess.run([sys.executable, str(ROOT / "scripts/purge-jsonl.py"), "--channel",
                           "whatsapp", "--contact", ERASED, str(torn), str(main)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{torn}:" in done.stderr and "left as it was" in done.stderr
    assert "removed 1 line(s), kept 1" in done.stdout
    assert main.read_text() == kept
    assert torn.read_bytes() == whole[:len(whole) // 2]
    assert not list(tmp_path.glob(".purge-*"))


async def test_a_lagging_sink_never_receives_what_the_erasure_removed(gateway, monkeypatch):
    """The erasure gives up waiting for a lagging sink (``settled: false``) and erases the
    journal; the contact's events the gateway still holds in memory for that sink must not reach
    it afterwards (only the batch it was already writing can: the reason to repeat the request)."""
    from gateway import erasure

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.3)
    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.crm]\nbatch_size = 1\n")
    crm = plugin.sinks["crm"]
    crm.gate = asyncio.Event()
    other = json.loads(fixture_bytes("whatsapp/text.json"))
    value = other["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["wa_id"] = value["messages"][0]["from"] = "15550005678"
    value["messages"][0]["id"] = "wamid.TEST.IN.TEXT.OTHER.0001"
    assert (await gw.post("whatsapp", json.dumps(other).encode()))[0] == 200
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200
    journal = gw.app[keys.JOURNAL]
    for _ in range(200):  # processed: the crm's worker holds the first, the second waits
        if journal.pending == 0 and gw.app[keys.DISPATCHER].tail.last_seq >= 2:
            break
        await asyncio.sleep(0.02)
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200 and body["settled"] is False
    crm.gate.set()
    for _ in range(200):
        if await gw.app[keys.DISPATCHER].caught_up():
            break
        await asyncio.sleep(0.02)
    assert await gw.app[keys.DISPATCHER].caught_up()
    assert crm.of(("whatsapp", "15550005678")) == 1
    assert crm.of(("whatsapp", ERASED)) == 0


def hold_processor(gw) -> asyncio.Event:
    """Stop the processor from taking batches until the returned event is set (a processor
    lagging behind the erasure's wait)."""
    processor = gw.app[keys.PROCESSOR]
    gate = asyncio.Event()
    original = processor.process_batch

    async def held() -> int:
        await gate.wait()
        return await original()

    processor.process_batch = held
    return gate


async def test_requests_journaled_before_the_erasure_never_bring_the_contact_back(
        gateway, monkeypatch):
    """Requests still waiting to be processed when the erasure runs (the processor lagging
    beyond the erasure's wait) yield none of the erased contact's events afterwards, while the
    other contacts' events of the same requests are stored; the contact writing after the
    erasure is stored afresh. The erasure's record is kept only until those are processed."""
    from gateway import erasure

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    gw = await start(gateway, SINKS_TOML)
    gate = hold_processor(gw)
    gw.app[keys.PROCESSOR].wake.set()
    await asyncio.sleep(0.05)  # a batch the processor had begun is done
    await post_all(gw, settle=False)
    journal = gw.app[keys.JOURNAL]
    assert journal.pending > 0
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200 and body["settled"] is False and body["failed"] == {}
    assert await journal.erasures() == {("whatsapp", ERASED): journal.committed_seq}
    after = new_text("wamid.TEST.IN.AFTER.0002", 1_760_100_000)  # written after the erasure
    assert (await gw.post("whatsapp", after))[0] == 200
    gate.set()
    await gw.settle()
    assert await gw.sql("SELECT id FROM messages WHERE conversation_id LIKE ?",
                        (f"%:{ERASED}",)) == [("wamid.TEST.IN.AFTER.0002",)]
    assert [(e["channel"], e["sender"]["id"]) for e in gw.jsonl()
            if ERASED in json.dumps(e)] == [("whatsapp", ERASED)]  # the new message alone
    assert {customer(decode(line)) for line in
            (msgspec.json.encode(e) for e in gw.jsonl())} == CONTACTS  # the others: all kept
    assert await journal.erasures() == {}
    rows = await journal._writer.run(lambda c: c.execute("SELECT * FROM erasures").fetchall())
    assert rows == []


async def test_an_erasure_waiting_for_its_requests_survives_a_restart(tmp_path):
    """The record of an erasure whose requests are not yet processed is durable: a restart
    before they are processed still drops the contact's events."""
    from gateway.journal.sqlite import SqliteJournal

    path = tmp_path / "g.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    config = gwconfig.load(str(path), environ={})
    journal = SqliteJournal(config)
    await journal.open()
    for body in (b"one", b"two"):
        await journal.append("whatsapp", body, time.time())
    await journal.erase_contact("whatsapp", ERASED)
    await journal.close()
    journal = SqliteJournal(config)
    await journal.open()
    assert await journal.erasures() == {("whatsapp", ERASED): 2}
    await journal.append("whatsapp", b"three", time.time())
    await journal.commit_processed(1, [], [])
    assert await journal.erasures() == {("whatsapp", ERASED): 2}  # request 2 is still to come
    await journal.commit_processed(3, [], [])
    assert await journal.erasures() == {}
    await journal.close()
    journal = SqliteJournal(config)
    await journal.open()
    assert await journal.erasures() == {}
    await journal.erase_contact("whatsapp", ERASED)  # nothing pending: nothing to remember
    assert await journal.erasures() == {}
    await journal.close()


async def test_a_request_that_fails_to_normalise_keeps_no_dead_letter_of_an_erased_contact(
        gateway, monkeypatch):
    """A raw request journaled before the erasure that no channel can normalise would be kept
    as a dead letter, body and all; when it mentions the erased contact it is not (as the
    erasure deletes such a letter)."""
    from gateway import erasure
    from tests.test_pipeline import OddPlugin

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[OddPlugin()])
    gate = hold_processor(gw)
    gw.app[keys.PROCESSOR].wake.set()
    await asyncio.sleep(0.05)
    mine = json.dumps({"shape": "lazy", "from": ERASED}).encode()
    other = json.dumps({"shape": "lazy", "from": "15550005678"}).encode()
    for body in (mine, other):
        assert (await gw.post("odd", body, secret="odd-secret"))[0] == 200
    assert (await delete(gw, f"/v1/contacts/odd/{ERASED}"))[0] == 200
    gate.set()
    await gw.settle()
    assert [d.data for d in await gw.app[keys.JOURNAL].dead_letters()] == [other]


@pytest.mark.parametrize("batch_size", [1, 10])
async def test_events_being_retried_are_given_up_by_the_erasure(gateway, monkeypatch, batch_size):
    """The contact's events a sink is retrying when the erasure runs (beyond the erasure's
    wait) are not written by a later attempt, nor dead-lettered: the one being retried, and
    (a batch of 10) the one waiting behind it in the same conversation. The other customer's
    event of the same webhook is written once the sink is back."""
    from gateway import erasure

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + f"[sinks.crm]\nbatch_size = {batch_size}\n"
                       "max_attempts = 100\nbackoff_initial = 0.1\nbackoff_max = 0.1\n")
    crm = plugin.sinks["crm"]
    failing = True
    attempts = []
    original = crm.write

    async def write(records) -> None:
        attempts.append(len(records))
        if failing:
            raise ConnectionError("the CRM is down")
        await original(records)

    crm.write = write
    # two messages of the erased contact and one of another customer, in one webhook
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/three_messages.json")))[0] == 200
    for _ in range(300):
        if len(attempts) >= 3:  # the batch failed, and retries of its events too
            break
        await asyncio.sleep(0.01)
    assert (await delete(gw, f"/v1/contacts/whatsapp/{ERASED}"))[0] == 200
    failing = False  # the CRM is back: the next attempts would write the contact's events
    await gw.settle()
    assert crm.of(("whatsapp", ERASED)) == 0 and crm.of(("whatsapp", "15550005678")) == 1
    assert await gw.app[keys.JOURNAL].dead_letters() == []
    worker = gw.app[keys.DISPATCHER].workers["crm"]
    assert not worker.in_hand and not worker.erased


async def test_a_lagging_sink_is_not_refilled_while_a_slow_sink_erases(gateway, monkeypatch):
    """The journal and the dispatcher's memory are erased before the sinks: a lagging sink's
    worker cannot go on handing the contact's events to it while another sink (Firestore with
    many documents, a big jsonl file) is still erasing. At most the batch it was writing lands."""
    from gateway import erasure

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.crm]\nbatch_size = 1\n[sinks.archive]\n")
    crm, archive = plugin.sinks["crm"], plugin.sinks["archive"]
    crm_write, archive_erase = crm.write, archive.erase_contact

    async def slow_write(records) -> None:
        await asyncio.sleep(0.05)
        await crm_write(records)

    async def slow_erase(channel: str, contact_id: str) -> dict[str, int]:
        await asyncio.sleep(1.0)
        return await archive_erase(channel, contact_id)

    crm.write, archive.erase_contact = slow_write, slow_erase
    for i in range(40):
        body = new_text(f"wamid.TEST.IN.LAG.{i:04d}", 1_760_000_000 + i)
        assert (await gw.post("whatsapp", body))[0] == 200
    status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
    assert status == 200 and body["settled"] is False
    assert crm.of(("whatsapp", ERASED)) <= 1
    await gw.settle()
    assert crm.of(("whatsapp", ERASED)) <= 1 and archive.of(("whatsapp", ERASED)) == 0


async def test_the_outbound_service_forgets_the_contact(gateway, meta):  # noqa: F811
    """After the erasure the outbound service knows nothing of the contact's last message (nor
    its word on consent): a free-form message to it is refused as to a number never heard of,
    until it writes again."""
    gw = await gateway(f'api_token = "{TOKEN}"', sinks="[sinks.storage]\n",
                       channels=channels_toml(meta.graph.url))

    async def send(to: str) -> int:
        msg = {"channel": "whatsapp", "to": to, "type": "text", "text": "hello"}
        async with gw.session.post(f"{gw.url}/v1/messages", json=msg, headers=AUTH) as resp:
            return resp.status

    async with meta(gw) as sim:
        await sim.customer_says("whatsapp", ERASED, "Hello there")
        await gw.settle()
        assert await send(ERASED) == 202  # within the customer-service window
        assert (await delete(gw, f"/v1/contacts/whatsapp/{ERASED}"))[0] == 200
        assert await send(ERASED) == 422 == await send("15550009999")
        await sim.customer_says("whatsapp", ERASED, "Me again")
        await gw.settle()
        assert await send(ERASED) == 202


async def test_a_number_written_with_punctuation_is_the_customer_it_names(gateway, meta):  # noqa: F811
    """``"to": "+1 555-000-1234"`` is the customer whose wa_id is 15550001234: inside their
    window, and erased with them (the outbox kept the number as written before)."""
    gw = await gateway(f'api_token = "{TOKEN}"', sinks="[sinks.storage]\n",
                       channels=channels_toml(meta.graph.url))
    written = "+1 555-000-1234"
    assert ERASED == "15550001234"

    async def send(to: str) -> tuple[int, dict]:
        msg = {"channel": "whatsapp", "to": to, "type": "text", "text": "hello"}
        async with gw.session.post(f"{gw.url}/v1/messages", json=msg, headers=AUTH) as resp:
            return resp.status, await resp.json()

    async with meta(gw) as sim:
        await sim.customer_says("whatsapp", ERASED, "Hello there")
        await gw.settle()
        status, answer = await send(written)
        assert status == 202, answer
        outbox = gw.app[keys.OUTBOUND].outbox
        assert (await outbox.get(answer["id"])).recipient == ERASED
        status, body = await delete(gw, f"/v1/contacts/whatsapp/{ERASED}")
        assert status == 200 and body["erased"]["outbox"]["outbox"] == 1
        assert await outbox.get(answer["id"]) is None


class FlakyChannel(Channel):
    """A plugin channel whose ``normalise`` has a bug until ``fixed`` is set."""

    name = "flaky"
    fixed = False

    def __init__(self) -> None:
        super().__init__(app_secret="flaky-secret", verify_token=None)

    def check_envelope(self, body: bytes) -> None:
        pass

    def normalise(self, body: bytes):
        if not FlakyChannel.fixed:
            raise ValueError("a bug in the channel")
        data = json.loads(body)
        return [Message(schema=1, id=f"flaky-{data['mid']}", channel="flaky", direction="inbound",
                        account_id="acc", conversation_id=f"flaky:acc:{data['from']}",
                        sender=Party(data["from"]), recipient=Party("acc"),
                        timestamp=datetime(2026, 1, 1, tzinfo=UTC), type="text", text="hi")]


class FlakyPlugin:
    @hookimpl
    def register_channels(self, config):
        return [FlakyChannel()]


async def test_an_erasure_during_a_replay_of_raw_requests_still_holds(gateway, monkeypatch):
    """A raw request dead-lettered by a channel's bug is replayed once the bug is fixed; an
    erasure of its contact arriving while the processor holds the letter's body (between
    reading the letter and journaling it again) still keeps the contact's events out."""
    monkeypatch.setattr(FlakyChannel, "fixed", False)
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[FlakyPlugin()])
    body = json.dumps({"from": ERASED, "mid": "1"}).encode()
    assert (await gw.post("flaky", body, secret="flaky-secret"))[0] == 200
    await gw.settle()
    journal = gw.app[keys.JOURNAL]
    [letter] = await journal.dead_letters()
    assert letter.sink == "normalise:flaky"
    monkeypatch.setattr(FlakyChannel, "fixed", True)
    original, erasing = journal.replays_due, []

    async def replays_due(sink: str, limit: int):
        letters = await original(sink, limit)
        if letters and not erasing:  # the DELETE arrives now, from another task
            erasing.append(asyncio.ensure_future(delete(gw, f"/v1/contacts/flaky/{ERASED}")))
            await asyncio.sleep(0.2)
        return letters

    monkeypatch.setattr(journal, "replays_due", replays_due)
    assert await journal.request_replay("normalise:flaky") == 1
    for _ in range(300):
        if erasing and erasing[0].done():
            break
        await asyncio.sleep(0.02)
    status, _ = await erasing[0]
    assert status == 200
    for _ in range(300):  # the replay journaled the body again (request 2), before or after
        if journal.committed_seq >= 2:
            break
        await asyncio.sleep(0.02)
    assert journal.committed_seq >= 2
    await gw.settle()
    assert [e for e in gw.jsonl() if e["sender"]["id"] == ERASED] == []
    assert await gw.sql("SELECT count(*) FROM messages WHERE sender_id = ?", (ERASED,)) == [(0,)]
    assert await journal.dead_letters() == []
