"""RedisJournal on a real redis-server: replicas sharing one Redis, take-over, leases, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from gateway import config as gwconfig
from gateway.journal import NewEvent
from gateway.journal import redis as redis_journal
from gateway.journal.redis import RedisJournal, request_seq
from gateway.redis_client import split_url


def cfg(url: str, window: int = 7 * 24 * 3600) -> gwconfig.GatewayConfig:
    return gwconfig.GatewayConfig(queue=gwconfig.QueueConfig(
        backend="redis", redis_url=url, dedupe_window_seconds=window))


@pytest.fixture
async def replicas(redis_url):
    """Two journals on one Redis and one key prefix, as two gateway replicas have."""
    opened = [RedisJournal(cfg(redis_url), stale_ms=300) for _ in range(2)]
    for j in opened:
        await j.open()
    yield opened
    for j in opened:
        await j.close()


def ev(i: str) -> NewEvent:
    return NewEvent(i, "whatsapp", "whatsapp:1:2", f'{{"id":"{i}"}}'.encode(), 7.25)


def test_url_prefix_and_request_seq():
    assert split_url("redis://h:1/0?prefix=abc") == ("redis://h:1/0", "abc")
    assert split_url("redis://h:1/2?prefix=x&ssl_cert_reqs=none") == (
        "redis://h:1/2?ssl_cert_reqs=none", "x")
    assert split_url("redis://h:1/0") == ("redis://h:1/0", None)
    assert RedisJournal(cfg("redis://h/0")).p == "gw"
    assert RedisJournal(cfg("redis://h/0?prefix=a")).p == "a"
    assert RedisJournal(cfg("redis://h/0?prefix=a"), prefix="b").p == "b"
    assert request_seq(b"1700000000000-0") < request_seq("1700000000000-5") < request_seq(
        "1700000000001-0")


async def test_each_request_goes_to_one_replica(replicas):
    a, b = replicas
    for n in range(10):
        await (a if n % 2 else b).append("whatsapp", f"r{n}".encode(), float(n))
    assert (a.pending, b.pending) == (10, 9)  # XLEN (every replica's) as of its last round trip
    got_a = await a.unprocessed(4)
    got_b = await b.unprocessed(100)
    assert len(got_a) == 4 and len(got_b) == 6
    assert sorted(r.body for r in got_a + got_b) == sorted(f"r{n}".encode() for n in range(10))
    await a.commit_processed(got_a[-1].seq, [ev("x")], [])
    await b.commit_processed(got_b[-1].seq, [ev("y")], [])
    assert (a.pending, b.pending) == (6, 0)  # a has not heard of b's commit yet
    assert await a.unprocessed(10) == [] and await b.unprocessed(10) == []
    assert a.pending == 0
    assert [s.data for s in await b.events_after(0, 10)] == [b'{"id":"x"}', b'{"id":"y"}']


async def test_the_same_event_from_two_replicas_is_stored_once(replicas):
    a, b = replicas
    await a.append("whatsapp", b"one", 1.0)
    await b.append("whatsapp", b"two", 1.0)
    ra, rb = await a.unprocessed(1), await b.unprocessed(1)
    results = await asyncio.gather(
        a.commit_processed(ra[-1].seq, [ev("same"), ev("only-a")], []),
        b.commit_processed(rb[-1].seq, [ev("same"), ev("only-b")], []))
    firsts = [r[0] for r in results]
    assert sorted(firsts, key=lambda s: s is None)[1] is None and any(firsts)
    stored = await a.events_after(0, 10)
    assert sorted(s.data for s in stored) == [
        b'{"id":"only-a"}', b'{"id":"only-b"}', b'{"id":"same"}']
    assert [s.seq for s in stored] == [1, 2, 3] and await b.last_event_seq() == 3


async def test_a_dead_replicas_requests_are_taken_over_once(replicas):
    a, b = replicas
    for n in range(3):
        await a.append("whatsapp", f"r{n}".encode(), 1.0)
    taken = await a.unprocessed(10)  # ... and replica a dies before committing
    assert len(taken) == 3
    assert await b.unprocessed(10) == []  # not stale yet
    await asyncio.sleep(0.5)
    b._next_autoclaim = 0.0
    again = await b.unprocessed(10)
    assert [r.body for r in again] == [r.body for r in taken] and [r.seq for r in again] == [
        r.seq for r in taken]
    assert await b.commit_processed(again[-1].seq, [ev("e1"), ev("e2")], []) == [1, 2]
    assert b.pending == 0
    # a comes back (a long pause, not a death) and commits what it had: nothing is stored twice
    assert await a.commit_processed(taken[-1].seq, [ev("e1"), ev("e2")], []) == [None, None]
    assert len(await a.events_after(0, 10)) == 2 and a.pending == 0
    assert await a.unprocessed(10) == [] and await b.unprocessed(10) == []


async def test_a_late_commit_of_a_request_no_channel_could_read_keeps_one_dead_letter(replicas):
    a, b = replicas
    await a.append("whatsapp", b'{"not": "a webhook"}', 1.0)
    taken = await a.unprocessed(10)  # ... and replica a pauses past stale_ms
    await asyncio.sleep(0.5)
    b._next_autoclaim = 0.0
    again = await b.unprocessed(10)
    await b.commit_processed(again[-1].seq, [], [(again[0], "BadPayload('x')")])
    await a.commit_processed(taken[-1].seq, [], [(taken[0], "BadPayload('x')")])  # late
    assert [d.event_id for d in await a.dead_letters()] == [f"request:{taken[0].seq}"]
    assert await a.dead_letter_counts() == {"normalise:whatsapp": 1}


async def test_event_stream_layout_and_dedupe_ttl(redis_url):
    j = RedisJournal(cfg(redis_url, window=3600))
    await j.open()
    try:
        await j.append("whatsapp", b"body", 5.5)
        (req,) = await j.unprocessed(10)
        (seq,) = await j.commit_processed(req.seq, [ev("evt")], [])
        ((stream_id, fields),) = await j.redis.xrange(f"{j.p}:events")
        assert stream_id == f"{seq}-0".encode()
        assert fields == {b"id": b"evt", b"channel": b"whatsapp",
                          b"conversation_id": b"whatsapp:1:2", b"received_at": b"7.25",
                          b"data": b'{"id":"evt"}'}
        assert 3590 <= await j.redis.ttl(f"{j.p}:seen:evt") <= 3600
        assert int(await j.redis.get(f"{j.p}:events:seq")) == seq
        assert await j.redis.xlen(f"{j.p}:requests") == 0  # processed requests are deleted
        assert (await j.redis.xpending(f"{j.p}:requests", "processors"))["pending"] == 0
    finally:
        await j.close()


async def test_seen_ids_expire_with_the_window(redis_url):
    j = RedisJournal(cfg(redis_url, window=1))
    await j.open()
    try:
        for _ in range(2):
            await j.append("whatsapp", b"b", 1.0)
            batch = await j.unprocessed(10)
            first = await j.commit_processed(batch[-1].seq, [ev("short")], [])
            assert first[0] is not None
            await asyncio.sleep(1.2)  # past the de-duplication window: the id is new again
    finally:
        await j.close()


async def test_recovers_when_the_stream_is_deleted(redis_url):
    j = RedisJournal(cfg(redis_url))
    await j.open()
    try:
        await j.redis.delete(f"{j.p}:requests")  # FLUSHDB-like: the group is gone
        await j.append("whatsapp", b"after", 1.0)
        (req,) = await j.unprocessed(10)
        assert req.body == b"after"
        await j.commit_processed(req.seq, [], [])
        assert j.pending == 0
    finally:
        await j.close()


async def test_leases(replicas):
    a, b = replicas
    assert await a.acquire_lease("sink:x", "owner-a", 300)
    assert await a.acquire_lease("sink:x", "owner-a", 300)  # renewal
    assert not await b.acquire_lease("sink:x", "owner-b", 300)
    assert await b.acquire_lease("sink:y", "owner-b", 300)  # leases are per sink
    assert not await b.release_lease("sink:x", "owner-b")  # not b's to give back
    assert not await b.acquire_lease("sink:x", "owner-b", 300)
    assert await a.release_lease("sink:x", "owner-a")
    assert await b.acquire_lease("sink:x", "owner-b", 200)
    await asyncio.sleep(0.35)  # b stops renewing (died): the lease expires
    assert await a.acquire_lease("sink:x", "owner-a", 10_000)
    await a.close()  # a graceful stop gives its leases back at once
    assert await b.acquire_lease("sink:x", "owner-b", 10_000)
    await a.open()


async def test_close_forgets_the_consumer_and_prune_forgets_idle_ones(redis_url, monkeypatch):
    a, b, c = (RedisJournal(cfg(redis_url), consumer=f"replica-{n}") for n in "abc")
    for j in (a, b, c):
        await j.open()

    async def consumers() -> set[bytes]:
        return {x["name"] for x in await a.redis.xinfo_consumers(a.k_requests, "processors")}

    try:
        for n in range(3):
            await a.append("whatsapp", f"r{n}".encode(), 1.0)
        for j in (a, b, c):
            (req,) = await j.unprocessed(1)
            if j is not b:  # b keeps owing its request
                await j.commit_processed(req.seq, [], [])
        assert await consumers() == {b"replica-a", b"replica-b", b"replica-c"}
        await c.redis.aclose()  # c dies without closing
        c.redis = None
        await b.close()  # b still owes a request: it stays until taken over
        monkeypatch.setattr(redis_journal, "IDLE_CONSUMER_MS", -1)
        await a.prune(time.time())  # c owes nothing: forgotten
        assert await consumers() == {b"replica-a", b"replica-b"}
        await a.close()
        await a.open()
        assert await consumers() == {b"replica-b"}
    finally:
        await a.close()
        await b.close()


async def test_acknowledged_appends_survive_a_redis_crash(own_redis):
    url, start = own_redis
    proc = start()
    j = RedisJournal(cfg(url))
    await j.open()
    for n in range(50):
        await j.append("whatsapp", f"r{n}".encode(), float(n))
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no final save: only the AOF remains
    proc.wait(10)
    assert not await j.ping()
    with pytest.raises(Exception):  # noqa: B017, PT011 - the intake answers 500; Meta retries
        await j.append("whatsapp", b"lost", 1.0)
    # the processor's and the sink workers' calls wait for Redis instead of failing
    waiting = asyncio.create_task(j.unprocessed(100))
    cursor = asyncio.create_task(j.cursor("sink:x"))
    await asyncio.sleep(0.5)
    assert not waiting.done() and not cursor.done()
    assert not await j.acquire_lease("sink:x", "me", 1000)  # cannot renew: stop delivering
    start()
    try:
        requests = await asyncio.wait_for(waiting, 15)
        assert [r.body for r in requests] == [f"r{n}".encode() for n in range(50)]
        assert await asyncio.wait_for(cursor, 15) is None
        await j.commit_processed(requests[-1].seq, [], [])
        assert j.pending == 0
        fresh = RedisJournal(cfg(url))
        await fresh.open()
        assert fresh.pending == 0 and await fresh.unprocessed(10) == []
        await fresh.close()
    finally:
        await j.close()


async def test_a_cancelled_journal_loop_always_stops(redis_url):
    """redis-py may swallow the cancellation of a task awaiting a command; the journal's calls
    raise it again, so the processor and the sink workers stop when the gateway shuts down."""
    from gateway.journal.redis import RedisJournal

    cfg = gwconfig.GatewayConfig(queue=gwconfig.QueueConfig(backend="redis", redis_url=redis_url))
    journal = RedisJournal(cfg)
    await journal.open()
    try:
        async def loop() -> None:
            for _ in range(1_000_000):  # bounded, but far longer than the test
                await journal.cursor("sink:x")
                await journal.events_after(0, 10)

        for n in range(200):
            task = asyncio.create_task(loop())
            await asyncio.sleep(0.0002 * (n % 7))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2.0)
            assert done and task.cancelled(), f"round {n}: the cancellation was lost"
    finally:
        await journal.close()


class CutOff(RedisJournal):
    """A replica's journal whose lease calls fail while ``down`` (as when Redis is out of reach:
    acquire_lease answers False)."""

    down = False

    async def acquire_lease(self, name, owner, ttl_ms):
        if self.down:
            await asyncio.sleep(0.05)
            return False
        return await super().acquire_lease(name, owner, ttl_ms)


async def test_a_worker_whose_lease_lapsed_never_resumes_its_stale_batch(redis_url, monkeypatch):
    # A's first write is refused ("retry in 1.5 s") and A is then cut off from Redis: its lease
    # lapses, B takes it, delivers and stops. When A reaches Redis again, its renewal must not
    # take the free lease back and carry on with the batch B has delivered.
    from datetime import UTC, datetime

    from gateway import dispatch
    from gateway.config import SinkConfig
    from gateway.errors import RetryableError
    from gateway.events import Message, Party, conversation_id, encode
    from gateway.metrics import Metrics
    from gateway.sink import Sink

    monkeypatch.setattr(dispatch, "LEASE_MS", 600)
    writes: list[str] = []

    class Recording(Sink):
        name = "rec"

        def __init__(self, who: str, refuse_first: bool) -> None:
            super().__init__(SinkConfig(max_attempts=3, backoff_initial=0.01, backoff_max=2))
            self.who, self.refuse_first = who, refuse_first

        async def write(self, records):
            if self.refuse_first:
                self.refuse_first = False
                raise RetryableError("busy", retry_after=1.5)
            writes.extend(f"{self.who}:{r.event.id}" for r in records)

    a_journal, b_journal = CutOff(cfg(redis_url)), RedisJournal(cfg(redis_url))
    await a_journal.open()
    await b_journal.open()
    event = Message(schema=1, id="ev-1", channel="whatsapp", direction="inbound", account_id="a",
                    conversation_id=conversation_id("whatsapp", "a", "1"), sender=Party("1"),
                    recipient=Party("a"), timestamp=datetime(2026, 1, 1, tzinfo=UTC),
                    message_id="wamid.1", type="text", text="hi")
    await a_journal.set_cursor("sink:rec", 0)
    await a_journal.commit_processed(0, [NewEvent(event.id, event.channel, event.conversation_id,
                                                  encode(event), 1.0)], [])
    a = dispatch.SinkWorker(Recording("A", True), a_journal, dispatch.Tail(1, disabled=True),
                            Metrics())
    b = dispatch.SinkWorker(Recording("B", False), b_journal, dispatch.Tail(1, disabled=True),
                            Metrics())
    running_a = asyncio.create_task(a.run())
    await asyncio.sleep(0.05)
    a_journal.down = True
    running_b = asyncio.create_task(b.run())
    await asyncio.sleep(0.95)
    b.stop()
    await running_b
    await b_journal.release_lease("sink:rec", b.owner)
    await asyncio.sleep(0.1)
    a_journal.down = False
    await asyncio.sleep(1.0)  # past A's retry: a stale write would land now
    a.stop()
    await asyncio.wait_for(running_a, 5)
    assert writes == ["B:ev-1"]
    await a_journal.close()
    await b_journal.close()


async def test_entries_of_a_read_whose_reply_was_lost_are_processed_at_once(redis_url):
    """The client resends a command whose reply it lost by itself: the entries of the lost
    XREADGROUP are this replica's then, though the journal never saw them. It must process them
    on its next read, not after stale_ms (when a take-over would find them)."""
    journal = RedisJournal(cfg(redis_url), stale_ms=60_000)
    await journal.open()
    try:
        for body in (b"one", b"two"):
            await journal.append("whatsapp", body, 1.0)
        lost = await journal.redis.xreadgroup(  # handed to this consumer; the reply never arrives
            redis_journal.GROUP, journal.consumer, {journal.k_requests: ">"}, count=10)
        assert len(lost[0][1]) == 2
        got = await journal.unprocessed(10)
        assert [r.body for r in got] == [b"one", b"two"]
        await journal.commit_processed(got[-1].seq, [], [])
        assert await journal.unprocessed(10) == []
    finally:
        await journal.close()


async def test_a_dead_letter_stored_twice_by_a_retry_is_kept_once(redis_url):
    """A retried add_dead_letters whose first run happened (its reply lost) adds no second
    letter; a replayed letter that fails again is dead-lettered anew, as it must be."""
    from gateway.journal import StoredEvent

    journal = RedisJournal(cfg(redis_url))
    await journal.open()
    try:
        item = (StoredEvent(5, b'{"id":"e5"}', 1.0), "e5", "Boom", 3)
        await journal.add_dead_letters("storage", [item])
        await journal.add_dead_letters("storage", [item])  # the retry
        assert [(d.event_id, d.seq) for d in await journal.dead_letters()] == [("e5", 5)]
        assert await journal.dead_letter_counts() == {"storage": 1}
        assert await journal.request_replay("storage") == 1
        [marked] = await journal.replays_due("storage", 10)
        await journal.add_dead_letters("storage", [item])  # the replay failed again
        await journal.finish_replays([marked.id])
        letters = await journal.dead_letters()
        assert [(d.event_id, d.state) for d in letters] == [("e5", "dead")]
        assert letters[0].id != marked.id
    finally:
        await journal.close()


async def test_erasure_records_are_compare_and_set_across_replicas(replicas):
    """Two replicas erasing one contact: a record never moves back to an older request, and a
    record another replica renewed after it was read is not deleted as passed."""
    a, b = replicas
    for n in range(3):
        await a.append("whatsapp", f"body{n}".encode(), 1.0)
    first, *_ = await a.unprocessed(10)
    field = '["whatsapp", "15550001234"]'
    await a._record_erasure(field, first.seq + 5)
    await b._record_erasure(field, first.seq)  # older: kept as it was
    assert await a.erasures() == {("whatsapp", "15550001234"): first.seq + 5}
    found = await a.redis.hgetall(a.k_erasures)
    await b._record_erasure(field, first.seq + 9)  # renewed after a read it
    await a._drop_passed([field.encode()], found)  # ... so a's view of it is stale: kept
    assert await a.erasures() == {("whatsapp", "15550001234"): first.seq + 9}
    await a._drop_passed([field.encode()], await a.redis.hgetall(a.k_erasures))
    assert await a.erasures() == {}


async def test_an_erasure_and_another_replicas_new_pairs_never_leave_a_pair_unfindable(
        replicas):
    """Another replica learns a new pair of the customer while an erasure retires its pairs:
    the new pair is either retired with the others or still findable through the customer's set
    (a later erasure of the number must erase it). The other replica's write is made to land at
    the worst moment: right after the retiring replica reads the customer's set, if it reads it
    from Python at all (the retiring script reads and writes in one step), else right after."""
    mine, other = replicas
    w, first, new = "15550001234", "US.0001", "US.0002"
    await mine.learn_aliases({("whatsapp", first): w})
    read, landed = mine.redis.smembers, []

    async def smembers(*args, **kwargs):
        found = await read(*args, **kwargs)
        if not landed:
            landed.append(await other.learn_aliases({("whatsapp", new): w}))
        return found

    mine.redis.smembers = smembers
    try:
        await mine.retire_aliases("whatsapp", [w])
    finally:
        mine.redis.smembers = read
    if not landed:
        await other.learn_aliases({("whatsapp", new): w})
    assert await mine.aliases([("whatsapp", first)]) == {}
    if await mine.aliases([("whatsapp", new)]):
        assert await mine.aliases_of("whatsapp", w) == [new]
