"""The dispatcher and the jsonl sink across stops and failures: a dead letter is delivered once
(by its replay), a failing journal never ends a sink worker, a removed sink stops pinning the
event log, one lane's failed write never removes another's lines.

Real components throughout: the SQLite journal in a temporary directory, the jsonl sink on a real
file, the dispatcher's own workers. Faults are injected by subclassing at one seam each.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta

from gateway.config import GatewayConfig, ServerConfig
from gateway.dispatch import Dispatcher, SinkWorker, Tail
from gateway.errors import PermanentError, RetryableError
from gateway.events import Message, Party, conversation_id, encode
from gateway.journal import NewEvent, StoredEvent
from gateway.journal.sqlite import SqliteJournal
from gateway.metrics import Metrics
from gateway.sink import Record
from sinks.jsonl.sink import JsonlConfig, JsonlSink


def message(i: int, customer: str) -> Message:
    return Message(schema=1, id=f"ev-{i}", channel="whatsapp", direction="inbound",
                   account_id="acct", conversation_id=conversation_id("whatsapp", "acct", customer),
                   sender=Party(customer), recipient=Party("acct"),
                   timestamp=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
                   message_id=f"wamid.{i}", type="text", text=f"hi {i}")


async def open_journal(tmp_path) -> SqliteJournal:
    journal = SqliteJournal(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    await journal.open()
    return journal


async def store(journal: SqliteJournal, events: list[Message]) -> list[int]:
    new = [NewEvent(e.id, e.channel, e.conversation_id, encode(e), 1.0) for e in events]
    return await journal.commit_processed(0, new, [])


def jsonl_config(tmp_path, **overrides) -> JsonlConfig:
    settings = dict(path=str(tmp_path / "events.jsonl"), batch_size=5, max_attempts=2,
                    backoff_initial=0.01, backoff_max=0.02)
    return JsonlConfig(**{**settings, **overrides})


def jsonl_ids(tmp_path) -> list[str]:
    with open(tmp_path / "events.jsonl") as lines:
        return [json.loads(line)["id"] for line in lines]


async def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


class DiskFullFor(JsonlSink):
    """The jsonl sink, whose disk is full for ``ev-1`` and whose backend is busy for ``ev-2``."""

    def _write_all(self, fd: int, blob: bytes) -> None:
        if b'"ev-1"' in blob:
            raise OSError(28, "No space left on device")
        if b'"ev-2"' in blob:
            raise RetryableError("busy", retry_after=30)
        super()._write_all(fd, blob)


async def test_a_dead_letter_ahead_of_the_cursor_is_delivered_once_by_its_replay(tmp_path):
    # ev-1 is dead-lettered while ev-2 (another conversation, same batch) still backs off, so the
    # cursor has not moved when the gateway stops. The restart must not deliver ev-1 again: its
    # dead letter stands, and the operator's replay delivers it, once.
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222")])
    # backoff_max 30 s: ev-2's 30 s Retry-After is honoured (a hint is capped at backoff_max)
    sink = DiskFullFor(jsonl_config(tmp_path, backoff_max=30))
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    await until(lambda: journal.dead_letters("jsonl"))
    await dispatcher.stop(0.3)  # ev-2's lane is still waiting out its 30 s Retry-After
    assert await journal.cursor("sink:jsonl") == 0
    await journal.close()

    journal = await open_journal(tmp_path)
    assert await journal.dead_lettered_after("jsonl", 0) == {1}
    dispatcher = Dispatcher(journal, {"jsonl": JsonlSink(jsonl_config(tmp_path))}, Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 2))
    assert jsonl_ids(tmp_path) == ["ev-2"]
    assert [d.event_id for d in await journal.dead_letters("jsonl")] == ["ev-1"]  # not a second
    assert await journal.request_replay("jsonl") == 1
    dispatcher.workers["jsonl"].wake.set()
    await until(lambda: _no_dead_letters(journal))
    await dispatcher.stop(2)
    await journal.close()
    assert sorted(jsonl_ids(tmp_path)) == ["ev-1", "ev-2"]


async def _cursor_at(journal, seq: int) -> bool:
    return await journal.cursor("sink:jsonl") == seq


async def _no_dead_letters(journal) -> bool:
    return not await journal.dead_letters("jsonl")


def locked(method: str, times: int) -> type[SqliteJournal]:
    """The SQLite journal, whose first ``times`` calls of ``method`` fail as a database locked
    past its busy timeout does (``failures`` counts down what is left)."""

    async def fail_first(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return await getattr(SqliteJournal, method)(self, *args, **kwargs)

    return type(f"Locked_{method}", (SqliteJournal,), {"failures": times, method: fail_first})


LockedFor = locked("replays_due", 3)


async def test_a_failing_journal_does_not_end_the_sink_worker(tmp_path):
    journal = LockedFor(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    await journal.open()
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111")])
    dispatcher = Dispatcher(journal, {"jsonl": JsonlSink(jsonl_config(tmp_path))}, Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 1))
    assert journal.failures == 0 and not dispatcher.tasks[0].done()
    later = message(2, "222")  # after the outage: still delivered
    [seq] = await store(journal, [later])
    dispatcher.publish([Record(seq, later, encode(later), 1.0)])
    await until(lambda: _cursor_at(journal, 2))
    await dispatcher.stop(2)
    await journal.close()
    assert jsonl_ids(tmp_path) == ["ev-1", "ev-2"]


async def test_a_sink_removed_from_the_config_no_longer_pins_the_event_log(tmp_path):
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:gone", 0)  # a sink of an earlier config, never to move again
    await store(journal, [message(i, "111") for i in range(1, 4)])
    dispatcher = Dispatcher(journal, {"jsonl": JsonlSink(jsonl_config(tmp_path))}, Metrics())
    await dispatcher.start()
    assert await journal.cursor("sink:gone") is None
    await journal.set_cursor("sink:jsonl", 3)
    await journal.prune(time.time())
    assert await journal.events_after(0, 10) == []
    await dispatcher.stop(2)
    await journal.close()


def test_a_tail_never_claims_events_it_was_not_given():
    tail = Tail(1)
    first = [Record(seq, message(seq, "111"), b"", 1.0) for seq in (1, 2)]
    later = [Record(seq, message(seq, "111"), b"", 1.0) for seq in (5, 6)]
    tail.add(first)
    tail.add(later)  # 3 and 4 were committed but never published here
    assert tail.after(2, 10) is None  # the worker reads 3 and 4 from the journal
    assert [r.seq for r in tail.after(4, 10)] == [5, 6]


class SlowDiskFullFor(JsonlSink):
    """Writing ``ev-9`` waits, writes part of it and then finds the disk full."""

    def _write_all(self, fd: int, blob: bytes) -> None:
        if b'"ev-9"' in blob:
            time.sleep(0.2)  # the other lanes' writes land meanwhile (without the lock)
            os.write(fd, blob[:10])
            raise OSError(28, "No space left on device")
        super()._write_all(fd, blob)


async def test_a_failed_jsonl_write_never_removes_lines_of_other_lanes(tmp_path):
    journal = await open_journal(tmp_path)
    sink = SlowDiskFullFor(jsonl_config(tmp_path, max_attempts=1))
    await sink.start()
    worker = SinkWorker(sink, journal, Tail(1), Metrics())
    events = [message(i, f"c{i}") for i in range(1, 10)]  # nine conversations: nine lanes
    await worker.deliver([Record(i, e, encode(e), 1.0) for i, e in enumerate(events, 1)])
    await sink.close()
    assert sorted(jsonl_ids(tmp_path)) == [f"ev-{i}" for i in range(1, 9)]
    assert [d.event_id for d in await journal.dead_letters("jsonl")] == ["ev-9"]
    await journal.close()


async def test_jsonl_writes_an_id_once_even_twice_in_one_batch(tmp_path):
    sink = JsonlSink(jsonl_config(tmp_path))
    await sink.start()
    event = message(1, "111")
    await sink.write([Record(0, event, encode(event), 1.0)] * 3)
    await sink.close()
    assert jsonl_ids(tmp_path) == ["ev-1"]


async def test_an_old_journal_gains_the_dead_letter_seq_column(tmp_path):
    conn = sqlite3.connect(tmp_path / "journal.db")
    conn.execute(
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL,"
        " event_id TEXT NOT NULL, data BLOB NOT NULL, received_at REAL NOT NULL,"
        " reason TEXT NOT NULL, attempts INTEGER NOT NULL, failed_at REAL NOT NULL,"
        " state TEXT NOT NULL DEFAULT 'dead')")
    conn.execute("INSERT INTO dead_letters(sink, event_id, data, received_at, reason, attempts,"
                 " failed_at) VALUES ('jsonl', 'old', x'7b7d', 1, 'r', 1, 1)")
    conn.commit()
    conn.close()
    journal = await open_journal(tmp_path)
    assert await journal.dead_lettered_after("jsonl", 0) == set()  # seq unknown: 0
    assert [d.event_id for d in await journal.dead_letters("jsonl")] == ["old"]
    await journal.close()


UnprocessedLockedFor = locked("unprocessed", 3)


async def running_processor(journal: SqliteJournal):
    """(processor, its running task, metrics) on ``journal``, WhatsApp enabled, no sinks."""
    from channels.whatsapp import WhatsAppChannel, WhatsAppConfig
    from gateway.processor import Processor

    await journal.open()
    metrics = Metrics()
    dispatcher = Dispatcher(journal, {}, metrics)
    await dispatcher.start()
    channel = WhatsAppChannel(WhatsAppConfig(app_secret="secret"))
    processor = Processor(journal, {"whatsapp": channel}, dispatcher, metrics)
    return processor, asyncio.create_task(processor.run()), metrics


async def test_a_failing_journal_does_not_end_the_processor(tmp_path):
    from tests.conftest import fixture_bytes

    journal = UnprocessedLockedFor(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    processor, task, _ = await running_processor(journal)
    await journal.append("whatsapp", fixture_bytes("whatsapp/text.json"), time.time())
    processor.wake.set()
    await until(lambda: _processed(journal))
    assert journal.failures == 0 and not task.done()
    assert len(await journal.events_after(0, 10)) == 1
    processor.stop()
    await asyncio.wait_for(task, 5)
    await journal.close()


async def _processed(journal) -> bool:
    return journal.pending == 0 and await journal.last_event_seq() > 0


DeadLettersLockedOnce = locked("add_dead_letters", 1)


class BadAndBusy(JsonlSink):
    """``ev-1`` is refused for good; ``ev-2``'s backend stays busy."""

    def _write_all(self, fd: int, blob: bytes) -> None:
        if b'"ev-1"' in blob:
            raise PermanentError("this event is malformed for this sink")
        if b'"ev-2"' in blob:
            raise OSError(11, "Resource temporarily unavailable")
        super()._write_all(fd, blob)


