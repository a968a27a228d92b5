"""RedisOutbox specifics on a real redis-server: key layout and retention, replicas that die or
stop, lost replies, wake-ups, the per-account sending lease, a Redis crash, two gateways."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from gateway import config as gwconfig
from gateway.outbound.outbox import Customer, Outbox
from gateway.outbound.redis_outbox import CLAIM_TOKEN_MS, AccountLease, RedisOutbox
from gateway.outbound.store import LocalLease, account_lease, open_outbox
from tests.outbound import redis_fixtures

redis_server = redis_fixtures.redis_server
redis_url = redis_fixtures.redis_url
own_redis = redis_fixtures.own_redis

WA, CUSTOMER = "100000000000001", "15550001234"


@pytest.fixture
async def opened():
    """Factory: ``await opened(url, **options)`` → an open RedisOutbox, closed after the test."""
    boxes: list[RedisOutbox] = []

    async def make(url: str, reconcile_seconds: float = 60.0, **options) -> RedisOutbox:
        ob = RedisOutbox(url, **options)
        await ob.open(reconcile_seconds)
        boxes.append(ob)
        return ob

    yield make
    for ob in boxes:
        await ob.close()


async def kill(ob: RedisOutbox) -> None:
    """Stop ``ob`` as a crash would (no graceful close)."""
    for task in ob._tasks:
        task.cancel()
    await asyncio.gather(*ob._tasks, return_exceptions=True)
    ob._tasks = []
    await ob.redis.aclose()
    ob.redis = None


async def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


def prefix_of(url: str) -> str:
    return url.rsplit("prefix=", 1)[1]


async def test_key_layout_under_the_url_prefix_and_retention(redis_url, opened):
    ob = await opened(redis_url, retention_seconds=100)
    p = prefix_of(redis_url)
    assert ob.p == p and "prefix" not in ob.url
    r = ob.redis
    row, _ = await ob.add("whatsapp", WA, CUSTOMER, "text", b"req", "idem-1")
    assert await r.hget(f"{p}:out:rec:{row.id}", "state") == b"queued"
    assert await r.object("encoding", f"{p}:out:rec:{row.id}") == b"listpack"  # compact
    assert await r.get(f"{p}:out:req:{row.id}") == b"req"
    assert await r.get(f"{p}:out:idem:idem-1") == row.id.encode()
    assert await r.zscore(f"{p}:out:due:whatsapp:{WA}", row.id) == row.next_at
    assert await r.zscore(f"{p}:out:to:whatsapp:{CUSTOMER}", row.id) is not None
    # nothing waiting to be sent ever expires
    await ob.claim_due("whatsapp", WA, 10)
    await ob.retry_at(row.id, time.time() - 1, {"code": 1, "message": "x" * 500})
    assert await r.get(f"{p}:out:err:{row.id}") == b'{"code":1,"message":"%s"}' % (b"x" * 500)
    for key in (f"{p}:out:rec:{row.id}", f"{p}:out:req:{row.id}", f"{p}:out:err:{row.id}",
                f"{p}:out:idem:idem-1", f"{p}:out:to:whatsapp:{CUSTOMER}"):
        assert await r.pttl(key) == -1, key
    await ob.claim_due("whatsapp", WA, 10)
    assert await r.smembers(f"{p}:out:sending:{ob.owner}") == {row.id.encode()}
    assert ob.owner.encode() in await r.smembers(f"{p}:out:owners")
    assert await r.pttl(f"{p}:out:alive:{ob.owner}") > 0
    await ob.sent(row.id, "wamid.1")
    assert await r.get(f"{p}:out:pmid:wamid.1") == row.id.encode()
    assert await r.smembers(f"{p}:out:sending:{ob.owner}") == set()
    assert await r.zcard(f"{p}:out:due:whatsapp:{WA}") == 0
    assert await r.exists(f"{p}:out:err:{row.id}") == 0  # sent: no error any more
    for key in (f"{p}:out:rec:{row.id}", f"{p}:out:req:{row.id}", f"{p}:out:idem:idem-1",
                f"{p}:out:pmid:wamid.1", f"{p}:out:to:whatsapp:{CUSTOMER}"):
        assert 90_000 < await r.pttl(key) <= 100_000, key  # settled: kept for the retention
    await ob.inbound("whatsapp", WA, CUSTOMER, 5.5, "wamid.in", True)
    assert await r.hgetall(f"{p}:out:customer:whatsapp:{CUSTOMER}") == {
        f"at:{WA}".encode(): b"5.5", f"mid:{WA}".encode(): b"wamid.in", f"opt:{WA}".encode(): b"1",
        f"optat:{WA}".encode(): b"5.5"}  # when the consent was said: the latest word wins
    assert await r.pttl(f"{p}:out:customer:whatsapp:{CUSTOMER}") == -1  # consent never expires
    other = await opened(redis_url.replace(f"prefix={p}", "prefix=elsewhere" + p))
    assert await other.get(row.id) is None  # another prefix is another gateway


async def test_settled_records_expire_queued_ones_stay(redis_url, opened):
    ob = await opened(redis_url, retention_seconds=1)
    done, _ = await ob.add("whatsapp", WA, CUSTOMER, "text", b"a", "idem-done")
    waiting, _ = await ob.add("whatsapp", WA, CUSTOMER, "text", b"b", None)
    await ob.claim_due("whatsapp", WA, 1)
    await ob.failed(done.id, {"code": 100})
    await asyncio.sleep(1.2)
    assert await ob.get(done.id) is None
    assert (await ob.get(waiting.id)).state == "queued"
    again, new = await ob.add("whatsapp", WA, CUSTOMER, "text", b"a", "idem-done")
    assert new and again.id != done.id  # the key is remembered as long as its record
    assert await ob.erase_contact("whatsapp", CUSTOMER) == {"outbox": 2, "customers": 0}


async def test_a_running_replica_reconciles_a_dead_replicas_sends(redis_url, opened):
    alive = await opened(redis_url, reconcile_seconds=0.3, alive_ms=300)
    dying = await opened(redis_url, alive_ms=300)
    row, _ = await dying.add("whatsapp", WA, CUSTOMER, "text", b"req", None)
    assert len(await dying.claim_due("whatsapp", WA, 10)) == 1
    await kill(dying)  # its heartbeat stops; the record stays `sending` …

    async def uncertain() -> bool:
        return (await alive.get(row.id)).state == "uncertain"

    assert await eventually(uncertain, 3.0)  # … until the other replica's heartbeat notices
    await asyncio.sleep(0.35)
    claimed = await alive.claim_due("whatsapp", WA, 10)
    assert [(r.id, r.state) for r in claimed] == [(row.id, "uncertain")]


async def test_a_replica_that_is_alive_keeps_its_sends(redis_url, opened):
    a = await opened(redis_url, alive_ms=300)
    b = await opened(redis_url, alive_ms=300)
    row, _ = await a.add("whatsapp", WA, CUSTOMER, "text", b"req", None)
    await a.claim_due("whatsapp", WA, 10)
    await asyncio.sleep(0.8)  # several heartbeats of both
    assert (await b.get(row.id)).state == "sending"
    late = RedisOutbox(redis_url, alive_ms=300)
    assert await late.open(60.0) == 0  # a replica starting now reconciles nothing of a's
    await late.close()
    assert (await b.get(row.id)).state == "sending"


async def test_a_graceful_close_leaves_unfinished_sends_uncertain(redis_url, opened):
    a = RedisOutbox(redis_url)
    await a.open(0.3)
    row, _ = await a.add("whatsapp", WA, CUSTOMER, "text", b"req", None)
    await a.claim_due("whatsapp", WA, 10)
    await a.close()
    b = await opened(redis_url)
    got = await b.get(row.id)
    assert got.state == "uncertain" and got.next_at > time.time()
    assert await b.redis.exists(f"{b.p}:out:alive:{a.owner}") == 0


async def test_a_claim_retried_after_a_lost_reply_hands_out_the_same_records(redis_url, opened):
    ob = await opened(redis_url)
    rows = [(await ob.add("whatsapp", WA, f"c{i}", "text", b"req", None))[0] for i in range(3)]
    args = [ob.p, "whatsapp", WA, repr(time.time()), 2, ob.owner, "token-1", CLAIM_TOKEN_MS]
    first = await ob._claim(args=args)
    again = await ob._claim(args=args)  # the same call, retried: not two more records
    assert first == again and len(first) == 4
    assert [r.id for r in await ob.claim_due("whatsapp", WA, 10)] == [rows[2].id]
    await ob.sent(rows[0].id, "wamid.0")
    assert len(await ob._claim(args=args)) == 2  # what has moved on is not handed out again


async def test_a_cancelled_send_loop_always_stops(redis_url, opened):
    """redis-py may swallow the cancellation of a task awaiting a command; the outbox raises it
    again, so a send loop (and the service's stop()) never waits forever."""
    ob = await opened(redis_url)
    await ob.add("whatsapp", WA, CUSTOMER, "text", b"req", None)

    async def loop() -> None:
        for _ in range(1_000_000):  # bounded, but far longer than the test
            await ob.next_due("whatsapp", WA)
            await ob.claim_due("whatsapp", "200000000000002", 10)

    for n in range(200):
        task = asyncio.create_task(loop())
        await asyncio.sleep(0.0002 * (n % 7))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=2.0)
        assert done and task.cancelled(), f"round {n}: the cancellation was lost"


