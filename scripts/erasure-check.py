#!/usr/bin/env python3
"""Was this contact erased, and when? Look contacts up in the gateway's erasure audit log.

    scripts/erasure-check.py [--data-dir DIR] [--key-file FILE] [--channel CH] CONTACT_ID [...]

``DELETE /v1/contacts/{channel}/{contact_id}`` appends one line per erasure to
``<data_dir>/erasures.jsonl``. The line does not hold the contact id, only
``contact_hmac = HMAC-SHA256(key, contact id)`` (hex), and ``linked_hmacs`` for the person's other
ids erased with it (a WhatsApp customer's BSUID and wa_id), so the file says nothing about a
person to whoever lacks the key. This script computes the HMAC of each id it is given and prints
the matching lines (an id erased as a linked id says so).

The key is the gateway's: ``--key-file FILE`` (e.g. a mounted secret), else the environment
variable ``GATEWAY_ERASURE_AUDIT_KEY`` (what ``server.erasure_audit_key`` is set to), else the key
the gateway generated in ``<data_dir>/erasure-audit.key``. In every case the key is the text,
stripped, as UTF-8. Lines made with another key (another replica's generated key, a rotated key)
cannot match; they are counted by their ``key_id``.

Exit status: 0 when every contact was found, 1 when one was not, 2 on a usage or file error.
Standard library only: runs with any Python 3.9+ next to the data directory.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys

KEY_ENV = "GATEWAY_ERASURE_AUDIT_KEY"
KEY_FILE = "erasure-audit.key"
AUDIT_FILE = "erasures.jsonl"
KEY_ID_MESSAGE = b"erasure-audit-key-id"  # gateway.erasure.KEY_ID_MESSAGE


def contact_hmac(key: bytes, contact_id: str) -> str:
    return hmac.new(key, contact_id.encode("utf-8"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    return hmac.new(key, KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def load_key(key_file: str | None, data_dir: str) -> tuple[bytes, str]:
    """The key and where it came from."""
    if key_file is None and os.environ.get(KEY_ENV, "").strip():
        return os.environ[KEY_ENV].strip().encode("utf-8"), f"${KEY_ENV}"
    path = key_file or os.path.join(data_dir, KEY_FILE)
    with open(path, "rb") as handle:
        key = handle.read().strip()
    if not key:
        raise ValueError(f"{path}: empty key file")
    return key, path


def read_lines(path: str) -> list[dict]:
    lines = []
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                lines.append(line)
    return lines


def _matches(line: dict, digest: str) -> bool | None:
    """False: the line's own contact; True: one of its linked ids; None: neither."""
    if hmac.compare_digest(str(line.get("contact_hmac", "")), digest):
        return False
    linked = line.get("linked_hmacs") or []
    if any(hmac.compare_digest(str(h), digest) for h in linked):
        return True
    return None


def describe(line: dict) -> str:
    failed = ", ".join(sorted(line.get("failed") or {})) or "none"
    erased = ", ".join(sorted(line.get("erased") or {})) or "none"
    return (f"erased at {line.get('at')} on {line.get('channel')} ({line.get('erasure_id')}; "
            f"sinks: {erased}; failed: {failed}; settled: {line.get('settled')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Look contacts up in the gateway's erasure audit log (erasures.jsonl).")
    parser.add_argument("contacts", nargs="+", metavar="CONTACT_ID",
                        help="wa_id or IGSID, as given to DELETE /v1/contacts/...")
    parser.add_argument("--data-dir", default=os.environ.get("GATEWAY_DATA_DIR", "./data"),
                        help="the gateway's server.data_dir (default: $GATEWAY_DATA_DIR or ./data)")
    parser.add_argument("--audit", help="the audit log (default: DATA_DIR/erasures.jsonl)")
    parser.add_argument("--key-file", help=f"the key (default: ${KEY_ENV}, else "
                                           f"DATA_DIR/{KEY_FILE})")
    parser.add_argument("--channel", help="only erasures on this channel")
    parser.add_argument("--print-hmac", action="store_true",
                        help="print each contact's contact_hmac (to search copies of the log)")
    args = parser.parse_args(argv)
    try:
        key, source = load_key(args.key_file, args.data_dir)
        lines = read_lines(args.audit or os.path.join(args.data_dir, AUDIT_FILE))
    except (OSError, ValueError) as exc:
        print(f"erasure-check: {exc}", file=sys.stderr)
        return 2
    mine = key_id(key)
    others = sum(1 for line in lines if line.get("key_id") not in (None, mine))
    missing = 0
    for contact in args.contacts:
        digest = contact_hmac(key, contact)
        if args.print_hmac:
            print(f"{contact}: contact_hmac {digest}")
        found = [(line, linked) for line in lines
                 if args.channel in (None, line.get("channel"))
                 for linked in (_matches(line, digest),) if linked is not None]
        for line, linked in found:
            print(f"{contact}: {describe(line)}" + (" (a linked id)" if linked else ""))
        if not found:
            missing += 1
            note = f"; {others} made with another key" if others else ""
            print(f"{contact}: no erasure recorded ({len(lines)} line(s) checked with the key "
                  f"from {source}, key_id {mine}{note})")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
