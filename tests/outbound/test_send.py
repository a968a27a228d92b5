"""Every outbound type's request body, checked field by field at the Graph simulator."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.outbound.request import InvalidRequest
from tests.conftest import fixture_bytes
from tests.outbound.conftest import IG, WA
from tests.test_identities import bsuid_only, pair

A, U1 = "15550001234", "9000000000000001"
WA_CASES = [
    ({"type": "text", "text": "Track: https://x.io/t/1", "preview_url": True},
     {"type": "text", "text": {"body": "Track: https://x.io/t/1", "preview_url": True}}),
    ({"type": "text", "text": "Quoting you", "reply_to": "wamid.IN.1"},
     {"type": "text", "text": {"body": "Quoting you", "preview_url": False},
      "context": {"message_id": "wamid.IN.1"}}),
    ({"type": "template", "template": {"name": "order_update", "language": "en_US", "components": [
        {"type": "body", "parameters": [{"type": "text", "text": "Alex"}]},
        {"type": "button", "sub_type": "quick_reply", "index": "0",
         "parameters": [{"type": "payload", "payload": "CONFIRM_42"}]}]}},
     {"type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
      "components": [{"type": "body", "parameters": [{"type": "text", "text": "Alex"}]},
                     {"type": "button", "sub_type": "quick_reply", "index": "0",
                      "parameters": [{"type": "payload", "payload": "CONFIRM_42"}]}]}}),
    ({"type": "image", "media": {"link": "https://x.io/a.jpg", "caption": "pic"}},
     {"type": "image", "image": {"link": "https://x.io/a.jpg", "caption": "pic"}}),
    ({"type": "video", "media": {"id": "1203987654", "caption": "clip"}},
     {"type": "video", "video": {"id": "1203987654", "caption": "clip"}}),
    ({"type": "document", "media": {"link": "https://x.io/i.pdf", "filename": "invoice.pdf",
                                    "caption": "inv"}},
     {"type": "document", "document": {"link": "https://x.io/i.pdf", "filename": "invoice.pdf",
                                       "caption": "inv"}}),
    ({"type": "audio", "media": {"id": "1203987655", "caption": "dropped"}},
     {"type": "audio", "audio": {"id": "1203987655"}}),
    ({"type": "sticker", "media": {"id": "1203987657"}},
     {"type": "sticker", "sticker": {"id": "1203987657"}}),
    ({"type": "interactive", "interactive": {"type": "button", "body": {"text": "Confirm?"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": "btn_yes", "title": "Yes"}}]}}},
     {"type": "interactive", "interactive": {"type": "button", "body": {"text": "Confirm?"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": "btn_yes", "title": "Yes"}}]}}}),
    ({"type": "interactive", "interactive": {"type": "list", "body": {"text": "Pick"}, "action": {
        "button": "Choose",
        "sections": [{"title": "Cups", "rows": [{"id": "r1", "title": "Small"}]}]}}},
     {"type": "interactive", "interactive": {"type": "list", "body": {"text": "Pick"}, "action": {
        "button": "Choose",
        "sections": [{"title": "Cups", "rows": [{"id": "r1", "title": "Small"}]}]}}}),
    ({"type": "interactive", "interactive": {"type": "cta_url", "body": {"text": "Track"},
        "action": {"name": "cta_url",
                   "parameters": {"display_text": "Track", "url": "https://x.io/t/1"}}}},
     {"type": "interactive", "interactive": {"type": "cta_url", "body": {"text": "Track"},
        "action": {"name": "cta_url",
                   "parameters": {"display_text": "Track", "url": "https://x.io/t/1"}}}}),
    ({"type": "reaction", "message_id": "wamid.IN.1", "emoji": "\U0001f44d"},
     {"type": "reaction", "reaction": {"message_id": "wamid.IN.1", "emoji": "\U0001f44d"}}),
    ({"type": "location", "location": {"latitude": 37.48, "longitude": -122.14, "name": "HQ"}},
     {"type": "location", "location": {"latitude": 37.48, "longitude": -122.14, "name": "HQ"}}),
    ({"type": "contacts", "contacts": [{"name": {"formatted_name": "Ann Lee"},
                                        "phones": [{"phone": "+15555555555"}]}]},
     {"type": "contacts", "contacts": [{"name": {"formatted_name": "Ann Lee"},
                                        "phones": [{"phone": "+15555555555"}]}]}),
]


@pytest.mark.parametrize("request_body,expected", WA_CASES,
                         ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(WA_CASES)])
async def test_whatsapp_bodies(outbound, request_body, expected):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, **request_body})
    assert status == 202, answer
    record = await ob.wait(answer["id"], "sent")
    (body,) = ob.sim.bodies(WA)
    assert body == {"messaging_product": "whatsapp", "recipient_type": "individual", "to": A,
                    **expected, "biz_opaque_callback_data": answer["id"]}
    assert record["provider_message_id"] == ob.sim.accepted[0].message_id


async def test_a_customer_known_only_by_bsuid_is_answered_through_recipient(outbound):
    """A customer who hides their number behind a username writes in with ``from_user_id`` alone;
    the reply names them in ``recipient`` (``to`` is for phone numbers), and Meta's error for a
    message that cannot go to a BSUID fails it with its hint."""
    bsuid = "US.13491208655302741918"
    ob = await outbound()
    body = json.loads(fixture_bytes("whatsapp/bsuid_only.json"))
    body["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = str(int(time.time()))
    status, _ = await ob.gw.post("whatsapp", json.dumps(body).encode())
    assert status == 200
    await ob.gw.settle()
    status, answer = await ob.send({"channel": "whatsapp", "to": bsuid, "type": "text",
                                    "text": "Yes, it left this morning"})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
    (sent,) = ob.sim.bodies(WA)
    assert sent["recipient"] == bsuid and "to" not in sent
    assert ob.sim.accepted[0].to == bsuid
    ob.sim.fail_next(WA, 131062)
    status, answer = await ob.send({"channel": "whatsapp", "to": bsuid, "type": "text",
                                    "text": "And a second one"})
    record = await ob.wait(answer["id"], "failed")
    assert record["error"]["code"] == 131062
    assert "business-scoped user id" in record["error"]["hint"]


def test_only_a_bsuid_is_looked_up_as_an_alias():
    from channels.instagram import InstagramChannel
    from channels.whatsapp import WhatsAppChannel, WhatsAppConfig

    whatsapp = WhatsAppChannel(WhatsAppConfig(app_secret="s"))
    assert whatsapp.may_be_alias("US.13491208655302741918")
    assert whatsapp.may_be_alias("US.ENT.11815799212886844830")
    assert not whatsapp.may_be_alias("15550001234")
    assert not InstagramChannel.may_be_alias(None, "9000000000000001")


async def test_a_send_to_a_bsuid_seen_beside_a_wa_id_is_the_customers_own(outbound):
    """The window and the consent are the customer's whichever id the API client writes: a send
    to a BSUID seen beside a wa_id is checked as that wa_id too, and still addressed to the BSUID
    (Meta routes it to its owner, even once the number has gone to someone else)."""
    bsuid, wa_id, now = "US.13491208655302741918", "16315551234", str(int(time.time()))
    ob = await outbound()
    beside = json.loads(fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    for message in beside["entry"][0]["changes"][0]["value"]["messages"]:
        message["timestamp"] = now
    stop = json.loads(fixture_bytes("whatsapp/bsuid_only.json"))  # STOP, by BSUID alone
    stop["entry"][0]["changes"][0]["value"]["messages"][0].update(
        id="wamid.TEST.IN.BSUID.STOP", timestamp=now, text={"body": "STOP"})
    for body in (beside, stop):
        assert (await ob.gw.post("whatsapp", json.dumps(body).encode()))[0] == 200
    await ob.gw.settle()
    for to in (bsuid, wa_id):
        status, answer = await ob.send({"channel": "whatsapp", "to": to, "type": "template",
                                        "template": {"name": "promo", "language": "en_US",
                                                     "category": "marketing"}})
        assert status == 422 and answer["error"]["code"] == "opted_out", (to, answer)
    status, answer = await ob.send({"channel": "whatsapp", "to": bsuid, "type": "text",
                                    "text": "Noted: no more offers"})  # the window is open
    assert status == 202, answer
    assert (await ob.wait(answer["id"], "sent"))["to"] == bsuid
    (sent,) = ob.sim.bodies(WA)
    assert sent["recipient"] == bsuid and "to" not in sent


def _beside(at: int, text: str) -> bytes:
    return pair("wamid.TEST.IN.BSUID.BESIDE.0001", WA_ID, BSUID, at, text)


PROMO = {"channel": "whatsapp", "type": "template", "template": {
    "name": "promo", "language": "en_US", "category": "marketing"}}
BSUID, WA_ID = "US.13491208655302741918", "16315551234"


@pytest.mark.parametrize("start_first", [True, False])
async def test_a_send_to_a_bsuid_is_checked_against_both_ids_latest_word(outbound, start_first):
    """A START by BSUID alone (before the pair was known: filed under the BSUID) and a STOP
    beside the number: for a send to either id the later of the two counts, whichever id said
    it. The window the number's message opened lets a free-form reply to the BSUID through."""
    now = int(time.time())
    ob = await outbound()
    start_at, stop_at = (now - 100, now - 10) if start_first else (now - 10, now - 100)
    for body in (bsuid_only("wamid.TEST.IN.BSUID.START", start_at, "START"),
                 _beside(stop_at, "STOP")):  # the START is journaled first: under the BSUID
        assert (await ob.gw.post("whatsapp", body))[0] == 200
        await ob.gw.settle()
    for to in (WA_ID, BSUID):  # either id: the later word of the two
        status, answer = await ob.send({**PROMO, "to": to})
        if start_first:  # the number's STOP is the later word
            assert status == 422 and answer["error"]["code"] == "opted_out", (to, answer)
        else:
            assert status == 202, (to, answer)


