"""One SQLite connection owned by one thread; jobs from the event loop share its transactions.

Every job that arrives while the previous transaction commits joins the next one, so N concurrent
appends cost one fsync (group commit). Plain inserts (:meth:`SqliteWriter.submit`) of a group are
written with one ``executemany`` per statement; every other job runs under a SAVEPOINT, so one
failing job cannot spoil the others' writes.

Every database opened here holds customers' data, so ``secure_delete`` is on whatever the SQLite
build's default: a deleted row's bytes are overwritten, not left in free space. After an erasure,
:meth:`SqliteWriter.truncate_wal` also empties the WAL file, which still holds the pages as they
were before the deletion.
"""

from __future__ import annotations

import asyncio
import copy
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from gateway import logging as gwlog

log = gwlog.get("gateway.sqlite")
T = TypeVar("T")
Job = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future, asyncio.AbstractEventLoop]
MAX_GROUP = 2000
# Under load (the last group held more than one job) the writer waits this long before taking the
# next group, so that more rows share one commit and one fsync; an idle writer commits at once.
# Measured with bench/ingest.py's load: about 4 appends per commit without it, +10% throughput.
COMMIT_DELAY = 0.001
TRUNCATE_BUSY_MS = 250  # a WAL truncation waits at most this long for another process's readers


