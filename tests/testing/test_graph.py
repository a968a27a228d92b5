"""GraphSimulator on its own, as a plugin author would use it: Meta's throughput limit (130429),
validation (400, code 100 naming the parameter), usage headers, faults, tokens and media."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import httpx
import pytest

from gateway.testing.graph import GraphSimulator

WA, IG, TO = "100000000000001", "17840000000000001", "15550001234"
AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture
async def graph():
    sim = await GraphSimulator().start()
    async with httpx.AsyncClient(base_url=f"{sim.url}/v24.0/", headers=AUTH) as client:
        sim.client = client
        yield sim
    await sim.stop()


def wa(kind: str, content, **extra) -> dict:
    return {"messaging_product": "whatsapp", "to": TO, "type": kind, kind: content, **extra}


def interactive(kind: str, action, **extra) -> dict:
    return wa("interactive", {"type": kind, "body": {"text": "Pick"}, "action": action, **extra})


def buttons(n: int, title: str = "B", id_: str = "b") -> dict:
    return {"buttons": [{"type": "reply", "reply": {"id": f"{id_}{i}", "title": f"{title}{i}"}}
                        for i in range(n)]}


def rows(n: int, **row) -> list[dict]:
    return [{"id": f"r{i}", "title": f"Row {i}", **row} for i in range(n)]


def listing(sections: list[dict], button: str = "Choose") -> dict:
    return {"button": button, "sections": sections}


def cta(display: str = "Track", url: str = "https://x.io/t/1", name: str = "cta_url") -> dict:
    return {"name": name, "parameters": {"display_text": display, "url": url}}


async def test_130429_when_a_number_is_driven_faster_than_its_limit(graph):
    graph.set_mps(WA, 5)
    answers = await asyncio.gather(*(graph.client.post(f"{WA}/messages", json=wa(
        "text", {"body": f"m{i}"})) for i in range(8)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 5 + [400] * 3 and graph.count_130429 == 3
    error = next(r.json()["error"] for r in answers if r.status_code == 400)
    assert (error["code"], error["type"]) == (130429, "OAuthException")
    assert "too many messages" in error["error_data"]["details"] and error["fbtrace_id"]
    await asyncio.sleep(1.05)  # a second later the number has room again
    assert (await graph.client.post(f"{WA}/messages", json=wa("text", {"body": "x"}))
            ).status_code == 200
    assert len(graph.accepted) == 6


BAD = [
    (b"{not json", "body"),
    ({"messaging_product": "whatsapp", "type": "text", "text": {"body": "x"}}, "to"),
    (wa("selfie", {}), "type"),
    (wa("text", {}), "text.body"),
    (wa("text", {"body": "x" * 4097}), "text.body"),
    (wa("template", {"name": "t"}), "template.language"),
    (wa("audio", {"id": "1", "caption": "no"}), "audio.caption"),
    (wa("image", {"id": "1", "filename": "a.png"}), "image.filename"),
    (wa("location", {"latitude": 1}), "location.longitude"),
    (wa("interactive", {"type": "carousel"}), "interactive.type"),
    (wa("interactive", {"type": "button", "body": {"text": "x"}}), "interactive.action"),
    (interactive("button", buttons(1), body={}), "interactive.body.text"),
    (interactive("button", buttons(4)), "interactive.action.buttons"),
    (interactive("button", {"buttons": []}), "interactive.action.buttons"),
    (interactive("button", buttons(1, title="x" * 20)),
     "interactive.action.buttons[0].reply.title"),
    (interactive("button", buttons(1, id_="x" * 256)), "interactive.action.buttons[0].reply.id"),
    (interactive("button", {"buttons": [{"type": "reply", "reply": {"id": "a", "title": "A"}},
                                        {"type": "reply", "reply": {"id": "a", "title": "B"}}]}),
     "interactive.action.buttons[1].reply"),
    (interactive("button", {"buttons": [{"type": "url", "reply": {"id": "a", "title": "A"}}]}),
     "interactive.action.buttons[0].type"),
    (interactive("button", buttons(1), footer={"text": "f" * 61}), "interactive.footer.text"),
    (interactive("button", buttons(1), header={"type": "text", "text": "h" * 61}),
     "interactive.header.text"),
    (interactive("list", listing([{"rows": rows(1)}], button="b" * 21)),
     "interactive.action.button"),
    (interactive("list", {"sections": [{"rows": rows(1)}]}), "interactive.action.button"),
    (interactive("list", listing([])), "interactive.action.sections"),
    (interactive("list", listing([{"title": f"S{i}", "rows": rows(1)} for i in range(11)])),
     "interactive.action.sections"),
    (interactive("list", listing([{"title": "A", "rows": rows(6)},
                                  {"title": "B", "rows": rows(5)}])),
     "interactive.action.sections"),
    (interactive("list", listing([{"rows": rows(1)}, {"title": "B", "rows": rows(1)}])),
     "interactive.action.sections[0].title"),
    (interactive("list", listing([{"title": "S" * 25, "rows": rows(1)}])),
     "interactive.action.sections[0].title"),
    (interactive("list", listing([{"title": "S", "rows": []}])),
     "interactive.action.sections[0].rows"),
    (interactive("list", listing([{"rows": [{"id": "r", "title": "t" * 25}]}])),
     "interactive.action.sections[0].rows[0].title"),
    (interactive("list", listing([{"rows": [{"id": "r" * 201, "title": "t"}]}])),
     "interactive.action.sections[0].rows[0].id"),
    (interactive("list", listing([{"rows": rows(1, description="d" * 73)}])),
     "interactive.action.sections[0].rows[0].description"),
    (interactive("cta_url", cta(name="url")), "interactive.action.name"),
    (interactive("cta_url", {"name": "cta_url"}), "interactive.action.parameters"),
    (interactive("cta_url", cta(display="d" * 21)), "interactive.action.parameters.display_text"),
    (interactive("cta_url", cta(url="")), "interactive.action.parameters.url"),
    (interactive("cta_url", cta(url="ftp://x.io/a")), "interactive.action.parameters.url"),
    ({"messaging_product": "whatsapp", "status": "read"}, "message_id"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
async def test_malformed_bodies_are_400_code_100_naming_the_parameter(graph, body, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await graph.client.post(f"{WA}/messages", content=content,
                                   headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == 100 and error["type"] == "OAuthException" and error["fbtrace_id"]
    assert f"Param {param} is invalid" in error["message"] or param == "body", error
    assert graph.accepted == []


GOOD = [
    interactive("button", buttons(3, title="t" * 19, id_="i" * 254),
                header={"type": "text", "text": "h" * 60}, footer={"text": "f" * 60}),
    interactive("list", listing([{"title": "A" * 24, "rows": rows(5, description="d" * 72)},
                                 {"title": "B", "rows": rows(5)}], button="b" * 20)),
    interactive("list", listing([{"rows": [{"id": "r" * 200, "title": "t" * 24}]}])),
    interactive("cta_url", cta(display="d" * 20), header={"type": "image",
                                                        "image": {"link": "https://x.io/a"}}),
]


@pytest.mark.parametrize("body", GOOD, ids=["buttons", "list", "list-one-section", "cta_url"])
async def test_interactive_bodies_at_the_limits_are_accepted(graph, body):
    resp = await graph.client.post(f"{WA}/messages", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["messages"][0]["id"].startswith("wamid.")


@pytest.mark.parametrize("body,param", [
    ({"recipient": {"id": "1"}, "message": {}}, "message"),
    ({"recipient": {"id": "1"}, "message": {"text": "\u00e9" * 501}}, "message.text"),
    ({"recipient": {"id": "1"}, "message": {"attachment": {"type": "gif", "payload": {
        "url": "https://x.io/a"}}}}, "message.attachment.type"),
    ({"recipient": {"id": "1"}, "message": {"attachment": {"type": "audio", "payload": {}}}},
     "message.attachment.payload.url"),
    ({"recipient": {"id": "1"}, "message": {"text": "x", "quick_replies": [
        {"content_type": "text", "title": "t" * 21, "payload": "p"}]}},
     "message.quick_replies[0].title"),
    ({"recipient": {"id": "1"}, "sender_action": "typing_on", "message": {"text": "x"}},
     "message"),
    ({"sender_action": "typing_on"}, "recipient"),
])
async def test_instagram_bodies_are_validated_too(graph, body, param):
    resp = await graph.client.post("me/messages", json=body)
    assert resp.status_code == 400 and f"Param {param} is invalid" in resp.json()["error"][
        "message"]


async def test_instagram_limits_answer_613(graph):
    graph.set_ig_limits(IG, mps=50, media_mps=2)
    video = {"recipient": {"id": "1"}, "message": {"attachment": {
        "type": "video", "payload": {"url": "https://x.io/v.mp4"}}}}
    answers = [await graph.client.post(f"{IG}/messages", json=video) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 400]
    assert answers[2].json()["error"]["code"] == 613 and graph.count_613 == 1
    text = {"recipient": {"id": "1"}, "message": {"text": "still fine"}}
    assert (await graph.client.post(f"{IG}/messages", json=text)).status_code == 200


async def test_usage_headers_as_meta_shapes_them(graph):
    resp = await graph.client.post(f"{WA}/messages", json=wa("text", {"body": "x"}))
    app = json.loads(resp.headers["X-App-Usage"])
    assert set(app) == {"call_count", "total_cputime", "total_time"}
    assert all(isinstance(v, int) and 0 <= v <= 100 for v in app.values())
    buc = json.loads(resp.headers["X-Business-Use-Case-Usage"])
    (item,) = buc[WA]
    assert item["type"] == "whatsapp_business_messaging"
    assert item["estimated_time_to_regain_access"] == 0
    assert {"call_count", "total_cputime", "total_time"} <= set(item)
    graph.set_app_usage(55, total_cputime=10, total_time=20)
    graph.set_business_usage(WA, 80)
    resp = await graph.client.post(f"{WA}/messages", json=wa("text", {"body": "x"}))
    assert json.loads(resp.headers["X-App-Usage"]) == {"call_count": 55, "total_cputime": 10,
                                                       "total_time": 20}
    assert json.loads(resp.headers["X-Business-Use-Case-Usage"])[WA][0]["call_count"] == 80


async def test_computed_app_usage_reaches_100_and_answers_code_4():
    async with GraphSimulator(app_calls_per_hour=4) as sim, httpx.AsyncClient(
            base_url=f"{sim.url}/v24.0/", headers=AUTH) as client:
        answers = [await client.post(f"{WA}/messages", json=wa("text", {"body": "x"}))
                   for _ in range(4)]
    assert [json.loads(r.headers["X-App-Usage"])["call_count"] for r in answers[:3]] == [
        25, 50, 75]
    assert answers[3].status_code == 400 and answers[3].json()["error"]["code"] == 4
    assert sim.count_4 == 1


async def test_a_blocked_account_answers_with_the_time_to_regain_access(graph):
    graph.block(WA, 120)
    resp = await graph.client.post(f"{WA}/messages", json=wa("text", {"body": "x"}))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == 80007
    item = json.loads(resp.headers["X-Business-Use-Case-Usage"])[WA][0]
    assert item["estimated_time_to_regain_access"] == 2  # minutes, as Meta writes them
    graph.block(IG, 0.6)
    resp = await graph.client.post("me/messages", json={"recipient": {"id": "1"}, "message": {
        "text": "x"}})
    assert resp.status_code == 200  # another account ("me") is not blocked
    resp = await graph.client.post(f"{IG}/messages", json={"recipient": {"id": "1"},
                                                          "message": {"text": "x"}})
    assert resp.json()["error"]["code"] == 613
    assert 0 < json.loads(resp.headers["X-Business-Use-Case-Usage"])[IG][0][
        "estimated_time_to_regain_access"] <= 0.01
    await asyncio.sleep(0.65)
    assert (await graph.client.post(f"{IG}/messages", json={"recipient": {"id": "1"},
                                                           "message": {"text": "x"}})
            ).status_code == 200


async def test_tokens_are_checked_and_revoked_ones_get_190(graph):
    body = wa("text", {"body": "x"})
    async with httpx.AsyncClient(base_url=f"{graph.url}/v24.0/") as anonymous:
        resp = await anonymous.post(f"{WA}/messages", json=body)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == 190
        resp = await anonymous.post(f"{IG}/messages?access_token=ok", json={
            "recipient": {"id": "1"}, "message": {"text": "x"}})
        assert resp.status_code == 200  # Instagram's ?access_token= works too
    graph.revoke_token("test-token")
    resp = await graph.client.post(f"{WA}/messages", json=body)
    error = resp.json()["error"]
    assert resp.status_code == 401 and (error["code"], error["error_subcode"]) == (190, 463)
    assert graph.accepted[0].channel == "instagram" and len(graph.accepted) == 1


async def test_delay_next_accepts_then_answers_late(graph):
    graph.delay_next(WA, 0.6)
    started = time.monotonic()
    send = asyncio.ensure_future(graph.client.post(f"{WA}/messages", json=wa(
        "text", {"body": "slow"})))
    await asyncio.sleep(0.2)
    assert len(graph.accepted) == 1 and not send.done()  # Meta has it; no answer yet
    resp = await send
    assert resp.status_code == 200 and time.monotonic() - started >= 0.6
    assert resp.json()["messages"][0]["id"] == graph.accepted[0].message_id
    graph.delay_next(WA, 30)
    late = asyncio.ensure_future(graph.client.post(f"{WA}/messages", json=wa(
        "text", {"body": "x"})))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await graph.stop()  # stop() answers what it holds instead of waiting 30 s
    assert (await late).status_code == 200 and time.monotonic() - started < 3


async def test_media_upload_lookup_download_delete(graph):
    data = b"\xff\xd8\xff" + b"jpeg" * 1000
    resp = await graph.client.post(f"{WA}/media", data={"messaging_product": "whatsapp",
                                                        "type": "image/jpeg"},
                                   files={"file": ("a.jpg", data, "image/jpeg")})
    assert resp.status_code == 200
    media_id = resp.json()["id"]
    info = (await graph.client.get(media_id, params={"phone_number_id": WA})).json()
    assert info == {"messaging_product": "whatsapp", "id": media_id, "mime_type": "image/jpeg",
                    "sha256": hashlib.sha256(data).hexdigest(), "file_size": len(data),
                    "url": info["url"]}
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(info["url"])).status_code == 401  # the bearer token is needed
        got = await plain.get(info["url"], headers=AUTH)
        assert got.status_code == 200 and got.content == data
        assert got.headers["Content-Type"].startswith("image/jpeg")
        assert (await plain.get(info["url"].replace("hash=", "hash=x"), headers=AUTH)
                ).status_code == 404
    assert (await graph.client.delete(media_id)).json() == {"success": True}
    missing = await graph.client.get(media_id)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == 100


@pytest.mark.parametrize("fields,files,param", [
    ({"type": "image/png"}, {"file": ("a.png", b"x", "image/png")}, "messaging_product"),
    ({"messaging_product": "whatsapp", "type": "image/png"}, None, "file"),
    ({"messaging_product": "whatsapp"}, {"file": ("a.png", b"x", "image/png")}, "type"),
])
async def test_bad_uploads_are_400_naming_the_field(graph, fields, files, param):
    resp = await graph.client.post(f"{WA}/media", data=fields, files=files or {
        "other": ("x", b"", "text/plain")})
    assert resp.status_code == 400 and f"Param {param} is invalid" in resp.json()["error"][
        "message"]


async def test_media_urls_expire():
    async with GraphSimulator(media_url_ttl=0.2) as sim, httpx.AsyncClient(headers=AUTH) as c:
        media_id = sim.add_media(b"voice", "audio/ogg")
        url = (await c.get(f"{sim.url}/v24.0/{media_id}")).json()["url"]
        assert (await c.get(url)).content == b"voice"
        await asyncio.sleep(0.25)
        assert (await c.get(url)).status_code == 404  # fetch a fresh url