async def test_a_stop_by_bsuid_alone_stops_marketing_to_the_number_it_is_seen_beside(outbound):
    """The customer, hiding their number, sends STOP by BSUID alone: it is filed under the
    BSUID. A later message names both ids. A marketing template sent to the number is refused:
    the BSUID's word is the customer's (it used to be checked against the number's own only)."""
    now = int(time.time())
    ob = await outbound()
    for body in (bsuid_only("wamid.TEST.IN.BSUID.STOP", now - 100, "STOP"),
                 _beside(now - 10, "where is my order?")):
        assert (await ob.gw.post("whatsapp", body))[0] == 200
        await ob.gw.settle()
    status, answer = await ob.send({**PROMO, "to": WA_ID})
    assert status == 422 and answer["error"]["code"] == "opted_out", answer
    assert not ob.sim.accepted


async def test_a_free_form_send_to_a_bsuid_uses_the_window_its_number_opened(outbound):
    ob = await outbound()
    assert (await ob.gw.post("whatsapp", _beside(int(time.time()) - 60, "hello")))[0] == 200
    await ob.gw.settle()  # the BSUID itself never wrote alone: only the number's window is open
    status, answer = await ob.send({"channel": "whatsapp", "to": BSUID, "type": "text",
                                    "text": "Hi!"})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
    (sent,) = ob.sim.bodies(WA)
    assert sent["recipient"] == BSUID and sent["text"]["body"] == "Hi!"


