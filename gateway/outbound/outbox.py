"""The durable outbox: every accepted send is stored before the 202, then sent exactly once.

States: ``queued`` → ``sending`` → ``sent`` → ``delivered`` → ``read`` (or ``failed``). A record
moves only forward. After a crash, records left in ``sending`` may or may not have reached Meta:
they become ``uncertain`` and wait ``reconcile_seconds`` for a status webhook that names them
(WhatsApp echoes the outbox id as ``biz_opaque_callback_data``); only when none arrives are they
sent again. Records still ``queued`` are simply sent.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from typing import Any, NamedTuple

import msgspec

from gateway.journal.writer import SqliteWriter

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, channel TEXT NOT NULL,
    account_id TEXT NOT NULL, recipient TEXT NOT NULL, type TEXT NOT NULL, request BLOB NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
    provider_message_id TEXT, error TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    sent_at REAL, superseded TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(channel, account_id, state, next_at);
CREATE INDEX IF NOT EXISTS outbox_provider ON outbox(provider_message_id);
CREATE TABLE IF NOT EXISTS customers (
    channel TEXT NOT NULL, account_id TEXT NOT NULL, contact_id TEXT NOT NULL,
    last_inbound_at REAL, last_inbound_message_id TEXT, opted_out INTEGER NOT NULL DEFAULT 0,
    opted_out_at REAL, PRIMARY KEY (channel, account_id, contact_id)) WITHOUT ROWID;
"""
# A status naming a send that a failed status webhook made us replace (``requeue``): the
# provider ids of those sends, one per line, in ``superseded``; ``?`` is the status's provider id.
_SUPERSEDED = "instr(char(10) || coalesce(superseded, '') || char(10), char(10) || ? || char(10))"
# The latest word on consent wins, by the time it was said (webhooks arrive in any order).
_NEWER_CONSENT = "excluded.opted_out_at >= coalesce(opted_out_at, -1e300)"

RANK = {"queued": 0, "sending": 0, "uncertain": 0, "sent": 1, "delivered": 2, "read": 3,
        "played": 3, "failed": 9}
_COLUMNS = ("id, idempotency_key, channel, account_id, recipient, type, request, state, attempts, "
            "next_at, provider_message_id, error, created_at, updated_at, sent_at")


