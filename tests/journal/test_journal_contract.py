"""The Journal protocol's semantics, for both backends (SQLite and Redis)."""

from __future__ import annotations

import pytest

from gateway import config as gwconfig
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


async def test_append_process_dedupe(journal):
    for n in range(3):
        await journal.append("whatsapp", f"body{n}".encode(), 10.0 + n)
    assert journal.pending == 3
    requests = await journal.unprocessed(10)
    assert [r.body for r in requests] == [b"body0", b"body1", b"body2"]
    assert [r.channel for r in requests] == ["whatsapp"] * 3
    seqs = await journal.commit_processed(requests[-1].seq, [ev("a"), ev("b"), ev("a")], [])
    assert seqs[0] and seqs[1] and seqs[2] is None and seqs[1] > seqs[0]
    assert journal.pending == 0 and await journal.unprocessed(10) == []
    await journal.append("whatsapp", b"again", 20.0)
    requests = await journal.unprocessed(10)
    assert (await journal.commit_processed(requests[-1].seq, [ev("b"), ev("c")], []))[0] is None
    stored = await journal.events_after(0, 10)
    assert [s.data for s in stored] == [b'{"id":"a"}', b'{"id":"b"}', b'{"id":"c"}']
    assert await journal.last_event_seq() == stored[-1].seq
    assert [s.seq for s in await journal.events_after(stored[0].seq, 10)] == [s.seq for s in stored[1:]]
    assert [s.seq for s in await journal.events_after(0, 2)] == [s.seq for s in stored[:2]]


async def test_cursors_start_unset_and_only_move_forward(journal):
    assert await journal.cursor("sink:x") is None
    await journal.set_cursor("sink:x", 5)
    await journal.set_cursor("sink:x", 3)
    assert await journal.cursor("sink:x") == 5
    await journal.set_cursor("sink:x", 0)
    await journal.set_cursor("sink:y", 0)
    assert await journal.cursor("sink:y") == 0


async def test_dead_letters_and_replay(journal):
    stored = StoredEvent(1, b'{"id":"a"}', 2.0)
    await journal.add_dead_letters("s1", [(stored, "a", "Boom: broken", 3)])
    await journal.add_dead_letters("s2", [(stored, "a", "Other", 1)])
    letters = await journal.dead_letters("s1")
    assert [(d.sink, d.event_id, d.data, d.reason, d.attempts, d.state) for d in letters] == [
        ("s1", "a", b'{"id":"a"}', "Boom: broken", 3, "dead")]
    assert await journal.dead_letter_counts() == {"s1": 1, "s2": 1}
    assert await journal.claim_replays("s1", 10) == []
    assert await journal.request_replay("s1") == 1
    claimed = await journal.claim_replays("s1", 10)
    assert [d.event_id for d in claimed] == ["a"] and await journal.dead_letters("s1") == []
    assert await journal.dead_letter_counts() == {"s2": 1}


async def test_normalise_failures_are_kept_with_the_raw_body(journal):
    await journal.append("whatsapp", b"raw-bytes", 1.0)
    (request,) = await journal.unprocessed(10)
    await journal.commit_processed(request.seq, [], [(request, "ValueError('bug')")])
    (letter,) = await journal.dead_letters()
    assert letter.sink == "normalise:whatsapp" and letter.data == b"raw-bytes"
    assert journal.pending == 0
    assert await journal.request_replay() == 0  # raw requests are not events: never replayed


async def test_prune_drops_what_every_sink_has_passed(journal):
    await journal.append("whatsapp", b"x", 1.0)
    (request,) = await journal.unprocessed(10)
    seqs = await journal.commit_processed(request.seq, [ev("p1"), ev("p2"), ev("p3")], [])
    await journal.set_cursor("sink:a", seqs[1])
    await journal.set_cursor("sink:b", seqs[2])
    await journal.prune(10**10)
    assert [s.seq for s in await journal.events_after(0, 10)] == [seqs[2]]
    assert await journal.ping()