async def test_watch_wakes_the_replica_that_sends(redis_url, opened):
    a = await opened(redis_url)
    b = await opened(redis_url)
    woken: list[tuple[str, str]] = []
    b.watch(lambda channel, account: woken.append((channel, account)))
    await asyncio.sleep(0.2)  # subscribed

    async def heard() -> bool:
        return bool(woken)

    await a.add("whatsapp", WA, CUSTOMER, "text", b"req", None)
    assert await eventually(heard, 3.0)
    assert woken == [("whatsapp", WA)]
    await a.add("whatsapp", WA, CUSTOMER, "text", b"req", "k")
    await a.add("whatsapp", WA, CUSTOMER, "text", b"req", "k")  # not new: nobody is woken
    await asyncio.sleep(0.3)
    assert woken == [("whatsapp", WA)] * 2


def test_open_outbox_chooses_by_backend(tmp_path, redis_url):
    sqlite = open_outbox(gwconfig.GatewayConfig(
        server=gwconfig.ServerConfig(data_dir=str(tmp_path))))
    assert isinstance(sqlite, Outbox) and sqlite.path == str(tmp_path / "outbox.db")
    shared = open_outbox(gwconfig.GatewayConfig(queue=gwconfig.QueueConfig(
        backend="redis", redis_url=redis_url)), retention_seconds=60)
    assert isinstance(shared, RedisOutbox)
    assert shared.p == prefix_of(redis_url) and shared.retention_ms == 60_000
    assert isinstance(account_lease(sqlite, "whatsapp", WA), LocalLease)
    lease = account_lease(shared, "whatsapp", WA)
    assert isinstance(lease, AccountLease)
    assert lease.key == f"{shared.p}:lease:outbound:whatsapp:{WA}"


