"""Append-only JSON lines: exactly ``gateway.events.encode(event)`` + ``\\n`` per event.

Exactly once across crashes: every batch is written with one ``write`` and fsynced before the
dispatcher moves its cursor. On start the sink repairs a torn last line (a crash mid-write) and
remembers the ids of the newest lines, so the batch that the dispatcher hands over again after a
crash is not appended twice.

Rotation needs no signal: before each batch the sink compares the file it holds with the one at
its path (``st_dev``, ``st_ino``), and when logrotate has renamed it away (``create``, or
``nocreate`` with none in its place) it opens the path, creating it, repairs and reads that file
as at start-up, and goes on remembering the ids it wrote to the old one. ``copytruncate`` keeps
the same file: appends go on at its new end.
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
from sinks.jsonl.tail import lines_backwards, whole_lines_end

_FLAGS = os.O_RDWR | os.O_APPEND
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
        self._fd = self._open_path()
        self._recall(self._newest_ids(self._fd))

    def _open_path(self) -> int:
        """Open the path for appending, creating it when missing; a file it creates has its
        directory fsynced too, or a power loss could lose the new entry and the lines in it."""
        path = self.config.path
        try:
            fd = os.open(path, _FLAGS | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            try:
                return os.open(path, _FLAGS)
            except FileNotFoundError:  # renamed away again meanwhile, or a dangling symlink
                fd = os.open(path, _FLAGS | os.O_CREAT, 0o640)
        if self.config.fsync:
            try:
                _fsync_directory(os.path.dirname(os.path.abspath(path)))
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _newest_ids(self, fd: int) -> list[str]:
        """Cut a torn last line (the write a crash interrupted); the ids of the newest lines,
        oldest first, as many as the window holds, read backwards however long the lines are."""
        size = os.fstat(fd).st_size
        end = whole_lines_end(fd, size)
        if end < size:
            os.ftruncate(fd, end)
        ids: list[str] = []
        for line in lines_backwards(fd, end):
            try:
                ids.append(_id_decoder.decode(line).id)
            except msgspec.DecodeError:
                continue
            if len(ids) == self._recent.maxlen:
                break
        ids.reverse()
        return ids

    def _recall(self, older: list[str]) -> None:
        """Remember ``older`` (ids read from the file) behind the ids already remembered: those
        this sink wrote last, to a file since rotated away, must still count as written."""
        merged = list(dict.fromkeys(reversed([*older, *self._recent])))  # once, at its newest
        merged.reverse()
        self._recent.clear()
        self._recent.extend(merged)  # maxlen keeps the newest
        self._recent_set = set(self._recent)

    def _remember(self, event_id: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(event_id)
        self._recent_set.add(event_id)

    def _fresh(self, records: list[Record]) -> list[Record]:
        """Never an id twice: not one written before, nor one twice within the batch."""
        fresh, ids = [], set()
        for r in records:
            if r.event.id not in self._recent_set and r.event.id not in ids:
                ids.add(r.event.id)
                fresh.append(r)
        return fresh

    async def write(self, records: list[Record]) -> None:
        # Shielded: a caller cancelled mid-write (the dispatcher cancels a batch's other lanes,
        # or stops at its timeout) must not leave lines written but their ids not remembered,
        # or the redelivery would append them again.
        await asyncio.shield(self._write(records))

    async def _write(self, records: list[Record]) -> None:
        async with self._lock:
            fresh = self._fresh(records)
            if fresh:
                await asyncio.to_thread(self._append, fresh)

    def _append(self, fresh: list[Record]) -> None:
        if self._fd is None:
            raise PermanentError("jsonl sink is closed")
        held = os.fstat(self._fd)
        if self._follow(held):  # the new file's newest ids count too
            fresh = self._fresh(fresh)
            held = os.fstat(self._fd)
        if not fresh:
            return
        blob = b"".join(r.data + b"\n" for r in fresh)
        # O_APPEND writes go to the end whatever the offset: set to 0 here, it then says where
        # the last byte written went (still 0: nothing was written).
        os.lseek(self._fd, 0, os.SEEK_SET)
        try:
            self._write_all(self._fd, blob)
        except OSError:
            self._roll_back(self._fd, held.st_size, blob)  # never leave half a batch behind
            raise
        for record in fresh:
            self._remember(record.event.id)

    def _follow(self, held: os.stat_result) -> bool:
        """Open the path again when it is no longer the file held (logrotate ``create`` renamed
        it and made another, ``nocreate`` left none, an erasure replaced it); True if it did."""
        try:
            now = os.stat(self.config.path)
        except FileNotFoundError:
            pass
        else:
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return False
        fd = self._open_path()
        try:
            older = self._newest_ids(fd)
        except BaseException:
            os.close(fd)
            raise
        assert self._fd is not None
        os.close(self._fd)
        self._fd = fd
        self._recall(older)
        return True

    def _roll_back(self, fd: int, before: int, blob: bytes) -> None:
        """Cut a failed append's bytes, only while the file still holds them, never beyond its
        size: a ``copytruncate`` may have emptied it before the write (the bytes then begin at
        0), or after it (nothing of them is left to cut)."""
        end = os.lseek(fd, 0, os.SEEK_CUR)  # just past the last byte written, 0 when none
        stop = min(end, os.fstat(fd).st_size)
        for start in (before, 0):  # where the bytes went: the old end, or 0 after a truncation
            kept = stop - start
            if kept > 0 and end - start <= len(blob) and os.pread(fd, kept, start) == blob[:kept]:
                os.ftruncate(fd, start)
                return

    def _write_all(self, fd: int, blob: bytes) -> None:
        view = memoryview(blob)
        written = os.write(fd, view)
        while written < len(blob):
            written += os.write(fd, view[written:])
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
                self._follow(os.fstat(self._fd))

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


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
