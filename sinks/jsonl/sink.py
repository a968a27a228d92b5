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
import os
import zlib
from collections import deque

import msgspec

from gateway.config import SinkConfig
from gateway.errors import PermanentError
from gateway.sink import Record, Sink
from sinks.jsonl.purge import purge
from sinks.jsonl.tail import lines_backwards, whole_lines_end

_FLAGS = os.O_RDWR | os.O_APPEND
MIN_RECENT_IDS = 10_000  # ids of the newest lines remembered, at least (about 1 MB)
# At start the newest lines are read back until the window is full, or until it holds four
# batches and this much was read (a file of big lines must not take minutes to start).
START_READ_BYTES = 8 * 1024 * 1024
# Compressions a copy may be in, by their first bytes and by suffix: only gzip (named .gz, as
# logrotate names it) is read and rewritten; a copy in any other is reported, never skipped.
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"),
         (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"), (b"\x1f\x9d", "compress"),
         (b"\x1f\xa0", "compress"), (b"LZIP", "lzip"), (b"\x89LZO", "lzop"),
         (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7z"))
COMPRESSED = {".xz", ".lzma", ".bz2", ".zst", ".lz4", ".Z", ".lz", ".lzo", ".br", ".zip", ".7z"}
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
        # The ids of the newest lines: a batch delivered again after a crash (its cursor had
        # not moved) is not written twice. Big enough for the in-flight batch of an earlier run
        # with a larger batch_size too.
        self._recent: deque[str] = deque(maxlen=max(4 * config.batch_size, MIN_RECENT_IDS))
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
        ids = self._newest_ids(self._fd)
        if len(ids) < self._recent.maxlen:  # a new file: rotated while the gateway was down?
            ids = self._rotated_ids(self._recent.maxlen - len(ids)) + ids
        self._recall(ids)

    def _rotated_ids(self, wanted: int) -> list[str]:
        """The ids of the newest lines of the newest uncompressed copy beside the file (what
        logrotate renamed it to, e.g. ``events.jsonl.1``), at most ``wanted``, oldest first."""
        copies = [c for c in rotated_copies(self.config.path)[0] if not c.endswith(".gz")]
        if not copies:
            return []
        newest = max(copies, key=lambda c: os.stat(c).st_mtime_ns)
        try:
            fd = os.open(newest, os.O_RDONLY)
        except OSError:
            return []
        try:
            return self._ids_backwards(fd, whole_lines_end(fd, os.fstat(fd).st_size), wanted)
        finally:
            os.close(fd)

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
        return self._ids_backwards(fd, end, self._recent.maxlen)

    def _ids_backwards(self, fd: int, end: int, wanted: int) -> list[str]:
        """The ids of the lines before ``end``, newest first read, at most ``wanted`` (and past
        four batches' worth, no more than START_READ_BYTES); oldest first."""
        ids: list[str] = []
        read, enough = 0, 4 * self.config.batch_size
        for line in lines_backwards(fd, end):
            read += len(line) + 1
            try:
                ids.append(_id_decoder.decode(line).id)
            except msgspec.DecodeError:
                continue
            if len(ids) >= wanted or (len(ids) >= enough and read >= START_READ_BYTES):
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
        """GDPR: rewrite the file, and every copy beside it whose name starts with the file's
        (``events.jsonl.1``, ``events.jsonl-20261201.gz``, ``events.jsonl.2026-12-01``,
        ``events.jsonl.old``, ...: see :func:`rotated_copies`), without the contact's lines.
        Appends wait while the live file is rewritten, not while the copies are; a file that
        never mentions the contact is only scanned, never rewritten.

        Raises:
            OSError, EOFError, zlib.error: a file that could not be rewritten (a ``.gz`` still
                being written by logrotate, say); the others are purged all the same, and the
                erasure reports this sink as failed, to be repeated.
            PermanentError: copies in a compression it cannot rewrite (``.xz``, ``.bz2``,
                ``.zst``, ..., or gzip not named ``.gz``) are beside the file: the rest is
                purged; those must be by hand.
        """
        # Shielded, as writes are: a cancelled erasure must not release the lock while its
        # thread still replaces the file and the descriptor appends go to.
        return await asyncio.shield(self._erase(channel, contact_id))

    async def _erase(self, channel: str, contact_id: str) -> dict[str, int]:
        async with self._erasing:
            async with self._lock:  # the live file: appends wait, then go to the new file
                live, failure = await asyncio.to_thread(self._purge_live, channel, contact_id)
            # The rotated copies, which the sink never appends to, with appends going on.
            copies, unreadable = await asyncio.to_thread(rotated_copies, self.config.path)
            removed, other = await asyncio.to_thread(_purge_all, copies, channel, contact_id)
        failure = failure or other
        if unreadable:
            also = f" (and {type(failure).__name__}: {failure})" if failure else ""
            raise PermanentError(f"cannot purge {', '.join(unreadable)}: only plain and .gz "
                                 f"copies are rewritten; purge these by hand{also}") from failure
        if failure:
            raise failure
        return {"events": live + removed}

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


def rotated_copies(path: str) -> tuple[list[str], list[str]]:
    """The copies beside ``path`` (every file whose name is the file's and then more, after a
    character that is not a letter or digit: ``events.jsonl.1``, ``events.jsonl-20261201.gz``,
    ``events.jsonl.2026-12-01``, ``events.jsonl.old``, ``events.jsonl~``; not ``events.jsonl2``,
    a file of another name) split into those it can purge and those in a compression it cannot
    read (by suffix, or by content: a gzip copy not named .gz, an .xz one named .old), sorted.
    A symbolic link counts as the file it points to (purged there, the link kept); a link to
    the live file, or a second link to one copy, is not another copy."""
    directory, base = os.path.split(os.path.abspath(path))
    try:
        live = os.stat(path)
        seen = {(live.st_dev, live.st_ino)}
    except FileNotFoundError:
        seen = set()
    copies, unreadable = [], []
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if e.name.startswith(base))
    for name in names:
        rest = name[len(base):]
        if not rest or rest[0].isalnum():
            continue
        link = os.path.join(os.path.dirname(path), name)
        try:
            info = os.stat(link)  # through a symbolic link
        except OSError:  # gone meanwhile, or a dangling link: nothing to purge
            continue
        if not os.path.isfile(link) or (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        target = os.path.realpath(link) if os.path.islink(link) else link
        if target.endswith(".gz"):  # read as gzip: purging one that is not says so
            copies.append(target)
            continue
        kind = _compression(target)
        if kind is None and os.path.splitext(target)[1] not in COMPRESSED:
            copies.append(target)  # plain
        else:
            unreadable.append(link if kind is None else f"{link} ({kind})")
    return copies, unreadable


def _compression(path: str) -> str | None:
    """The compression ``path`` is in, by its first bytes (None: none known; a file it cannot
    read: None too, and purging it says what is wrong)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


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
