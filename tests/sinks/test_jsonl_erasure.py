"""The jsonl sink's GDPR erasure on its own (real files): appends acknowledged during an
erasure, even a cancelled one, are all in the file; copies it cannot rewrite are reported; a
file without the contact is not rewritten."""

from __future__ import annotations

import asyncio
import bz2
import gzip
import json
import lzma
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


def lines_of(path) -> list[bytes]:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.name.endswith(".gz") else data).splitlines()


async def test_every_copy_whose_name_starts_with_the_files_is_purged(tmp_path):
    """Whatever logrotate's ``dateext`` / ``dateformat`` / ``extension`` make of the name, or a
    copy made by hand: every file beside it whose name is the file's and more after a
    separator is purged (``.gz`` ones compressed still, mode kept); files of other names
    (``events.jsonl2``, ``events.jsonlX``, ``other.jsonl``) and a directory are not touched."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    await sink.write([record(1, ERASED), record(2, OTHER), record(3, ERASED), record(4, OTHER)])
    content = path.read_bytes()
    kept = [line for line in content.splitlines() if ERASED.encode() not in line]
    copies = ["events.jsonl.1", "events.jsonl.2.gz", "events.jsonl-20261201",
              "events.jsonl-20261201.gz", "events.jsonl.2026-12-01", "events.jsonl.2026-12-01.gz",
              "events.jsonl-1764547200", "events.jsonl_2026-12-01", "events.jsonl.old",
              "events.jsonl.1.bak", "events.jsonl~"]
    for name in copies:
        (tmp_path / name).write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    os.chmod(tmp_path / "events.jsonl.2026-12-01", 0o600)
    unrelated = ["events.jsonl2", "events.jsonlX", "other.jsonl", "events.json"]
    for name in unrelated:
        (tmp_path / name).write_bytes(content)
    (tmp_path / "events.jsonl.d").mkdir()
    (tmp_path / "events.jsonl.d" / "events.jsonl").write_bytes(content)

    assert await sink.erase_contact("whatsapp", ERASED) == {"events": 2 * (1 + len(copies))}
    await sink.close()
    assert lines_of(path) == kept
    for name in copies:
        assert lines_of(tmp_path / name) == kept, name
    assert os.stat(tmp_path / "events.jsonl.2026-12-01").st_mode & 0o777 == 0o600
    for name in [*unrelated, "events.jsonl.d/events.jsonl"]:
        assert (tmp_path / name).read_bytes() == content, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary file left
        ["events.jsonl", *copies, *unrelated, "events.jsonl.d"])


async def test_copies_in_other_compressions_are_reported_whatever_their_names(tmp_path):
    """A copy it cannot read is reported (the erasure fails, naming it), by suffix or by
    content, however logrotate named it; the plain and .gz copies beside it are purged."""
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    await sink.write([record(1, ERASED), record(2, OTHER)])
    content = path.read_bytes()
    unreadable = {"events.jsonl.2026-12-01.xz": lzma.compress(content),
                  "events.jsonl-20261201.bz2": bz2.compress(content),
                  "events.jsonl.3.zst": b"\x28\xb5\x2f\xfd zstd frame",
                  "events.jsonl.old": gzip.compress(content),  # gzip, but not named .gz
                  "events.jsonl.4.gz.xz": lzma.compress(gzip.compress(content))}
    for name, data in unreadable.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "events.jsonl.2026-11-30").write_bytes(content)
    (tmp_path / "events.jsonl.2026-11-29.gz").write_bytes(gzip.compress(content))
    with pytest.raises(PermanentError) as raised:
        await sink.erase_contact("whatsapp", ERASED)
    await sink.close()
    for name in unreadable:
        assert name in str(raised.value)
    assert "events.jsonl.2026-11-30" not in str(raised.value)
    for name, data in unreadable.items():
        assert (tmp_path / name).read_bytes() == data  # never rewritten as if plain
    for name in ("events.jsonl", "events.jsonl.2026-11-30", "events.jsonl.2026-11-29.gz"):
        assert customers_in(tmp_path / name) == [OTHER], name


async def test_links_beside_the_file_purge_what_they_point_to(tmp_path):
    """A symbolic link named like a copy purges the file it points to (the link stays a link);
    one to the live file is the live file, not a copy of it. A hard link to the live file keeps
    the old file once the live one is replaced: a copy, purged too."""
    data, archive = tmp_path / "data", tmp_path / "archive"
    data.mkdir()
    archive.mkdir()
    path = data / "events.jsonl"
    sink = JsonlSink(JsonlConfig(path=str(path), fsync=False))
    await sink.start()
    await sink.write([record(1, ERASED), record(2, OTHER)])
    (archive / "2026-11.jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
    (data / "events.jsonl.2026-11.gz").symlink_to(archive / "2026-11.jsonl.gz")
    (data / "events.jsonl.current").symlink_to(path)
    os.link(path, data / "events.jsonl.hard")
    assert await sink.erase_contact("whatsapp", ERASED) == {"events": 3}  # live, archive, hard
    await sink.write([record(3, OTHER)])
    await sink.close()
    assert (data / "events.jsonl.2026-11.gz").is_symlink()
    assert customers_in(archive / "2026-11.jsonl.gz") == [OTHER]
    assert (data / "events.jsonl.current").is_symlink()
    assert customers_in(data / "events.jsonl.current") == [OTHER, OTHER]  # the live file
    assert customers_in(data / "events.jsonl.hard") == [OTHER]


def customers_in(path) -> list[str]:
    return [json.loads(line)["sender"]["id"] for line in lines_of(path)]
