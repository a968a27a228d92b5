"""The jsonl sink under logrotate and crashes, on real files: ``create`` (rename, new file,
compress, unlink) and ``nocreate`` are followed without a signal, ``copytruncate`` keeps working
even when it lands during a failing append, the remembered ids reach back past big lines, and a
file the sink creates has its directory fsynced."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import stat
from datetime import UTC, datetime

import pytest

from gateway.events import Message, Party, conversation_id, encode
from gateway.sink import Record
from sinks.jsonl import sink as jsonl_sink
from sinks.jsonl.sink import JsonlConfig, JsonlSink
from sinks.jsonl.tail import BLOCK

ACCOUNT, CUSTOMER = "100000000000001", "15550001234"


def record(event_id: str, text: str = "hello") -> Record:
    event = Message(schema=1, id=event_id, channel="whatsapp", direction="inbound",
                    account_id=ACCOUNT,
                    conversation_id=conversation_id("whatsapp", ACCOUNT, CUSTOMER),
                    sender=Party(CUSTOMER), recipient=Party(ACCOUNT),
                    timestamp=datetime(2026, 1, 1, tzinfo=UTC), message_id=f"wamid.{event_id}",
                    type="text", text=text)
    return Record(0, event, encode(event), 1.0)


def batch(*ids: str) -> list[Record]:
    return [record(i) for i in ids]


def ids(path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as lines:
        return [json.loads(line)["id"] for line in lines]


async def started(path, **settings) -> JsonlSink:
    sink = JsonlSink(JsonlConfig(path=str(path), **{"fsync": False, **settings}))
    await sink.start()
    return sink


def rotate(path) -> str:
    """logrotate ``create``: rename the file to ``.1`` and create an empty one in its place."""
    os.rename(path, f"{path}.1")
    open(path, "wb").close()
    return f"{path}.1"


def compress(rotated: str) -> str:
    """logrotate ``compress`` (no ``delaycompress``): gzip the rotated copy, unlink it."""
    with open(rotated, "rb") as src, gzip.open(rotated + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.unlink(rotated)
    return rotated + ".gz"


def copytruncate(path) -> None:
    shutil.copy(path, f"{path}.1")
    os.truncate(path, 0)


async def test_logrotate_create_and_compress_lose_no_event(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1", "a2"))
    first = rotate(path)
    await sink.write(batch("b1", "b2"))
    assert ids(path) == ["b1", "b2"]  # the new file, not the renamed one
    assert ids(first) == ["a1", "a2"]
    compressed = compress(rotate(path))  # the next rotation: .1 gzipped and unlinked at once
    await sink.write(batch("c1", "c2"))
    await sink.close()
    assert ids(path) == ["c1", "c2"]
    assert ids(compressed) == ["b1", "b2"]


async def test_logrotate_nocreate_has_the_sink_create_the_file(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1"))
    os.rename(path, f"{path}.1")  # nothing in its place
    await sink.write(batch("b1"))
    await sink.close()
    assert ids(path) == ["b1"]
    assert ids(f"{path}.1") == ["a1"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_a_batch_redelivered_after_a_rotation_is_not_written_twice(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1", "a2"))
    rotated = compress(rotate(path))
    await sink.write(batch("a1", "a2", "b1"))  # the dispatcher hands the batch over again
    await sink.close()
    assert ids(path) == ["b1"]
    assert ids(rotated) == ["a1", "a2"]


async def test_the_file_put_in_place_is_repaired_and_its_ids_remembered(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1"))
    os.rename(path, f"{path}.1")
    path.write_bytes(record("x1").data + b"\n" + record("x2").data[:40])  # torn last line
    await sink.write(batch("a1", "x1", "b1"))
    await sink.close()
    assert ids(path) == ["x1", "b1"]  # the torn line cut, x1 not written again, a1 neither


async def test_copytruncate_keeps_appending_to_the_same_file(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1", "a2"))
    copytruncate(path)
    await sink.write(batch("a2", "b1"))
    await sink.close()
    assert ids(path) == ["b1"]
    assert ids(f"{path}.1") == ["a1", "a2"]


@pytest.mark.parametrize("truncated", ["before the write", "after part of it", "instead of it",
                                       "never"])
async def test_copytruncate_during_a_failing_append_leaves_whole_lines(tmp_path, monkeypatch,
                                                                       truncated):
    path = tmp_path / "events.jsonl"
    sink = await started(path)
    await sink.write(batch("a1", "a2"))
    real = os.write

    def disk_full(fd: int, data) -> int:
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return real(fd, data)
        monkeypatch.setattr(os, "write", real)  # once: the retry finds room
        if truncated == "before the write":
            copytruncate(path)
        if truncated != "instead of it":
            real(fd, bytes(data[:len(data) // 2]))  # part of the batch, then the disk is full
        if truncated in ("after part of it", "instead of it"):
            copytruncate(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        await sink.write(batch("c1", "c2"))
    await sink.write(batch("c1", "c2"))  # the dispatcher retries
    await sink.close()
    raw = path.read_bytes()
    assert b"\0" not in raw
    assert ids(path) == (["a1", "a2"] if truncated == "never" else []) + ["c1", "c2"]


async def test_remembered_ids_reach_back_past_big_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    settings = {"batch_size": 20}
    big = [record(f"e{n}", "x" * 600_000) for n in range(20)]  # 12 MB: one batch
    sink = await started(path, **settings)
    await sink.write(big)
    await sink.close()
    with open(path, "ab") as torn:  # a crash in the middle of the next batch
        torn.write(record("e20", "x" * 600_000).data[:300_000])
    sink = await started(path, **settings)
    await sink.write(big)  # the batch the dispatcher hands over again after the crash
    await sink.close()
    assert ids(path) == [f"e{n}" for n in range(20)]


async def test_start_reads_only_the_newest_lines(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    line = record("old", "y" * 1000).data + b"\n"
    path.write_bytes(line * (8 * BLOCK // len(line)) + record("new").data + b"\n")
    real, read = os.pread, []

    def counting(fd: int, length: int, offset: int) -> bytes:
        read.append(length)
        return real(fd, length, offset)

    monkeypatch.setattr(os, "pread", counting)
    monkeypatch.setattr(jsonl_sink, "START_READ_BYTES", BLOCK)
    sink = await started(path, batch_size=5)  # four batches are 20 ids: a few kilobytes
    monkeypatch.setattr(os, "pread", real)
    await sink.write(batch("new", "newer"))
    await sink.close()
    assert sum(read) <= 2 * BLOCK + 1
    assert ids(path)[-2:] == ["new", "newer"]


async def test_a_restart_with_a_smaller_batch_size_writes_no_line_twice(tmp_path):
    """The batch in flight at a crash came with the earlier run's batch_size: a restart with a
    smaller one still knows its ids (the window holds at least MIN_RECENT_IDS)."""
    path = tmp_path / "events.jsonl"
    in_flight = batch(*(f"e{n}" for n in range(180)))
    sink = await started(path, batch_size=200)
    await sink.write(in_flight)
    await sink.close()  # a crash before the cursor moved: all 180 are delivered again
    sink = await started(path, batch_size=20)
    for start in range(0, 180, 20):
        await sink.write(in_flight[start:start + 20])
    await sink.close()
    assert ids(path) == [f"e{n}" for n in range(180)]


async def test_a_rotation_while_the_gateway_is_down_writes_no_line_twice(tmp_path):
    """logrotate renamed the file while the gateway was down, after a crash: the batch
    delivered again is known from the rotated copy's newest lines."""
    path = tmp_path / "events.jsonl"
    sink = await started(path, batch_size=50)
    await sink.write(batch("a1", "a2", "a3"))
    await sink.close()
    rotated = rotate(path)
    sink = await started(path, batch_size=50)
    await sink.write(batch("a2", "a3", "b1"))  # the crash's batch again, and a new event
    await sink.close()
    assert ids(rotated) == ["a1", "a2", "a3"] and ids(path) == ["b1"]


async def test_a_file_it_creates_has_its_directory_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "events.jsonl"
    real, synced = os.fsync, []

    def recording(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    sink = await started(path, fsync=True)
    assert synced == [tmp_path.stat().st_ino]  # created at start
    await sink.write(batch("a1"))
    os.rename(path, f"{path}.1")  # logrotate nocreate: the sink creates the next one
    await sink.write(batch("b1"))
    assert synced == [tmp_path.stat().st_ino] * 2
    await sink.close()
    again = await started(path, fsync=True)  # an existing file: nothing to make durable
    await again.close()
    assert len(synced) == 2