async def test_one_lanes_journal_error_stops_every_lane_of_the_batch(tmp_path):
    # ev-1's dead letter fails to be stored; the batch is retried. ev-2's lane of the first try
    # must not go on meanwhile: two lanes of one conversation would write out of order and
    # dead-letter it twice.
    journal = DeadLettersLockedOnce(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    await journal.open()
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222")])
    sink = BadAndBusy(jsonl_config(tmp_path, max_attempts=4, backoff_initial=0.15,
                                   backoff_max=0.15))  # ev-2's lane outlasts the worker's retry
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 2))
    await asyncio.sleep(1.0)  # a lane left running would dead-letter ev-2 again by now
    await dispatcher.stop(2)
    assert sorted(d.event_id for d in await journal.dead_letters("jsonl")) == ["ev-1", "ev-2"]
    await journal.close()


class SlowJsonl(JsonlSink):
    def _write_all(self, fd: int, blob: bytes) -> None:
        time.sleep(0.2)
        super()._write_all(fd, blob)


async def test_a_jsonl_write_cancelled_midway_is_not_written_twice(tmp_path):
    sink = SlowJsonl(jsonl_config(tmp_path))
    await sink.start()
    event = message(1, "111")
    record = Record(1, event, encode(event), 1.0)
    first = asyncio.create_task(sink.write([record]))
    await asyncio.sleep(0.05)
    first.cancel()  # e.g. a sibling lane failed, or the dispatcher stopped at its timeout
    await asyncio.gather(first, return_exceptions=True)
    await sink.write([record])  # the redelivery
    await sink.close()
    assert jsonl_ids(tmp_path) == ["ev-1"]


