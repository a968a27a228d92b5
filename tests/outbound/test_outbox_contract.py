"""The outbox's semantics, for both backends: the SQLite ``Outbox`` and ``RedisOutbox`` on a real
redis-server (two instances sharing one Redis and one key prefix, as two replicas have)."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.outbound.outbox import Customer, Outbox
from gateway.outbound.redis_outbox import RedisOutbox
from tests.outbound import redis_fixtures

redis_server = redis_fixtures.redis_server
redis_url = redis_fixtures.redis_url

WA, CUSTOMER = "100000000000001", "15550001234"
ALIVE_MS = 300  # Redis: a "crashed" instance's heartbeat expires this fast


class Backend:
    """Makes outboxes on one store (a data directory, or a Redis prefix) and closes them."""

    def __init__(self, kind: str, tmp_path, url: str | None) -> None:
        self.kind, self.tmp_path, self.url = kind, tmp_path, url
        self.opened: list[Outbox | RedisOutbox] = []

    def make(self) -> Outbox | RedisOutbox:
        if self.kind == "sqlite":
            return Outbox(str(self.tmp_path))
        return RedisOutbox(self.url, alive_ms=ALIVE_MS)

    async def open(self, reconcile_seconds: float = 60.0) -> tuple[Outbox | RedisOutbox, int]:
        ob = self.make()
        found = await ob.open(reconcile_seconds)
        self.opened.append(ob)
        return ob, found

    async def crash(self, ob: Outbox | RedisOutbox) -> None:
        """Stop ``ob`` as a crash would: no graceful close of what it was sending."""
        self.opened.remove(ob)
        if isinstance(ob, Outbox):
            await ob.close()  # closing SQLite writes nothing: the file is what a crash leaves
            return
        for task in ob._tasks:  # the heartbeat stops; records it claimed stay `sending`
            task.cancel()
        await asyncio.gather(*ob._tasks, return_exceptions=True)
        await ob.redis.aclose()
        ob.redis = None
        await asyncio.sleep(ALIVE_MS * 1.5 / 1000)  # its heartbeat key expires

    async def pair(self) -> tuple[Outbox | RedisOutbox, Outbox | RedisOutbox]:
        """Two handles on one store: two replicas on Redis; the one SQLite outbox twice."""
        first, _ = await self.open()
        if self.kind == "sqlite":
            return first, first
        second, _ = await self.open()
        return first, second

    async def close(self) -> None:
        for ob in self.opened:
            await ob.close()


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request, tmp_path):
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, tmp_path, url)
    yield b
    await b.close()


@pytest.fixture
async def outbox(backend):
    ob, _ = await backend.open()
    return ob


async def add(ob, to: str = CUSTOMER, account: str = WA, key: str | None = None,
              channel: str = "whatsapp", kind: str = "text"):
    row, _ = await ob.add(channel, account, to, kind, f"req-{to}".encode(), key)
    return row


async def claim_all(ob, account: str = WA, channel: str = "whatsapp") -> list:
    rows: list = []
    for _ in range(50):  # bounded: each round takes up to 10
        got = await ob.claim_due(channel, account, 10)
        if not got:
            return rows
        rows += got
    raise AssertionError("claim_due never ran dry")


async def test_add_get_and_the_public_view(outbox):
    before = time.time()
    row, new = await outbox.add("whatsapp", WA, CUSTOMER, "text", b"\x00request\xff", None)
    assert new is True
    assert row.id.startswith("msg_") and len(row.id) == 36
    assert (row.idempotency_key, row.channel, row.account_id, row.recipient, row.type) == (
        None, "whatsapp", WA, CUSTOMER, "text")
    assert row.request == b"\x00request\xff" and isinstance(row.request, bytes)
    assert (row.state, row.attempts, row.provider_message_id, row.error, row.sent_at) == (
        "queued", 0, None, None, None)
    assert before <= row.created_at == row.next_at == row.updated_at <= time.time()
    assert await outbox.get(row.id) == row
    assert await outbox.get("msg_" + "0" * 32) is None
    assert row.public() == {"id": row.id, "status": "queued", "channel": "whatsapp",
                            "account_id": WA, "to": CUSTOMER, "type": "text",
                            "provider_message_id": None, "attempts": 0, "error": None,
                            "created_at": row.created_at, "sent_at": None}


async def test_an_idempotency_key_gives_one_record_ever(backend):
    a, b = await backend.pair()
    first, new = await a.add("whatsapp", WA, CUSTOMER, "text", b"one", "key-1")
    again, new_again = await b.add("whatsapp", WA, CUSTOMER, "text", b"two", "key-1")
    assert new and not new_again and again == first and again.idempotency_key == "key-1"
    other, new_other = await a.add("whatsapp", WA, CUSTOMER, "text", b"three", "key-2")
    assert new_other and other.id != first.id
    assert await b.by_key("key-1") == first and await a.by_key("key-2") == other
    assert await a.by_key("key-unknown") is None
    # the same key from many requests at once, on both replicas: still one record
    results = await asyncio.gather(*(ob.add("whatsapp", WA, CUSTOMER, "text", b"x", "key-3")
                                     for ob in [a, b] * 10))
    assert sum(new for _, new in results) == 1
    assert len({row.id for row, _ in results}) == 1
    assert len(await claim_all(a)) == 3  # three records, each sent once


async def test_claim_due_takes_due_records_oldest_first(outbox):
    rows = [await add(outbox, to=f"c{i}") for i in range(5)]
    other = await add(outbox, account="200000000000002")
    await outbox.retry_at(rows[1].id, time.time() + 3600, None)  # not due for an hour
    claimed = await outbox.claim_due("whatsapp", WA, 2)
    assert [r.id for r in claimed] == [rows[0].id, rows[2].id]
    # the rows show the records as they were before the claim (the service counts from them)
    assert [(r.state, r.attempts) for r in claimed] == [("queued", 0), ("queued", 0)]
    assert claimed[0] == rows[0]
    now = await outbox.get(rows[0].id)
    assert (now.state, now.attempts, now.public()["status"]) == ("sending", 1, "queued")
    assert now.updated_at >= rows[0].updated_at
    assert [r.id for r in await outbox.claim_due("whatsapp", WA, 10)] == [rows[3].id, rows[4].id]
    assert await outbox.claim_due("whatsapp", WA, 10) == []  # the one not due stays
    assert [r.id for r in await outbox.claim_due("whatsapp", "200000000000002", 10)] == [other.id]
    assert await outbox.claim_due("instagram", WA, 10) == []


async def test_each_due_record_is_handed_to_exactly_one_caller(backend):
    a, b = await backend.pair()
    ids = {(await add(a, to=f"c{i}")).id for i in range(120)}
    rounds = await asyncio.gather(*(ob.claim_due("whatsapp", WA, 15) for ob in [a, b] * 6))
    handed = [r.id for rows in rounds for r in rows]
    assert len(handed) == len(set(handed)) == 120 and set(handed) == ids
    assert await a.claim_due("whatsapp", WA, 15) == [] == await b.claim_due("whatsapp", WA, 15)


async def test_next_due(outbox):
    assert await outbox.next_due("whatsapp", WA) is None
    first = await add(outbox)
    second = await add(outbox, to="other")
    assert await outbox.next_due("whatsapp", WA) == first.next_at
    await outbox.claim_due("whatsapp", WA, 1)
    assert await outbox.next_due("whatsapp", WA) == second.next_at
    await outbox.claim_due("whatsapp", WA, 1)
    assert await outbox.next_due("whatsapp", WA) is None  # sending: not waiting to be due
    at = time.time() + 600.25
    await outbox.retry_at(first.id, at, None)
    assert await outbox.next_due("whatsapp", WA) == at
    await outbox.sent(second.id, "wamid.2")
    await outbox.failed(first.id, {"code": 100})
    assert await outbox.next_due("whatsapp", WA) is None


async def test_sent_then_statuses_by_provider_id_only_move_forward(outbox):
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.retry_at(row.id, time.time() - 1, {"code": 1, "message": "try again"})
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.sent(row.id, "wamid.A")
    sent = await outbox.get(row.id)
    assert (sent.state, sent.provider_message_id, sent.error, sent.attempts) == (
        "sent", "wamid.A", None, 2)
    assert sent.sent_at is not None and sent.public()["status"] == "sent"
    assert await outbox.claim_due("whatsapp", WA, 10) == []

    async def state() -> str:
        return (await outbox.get(row.id)).state

    status = outbox.status
    await status(provider_message_id="wamid.A", record_id=None, status="delivered", error=None)
    assert await state() == "delivered"
    await status(provider_message_id="wamid.A", record_id=None, status="read", error=None)
    await status(provider_message_id="wamid.A", record_id=None, status="delivered", error=None)
    await status(provider_message_id="wamid.A", record_id=None, status="sent", error=None)
    await status(provider_message_id="wamid.A", record_id=None, status="queued", error=None)
    await status(provider_message_id="wamid.A", record_id=None, status="deleted", error=None)
    assert await state() == "read"  # a late delivered never replaces read
    await status(provider_message_id="wamid.unknown", record_id=None, status="failed", error=None)
    await status(provider_message_id=None, record_id=None, status="failed", error=None)
    assert await state() == "read"
    await outbox.sent(row.id, "wamid.B")  # a late duplicate of the send's answer
    again = await outbox.get(row.id)
    assert (again.state, again.provider_message_id, again.sent_at) == ("read", "wamid.A",
                                                                       sent.sent_at)
    await status(provider_message_id="wamid.A", record_id=None, status="failed",
                 error={"code": 131050, "message": "stopped"})
    failed = await outbox.get(row.id)
    assert failed.state == "failed"
    assert failed.public()["error"] == {"code": 131050, "message": "stopped"}


async def test_a_status_naming_the_record_settles_it_without_a_send(outbox):
    row = await add(outbox)  # queued (or uncertain after a crash): WhatsApp echoes our id
    await outbox.status(provider_message_id="wamid.X", record_id=row.id, status="sent",
                        error=None)
    got = await outbox.get(row.id)
    assert (got.state, got.provider_message_id) == ("sent", "wamid.X")
    assert got.sent_at is not None
    assert await outbox.claim_due("whatsapp", WA, 10) == []
    assert await outbox.next_due("whatsapp", WA) is None
    await outbox.status(provider_message_id="wamid.X", record_id=None, status="read", error=None)
    assert (await outbox.get(row.id)).state == "read"  # found by the provider id it learned


async def test_retry_at_and_failed(outbox):
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    at = time.time() + 100
    await outbox.retry_at(row.id, at, {"code": 2, "message": "temporary"})
    got = await outbox.get(row.id)
    assert (got.state, got.attempts, got.next_at) == ("queued", 1, at)
    assert got.public()["error"] == {"code": 2, "message": "temporary"}
    assert await outbox.claim_due("whatsapp", WA, 10) == []
    await outbox.retry_at(row.id, time.time() - 1, None)
    assert [r.attempts for r in await outbox.claim_due("whatsapp", WA, 10)] == [1]
    assert (await outbox.get(row.id)).attempts == 2
    await outbox.retry_at(row.id, time.time() - 1, None, count_attempt=False)  # throttled
    got = await outbox.get(row.id)
    assert (got.state, got.attempts, got.error) == ("queued", 1, None)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.failed(row.id, {"code": 131026, "hint": "not on WhatsApp"})
    got = await outbox.get(row.id)
    assert got.state == "failed" and got.public()["status"] == "failed"
    assert got.public()["error"] == {"code": 131026, "hint": "not on WhatsApp"}
    assert await outbox.claim_due("whatsapp", WA, 10) == []
    assert await outbox.next_due("whatsapp", WA) is None


async def test_updates_of_unknown_records_change_nothing(outbox):
    missing = "msg_" + "f" * 32
    await outbox.sent(missing, "wamid.M")
    await outbox.failed(missing, {"code": 1})
    await outbox.retry_at(missing, time.time(), None)
    await outbox.status(provider_message_id="wamid.M", record_id=missing, status="read",
                        error=None)
    assert await outbox.get(missing) is None
    assert await outbox.next_due("whatsapp", WA) is None
    assert await outbox.erase_contact("whatsapp", CUSTOMER) == {"outbox": 0, "customers": 0}


async def test_records_left_sending_by_a_crash_become_uncertain(backend):
    ob, found = await backend.open()
    assert found == 0
    first, second, third = [await add(ob, to=f"c{i}") for i in range(3)]
    assert [r.id for r in await ob.claim_due("whatsapp", WA, 2)] == [first.id, second.id]
    await backend.crash(ob)  # in the middle of sending the first two

    ob, found = await backend.open(reconcile_seconds=0.6)
    assert found == 2
    got = await ob.get(first.id)
    assert (got.state, got.attempts, got.public()["status"]) == ("uncertain", 1, "queued")
    assert got.next_at > time.time()
    # the one still queued is simply sent; the uncertain ones wait for a status webhook …
    assert [r.id for r in await ob.claim_due("whatsapp", WA, 10)] == [third.id]
    await ob.status(provider_message_id="wamid.2", record_id=second.id, status="delivered",
                    error=None)
    await asyncio.sleep(0.7)
    # … and only the one no webhook named is sent again
    again = await ob.claim_due("whatsapp", WA, 10)
    assert [(r.id, r.state, r.attempts) for r in again] == [(first.id, "uncertain", 1)]
    assert (await ob.get(first.id)).attempts == 2
    assert (await ob.get(second.id)).state == "delivered"


async def test_inbound_keeps_the_latest_message_and_consent(outbox):
    nobody = Customer(None, None, False)
    assert await outbox.customer("whatsapp", WA, CUSTOMER) == nobody
    await outbox.inbound("whatsapp", WA, CUSTOMER, 1000.5, "wamid.1", None)
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (1000.5, "wamid.1", False)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 900.0, "wamid.0", True)  # older, but STOP
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (1000.5, "wamid.1", True)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 2000.25, "wamid.2", None)
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (2000.25, "wamid.2", True)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 2000.25, "wamid.3", False)  # START
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (2000.25, "wamid.3", False)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 3000.0, None, None)
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (3000.0, None, False)
    # per (channel, account, contact)
    assert await outbox.customer("whatsapp", "200000000000002", CUSTOMER) == nobody
    assert await outbox.customer("instagram", WA, CUSTOMER) == nobody
    assert await outbox.customer("whatsapp", WA, "15550009999") == nobody
    await outbox.inbound("whatsapp", "200000000000002", CUSTOMER, 10.0, "wamid.B", True)
    assert (await outbox.customer("whatsapp", "200000000000002", CUSTOMER))[:3] == (10.0, "wamid.B",
                                                                              True)
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (3000.0, None, False)
    found = await outbox.customer("whatsapp", WA, CUSTOMER)
    assert isinstance(found, Customer) and isinstance(found.opted_out, bool)


async def test_erase_contact_forgets_records_and_customer_state(backend):
    a, b = await backend.pair()
    second = "200000000000002"
    mine = [await add(a, key="k-erase"), await add(a, account=second), await add(b)]
    await a.claim_due("whatsapp", second, 10)
    await a.sent(mine[1].id, "wamid.erased")
    others = [await add(a, to="15550009999"), await add(a, channel="instagram")]
    for channel, account, contact in [("whatsapp", WA, CUSTOMER), ("whatsapp", second, CUSTOMER),
                                      ("whatsapp", WA, "15550009999"),
                                      ("instagram", WA, CUSTOMER)]:
        await a.inbound(channel, account, contact, 100.0, "m", True)

    assert await b.erase_contact("whatsapp", CUSTOMER) == {"outbox": 3, "customers": 2}
    for row in mine:
        assert await a.get(row.id) is None
    assert [r.id for r in await claim_all(a)] == [others[0].id]  # erased sends are not sent
    assert [r.id for r in await claim_all(a, channel="instagram")] == [others[1].id]
    await a.status(provider_message_id="wamid.erased", record_id=None, status="read", error=None)
    assert await a.get(mine[1].id) is None
    assert await a.customer("whatsapp", WA, CUSTOMER) == Customer(None, None, False)
    assert await a.customer("whatsapp", second, CUSTOMER) == Customer(None, None, False)
    assert (await a.customer("whatsapp", WA, "15550009999")).opted_out
    assert (await a.customer("instagram", WA, CUSTOMER)).opted_out
    _, new = await a.add("whatsapp", WA, CUSTOMER, "text", b"x", "k-erase")
    assert new  # the key went with its record
    assert await a.erase_contact("whatsapp", CUSTOMER) == {"outbox": 1, "customers": 0}
    assert await a.erase_contact("whatsapp", CUSTOMER) == {"outbox": 0, "customers": 0}


async def test_retry_at_never_moves_a_settled_record_back(outbox):
    """A status webhook may settle a record while its send is being retried (a timeout raced
    the answer): the late retry must not queue it again, or it would be sent twice."""
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.status(provider_message_id=None, record_id=row.id, status="sent", error=None)
    await outbox.retry_at(row.id, time.time() - 1, {"code": 2, "message": "late"})
    got = await outbox.get(row.id)
    assert got.state == "sent" and got.public()["error"] is None
    assert await outbox.claim_due("whatsapp", WA, 10) == []


async def test_an_opt_out_learnt_from_meta_is_kept_without_any_inbound(outbox):
    await outbox.set_opted_out("whatsapp", WA, CUSTOMER, True)
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (None, None, True)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 100.0, "wamid.A", None)  # says nothing
    assert (await outbox.customer("whatsapp", WA, CUSTOMER))[:3] == (100.0, "wamid.A", True)
    await outbox.set_opted_out("whatsapp", WA, CUSTOMER, False)
    assert not (await outbox.customer("whatsapp", WA, CUSTOMER)).opted_out
    assert not (await outbox.customer("whatsapp", "other-number", CUSTOMER)).opted_out


async def test_the_latest_word_on_consent_wins_by_its_time_not_its_arrival(outbox):
    """STOP said at t=200 arrives before START said at t=100 (Meta does not keep webhooks in
    order): the contact stays opted out; consent learnt from Meta (131050) follows the same
    rule."""
    await outbox.inbound("whatsapp", WA, CUSTOMER, 200.0, "wamid.stop", True)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 100.0, "wamid.start", False)
    found = await outbox.customer("whatsapp", WA, CUSTOMER)
    assert found == Customer(200.0, "wamid.stop", True, 200.0)
    await outbox.inbound("whatsapp", WA, CUSTOMER, 300.0, "wamid.hi", None)  # says nothing
    assert await outbox.customer("whatsapp", WA, CUSTOMER) == (300.0, "wamid.hi", True, 200.0)
    await outbox.set_opted_out("whatsapp", WA, CUSTOMER, False, 150.0)  # older than the STOP
    assert (await outbox.customer("whatsapp", WA, CUSTOMER)).opted_out
    await outbox.inbound("whatsapp", WA, CUSTOMER, 400.0, "wamid.start2", False)
    assert await outbox.customer("whatsapp", WA, CUSTOMER) == (400.0, "wamid.start2", False,
                                                               400.0)
    await outbox.set_opted_out("whatsapp", WA, CUSTOMER, True, 500.0)
    assert await outbox.customer("whatsapp", WA, CUSTOMER) == (400.0, "wamid.start2", True,
                                                               500.0)


async def test_status_returns_the_record_only_when_it_moved(outbox):
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.sent(row.id, "wamid.moved")
    moved = await outbox.status(provider_message_id="wamid.moved", record_id=row.id,
                                status="failed", error={"code": 131026})
    assert (moved.id, moved.state, moved.type) == (row.id, "failed", "text")
    again = await outbox.status(provider_message_id="wamid.moved", record_id=row.id,
                                status="failed", error={"code": 131026})
    assert again is None  # a redelivered status: nothing to count twice
    assert await outbox.status(provider_message_id="wamid.nobody", record_id=None,
                               status="read", error=None) is None


async def test_requeue_sends_a_sent_record_again_then_fails_it_at_max_attempts(outbox):
    """Meta failed an accepted message with a retryable code (a failed status webhook)."""
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.sent(row.id, "wamid.first")
    at = time.time() - 1
    back = await outbox.requeue(record_id=row.id, provider_message_id="wamid.first", at=at,
                                error={"code": 130429}, final_error={"code": 130429, "x": 1},
                                max_attempts=2)
    assert (back.state, back.attempts, back.provider_message_id, back.sent_at) == (
        "queued", 1, None, None)
    assert back.public()["error"] == {"code": 130429}
    assert await outbox.next_due("whatsapp", WA) == at
    assert await outbox.waiting([("whatsapp", WA)]) == 1
    # a redelivery of the same status changes nothing, by record id or by provider id
    for record_id in (row.id, None):
        assert await outbox.requeue(record_id=record_id, provider_message_id="wamid.first",
                                    at=at, error={"code": 130429}, final_error={},
                                    max_attempts=2) is None
    assert [r.id for r in await outbox.claim_due("whatsapp", WA, 10)] == [row.id]
    await outbox.sent(row.id, "wamid.second")
    assert (await outbox.get(row.id)).provider_message_id == "wamid.second"
    assert await outbox.waiting([("whatsapp", WA)]) == 0
    failed = await outbox.requeue(record_id=None, provider_message_id="wamid.second", at=at,
                                  error={"code": 130429}, final_error={"code": 130429, "x": 1},
                                  max_attempts=2)
    assert (failed.state, failed.attempts) == ("failed", 2)
    assert failed.public()["error"] == {"code": 130429, "x": 1}
    assert await outbox.claim_due("whatsapp", WA, 10) == []


async def failed_in_flight(outbox, key: str, pmid: str, max_attempts: int):
    """A record being sent, and a retryable failed status of send ``pmid`` noted on it."""
    row = await add(outbox, key=key)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.requeue(record_id=row.id, provider_message_id=pmid, at=time.time() - 1,
                         error={"code": 131000}, final_error={}, max_attempts=max_attempts)
    return row


async def test_a_failed_status_before_the_sends_answer_is_kept(outbox):
    """Meta's failed status can be processed before its answer to the send (a slow answer,
    another replica): a retryable one is noted on the record in flight, and the answer of that
    send queues it again (or fails it, its sends used up); the answer of a later send (the
    failed one had timed out) is simply sent; a permanent failure's error is not wiped."""
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)  # sending: Meta has it, its answer is late
    noted = await outbox.requeue(record_id=row.id, provider_message_id="wamid.early",
                                 at=time.time() - 1, error={"code": 131000}, final_error={},
                                 max_attempts=3)
    assert noted is not None and noted.state == "sending"
    assert await outbox.sent(row.id, "wamid.early", 3) == "queued"  # that send's answer
    again = await outbox.get(row.id)
    assert (again.state, again.provider_message_id) == ("queued", None)
    assert again.public()["error"] == {"code": 131000}
    assert await outbox.waiting([("whatsapp", WA)]) == 1
    assert [r.id for r in await outbox.claim_due("whatsapp", WA, 10)] == [row.id]
    assert await outbox.sent(row.id, "wamid.resent", 3) == "sent"
    assert (await outbox.get(row.id)).state == "sent"
    # a failed status of an earlier send that timed out, while a later one is in flight
    later = await failed_in_flight(outbox, "later", "wamid.timed-out", 3)
    assert await outbox.sent(later.id, "wamid.in-flight", 3) == "sent"
    done = await outbox.get(later.id)
    assert (done.state, done.provider_message_id) == ("sent", "wamid.in-flight")
    assert await outbox.waiting([("whatsapp", WA)]) == 0
    # the sends used up: failed with the status's error
    last = await failed_in_flight(outbox, "last", "wamid.last", 1)
    assert await outbox.sent(last.id, "wamid.last", 1) == "failed"
    gone = await outbox.get(last.id)
    assert gone.state == "failed" and gone.public()["error"] == {"code": 131000}
    other = await add(outbox, key="permanent")
    await outbox.claim_due("whatsapp", WA, 10)
    moved = await outbox.status(provider_message_id="wamid.p", record_id=other.id,
                                status="failed", error={"code": 131026})
    assert moved is not None and moved.state == "failed"
    assert await outbox.sent(other.id, "wamid.p", 3) == "kept"
    kept = await outbox.get(other.id)
    assert kept.state == "failed" and kept.public()["error"] == {"code": 131026}
    assert await outbox.waiting([("whatsapp", WA)]) == 0