async def test_local_lease_always_holds():
    lease = LocalLease()
    assert lease.held and await lease.start() and await lease.wait(0.1)
    assert await lease.acquire() and await lease.release()
    await lease.close()


# -- the per-account sending lease -----------------------------------------------------------

async def test_one_replica_holds_an_accounts_lease(redis_url, opened):
    a, b = await opened(redis_url), await opened(redis_url)
    la, lb = AccountLease(a, "whatsapp", WA, 5_000), AccountLease(b, "whatsapp", WA, 5_000)
    assert await la.acquire() and la.held
    assert await la.acquire()  # renewal
    assert not await lb.acquire() and not lb.held
    other = AccountLease(b, "whatsapp", "200000000000002", 5_000)
    assert await other.acquire()  # per account
    assert await AccountLease(b, "instagram", WA, 5_000).acquire()  # per channel
    assert 0 < await a.redis.pttl(la.key) <= 5_000
    assert await a.redis.get(la.key) == a.owner.encode()
    assert not await lb.release()  # not b's to give back
    assert la.held
    assert await la.release() and not la.held
    assert await lb.acquire() and lb.held
    assert not await la.acquire()


async def test_an_expired_lease_is_taken_over(redis_url, opened):
    a, b = await opened(redis_url), await opened(redis_url)
    la, lb = AccountLease(a, "whatsapp", WA, 300), AccountLease(b, "whatsapp", WA, 300)
    assert await la.acquire()
    assert not await lb.acquire()
    await asyncio.sleep(0.35)  # a stopped renewing (stalled, or died)
    assert not la.held  # a stops sending before the key expires (10 % margin) …
    assert await lb.acquire() and lb.held  # … and b takes over
    assert not await la.acquire() and not la.held