async def test_a_request_no_channel_can_read_is_counted_once_across_a_retried_commit(tmp_path):
    journal = locked("commit_processed", 1)(
        GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    processor, task, metrics = await running_processor(journal)
    await journal.append("whatsapp", b"not a webhook", time.time())
    processor.wake.set()
    await until(lambda: _no_pending(journal))
    processor.stop()
    await asyncio.wait_for(task, 5)
    assert len(await journal.dead_letters("normalise:whatsapp")) == 1
    assert metrics.registry.get_sample_value("gateway_normalise_failures_total",
                                             {"channel": "whatsapp"}) == 1
    await journal.close()


async def _no_pending(journal) -> bool:
    return journal.pending == 0


class Slow(JsonlSink):
    """Each write takes a moment (long enough to look at the dispatcher meanwhile)."""

    def _write_all(self, fd: int, blob: bytes) -> None:
        time.sleep(0.5)
        super()._write_all(fd, blob)


async def test_the_dispatcher_is_not_caught_up_while_it_replays(tmp_path):
    # An erasure waits for "caught up" before erasing: a replay still being delivered must
    # count as work in flight, or its events would reach the sink after the erasure.
    from gateway.journal import StoredEvent

    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    event = message(1, "111")
    await journal.add_dead_letters("jsonl", [(StoredEvent(0, encode(event), 1.0), event.id,
                                              "r", 1)])
    dispatcher = Dispatcher(journal, {"jsonl": Slow(jsonl_config(tmp_path))}, Metrics())
    await dispatcher.start()
    assert await dispatcher.caught_up()
    await journal.request_replay("jsonl")
    dispatcher.workers["jsonl"].wake.set()
    await until(lambda: _replaying(dispatcher))
    assert not await dispatcher.caught_up()
    await until(lambda: _no_dead_letters(journal))
    assert await dispatcher.caught_up()
    await dispatcher.stop(2)
    await journal.close()


async def _replaying(dispatcher) -> bool:
    return dispatcher.workers["jsonl"].replaying


class Recording(JsonlSink):
    """The jsonl sink, which also notes (event id, seq) of every record it took; ``refuse``
    decides, per record, an exception to raise instead."""

    def __init__(self, config: JsonlConfig, refuse=None) -> None:
        super().__init__(config)
        self.refuse = refuse or (lambda record: None)
        self.got: list[tuple[str, int]] = []

    async def write(self, records: list[Record]) -> None:
        for record in records:
            error = self.refuse(record)
            if error is not None:
                raise error
        await super().write(records)
        self.got += [(r.event.id, r.seq) for r in records]


async def test_a_replay_ahead_of_the_cursor_waits_for_its_batch_across_restarts(tmp_path):
    # ev-1 is dead-lettered while ev-2 (same batch) backs off; the gateway stops. The operator
    # replays ev-1, and the gateway stops again before ev-2's batch is done. Had the replay
    # delivered ev-1 and deleted its letter at once, the third run's batch would deliver it again.
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222")])
    slow = jsonl_config(tmp_path, backoff_max=30)

    def ev2_busy(record):
        return RetryableError("busy", retry_after=30) if record.event.id == "ev-2" else None

    def ev1_bad(record):
        return PermanentError("bad") if record.event.id == "ev-1" else ev2_busy(record)

    first = Recording(slow, ev1_bad)
    dispatcher = Dispatcher(journal, {"jsonl": first}, Metrics())
    await dispatcher.start()
    await until(lambda: journal.dead_letters("jsonl"))
    await dispatcher.stop(0.3)
    assert await journal.request_replay("jsonl") == 1

    second = Recording(slow, ev2_busy)  # ev-1's problem is fixed; ev-2's backend still busy
    dispatcher = Dispatcher(journal, {"jsonl": second}, Metrics())
    await dispatcher.start()
    await asyncio.sleep(0.5)
    await dispatcher.stop(0.3)
    assert second.got == []  # the replay waits: ev-1's batch has not passed it
    assert [d.state for d in await journal.dead_letters("jsonl")] == ["replay"]

    third = Recording(jsonl_config(tmp_path))
    dispatcher = Dispatcher(journal, {"jsonl": third}, Metrics())
    await dispatcher.start()
    await until(lambda: _no_dead_letters(journal))
    await until(lambda: _cursor_at(journal, 2))
    await dispatcher.stop(2)
    await journal.close()
    assert sorted(third.got) == [("ev-1", 1), ("ev-2", 2)]  # the replay keeps its seq
    assert sorted(jsonl_ids(tmp_path)) == ["ev-1", "ev-2"]


class Call(Message, tag="call"):
    """An event class gateway.events.decode does not know (a plugin's own, or a newer version's)."""


async def test_an_event_that_does_not_decode_is_dead_lettered_and_the_rest_delivered(tmp_path):
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    odd = Call(**{f: getattr(message(2, "111"), f) for f in Message.__struct_fields__})
    await store(journal, [message(1, "111"), odd, message(3, "111")])
    sink = Recording(jsonl_config(tmp_path))
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()  # a restart: the worker reads the events from the journal
    await until(lambda: _cursor_at(journal, 3))
    assert sink.got == [("ev-1", 1), ("ev-3", 3)]
    [letter] = await journal.dead_letters("jsonl")
    assert (letter.event_id, letter.seq) == ("event:2", 2)
    assert letter.reason.startswith("undecodable: ")
    await journal.request_replay("jsonl")  # replaying cannot help it: dead again, with why
    dispatcher.workers["jsonl"].wake.set()
    await until(lambda: _dead_again(journal))
    assert dispatcher.tasks[0].done() is False
    await dispatcher.stop(2)
    await journal.close()


async def _dead_again(journal) -> bool:
    letters = await journal.dead_letters("jsonl")
    return [(d.state, d.reason[:12]) for d in letters] == [("dead", "undecodable:")]


class CancelledInside(JsonlSink):
    """A write that awaits something another task cancelled: CancelledError of its own."""

    async def write(self, records: list[Record]) -> None:
        if any(r.event.id == "ev-1" for r in records):
            waiting = asyncio.get_running_loop().create_future()
            waiting.cancel()
            await waiting
        await super().write(records)


async def test_a_sink_whose_write_raises_cancelled_error_is_retried_not_ended(tmp_path):
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222")])
    dispatcher = Dispatcher(journal, {"jsonl": CancelledInside(jsonl_config(tmp_path))},
                            Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 2))
    assert jsonl_ids(tmp_path) == ["ev-2"]
    [letter] = await journal.dead_letters("jsonl")
    assert letter.event_id == "ev-1" and "CancelledError" in letter.reason
    assert not dispatcher.tasks[0].done()
    await dispatcher.stop(2)  # cancelling the worker itself still stops it
    assert dispatcher.tasks[0].done()
    await journal.close()


