"""The sink interface: where canonical events go after normalisation."""

from __future__ import annotations

import abc
import asyncio
import os
from typing import TYPE_CHECKING, NamedTuple

from gateway import logging as gwlog
from gateway.journal.writer import SqliteWriter

if TYPE_CHECKING:
    from gateway.config import SinkConfig
    from gateway.events import Event


class Record(NamedTuple):
    """One event as the dispatcher hands it to sinks.

    Attributes:
        seq: position in the event log (increasing; a sink may use it for its own checkpoints).
        event: the canonical event.
        data: ``gateway.events.encode(event)``, encoded once for every sink.
        received_at: epoch seconds when the webhook carrying it was received.
    """

    seq: int
    event: Event
    data: bytes
    received_at: float


class Sink(abc.ABC):
    """A destination for canonical events.

    Delivery is at least once: after a crash, the last batch may be handed over again, so ``write``
    must be idempotent by ``record.event.id`` (upsert, create-if-absent, or skip what is written).
    Each conversation's events arrive in order, but after a failed batch the dispatcher retries
    different conversations concurrently: ``write`` may run several times at once (for different
    conversations), so keep it safe for concurrent calls. Raise ``gateway.errors.RetryableError``
    for a transient failure and ``gateway.errors.PermanentError`` when retrying cannot help; any
    other exception counts as retryable. The dispatcher owns retries, backoff and dead letters.

    Attributes:
        name: the ``[sinks.NAME]`` table and the ``sink`` metric label.
        config: the sink's table; its ``max_attempts``, ``backoff_*`` and ``batch_size`` drive the
            dispatcher.
    """

    name: str

    def __init__(self, config: SinkConfig) -> None:
        self.config = config

    async def start(self) -> None:  # noqa: B027 - optional hook: a no-op unless overridden
        """Open files or connections. Called once before the first ``write``."""

    @abc.abstractmethod
    async def write(self, records: list[Record]) -> None:
        """Store or forward a batch of records (same conversation's records in order)."""

    async def close(self) -> None:  # noqa: B027 - optional hook: a no-op unless overridden
        """Flush and release resources. Called once at shutdown, after the last ``write``."""

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int] | None:
        """Erase everything stored about one contact (GDPR). Return counts removed per kind
        (e.g. ``{"messages": 12}``), or None when this sink keeps no contact data."""
        return None

    async def ready(self) -> bool:
        """Whether the sink's backend is reachable (used by ``/readyz``)."""
        return True

    def files(self) -> list[str]:
        """The local files this sink writes (none by default). The gateway refuses to start
        when two sinks, or a sink and the gateway itself, would write the same file."""
        return []


log = gwlog.get("gateway.sink")
CLOSE_SECONDS = 2.0  # a SQLite sink's close at shutdown waits at most this long


class SqliteSink(Sink):
    """A sink that keeps its tables in one SQLite file, written by one thread. WAL with
    ``synchronous=FULL``: ``write`` returns once its batch is on disk, because the dispatcher
    then moves the sink's cursor for good; with ``NORMAL`` a power loss could roll back batches
    the cursor has passed, and nothing would redeliver them (a process crash loses nothing either
    way; the fsync runs in the sink's thread, not on the event loop). The dispatcher redelivers a
    batch cut short by a crash, so the sink's writes must be idempotent.
    Subclasses run their SQL with ``await self._db.run(fn)``, ``fn`` taking the connection."""

    def __init__(self, config: SinkConfig, path: str, schema: str) -> None:
        super().__init__(config)
        self.path = path
        self._db = SqliteWriter(path, ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL",
                                       "PRAGMA busy_timeout=10000"], schema)

    async def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        await asyncio.to_thread(self._db.start)

    async def close(self) -> None:
        """Let queued work finish and close the database, waiting at most CLOSE_SECONDS: a
        database locked by another process would hold the shutdown for its busy timeout (10 s).
        What was being written then is not acknowledged, so it is delivered again after the
        restart (the writes are idempotent)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(self._db.stop), CLOSE_SECONDS)
        except TimeoutError:
            log.warning("sink_close_timed_out", sink=self.name, seconds=CLOSE_SECONDS,
                        detail="its database is busy (locked by another process?); what it was "
                               "writing is delivered again after the restart")

    async def ready(self) -> bool:
        return self._db.alive

    def files(self) -> list[str]:
        return [self.path, f"{self.path}-wal", f"{self.path}-shm"]

    async def erase_with(self, fn) -> dict[str, int]:
        """Run an erasure's ``fn(conn)`` in one transaction, then empty the WAL, which still holds
        the deleted rows' pages as they were (``secure_delete`` overwrites them in the database
        file itself). Subclasses' ``erase_contact`` use it."""
        result = await self._db.run(fn)
        await self._db.truncate_wal()
        return result

    async def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run a read-only query (tests, the CLI and the demo use it)."""
        return await self._db.run(lambda c: c.execute(sql, args).fetchall())
