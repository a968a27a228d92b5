"""Firestore sink benchmark: events/s written to Google's Firestore emulator.

    .venv/bin/python bench/firestore.py [--events 2000] [--conversations 50] [--batch 200]

Starts its own emulator (java, 127.0.0.1, a free port; Debian package
google-cloud-cli-firestore-emulator) and writes the same events, each run into a fresh project:

1. baseline: one ``set()`` per event in a loop — the message document only (no conversation
   count, no contact, no idempotence), awaited one after the other;
2. the same ``set()`` calls, 64 in flight at once;
3. the sink, handed one event per ``write`` (what it costs without batching);
4. the sink, handed dispatcher batches (``--batch`` records): one ``get_all`` per batch, then
   preconditioned batched writes of up to 500 operations, conversations packed together;
5. as 4, with every event in a conversation of its own (the worst case for packing).

Runs 3-5 write all three collections with the sink's full guarantees (counted once, statuses
never backwards, first_seen kept). Printed: events/s of each and the ratio against the baseline.
Figures from the emulator on one machine, not from Cloud Firestore: they compare round trips and
write amplification, not absolute service capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.events import Message, Party, conversation_id, encode  # noqa: E402
from gateway.sink import Record  # noqa: E402
from sinks.firestore import emulator as fsemu  # noqa: E402
from sinks.firestore.model import message_document, message_key  # noqa: E402
from sinks.firestore.sink import FirestoreConfig, FirestoreSink  # noqa: E402

T0 = datetime(2025, 10, 9, 8, 0, tzinfo=UTC)
ACCOUNT = "100000000000001"


def events(count: int, conversations: int) -> list[Record]:
    out = []
    for n in range(count):
        customer = f"1555{n % conversations:07d}"
        ev = Message(schema=1, id=f"bench-{n}", channel="whatsapp", direction="inbound",
                     account_id=ACCOUNT, conversation_id=conversation_id("whatsapp", ACCOUNT,
                                                                         customer),
                     sender=Party(id=customer, name="Bench"), recipient=Party(id=ACCOUNT),
                     timestamp=T0 + timedelta(milliseconds=n), message_id=f"wamid.BENCH.{n}",
                     type="text", text=f"benchmark message {n}")
        out.append(Record(n + 1, ev, encode(ev), time.time()))
    return out


async def sink_for(host: str) -> FirestoreSink:
    sink = FirestoreSink(FirestoreConfig(project_id=f"bench-{uuid.uuid4().hex[:10]}",
                                         emulator_host=host))
    await sink.start()
    return sink


async def naive(host: str, records: list[Record], in_flight: int) -> float:
    sink = await sink_for(host)  # only for its client: plain set() calls below
    messages = sink.collection("messages")
    gate = asyncio.Semaphore(in_flight)

    async def one(record: Record) -> None:
        async with gate:
            await messages.document(message_key(record.event).id).set(
                message_document(record.event))

    start = time.perf_counter()
    if in_flight == 1:
        for record in records:
            await one(record)
    else:
        await asyncio.gather(*(one(r) for r in records))
    elapsed = time.perf_counter() - start
    await sink.close()
    return elapsed


async def batched(host: str, records: list[Record], batch: int) -> tuple[float, int]:
    sink = await sink_for(host)
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        await sink.write(records[i:i + batch])
    elapsed = time.perf_counter() - start
    stored = 0
    async for conv in sink.collection("conversations").stream():
        stored += conv.get("message_count")
    await sink.close()
    assert stored == len(records), f"{stored} of {len(records)} messages counted"
    return elapsed, sink.commits


async def run(count: int, conversations: int, batch: int) -> None:
    with fsemu.Emulator() as emulator:
        host = emulator.host
        records = events(count, conversations)
        await naive(host, records[:50], 8)  # warm the emulator's JIT and the channel
        rows = []
        base = await naive(host, records, 1)
        rows.append(("one set() per event, in a loop (baseline)", base, None))
        rows.append(("one set() per event, 64 in flight", await naive(host, records, 64), None))
        took, commits = await batched(host, records, 1)
        rows.append(("sink, one event per write()", took, commits))
        took, commits = await batched(host, records, batch)
        rows.append((f"sink, batches of {batch} ({conversations} conversations)", took, commits))
        took, commits = await batched(host, events(count, count), batch)
        rows.append((f"sink, batches of {batch} ({count} conversations)", took, commits))
    print(f"{count} message events, Firestore emulator on 127.0.0.1")
    print(f"{'':<52} {'events/s':>9} {'commits':>8} {'vs baseline':>12}")
    for name, took, commits in rows:
        print(f"{name:<52} {count / took:>9,.0f} {commits if commits is not None else '-':>8} "
              f"{base / took:>11.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--conversations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=200, help="records per write (dispatcher)")
    args = parser.parse_args()
    reason = fsemu.missing()
    if reason:
        print(f"bench/firestore.py skipped: {reason}")
        return 0
    from gateway import logging as gwlog
    from gateway.config import LoggingConfig

    gwlog.setup(LoggingConfig(level="warning", format="console"))
    asyncio.run(run(args.events, args.conversations, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