class Row(NamedTuple):
    id: str
    idempotency_key: str | None
    channel: str
    account_id: str
    recipient: str
    type: str
    request: bytes
    state: str
    attempts: int
    next_at: float
    provider_message_id: str | None
    error: str | None
    created_at: float
    updated_at: float
    sent_at: float | None

    def stored_error(self) -> dict[str, Any] | None:
        """The error stored on the record (kept when it is rescheduled), None when none is."""
        if not self.error:
            return None
        try:
            found = msgspec.json.decode(self.error)
        except msgspec.DecodeError:
            return None
        return found if isinstance(found, dict) else None

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/messages/{id}`` shows."""
        state = "queued" if self.state in ("sending", "uncertain") else self.state
        return {"id": self.id, "status": state, "channel": self.channel,
                "account_id": self.account_id, "to": self.recipient, "type": self.type,
                "provider_message_id": self.provider_message_id, "attempts": self.attempts,
                "error": msgspec.json.decode(self.error) if self.error else None,
                "created_at": self.created_at, "sent_at": self.sent_at}


class Customer(NamedTuple):
    last_inbound_at: float | None
    last_inbound_message_id: str | None
    opted_out: bool
    opted_out_at: float | None = None  # when the customer (or Meta) last said so (epoch s)


class Outbox:
    """The outbox database (``<data_dir>/outbox.db``), one writer thread."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, "outbox.db")
        self._db = SqliteWriter(self.path, ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                                            "PRAGMA busy_timeout=10000"], SCHEMA)

    async def open(self, reconcile_seconds: float) -> int:
        """Open; turn records a crash left in ``sending`` into ``uncertain``. Returns how many."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._db.start()
        at = time.time() + reconcile_seconds

        def work(c: sqlite3.Connection) -> int:
            columns = {r[1] for r in c.execute("PRAGMA table_info(customers)")}
            if "opted_out_at" not in columns:  # a database made before consent had a time
                c.execute("ALTER TABLE customers ADD COLUMN opted_out_at REAL")
            columns = {r[1] for r in c.execute("PRAGMA table_info(outbox)")}
            if "superseded" not in columns:  # a database made before requeue remembered them
                c.execute("ALTER TABLE outbox ADD COLUMN superseded TEXT")
            return c.execute("UPDATE outbox SET state = 'uncertain', next_at = ? "
                             "WHERE state = 'sending'", (at,)).rowcount

        return await self._db.run(work)

    async def close(self) -> None:
        self._db.stop()

    async def add(self, channel: str, account_id: str, recipient: str, kind: str,
                  request: bytes, idempotency_key: str | None) -> tuple[Row, bool]:
        """Store a new send (durably); with a known idempotency key, return the existing one.
        The bool says whether the record is new."""
        now = time.time()
        new_id = "msg_" + uuid.uuid4().hex

        def work(c: sqlite3.Connection) -> tuple[Row, bool]:
            if idempotency_key:
                row = c.execute(f"SELECT {_COLUMNS} FROM outbox WHERE idempotency_key = ?",
                                (idempotency_key,)).fetchone()
                if row:
                    return Row(*row), False
            c.execute(f"INSERT INTO outbox({_COLUMNS}) "
                      "VALUES (?,?,?,?,?,?,?,'queued',0,?,NULL,NULL,?,?,NULL)",
                      (new_id, idempotency_key, channel, account_id, recipient, kind, request, now,
                       now, now))
            return Row(*c.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?",
                                  (new_id,)).fetchone()), True

        return await self._db.run(work)

    async def by_key(self, idempotency_key: str) -> Row | None:
        """The record an idempotency key was first given to, if any."""
        row = await self._db.run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE idempotency_key = ?",
            (idempotency_key,)).fetchone())
        return Row(*row) if row else None

    async def get(self, record_id: str) -> Row | None:
        row = await self._db.run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (record_id,)).fetchone())
        return Row(*row) if row else None

    async def claim_due(self, channel: str, account_id: str, limit: int) -> list[Row]:
        """Due records of one account, oldest first, moved to ``sending``."""
        now = time.time()

        def work(c: sqlite3.Connection) -> list[Row]:
            rows = [Row(*r) for r in c.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE channel = ? AND account_id = ? AND state IN "
                "('queued', 'uncertain') AND next_at <= ? ORDER BY next_at, created_at LIMIT ?",
                (channel, account_id, now, limit))]
            c.executemany("UPDATE outbox SET state = 'sending', attempts = attempts + 1, "
                          "updated_at = ? WHERE id = ?", [(now, r.id) for r in rows])
            return rows

        return await self._db.run(work)

    async def next_due(self, channel: str, account_id: str) -> float | None:
        """When the account's next record falls due (epoch s), or None."""
        return await self._db.run(lambda c: c.execute(
            "SELECT min(next_at) FROM outbox WHERE channel = ? AND account_id = ? AND state IN "
            "('queued', 'uncertain')", (channel, account_id)).fetchone()[0])

    async def sent(self, record_id: str, provider_message_id: str | None,
                   max_attempts: int | None = None) -> str:
        """Meta accepted the send: ``sent``, or what the record became instead. A record a
        status webhook settled first (failed, delivered) keeps its state and error (``kept``).
        If Meta failed this very send before answering (a retryable failed status, which
        :meth:`requeue` noted in ``superseded``), the record is ``queued`` to be sent again, or
        ``failed`` (with that error) when ``max_attempts`` sends were made."""
        now = time.time()

        def work(c: sqlite3.Connection) -> str:
            if provider_message_id and c.execute(
                    f"SELECT 1 FROM outbox WHERE id = ? AND {_SUPERSEDED} > 0",
                    (record_id, provider_message_id)).fetchone():
                row = c.execute(
                    "UPDATE outbox SET state = CASE WHEN ? IS NOT NULL AND attempts >= ? "
                    "THEN 'failed' ELSE 'queued' END, next_at = ?, updated_at = ? WHERE id = ? "
                    "AND state IN ('sending', 'uncertain', 'queued') RETURNING state",
                    (max_attempts, max_attempts, now, now, record_id)).fetchone()
                return row[0] if row else "kept"
            moved = c.execute(
                "UPDATE outbox SET state = 'sent', provider_message_id = coalesce("
                "provider_message_id, ?), sent_at = coalesce(sent_at, ?), updated_at = ?, "
                "error = NULL WHERE id = ? AND state IN ('sending', 'uncertain', 'queued')",
                (provider_message_id, now, now, record_id)).rowcount
            if moved:
                return "sent"
            c.execute("UPDATE outbox SET provider_message_id = coalesce(provider_message_id, ?), "
                      "sent_at = coalesce(sent_at, ?), updated_at = ? WHERE id = ?",
                      (provider_message_id, now, now, record_id))
            return "kept"

        return await self._db.run(work)

    async def failed(self, record_id: str, error: dict[str, Any],
                     attempts: int | None = None) -> None:
        """Fail the record. ``attempts``: the sends made, when the claim counted one that was
        not made (a record given up before its send)."""
        now = time.time()
        await self._db.run(lambda c: c.execute(
            "UPDATE outbox SET state = 'failed', error = ?, updated_at = ?, "
            "attempts = coalesce(?, attempts) WHERE id = ?",
            (msgspec.json.encode(error), now, attempts, record_id)))

    async def retry_at(self, record_id: str, at: float, error: dict[str, Any] | None,
                       count_attempt: bool = True) -> None:
        now = time.time()
        await self._db.run(lambda c: c.execute(
            "UPDATE outbox SET state = 'queued', next_at = ?, updated_at = ?, error = ?, "
            "attempts = attempts - ? WHERE id = ? AND state IN ('queued', 'sending', 'uncertain')",
            (at, now, msgspec.json.encode(error) if error else None, 0 if count_attempt else 1,
             record_id)))

    async def status(self, *, provider_message_id: str | None, record_id: str | None, status: str,
                     error: dict[str, Any] | None) -> Row | None:
        """A delivery status from a webhook: move the record forward (never backwards).
        Returns the record as moved, or None when it did not move (unknown, or a status it is
        already past: e.g. a redelivered webhook).

        A status of a send that :meth:`requeue` replaced (its provider id is one the record
        superseded) moves nothing: that send failed, and the record is queued or sent again;
        a late ``sent`` of it must not cancel (or be taken for) the new send."""
        if status not in RANK:
            return None
        now = time.time()
        rank_sql = " ".join(f"WHEN '{s}' THEN {r}" for s, r in RANK.items())

        def work(c: sqlite3.Connection) -> Row | None:
            where, arg = ("id = ?", record_id) if record_id else ("provider_message_id = ?",
                                                                   provider_message_id)
            row = c.execute(
                f"UPDATE outbox SET state = ?, updated_at = ?, error = coalesce(?, error), "
                f"provider_message_id = coalesce(provider_message_id, ?), "
                f"sent_at = coalesce(sent_at, ?) WHERE {where} AND "
                f"(CASE state {rank_sql} ELSE 0 END) < (CASE ? {rank_sql} ELSE 0 END) "
                f"AND (? IS NULL OR {_SUPERSEDED} = 0) "
                f"RETURNING {_COLUMNS}",
                (status, now, msgspec.json.encode(error) if error else None, provider_message_id,
                 now, arg, status, provider_message_id, provider_message_id)).fetchone()
            return Row(*row) if row else None

        return await self._db.run(work)

    async def requeue(self, *, record_id: str | None, provider_message_id: str, at: float,
                      error: dict[str, Any], final_error: dict[str, Any],
                      max_attempts: int) -> Row | None:
        """Meta failed a message it had accepted, with an error worth retrying (a failed status
        webhook): send it again at ``at``, or fail it when ``max_attempts`` sends were made.

        Only a ``sent`` record whose provider id is ``provider_message_id`` moves (a redelivered
        status of an earlier send changes nothing). One named by ``record_id`` whose send is
        still in flight (the status came before Meta's answer) only notes that provider id as
        failed, with ``error``: :meth:`sent` queues it again if the answer is that send's (the
        send in flight may be a later one, after a timeout: then it is simply sent). A moved
        record forgets its provider id, so the next send's is
        kept, and remembers it as superseded, so that a late status of that send (its ``sent``
        may arrive after its ``failed``) moves nothing (:meth:`status`). ``final_error`` is
        stored when it fails. Returns the record as it is now (``queued``, ``failed``, or still
        ``sending`` with the failure noted), or None."""
        now = time.time()
        encoded, final = msgspec.json.encode(error), msgspec.json.encode(final_error)

        def work(c: sqlite3.Connection) -> Row | None:
            where = "id = :arg" if record_id else "provider_message_id = :arg"
            arg = record_id or provider_message_id
            if record_id is not None:  # in flight, no answer yet: note the failed send
                row = c.execute(
                    "UPDATE outbox SET updated_at = ?, error = ?, "
                    "superseded = coalesce(superseded || char(10), '') || ? "
                    "WHERE id = ? AND state IN ('sending', 'uncertain') "
                    f"AND provider_message_id IS NULL AND {_SUPERSEDED} = 0 "
                    f"RETURNING {_COLUMNS}",
                    (now, encoded, provider_message_id, record_id, provider_message_id)
                ).fetchone()
                if row:
                    return Row(*row)
            row = c.execute(
                "UPDATE outbox SET updated_at = :now, "
                "error = CASE WHEN attempts >= :max THEN :final ELSE :error END, "
                "state = CASE WHEN attempts >= :max THEN 'failed' ELSE 'queued' END, "
                "next_at = CASE WHEN attempts >= :max THEN next_at ELSE :at END, "
                "provider_message_id = CASE WHEN attempts >= :max THEN provider_message_id END, "
                "sent_at = CASE WHEN attempts >= :max THEN sent_at END, "
                "superseded = CASE WHEN attempts >= :max THEN superseded "
                "ELSE coalesce(superseded || char(10), '') || :pmid END "
                f"WHERE {where} AND state = 'sent' AND provider_message_id = :pmid "
                f"RETURNING {_COLUMNS}",
                {"now": now, "max": max_attempts, "final": final, "error": encoded, "at": at,
                 "pmid": provider_message_id, "arg": arg}).fetchone()
            return Row(*row) if row else None

        return await self._db.run(work)

    async def waiting(self, accounts: list[tuple[str, str]]) -> int:
        """How many records wait to be sent (queued, sending or uncertain) on ``accounts``."""
        return await self._db.run(lambda c: sum(c.execute(
            "SELECT count(*) FROM outbox WHERE channel = ? AND account_id = ? AND state IN "
            "('queued', 'sending', 'uncertain')", key).fetchone()[0] for key in accounts))

    async def inbound(self, channel: str, account_id: str, contact_id: str, at: float,
                      message_id: str | None, opted_out: bool | None) -> None:
        """Remember a customer's latest inbound message (the service window) and consent
        (``opted_out`` None: the message says nothing about it). Consent said at ``at`` replaces
        only consent said earlier: a STOP delivered before an older START stays."""
        consent_at = None if opted_out is None else at
        await self._db.run(lambda c: c.execute(
            "INSERT INTO customers(channel, account_id, contact_id, last_inbound_at, "
            "last_inbound_message_id, opted_out, opted_out_at) "
            "VALUES (?, ?, ?, ?, ?, coalesce(?, 0), ?) "
            f"ON CONFLICT DO UPDATE SET opted_out = CASE WHEN {_NEWER_CONSENT} "
            "THEN excluded.opted_out ELSE opted_out END, "
            f"opted_out_at = CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out_at "
            "ELSE opted_out_at END, "
            "last_inbound_message_id = CASE WHEN excluded.last_inbound_at >= "
            "coalesce(last_inbound_at, 0) THEN excluded.last_inbound_message_id "
            "ELSE last_inbound_message_id END, "
            "last_inbound_at = max(coalesce(last_inbound_at, 0), excluded.last_inbound_at)",
            (channel, account_id, contact_id, at, message_id, opted_out, consent_at)))

    async def set_opted_out(self, channel: str, account_id: str, contact_id: str,
                            opted_out: bool, at: float | None = None) -> None:
        """Record consent learnt outside an inbound message (Meta's 131050 answer), said at
        ``at`` (epoch s; default now); consent said later is kept."""
        at = time.time() if at is None else at
        await self._db.run(lambda c: c.execute(
            "INSERT INTO customers(channel, account_id, contact_id, opted_out, opted_out_at) "
            f"VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET opted_out = CASE WHEN "
            f"{_NEWER_CONSENT} THEN excluded.opted_out ELSE opted_out END, opted_out_at = "
            f"CASE WHEN {_NEWER_CONSENT} THEN excluded.opted_out_at ELSE opted_out_at END",
            (channel, account_id, contact_id, int(opted_out), at)))

    async def customer(self, channel: str, account_id: str, contact_id: str) -> Customer:
        row = await self._db.run(lambda c: c.execute(
            "SELECT last_inbound_at, last_inbound_message_id, opted_out, opted_out_at "
            "FROM customers WHERE channel = ? AND account_id = ? AND contact_id = ?",
            (channel, account_id, contact_id)).fetchone())
        return (Customer(row[0], row[1], bool(row[2]), row[3]) if row
                else Customer(None, None, False))

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """GDPR: forget a contact's outbound records and window/consent state."""
        def work(c: sqlite3.Connection) -> dict[str, int]:
            sends = c.execute("DELETE FROM outbox WHERE channel = ? AND recipient = ?",
                              (channel, contact_id)).rowcount
            known = c.execute("DELETE FROM customers WHERE channel = ? AND contact_id = ?",
                              (channel, contact_id)).rowcount
            return {"outbox": sends, "customers": known}

        result = await self._db.run(work)
        await self._db.truncate_wal()  # it still holds the deleted rows' pages as they were
        return result