async def test_a_late_status_of_a_requeued_send_moves_nothing(outbox):
    """Meta's statuses arrive in any order: the ``sent`` (or ``delivered``) of a send a failed
    status webhook requeued may come after that ``failed``. It must not settle the queued record
    (the message would never be sent again), nor be taken for the resend (sending or sent)."""
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.sent(row.id, "wamid.first")
    await outbox.requeue(record_id=row.id, provider_message_id="wamid.first",
                         at=time.time() - 1, error={"code": 131000}, final_error={},
                         max_attempts=3)

    async def late(status: str, record_id: str | None = row.id, pmid: str = "wamid.first"):
        return await outbox.status(provider_message_id=pmid, record_id=record_id,
                                   status=status, error={"code": 131026} if status == "failed"
                                   else None)

    for status in ("sent", "delivered", "read", "failed"):  # queued: by record id or wamid
        assert await late(status) is None and await late(status, None) is None
    got = await outbox.get(row.id)
    assert (got.state, got.provider_message_id, got.sent_at) == ("queued", None, None)
    assert got.public()["error"] == {"code": 131000}
    assert [r.id for r in await outbox.claim_due("whatsapp", WA, 10)] == [row.id]
    for status in ("sent", "delivered", "read", "failed"):  # the resend has started
        assert await late(status) is None
    assert (await outbox.get(row.id)).state == "sending"
    await outbox.sent(row.id, "wamid.second")
    for status in ("delivered", "read", "failed"):  # the resend went out
        assert await late(status) is None and await late(status, None) is None
    got = await outbox.get(row.id)
    assert (got.state, got.provider_message_id) == ("sent", "wamid.second")
    moved = await late("delivered", pmid="wamid.second")  # the resend's own statuses move it
    assert (moved.state, moved.provider_message_id) == ("delivered", "wamid.second")
    # a second requeue remembers both superseded sends
    await outbox.requeue(record_id=None, provider_message_id="wamid.second", at=time.time() - 1,
                         error={"code": 131000}, final_error={}, max_attempts=3)
    assert (await outbox.get(row.id)).state == "delivered"  # a requeue moves `sent` only
    other = await add(outbox, to="c2")
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.sent(other.id, "wamid.o1")
    for old, at in (("wamid.o1", "wamid.o2"), ("wamid.o2", None)):
        await outbox.requeue(record_id=other.id, provider_message_id=old, at=time.time() - 1,
                             error={"code": 131000}, final_error={}, max_attempts=5)
        if at:
            await outbox.claim_due("whatsapp", WA, 10)
            await outbox.sent(other.id, at)
    for old in ("wamid.o1", "wamid.o2"):
        assert await late("sent", other.id, old) is None
    assert (await outbox.get(other.id)).state == "queued"
    # a send whose answer was lost (timeout: queued again) is still settled by its status
    moved = await late("sent", other.id, "wamid.o3")
    assert (moved.state, moved.provider_message_id) == ("sent", "wamid.o3")