async def test_a_batch_of_positions_already_dead_lettered_does_not_end_the_drain(tmp_path):
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    events = [message(i, f"c{i}") for i in (1, 2, 3)]
    await store(journal, events)
    await journal.add_dead_letters("jsonl", [(StoredEvent(1, encode(events[0]), 1.0), "ev-1",
                                              "r", 1)])
    dispatcher = Dispatcher(journal, {"jsonl": JsonlSink(jsonl_config(tmp_path, batch_size=1))},
                            Metrics())
    await dispatcher.start()
    await dispatcher.stop(5)  # stopped at once: the drain must still deliver ev-2 and ev-3
    assert jsonl_ids(tmp_path) == ["ev-2", "ev-3"]
    assert await journal.cursor("sink:jsonl") == 3
    await journal.close()


async def test_a_retry_hint_longer_than_backoff_max_is_capped(tmp_path):
    # One conversation's retry holds the sink's next batch; a sink's hint of an hour must not.
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111")])
    tries = []

    def busy_twice(record):
        tries.append(record.event.id)
        return RetryableError("busy", retry_after=3600) if len(tries) <= 2 else None

    sink = Recording(jsonl_config(tmp_path, max_attempts=5, backoff_max=0.05), busy_twice)
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 1), timeout=5)
    await store(journal, [message(2, "222")])
    dispatcher.tail.covered_from = 10**9  # read it from the journal (it was stored behind us)
    dispatcher.workers["jsonl"].wake.set()
    await until(lambda: _cursor_at(journal, 2), timeout=5)
    await dispatcher.stop(2)
    await journal.close()
    assert [g[0] for g in sink.got] == ["ev-1", "ev-2"]