async def test_a_stop_acknowledged_just_before_a_send_to_the_bsuid_is_honoured(outbound):
    """The pair in a webhook acknowledged before the send is known when the send is checked:
    the look-up waits for the processor's catch-up, like the window and consent do."""
    from gateway import keys

    now = int(time.time())
    ob = await outbound()
    assert (await ob.gw.post("whatsapp", bsuid_only("wamid.TEST.IN.BSUID.HI", now - 50,
                                                      "hi")))[0] == 200
    await ob.gw.settle()
    identities = ob.gw.app[keys.PROCESSOR].identities
    apply = identities.apply

    async def behind(events):  # a processor a little behind (well within SETTLE_SECONDS)
        await asyncio.sleep(0.3)
        return await apply(events)

    identities.apply = behind
    assert (await ob.gw.post("whatsapp", _beside(now - 5, "STOP")))[0] == 200  # acknowledged
    status, answer = await ob.send({**PROMO, "to": BSUID})
    assert status == 422 and answer["error"]["code"] == "opted_out", answer


async def test_an_opt_out_kept_without_its_time_still_counts_for_a_send_to_the_bsuid(outbound):
    """A consent record of an earlier version (opted out, no time) on the number: a send to its
    BSUID, which has no word of its own, is refused as a send to the number is."""
    import sqlite3

    ob = await outbound()
    assert (await ob.gw.post("whatsapp", _beside(int(time.time()) - 100, "hello")))[0] == 200
    await ob.gw.settle()
    with sqlite3.connect(ob.gw.data_dir / "outbox.db") as db:
        db.execute("UPDATE customers SET opted_out = 1, opted_out_at = NULL WHERE contact_id = ?",
                   (WA_ID,))
    for to in (WA_ID, BSUID):
        status, answer = await ob.send({**PROMO, "to": to})
        assert status == 422 and answer["error"]["code"] == "opted_out", (to, answer)


