"""Throttling answers (130429, 131056, 4, 613, 80007, ...) at the simulator: per-scope exponential
backoff with jitter, reset on success, Meta's hints waited out, and a bound after which the
message fails with a clear error."""

from __future__ import annotations

import asyncio
import json

from structlog.testing import capture_logs

from tests.conftest import DATA
from tests.outbound.conftest import IG, WA

A, B, U1 = "15550001234", "15550005678", "9000000000000001"


def text(to: str, body: str = "hello", channel: str = "whatsapp") -> dict:
    return {"channel": channel, "to": to, "type": "text", "text": body}


def gaps(requests: list[dict]) -> list[float]:
    times = [r["at"] for r in requests]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def test_backoff_doubles_with_jitter_and_resets_on_success(outbound):
    ob = await outbound(outbound="throttle_backoff_initial = 0.2\nthrottle_backoff_max = 5.0")
    await ob.open_windows("whatsapp", [A, B])
    ob.sim.fail_next(WA, 130429, count=3)
    _, first = await ob.send(text(A))
    record = await ob.wait(first["id"], "sent", timeout=10)
    waits = gaps(ob.sim.requests)
    assert len(waits) == 3
    for wait, base in zip(waits, (0.2, 0.4, 0.8), strict=True):
        assert base - 0.01 <= wait <= base * 1.25 + 0.3, waits  # never shorter
    assert record["error"] is None and record["attempts"] == 1  # throttles spend no attempt
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="retried") == 3
    ob.sim.fail_next(WA, 130429)  # after a success the scope starts again from the first step
    before = len(ob.sim.requests)
    _, second = await ob.send(text(B, "again"))  # (another recipient: A's pair limit is spent)
    await ob.wait(second["id"], "sent", timeout=10)
    (wait,) = gaps(ob.sim.requests[before:])
    assert 0.19 <= wait <= 0.55


async def test_jitter_spreads_the_waits(outbound):
    ob = await outbound(outbound="throttle_backoff_initial = 0.2\nthrottle_backoff_max = 5.0")
    customers = [f"155500{i:05d}" for i in range(6)]
    await ob.open_windows("whatsapp", customers)
    ob.sim.set_mps(WA, 1000)
    ob.sim.fail_next(WA, 131056, count=6)  # pair limit: each recipient backs off on its own
    ids = [(await ob.send(text(c)))[1]["id"] for c in customers]
    for record_id in ids:
        await ob.wait(record_id, "sent", timeout=10)
    first = {}
    for r in ob.sim.requests:
        first.setdefault(r["body"]["to"], []).append(r["at"])
    waits = [t[1] - t[0] for t in first.values()]
    assert all(0.19 <= w <= 0.2 * 1.25 + 0.3 for w in waits), waits
    assert max(waits) - min(waits) > 0.005, "jittered, not in lockstep"


async def test_a_message_throttled_too_often_fails_with_a_clear_error(outbound):
    ob = await outbound(outbound="throttle_max_attempts = 3")
    await ob.inbound("whatsapp", A)
    ob.sim.fail_next(WA, 130429, count=10)
    with capture_logs() as logs:
        _, answer = await ob.send(text(A))
        record = await ob.wait(answer["id"], "failed", timeout=10)
    assert len(ob.sim.requests) == 3
    error = record["error"]
    assert error["code"] == 130429 and error["throttled"] == 3
    assert "throttled it 3 times" in error["hint"]
    assert "outbound.throttle_max_attempts = 3" in error["hint"]
    assert "Lower the send rate" in error["hint"]
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="failed") == 1
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="retried") == 2
    (line,) = [e for e in logs if e["event"] == "outbound_throttle_gave_up"]
    assert (line["code"], line["scope"], line["throttled"]) == (130429, "number", 3)


async def test_a_message_throttled_too_long_fails(outbound):
    ob = await outbound(outbound="throttle_max_seconds = 0.5\nthrottle_backoff_initial = 0.2\n"
                                 "throttle_backoff_max = 5.0")
    await ob.inbound("whatsapp", A)
    ob.sim.fail_next(WA, 130429, count=10)
    _, answer = await ob.send(text(A))
    record = await ob.wait(answer["id"], "failed", timeout=10)
    assert len(ob.sim.requests) == 3  # at 0, ~0.2 and ~0.6 s: past the 0.5 s bound
    assert "outbound.throttle_max_seconds = 0.5" in record["error"]["hint"]


async def test_613_parks_the_instagram_account_for_at_least_a_minute_by_default(outbound):
    """Meta's table: 613 → back off at least 60 s (``throttle_backoff_long``' default)."""
    ob = await outbound(outbound="throttle_backoff_long = 60.0\nthrottle_backoff_max = 900.0")
    await ob.inbound("instagram", U1)
    ob.sim.fail_next(IG, json.loads((DATA / "graph" / "error_613.json").read_text()))
    _, answer = await ob.send(text(U1, channel="instagram"))
    await asyncio.sleep(1.0)
    record = await ob.status(answer["id"])
    assert record["status"] == "queued" and record["error"]["code"] == 613
    assert len(ob.sim.requests) == 1
    limiter = ob.service.limiters[("instagram", IG)]
    assert 58 <= limiter.parked("ig_account") <= 76
    assert ob.metric("gateway_ratelimit_headroom_ratio", channel="instagram", account=IG,
                     scope="ig_account") == 0


