"""An expired token (190) or a billing problem (131042) pauses the account (meta/outbound.md §6):
nothing is failed or retried meanwhile, an alert and one log line say what to do, a probe resumes
it, and a message held longer than ``outbound.max_pause_seconds`` fails with the original error.
"""

from __future__ import annotations

import asyncio
import json
import time

from structlog.testing import capture_logs

from tests.conftest import DATA
from tests.outbound.conftest import WA

A, B = "15550001234", "15550005678"


async def until(check, timeout: float = 10.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {check}")


def text(to: str, body: str = "hello") -> dict:
    return {"channel": "whatsapp", "to": to, "type": "text", "text": body}


async def test_expired_token_pauses_alerts_and_says_what_to_do(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    ob.sim.revoke_token("EAAB-test")
    with capture_logs() as logs:
        _, first = await ob.send(text(A))
        await until(lambda: ob.service.paused)
        _, second = await ob.send(text(A, "while paused"))
        await asyncio.sleep(0.5)
    assert [r["status"] for r in ob.sim.requests] == [401], "one call; the rest is held"
    for record_id in (first["id"], second["id"]):
        record = await ob.status(record_id)
        assert record["status"] == "queued" and record["attempts"] == 0  # no retry spent
        error = record["error"]
        assert error["code"] == 190 and error["fbtrace_id"] == "AFakeTrace190"
        hint = error["hint"]
        for words in ("create a new token", "System User token", "channels.whatsapp.access_token",
                      "env WHATSAPP_ACCESS_TOKEN", "restart the gateway", "paused",
                      "outbound.max_pause_seconds (86400 s)"):
            assert words in hint, words
    assert ob.metric("gateway_alerts", channel="whatsapp", account=WA,
                     reason="token_expired") == 1
    assert ob.metric("gateway_alerts", channel="whatsapp", account=WA, reason="190") == 1
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="failed") is None
    lines = [e for e in logs if e["event"] == "outbound_account_paused"]
    assert len(lines) == 1, "one clear line, not one per message"
    line = lines[0]
    assert (line["log_level"], line["channel"], line["account"], line["code"],
            line["reason"]) == ("error", "whatsapp", WA, 190, "token_expired")
    assert line["hint"] == hint and line["fbtrace_id"] == "AFakeTrace190"
    assert "EAAB-test" not in json.dumps(logs, default=str)  # never the token itself


async def test_billing_pause_probes_and_resumes_by_itself(outbound):
    ob = await outbound(outbound="pause_probe_seconds = 0.4")
    await ob.inbound("whatsapp", A)
    await ob.inbound("whatsapp", B)
    billing = json.loads((DATA / "graph" / "error_131042.json").read_text())
    ob.sim.fail_next(WA, billing, count=2)  # the first send, then the first probe
    with capture_logs() as logs:
        _, first = await ob.send(text(A))
        await until(lambda: ob.service.paused)
        assert ob.metric("gateway_alerts", channel="whatsapp", account=WA,
                         reason="code_131042") == 1
        record = await ob.status(first["id"])
        assert record["status"] == "queued" and "Payment methods" in record["error"]["hint"]
        assert "tried every 0.4 s" in record["error"]["hint"]
        _, second = await ob.send(text(B))
        await ob.wait(first["id"], "sent", timeout=5)
        await ob.wait(second["id"], "sent", timeout=5)
    times = [r["at"] for r in ob.sim.requests]
    assert [r["status"] for r in ob.sim.requests][:3] == [400, 400, 200]
    assert times[1] - times[0] >= 0.35 and times[2] - times[1] >= 0.35, "probes are spaced"
    assert not ob.service.paused
    assert ob.metric("gateway_alerts", channel="whatsapp", account=WA, reason="code_131042") == 0
    assert [e["event"] for e in logs if e["event"].startswith("outbound_account")] == [
        "outbound_account_paused", "outbound_account_resumed"]
    assert len(ob.sim.accepted) == 2  # each message once


async def test_held_messages_fail_after_max_pause_seconds_with_the_original_error(outbound):
    ob = await outbound(outbound="max_pause_seconds = 1.0\npause_probe_seconds = 0")
    await ob.inbound("whatsapp", A)
    ob.sim.revoke_token("EAAB-test")
    with capture_logs() as logs:
        _, first = await ob.send(text(A))
        await until(lambda: ob.service.paused)
        paused_at = time.monotonic()
        await asyncio.sleep(0.5)
        _, second = await ob.send(text(A, "later"))  # accepted while paused: held 1 s too
        accepted_second = time.monotonic()
        record = await ob.wait(first["id"], "failed", timeout=5)
        first_failed = time.monotonic()
        assert (await ob.status(second["id"]))["status"] == "queued"
        later = await ob.wait(second["id"], "failed", timeout=5)
        second_failed = time.monotonic()
    assert 0.9 <= first_failed - paused_at < 2.0
    assert 0.9 <= second_failed - accepted_second < 2.0
    for found in (record, later):
        error = found["error"]
        assert error["code"] == 190 and error["fbtrace_id"] == "AFakeTrace190"
        assert "Session has expired" in error["message"]
        assert "longer than outbound.max_pause_seconds" in error["hint"]
        assert "create a new token" in error["hint"]
    assert len(ob.sim.requests) == 1, "held messages are never sent (no probes configured)"
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="failed") == 2
    assert [e["failed"] for e in logs if e["event"] == "outbound_pause_expired"] == [1, 1]


async def test_the_pause_clock_survives_a_restart(outbound, gateway):
    """A gateway restarted without the fix pauses again on the first answer, and counts the hold
    from the first pause (kept on the held record), not from the restart."""
    ob = await outbound(outbound="max_pause_seconds = 3.0\npause_probe_seconds = 0")
    await ob.inbound("whatsapp", A)
    ob.sim.revoke_token("EAAB-test")
    _, first = await ob.send(text(A))
    await until(lambda: ob.service.paused)
    paused_at = time.monotonic()
    await asyncio.sleep(1.5)
    await ob.gw.session.close()
    await ob.gw.server.close()  # the restart
    from tests.outbound.conftest import TOKEN, Outbound, channels_toml

    gw = await gateway(extra=f'api_token = "{TOKEN}"', channels=channels_toml(
        ob.sim.url, outbound="max_pause_seconds = 3.0\npause_probe_seconds = 0"))
    again = Outbound(gw, ob.sim)
    await until(lambda: again.service.paused)  # the held message was tried once more: 190
    record = await again.wait(first["id"], "failed", timeout=6)
    assert time.monotonic() - paused_at < 4.2, "counted from the first pause, not the restart"
    assert record["error"]["code"] == 190 and len(ob.sim.requests) == 2