async def test_whatsapp_mark_read_and_typing_use_the_latest_inbound_message(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A, mid="wamid.IN.LATEST")
    for body in ({"type": "mark_read", "to": A}, {"type": "typing", "to": A, "on": True},
                 {"type": "typing", "to": A, "on": False}):
        status, answer = await ob.send({"channel": "whatsapp", **body})
        assert status == 202, answer
        await ob.wait(answer["id"], "sent")
    sent = [r["body"] for r in ob.sim.requests]
    assert sent == [{"messaging_product": "whatsapp", "status": "read",
                     "message_id": "wamid.IN.LATEST"},
                    {"messaging_product": "whatsapp", "status": "read",
                     "message_id": "wamid.IN.LATEST",
                     "typing_indicator": {"type": "text"}}]  # typing off is a no-op on WhatsApp


IG_CASES = [
    ({"type": "text", "text": "Ol\u00e1!"},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE", "message": {"text": "Ol\u00e1!"}}),
    ({"type": "image", "media": {"link": "https://x.io/a.png"}},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
      "message": {"attachment": {"type": "image", "payload": {"url": "https://x.io/a.png"}}}}),
    ({"type": "audio", "media": {"link": "https://x.io/voice.m4a", "caption": "dropped"}},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
      "message": {"attachment": {"type": "audio", "payload": {"url": "https://x.io/voice.m4a"}}}}),
    ({"type": "video", "media": {"link": "https://x.io/clip.mp4", "filename": "dropped.mp4"}},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
      "message": {"attachment": {"type": "video", "payload": {"url": "https://x.io/clip.mp4"}}}}),
    ({"type": "video", "media": {"link": "https://x.io/clip.mp4"}, "tag": "HUMAN_AGENT"},
     {"recipient": {"id": U1}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
      "message": {"attachment": {"type": "video", "payload": {"url": "https://x.io/clip.mp4"}}}}),
    ({"type": "document", "media": {"link": "https://x.io/f.pdf"}},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
      "message": {"attachment": {"type": "file", "payload": {"url": "https://x.io/f.pdf"}}}}),
    ({"type": "quick_replies", "text": "Pick a colour", "quick_replies": [
        {"title": "Red", "payload": "COLOR_RED"}, {"title": "Blue", "payload": "COLOR_BLUE"}]},
     {"recipient": {"id": U1}, "messaging_type": "RESPONSE", "message": {"text": "Pick a colour",
      "quick_replies": [{"content_type": "text", "title": "Red", "payload": "COLOR_RED"},
                        {"content_type": "text", "title": "Blue", "payload": "COLOR_BLUE"}]}}),
    ({"type": "typing", "on": True}, {"recipient": {"id": U1}, "sender_action": "typing_on"}),
    ({"type": "typing", "on": False}, {"recipient": {"id": U1}, "sender_action": "typing_off"}),
    ({"type": "mark_read", "message_id": "aWdf.IN.1"},
     {"recipient": {"id": U1}, "sender_action": "mark_seen"}),
    # outbound.md §3: a reaction by its label; an unreact names the message alone
    ({"type": "reaction", "message_id": "aWdf.IN.1", "emoji": "\u2764\ufe0f"},
     {"recipient": {"id": U1}, "sender_action": "react",
      "payload": {"message_id": "aWdf.IN.1", "reaction": "love"}}),
    ({"type": "reaction", "message_id": "aWdf.IN.1", "emoji": "\u2764"},
     {"recipient": {"id": U1}, "sender_action": "react",
      "payload": {"message_id": "aWdf.IN.1", "reaction": "love"}}),
    ({"type": "reaction", "message_id": "aWdf.IN.1", "emoji": ""},
     {"recipient": {"id": U1}, "sender_action": "unreact",
      "payload": {"message_id": "aWdf.IN.1"}}),
]


