"""Window and consent refusals, idempotency, API errors, statuses closing the loop, limits."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway import keys
from gateway.outbound.ratelimit import GCRA, AccountLimiter, headroom_from_headers
from tests.conftest import DATA, fixture_bytes
from tests.outbound.conftest import WA

A, B, U1 = "15550001234", "15550005678", "9000000000000001"
TEMPLATE = {"name": "order_update", "language": "en_US"}


async def test_free_form_outside_the_window_is_refused_templates_are_not(outbound):
    ob = await outbound()
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "hi"})
    assert status == 422 and answer["error"]["code"] == "outside_window"
    assert "template" in answer["error"]["message"]
    await ob.inbound("whatsapp", A, at=time.time() - 25 * 3600)  # wrote 25 hours ago
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "hi"})
    assert status == 422 and "25.0 h ago" in answer["error"]["message"]
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "template",
                                    "template": TEMPLATE})
    assert status == 202
    await ob.wait(answer["id"], "sent")
    assert ob.sim.bodies()[0]["template"] == {"name": "order_update", "language": {"code": "en_US"}}


async def test_instagram_human_agent_tag_extends_the_window_to_seven_days(outbound):
    ob = await outbound()
    await ob.inbound("instagram", U1, at=time.time() - 3 * 24 * 3600)
    body = {"channel": "instagram", "to": U1, "type": "text", "text": "An agent here"}
    status, answer = await ob.send(body)
    assert status == 422 and "HUMAN_AGENT" in answer["error"]["message"]
    status, answer = await ob.send({**body, "tag": "HUMAN_AGENT"})
    assert status == 202
    await ob.wait(answer["id"], "sent")
    assert ob.sim.requests[0]["body"]["tag"] == "HUMAN_AGENT"
    assert ob.sim.requests[0]["body"]["messaging_type"] == "MESSAGE_TAG"


@pytest.mark.parametrize("extra", [
    {"type": "reaction", "message_id": "aWdf.IN.1", "emoji": "\u2764\ufe0f"},
    {"type": "typing", "on": True},
    {"type": "mark_read", "message_id": "aWdf.IN.1"},
], ids=["reaction", "typing", "mark_read"])
async def test_an_instagram_sender_action_takes_no_tag(outbound, extra):
    """A sender action carries no tag (the body has no place for one): a reaction tagged
    HUMAN_AGENT passed the 7-day check and went out untagged, for Meta to refuse."""
    ob = await outbound()
    await ob.inbound("instagram", U1, at=time.time() - 2 * 24 * 3600)
    status, answer = await ob.send({"channel": "instagram", "to": U1, "tag": "HUMAN_AGENT",
                                    **extra})
    assert status == 422 and answer["error"]["field"] == "tag", answer
    assert "sender action" in answer["error"]["message"]
    assert ob.sim.requests == []


async def test_an_unsend_does_not_open_the_window(outbound):
    """An unsend has no content: it is not the customer writing (limits.md §8: "24 h after the
    user's last message"). It used to open the window for a free-form reply 30 hours on."""
    ob = await outbound()
    old = time.time() - 30 * 3600
    await ob.inbound("instagram", U1, mid="aWdf.IN.OLD", at=old)
    body = json.loads(fixture_bytes("instagram/text.json"))
    item = body["entry"][0]["messaging"][0]
    item["sender"]["id"] = U1
    item["timestamp"] = int(time.time() * 1000)
    item["message"] = {"mid": "aWdf.IN.OLD", "is_deleted": True}
    await still_no_window(ob, "instagram", U1, body)


async def test_a_whatsapp_system_notice_does_not_open_the_window(outbound):
    """A ``system`` message is WhatsApp's notice (a changed number or identity), not the
    customer writing: no window for a free-form reply to it."""
    ob = await outbound()
    await ob.inbound("whatsapp", A, at=time.time() - 30 * 3600)
    body = json.loads(fixture_bytes("whatsapp/system_customer_identity_changed.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["wa_id"] = A
    value["messages"][0].update({"from": A, "timestamp": str(int(time.time()))})
    await still_no_window(ob, "whatsapp", A, body)


async def still_no_window(ob, channel: str, to: str, webhook: dict) -> None:
    """After ``webhook`` is processed, a free-form message to ``to`` is still refused."""
    assert (await ob.gw.post(channel, json.dumps(webhook).encode()))[0] == 200
    await ob.gw.settle()
    status, answer = await ob.send({"channel": channel, "to": to, "type": "text",
                                    "text": "hello"})
    assert status == 422 and answer["error"]["code"] == "outside_window", answer


async def test_opt_out_keyword_blocks_marketing_templates_only(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A, text=" stop ")
    marketing = {"channel": "whatsapp", "to": A, "type": "template",
                 "template": {**TEMPLATE, "category": "marketing"}}
    status, answer = await ob.send(marketing)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    for category in ("utility", "Authentication"):  # not marketing: still allowed
        status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "template",
                                        "template": {**TEMPLATE, "category": category}})
        assert status == 202, answer
    await ob.inbound("whatsapp", A, text="START")
    assert (await ob.send(marketing))[0] == 202


async def test_opted_out_contact_needs_a_category_on_templates(outbound):
    """The safe default: without a category a template may be marketing, so it is refused to an
    opted-out contact with an error saying how to send a utility template."""
    ob = await outbound()
    uncategorised = {"channel": "whatsapp", "to": A, "type": "template", "template": TEMPLATE}
    assert (await ob.send(uncategorised))[0] == 202  # no opt-out: nothing to check
    await ob.inbound("whatsapp", A, text="UNSUBSCRIBE")
    status, answer = await ob.send(uncategorised)
    assert status == 422, answer
    error = answer["error"]
    assert (error["code"], error["field"]) == ("opted_out", "template.category")
    assert 'template.category to "utility" or "authentication"' in error["message"]
    status, answer = await ob.send({**uncategorised, "template": {**TEMPLATE, "category": "promo"}})
    assert status == 422 and answer["error"]["field"] == "template.category"
    service = ob.service
    refused = None
    try:
        await service.send_whatsapp_template(A, "order_update", "en_US")
    except Exception as exc:  # noqa: BLE001 - the Python API raises what the HTTP API answers
        refused = exc
    assert getattr(refused, "code", None) == "opted_out"
    assert (await service.send_whatsapp_template(A, "order_update", "en_US",
                                                 category="utility"))["status"] == "queued"


async def test_idempotency_key_sends_once(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    body = {"channel": "whatsapp", "to": A, "type": "text", "text": "once",
            "idempotency_key": "k-1"}
    answers = await asyncio.gather(*(ob.send(body) for _ in range(5)))
    assert {a["id"] for _, a in answers} == {answers[0][1]["id"]}
    await ob.wait(answers[0][1]["id"], "sent")
    await asyncio.sleep(0.2)
    assert len(ob.sim.accepted) == 1


@pytest.mark.parametrize("then", ["stop", "window-closed"])
async def test_a_retry_with_the_key_of_an_accepted_send_gets_its_record(outbound, then):
    """A client that lost the 202 retries with the same key after the customer said STOP, or
    after the window closed: the answer is the record it was given (sent), not a refusal of a
    message that went out; nothing is sent again."""
    ob = await outbound()
    if then == "stop":
        await ob.inbound("whatsapp", A)
        body = {"channel": "whatsapp", "to": A, "type": "template", "idempotency_key": "k-2",
                "template": {"name": "promo", "language": "en_US", "category": "marketing"}}
    else:
        await ob.inbound("whatsapp", A, at=time.time() - 24 * 3600 + 1.5)  # closes in 1.5 s
        body = {"channel": "whatsapp", "to": A, "type": "text", "text": "your code",
                "idempotency_key": "k-2"}
    status, first = await ob.send(body)
    assert status == 202, first
    await ob.wait(first["id"], "sent")
    if then == "stop":
        await ob.inbound("whatsapp", A, text="STOP")
    else:
        await asyncio.sleep(2)
    status, again = await ob.send(body)
    assert status == 202 and again == {"id": first["id"], "status": "sent"}, again
    assert len(ob.sim.accepted) == 1
    other = {**body, "idempotency_key": "k-3"}  # a new send is checked as ever
    status, refused = await ob.send(other)
    assert status == 422, refused


@pytest.mark.parametrize("body,field", [
    ({"channel": "whatsapp", "type": "text", "text": "x"}, "to"),
    ({"channel": "whatsapp", "to": A, "type": "text"}, "text"),
    ({"channel": "whatsapp", "to": A, "type": "selfie"}, "type"),
    ({"channel": "whatsapp", "to": A, "type": "text", "text": "x", "colour": "red"}, "colour"),
    ({"channel": "whatsapp", "to": A, "type": "image", "media": {}}, "media"),
    ({"channel": "whatsapp", "to": A, "type": "reaction", "emoji": "x"}, "message_id"),
    ({"channel": "telegram", "to": A, "type": "text", "text": "x"}, "channel"),
    ({"channel": "whatsapp", "to": A, "type": "text", "text": "x", "account_id": "999"},
     "account_id"),
    ({"channel": "whatsapp", "to": A, "type": "template", "template": {"name": "x"}},
     "template.language"),
])
async def test_invalid_bodies_are_422_naming_the_field(outbound, body, field):
    ob = await outbound()
    status, answer = await ob.send(body)
    assert status == 422 and answer["error"]["field"] == field, answer


async def test_api_needs_the_bearer_token(outbound):
    ob = await outbound()
    body = {"channel": "whatsapp", "to": A, "type": "text", "text": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        status, answer = await ob.send(body, headers=headers)
        assert status == 401 and answer["error"]["code"] == "unauthorized"
    async with ob.gw.session.get(f"{ob.gw.url}/v1/messages/msg_nope", headers=ob.auth) as r:
        assert r.status == 404


async def test_statuses_close_the_loop(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    ob.sim.next_message_ids.append("wamid.TEST.OUT.0007")  # what the status fixtures refer to
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "hi"})
    assert (await ob.wait(answer["id"], "sent"))["provider_message_id"] == "wamid.TEST.OUT.0007"
    for name, state in (("status_delivered", "delivered"), ("status_read", "read"),
                        ("status_sent", "read")):  # a late "sent" never moves it back
        await ob.webhook("whatsapp", json.loads(fixture_bytes(f"whatsapp/{name}.json")))
        assert (await ob.status(answer["id"]))["status"] == state


async def test_failed_status_webhook_fails_the_record_by_callback_data(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", B)
    status, answer = await ob.send({"channel": "whatsapp", "to": B, "type": "text", "text": "hi"})
    await ob.wait(answer["id"], "sent")
    body = json.loads(fixture_bytes("whatsapp/status_failed.json"))
    item = body["entry"][0]["changes"][0]["value"]["statuses"][0]
    item.update({"id": "wamid.UNKNOWN.TO.US", "biz_opaque_callback_data": answer["id"]})
    await ob.webhook("whatsapp", body)
    record = await ob.status(answer["id"])
    assert record["status"] == "failed" and record["error"]["code"] == 131026


async def test_instagram_read_marks_our_message_read(outbound):
    ob = await outbound()
    await ob.inbound("instagram", U1)
    ob.sim.next_message_ids.append("aWdfTEST_OUT_0003")  # instagram/read.json reads this mid
    status, answer = await ob.send({"channel": "instagram", "to": U1, "type": "text", "text": "hi"})
    await ob.wait(answer["id"], "sent")
    await ob.webhook("instagram", json.loads(fixture_bytes("instagram/read.json")))
    assert (await ob.status(answer["id"]))["status"] == "read"


async def test_pair_limit_does_not_stall_the_number(outbound):
    ob = await outbound(extra_wa="pair_burst = 1\npair_interval_seconds = 6.0")
    await ob.inbound("whatsapp", A)
    await ob.inbound("whatsapp", B)
    first = [(await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": f"a{i}"}))[1]
             for i in range(2)]
    other = (await ob.send({"channel": "whatsapp", "to": B, "type": "text", "text": "b"}))[1]
    await ob.wait(other["id"], "sent", timeout=3)  # B is not held behind A's pair limit
    await ob.wait(first[0]["id"], "sent")
    assert (await ob.status(first[1]["id"]))["status"] == "queued"  # A's second waits ~6 s


async def test_throughput_stays_under_the_number_limit(outbound):
    ob = await outbound(extra_wa="messages_per_second = 40\npair_burst = 45\n"
                                 "pair_interval_seconds = 0.1",
                        mps=40)
    customers = [f"1555100{i:04d}" for i in range(20)]
    for c in customers:
        await ob.inbound("whatsapp", c)
    ids = []
    for i in range(100):
        ids.append((await ob.send({"channel": "whatsapp", "to": customers[i % 20], "type": "text",
                                   "text": f"m{i}"}))[1]["id"])
    for record_id in ids:
        await ob.wait(record_id, "sent", timeout=15)
    assert ob.sim.count_130429 == 0
    times = sorted(m.at for m in ob.sim.accepted)
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert worst <= 40
    registry = ob.gw.app[keys.METRICS].registry
    assert registry.get_sample_value("gateway_ratelimit_headroom_ratio", {
        "channel": "whatsapp", "account": WA, "scope": "number"}) is not None


def test_account_limiter_never_exceeds_its_rate_in_any_second():
    limiter, now, sent = AccountLimiter(80), 0.0, []
    while now < 5.0:
        wait = limiter.wait("x", now)
        now += wait if wait > 0 else 0.0001
        if limiter.wait("x", now) == 0:
            limiter.take("x", now)
            sent.append(now)
    assert max(sum(1 for t in sent if s <= t < s + 1.0 + 0.015) for s in sent) <= 80  # 15 ms jitter
    assert len(sent) >= 0.95 * 80 * 5


def test_gcra_spaces_cells_evenly_without_bursts():
    gcra = GCRA(10)
    gcra.take(0.0)
    assert gcra.wait(0.0) == pytest.approx(0.1) and gcra.wait(0.1) == 0


def test_pair_backoff_is_four_to_the_x_with_jitter_and_resets_on_success():
    limiter = AccountLimiter(80, pair_interval=6.0, pair_burst=1)
    waits = [limiter.throttle("pair", A, 1.0, 4.0, 900.0) for _ in range(4)]
    for wait, base in zip(waits, (1, 4, 16, 64), strict=True):
        assert base <= wait <= base * 1.25
    assert limiter.wait(B) == 0 and limiter.wait(A) >= 60  # only that recipient waits
    limiter.sent_ok(A)
    assert 1 <= limiter.throttle("pair", A, 1.0, 4.0, 900.0) <= 1.25
    assert 900 <= limiter.throttle("number", None, 1.0, 2.0, 900.0, floor=900.0)
    assert limiter.throttle("number", None, 1.0, 2.0, 900.0, floor=1140.0) == 1140.0  # Meta's


def test_type_limits_space_audio_and_video_only():
    limiter = AccountLimiter(300, type_limits={"audio_video": (10, ("audio", "video"))},
                             name="ig_account")
    limiter.take(U1, 0.0, kind="audio")
    assert limiter.wait(U1, 0.0, kind="video") == pytest.approx(1 / (10 * 0.96))
    assert limiter.wait(U1, 0.01, kind="text") == 0
    assert set(limiter.headroom(0.0)) == {"ig_account", "type:audio_video"}


def test_headroom_from_usage_headers_matches_the_fixture():
    cases = json.loads((DATA / "graph" / "usage_headers.json").read_text())["cases"]
    for case in cases:
        got = headroom_from_headers(case["headers"], now=0.0)
        for scope, want in case["expect"].items():
            if scope.startswith("ad_account"):
                continue  # the Marketing API is out of scope for sending
            assert scope in got, (case["name"], scope)
            assert abs(got[scope][0] - want["headroom"]) < 1e-3, case["name"]
            blocked = want["blocked_for_s"]
            assert (got[scope][1] is None) == (blocked is None), case["name"]
            if blocked is not None:
                assert abs(got[scope][1] - blocked) < 1e-3


async def test_meta_131050_records_the_opt_out(outbound):
    """A marketing template Meta refuses with 131050 fails, and the contact is opted out from then
    on (limits.md §9: record the opt-out even if the webhook was missed)."""
    ob = await outbound()
    body = json.loads((DATA / "graph" / "error_131050.json").read_text())
    ob.sim.fail_next(WA, body, status=400)
    marketing = {"channel": "whatsapp", "to": A, "type": "template",
                 "template": {**TEMPLATE, "category": "marketing"}}
    status, answer = await ob.send(marketing)
    assert status == 202
    record = await ob.wait(answer["id"], "failed")
    assert record["error"]["code"] == 131050
    assert (await ob.service.outbox.customer("whatsapp", WA, A)).opted_out
    status, answer = await ob.send(marketing)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    assert (await ob.send({**marketing, "template": {**TEMPLATE, "category": "utility"}}))[0] == 202


async def test_a_body_nested_too_deeply_is_422_not_500(outbound):
    ob = await outbound()
    nested = b"[" * 200_000 + b"]" * 200_000  # in a free-form field: Any, decoded deeply
    bomb = (b'{"channel":"whatsapp","type":"interactive","to":"1","interactive":{"a":' + nested
            + b"}}")
    async with ob.gw.session.post(f"{ob.gw.url}/v1/messages", data=bomb,
                                  headers={**ob.auth, "Content-Type": "application/json"}) as r:
        answer = await r.json()
    assert r.status == 422 and answer["error"]["field"] == "body", answer


async def test_read_receipts_by_message_id_alone_share_no_pair_limit(outbound):
    """A WhatsApp ``mark_read`` names a message, not a customer: receipts for many customers'
    messages are not held by one another as if they were messages to one recipient."""
    ob = await outbound()
    ids = []
    for i in range(8):
        status, answer = await ob.send({"channel": "whatsapp", "type": "mark_read",
                                        "message_id": f"wamid.IN.customer{i}"})
        assert status == 202, answer
        ids.append(answer["id"])
    for record in ids:
        await ob.wait(record, "sent", timeout=3)  # all of them, at the number's rate


async def test_an_instagram_read_receipt_needs_the_thread(outbound):
    ob = await outbound()
    status, answer = await ob.send({"channel": "instagram", "type": "mark_read",
                                    "message_id": "aWdf.IN.1"})
    assert status == 422 and answer["error"]["field"] == "to", answer
    assert ob.sim.requests == []


async def test_a_message_held_past_the_windows_end_fails_before_it_is_sent(outbound):
    """A free-form message accepted while the window was open, then held by a retry until the
    window closed, is failed outside_window at its next send instead of spending a call Meta
    answers 131047 (limits.md §6); one sent in time is not checked again."""
    ob = await outbound(outbound="backoff_initial = 3.0\nbackoff_max = 3.0")
    last = time.time() - 24 * 3600 + 1.0  # the window closes in a second
    await ob.inbound("whatsapp", A, at=last)
    ob.sim.fail_next(WA, 131000, status=500)  # a transient error: retried in 1.5-3 s
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text",
                                    "text": "late"})
    assert status == 202, answer
    record = await ob.wait(answer["id"], "failed", "sent", timeout=10)
    assert record["status"] == "failed" and record["error"]["code"] == "outside_window", record
    assert [r["status"] for r in ob.sim.requests] == [500]  # the first try only
