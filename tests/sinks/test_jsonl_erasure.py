"""The jsonl sink's GDPR erasure on its own (real files): appends acknowledged during an
erasure, even a cancelled one, are all in the file; copies it cannot rewrite are reported; a
file without the contact is not rewritten."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime

import pytest

from gateway.errors import PermanentError
from gateway.events import Message, Party, conversation_id, encode
from gateway.sink import Record
from sinks.jsonl.sink import JsonlConfig, JsonlSink

ACCOUNT, ERASED, OTHER = "100000000000001", "15550001234", "15550005678"


def message(n: int, customer: str) -> Message:
    return Message(schema=1, id=f"ev-{customer}-{n}", channel="whatsapp", direction="inbound",
                   account_id=ACCOUNT, conversation_id=conversation_id("whatsapp", ACCOUNT,
                                                                       customer),
                   sender=Party(customer), recipient=Party(ACCOUNT),
                   timestamp=datetime(2026, 1, 1, tzinfo=UTC), message_id=f"wamid.{customer}.{n}",
                   type="text", text="hello")


def record(n: int, customer: str) -> Record:
    event = message(n, customer)
    return Record(n, event, encode(event), 1.0)


def customers(path) -> list[str]:
    return [json.loads(line)["sender"]["id"] for line in path.read_text().splitlines()]


async def test_appends_during_a_cancelled_erasure_are_all_kept(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"".join(encode(message(n, ERASED if n % 2 else OTHER)) + b"\n"
                              for n in range(60_000)))  # a rewrite that takes a while
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    erasing = asyncio.ensure_future(sink.erase_contact("whatsapp", ERASED))
    await asyncio.sleep(0.02)
    erasing.cancel()  # aiohttp cancels a handler at shutdown: the erasure must still finish
    written = []
    for n in range(100_000, 100_050):
        await sink.write([record(n, OTHER)])
        written.append(f"wamid.{OTHER}.{n}")
    with pytest.raises(asyncio.CancelledError):
        await erasing
    await sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {e["message_id"] for e in lines} >= set(written)  # every acknowledged append
    assert ERASED not in {e["sender"]["id"] for e in lines}


async def test_copies_it_cannot_rewrite_are_reported_and_the_rest_is_purged(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    await sink.write([record(1, ERASED), record(2, OTHER)])
    (tmp_path / "events.jsonl.2.xz").write_bytes(b"\xfd7zXZ\x00 compressed")
    with pytest.raises(PermanentError, match="events.jsonl.2.xz"):
        await sink.erase_contact("whatsapp", ERASED)
    assert customers(path) == [OTHER]
    await sink.close()


async def test_a_file_without_the_contact_is_left_as_it_is(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    await sink.write([record(1, OTHER)])
    before = os.stat(path).st_ino
    assert await sink.erase_contact("whatsapp", ERASED) == {"events": 0}
    assert os.stat(path).st_ino == before  # scanned, not rewritten
    await sink.write([record(2, OTHER)])
    await sink.close()
    assert customers(path) == [OTHER, OTHER]
