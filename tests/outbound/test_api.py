"""The Python API (the original system's functions on ``app[keys.OUTBOUND]``) end to end at the
simulator, body by body, and the WhatsApp media helpers (upload, send by id, download)."""

from __future__ import annotations

import hashlib
import json

import pytest

from gateway import keys
from gateway.outbound.errors import TokenExpired
from gateway.outbound.request import InvalidRequest
from tests.outbound.conftest import IG, TOKEN, WA

A, U1 = "15550001234", "9000000000000001"
WA_BASE = {"messaging_product": "whatsapp", "recipient_type": "individual", "to": A}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


async def sent_body(ob, answer: dict) -> dict:
    await ob.wait(answer["id"], "sent")
    (body,) = [r["body"] for r in ob.sim.requests
               if (r["body"] or {}).get("biz_opaque_callback_data") == answer["id"]]
    return body


async def test_send_whatsapp_text_template_media(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    api = ob.service
    answer = await api.send_whatsapp_text(A, "Tracking: https://x.io/t/1", preview_url=True,
                                          reply_to="wamid.IN.1")
    assert answer["status"] == "queued"
    assert await sent_body(ob, answer) == {
        **WA_BASE, "type": "text", "text": {"body": "Tracking: https://x.io/t/1",
                                            "preview_url": True},
        "context": {"message_id": "wamid.IN.1"}, "biz_opaque_callback_data": answer["id"]}
    components = [{"type": "body", "parameters": [{"type": "text", "text": "Alex"}]}]
    answer = await api.send_whatsapp_template(A, "order_update", "pt_BR", components,
                                              category="utility")
    assert await sent_body(ob, answer) == {
        **WA_BASE, "type": "template", "template": {
            "name": "order_update", "language": {"code": "pt_BR"}, "components": components},
        "biz_opaque_callback_data": answer["id"]}  # the category is ours, never sent to Meta
    answer = await api.send_whatsapp_media(A, "document", link="https://x.io/i.pdf",
                                           caption="inv", filename="invoice.pdf")
    assert await sent_body(ob, answer) == {
        **WA_BASE, "type": "document", "document": {
            "link": "https://x.io/i.pdf", "caption": "inv", "filename": "invoice.pdf"},
        "biz_opaque_callback_data": answer["id"]}
    answer = await api.send_whatsapp_media(A, "sticker", media_id="1203987657")
    assert (await sent_body(ob, answer))["sticker"] == {"id": "1203987657"}
    with pytest.raises(InvalidRequest) as refused:
        await api.send_whatsapp_media(A, "image")
    assert refused.value.field == "media"


async def test_send_instagram_text_quick_replies_typing(outbound):
    ob = await outbound()
    await ob.inbound("instagram", U1)
    api = ob.service
    answer = await api.send_instagram_text(U1, "Ol\u00e1!")
    await ob.wait(answer["id"], "sent")
    answer = await api.send_instagram_quick_replies(U1, "Pick a colour", [
        {"title": "Red", "payload": "COLOR_RED"}, {"title": "Blue", "payload": "COLOR_BLUE"}])
    await ob.wait(answer["id"], "sent")
    for on in (True, False):
        answer = await api.send_instagram_typing(U1, on=on)
        await ob.wait(answer["id"], "sent")
    assert [(r["path"], r["body"]) for r in ob.sim.requests] == [
        (f"/v24.0/{IG}/messages", {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
                                  "message": {"text": "Ol\u00e1!"}}),
        (f"/v24.0/{IG}/messages", {"recipient": {"id": U1}, "messaging_type": "RESPONSE",
                                  "message": {"text": "Pick a colour", "quick_replies": [
                                      {"content_type": "text", "title": "Red",
                                       "payload": "COLOR_RED"},
                                      {"content_type": "text", "title": "Blue",
                                       "payload": "COLOR_BLUE"}]}}),
        (f"/v24.0/{IG}/messages", {"recipient": {"id": U1}, "sender_action": "typing_on"}),
        (f"/v24.0/{IG}/messages", {"recipient": {"id": U1}, "sender_action": "typing_off"})]


async def test_upload_send_by_id_and_download_media(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    api = ob.service
    media_id = await api.upload_whatsapp_media(PNG, "image/png", "parcel.png")
    (upload,) = [r for r in ob.sim.requests if r["path"] == f"/v24.0/{WA}/media"]
    assert upload["status"] == 200
    assert upload["body"] == {"messaging_product": "whatsapp", "type": "image/png"}
    stored = ob.sim.media[media_id]
    assert (stored.data, stored.mime_type, stored.filename, stored.account_id) == (
        PNG, "image/png", "parcel.png", WA)
    answer = await api.send_whatsapp_media(A, "image", media_id=media_id, caption="your parcel")
    assert (await sent_body(ob, answer))["image"] == {"id": media_id, "caption": "your parcel"}
    data, mime = await api.download_whatsapp_media(media_id)
    assert (data, mime) == (PNG, "image/png")
    assert hashlib.sha256(data).hexdigest() == stored.sha256
    inbound_id = ob.sim.add_media(b"OggS voice", "audio/ogg; codecs=opus")  # a customer's
    assert await api.download_whatsapp_media(inbound_id) == (b"OggS voice",
                                                             "audio/ogg; codecs=opus")


async def test_media_calls_raise_metas_errors(outbound):
    ob = await outbound()
    api = ob.service
    with pytest.raises(InvalidRequest):
        await api.upload_whatsapp_media(PNG, "image/png", account_id="999")
    from gateway.outbound.errors import MetaPermanent

    with pytest.raises(MetaPermanent) as missing:
        await api.download_whatsapp_media("4040404040")
    assert missing.value.code == 100
    ob.sim.revoke_token("EAAB-test")
    with pytest.raises(TokenExpired) as expired:
        await api.upload_whatsapp_media(PNG, "image/png")
    assert expired.value.code == 190 and expired.value.http_status == 401


async def test_post_v1_messages_with_expect_100_continue(outbound):
    """A send that can be accepted gets ``100 Continue`` and then its 202; one over the size
    limit, or with no room in the byte budget, is refused before the client uploads it."""
    from tests.test_expect_continue import continued, head, refused_before_upload

    ob = await outbound()
    gw = ob.gw
    body = json.dumps({"channel": "whatsapp", "to": "15550001111", "type": "template",
                       "template": {"name": "order_update", "language": "en_US"}}).encode()
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    status, _, answer = await continued(gw, head("/v1/messages", len(body), auth), body)
    assert status == 202 and json.loads(answer)["status"] == "queued"
    limit = gw.app[keys.CONFIG].server.max_body_bytes
    status, _, answer = await refused_before_upload(gw, head("/v1/messages", limit + 1, auth))
    assert status == 413 and json.loads(answer)["error"]["code"] == "payload_too_large"
    gw.app[keys.BUDGET].held = gw.app[keys.BUDGET].limit
    try:
        status, _, answer = await refused_before_upload(gw, head("/v1/messages", len(body), auth))
    finally:
        gw.app[keys.BUDGET].held = 0
    assert status == 503 and json.loads(answer)["error"]["code"] == "busy"


async def test_a_compressed_send_is_refused_naming_content_encoding(outbound):
    """The main port inflates no body (a few KB of gzip could be megabytes in memory): a
    compressed ``POST /v1/messages`` gets 415 naming the header, not a puzzling 422 about
    malformed JSON; ``identity`` is no compression."""
    import gzip

    ob = await outbound()
    await ob.inbound("whatsapp", "15550001111")
    body = json.dumps({"channel": "whatsapp", "to": "15550001111", "type": "text",
                       "text": "hello"}).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with ob.gw.session.post(f"{ob.gw.url}/v1/messages", data=gzip.compress(body),
                                  headers={**headers, "Content-Encoding": "gzip"}) as resp:
        assert resp.status == 415
        answer = await resp.json()
    assert answer["error"]["code"] == "unsupported_content_encoding"
    assert "Content-Encoding" in answer["error"]["message"]
    async with ob.gw.session.post(f"{ob.gw.url}/v1/messages", data=body,
                                  headers={**headers, "Content-Encoding": "identity"}) as resp:
        assert resp.status == 202