async def test_an_erased_contacts_events_in_memory_never_reach_a_lagging_sink(tmp_path):
    # The erasure waited for the sinks and gave up on a lagging one; it erased the journal. The
    # dispatcher's in-memory tail must not hand that sink the erased events afterwards.
    from gateway.journal import contact_matcher

    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    gate = asyncio.Event()

    class Lagging(Recording):
        async def write(self, records: list[Record]) -> None:
            await gate.wait()
            await super().write(records)

    sink = Lagging(jsonl_config(tmp_path, batch_size=1))
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    events = [message(1, "15550001111"), message(2, "15550009999"), message(3, "15550001111")]
    seqs = await store(journal, events)
    dispatcher.publish([Record(seq, ev, encode(ev), 1.0)
                        for seq, ev in zip(seqs, events, strict=True)])
    await asyncio.sleep(0.1)  # ev-1 is being written, slowly
    assert await journal.erase_contact("whatsapp", "15550009999") == {"events": 1,
                                                                       "dead_letters": 0}
    assert dispatcher.tail.forget(contact_matcher("whatsapp", "15550009999")) == 1
    gate.set()
    await until(lambda: _cursor_at(journal, 3))
    assert await dispatcher.caught_up()
    await dispatcher.stop(1)
    await journal.close()
    assert sink.got == [("ev-1", 1), ("ev-3", 3)]


