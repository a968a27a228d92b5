"""The Journal protocol's semantics, for both backends (SQLite and Redis on a real redis-server)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway import config as gwconfig
from gateway.events import Message, Party, conversation_id, encode
from gateway.journal import NewEvent, StoredEvent
from gateway.journal.sqlite import SqliteJournal


@pytest.fixture(params=["sqlite", "redis"])
async def journal(request, tmp_path):
    if request.param == "sqlite":
        cfg = gwconfig.GatewayConfig(server=gwconfig.ServerConfig(data_dir=str(tmp_path)))
        j = SqliteJournal(cfg)
    else:
        from gateway.journal.redis import RedisJournal

        url = request.getfixturevalue("redis_url")
        cfg = gwconfig.GatewayConfig(queue=gwconfig.QueueConfig(backend="redis", redis_url=url))
        j = RedisJournal(cfg)
    await j.open()
    yield j
    await j.close()


def ev(i: str, conv: str = "c") -> NewEvent:
    return NewEvent(i, "whatsapp", conv, f'{{"id":"{i}"}}'.encode(), 1.5)


def message(i: str, customer: str, channel: str = "whatsapp") -> NewEvent:
    conv = conversation_id(channel, "acct", customer)
    event = Message(schema=1, id=i, channel=channel, direction="inbound", account_id="acct",
                    conversation_id=conv, sender=Party(customer), recipient=Party("acct"),
                    timestamp=datetime(2026, 1, 1, tzinfo=UTC), type="text", text="hi")
    return NewEvent(i, channel, conv, encode(event), 2.5)


async def test_empty(journal):
    assert journal.pending == 0
    assert await journal.unprocessed(10) == []
    assert await journal.events_after(0, 10) == []
    assert await journal.last_event_seq() == 0
    assert await journal.dead_letters() == [] and await journal.dead_letter_counts() == {}
    assert await journal.ping()


async def test_append_process_dedupe(journal):
    for n in range(3):
        await journal.append("whatsapp", f"body{n}".encode(), 10.0 + n)
    assert journal.pending == 3
    requests = await journal.unprocessed(10)
    assert [r.body for r in requests] == [b"body0", b"body1", b"body2"]
    assert [r.channel for r in requests] == ["whatsapp"] * 3
    assert [r.received_at for r in requests] == [10.0, 11.0, 12.0]
    assert [r.seq for r in requests] == sorted({r.seq for r in requests})
    seqs = await journal.commit_processed(requests[-1].seq, [ev("a"), ev("b"), ev("a")], [])
    assert seqs[0] and seqs[1] and seqs[2] is None and seqs[1] > seqs[0]
    assert journal.pending == 0 and await journal.unprocessed(10) == []
    await journal.append("whatsapp", b"again", 20.0)
    assert journal.pending == 1
    requests = await journal.unprocessed(10)
    assert await journal.commit_processed(requests[-1].seq, [ev("b"), ev("c")], []) == [
        None, seqs[1] + 1]
    stored = await journal.events_after(0, 10)
    assert [s.data for s in stored] == [b'{"id":"a"}', b'{"id":"b"}', b'{"id":"c"}']
    assert [s.received_at for s in stored] == [1.5] * 3
    assert await journal.last_event_seq() == stored[-1].seq
    after_first = await journal.events_after(stored[0].seq, 10)
    assert [s.seq for s in after_first] == [s.seq for s in stored[1:]]
    assert [s.seq for s in await journal.events_after(0, 2)] == [s.seq for s in stored[:2]]
    assert await journal.events_after(stored[-1].seq, 10) == []


async def test_uncommitted_requests_are_offered_again(journal):
    for n in range(4):
        await journal.append("whatsapp", f"r{n}".encode(), 1.0)
    first = await journal.unprocessed(10)
    again = await journal.unprocessed(10)  # e.g. the commit failed: the same batch, in order
    assert [r.body for r in again] == [r.body for r in first] == [b"r0", b"r1", b"r2", b"r3"]
    assert [r.seq for r in again] == [r.seq for r in first]
    await journal.commit_processed(again[1].seq, [], [])  # only the first two
    assert journal.pending == 2
    rest = await journal.unprocessed(10)
    assert [r.body for r in rest] == [b"r2", b"r3"]
    await journal.commit_processed(rest[-1].seq, [], [])
    assert journal.pending == 0 and await journal.unprocessed(10) == []


async def test_unprocessed_honours_limit(journal):
    for n in range(5):
        await journal.append("instagram", f"r{n}".encode(), 1.0)
    batch = await journal.unprocessed(2)
    assert [r.body for r in batch] == [b"r0", b"r1"]
    await journal.commit_processed(batch[-1].seq, [], [])
    batch = await journal.unprocessed(2)
    assert [r.body for r in batch] == [b"r2", b"r3"] and batch[0].channel == "instagram"
    await journal.commit_processed(batch[-1].seq, [], [])
    assert journal.pending == 1


async def test_cursors_start_unset_and_only_move_forward(journal):
    assert await journal.cursor("sink:x") is None
    await journal.set_cursor("sink:x", 5)
    await journal.set_cursor("sink:x", 3)
    assert await journal.cursor("sink:x") == 5
    await journal.set_cursor("sink:x", 9)
    assert await journal.cursor("sink:x") == 9
    await journal.set_cursor("sink:y", 0)
    assert await journal.cursor("sink:y") == 0


async def test_forget_cursors_keeps_configured_sinks(journal):
    await journal.set_cursor("sink:keep", 1)
    await journal.set_cursor("sink:gone", 1)
    await journal.forget_cursors({"keep"})
    assert await journal.cursor("sink:keep") == 1 and await journal.cursor("sink:gone") is None


async def test_dead_letters_and_replay(journal):
    stored = StoredEvent(1, b'{"id":"a"}', 2.0)
    await journal.add_dead_letters("s1", [(stored, "a", "Boom: broken", 3)])
    await journal.add_dead_letters("s2", [(stored, "a", "Other", 1)])
    await journal.add_dead_letters("s1", [(StoredEvent(2, b'{"id":"b"}', 3.0), "b", "x" * 3000, 2)])
    letters = await journal.dead_letters("s1")
    assert [(d.sink, d.event_id, d.data, d.received_at, d.reason[:12], d.attempts, d.state)
            for d in letters] == [("s1", "a", b'{"id":"a"}', 2.0, "Boom: broken", 3, "dead"),
                                  ("s1", "b", b'{"id":"b"}', 3.0, "xxxxxxxxxxxx", 2, "dead")]
    assert len(letters[1].reason) == 2000 and letters[0].id < letters[1].id
    assert [d.sink for d in await journal.dead_letters()] == ["s1", "s2", "s1"]
    assert len(await journal.dead_letters(limit=2)) == 2
    assert await journal.dead_letter_counts() == {"s1": 2, "s2": 1}
    assert await journal.replays_due("s1", 10) == []
    assert await journal.request_replay("s1", [letters[0].id]) == 1
    assert [d.state for d in await journal.dead_letters("s1")] == ["replay", "dead"]
    assert await journal.request_replay("s1", [letters[0].id]) == 0  # already marked
    assert await journal.replays_due("s2", 10) == []
    due = await journal.replays_due("s1", 10)
    assert [(d.id, d.event_id, d.data) for d in due] == [(letters[0].id, "a", b'{"id":"a"}')]
    # not redelivered yet (e.g. a crash): still there, offered again
    assert [d.id for d in await journal.replays_due("s1", 10)] == [letters[0].id]
    assert await journal.dead_letter_counts() == {"s1": 2, "s2": 1}
    await journal.finish_replays([d.id for d in due])
    assert await journal.replays_due("s1", 10) == []  # redelivered: gone
    assert [d.event_id for d in await journal.dead_letters("s1")] == ["b"]
    assert await journal.request_replay() == 2
    due = await journal.replays_due("s1", 1)
    assert [d.event_id for d in due] == ["b"]
    await journal.finish_replays([d.id for d in due])
    assert await journal.dead_letter_counts() == {"s2": 1}


async def test_a_replayed_letter_that_fails_again_is_replaced_in_one_step(journal):
    stored = StoredEvent(4, b'{"id":"a"}', 2.0)
    await journal.add_dead_letters("s1", [(stored, "a", "first", 1)])
    await journal.add_dead_letters("s1", [(StoredEvent(5, b'{"id":"b"}', 2.0), "b", "r", 1)])
    assert await journal.request_replay("s1") == 2
    first, other = await journal.replays_due("s1", 10)
    await journal.add_dead_letters("s1", [(stored, "a", "again", 2)], replacing=[first.id])
    letters = await journal.dead_letters("s1")
    assert [(d.event_id, d.reason, d.attempts, d.state) for d in letters] == [
        ("b", "r", 1, "replay"), ("a", "again", 2, "dead")]
    assert await journal.dead_letter_counts() == {"s1": 2}
    assert [d.id for d in await journal.replays_due("s1", 10)] == [other.id]
    assert await journal.dead_lettered_after("s1", 0) == {4, 5}


async def test_dead_lettered_after_names_the_seqs_a_sink_gave_up_on_beyond_a_cursor(journal):
    await journal.add_dead_letters("s1", [(StoredEvent(4, b'{"id":"a"}', 2.0), "a", "r", 1),
                                          (StoredEvent(7, b'{"id":"b"}', 2.0), "b", "r", 1)])
    await journal.add_dead_letters("s2", [(StoredEvent(9, b'{"id":"c"}', 2.0), "c", "r", 1)])
    await journal.add_dead_letters("s1", [(StoredEvent(0, b'{"id":"d"}', 2.0), "d", "r", 1)])
    assert await journal.dead_lettered_after("s1", 0) == {4, 7}  # 0: a replay's, no seq
    assert await journal.dead_lettered_after("s1", 4) == {7}
    assert await journal.dead_lettered_after("s2", 0) == {9}
    await journal.request_replay("s1")
    due = await journal.replays_due("s1", 10)
    assert await journal.dead_lettered_after("s1", 0) == {4, 7}  # still there until delivered
    await journal.finish_replays([d.id for d in due])
    assert await journal.dead_lettered_after("s1", 0) == set()


async def test_normalise_failures_are_kept_with_the_raw_body(journal):
    await journal.append("whatsapp", b"raw-bytes", 1.0)
    (request,) = await journal.unprocessed(10)
    await journal.commit_processed(request.seq, [], [(request, "ValueError('bug')")])
    (letter,) = await journal.dead_letters()
    assert (letter.sink, letter.event_id, letter.data, letter.reason, letter.attempts) == (
        "normalise:whatsapp", f"request:{request.seq}", b"raw-bytes", "ValueError('bug')", 1)
    assert letter.received_at == 1.0 and letter.state == "dead"
    assert journal.pending == 0
    assert await journal.dead_letter_counts() == {"normalise:whatsapp": 1}
    # marked for replay like any letter (the processor journals the raw request again)
    assert await journal.request_replay("normalise:whatsapp") == 1
    assert [d.data for d in await journal.replays_due("normalise:whatsapp", 10)] == [b"raw-bytes"]


async def test_prune_drops_what_every_sink_has_passed(journal):
    await journal.append("whatsapp", b"x", 1.0)
    (request,) = await journal.unprocessed(10)
    seqs = await journal.commit_processed(request.seq, [ev("p1"), ev("p2"), ev("p3")], [])
    await journal.prune(10**10)  # no sink cursor yet: nothing can go
    assert len(await journal.events_after(0, 10)) == 3
    await journal.set_cursor("sink:a", seqs[1])
    await journal.set_cursor("sink:b", seqs[2])
    await journal.set_cursor("other", seqs[0])  # only sink cursors pin events
    await journal.prune(10**10)
    assert [s.seq for s in await journal.events_after(0, 10)] == [seqs[2]]
    assert await journal.last_event_seq() == seqs[2]
    await journal.append("whatsapp", b"y", 2.0)
    (request,) = await journal.unprocessed(10)
    assert await journal.commit_processed(request.seq, [ev("p4")], []) == [seqs[2] + 1]


async def test_erase_contact(journal):
    await journal.append("whatsapp", b'{"from": "111"}', 1.0)
    await journal.append("whatsapp", b"broken", 1.0)
    batch = await journal.unprocessed(10)
    events = [message("m1", "111"), message("m2", "222"), message("m3", "111"),
              message("m4", "111", channel="instagram")]
    seqs = await journal.commit_processed(batch[-1].seq, events,
                                          [(batch[0], "bad"), (batch[1], "bad")])
    await journal.add_dead_letters("s", [(StoredEvent(seqs[0], events[0].data, 1.0), "m1", "r", 1),
                                         (StoredEvent(seqs[1], events[1].data, 1.0), "m2", "r", 1)])
    assert await journal.erase_contact("whatsapp", "111") == {"events": 2, "dead_letters": 2}
    left = await journal.events_after(0, 10)
    assert [s.seq for s in left] == [seqs[1], seqs[3]]
    assert sorted(d.event_id for d in await journal.dead_letters()) == [
        "m2", f"request:{batch[1].seq}"]
    assert await journal.dead_letter_counts() == {"s": 1, "normalise:whatsapp": 1}
    assert await journal.erase_contact("whatsapp", "111") == {"events": 0, "dead_letters": 0}


async def test_erase_contact_takes_one_persons_ids_in_one_pass(journal):
    await journal.append("whatsapp", b'{"from_user_id": "US.9"} unparsable', 1.0)
    (request,) = await journal.unprocessed(10)
    events = [message("m1", "111"), message("m2", "US.9"), message("m3", "222"),
              message("m4", "US.9", channel="instagram")]
    seqs = await journal.commit_processed(request.seq, events, [(request, "bad")])
    assert await journal.erase_contact("whatsapp", "111", "US.9") == {
        "events": 2, "dead_letters": 1}  # the raw request holding one of them goes too
    assert [s.seq for s in await journal.events_after(0, 10)] == [seqs[2], seqs[3]]
    assert await journal.dead_letters() == []


async def test_retired_records_merge_and_an_erasure_takes_out_only_what_it_erased(journal):
    """Two erasures of overlapping ids (the second may run while the first waits for a repeat):
    each id's record only grows, and a finished erasure takes out of its ids' records only the
    ids it erased; a record goes once empty."""
    w, b1, b2 = "15550001234", "US.1111", "US.2222"
    await journal.retire_aliases("whatsapp", [w, b1])  # an erasure of w that failed
    await journal.retire_aliases("whatsapp", [b2, w])  # then one of a new BSUID, beside w
    assert await journal.retired_with("whatsapp", w) == [b1, b2]
    assert await journal.retired_with("whatsapp", b2) == [w]
    await journal.forget_retired("whatsapp", [b2, w])  # the second one finished
    assert await journal.retired_with("whatsapp", b2) == []
    assert await journal.retired_with("whatsapp", w) == [b1]  # for the first one's repeat
    assert await journal.retired_with("whatsapp", b1) == [w]
    await journal.retire_aliases("whatsapp", [w])  # alone: nothing to add, nothing lost
    assert await journal.retired_with("whatsapp", w) == [b1]
    await journal.forget_retired("whatsapp", [w, b1])  # the repeat finished
    for one in (w, b1, b2):
        assert await journal.retired_with("whatsapp", one) == []
    await journal.retire_aliases("whatsapp", ["a/b", 'q"x'])  # ids JSON and Lua must keep
    assert await journal.retired_with("whatsapp", "a/b") == ['q"x']
    await journal.forget_retired("whatsapp", ["a/b", 'q"x'])
    assert await journal.retired_with("whatsapp", 'q"x') == []


def _journal_like(journal, request, data_dir, window: int | None = None, prefix: str = ""):
    """A new, unopened journal of ``journal``'s backend: the same store when ``data_dir`` is the
    fixture's ``tmp_path`` and ``prefix`` is empty (a restart), else a store of its own."""
    queue = {} if window is None else {"dedupe_window_seconds": window}
    if isinstance(journal, SqliteJournal):
        return SqliteJournal(gwconfig.GatewayConfig(
            server=gwconfig.ServerConfig(data_dir=str(data_dir)),
            queue=gwconfig.QueueConfig(**queue)))
    from gateway.journal.redis import RedisJournal

    url = request.getfixturevalue("redis_url")  # the fixture's own URL (cached for this test)
    cfg = gwconfig.GatewayConfig(
        queue=gwconfig.QueueConfig(backend="redis", redis_url=url, **queue))
    return RedisJournal(cfg, prefix=journal.p + prefix if prefix else None)


