"""Meta's usage headers end to end: the simulator sends ``X-App-Usage`` and
``X-Business-Use-Case-Usage``; ``gateway_ratelimit_headroom_ratio{channel, account, scope}``
follows them, and a scope they report blocked waits until Meta says it may go again."""

from __future__ import annotations

import asyncio
import json
import time

from tests.outbound.conftest import IG, WA

A, B, U1 = "15550001234", "15550005678", "9000000000000001"


def text(to: str, body: str = "hello", channel: str = "whatsapp") -> dict:
    return {"channel": channel, "to": to, "type": "text", "text": body}


async def gauge(ob, channel: str, account: str, scope: str, want: float,
                timeout: float = 3.0) -> float | None:
    deadline = time.monotonic() + timeout
    found = None
    while time.monotonic() < deadline:
        found = ob.metric("gateway_ratelimit_headroom_ratio", channel=channel, account=account,
                          scope=scope)
        if found is not None and abs(found - want) < 2e-3:
            break
        await asyncio.sleep(0.02)
    return None if found is None else round(found, 3)  # a reading decays over an hour


async def test_headroom_gauge_follows_the_simulators_usage_headers(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    await ob.inbound("instagram", U1)
    ob.sim.set_app_usage(40, total_cputime=10, total_time=25)
    ob.sim.set_business_usage(WA, 70, total_cputime=5, total_time=5)
    ob.sim.set_business_usage(IG, 12, total_cputime=30, total_time=3)
    for body in (text(A), text(U1, channel="instagram")):
        _, answer = await ob.send(body)
        await ob.wait(answer["id"], "sent")
    assert await gauge(ob, "whatsapp", WA, "app", 0.6) == 0.6
    buc = f"buc:{WA}:whatsapp_business_messaging"
    assert await gauge(ob, "whatsapp", WA, buc, 0.3) == 0.3
    assert await gauge(ob, "instagram", IG, f"buc:{IG}:instagram", 0.7) == 0.7
    assert await gauge(ob, "instagram", IG, "app", 0.6) == 0.6
    number = ob.metric("gateway_ratelimit_headroom_ratio", channel="whatsapp", account=WA,
                       scope="number")
    assert number is not None and 0 <= number <= 1  # the local limiter is reported too
    ob.sim.set_app_usage(90)  # a new reading replaces the old one
    _, answer = await ob.send(text(A, "again"))
    await ob.wait(answer["id"], "sent")
    assert await gauge(ob, "whatsapp", WA, "app", 0.1) == 0.1


async def test_a_blocked_business_use_case_waits_until_meta_says(outbound):
    ob = await outbound()
    await ob.open_windows("whatsapp", [A, B])
    ob.sim.block(WA, 1.5)  # 80007 with estimated_time_to_regain_access = 0.025 min
    block_ends = time.time() + 1.5
    _, first = await ob.send(text(A))
    await asyncio.sleep(0.3)
    _, second = await ob.send(text(B))  # another recipient: the whole account waits
    scope = f"buc:{WA}:whatsapp_business_messaging"
    assert await gauge(ob, "whatsapp", WA, scope, 0.0) == 0.0
    await ob.wait(first["id"], "sent", timeout=6)
    await ob.wait(second["id"], "sent", timeout=6)
    refused, *later = ob.sim.requests
    assert refused["status"] == 400
    assert all(r["at"] >= block_ends - 0.02 for r in later), "nothing before the block ends"
    assert [r["status"] for r in later] == [200, 200]
    assert await gauge(ob, "whatsapp", WA, scope, 1.0, timeout=1) > 0.9


async def test_app_usage_at_100_percent_parks_the_app_scope(outbound):
    """A success answered with ``X-App-Usage`` at 100 %: the next call waits (Meta gives no time,
    so the long throttle backoff applies) instead of running into code 4."""
    ob = await outbound(outbound="throttle_backoff_long = 0.8\nthrottle_backoff_max = 5.0")
    await ob.open_windows("whatsapp", [A, B])
    success = {"messaging_product": "whatsapp", "contacts": [{"input": A, "wa_id": A}],
               "messages": [{"id": "wamid.FULL.1"}]}
    ob.sim.fail_next(WA, success, status=200, headers={"X-App-Usage": json.dumps(
        {"call_count": 100, "total_cputime": 20, "total_time": 30})})
    _, first = await ob.send(text(A))
    assert (await ob.wait(first["id"], "sent"))["provider_message_id"] == "wamid.FULL.1"
    _, second = await ob.send(text(B))
    assert await gauge(ob, "whatsapp", WA, "app", 0.0) == 0.0
    await ob.wait(second["id"], "sent", timeout=5)
    (wait,) = [b["at"] - a["at"] for a, b in zip(ob.sim.requests, ob.sim.requests[1:],
                                                  strict=False)]
    assert 0.75 <= wait <= 1.5
    assert ob.sim.count_4 == 0


async def test_code_4_while_the_app_is_over_its_limit_then_recovers(outbound):
    ob = await outbound(outbound="throttle_backoff_long = 0.2\nthrottle_backoff_max = 5.0")
    await ob.inbound("whatsapp", A)
    ob.sim.set_app_usage(100)  # Meta refuses every call with code 4
    _, answer = await ob.send(text(A))
    await asyncio.sleep(0.7)
    record = await ob.status(answer["id"])
    assert record["status"] == "queued" and record["error"]["code"] == 4
    assert 1 <= ob.sim.count_4 <= 3  # 0, 0.2, 0.6 s: backing off, not hammering
    assert await gauge(ob, "whatsapp", WA, "app", 0.0) == 0.0
    ob.sim.set_app_usage(None)
    await ob.wait(answer["id"], "sent", timeout=5)