@pytest.mark.parametrize("request_body,expected", IG_CASES,
                         ids=[f"{c[0]['type']}-{i}" for i, c in enumerate(IG_CASES)])
async def test_instagram_bodies(outbound, request_body, expected):
    ob = await outbound()
    await ob.inbound("instagram", U1)
    status, answer = await ob.send({"channel": "instagram", "to": U1, **request_body})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
    (request,) = ob.sim.requests
    assert request["path"] == f"/v24.0/{IG}/messages" and request["body"] == expected


async def test_whatsapp_quick_replies_are_sent_as_reply_buttons(outbound):
    """WhatsApp has no quick replies: they go as an interactive message of reply buttons (the
    simulator refuses any other ``type``, as Meta does: 100 "Param type is invalid")."""
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    status, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "quick_replies",
                                    "text": "Pick one", "quick_replies": [
                                        {"title": "Yes", "payload": "Y"},
                                        {"title": "No", "payload": "N"}]})
    assert status == 202, answer
    assert (await ob.wait(answer["id"], "sent", "failed"))["status"] == "sent"
    (body,) = ob.sim.bodies(WA)
    assert body["type"] == "interactive" and body["interactive"] == {
        "type": "button", "body": {"text": "Pick one"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": "Y", "title": "Yes"}},
            {"type": "reply", "reply": {"id": "N", "title": "No"}}]}}


def _replies(n: int, title: str = "Option") -> list[dict[str, str]]:
    return [{"title": title, "payload": f"P{i}"} for i in range(n)]


@pytest.mark.parametrize("channel,replies,field", [
    ("whatsapp", _replies(4), "quick_replies"),  # reply buttons: at most 3
    ("instagram", _replies(14), "quick_replies"),  # at most 13
    ("whatsapp", _replies(1, "x" * 21), "quick_replies[0].title"),
    ("instagram", _replies(2) + _replies(1, ""), "quick_replies[2].title"),
    ("whatsapp", [{"title": "Yes", "payload": ""}], "quick_replies[0].payload"),
    ("whatsapp", [{"title": "Yes", "payload": "Y"}, {"title": "Sure", "payload": "Y"}],
     "quick_replies[1].payload"),  # reply button ids are unique
    ("whatsapp", [{"title": "Yes", "payload": "Y" * 257}], "quick_replies[0].payload"),
], ids=["whatsapp-4", "instagram-14", "title-21", "empty-title", "empty-payload",
        "duplicate-payload", "payload-257"])
async def test_quick_replies_meta_would_refuse_are_a_422(outbound, channel, replies, field):
    ob = await outbound()
    to = A if channel == "whatsapp" else U1
    await ob.inbound(channel, to)
    status, answer = await ob.send({"channel": channel, "to": to, "type": "quick_replies",
                                    "text": "Pick", "quick_replies": replies})
    assert status == 422 and answer["error"]["field"] == field, answer
    assert ob.sim.requests == []


@pytest.mark.parametrize("request_body,field,reason", [
    ({"type": "audio", "media": {"id": "1203987655"}}, "media.link", "by URL"),
    ({"type": "image", "media": {"id": "123"}}, "media.link", "by URL"),
    ({"type": "text", "text": "\u00e9" * 600}, "text", "1000 bytes"),
    ({"type": "quick_replies", "text": "\u00e9" * 600,
      "quick_replies": [{"title": "A", "payload": "a"}]}, "text", "1000 bytes"),
    ({"type": "location", "location": {"latitude": 1, "longitude": 2}}, "type", "Instagram"),
    ({"type": "sticker", "media": {"link": "https://x.io/s.webp"}}, "type", "Instagram"),
    ({"type": "template", "template": {"name": "t", "language": "en_US"}}, "type", "Instagram"),
], ids=["audio-by-id", "image-by-id", "text-over-1000-bytes", "quick-replies-over-1000-bytes",
        "location", "sticker", "template"])