class _Outside:
    """A job run after its group's commit, outside any transaction (a WAL checkpoint)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn


class SqliteWriter:
    """Serialises all work on one SQLite database through one thread."""

    def __init__(self, path: str, pragmas: list[str], schema: str) -> None:
        self._path = path
        self._pragmas = pragmas
        self._schema = schema
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._busy = False  # the last group held more than one job
        self._dead = False  # the thread has ended: nothing queued will ever run

    def start(self) -> None:
        """Open the database in the writer thread; raise what opening raised."""
        self._thread = threading.Thread(target=self._run, name=f"sqlite:{self._path}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs."""
        # not Thread.is_alive(): it takes a lock, and every append asks (2% of the event loop)
        return self._thread is not None and not self._dead

    def submit(self, sql: str, params: tuple,
               on_settle: Callable[[bool], None] | None = None) -> asyncio.Future[None]:
        """Queue one row for the next group transaction (batched with the group's other inserts
        of the same ``sql``); the future resolves once it is committed.

        Not a coroutine: a caller may await the future, or add a callback to it (the lean
        listener answers a webhook from its callback, without a task per request).
        ``on_settle(committed)`` runs on the event loop once the row's group is settled, before
        the future resolves, and even when the future was cancelled meanwhile (bookkeeping that
        must not miss a committed row).
        """
        if not self.alive:
            raise RuntimeError(f"database {self._path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.put(((sql, params, on_settle), future, loop))
        if self._dead:  # ended between the check and the put: settle what it left queued
            self._fail_queued()
        return future

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the next group transaction; return its result once committed."""
        if not self.alive:
            raise RuntimeError(f"database {self._path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, future, loop))
        if self._dead:
            self._fail_queued()
        return await future

    async def truncate_wal(self) -> bool:
        """Copy the WAL into the database and truncate it to nothing; whether that was done (not
        when another process was reading the database for longer than ``TRUNCATE_BUSY_MS``).
        An erasure calls it: the WAL keeps the deleted rows' pages as they were."""
        if not self.alive:
            raise RuntimeError(f"database {self._path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._jobs.put((_Outside(_truncate), future, loop))
        if self._dead:
            self._fail_queued()
        done = await future
        if not done:
            log.warning("wal_not_truncated", path=self._path,
                        detail="another process is reading the database; the WAL still holds "
                               "the deleted rows' old pages until SQLite reuses them")
        return done

    def stop(self) -> None:
        """Finish queued jobs, close the connection and join the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA secure_delete=ON")
        for pragma in self._pragmas:
            conn.execute(pragma)
        conn.executescript(self._schema)
        return conn

    def _run(self) -> None:
        try:
            self._conn = self._connect()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._dead = True
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._loop_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - the database could not be reopened
            self._error = exc
            log.error("sqlite_writer_stopped", path=self._path, error=repr(exc))
        finally:
            self._conn.close()
            self._dead = True
            self._fail_queued()  # whatever was queued behind a stop, or behind a fatal error

    def _fail_queued(self) -> None:
        """Settle every queued job with an error (the thread has ended; none will run)."""
        items: list[Job] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                items.append(job)
        if items:
            why = f": {self._error!r}" if self._error else ""
            closed = RuntimeError(f"database {self._path} is closed{why}")
            self._settle_all(items, [(False, copy.copy(closed)) for _ in items])

    def _loop_once(self) -> bool:
        first = self._jobs.get()
        if first is None:
            return False
        if self._busy:
            time.sleep(COMMIT_DELAY)  # under load: let the group fill (one fsync for more rows)
        group = [first]
        stop = False
        while len(group) < MAX_GROUP:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            group.append(job)
        self._busy = len(group) > 1
        self._commit_group(group)
        return not stop

    def _commit_group(self, group: list[Job]) -> None:
        outside = [job for job in group if isinstance(job[0], _Outside)]
        if outside:
            group = [job for job in group if not isinstance(job[0], _Outside)]
        try:
            if group:
                self._commit_jobs(group)
        except BaseException as exc:  # the connection could not be reopened: the thread ends
            self._settle_all(outside, [(False, copy.copy(exc)) for _ in outside])
            raise
        if outside:
            self._settle_all(outside, [_run_outside(self._conn, job.fn) for job, _, _ in outside])

    def _commit_jobs(self, group: list[Job]) -> None:
        conn = self._conn
        outcomes: list[tuple[bool, Any]] = []
        broken = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            _insert_all(conn, [job for job, _, _ in group if isinstance(job, tuple)])
            for job, _, _ in group:
                outcomes.append((True, None) if isinstance(job, tuple) else _savepoint(conn, job))
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - the commit itself failed: fail every job
            # one exception object each: every awaiter raises its own (tracebacks do not pile up)
            outcomes = [(False, copy.copy(exc)) for _ in group]
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except BaseException:  # noqa: BLE001 - the group is settled first, then reopened
                broken = True
        self._settle_all(group, outcomes)
        if broken:
            self._reopen()

    def _reopen(self) -> None:
        """After a ROLLBACK that failed, the connection's state is unknown: close it (SQLite drops
        what the transaction wrote) and open a new one. If that fails too, the thread ends and
        every queued job is failed (:meth:`_run`)."""
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        self._conn = self._connect()

    def _settle_all(self, group: list[Job], outcomes: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (job, future, loop), outcome in zip(group, outcomes, strict=True):
            on_settle = job[2] if isinstance(job, tuple) else None
            by_loop.setdefault(loop, []).append((future, outcome, on_settle))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, items)


def _insert_all(conn: sqlite3.Connection, rows: list[tuple]) -> None:
    by_sql: dict[str, list[tuple]] = {}
    for sql, params, _ in rows:
        by_sql.setdefault(sql, []).append(params)
    for sql, params in by_sql.items():
        conn.executemany(sql, params)


def _savepoint(conn: sqlite3.Connection,
               fn: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
    conn.execute("SAVEPOINT job")
    try:
        result = fn(conn)
    except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return False, exc
    conn.execute("RELEASE job")
    return True, result


def _run_outside(conn: sqlite3.Connection,
                 fn: Callable[[sqlite3.Connection], Any]) -> tuple[bool, Any]:
    try:
        return True, fn(conn)
    except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
        return False, exc


def _truncate(conn: sqlite3.Connection) -> bool:
    """``wal_checkpoint(TRUNCATE)`` with a short busy timeout (readers of another process make it
    wait: the writer thread must not stall the journal for the configured 10 s)."""
    timeout = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute(f"PRAGMA busy_timeout={min(timeout, TRUNCATE_BUSY_MS)}")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout={timeout}")
    return busy == 0


def _settle(items: list[tuple[asyncio.Future, tuple[bool, Any],
                              Callable[[bool], None] | None]]) -> None:
    for future, (ok, value), on_settle in items:
        if on_settle is not None:
            on_settle(ok)  # before the caller resumes, and even if it was cancelled
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def rows_in(conn: sqlite3.Connection, sql: str, keys: Sequence[Any],
            chunk: int = 500) -> Iterator[tuple]:
    """The rows of ``sql`` for ``keys``, whose ``{marks}`` is filled with as many ``?`` as a
    chunk of keys holds (SQLite limits the parameters of one statement)."""
    for start in range(0, len(keys), chunk):
        part = keys[start:start + chunk]
        yield from conn.execute(sql.format(marks=",".join("?" * len(part))), part)
