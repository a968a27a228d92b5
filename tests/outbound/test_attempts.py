"""``outbound.max_attempts`` is the number of sends a message gets in all: retried errors and
timeouts after the request was written (Meta may have accepted it) alike."""

from __future__ import annotations

import asyncio
import json
import time

from gateway.outbound.outbox import Outbox
from tests.outbound.conftest import WA

A = "15550001234"


async def test_max_attempts_is_the_number_of_sends(outbound):
    """Meta answers code 1 (retry) every time: exactly max_attempts requests, then failed."""
    ob = await outbound(outbound="max_attempts = 3")
    await ob.inbound("whatsapp", A)
    ob.sim.fail_next(WA, 1, status=400, count=50)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    assert status == 202
    record = await ob.wait(answer["id"], "failed", timeout=20)
    assert len(ob.sim.requests) == 3 and record["attempts"] == 3
    assert record["error"]["code"] == 1
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="retried") == 2


async def test_a_send_that_times_out_is_resent_at_most_max_attempts_times(outbound):
    """Every send times out after Meta accepted it and no status webhook comes: max_attempts
    copies at most, then the message fails saying its outcome is unknown."""
    ob = await outbound(extra_wa="send_timeout = 0.2",
                        outbound="max_attempts = 2\nreconcile_seconds = 0.2")
    await ob.inbound("whatsapp", A)
    ob.sim.delay_next(WA, 5.0, count=100)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    assert status == 202
    record = await ob.wait(answer["id"], "failed", timeout=10)
    await asyncio.sleep(1.0)  # nothing more goes out
    assert len(ob.sim.accepted) == 2 and record["attempts"] == 2
    error = record["error"]
    assert error["outcome"] == "unknown" and "outcome unknown" in error["hint"]
    assert "Meta may have accepted it" in error["hint"] and "max_attempts = 2" in error["hint"]
    assert ob.metric("gateway_outbound_messages_total", channel="whatsapp", type="text",
                     outcome="failed") == 1


async def test_a_record_cut_off_after_its_last_send_shows_the_sends_made(outbound, tmp_path):
    """A restart interrupts the max_attempts-th send: the record fails as "outcome unknown"
    without another send, and its attempts and hint count the sends made, not the claim that
    gave it up."""
    pre = Outbox(str(tmp_path / "data"))
    await pre.open(0.2)
    body = {"channel": "whatsapp", "to": A, "type": "text", "text": "x"}
    row, _ = await pre.add("whatsapp", WA, A, "text", json.dumps(body).encode(), None)
    await pre.claim_due("whatsapp", WA, 1)  # send 1
    await pre.retry_at(row.id, time.time() - 1, {"code": 1, "message": "retry"})
    await pre.claim_due("whatsapp", WA, 1)  # send 2, cut off by the restart
    assert (await pre.get(row.id)).attempts == 2
    await pre.close()
    ob = await outbound(outbound="max_attempts = 2")
    record = await ob.wait(row.id, "failed", timeout=10)
    assert ob.sim.requests == [] and record["attempts"] == 2
    error = record["error"]
    assert error["outcome"] == "unknown" and error["code"] == 1
    assert "2 sends made (outbound.max_attempts = 2)" in error["hint"]
