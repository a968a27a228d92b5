"""Purging one contact from JSON-lines event logs (GDPR erasure): the running ``jsonl`` sink's
``erase_contact`` and ``scripts/purge-jsonl.py`` share it.

A line is removed when its ``channel`` matches and its customer (the sender of an inbound event,
the recipient of an outbound one) is the contact. Each file is rewritten to a temporary file next
to it, fsynced and renamed over the original (mode kept), so a crash leaves either the old or the
new file. ``.gz`` files are read and written compressed. Lines that are not JSON are kept and
counted.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile


def belongs(line: bytes, channel: str, contact_id: str) -> bool | None:
    """Whether an event line is the contact's (None when the line is not a JSON event)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    party = event.get("sender") if event.get("direction") == "inbound" else event.get("recipient")
    customer = party.get("id") if isinstance(party, dict) else None
    return event.get("channel") == channel and customer == contact_id


def mentions(path: str, contact_id: str, chunk: int = 1 << 20) -> tuple[bool, int]:
    """Whether ``path`` holds ``contact_id`` as a JSON string anywhere, and its line count: a
    byte scan, so that a file without the contact is never parsed line by line or rewritten."""
    needles = {json.dumps(contact_id).encode(), json.dumps(contact_id, ensure_ascii=False).encode()}
    overlap = max(len(n) for n in needles) - 1
    opener = gzip.open if path.endswith(".gz") else open
    found, lines, tail = False, 0, b""
    with opener(path, "rb") as src:
        while block := src.read(chunk):
            lines += block.count(b"\n")
            window = tail + block
            found = found or any(n in window for n in needles)
            tail = window[-overlap:] if overlap else b""
    return found, lines


def purge(path: str, channel: str, contact_id: str, dry_run: bool = False) -> dict[str, int]:
    """Rewrite ``path`` without the contact's lines; counts of kept, removed and unparsed lines
    (a file that never mentions the contact is left as it is, its lines counted as kept)."""
    found, lines = mentions(path, contact_id)
    if not found:
        return {"kept": lines, "removed": 0, "unparsed": 0}
    opener = gzip.open if path.endswith(".gz") else open
    counts = {"kept": 0, "removed": 0, "unparsed": 0}
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=".purge-", dir=directory)
    try:
        out = os.fdopen(fd, "wb")
        sink = gzip.GzipFile(fileobj=out, mode="wb") if path.endswith(".gz") else out
        with opener(path, "rb") as src, out, sink as dst:
            for line in src:
                verdict = belongs(line, channel, contact_id)
                if verdict:
                    counts["removed"] += 1
                    continue
                counts["unparsed" if verdict is None and line.strip() else "kept"] += 1
                dst.write(line)
        if dry_run or not counts["removed"]:
            os.unlink(temp)
            return counts
        os.chmod(temp, os.stat(path).st_mode & 0o7777)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return counts