async def test_a_kept_lease_is_renewed_and_handed_over_on_close(redis_url, opened):
    a, b = await opened(redis_url), await opened(redis_url)
    la, lb = AccountLease(a, "whatsapp", WA, 300), AccountLease(b, "whatsapp", WA, 300)
    assert await la.start()
    assert not await lb.start()
    for _ in range(10):  # a second: three times the ttl, renewed all along
        await asyncio.sleep(0.1)
        assert la.held and not lb.held
    assert not await lb.wait(0.2)
    await la.close()  # a graceful stop gives it back at once
    assert not la.held
    assert await lb.wait(1.0)
    await lb.close()
    assert await a.redis.exists(lb.key) == 0


async def test_a_replica_that_cannot_renew_stops_sending(own_redis):
    url, start = own_redis
    proc = start()
    ob = RedisOutbox(url)
    await ob.open(60.0)
    lease = AccountLease(ob, "whatsapp", WA, 600)
    try:
        assert await lease.start()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await asyncio.sleep(0.6)
        assert not lease.held  # Redis is gone: the lease lapses, whatever the key says
        start()
        assert await lease.wait(5.0)  # back, and free again (the key expired with the ttl)
    finally:
        await lease.close()
        await ob.close()


# -- a Redis crash ------------------------------------------------------------------------------

async def test_acknowledged_adds_survive_a_redis_crash(own_redis):
    url, start = own_redis
    proc = start()
    ob = RedisOutbox(url)
    await ob.open(60.0)
    rows = [(await ob.add("whatsapp", WA, f"1555000{n:04d}", "text", f"r{n}".encode(),
                          f"key-{n}"))[0] for n in range(50)]
    await ob.inbound("whatsapp", WA, CUSTOMER, 1234.5, "wamid.in", True)
    claimed = await ob.claim_due("whatsapp", WA, 5)
    await ob.sent(claimed[0].id, "wamid.sent")
    os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no final save: only the AOF remains
    proc.wait(10)
    assert not await ob.ping()
    with pytest.raises(Exception):  # noqa: B017, PT011 - POST /v1/messages answers 500
        await ob.add("whatsapp", WA, CUSTOMER, "text", b"lost", None)
    # the send loop's calls wait for Redis instead of failing
    waiting = asyncio.create_task(ob.claim_due("whatsapp", WA, 100))
    status = asyncio.create_task(ob.status(provider_message_id="wamid.sent", record_id=None,
                                           status="delivered", error=None))
    await asyncio.sleep(0.5)
    assert not waiting.done() and not status.done()
    start()
    try:
        again = await asyncio.wait_for(waiting, 15)
        await asyncio.wait_for(status, 15)
        assert [r.id for r in again] == [r.id for r in rows[5:]]
        assert (await ob.get(claimed[0].id)).state == "delivered"
        assert [(await ob.get(r.id)).state for r in claimed[1:]] == ["sending"] * 4
        for n, row in enumerate(rows):
            assert (await ob.get(row.id)).request == f"r{n}".encode()
        same, new = await ob.add("whatsapp", WA, "x", "text", b"x", "key-7")
        assert not new and same.id == rows[7].id
        assert await ob.customer("whatsapp", WA, CUSTOMER) == Customer(1234.5, "wamid.in", True,
                                                                       1234.5)
        fresh = RedisOutbox(url)
        assert await fresh.open(60.0) == 0  # ob is alive (its heartbeat is back)
        await fresh.close()
    finally:
        await ob.close()


