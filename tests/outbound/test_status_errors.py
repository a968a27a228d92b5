"""Errors in failed status webhooks (webhooks.md §4.5) follow Meta's table as synchronous
answers do: retry within max_attempts, record an opt-out, fail once (and count it once)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.conftest import fixture_bytes
from tests.outbound.conftest import WA

A = "15550001234"
TEMPLATE = {"name": "order_update", "language": "en_US"}


def failed_status(wamid: str, code: int, callback: str | None, ts: int | None = None) -> dict:
    body = json.loads(fixture_bytes("whatsapp/status_failed.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = WA
    status = value["statuses"][0]
    status.update({"id": wamid, "recipient_id": A, "timestamp": str(ts or int(time.time()))})
    status["errors"][0].update({"code": code, "title": f"Simulated {code}"})
    if callback:
        status["biz_opaque_callback_data"] = callback
    return body


def outcome(ob, name: str, kind: str = "text") -> float | None:
    return ob.metric("gateway_outbound_messages_total", channel="whatsapp", type=kind,
                     outcome=name)


async def test_an_asynchronous_131050_records_the_opt_out(outbound):
    ob = await outbound()
    marketing = {"channel": "whatsapp", "to": A, "type": "template",
                 "template": {**TEMPLATE, "category": "marketing"}}
    status, answer = await ob.send(marketing)
    assert status == 202
    record = await ob.wait(answer["id"], "sent")
    await ob.webhook("whatsapp", failed_status(record["provider_message_id"], 131050,
                                               answer["id"]))
    record = await ob.wait(answer["id"], "failed")
    assert record["error"]["code"] == 131050
    assert (await ob.service.outbox.customer("whatsapp", WA, A)).opted_out
    status, answer = await ob.send(marketing)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    assert len(ob.sim.accepted) == 1


async def test_an_asynchronous_throttling_code_is_retried_within_max_attempts(outbound):
    """130429 in a failed status: sent again (a new wamid); a redelivered status of the first
    send changes nothing; at max_attempts sends the message fails with a clear error."""
    ob = await outbound(outbound="max_attempts = 2")
    await ob.inbound("whatsapp", A)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    first = await ob.wait(answer["id"], "sent")
    first_wamid = first["provider_message_id"]
    await ob.webhook("whatsapp", failed_status(first_wamid, 130429, answer["id"]))
    for _ in range(200):
        second = await ob.status(answer["id"])
        if second["status"] == "sent" and second["provider_message_id"] != first_wamid:
            break
        await asyncio.sleep(0.05)
    assert second["status"] == "sent" and second["attempts"] == 2
    assert len(ob.sim.accepted) == 2 and outcome(ob, "retried") == 1
    await ob.webhook("whatsapp", failed_status(first_wamid, 130429, answer["id"],
                                               ts=int(time.time()) + 1))  # a late copy
    assert (await ob.status(answer["id"]))["status"] == "sent"
    await ob.webhook("whatsapp", failed_status(second["provider_message_id"], 130429,
                                               answer["id"]))
    record = await ob.wait(answer["id"], "failed")
    assert record["error"]["code"] == 130429 and "max_attempts = 2" in record["error"]["hint"]
    assert len(ob.sim.accepted) == 2 and record["attempts"] == 2
    assert outcome(ob, "failed") == 1


async def test_a_failed_status_is_counted_failed_once(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    record = await ob.wait(answer["id"], "sent")
    for ts in (int(time.time()), int(time.time()) + 5):  # a second, redelivered failed status
        await ob.webhook("whatsapp", failed_status(record["provider_message_id"], 131026,
                                                   answer["id"], ts=ts))
    record = await ob.wait(answer["id"], "failed")
    assert record["error"]["code"] == 131026
    assert outcome(ob, "failed") == 1 and outcome(ob, "sent") == 1


def sent_status(wamid: str, callback: str | None, ts: int | None = None) -> dict:
    body = json.loads(fixture_bytes("whatsapp/status_sent.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = WA
    status = value["statuses"][0]
    status.update({"id": wamid, "recipient_id": A, "timestamp": str(ts or int(time.time()))})
    if callback:
        status["biz_opaque_callback_data"] = callback
    return body


async def test_a_late_sent_status_of_the_failed_send_does_not_cancel_the_resend(outbound):
    """Meta's statuses come in any order: the failed send's own ``sent`` status, delivered after
    its ``failed`` (retryable code), neither settles the requeued message nor is taken for the
    resend: the message is sent again and keeps the resend's wamid."""
    ob = await outbound(outbound="max_attempts = 3\nbackoff_initial = 1.0\nbackoff_max = 1.0")
    await ob.inbound("whatsapp", A)
    _, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    first = (await ob.wait(answer["id"], "sent"))["provider_message_id"]
    await ob.webhook("whatsapp", failed_status(first, 131000, answer["id"]))
    assert (await ob.status(answer["id"]))["status"] == "queued"
    await ob.webhook("whatsapp", sent_status(first, answer["id"], ts=int(time.time()) - 5))
    await ob.webhook("whatsapp", sent_status(first, None, ts=int(time.time()) - 5))
    record = await ob.status(answer["id"])
    assert record["status"] == "queued" and record["provider_message_id"] is None
    for _ in range(200):
        record = await ob.status(answer["id"])
        if record["status"] == "sent":
            break
        await asyncio.sleep(0.05)
    assert len(ob.sim.accepted) == 2 and record["attempts"] == 2
    second = record["provider_message_id"]
    assert second == ob.sim.accepted[1].message_id != first
    delivered = json.loads(json.dumps(sent_status(first, answer["id"])))
    delivered["entry"][0]["changes"][0]["value"]["statuses"][0]["status"] = "delivered"
    await ob.webhook("whatsapp", delivered)  # a late delivered of the first send
    record = await ob.status(answer["id"])
    assert (record["status"], record["provider_message_id"]) == ("sent", second)


