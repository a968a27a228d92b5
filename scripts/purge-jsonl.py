#!/usr/bin/env python3
"""Purge one contact from JSON-lines event logs written by the ``jsonl`` sink (GDPR erasure).

    scripts/purge-jsonl.py --channel whatsapp --contact 15550001234 data/events.jsonl [more...]

The ``jsonl`` sink is an append-only log, so ``DELETE /v1/contacts/...`` cannot reach into it:
run this after the erasure. A line is removed when its ``channel`` matches and its customer (the
sender of an inbound event, the recipient of an outbound one) is the contact. Each file is
rewritten to a temporary file next to it, fsynced and renamed over the original (mode kept), so a
crash leaves either the old or the new file. ``.gz`` files are read and written compressed.

Stop the gateway (or disable ``[sinks.jsonl]``) first: the running sink keeps the file open and
would go on appending to the replaced copy. Lines that are not JSON are kept and counted.
Exit status: 0 on success, 1 when a file could not be processed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import zlib


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


def purge(path: str, channel: str, contact_id: str, dry_run: bool = False) -> dict[str, int]:
    """Rewrite ``path`` without the contact's lines; counts of kept, removed and unparsed lines."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channel", required=True, help="whatsapp, instagram, ...")
    parser.add_argument("--contact", required=True, help="the wa_id / IGSID to purge")
    parser.add_argument("--dry-run", action="store_true", help="count only, change nothing")
    parser.add_argument("files", nargs="+", help="events.jsonl files (rotated / .gz too)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            counts = purge(path, args.channel, args.contact, args.dry_run)
        except (OSError, EOFError, zlib.error) as exc:  # e.g. a .gz still being written
            print(f"{path}: {getattr(exc, 'strerror', None) or exc}; left as it was",
                  file=sys.stderr)
            status = 1
            continue
        verb = "would remove" if args.dry_run else "removed"
        print(f"{path}: {verb} {counts['removed']} line(s), kept {counts['kept']}"
              + (f", {counts['unparsed']} not JSON (kept)" if counts["unparsed"] else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