async def test_a_replay_that_fails_again_leaves_one_dead_letter_across_a_stop(tmp_path):
    # ev-1's replay fails again for good while ev-2's (another conversation, same replay batch)
    # still backs off when the gateway stops: the replay never finished. ev-1 must have one dead
    # letter, not its replayed one and the new one (a later replay of both wrote it twice).
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 2)
    events = [message(1, "111"), message(2, "222")]
    await journal.add_dead_letters("jsonl", [(StoredEvent(i, encode(e), 1.0), e.id, "r", 1)
                                             for i, e in enumerate(events, 1)])
    assert await journal.request_replay("jsonl") == 2
    sink = BadAndBusy(jsonl_config(tmp_path, max_attempts=4, backoff_initial=30, backoff_max=30))
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()

    async def ev1_dead_again() -> bool:
        return any(d.event_id == "ev-1" and d.state == "dead"
                   for d in await journal.dead_letters("jsonl"))

    await until(ev1_dead_again)
    await dispatcher.stop(0.3)  # ev-2's lane is still waiting out its 30 s backoff
    letters = await journal.dead_letters("jsonl")
    assert sorted((d.event_id, d.state) for d in letters) == [("ev-1", "dead"), ("ev-2", "replay")]
    await journal.close()

    journal = await open_journal(tmp_path)
    dispatcher = Dispatcher(journal, {"jsonl": JsonlSink(jsonl_config(tmp_path))}, Metrics())
    await dispatcher.start()
    await journal.request_replay("jsonl")
    dispatcher.workers["jsonl"].wake.set()
    await until(lambda: _no_dead_letters(journal))
    await dispatcher.stop(2)
    await journal.close()
    assert sorted(jsonl_ids(tmp_path)) == ["ev-1", "ev-2"]


async def test_a_batch_told_to_wait_retries_its_events_after_the_hint(tmp_path):
    # A rate-limited batch (a 429 with Retry-After) is retried event by event: not at once,
    # a second burst at the provider, but after the hint (at most backoff_max).
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222"), message(3, "111"),
                          message(4, "111")])  # one conversation of three events, and another
    tries: list[tuple[str, float]] = []

    def limited_once(record):  # the batch's write (it stops at its first record) is refused
        tries.append((record.event.id, time.monotonic()))
        return RetryableError("429", retry_after=0.5) if len(tries) == 1 else None

    sink = Recording(jsonl_config(tmp_path, max_attempts=5, backoff_initial=0.01,
                                  backoff_max=2.0), limited_once)
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 4), timeout=10)
    await dispatcher.stop(2)
    await journal.close()
    (_, refused_at), *retried = tries
    assert sorted(e for e, _ in retried) == ["ev-1", "ev-2", "ev-3", "ev-4"]  # one attempt each
    waited = [at - refused_at for _, at in retried]
    assert min(waited) >= 0.45  # after the hint, not at once
    assert max(waited) < 0.9  # once per conversation, not once per event (3 x 0.5 s)


