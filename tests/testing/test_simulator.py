"""MetaSimulator: signed customer webhooks a real gateway accepts, statuses for accepted sends,
Meta-like bounded retries."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from gateway.signatures import verify
from gateway.testing.graph import GraphSimulator
from gateway.testing.simulator import Delivery, MetaSimulator, dumps
from tests.conftest import SECRET, fixture_bytes

WA_ACCOUNT = "100000000000001"
IG_ACCOUNT = "17840000000000001"


def shape(value):
    """The structure of a JSON value: key names and value types, not the values."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


async def test_customer_messages_are_accepted_and_normalised(gateway):
    gw = await gateway()
    async with MetaSimulator(gw.url, app_secret=SECRET, graph=False) as sim:
        wa = await sim.customer_says("whatsapp", "15550001234", "Ol\u00e1 \U0001f44d order?",
                                     name="Alex Example")
        ig = await sim.customer_says("instagram", "9000000000000001", "Do you ship to Lisbon?")
        again = await sim.customer_says("whatsapp", "15550001234", "Ol\u00e1 \U0001f44d order?")
    assert (wa.status, wa.attempts, ig.status, again.status) == (200, 1, 200, 200)
    assert wa.message_id != again.message_id and wa.message_id.startswith("wamid.")
    assert b"\\u00e1" in wa.body and b"\\ud83d\\udc4d" in wa.body  # Meta's escaping
    wa.body.decode("ascii")
    await gw.settle()
    events = {e["message_id"]: e for e in gw.jsonl()}
    assert set(events) == {wa.message_id, ig.message_id, again.message_id}
    event = events[wa.message_id]
    assert event["text"] == "Ol\u00e1 \U0001f44d order?"
    assert event["sender"] == {"id": "15550001234", "name": "Alex Example"}
    assert (event["account_id"], event["direction"], event["type"]) == (WA_ACCOUNT, "inbound",
                                                                         "text")
    event = events[ig.message_id]
    assert (event["channel"], event["account_id"], event["sender"]["id"], event["text"]) == (
        "instagram", IG_ACCOUNT, "9000000000000001", "Do you ship to Lisbon?")


