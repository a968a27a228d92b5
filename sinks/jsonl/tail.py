"""Reading a JSON-lines file from its end, in blocks: the jsonl sink's start-up (and re-open)
work, which needs its newest lines, however long they are, without reading the whole file."""

from __future__ import annotations

import os
from collections.abc import Iterator

BLOCK = 1 << 20  # bytes read at a time


def whole_lines_end(fd: int, size: int) -> int:
    """The offset just past the last newline before ``size`` (0 when there is none): where a
    torn last line, the write a crash interrupted, begins."""
    if size and os.pread(fd, 1, size - 1) == b"\n":
        return size
    pos = size
    while pos > 0:
        start = max(0, pos - BLOCK)
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def lines_backwards(fd: int, end: int) -> Iterator[bytes]:
    """The lines before ``end`` (an offset just past a newline, or 0), newest first, without
    their newlines. Holds one block and the line it is in, never the file."""
    pos, later = end, []  # later: pieces, newest first, of a line that begins further back
    while pos > 0:
        start = max(0, pos - BLOCK)
        pieces = os.pread(fd, pos - start, start).split(b"\n")
        pos = start
        if len(pieces) == 1:  # no newline in this block: all of it belongs to one long line
            later.append(pieces[0])
            continue
        yield pieces[-1] + b"".join(reversed(later))
        yield from reversed(pieces[1:-1])
        later = [pieces[0]]
    yield b"".join(reversed(later))
