"""The default journal: one SQLite file in WAL mode under ``data_dir``, written by one thread."""

from __future__ import annotations

import asyncio
import bisect
import json
import os
import sqlite3
import time
from collections.abc import Sequence

from gateway.config import GatewayConfig
from gateway.journal import DeadLetter, NewEvent, RawRequest, StoredEvent, contact_matcher
from gateway.journal.writer import SqliteWriter, rows_in

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,
    received_at REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, channel TEXT NOT NULL,
    conversation_id TEXT NOT NULL, received_at REAL NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_at ON seen(at);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, event_id TEXT NOT NULL,
    data BLOB NOT NULL, received_at REAL NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'dead', seq INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters(sink, state);
CREATE TABLE IF NOT EXISTS aliases (
    channel TEXT NOT NULL, alias TEXT NOT NULL, contact_id TEXT NOT NULL,
    PRIMARY KEY (channel, alias)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_contact ON aliases(channel, contact_id);
CREATE TABLE IF NOT EXISTS retired_aliases (
    channel TEXT NOT NULL, contact_id TEXT NOT NULL, linked TEXT NOT NULL,
    PRIMARY KEY (channel, contact_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS erasures (
    channel TEXT NOT NULL, contact_id TEXT NOT NULL, upto INTEGER NOT NULL,
    PRIMARY KEY (channel, contact_id)) WITHOUT ROWID;
"""
PROCESSED = "processed"
_APPEND = "INSERT INTO requests(seq, channel, received_at, body) VALUES (?, ?, ?, ?)"
MEMORY_REQUESTS = 10_000  # committed requests also kept in memory for the processor (at most)
MEMORY_BYTES = 32 * 1024 * 1024  # ... and at most this many body bytes (Meta sends up to 3 MB)
_DEAD_COLUMNS = "id, sink, event_id, data, received_at, reason, attempts, failed_at, state, seq"


class SqliteJournal:
    """The :class:`gateway.journal.Journal` on SQLite (WAL, group commit, ``synchronous=FULL``)."""

    shared = False  # one process owns the file: the dispatcher may serve events from memory

    def __init__(self, config: GatewayConfig) -> None:
        self.path = os.path.join(config.server.data_dir, "journal.db")
        self.dedupe_window = config.queue.dedupe_window_seconds
        self.pending = 0
        self.appending = 0  # appends queued for a group commit, not yet settled
        self.committed_seq = 0  # the newest committed request (all before it are committed too)
        # Requests committed by this process and not yet processed, in seq order. While it holds
        # exactly the pending requests, ``unprocessed`` answers from it instead of reading the
        # bodies back (after a restart, or past MEMORY_REQUESTS / MEMORY_BYTES, from the file).
        self._memory: list[RawRequest] = []
        self._memory_bytes = 0
        self._next_seq = 1
        # Erased contacts whose requests up to a seq were journaled before their erasure and
        # not yet processed: (channel, contact_id) -> that seq. Kept until processed past it.
        self._erasures: dict[tuple[str, str], int] = {}
        self._writer = SqliteWriter(
            self.path,
            ["PRAGMA journal_mode=WAL", f"PRAGMA synchronous={config.queue.synchronous}",
             "PRAGMA busy_timeout=10000", "PRAGMA cache_size=-16000"],
            SCHEMA,
        )

    async def open(self) -> None:
        """Create the data directory and the schema; count what is still unprocessed."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._writer.start()
        await self._writer.run(_migrate)
        self.pending, last = await self._writer.run(lambda c: c.execute(
            "SELECT count(*), max(coalesce((SELECT max(seq) FROM requests), 0),"
            " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'requests'), 0))"
            " FROM requests").fetchone())
        self._next_seq = last + 1
        self.committed_seq = last
        self._erasures = {(ch, cid): upto for ch, cid, upto in await self._writer.run(
            lambda c: c.execute("SELECT channel, contact_id, upto FROM erasures").fetchall())}

    async def close(self) -> None:
        """Let queued work finish and close the database."""
        self._writer.stop()

    async def ping(self) -> bool:
        """Whether the database answers."""
        try:
            return await self._writer.run(lambda c: c.execute("SELECT 1").fetchone()[0] == 1)
        except Exception:  # noqa: BLE001 - readiness is a yes/no question
            return False

    def append(self, channel: str, body: bytes, received_at: float) -> asyncio.Future[None]:
        """Store a raw request durably: the future resolves once it is committed (group commit,
        one executemany). Not a coroutine, so the lean listener needs no task to wait for it."""
        seq = self._next_seq  # one process owns the file: seqs are assigned here, in order
        request = RawRequest(seq, channel, received_at, body)
        future = self._writer.submit(_APPEND, request, lambda ok: self._settled(request, ok))
        self._next_seq += 1
        self.appending += 1
        return future

    def _settled(self, request: RawRequest, committed: bool) -> None:
        self.appending -= 1
        if committed:
            self._committed(request)

    def _committed(self, request: RawRequest) -> None:
        self.pending += 1
        self.committed_seq = max(self.committed_seq, request.seq)
        size = len(request.body)
        if len(self._memory) < MEMORY_REQUESTS and self._memory_bytes + size <= MEMORY_BYTES:
            self._memory_bytes += size
            if self._memory and self._memory[-1].seq > request.seq:  # groups settle in order
                bisect.insort(self._memory, request)
            else:
                self._memory.append(request)

    async def unprocessed(self, limit: int) -> list[RawRequest]:
        """The oldest journaled requests not yet turned into events."""
        if len(self._memory) == self.pending:
            return self._memory[:limit]
        rows = await self._writer.run(lambda c: c.execute(
            "SELECT seq, channel, received_at, body FROM requests ORDER BY seq LIMIT ?",
            (limit,)).fetchall())
        return [RawRequest(*row) for row in rows]

    async def commit_processed(self, upto: int, events: list[NewEvent],
                               failed: list[tuple[RawRequest, str]]) -> list[int | None]:
        """Store the events whose ids are new and drop requests up to ``upto``, atomically.

        Returns each event's new sequence number, or None where its id was already seen.
        """
        now = time.time()

        def work(c: sqlite3.Connection) -> tuple[list[int | None], int]:
            seqs = _store_new(c, events, now)
            if failed:
                c.executemany(
                    "INSERT INTO dead_letters(sink, event_id, data, received_at, reason, attempts,"
                    " failed_at) VALUES (?, ?, ?, ?, ?, 1, ?)",
                    [(f"normalise:{req.channel}", f"request:{req.seq}", req.body, req.received_at,
                      reason, now) for req, reason in failed])
            removed = c.execute("DELETE FROM requests WHERE seq <= ?", (upto,)).rowcount
            _set_cursor(c, PROCESSED, upto)
            if passed:
                c.execute("DELETE FROM erasures WHERE upto <= ?", (upto,))
            return seqs, removed

        passed = [key for key, last in self._erasures.items() if last <= upto]
        seqs, removed = await self._writer.run(work)
        for key in passed:
            if self._erasures.get(key, upto + 1) <= upto:  # not erased again meanwhile
                del self._erasures[key]
        self.pending = max(0, self.pending - removed)
        if self._memory and self._memory[0].seq <= upto:
            done = bisect.bisect_right(self._memory, upto, key=lambda r: r.seq)
            self._memory_bytes -= sum(len(r.body) for r in self._memory[:done])
            del self._memory[:done]
        return seqs

    async def events_after(self, seq: int, limit: int) -> list[StoredEvent]:
        """Events with a sequence number above ``seq``, oldest first."""
        rows = await self._writer.run(lambda c: c.execute(
            "SELECT seq, data, received_at FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit)).fetchall())
        return [StoredEvent(*row) for row in rows]

    async def last_event_seq(self) -> int:
        """The newest event's sequence number (0 when none was ever stored)."""
        return await self._writer.run(lambda c: c.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
        ).fetchone()[0])

    async def cursor(self, name: str) -> int | None:
        """A named position (a sink's last delivered event); None when never set."""
        row = await self._writer.run(lambda c: c.execute(
            "SELECT seq FROM cursors WHERE name = ?", (name,)).fetchone())
        return row[0] if row else None

    async def set_cursor(self, name: str, seq: int) -> None:
        """Move a named position forward."""
        await self._writer.run(lambda c: _set_cursor(c, name, seq))

    async def add_dead_letters(self, sink: str, items: list[tuple[StoredEvent, str, str, int]],
                               replacing: Sequence[int] = ()) -> None:
        """Store (event, event id, reason, attempts) tuples a sink gave up on, and delete the
        letters ``replacing`` names (replayed, failed again), in one transaction."""
        now = time.time()

        def work(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO dead_letters(sink, event_id, data, received_at, reason, attempts,"
                " failed_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(sink, eid, ev.data, ev.received_at, reason[:2000], attempts, now, ev.seq)
                 for ev, eid, reason, attempts in items])
            c.executemany("DELETE FROM dead_letters WHERE id = ?", [(i,) for i in replacing])

        await self._writer.run(work)

    async def dead_lettered_after(self, sink: str, seq: int) -> set[int]:
        """The event seqs above ``seq`` that ``sink`` has dead letters for (dead-lettered while
        its cursor had not yet passed them: the worker must not deliver them again)."""
        rows = await self._writer.run(lambda c: c.execute(
            "SELECT seq FROM dead_letters WHERE sink = ? AND seq > ?", (sink, seq)).fetchall())
        return {row[0] for row in rows}

    async def dead_letters(self, sink: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally of one sink."""
        where, args = ("WHERE sink = ?", (sink, limit)) if sink else ("", (limit,))
        rows = await self._writer.run(lambda c: c.execute(
            f"SELECT {_DEAD_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT ?",
            args).fetchall())
        return [DeadLetter(*row) for row in rows]

    async def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters per sink (those waiting for replay included)."""
        rows = await self._writer.run(lambda c: c.execute(
            "SELECT sink, count(*) FROM dead_letters GROUP BY sink").fetchall())
        return dict(rows)

    async def request_replay(self, sink: str | None = None, ids: list[int] | None = None) -> int:
        """Mark dead letters for redelivery by the running gateway; return how many."""
        clauses, args = ["state = 'dead'"], []
        if sink:
            clauses.append("sink = ?")
            args.append(sink)
        if ids:
            clauses.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        sql = f"UPDATE dead_letters SET state = 'replay' WHERE {' AND '.join(clauses)}"
        return await self._writer.run(lambda c: c.execute(sql, args).rowcount)

    async def replays_due(self, sink: str, limit: int) -> list[DeadLetter]:
        """Dead letters marked for replay, oldest first. They stay in the store until
        :meth:`finish_replays`, so a crash before they are redelivered replays them again."""
        rows = await self._writer.run(lambda c: c.execute(
            f"SELECT {_DEAD_COLUMNS} FROM dead_letters WHERE sink = ? AND state = 'replay' "
            "ORDER BY id LIMIT ?", (sink, limit)).fetchall())
        return [DeadLetter(*row) for row in rows]

    async def finish_replays(self, ids: list[int]) -> None:
        """Delete replayed dead letters (redelivered, or dead-lettered anew)."""
        if ids:
            await self._writer.run(lambda c: c.executemany(
                "DELETE FROM dead_letters WHERE id = ?", [(i,) for i in ids]))

    async def prune(self, now: float) -> None:
        """Forget ids older than the de-duplication window and events every sink has passed."""
        def work(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM seen WHERE at < ?", (now - self.dedupe_window,))
            low = c.execute(
                "SELECT min(seq) FROM cursors WHERE name LIKE 'sink:%'").fetchone()[0]
            if low is not None:
                c.execute("DELETE FROM events WHERE seq <= ?", (low,))

        await self._writer.run(work)

    async def forget_cursors(self, keep: set[str]) -> None:
        """Drop the cursors of sinks no longer configured, so they do not pin old events."""
        names = [f"sink:{n}" for n in keep]
        marks = ",".join("?" * len(names)) or "''"
        await self._writer.run(lambda c: c.execute(
            f"DELETE FROM cursors WHERE name LIKE 'sink:%' AND name NOT IN ({marks})", names))

    async def learn_aliases(self, pairs: dict[tuple[str, str], str]) -> None:
        """Store (channel, alias) -> customer id pairs (:mod:`gateway.identities`)."""
        rows = [(channel, alias, contact) for (channel, alias), contact in pairs.items()]
        await self._writer.run(lambda c: c.executemany(
            "INSERT INTO aliases(channel, alias, contact_id) VALUES (?, ?, ?) ON CONFLICT"
            " DO UPDATE SET contact_id = excluded.contact_id", rows))

    async def aliases(self, keys: list[tuple[str, str]], *,
                      wait: bool = True) -> dict[tuple[str, str], str]:
        """The customer ids of the (channel, alias) keys that are known (``wait`` is the Redis
        journal's: this one never waits out an outage)."""
        def work(c: sqlite3.Connection) -> dict[tuple[str, str], str]:
            found = {}
            for key in keys:
                row = c.execute("SELECT contact_id FROM aliases WHERE channel = ? AND alias = ?",
                                key).fetchone()
                if row is not None:
                    found[key] = row[0]
            return found

        return await self._writer.run(work)

    async def retire_aliases(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure, between two batches: drop the pairs naming any of ``contact_ids`` either way,
        and add to each id's record the others, until :meth:`forget_retired` (so a repeat of a
        failed erasure still finds each id's others, :meth:`retired_with`). A record only grows
        here: an unfinished erasure's ids stay in it whatever other erasures do meanwhile."""
        def work(c: sqlite3.Connection) -> None:
            for one in contact_ids:
                c.execute("DELETE FROM aliases WHERE channel = ? AND (alias = ? OR contact_id = ?)",
                          (channel, one, one))
                linked = set(contact_ids) - {one} | set(_retired(c, channel, one))
                if linked:
                    c.execute("INSERT INTO retired_aliases(channel, contact_id, linked) VALUES "
                              "(?, ?, ?) ON CONFLICT DO UPDATE SET linked = excluded.linked",
                              (channel, one, json.dumps(sorted(linked))))

        await self._writer.run(work)

    async def retired_with(self, channel: str, contact_id: str) -> list[str]:
        """The ids retired with ``contact_id`` by an erasure not yet finished."""
        return await self._writer.run(lambda c: _retired(c, channel, contact_id))

    async def forget_retired(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure, once every sink has erased ``contact_ids``: take them out of those ids'
        records; a record left empty goes (one that names an id erased by no finished erasure
        stays, for that id's repeat)."""
        erased = set(contact_ids)

        def work(c: sqlite3.Connection) -> None:
            for one in contact_ids:
                left = set(_retired(c, channel, one)) - erased
                if left:
                    c.execute("UPDATE retired_aliases SET linked = ? WHERE channel = ? AND "
                              "contact_id = ?", (json.dumps(sorted(left)), channel, one))
                else:
                    c.execute("DELETE FROM retired_aliases WHERE channel = ? AND contact_id = ?",
                              (channel, one))

        await self._writer.run(work)

    async def aliases_of(self, channel: str, contact_id: str) -> list[str]:
        """The aliases seen beside ``contact_id`` (an erasure erases them with it)."""
        return [row[0] for row in await self._writer.run(lambda c: c.execute(
            "SELECT alias FROM aliases WHERE channel = ? AND contact_id = ?",
            (channel, contact_id)).fetchall())]

    async def erasures(self) -> dict[tuple[str, str], int]:
        """Erased contacts whose events the processor must drop: (channel, contact_id) -> the
        newest request seq journaled before the erasure (see :meth:`erase_contact`)."""
        return self._erasures

    async def erase_contact(self, channel: str, *contact_ids: str) -> dict[str, int]:
        """GDPR: delete the contacts' events and dead letters (one person's ids, in one pass);
        return how many of each.

        Requests journaled before the erasure and not yet processed (a lagging processor; appends
        still in their group commit) are not rewritten: the erasure is recorded instead, and the
        processor drops the contacts' events of every request up to the newest one appended so
        far (:meth:`erasures`). The record goes once the processor has passed that request.

        An event belongs to a contact when its channel matches and its customer (the sender of
        inbound events, the recipient of outbound ones) is one of ``contact_ids``. A dead letter
        that is not an event (a raw request the channel could not normalise) is deleted when it
        came from ``channel`` and its body holds one of them as a JSON string (their aliases go
        with :meth:`retire_aliases`). The de-duplication ids (``seen``) stay: they are opaque
        hashes, and keep a redelivered old payload a duplicate.
        """
        mine = contact_matcher(channel, *contact_ids)
        # conversation ids end with the customer
        suffixes = sorted({":" + one.replace("/", "_") for one in contact_ids})
        where = " OR ".join("substr(conversation_id, ?) = ?" for _ in suffixes)
        args = [channel, *(x for suffix in suffixes for x in (-len(suffix), suffix))]

        def work(c: sqlite3.Connection) -> dict[str, int]:
            rows = c.execute(f"SELECT seq, data FROM events WHERE channel = ? AND ({where})",
                             args).fetchall()
            events = [(seq,) for seq, data in rows if mine(data, "")]
            c.executemany("DELETE FROM events WHERE seq = ?", events)
            dead = [(i,) for i, sink, data in c.execute("SELECT id, sink, data FROM dead_letters")
                    if mine(data, sink)]
            c.executemany("DELETE FROM dead_letters WHERE id = ?", dead)
            if holding:
                c.executemany("INSERT INTO erasures(channel, contact_id, upto) VALUES (?, ?, ?) "
                              "ON CONFLICT DO UPDATE SET upto = max(upto, excluded.upto)",
                              [(channel, one, newest) for one in contact_ids])
            return {"events": len(events), "dead_letters": len(dead)}

        newest = self._next_seq - 1  # every request appended so far, committed or not yet
        holding = bool(self.pending or self.appending)  # some may hold the contacts' events
        result = await self._writer.run(work)
        await self._writer.truncate_wal()  # it still holds the deleted rows' pages as they were
        if holding:
            for one in contact_ids:
                key = (channel, one)
                self._erasures[key] = max(self._erasures.get(key, 0), newest)
        return result


def _retired(c: sqlite3.Connection, channel: str, contact_id: str) -> list[str]:
    row = c.execute("SELECT linked FROM retired_aliases WHERE channel = ? AND contact_id = ?",
                    (channel, contact_id)).fetchone()
    return json.loads(row[0]) if row else []


def _store_new(c: sqlite3.Connection, events: list[NewEvent], now: float) -> list[int | None]:
    """Insert the events whose ids were never seen (nor earlier in ``events``); their new seqs."""
    if not events:
        return []
    seen = {row[0] for row in rows_in(c, "SELECT id FROM seen WHERE id IN ({marks})",
                                      list({ev.id for ev in events}))}
    fresh = []
    for ev in events:
        if ev.id not in seen:
            seen.add(ev.id)
            fresh.append(ev)
    if not fresh:
        return [None] * len(events)
    first = c.execute("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0)"
                      ).fetchone()[0] + 1
    c.executemany("INSERT INTO seen(id, at) VALUES (?, ?)", [(ev.id, now) for ev in fresh])
    c.executemany("INSERT INTO events(seq, id, channel, conversation_id, received_at, data) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  [(first + i, ev.id, ev.channel, ev.conversation_id, ev.received_at, ev.data)
                   for i, ev in enumerate(fresh)])
    assigned = {id(ev): first + i for i, ev in enumerate(fresh)}
    return [assigned.get(id(ev)) for ev in events]


def _migrate(c: sqlite3.Connection) -> None:
    """Bring a journal made by an earlier version up to this schema."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(dead_letters)")}
    if "seq" not in columns:  # the event's seq, for dead_lettered_after (0 = unknown)
        c.execute("ALTER TABLE dead_letters ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")


def _set_cursor(c: sqlite3.Connection, name: str, seq: int) -> None:
    c.execute("INSERT INTO cursors(name, seq) VALUES (?, ?) ON CONFLICT(name) DO UPDATE "
              "SET seq = max(seq, excluded.seq)", (name, seq))