async def test_an_out_of_band_throttling_code_parks_the_number_and_is_counted(outbound):
    """A value-level 130429 (webhooks.md §4.6: no message id, no event) parks the number for
    its backoff step, as a send's 130429 does, and is counted by code; the parked number waits
    before its next send. A code of the pair names no recipient: counted, parks nothing."""
    ob = await outbound(outbound="throttle_backoff_initial = 0.6")
    await ob.inbound("whatsapp", A)
    limiter = ob.service.limiters[("whatsapp", WA)]
    body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
    body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = WA
    pair = json.loads(json.dumps(body))
    pair["entry"][0]["changes"][0]["value"]["errors"][0].update(code=131056, title="Pair")
    await ob.webhook("whatsapp", pair)
    assert limiter.parked("number") == 0
    await ob.webhook("whatsapp", body)
    assert 0.4 < limiter.parked("number") <= 0.6 * 1.5  # its first step, jittered upwards
    for code in ("130429", "131056"):
        assert ob.metric("gateway_meta_errors_total", channel="whatsapp", account=WA,
                         code=code) == 1
    parked_at = time.monotonic()
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "x"})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
    assert time.monotonic() - parked_at >= 0.4  # it waited for the park


async def test_a_batch_normalised_again_after_a_failed_commit_counts_its_notices_once(outbound):
    """The batch's notices are handed on once it is committed: a commit that fails twice (the
    journal locked) and a third try count and park the 130429 once, not three times."""
    from gateway import keys

    ob = await outbound(outbound="throttle_backoff_initial = 1.0")
    journal = ob.gw.app[keys.PROCESSOR].journal
    commit, fails = journal.commit_processed, [RuntimeError("database is locked")] * 2

    async def flaky(*args, **kwargs):
        if fails:
            raise fails.pop()
        return await commit(*args, **kwargs)

    journal.commit_processed = flaky
    body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
    body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = WA
    await ob.webhook("whatsapp", body)
    assert not fails
    assert ob.metric("gateway_meta_errors_total", channel="whatsapp", account=WA,
                     code="130429") == 1
    assert dict(ob.service.limiters[("whatsapp", WA)].backoff.steps) == {"number": 1}


@pytest.mark.parametrize("code,ends", [(131000, "sent"), (131026, "failed")])
async def test_a_failed_status_that_beats_the_sends_answer_is_not_lost(outbound, code, ends):
    """Meta accepts the message but answers slowly; its failed status webhook is processed
    first. A retryable code sends the message again (the record used to stay ``sent``, never
    resent); a permanent one keeps its error (the answer used to wipe it)."""
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    ob.sim.delay_next(WA, 1.0)  # Meta has it at once; its HTTP answer takes a second
    fired = asyncio.get_running_loop().create_future()

    async def on_accept(msg):  # the first send only
        ob.sim.on_accept.remove(on_accept)
        await ob.webhook("whatsapp", failed_status(msg.message_id, code,
                                                   msg.body["biz_opaque_callback_data"]))
        fired.set_result(msg.message_id)

    ob.sim.on_accept.append(on_accept)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text",
                                    "text": "hello"})
    assert status == 202, answer
    first = await fired
    record = await ob.wait(answer["id"], ends, timeout=10)
    if ends == "sent":
        await asyncio.sleep(0.5)
        record = await ob.status(answer["id"])
        assert record["status"] == "sent" and len(ob.sim.accepted) == 2
        assert record["provider_message_id"] == ob.sim.accepted[1].message_id != first
    else:
        await asyncio.sleep(1.5)  # the answer has come
        record = await ob.status(answer["id"])
        assert record["status"] == "failed" and record["error"]["code"] == code, record
        counted = {outcome: ob.metric("gateway_outbound_messages_total", channel="whatsapp",
                                      type="text", outcome=outcome) for outcome in ("sent",
                                                                                    "failed")}
        assert counted == {"sent": None, "failed": 1.0}, counted  # the message failed, once