async def test_failed_can_set_the_sends_made(outbox):
    """A record given up right after its claim (no send made) keeps the real count."""
    row = await add(outbox)
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.failed(row.id, {"code": "uncertain"}, attempts=0)
    assert (await outbox.get(row.id)).attempts == 0
    other = await add(outbox, to="c2")
    await outbox.claim_due("whatsapp", WA, 10)
    await outbox.failed(other.id, {"code": 100})
    assert (await outbox.get(other.id)).attempts == 1


async def test_waiting_counts_queued_sending_and_uncertain_records(backend):
    ob, _ = await backend.open()
    rows = [await add(ob, to=f"c{i}") for i in range(4)]
    other = await add(ob, account="200000000000002")
    both = [("whatsapp", WA), ("whatsapp", "200000000000002")]
    assert await ob.waiting(both) == 5
    assert await ob.waiting([("whatsapp", WA)]) == 4
    await ob.claim_due("whatsapp", WA, 2)  # sending: still waiting for an answer
    assert await ob.waiting(both) == 5
    await ob.sent(rows[0].id, "wamid.0")
    await ob.failed(rows[1].id, {"code": 100})
    await ob.sent(other.id, "wamid.other")
    assert await ob.waiting(both) == 2


async def test_an_outbox_made_before_superseded_sends_were_kept_gains_the_column(tmp_path):
    """SQLite: a database without ``outbox.superseded`` gets it on open, records kept."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "outbox.db")
    db.executescript("""
        CREATE TABLE outbox (
            id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, channel TEXT NOT NULL,
            account_id TEXT NOT NULL, recipient TEXT NOT NULL, type TEXT NOT NULL,
            request BLOB NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL, provider_message_id TEXT, error TEXT,
            created_at REAL NOT NULL, updated_at REAL NOT NULL, sent_at REAL) WITHOUT ROWID;
        INSERT INTO outbox VALUES ('msg_old', NULL, 'whatsapp', '100000000000001', '15550001234',
            'text', X'7B7D', 'sent', 1, 0, 'wamid.old', NULL, 1, 1, 1);
    """)
    db.commit()
    db.close()
    ob = Outbox(str(tmp_path))
    await ob.open(60.0)
    try:
        back = await ob.requeue(record_id="msg_old", provider_message_id="wamid.old",
                                at=time.time() - 1, error={"code": 131000}, final_error={},
                                max_attempts=3)
        assert back.state == "queued"
        assert await ob.status(provider_message_id="wamid.old", record_id="msg_old",
                               status="sent", error=None) is None
        assert (await ob.get("msg_old")).state == "queued"
    finally:
        await ob.close()
