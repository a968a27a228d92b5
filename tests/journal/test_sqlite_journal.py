"""The SQLite journal hands the processor what it committed from memory; these cases must read the
same requests, in the same order, as reading them back from the file would."""

from __future__ import annotations

import asyncio

import pytest

from gateway import config as gwconfig
from gateway.journal import sqlite as sqlite_journal
from gateway.journal.sqlite import SqliteJournal


@pytest.fixture
def cfg(tmp_path):
    return gwconfig.GatewayConfig(server=gwconfig.ServerConfig(data_dir=str(tmp_path)))


async def drain(journal: SqliteJournal, limit: int = 3) -> list[bytes]:
    seen = []
    while requests := await journal.unprocessed(limit):
        seen += [r.body for r in requests]
        await journal.commit_processed(requests[-1].seq, [], [])
    return seen


async def test_a_committed_append_whose_caller_was_cancelled_is_still_processed(cfg):
    journal = SqliteJournal(cfg)
    await journal.open()
    task = asyncio.ensure_future(journal.append("whatsapp", b"orphan", 1.0))
    await asyncio.sleep(0)  # the row is queued for the next group commit
    task.cancel()
    for _ in range(100):
        if journal.pending:
            break
        await asyncio.sleep(0.01)
    assert journal.pending == 1
    assert [r.body for r in await journal.unprocessed(10)] == [b"orphan"]
    await journal.close()


async def test_after_a_restart_the_files_backlog_comes_first(cfg):
    journal = SqliteJournal(cfg)
    await journal.open()
    for n in range(4):
        await journal.append("whatsapp", f"old{n}".encode(), 1.0)
    await journal.close()

    journal = SqliteJournal(cfg)
    await journal.open()
    assert journal.pending == 4
    for n in range(3):
        await journal.append("whatsapp", f"new{n}".encode(), 2.0)
    seqs = [r.seq for r in await journal.unprocessed(10)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 7
    assert await drain(journal) == [b"old0", b"old1", b"old2", b"old3", b"new0", b"new1", b"new2"]
    assert journal.pending == 0
    await journal.append("whatsapp", b"later", 3.0)  # from memory again, with a fresh seq
    [request] = await journal.unprocessed(10)
    assert request.body == b"later" and request.seq > seqs[-1]
    await journal.close()


async def test_past_the_memory_cap_nothing_is_lost_or_repeated(cfg, monkeypatch):
    monkeypatch.setattr(sqlite_journal, "MEMORY_REQUESTS", 5)
    journal = SqliteJournal(cfg)
    await journal.open()
    await asyncio.gather(*(journal.append("whatsapp", f"r{n:02d}".encode(), 1.0)
                           for n in range(12)))
    assert await drain(journal, limit=4) == [f"r{n:02d}".encode() for n in range(12)]
    await journal.close()


async def test_past_the_memory_byte_budget_nothing_is_lost_or_repeated(cfg, monkeypatch):
    monkeypatch.setattr(sqlite_journal, "MEMORY_BYTES", 2500)  # two 1,000-byte bodies fit
    journal = SqliteJournal(cfg)
    await journal.open()
    bodies = [bytes([65 + n]) * 1000 for n in range(7)]
    for body in bodies:
        await journal.append("whatsapp", body, 1.0)
    assert len(journal._memory) == 2 and journal._memory_bytes == 2000
    assert await drain(journal, limit=2) == bodies
    assert journal._memory == [] and journal._memory_bytes == 0
    await journal.append("whatsapp", b"again", 1.0)  # room again once processed
    assert journal._memory_bytes == 5
    await journal.close()


async def test_seqs_continue_after_every_request_was_processed_and_pruned(cfg):
    journal = SqliteJournal(cfg)
    await journal.open()
    await journal.append("whatsapp", b"a", 1.0)
    [first] = await journal.unprocessed(1)
    await journal.commit_processed(first.seq, [], [])
    await journal.close()
    journal = SqliteJournal(cfg)  # the requests table is empty now
    await journal.open()
    await journal.append("whatsapp", b"b", 1.0)
    [second] = await journal.unprocessed(1)
    assert second.seq > first.seq
    await journal.close()