async def test_what_instagram_cannot_send_is_refused_before_it_is_accepted(
        outbound, request_body, field, reason):
    """CONTRACT §4: an invalid body is a 422 naming the field, never a 202 that fails later."""
    ob = await outbound()
    await ob.inbound("instagram", U1)
    status, answer = await ob.send({"channel": "instagram", "to": U1, **request_body})
    assert status == 422, answer
    assert answer["error"]["field"] == field and reason in answer["error"]["message"]
    with pytest.raises(InvalidRequest) as raised:  # the Python API raises where HTTP says 422
        await ob.service.send({"channel": "instagram", "to": U1, **request_body})
    assert raised.value.field == field
    assert ob.sim.requests == []


@pytest.mark.parametrize("request_body,expected", [
    ({"type": "typing", "on": False}, {"recipient": {"id": U1}, "sender_action": "typing_off"}),
    ({"type": "mark_read"}, {"recipient": {"id": U1}, "sender_action": "mark_seen"}),
])
async def test_instagram_sender_actions_need_no_inbound_message(outbound, request_body,
                                                                expected):
    """Instagram's sender actions name no message: they are sent to a customer whose messages
    the gateway has not seen (the window still applies to free-form messages, not to these)."""
    ob = await outbound()
    status, answer = await ob.send({"channel": "instagram", "to": U1, **request_body})
    assert status == 202, answer
    await ob.wait(answer["id"], "sent")
    (request,) = ob.sim.requests
    assert request["body"] == expected


async def test_whatsapp_mark_read_without_a_known_message_names_message_id(outbound):
    ob = await outbound()
    status, answer = await ob.send({"channel": "whatsapp", "to": "15550007777",
                                    "type": "mark_read"})
    assert status == 422 and answer["error"]["field"] == "message_id"


@pytest.mark.parametrize(("written", "canonical"), [
    ("15550001234", "15550001234"), ("+15550001234", "15550001234"),
    ("+1 (555) 000-1234", "15550001234"), ("1.555.000.1234", "15550001234"),
    ("CO.1234567890", "CO.1234567890"),  # a BSUID: kept as written
    ("+", "+"), ("١٥٥٥", "١٥٥٥"),  # no digits left / not ASCII digits: as written
])
def test_whatsapp_recipients_are_the_wa_id_inbound_events_carry(written, canonical):
    from channels.whatsapp import WhatsAppChannel, WhatsAppConfig

    assert WhatsAppChannel(WhatsAppConfig(app_secret="s")).recipient(written) == canonical


@pytest.mark.parametrize("account_id, warned", [(None, True), ("17840000000000001", False)])
def test_instagram_warns_once_when_webhooks_name_an_account_it_does_not_send_as(account_id,
                                                                                 warned):
    """webhooks.md §5: ``entry[].id`` is the IG account id, not the Page id of
    ``/{page_id}/messages``. With only ``page_id`` set, replies would find no window: the
    channel says which ``account_id`` to set, once."""
    from structlog.testing import capture_logs

    from channels.instagram import InstagramChannel, InstagramConfig

    channel = InstagramChannel(InstagramConfig(app_secret="s", verify_token="v",
                                               access_token="t", page_id="104000000000009",
                                               account_id=account_id))
    body = fixture_bytes("instagram/text.json")
    with capture_logs() as logs:
        (event,) = channel.normalise(body)
        channel.normalise(body)
    found = [e for e in logs if e["event"] == "instagram_account_id_not_configured"]
    assert len(found) == (1 if warned else 0)
    if warned:
        assert found[0]["account_id"] == event.account_id
        assert f'account_id = "{event.account_id}"' in found[0]["hint"]
