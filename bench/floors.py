"""Floors of the ingest path: what each part of a webhook's work costs alone, on one core.

    .venv/bin/python bench/floors.py [--requests 20000]

Each part runs in this process, pinned to CPU 0, on the same distinct signed bodies as
bench/ingest.py, with the gateway's own code and SQL, batched as the running gateway batches
(appends in groups that share a commit; processing and storage in batches of 200): HMAC check,
envelope check and normalisation; the journal's SQL per request (append + group commit, then the
processing transaction: de-duplication, events, deletion, cursor); the storage sink per event
(its three tables and the commit). Printed: CPU microseconds per request for each and their sum,
next to what bench/ingest.py's 0.65 target allows per request given a bare-server rate. No
pass/fail. The sum leaves out everything between the parts (HTTP, futures, hand-offs between
threads, metrics), so it is a lower bound of the gateway's cost per request.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import ingest  # noqa: E402 - the bodies bench/ingest.py sends

from channels.whatsapp import WhatsAppChannel, WhatsAppConfig  # noqa: E402
from gateway.consent import Consent  # noqa: E402
from gateway.events import encode  # noqa: E402
from gateway.journal import NewEvent  # noqa: E402
from gateway.journal.sqlite import _APPEND, _set_cursor, _store_new  # noqa: E402
from gateway.journal.sqlite import SCHEMA as JOURNAL_SCHEMA  # noqa: E402
from gateway.signatures import verify  # noqa: E402
from sinks.storage.schema import SCHEMA as STORAGE_SCHEMA  # noqa: E402
from sinks.storage.sink import apply_all  # noqa: E402

GROUP = 16  # appends per group commit (the gateway's groups at peak: about 8-20)
BATCH = 200  # requests per processing transaction and events per storage batch


def cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def connect(path: Path, synchronous: str, schema: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("PRAGMA journal_mode=WAL", f"PRAGMA synchronous={synchronous}",
                   "PRAGMA cache_size=-16000"):
        conn.execute(pragma)
    conn.executescript(schema)
    return conn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--bare-rps", type=float, default=19_685.0,
                        help="the bare server's rate from bench/ingest.py (for the budget line)")
    args = parser.parse_args()
    os.sched_setaffinity(0, {0})
    work = Path(tempfile.mkdtemp(prefix="bench-floors-"))
    n = args.requests
    ingest.write_bodies(work / "bodies.txt", n)
    pairs = [line.rstrip("\n").split("\t", 1) for line in open(work / "bodies.txt")]
    bodies = [(sig, body.encode()) for sig, body in pairs]
    channel = WhatsAppChannel(WhatsAppConfig(app_secret=ingest.SECRET.decode()))
    secret = channel.app_secret
    figures = {}
    figures["verify + envelope"] = cpu(lambda: [
        (verify(secret, b, s), channel.check_envelope(b)) for s, b in bodies])
    events = []
    figures["normalise + encode"] = cpu(lambda: events.extend(
        (e, encode(e)) for _, b in bodies for e in channel.normalise(b)))
    figures["journal SQL + commits"] = cpu(lambda: journal(work, bodies, events))
    figures["storage sink"] = cpu(lambda: storage(work, [e for e, _ in events]))
    print(f"{n} requests (one message each), CPU 0, groups of {GROUP} appends, "
          f"batches of {BATCH}\n")
    for name, seconds in figures.items():
        print(f"{name:28}{seconds / n * 1e6:8.1f} us per request")
    total = sum(figures.values()) / n * 1e6
    budget = 1e6 / (ingest.TARGETS["ratio"] * args.bare_rps)
    print(f"{'sum of the parts':28}{total:8.1f} us per request")
    print(f"\nthe 0.65 target at a bare {args.bare_rps:.0f} req/s allows {budget:.1f} us per "
          f"request in all, HTTP included (the bare server alone: {1e6 / args.bare_rps:.1f} us)")
    return 0


def journal(work: Path, bodies: list, events: list) -> None:
    conn = connect(work / "journal.db", "FULL", JOURNAL_SCHEMA)
    now = time.time()
    for start in range(0, len(bodies), BATCH):
        upto = min(start + BATCH, len(bodies))
        for group in range(start, upto, GROUP):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_APPEND, [(seq + 1, "whatsapp", now, bodies[seq][1])
                                       for seq in range(group, min(group + GROUP, upto))])
            conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        _store_new(conn, [NewEvent(e.id, e.channel, e.conversation_id, data, now)
                          for e, data in events[start:upto]], now)
        conn.execute("DELETE FROM requests WHERE seq <= ?", (upto,))
        _set_cursor(conn, "processed", upto)
        conn.execute("COMMIT")
    conn.close()


def storage(work: Path, events: list) -> None:
    conn = connect(work / "storage.db", "NORMAL", STORAGE_SCHEMA)
    consent = Consent(["stop"], ["start"])
    for start in range(0, len(events), BATCH):
        conn.execute("BEGIN IMMEDIATE")
        apply_all(conn, events[start:start + BATCH], consent)
        conn.execute("COMMIT")
    conn.close()


if __name__ == "__main__":
    sys.exit(main())