# -- two gateways ----------------------------------------------------------------------------

async def test_two_gateway_replicas_share_one_outbox(gateway, redis_url, monkeypatch):
    """Whichever replica accepts a send, it is sent once; either replica answers its status; the
    window opened by an inbound message is known to both."""
    from gateway import keys
    from gateway.outbound import service as service_module
    from gateway.testing.graph import GraphSimulator
    from tests.outbound.conftest import TOKEN, Outbound, channels_toml

    if hasattr(service_module, "Outbox"):  # until service.py builds it with open_outbox(config)
        monkeypatch.setattr(service_module, "Outbox", lambda data_dir: RedisOutbox(redis_url))
    async with GraphSimulator() as sim:
        extra = (f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\n'
                 f'redis_url = "{redis_url}"')
        channels = channels_toml(sim.url, extra_wa="pair_burst = 45\npair_interval_seconds = 0.1")
        gws = [await gateway(extra=extra, channels=channels) for _ in range(2)]
        assert all(isinstance(g.app[keys.OUTBOUND].outbox, RedisOutbox) for g in gws)
        replicas = [Outbound(g, sim) for g in gws]
        await replicas[0].inbound("whatsapp", CUSTOMER)
        for g in gws:
            await g.settle()

        async def window_known() -> bool:
            found = await gws[1].app[keys.OUTBOUND].outbox.customer("whatsapp", WA, CUSTOMER)
            return found.last_inbound_at is not None

        assert await eventually(window_known, 5.0)
        ids = []
        for i in range(20):
            status, answer = await replicas[i % 2].send(
                {"channel": "whatsapp", "to": CUSTOMER, "type": "text", "text": f"reply {i}"})
            assert status == 202, answer
            ids.append(answer["id"])
        for i, record_id in enumerate(ids):  # asked of the replica that did not accept it
            await replicas[(i + 1) % 2].wait(record_id, "sent", timeout=15)
        await asyncio.sleep(0.5)  # a second send would show up now
        texts = sorted(m.body["text"]["body"] for m in sim.accepted)
        assert texts == sorted(f"reply {i}" for i in range(20))
        assert sorted(m.body["biz_opaque_callback_data"] for m in sim.accepted) == sorted(ids)