async def test_payloads_have_the_fixtures_shape():
    sim = MetaSimulator("http://127.0.0.1:1", app_secret=SECRET, graph=False)
    wa = sim.whatsapp_message("15550001234", "wamid.X", "Hi", 1760000000, name="Alex Example")
    assert shape(wa) == shape(json.loads(fixture_bytes("whatsapp/text.json")))
    ig = sim.instagram_message("9000000000000001", "aWdfX", "Hi", 1760001000.123)
    assert shape(ig) == shape(json.loads(fixture_bytes("instagram/text.json")))
    echo = sim.instagram_echo("9000000000000001", "aWdfY", {"text": "Thanks!"}, 1760001150.0)
    assert shape(echo) == shape(json.loads(fixture_bytes("instagram/echo.json")))
    read = sim.instagram_read("9000000000000001", "aWdfY", 1760001120.0)
    assert shape(read) == shape(json.loads(fixture_bytes("instagram/read.json")))
    status = sim.whatsapp_status("wamid.Y", "read", "15550001234", 1760000360,
                                 callback_data="outbox-0007")
    assert shape(status) == shape(json.loads(fixture_bytes("whatsapp/status_read.json")))
    assert wa["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] == "1760000000"
    assert ig["entry"][0]["messaging"][0]["timestamp"] == 1760001000123


def test_serialisation_is_ascii_and_signed_bytes_verify():
    body = dumps({"text": "\u00e4\u00f6\u00e5 \U0001f600 a/b"}, escape_slashes=True)
    assert body == b'{"text":"\\u00e4\\u00f6\\u00e5 \\ud83d\\ude00 a\\/b"}'
    assert json.loads(body)["text"] == "\u00e4\u00f6\u00e5 \U0001f600 a/b"
    from gateway.signatures import sign

    assert verify(SECRET.encode(), body, sign(SECRET.encode(), body))


async def test_wrong_secret_is_refused_and_retried_a_bounded_number_of_times(gateway):
    gw = await gateway()
    async with MetaSimulator(gw.url, app_secret="not-the-secret", graph=False,
                             retry_delays=(0.01, 0.01)) as sim:
        delivery = await sim.customer_says("whatsapp", "15550001234", "hello")
    assert (delivery.status, delivery.attempts, delivery.ok) == (401, 3, False)
    await gw.settle()
    assert gw.jsonl() == []


class Flaky:
    """A webhook receiver answering ``statuses`` in turn (then 200), recording what it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[bytes] = []
        self.headers: list[dict] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"status": status}, status=status)

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/webhooks/{channel}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


async def test_retries_until_200_with_the_same_bytes():
    flaky = Flaky([503, 500])
    async with flaky as url, MetaSimulator(url, app_secret=SECRET, graph=False,
                                           retry_delays=(0.01, 0.02, 0.03)) as sim:
        delivery = await sim.customer_says("instagram", "9000000000000001", "hi")
    assert (delivery.status, delivery.attempts) == (200, 3)
    assert len(set(flaky.bodies)) == 1 and flaky.bodies[0] == delivery.body
    header = flaky.headers[0]["X-Hub-Signature-256"]
    assert verify(SECRET.encode(), flaky.bodies[0], header)


async def test_gives_up_after_the_last_retry():
    flaky = Flaky([500] * 10)
    seen: list[Delivery] = []
    async with flaky as url, MetaSimulator(url, app_secret=SECRET, graph=False,
                                           retry_delays=(0.01, 0.01)) as sim:
        sim.on_delivery.append(seen.append)
        delivery = await sim.customer_says("whatsapp", "15550001234", "hi")
    assert (delivery.status, delivery.attempts) == (500, 3)
    assert len(flaky.bodies) == 3 and seen == [delivery]


async def test_unreachable_gateway_is_bounded_too():
    from gateway.testing import free_port

    started = time.monotonic()
    async with MetaSimulator(f"http://127.0.0.1:{free_port()}", app_secret=SECRET, graph=False,
                             retry_delays=(0.01, 0.01), timeout=1.0) as sim:
        delivery = await sim.customer_says("whatsapp", "15550001234", "hi")
    assert (delivery.status, delivery.attempts) == (0, 3)
    assert time.monotonic() - started < 5


# -- with the GraphSimulator: statuses and echoes for what it accepted ------------------------

@pytest.fixture
async def graph():
    graph = GraphSimulator()
    await graph.start()
    yield graph
    await graph.stop()


async def graph_send(graph, path: str, body: dict) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        resp = await client.post(f"{graph.url}/v24.0/{path}", json=body,
                                 headers={"Authorization": "Bearer test-access-token"})
    assert resp.status_code == 200, resp.text
    return resp.json()


async def test_whatsapp_statuses_for_accepted_messages(gateway, graph):
    gw = await gateway()
    async with MetaSimulator(gw.url, app_secret=SECRET, graph=graph,
                             status_delays=(0.01, 0.01, 0.01)) as sim:
        seen: list[Delivery] = []
        sim.on_delivery.append(seen.append)
        sent = await graph_send(graph, f"{WA_ACCOUNT}/messages", {
            "messaging_product": "whatsapp", "to": "15550001234", "type": "text",
            "text": {"body": "Your order ships today"}, "biz_opaque_callback_data": "outbox-42"})
        wamid = sent["messages"][0]["id"]
        assert await sim.drain(10)
    assert [(d.kind, d.state, d.status) for d in seen] == [
        ("status", "sent", 200), ("status", "delivered", 200), ("status", "read", 200)]
    await gw.settle()
    statuses = [e for e in gw.jsonl() if e["kind"] == "status"]
    assert [e["status"] for e in statuses] == ["sent", "delivered", "read"]
    assert {e["message_id"] for e in statuses} == {wamid}
    assert {e["recipient"]["id"] for e in statuses} == {"15550001234"}
    assert {e.get("callback_data") for e in statuses} == {"outbox-42"}


async def test_instagram_echo_and_read_for_accepted_messages(gateway, graph):
    gw = await gateway()
    async with MetaSimulator(gw.url, app_secret=SECRET, graph=graph, echo_delay=0.01,
                             read_delay=0.01) as sim:
        sent = await graph_send(graph, "me/messages", {
            "recipient": {"id": "9000000000000001"}, "message": {"text": "Thanks!"}})
        mid = sent["message_id"]
        assert await sim.drain(10)
    await gw.settle()
    events = gw.jsonl()
    echo = [e for e in events if e["kind"] == "message"]
    assert [(e["direction"], e["message_id"], e["text"]) for e in echo] == [
        ("outbound", mid, "Thanks!")]
    assert echo[0]["recipient"]["id"] == "9000000000000001"
    reads = [e for e in events if e["kind"] == "read"]
    assert [(e["message_id"], e["sender"]["id"]) for e in reads] == [(mid, "9000000000000001")]


async def test_stop_cancels_what_is_in_flight(gateway, graph):
    gw = await gateway()
    sim = MetaSimulator(gw.url, app_secret=SECRET, graph=graph, status_delays=(30, 30, 30))
    await sim.start()
    await graph_send(graph, f"{WA_ACCOUNT}/messages", {
        "messaging_product": "whatsapp", "to": "15550001234", "type": "text",
        "text": {"body": "x"}})
    await asyncio.sleep(0.05)
    assert sim.in_flight == 1
    assert not await sim.drain(0.1)
    started = time.monotonic()
    await sim.stop()
    assert time.monotonic() - started < 2 and sim.in_flight == 0
