"""Each Meta error code's behaviour: retry, slow down, fail at once, or pause the account."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway import keys
from gateway.outbound.errors import AccountPaused, MetaRetryable, MetaThrottled, from_response
from tests.conftest import DATA
from tests.outbound.conftest import IG, WA

INDEX = json.loads((DATA / "graph" / "errors_index.json").read_text())["errors"]
A, U1 = "15550001234", "9000000000000001"


def behaviour(exc) -> str:
    if isinstance(exc, AccountPaused):
        return "pause"
    if isinstance(exc, MetaThrottled):
        return "slow"
    return "retry" if isinstance(exc, MetaRetryable) else "fail"


@pytest.mark.parametrize("case", INDEX, ids=[c["file"] for c in INDEX])
def test_every_error_body_maps_to_its_behaviour(case):
    body = (DATA / "graph" / case["file"]).read_bytes()
    exc = from_response(case["http_status"], body)
    assert behaviour(exc) == case["behaviour"]
    assert exc.code == case["code"] and exc.subcode == case["error_subcode"]
    assert exc.alert == case["alert"]
    if case["behaviour"] in ("slow", "pause"):
        assert exc.scope == case["scope"]
    assert exc.fbtrace_id and exc.describe()["code"] == case["code"]
    if case["behaviour"] in ("fail", "pause"):
        assert exc.hint, "permanent errors tell the operator what to do"


def test_5xx_without_body_is_retryable_and_4xx_without_body_is_not():
    assert isinstance(from_response(502, b"<html>Bad gateway</html>"), MetaRetryable)
    assert not from_response(404, b"not found").retryable


@pytest.mark.parametrize("case", INDEX, ids=[c["file"] for c in INDEX])
async def test_the_service_applies_the_behaviour(outbound, case):
    ob = await outbound()
    channel, to, account = (("whatsapp", A, WA) if case["channel"] == "whatsapp"
                            else ("instagram", U1, IG))
    await ob.inbound(channel, to)
    body = json.loads((DATA / "graph" / case["file"]).read_text())
    ob.sim.fail_next(account, body, status=case["http_status"])
    status, answer = await ob.send({"channel": channel, "to": to, "type": "text", "text": "hello"})
    assert status == 202
    registry = ob.gw.app[keys.METRICS].registry
    if case["behaviour"] in ("retry", "slow"):
        record = await ob.wait(answer["id"], "sent", timeout=10)
        assert len(ob.sim.requests) == 2 and len(ob.sim.accepted) == 1
        assert registry.get_sample_value("gateway_outbound_messages_total", {
            "channel": channel, "type": "text", "outcome": "retried"}) == 1
        assert record["error"] is None
    elif case["behaviour"] == "fail":
        record = await ob.wait(answer["id"], "failed")
        assert record["error"]["code"] == case["code"] and record["error"]["hint"]
        assert len(ob.sim.requests) == 1
    else:  # pause: the account stops, the message is kept
        record = await ob.wait(answer["id"], "queued")
        service = ob.gw.app[keys.OUTBOUND]
        for _ in range(100):
            if service.paused:
                break
            import asyncio
            await asyncio.sleep(0.02)
        assert (channel, account) in service.paused
        status, later = await ob.send({"channel": channel, "to": to, "type": "text",
                                       "text": "again"})
        import asyncio
        await asyncio.sleep(0.3)
        assert len(ob.sim.requests) == 1, "a paused account sends nothing"
        assert (await ob.status(later["id"]))["status"] == "queued"
        alerts = [s for m in registry.collect() if m.name == "gateway_alerts" for s in m.samples
                  if s.labels["account"] == account and s.value == 1]
        assert alerts
    if case["alert"]:
        assert registry.get_sample_value("gateway_alerts", {
            "channel": channel, "account": account, "reason": str(case["code"])}) == 1


FAIL_AT_ONCE = [100, 131047, 131030, 131026, 131008, 131009, 132000, 132001, 132002, 132005,
                132007, 132008, 132012, 132015, 132016, 132068, 132999]


@pytest.mark.parametrize("code", FAIL_AT_ONCE)
async def test_permanent_codes_fail_at_once_with_a_hint(outbound, code):
    """Template errors (every 132xxx but the throttled flow), 131047, 131030, 100: one request,
    failed at once, never retried, the error and an operator hint on the record."""
    import time

    from gateway.testing.graph import meta_error

    ob = await outbound()
    await ob.inbound("whatsapp", A)
    ob.sim.fail_next(WA, meta_error(code, f"(#{code}) Simulated"), status=400)
    started = time.monotonic()
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    record = await ob.wait(answer["id"], "failed", timeout=5)
    assert time.monotonic() - started < 2
    assert record["error"]["code"] == code and record["error"]["hint"]
    if code == 131047:
        assert "template" in record["error"]["hint"]
    import asyncio

    await asyncio.sleep(0.3)  # nothing else is tried
    assert len(ob.sim.requests) == 1
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="retried") is None
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="failed") == 1
    alerted = ob.metric("gateway_alerts", channel="whatsapp", account=WA, reason=str(code))
    assert (alerted == 1) == (code in (131030, 132000, 132001, 132002, 132007, 132015, 132016,
                                       132999))


@pytest.mark.parametrize("code,want,scope,alert", [
    (132069, "slow", "number", False), (131064, "slow", "pair", False),
    (133016, "slow", "number", False), (200, "fail", None, True), (299, "fail", None, True),
    (131031, "pause", "account", True), (133004, "retry", None, False),
    (131016, "retry", None, False), (130497, "fail", None, True), (135000, "fail", None, False),
])
def test_the_rest_of_metas_table(code, want, scope, alert):
    from gateway.testing.graph import meta_error

    exc = from_response(400, json.dumps(meta_error(code, "x")).encode())
    assert behaviour(exc) == want
    assert exc.alert == alert and (want != "slow" or exc.scope == scope)


def test_retry_after_comes_from_metas_headers():
    from gateway.testing.graph import meta_error

    body = json.dumps(meta_error(80007, "x")).encode()
    buc = {"X-Business-Use-Case-Usage": json.dumps({"190000000000001": [{
        "type": "whatsapp_business_management", "call_count": 100,
        "estimated_time_to_regain_access": 19}]})}
    assert from_response(400, body, headers=buc).retry_after == 1140
    assert from_response(400, body, headers={"Retry-After": "30"}).retry_after == 30
    assert from_response(400, body).retry_after is None
    permanent = json.dumps(meta_error(100, "x")).encode()  # a hint on a non-throttle is ignored
    assert from_response(400, permanent, headers=buc).retry_after is None
    assert from_response(503, b"", headers={"Retry-After": "7"}).retry_after == 7


async def test_an_alert_of_a_failed_send_clears_an_hour_after_the_last_one(outbound,
                                                                            monkeypatch):
    """``gateway_alerts`` is 1 while an operator must act: after an alerting error (131030, a
    recipient missing from a test number's allow list) it is 1, a success of another message
    right after proves nothing, and once ``ALERT_HOLD_SECONDS`` (an hour; here shortened) have
    passed without the code, the next successful send clears it, so an alert on it resolves."""
    from gateway.outbound import service
    from gateway.testing.graph import meta_error

    monkeypatch.setattr(service, "ALERT_HOLD_SECONDS", 1.0)
    ob = await outbound()
    await ob.inbound("whatsapp", "15550001234")
    ob.sim.fail_next(WA, meta_error(131030, "(#131030) Recipient not in allowed list"),
                     status=400)
    text = {"channel": "whatsapp", "to": "15550001234", "type": "text", "text": "x"}
    _, first = await ob.send(text)
    await ob.wait(first["id"], "failed", timeout=5)
    labels = {"channel": "whatsapp", "account": WA, "reason": "131030"}
    assert ob.metric("gateway_alerts", **labels) == 1
    _, ok = await ob.send({**text, "text": "y"})
    await ob.wait(ok["id"], "sent", timeout=5)
    assert ob.metric("gateway_alerts", **labels) == 1  # too soon: maybe another recipient
    await asyncio.sleep(1.1)
    _, ok = await ob.send({**text, "text": "z"})
    await ob.wait(ok["id"], "sent", timeout=5)
    assert ob.metric("gateway_alerts", **labels) == 0