async def _commit_one(journal, event_id: str, received_at: float = 1.0) -> int | None:
    """Journal one request, then commit it with one event: the event's new seq, or None (dup)."""
    await journal.append("whatsapp", event_id.encode(), received_at)
    requests = await journal.unprocessed(10)
    (seq,) = await journal.commit_processed(requests[-1].seq, [ev(event_id)], [])
    return seq


async def test_an_erasure_is_remembered_until_its_requests_are_processed(journal):
    """An erasure while requests wait to be processed: ``erasures()`` names the contact with the
    newest request journaled before it, until the processor has passed that request (the
    processor drops the contact's events of those requests). Nothing pending: no record."""
    assert await journal.erasures() == {}
    await journal.erase_contact("whatsapp", "15550001234")  # nothing pending
    assert await journal.erasures() == {}
    for n in range(2):
        await journal.append("whatsapp", f"body{n}".encode(), 10.0 + n)
    first, second = await journal.unprocessed(10)
    await journal.erase_contact("whatsapp", "15550001234")
    await journal.erase_contact("instagram", "15550001234")
    await journal.append("whatsapp", b"after", 12.0)  # journaled after the erasure
    assert await journal.erasures() == {("whatsapp", "15550001234"): second.seq,
                                        ("instagram", "15550001234"): second.seq}
    await journal.commit_processed(first.seq, [], [])
    assert await journal.erasures() == {("whatsapp", "15550001234"): second.seq,
                                        ("instagram", "15550001234"): second.seq}
    await journal.unprocessed(10)
    await journal.commit_processed(second.seq, [], [])
    assert await journal.erasures() == {}


