"""The SQLite writer thread: a failed group settles every job, each with its own exception, and a
connection whose ROLLBACK fails is replaced instead of ending the thread with jobs unsettled."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading

import pytest

from gateway.journal.writer import SqliteWriter

SCHEMA = "CREATE TABLE IF NOT EXISTS t (v INTEGER NOT NULL);"
INSERT = "INSERT INTO t(v) VALUES (?)"


def deny(*statements: str):
    """A job that makes SQLite itself refuse ``statements`` (COMMIT, ROLLBACK) on the writer's
    connection from then on: the failures the writer must survive, raised by SQLite."""
    def install(c: sqlite3.Connection) -> None:
        def authorizer(action, arg1, *_):
            if action == sqlite3.SQLITE_TRANSACTION and arg1 in statements:
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        c.set_authorizer(authorizer)
    return install


@pytest.fixture
def writer(tmp_path):
    w = SqliteWriter(str(tmp_path / "w.db"), ["PRAGMA journal_mode=WAL"], SCHEMA)
    w.start()
    yield w
    w.stop()


def values(w: SqliteWriter):
    return w.run(lambda c: sorted(r[0] for r in c.execute("SELECT v FROM t")))


async def one_group(writer: SqliteWriter, job, rows: list[int]) -> list:
    """Run ``job`` and insert ``rows`` in one group transaction: the writer is held busy while
    they queue, so that it takes them together."""
    gate = threading.Event()
    held = asyncio.ensure_future(writer.run(lambda c: gate.wait(5)))
    await asyncio.sleep(0.05)  # the writer is inside the holding job
    queued = [asyncio.ensure_future(writer.run(job))]
    await asyncio.sleep(0)  # queued behind it
    queued += [writer.submit(INSERT, (v,)) for v in rows]
    gate.set()
    await held
    return await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)


async def test_a_failed_commit_fails_each_job_with_its_own_exception(writer):
    await writer.run(lambda c: c.execute(INSERT, (1,)))
    results = await one_group(writer, deny("COMMIT"), [2, 3])  # COMMIT refused: all fail
    assert all(isinstance(r, sqlite3.DatabaseError) for r in results), results
    assert len({id(r) for r in results}) == 3  # distinct objects, same type and message
    assert len({str(r) for r in results}) == 1
    await writer.run(lambda c: c.set_authorizer(None))
    assert await values(writer) == [1]  # the failed group left nothing behind


async def test_a_failed_rollback_reopens_the_database_and_the_writer_goes_on(writer):
    await writer.run(lambda c: c.execute(INSERT, (1,)))
    results = await one_group(writer, deny("COMMIT", "ROLLBACK"), [2])  # neither can run
    assert all(isinstance(r, sqlite3.DatabaseError) for r in results), results
    assert writer.alive
    await asyncio.wait_for(writer.submit(INSERT, (3,)), 5)  # a new connection, no authorizer
    assert await values(writer) == [1, 3]  # the group that could not roll back wrote nothing


async def test_jobs_queued_when_the_thread_ends_are_failed_not_left_waiting(tmp_path):
    (tmp_path / "gone").mkdir()
    w = SqliteWriter(str(tmp_path / "gone" / "w.db"), ["PRAGMA journal_mode=WAL"], SCHEMA)
    w.start()
    await w.run(lambda c: c.execute(INSERT, (1,)))
    shutil.rmtree(tmp_path / "gone")  # the file can no longer be opened again
    # ... and this connection cannot roll back; more jobs queue behind the group that fails
    results = await one_group(w, deny("COMMIT", "ROLLBACK"), [2, 3])
    later = [w.submit(INSERT, (v,)) for v in range(4, 50) if w.alive]
    results += await asyncio.wait_for(asyncio.gather(*later, return_exceptions=True), 5)
    assert all(isinstance(r, Exception) for r in results), results
    for _ in range(100):
        if not w.alive:
            break
        await asyncio.sleep(0.01)
    assert not w.alive
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(INSERT, (99,))
    w.stop()


async def test_a_truncation_in_the_group_that_ends_the_thread_is_failed_not_left_waiting(
        tmp_path):
    (tmp_path / "gone").mkdir()
    w = SqliteWriter(str(tmp_path / "gone" / "w.db"), ["PRAGMA journal_mode=WAL"], SCHEMA)
    w.start()
    gate = threading.Event()
    held = asyncio.ensure_future(w.run(lambda c: gate.wait(5)))
    await asyncio.sleep(0.05)  # the writer is inside the holding job: the rest form one group
    shutil.rmtree(tmp_path / "gone")  # ... whose ROLLBACK fails, and which cannot reopen
    failing = asyncio.ensure_future(w.run(deny("COMMIT", "ROLLBACK")))
    await asyncio.sleep(0)
    truncation = asyncio.ensure_future(w.truncate_wal())
    await asyncio.sleep(0)
    gate.set()
    await held
    results = await asyncio.wait_for(asyncio.gather(failing, truncation,
                                                    return_exceptions=True), 5)
    assert all(isinstance(r, Exception) for r in results), results
    w.stop()


async def test_truncate_wal_empties_it_and_gives_up_at_once_on_another_process_reader(tmp_path):
    path = tmp_path / "w.db"
    w = SqliteWriter(str(path), ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=10000"], SCHEMA)
    w.start()
    try:
        assert await w.run(lambda c: c.execute("PRAGMA secure_delete").fetchone()[0]) == 1
        await asyncio.gather(*(w.submit(INSERT, (v,)) for v in range(100)))
        wal = tmp_path / "w.db-wal"
        assert wal.stat().st_size > 0
        reader = sqlite3.connect(path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()  # holds a snapshot of the WAL
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await w.truncate_wal() is False  # within its short timeout, not the 10 s
        assert loop.time() - started < 2
        # a truncation queued with other jobs runs outside their transaction, after it
        queued = [w.submit(INSERT, (v,)) for v in (100, 101)]
        reader.rollback()
        assert await w.truncate_wal() is True
        await asyncio.gather(*queued)
        assert wal.stat().st_size == 0
        assert await w.run(lambda c: c.execute("PRAGMA busy_timeout").fetchone()[0]) == 10000
        assert len(await values(w)) == 102
        reader.close()
    finally:
        w.stop()