MARKETING = {"channel": "whatsapp", "type": "template", "template": {
    "name": "promo", "language": "en_US", "category": "marketing"}}


@pytest.mark.parametrize("where", ["answer", "status"])
async def test_131049_holds_marketing_to_that_user_for_a_day(outbound, where):
    """limits.md §9: Meta withheld a marketing message (the user's marketing cap): no marketing
    template to that user for 24 h, refused up front (422 marketing_held); a utility template
    to them, and marketing to anyone else, still go."""
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    if where == "answer":
        ob.sim.fail_next(WA, 131049)
    status, first = await ob.send({**MARKETING, "to": A})
    assert status == 202, first
    if where == "status":
        sent = await ob.wait(first["id"], "sent")
        await ob.webhook("whatsapp", failed_status(sent["provider_message_id"], 131049,
                                                   first["id"]))
    assert (await ob.wait(first["id"], "failed"))["error"]["code"] == 131049
    status, held = await ob.send({**MARKETING, "to": A})
    assert status == 422 and held["error"]["code"] == "marketing_held", held
    utility = {**MARKETING, "template": {**MARKETING["template"], "category": "utility"}}
    for body in ({**utility, "to": A}, {**MARKETING, "to": "15550009999"}):
        status, answer = await ob.send(body)
        assert status == 202, answer


async def test_a_late_failed_status_of_an_earlier_send_does_not_send_it_again(outbound):
    """Send 1 reaches Meta but its answer times out (so it is reconciled and sent again); while
    send 2 is in flight, send 1's failed status (retryable) is processed. Send 2 still gets
    through: its answer is its own, the record is sent once more only if Meta failed *it*."""
    ob = await outbound(extra_wa="send_timeout = 0.5", outbound="reconcile_seconds = 0.5")
    await ob.inbound("whatsapp", A)
    ob.sim.delay_next(WA, 0.9)  # send 1: Meta has it, its answer comes too late
    ob.sim.delay_next(WA, 0.4)  # send 2: Meta has it, answers slowly but in time
    seen: list[str] = []

    async def on_accept(msg):
        seen.append(msg.message_id)
        if len(seen) == 2:  # send 2 in flight: Meta's failed status of send 1 arrives
            await ob.webhook("whatsapp", failed_status(seen[0], 131000,
                                                       msg.body["biz_opaque_callback_data"]))

    ob.sim.on_accept.append(on_accept)
    _, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "once"})
    record = await ob.wait(answer["id"], "sent", timeout=10)
    await asyncio.sleep(2.5)  # no third send comes
    record = await ob.status(answer["id"])
    assert len(ob.sim.accepted) == 2 and record["status"] == "sent"
    assert record["provider_message_id"] == seen[1]


async def test_551_marks_the_person_unreachable_until_they_write_again(outbound):
    """limits.md §9: a person who blocks the account or deactivates yields 551: "mark the contact
    unreachable". Later sends are refused up front (422 unreachable) instead of each going to
    Meta to be refused; a message from them lifts it; others are not affected."""
    from gateway.testing.graph import meta_error
    from tests.outbound.conftest import IG

    customer, other = "9000000000000001", "9000000000000002"
    ob = await outbound(extra_ig="thread_interval_seconds = 0")
    await ob.inbound("instagram", customer, at=time.time() - 60)
    await ob.inbound("instagram", other)
    ob.sim.fail_next(IG, meta_error(551, "(#551) This person isn't available right now."))
    body = {"channel": "instagram", "to": customer, "type": "text", "text": "one"}
    status, first = await ob.send(body)
    assert status == 202
    assert (await ob.wait(first["id"], "failed"))["error"]["code"] == 551
    status, answer = await ob.send({**body, "text": "two"})
    assert status == 422 and answer["error"]["code"] == "unreachable", answer
    assert len(ob.sim.requests) == 1
    status, answer = await ob.send({**body, "to": other})
    assert status == 202, answer
    await ob.inbound("instagram", customer, text="I'm back")
    status, answer = await ob.send({**body, "text": "welcome back"})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