async def test_80007_waits_for_estimated_time_to_regain_access(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    buc = {WA: [{"type": "whatsapp_business_management", "call_count": 100,
                 "total_cputime": 3, "total_time": 3, "estimated_time_to_regain_access": 0.02}]}
    ob.sim.fail_next(WA, json.loads((DATA / "graph" / "error_80007.json").read_text()),
                     headers={"X-Business-Use-Case-Usage": json.dumps(buc)})
    _, answer = await ob.send(text(A))
    await ob.wait(answer["id"], "sent", timeout=10)
    (wait,) = gaps(ob.sim.requests)
    assert 1.2 <= wait <= 2.0, wait  # 0.02 min, not the 0.1 s of throttle_backoff_long


def test_a_throttle_of_the_accounts_own_scope_lowers_its_rate_and_sends_win_it_back():
    """AIMD (limits.md §5, rule 6: throttle codes shrink the local bucket): a 130429 spaces the
    number for half its rate (not below 5% of the configured one), once per congestion (the
    throttled answers of the sends already in flight count once); a second of sending that
    goes through wins back 1% of the configured rate; other codes leave the rate alone."""
    from gateway.outbound.ratelimit import SAFETY, AccountLimiter

    limiter = AccountLimiter(80.0)
    limiter.throttle("number", None, 1.0, 2.0, 60.0, code=130429)
    assert limiter.effective_rate == 40.0
    assert abs(limiter.account.interval - 1 / (40.0 * SAFETY)) < 1e-12
    for _ in range(63):  # the other sends in flight, answered 130429 in the same instant
        limiter.throttle("number", None, 1.0, 2.0, 60.0, code=130429)
    limiter.throttle("number", None, 1.0, 2.0, 60.0, code=131048)  # quality, not throughput
    limiter.throttle("app", None, 1.0, 2.0, 60.0, code=4)
    limiter.throttle("pair", "15550001234", 1.0, 4.0, 60.0, code=131056)
    assert limiter.effective_rate == 40.0
    for _ in range(100):  # one congestion after another
        limiter._lowered_at = float("-inf")
        limiter.throttle("number", None, 1.0, 2.0, 60.0, code=130429)
    assert limiter.effective_rate == 80.0 * 0.05
    start = limiter._recovered_at
    for second in range(1, 11):  # ten seconds of sends that go through
        limiter.sent_ok("15550001234", now=start + second)
    assert abs(limiter.effective_rate - 80.0 * 0.15) < 1e-9
    limiter.sent_ok("15550001234", now=start + 3600)  # idle an hour: one second's worth only
    assert abs(limiter.effective_rate - 80.0 * 0.16) < 1e-9


async def test_a_number_meta_limits_below_its_configured_rate_is_slowed_down(outbound):
    """The number is configured for 80/s; Meta takes 20/s from it (a coexistence number, or
    inbound traffic sharing the 80). Each 130429 lowers the rate, so Meta refuses a few sends,
    not one in ten (the rate used to come back in full after each park)."""
    ob = await outbound(mps=20, outbound="throttle_max_attempts = 1000\n"
                                         "throttle_backoff_initial = 0.5")
    customers = [f"1555{i:07d}" for i in range(120)]
    await ob.open_windows("whatsapp", customers)
    ids = [(await ob.send(text(c)))[1]["id"] for c in customers]
    for record in ids:
        await ob.wait(record, "sent", timeout=60)
    assert len(ob.sim.accepted) == 120
    assert ob.sim.count_130429 <= 6, ob.sim.count_130429  # 11 before


async def test_an_app_wide_throttle_parks_every_account_of_the_app(outbound):
    """Code 4 (and X-App-Usage at 100%) is the app's limit: one account's answer parks the
    app scope of every account of that app (the same channel, or one app secret for both
    channels), so the others do not call into it again."""
    wa2 = "100000000000002"
    ob = await outbound(
        extra_wa=f'[[channels.whatsapp.accounts]]\nphone_number_id = "{wa2}"\n'
                 'access_token = "EAAB-2"\n',
        outbound="throttle_backoff_long = 30.0\nthrottle_backoff_max = 60.0")
    ob.sim.set_app_usage(100)  # over the app's hourly limit: Meta answers code 4 to every call
    status, answer = await ob.send({"channel": "whatsapp", "account_id": WA, "to": A,
                                    "type": "template", "template": {
                                        "name": "hello", "language": "en_US"}})
    assert status == 202, answer
    for _ in range(100):
        if ob.sim.count_4:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    for key in (("whatsapp", WA), ("whatsapp", wa2), ("instagram", IG)):
        assert ob.service.limiters[key].parked("app") > 20, key
    for body in ({"channel": "whatsapp", "account_id": wa2, "to": A, "type": "template",
                  "template": {"name": "hello", "language": "en_US"}},
                 {"channel": "instagram", "to": U1, "type": "mark_read", "message_id": "m"}):
        assert (await ob.send(body))[0] == 202
    await asyncio.sleep(0.5)
    assert ob.sim.count_4 == 1  # nobody called into the app's limit again