async def test_dedupe_survives_close_and_reopen(journal, request, tmp_path):
    first = await _commit_one(journal, "before-restart")
    assert first
    await journal.append("whatsapp", b"journaled, not processed", 3.0)
    await journal.close()  # a restart: nothing in memory survives
    reopened = _journal_like(journal, request, tmp_path)
    await reopened.open()
    try:
        assert reopened.pending == 1
        (left,) = await reopened.unprocessed(10)
        assert left.body == b"journaled, not processed"
        seqs = await reopened.commit_processed(left.seq, [ev("before-restart"), ev("after")], [])
        assert seqs == [None, first + 1]  # the id seen before the restart is dropped after it
        assert await _commit_one(reopened, "before-restart") is None
        assert [s.data for s in await reopened.events_after(0, 10)] == [
            b'{"id":"before-restart"}', b'{"id":"after"}']
        assert reopened.pending == 0
    finally:
        await reopened.close()


async def test_dedupe_window_forgets_ids_once_it_has_passed(journal, request, tmp_path):
    import asyncio
    import time

    short = _journal_like(journal, request, tmp_path / "window", window=1, prefix="w")
    await short.open()
    try:
        first = await _commit_one(short, "windowed", time.time())
        assert first
        await short.prune(time.time())  # still inside the window: the id is remembered
        assert await _commit_one(short, "windowed", time.time()) is None
        await asyncio.sleep(1.3)
        await short.prune(time.time())  # past dedupe_window_seconds: forgotten
        again = await _commit_one(short, "windowed", time.time())
        assert again and again > first
        assert await _commit_one(short, "windowed", time.time()) is None  # and remembered anew
    finally:
        await short.close()


