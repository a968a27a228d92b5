"""The durable journal: raw webhook requests in, de-duplicated events out, sink cursors, dead
letters.

One small interface (:class:`Journal`) with two backends: ``sqlite`` (default, one process) and
``redis`` (scale-out). The intake appends raw requests and acks only once they are durable; the
processor turns them into events exactly once; each sink worker reads events after its cursor.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


class RawRequest(NamedTuple):
    """A journaled webhook request."""

    seq: int
    channel: str
    received_at: float
    body: bytes


class NewEvent(NamedTuple):
    """An event the processor wants stored (if its id is new)."""

    id: str
    channel: str
    conversation_id: str
    data: bytes
    received_at: float


class StoredEvent(NamedTuple):
    """An event in the log, as sink workers read it."""

    seq: int
    data: bytes
    received_at: float


class DeadLetter(NamedTuple):
    """An event a sink could not take, with the reason."""

    id: int
    sink: str
    event_id: str
    data: bytes
    received_at: float
    reason: str
    attempts: int
    failed_at: float
    state: str
    seq: int = 0  # the event's position in the log (0: not an event, or not known)


def contact_matcher(channel: str, *contact_ids: str) -> Callable[[bytes, str], bool]:
    """For erasure: whether stored ``data`` (of dead-letter ``sink``, or "" for an event) belongs
    to one of the contacts. An event does when its channel matches and its customer (the sender of
    inbound events, the recipient of outbound ones) is one of ``contact_ids``; a raw request that
    no channel could normalise when it came from ``channel`` and its body holds one of them as a
    JSON string."""
    from gateway.events import decode

    wanted = set(contact_ids)
    needles = [json.dumps(one).encode() for one in contact_ids]

    def mine(data: bytes, sink: str) -> bool:
        try:
            event = decode(data)
        except Exception:  # noqa: BLE001 - a raw request, not an event
            return sink == f"normalise:{channel}" and any(n in bytes(data) for n in needles)
        return event.channel == channel and event.customer_id in wanted

    return mine


class Journal(Protocol):
    """What the intake, processor, dispatcher and CLI need from a journal backend."""

    pending: int  # appended requests not yet processed
    appending: int  # appends begun by this process and not yet committed (or failed)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    def append(self, channel: str, body: bytes, received_at: float) -> Awaitable[None]: ...
    async def unprocessed(self, limit: int) -> list[RawRequest]: ...
    async def commit_processed(self, upto: int, events: list[NewEvent],
                               failed: list[tuple[RawRequest, str]]) -> list[int | None]: ...
    async def events_after(self, seq: int, limit: int) -> list[StoredEvent]: ...
    async def last_event_seq(self) -> int: ...
    async def cursor(self, name: str) -> int | None: ...
    async def set_cursor(self, name: str, seq: int) -> None: ...
    async def add_dead_letters(self, sink: str, items: list[tuple[StoredEvent, str, str, int]],
                               replacing: Sequence[int] = ()) -> None: ...
    async def dead_lettered_after(self, sink: str, seq: int) -> set[int]: ...
    async def dead_letters(self, sink: str | None = None, limit: int = 100) -> list[DeadLetter]: ...
    async def dead_letter_counts(self) -> dict[str, int]: ...
    async def request_replay(self, sink: str | None = None,
                             ids: list[int] | None = None) -> int: ...
    async def replays_due(self, sink: str, limit: int) -> list[DeadLetter]: ...
    async def finish_replays(self, ids: list[int]) -> None: ...
    async def prune(self, now: float) -> None: ...
    async def learn_aliases(self, pairs: dict[tuple[str, str], str]) -> None: ...
    async def aliases(self, keys: list[tuple[str, str]], *,
                      wait: bool = True) -> dict[tuple[str, str], str]: ...
    async def aliases_of(self, channel: str, contact_id: str) -> list[str]: ...
    async def retire_aliases(self, channel: str, contact_ids: list[str]) -> None: ...
    async def retired_with(self, channel: str, contact_id: str) -> list[str]: ...
    async def forget_retired(self, channel: str, contact_ids: list[str]) -> None: ...
    async def forget_cursors(self, keep: set[str]) -> None: ...


def open_journal(config: GatewayConfig) -> Journal:
    """The journal backend ``config.queue.backend`` names (not yet opened)."""
    if config.queue.backend == "redis":
        from gateway.journal.redis import RedisJournal

        return RedisJournal(config)
    from gateway.journal.sqlite import SqliteJournal

    return SqliteJournal(config)