async def test_an_out_of_band_throttling_code_parks_the_replica_that_sends(gateway, redis_url):
    """Two replicas, one account: whichever replica processes a value-level 130429, the one
    holding the account's lease parks the number (announced through Redis); the other neither
    parks nor reports a lower headroom for an account it does not send for."""
    import json

    from gateway import keys
    from gateway.testing.graph import GraphSimulator
    from tests.conftest import fixture_bytes
    from tests.outbound.conftest import TOKEN, WA, channels_toml

    async with GraphSimulator() as sim:
        extra = f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
        gws = [await gateway(extra=extra, channels=channels_toml(
            sim.url, outbound="throttle_backoff_initial = 30\nthrottle_backoff_max = 60"))
            for _ in range(2)]
        key = ("whatsapp", WA)
        services = [g.app[keys.OUTBOUND] for g in gws]

        async def one_holds() -> bool:
            return sum(s.leases[key].held for s in services) == 1

        assert await eventually(one_holds, 10.0)
        sender, idle = sorted(services, key=lambda s: not s.leases[key].held)
        body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
        body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = WA
        for i in range(8):  # each processed by either replica
            body["entry"][0]["changes"][0]["value"]["errors"][0]["title"] = f"Rate limit {i}"
            assert (await gws[i % 2].post("whatsapp", json.dumps(body).encode()))[0] == 200
        for g in gws:
            await g.settle()

        async def all_parked() -> bool:
            return sender.limiters[key].backoff.steps.get("number") == 8

        assert await eventually(all_parked, 10.0), dict(sender.limiters[key].backoff.steps)
        assert sender.limiters[key].parked("number") > 0
        assert idle.limiters[key].parked("number") == 0 and not idle.limiters[key].backoff.steps
        metrics = [g.app[keys.METRICS].registry for g in gws]
        assert sum(m.get_sample_value("gateway_meta_errors_total", {
            "channel": "whatsapp", "account": WA, "code": "130429"}) or 0 for m in metrics) == 8


async def test_an_announcement_that_hangs_never_holds_the_processor(gateway, redis_url,
                                                                    monkeypatch):
    """Redis stops answering the publish of an out-of-band throttling code: the processor goes
    on after ANNOUNCE_SECONDS, and the replica parks the number itself when it sends for it."""
    import json

    from gateway import keys
    from gateway.outbound import service as service_module
    from gateway.testing.graph import GraphSimulator
    from tests.conftest import fixture_bytes
    from tests.outbound.conftest import TOKEN, WA, channels_toml

    monkeypatch.setattr(service_module, "ANNOUNCE_SECONDS", 0.2)
    async with GraphSimulator() as sim:
        extra = f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
        gw = await gateway(extra=extra, channels=channels_toml(sim.url))
        service, key = gw.app[keys.OUTBOUND], ("whatsapp", WA)

        async def held() -> bool:
            return service.leases[key].held

        assert await eventually(held, 10.0)

        async def hangs(*args):
            await asyncio.sleep(3600)

        monkeypatch.setattr(service.outbox, "announce", hangs)
        body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
        value = body["entry"][0]["changes"][0]["value"]
        value["metadata"]["phone_number_id"] = WA
        value["errors"] *= 10  # ten announcements, one deadline for all of them
        processor = gw.app[keys.PROCESSOR]
        began = time.monotonic()
        assert (await gw.post("whatsapp", json.dumps(body).encode()))[0] == 200
        await gw.settle()
        async with processor.batch_lock:  # the batch, its notices included, is over
            assert time.monotonic() - began < 1.5  # not ten times 0.2 s

        async def parked() -> bool:
            return service.limiters[key].parked("number") > 0

        assert await eventually(parked, 3.0)
        assert service.limiters[key].backoff.steps.get("number") == 10
        began = time.monotonic()  # the processor goes on: the next webhook is processed
        text = fixture_bytes("whatsapp/text.json")
        assert (await gw.post("whatsapp", text))[0] == 200
        await gw.settle()
        assert time.monotonic() - began < 3


async def test_a_throttling_code_announced_between_lease_holders_parks_the_next_one(
        gateway, redis_url):
    """The account's lease is free when value-level 130429s are announced (its holder went):
    the replica that takes the lease over parks the number for what is left of the first
    backoff step, once, however many were announced (never a step further per code)."""
    import json

    from gateway import keys
    from gateway.testing.graph import GraphSimulator
    from tests.conftest import fixture_bytes
    from tests.outbound.conftest import TOKEN, WA, channels_toml

    async with GraphSimulator() as sim:
        extra = f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
        gw = await gateway(extra=extra, channels=channels_toml(
            sim.url, outbound="throttle_backoff_initial = 30\nthrottle_backoff_max = 60"))
        service, key = gw.app[keys.OUTBOUND], ("whatsapp", WA)
        lease, limiter = service.leases[key], service.limiters[key]

        async def held() -> bool:
            return lease.held

        assert await eventually(held, 10.0)
        assert await lease.release()  # no replica holds it now; the renewal takes it again
        body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
        body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = WA
        for _ in range(3):
            assert (await gw.post("whatsapp", json.dumps(body).encode()))[0] == 200
        await gw.settle()
        if lease.held:  # taken again before the codes came: they were parked the usual way
            pytest.skip("the lease came back before the announcements")

        async def parked() -> bool:
            return lease.held and limiter.parked("number") > 0

        assert await eventually(parked, 15.0)
        assert 20 < limiter.parked("number") <= 30  # the rest of one first step
        assert "number" not in limiter.backoff.steps  # not a step further per code


