#!/usr/bin/env python3
"""Purge one contact from JSON-lines event logs written by the ``jsonl`` sink (GDPR erasure).

    scripts/purge-jsonl.py --channel whatsapp --contact 15550001234 data/events.jsonl [more...]

``DELETE /v1/contacts/...`` purges the running ``jsonl`` sink's file and its rotated copies beside
it; this script is for copies elsewhere (archives, files moved away) or a sink since disabled. A
line is removed when its ``channel`` matches and its customer (the
sender of an inbound event, the recipient of an outbound one) is the contact. Each file is
rewritten to a temporary file next to it, fsynced and renamed over the original (mode kept), so a
crash leaves either the old or the new file. ``.gz`` files are read and written compressed.

Stop the gateway (or disable ``[sinks.jsonl]``) first: the running sink would follow the rewritten
file, but the lines it appended while this script was copying would be lost. Lines that are not
JSON are kept and counted.
Exit status: 0 on success, 1 when a file could not be processed.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sinks.jsonl.purge import purge  # noqa: E402 - the project's root is on the path above


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