async def test_default_dedupe_window_is_seven_days(journal):
    week = 7 * 24 * 3600
    assert gwconfig.QueueConfig().dedupe_window_seconds == week
    import time

    now = time.time()
    assert await _commit_one(journal, "kept-a-week")
    if isinstance(journal, SqliteJournal):
        await journal.prune(now + week - 60)  # a minute short of a week: still a duplicate
        assert await _commit_one(journal, "kept-a-week") is None
        await journal.prune(now + week + 60)  # a minute past it: new again
        assert await _commit_one(journal, "kept-a-week")
    else:  # Redis expires the ids itself: the key's TTL is the window
        ttl = await journal.redis.ttl(f"{journal.p}:seen:kept-a-week")
        assert week - 60 <= ttl <= week
        assert await _commit_one(journal, "kept-a-week") is None


async def test_aliases_are_learned_updated_kept_across_a_restart_and_erased(journal, request,
                                                                           tmp_path):
    bsuid, other = ("whatsapp", "US.1349"), ("whatsapp", "US.7777")
    assert await journal.aliases([bsuid]) == {}
    await journal.learn_aliases({bsuid: "15550001234", other: "15550009999",
                                 ("instagram", "US.1349"): "9000"})
    await journal.learn_aliases({bsuid: "15550004321"})  # seen beside another number since
    assert await journal.aliases([bsuid, other, ("whatsapp", "US.none")]) == {
        bsuid: "15550004321", other: "15550009999"}
    assert await journal.aliases_of("whatsapp", "15550004321") == ["US.1349"]
    assert await journal.aliases_of("whatsapp", "15550001234") == []  # the alias moved on
    assert await journal.aliases_of("instagram", "15550004321") == []
    await journal.close()
    reopened = _journal_like(journal, request, tmp_path)
    await reopened.open()
    try:
        assert await reopened.aliases([bsuid]) == {bsuid: "15550004321"}
        await reopened.erase_contact("whatsapp", "15550004321")
        assert await reopened.aliases([bsuid]) == {bsuid: "15550004321"}  # until forgotten
        await reopened.retire_aliases("whatsapp", ["15550004321", "US.1349"])  # by both ids
        await reopened.retire_aliases("whatsapp", ["US.7777"])  # by the alias alone
        assert await reopened.aliases([bsuid, other, ("instagram", "US.1349")]) == {
            ("instagram", "US.1349"): "9000"}  # another channel's pair is another customer
        assert await reopened.aliases_of("whatsapp", "15550009999") == []
        # the retired ids stay together, across a restart, until the erasure is finished
        assert await reopened.retired_with("whatsapp", "US.1349") == ["15550004321"]
        await reopened.learn_aliases({bsuid: "15550004321"})  # the person writes again
        assert await reopened.aliases([bsuid]) == {bsuid: "15550004321"}
    finally:
        await reopened.close()
    again = _journal_like(journal, request, tmp_path)
    await again.open()
    try:
        assert await again.retired_with("whatsapp", "15550004321") == ["US.1349"]
        assert await again.retired_with("whatsapp", "US.7777") == []
        await again.forget_retired("whatsapp", ["15550004321", "US.1349"])
        assert await again.retired_with("whatsapp", "15550004321") == []
        assert await again.retired_with("whatsapp", "US.1349") == []
        assert await again.aliases([bsuid]) == {bsuid: "15550004321"}  # learned since: kept
    finally:
        await again.close()