async def test_a_replica_keeps_the_longest_pending_step_and_parks_only_what_is_left(
        gateway, redis_url):
    """Without the lease: a long code (131048, a minute, capped by throttle_backoff_max) then a
    short one (130429) leave the long step pending; on takeover a scope is parked for what is
    left of it, and not at all once it is over."""
    from gateway import keys
    from gateway.testing.graph import GraphSimulator
    from tests.outbound.conftest import TOKEN, WA, channels_toml

    async with GraphSimulator() as sim:
        extra = f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
        gw = await gateway(extra=extra, channels=channels_toml(sim.url, outbound=(
            "throttle_backoff_initial = 1\nthrottle_backoff_long = 60\n"
            "throttle_backoff_max = 30")))
        service, key = gw.app[keys.OUTBOUND], ("whatsapp", WA)
        lease, limiter = service.leases[key], service.limiters[key]

        async def held() -> bool:
            return lease.held

        assert await eventually(held, 10.0)
        await lease.release()
        assert not lease.held
        service._out_of_band("whatsapp", WA, 131048)
        service._out_of_band("whatsapp", WA, 130429)
        (until,) = service._pending_parks[key].values()
        assert 29 < until - time.monotonic() <= 30  # the long step, as _throttle caps it
        service._pending_parks.pop(key)
        service._replay_parks(key, {"number": time.monotonic() + 5, "waba": time.monotonic() - 1})
        assert 4 < limiter.parked("number") <= 5 and limiter.parked("waba") == 0


async def test_only_the_announcements_that_failed_are_parked_here(gateway, redis_url,
                                                                 monkeypatch):
    """One of a batch's two throttling codes cannot be announced: this replica (the holder)
    parks that one itself and the other once it comes back through Redis, one step each."""
    import json

    from gateway import keys
    from gateway.testing.graph import GraphSimulator
    from tests.conftest import fixture_bytes
    from tests.outbound.conftest import TOKEN, WA, channels_toml

    async with GraphSimulator() as sim:
        extra = f'api_token = "{TOKEN}"\n[queue]\nbackend = "redis"\nredis_url = "{redis_url}"'
        gw = await gateway(extra=extra, channels=channels_toml(sim.url))
        service, key = gw.app[keys.OUTBOUND], ("whatsapp", WA)
        limiter = service.limiters[key]

        async def held() -> bool:
            return service.leases[key].held

        assert await eventually(held, 10.0)
        announce = service.outbox.announce

        async def flaky(channel, account, code):
            if code == 131048:
                raise ConnectionError("Redis went away")
            await announce(channel, account, code)

        monkeypatch.setattr(service.outbox, "announce", flaky)
        body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
        value = body["entry"][0]["changes"][0]["value"]
        value["metadata"]["phone_number_id"] = WA
        value["errors"].append({"code": 131048, "title": "Spam rate limit hit"})
        assert (await gw.post("whatsapp", json.dumps(body).encode()))[0] == 200
        await gw.settle()

        async def both() -> bool:
            return limiter.backoff.steps.get("number") == 2

        assert await eventually(both, 5.0), dict(limiter.backoff.steps)
        await asyncio.sleep(0.3)  # a third park would show now
        assert limiter.backoff.steps.get("number") == 2
