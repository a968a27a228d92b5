"""Append-only JSON lines: exactly ``gateway.events.encode(event)`` + ``\\n`` per event.

Exactly once across crashes: every batch is written with one ``write`` and fsynced before the
dispatcher moves its cursor. On start the sink repairs a torn last line (a crash mid-write) and
remembers the ids of the newest lines, so the batch that the dispatcher hands over again after a
crash is not appended twice.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import zlib
from collections import deque

import msgspec

from gateway.config import SinkConfig
from gateway.errors import PermanentError
from gateway.sink import Record, Sink
from sinks.jsonl.purge import purge

TAIL_BYTES = 8 * 1024 * 1024
# What logrotate leaves beside the file: events.jsonl.1, events.jsonl.2.gz, events.jsonl-20261201.gz
ROTATED = re.compile(r"(\.\d+|-\d[\d-]*)?(\.gz)?")
UNREADABLE = re.compile(r"(\.\d+|-\d[\d-]*)?\.(xz|bz2|zst|lz4|Z)")  # copies it cannot rewrite
_Id = msgspec.defstruct("_Id", [("id", str)])
_id_decoder = msgspec.json.Decoder(_Id)


class JsonlConfig(SinkConfig):
    """``[sinks.jsonl]``: ``path`` (default ``<data_dir>/events.jsonl``), ``fsync``."""

    path: str = ""
    fsync: bool = True


class JsonlSink(Sink):
    """Writes canonical events to a JSON-lines file."""

    name = "jsonl"

    def __init__(self, config: JsonlConfig) -> None:
        super().__init__(config)
        self.config: JsonlConfig = config
        self._fd: int | None = None
        self._recent: deque[str] = deque(maxlen=4 * config.batch_size)
        self._recent_set: set[str] = set()
        # One write at a time: the dispatcher's conversation lanes call write concurrently, and a
        # failed append truncates the file back to where it began.
        self._lock = asyncio.Lock()
        self._erasing = asyncio.Lock()  # one erasure at a time: two would undo each other's copy

    async def start(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.config.path)), exist_ok=True)
        self._fd = os.open(self.config.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        size = os.fstat(self._fd).st_size
        start = max(0, size - TAIL_BYTES)
        tail = os.pread(self._fd, size - start, start)
        cut = tail.rfind(b"\n") + 1
        if cut < len(tail):  # a torn last line: the write that a crash interrupted
            os.ftruncate(self._fd, start + cut)
            tail = tail[:cut]
        for line in tail.splitlines()[-self._recent.maxlen:]:
            try:
                self._remember(_id_decoder.decode(line).id)
            except msgspec.DecodeError:
                continue

    def _remember(self, event_id: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(event_id)
        self._recent_set.add(event_id)

    async def write(self, records: list[Record]) -> None:
        # Shielded: a caller cancelled mid-write (the dispatcher cancels a batch's other lanes,
        # or stops at its timeout) must not leave lines written but their ids not remembered,
        # or the redelivery would append them again.
        await asyncio.shield(self._write(records))

    async def _write(self, records: list[Record]) -> None:
        async with self._lock:
            fresh, ids = [], set()
            for r in records:  # never an id twice: not one written before, nor within the batch
                if r.event.id not in self._recent_set and r.event.id not in ids:
                    ids.add(r.event.id)
                    fresh.append(r)
            if not fresh:
                return
            await asyncio.to_thread(self._append, b"".join(r.data + b"\n" for r in fresh))
            for record in fresh:
                self._remember(record.event.id)

    def _append(self, blob: bytes) -> None:
        if self._fd is None:
            raise PermanentError("jsonl sink is closed")
        before = os.fstat(self._fd).st_size
        try:
            self._write_all(self._fd, blob)
        except OSError:
            os.ftruncate(self._fd, before)  # never leave half a batch behind
            raise

    def _write_all(self, fd: int, blob: bytes) -> None:
        written = os.write(fd, blob)
        while written < len(blob):
            written += os.write(fd, blob[written:])
        if self.config.fsync:
            os.fsync(fd)

    def files(self) -> list[str]:
        return [self.config.path]

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """GDPR: rewrite the file, and its rotated copies beside it (``events.jsonl.1``,
        ``events.jsonl-20261201.gz``, ...), without the contact's lines. Appends wait while the
        live file is rewritten, not while the copies are; a file that never mentions the contact
        is only scanned, never rewritten.

        Raises:
            OSError, EOFError, zlib.error: a file that could not be rewritten (a ``.gz`` still
                being written by logrotate, say); the others are purged all the same, and the
                erasure reports this sink as failed, to be repeated.
            PermanentError: copies in a compression it cannot rewrite (``.xz``, ``.bz2``,
                ``.zst``, ...) are beside the file: the rest is purged; those must be by hand.
        """
        # Shielded, as writes are: a cancelled erasure must not release the lock while its
        # thread still replaces the file and the descriptor appends go to.
        return await asyncio.shield(self._erase(channel, contact_id))

    async def _erase(self, channel: str, contact_id: str) -> dict[str, int]:
        path = self.config.path
        async with self._erasing:
            async with self._lock:  # the live file: appends wait, then go to the new file
                live, failure = await asyncio.to_thread(self._purge_live, channel, contact_id)
            # The rotated copies, which the sink never appends to, with appends going on.
            names = sorted(glob.glob(glob.escape(path) + "?*"))
            rotated = [p for p in names if ROTATED.fullmatch(p[len(path):]) and os.path.isfile(p)]
            copies, other = await asyncio.to_thread(_purge_all, rotated, channel, contact_id)
        if failure or other:
            raise failure or other
        unreadable = [p for p in names if UNREADABLE.fullmatch(p[len(path):])]
        if unreadable:
            raise PermanentError(f"cannot purge {', '.join(unreadable)}: only plain and .gz "
                                 "copies are rewritten; purge these by hand")
        return {"events": live + copies}

    def _purge_live(self, channel: str, contact_id: str) -> tuple[int, BaseException | None]:
        try:
            return _purge_all([self.config.path], channel, contact_id)
        finally:
            if self._fd is not None:  # the file may have been replaced: append to the new one
                os.close(self._fd)
                self._fd = os.open(self.config.path, os.O_RDWR | os.O_CREAT | os.O_APPEND,
                                   0o640)

    async def close(self) -> None:
        async with self._lock:  # after a write still under way (shielded from cancellation)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _purge_all(paths: list[str], channel: str, contact_id: str
               ) -> tuple[int, BaseException | None]:
    """Purge each file; lines removed in all, and the first failure (the others are purged)."""
    removed, failure = 0, None
    for path in paths:
        try:
            removed += purge(path, channel, contact_id)["removed"]
        except (OSError, EOFError, zlib.error) as exc:
            failure = failure or exc
    return removed, failure
