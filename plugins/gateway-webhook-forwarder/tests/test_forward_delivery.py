"""Through a real in-process gateway to a real receiver: signatures, bodies, retries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

from conftest import FORWARD_SECRET
from gateway import events, keys
from gateway.testing import free_port

from gateway_webhook_forwarder import verify

FAST = "max_attempts = {n}\nbackoff_initial = 0.05\nbackoff_max = 0.1\n"


def check_signature(headers: dict[str, str], body: bytes) -> None:
    """Verify as a receiver would, without the plugin's own helper."""
    parts = dict(p.split("=", 1) for p in headers["X-Gateway-Signature"].split(","))
    assert set(parts) == {"t", "v1"}
    assert abs(time.time() - int(parts["t"])) < 60
    want = hmac.new(FORWARD_SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(parts["v1"], want.hexdigest())


def metric(gw, outcome: str) -> float:
    registry = gw.app[keys.METRICS].registry
    return registry.get_sample_value("gateway_sink_deliveries_total",
                                     {"sink": "forward", "outcome": outcome}) or 0.0


def event_id(message_id: str) -> str:
    return events.event_id("testchan", message_id)


async def test_batch_arrives_signed_as_json_lines_with_its_event_ids(gateway, receiver):
    gw = await gateway()
    assert await gw.post({"id": "m1", "from": "c1", "text": "hello"},
                         {"id": "m2", "from": "c2", "text": "hi there"}) == 200
    await wait_delivered(receiver, 2)

    lines = []
    for req in receiver.requests:
        check_signature(req.headers, req.body)
        assert verify(FORWARD_SECRET, req.body, req.headers["X-Gateway-Signature"])
        assert req.headers["Content-Type"] == "application/x-ndjson"
        assert req.body.endswith(b"\n")
        batch = [json.loads(line) for line in req.body.splitlines()]
        assert req.headers["X-Gateway-Event-Ids"] == ",".join(e["id"] for e in batch)
        lines += req.body.splitlines()
    got = [json.loads(line) for line in lines]
    assert [(e["id"], e["kind"], e["channel"], e["message_id"], e["text"], e["schema"])
            for e in got] == [(event_id("m1"), "message", "testchan", "m1", "hello", 1),
                              (event_id("m2"), "message", "testchan", "m2", "hi there", 1)]
    # Each line is exactly the canonical encoding.
    assert all(events.encode(events.decode(line)) == line for line in lines)


async def test_array_format_posts_one_json_array(gateway, receiver):
    gw = await gateway('format = "array"')
    await gw.post({"id": "a1", "from": "c1", "text": "one"},
                  {"id": "a2", "from": "c1", "text": "two"})
    await wait_delivered(receiver, 2)
    bodies = [json.loads(r.body) for r in receiver.requests]
    assert all(isinstance(b, list) for b in bodies)
    assert [e["text"] for b in bodies for e in b] == ["one", "two"]
    assert {r.headers["Content-Type"] for r in receiver.requests} == {"application/json"}
    for req in receiver.requests:
        check_signature(req.headers, req.body)


async def test_server_error_then_success_delivers_the_event_once(gateway, receiver):
    gw = await gateway(FAST.format(n=5))
    receiver.script = [(500, {})]
    await gw.post({"id": "r1", "from": "c1", "text": "retry me"})
    await wait_delivered(receiver, 1)
    await asyncio.sleep(0.3)  # nothing else may arrive
    assert [r.status for r in receiver.requests] == [500, 200]
    assert receiver.delivered_ids() == [event_id("r1")]
    for req in receiver.requests:  # the retry is signed afresh
        check_signature(req.headers, req.body)
    assert await gw.app[keys.JOURNAL].dead_letters("forward") == []
    assert metric(gw, "retry") == 1
    assert metric(gw, "ok") == 1


async def test_client_error_dead_letters_at_once(gateway, receiver):
    gw = await gateway(FAST.format(n=5))
    receiver.default = 400
    await gw.post({"id": "p1", "from": "c1", "text": "rejected"})
    letters = await gw.dead_letters(1)
    assert [(d.event_id, d.attempts) for d in letters] == [(event_id("p1"), 1)]
    assert "PermanentError" in letters[0].reason and "400" in letters[0].reason
    await asyncio.sleep(0.3)
    assert [r.status for r in receiver.requests] == [400]  # never retried
    assert metric(gw, "dead") == 1


async def test_rate_limited_waits_for_retry_after(gateway, receiver):
    # the hint is honoured up to backoff_max (the dispatcher caps it there)
    gw = await gateway("max_attempts = 3\nbackoff_initial = 0.01\nbackoff_max = 5\n")
    receiver.script = [(429, {"Retry-After": "1"})]
    await gw.post({"id": "l1", "from": "c1", "text": "slow down"})
    await wait_delivered(receiver, 1)
    first, second = receiver.requests
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 0.9  # the hint, not the 0.01 s backoff


async def test_unreachable_receiver_is_retried_then_dead_lettered(gateway, receiver):
    gw = await gateway(FAST.format(n=2), url=f"http://127.0.0.1:{free_port()}/hook")
    await gw.post({"id": "u1", "from": "c1", "text": "nobody home"})
    letters = await gw.dead_letters(1)
    assert [(d.event_id, d.attempts) for d in letters] == [(event_id("u1"), 2)]
    assert "RetryableError" in letters[0].reason and "ConnectError" in letters[0].reason


async def test_slow_receiver_times_out_and_is_retried(gateway, receiver):
    gw = await gateway(FAST.format(n=2) + "timeout = 0.2\n")
    receiver.delay = 1.0
    await gw.post({"id": "t1", "from": "c1", "text": "too slow"})
    letters = await gw.dead_letters(1)
    assert [(d.event_id, d.attempts) for d in letters] == [(event_id("t1"), 2)]
    assert "ReadTimeout" in letters[0].reason


async def wait_delivered(receiver, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while len(receiver.delivered_ids()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"delivered: {receiver.delivered_ids()}")
        await asyncio.sleep(0.02)