async def test_a_failing_replay_of_letters_without_a_position_retries_each_once(tmp_path):
    # Dead letters of an older version carry no position (seq 0). Two of them, of two
    # conversations, replayed in one batch that fails: each event is retried on its own, once
    # (a position is not a key to tell them apart by).
    journal = await open_journal(tmp_path)
    await journal.set_cursor("sink:jsonl", 0)
    events = [message(1, "111"), message(2, "222")]
    await journal.add_dead_letters("jsonl", [(StoredEvent(0, encode(e), 1.0), e.id, "r", 1)
                                             for e in events])
    assert await journal.request_replay("jsonl") == 2
    calls = []

    def refuse_once(record):
        calls.append(record.event.id)
        return RetryableError("busy") if len(calls) == 1 else None

    sink = Recording(jsonl_config(tmp_path, max_attempts=3), refuse_once)
    dispatcher = Dispatcher(journal, {"jsonl": sink}, Metrics())
    await dispatcher.start()
    await until(lambda: _no_dead_letters(journal))
    await dispatcher.stop(2)
    await journal.close()
    assert sorted(e for e, _ in sink.got) == ["ev-1", "ev-2"]  # each written once
    assert sorted(jsonl_ids(tmp_path)) == ["ev-1", "ev-2"]


class SlowToRefuse(Recording):
    """Refuses ev-2 for good, after ev-1's lane (another conversation) has been written."""

    async def write(self, records: list[Record]) -> None:
        if any(r.event.id == "ev-2" for r in records):
            await asyncio.sleep(0.2)  # ev-1's lane is done by then
            raise PermanentError("malformed for this sink")
        await super().write(records)


async def test_a_batch_retried_after_a_journal_error_writes_each_event_once(tmp_path):
    # ev-1 (its conversation alone) is written when the batch is retried lane by lane; ev-2 is
    # refused for good, and storing its dead letter fails once (the journal locked). The batch
    # is delivered again: ev-1 must not be written, nor counted "ok", a second time.
    journal = DeadLettersLockedOnce(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    await journal.open()
    await journal.set_cursor("sink:jsonl", 0)
    await store(journal, [message(1, "111"), message(2, "222")])
    sink = SlowToRefuse(jsonl_config(tmp_path))
    metrics = Metrics()
    dispatcher = Dispatcher(journal, {"jsonl": sink}, metrics)
    await dispatcher.start()
    await until(lambda: _cursor_at(journal, 2))
    await dispatcher.stop(2)
    assert [d.event_id for d in await journal.dead_letters("jsonl")] == ["ev-2"]
    await journal.close()
    assert [e for e, _ in sink.got] == ["ev-1"] and jsonl_ids(tmp_path) == ["ev-1"]
    ok = metrics.registry.get_sample_value("gateway_sink_deliveries_total",
                                           {"sink": "jsonl", "outcome": "ok"})
    assert ok == 1


async def test_a_replay_retried_after_a_journal_error_writes_each_letter_once(tmp_path):
    # The same as a batch, for a replay: ev-1's letter is written by its lane, ev-2's is refused
    # again and storing its new letter fails once. The replay is retried: ev-1's letter was
    # done when it was written, so it is neither written nor counted "ok" again.
    journal = DeadLettersLockedOnce(GatewayConfig(server=ServerConfig(data_dir=str(tmp_path))))
    await journal.open()
    await journal.set_cursor("sink:jsonl", 2)
    events = [message(1, "111"), message(2, "222")]
    await SqliteJournal.add_dead_letters(journal, "jsonl", [
        (StoredEvent(i, encode(e), 1.0), e.id, "refused", 1) for i, e in enumerate(events, 1)])
    journal.failures = 1  # the next add_dead_letters (ev-2's new letter) fails once
    assert await journal.request_replay("jsonl") == 2
    sink = SlowToRefuse(jsonl_config(tmp_path))
    metrics = Metrics()
    dispatcher = Dispatcher(journal, {"jsonl": sink}, metrics)
    await dispatcher.start()

    async def settled() -> bool:
        letters = await journal.dead_letters("jsonl")
        return [(d.event_id, d.state) for d in letters] == [("ev-2", "dead")]

    await until(settled)
    await dispatcher.stop(2)
    await journal.close()
    assert [e for e, _ in sink.got] == ["ev-1"] and jsonl_ids(tmp_path) == ["ev-1"]
    ok = metrics.registry.get_sample_value("gateway_sink_deliveries_total",
                                           {"sink": "jsonl", "outcome": "ok"})
    assert ok == 1
