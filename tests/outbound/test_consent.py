"""Opt-outs by keyword: the latest word by its time wins, and a STOP counts from the moment the
gateway processes it (not from when the outbox sink stores it)."""

from __future__ import annotations

import asyncio
import json
import time

from gateway import keys
from tests.conftest import fixture_bytes
from tests.outbound.conftest import WA

A = "15550001234"
MARKETING = {"channel": "whatsapp", "to": A, "type": "template",
             "template": {"name": "promo", "language": "en_US", "category": "marketing"}}


def inbound_body(text: str, ts: int, mid: str) -> dict:
    body = json.loads(fixture_bytes("whatsapp/text.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["metadata"]["phone_number_id"] = WA
    value["contacts"][0]["wa_id"] = A
    value["messages"][0].update({"from": A, "id": mid, "timestamp": str(ts),
                                 "text": {"body": text}})
    return body


async def test_a_stop_delivered_before_an_older_start_keeps_the_contact_opted_out(outbound):
    """START at t-200, STOP at t-100, delivered STOP first (webhooks.md §3: no order)."""
    ob = await outbound()
    now = int(time.time())
    await ob.webhook("whatsapp", inbound_body("STOP", now - 100, "wamid.IN.stop"))
    await ob.webhook("whatsapp", inbound_body("START", now - 200, "wamid.IN.start"))
    status, answer = await ob.send(MARKETING)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    await ob.webhook("whatsapp", inbound_body("START", now - 50, "wamid.IN.start2"))
    assert (await ob.send(MARKETING))[0] == 202


async def test_a_stop_is_honoured_before_the_outbox_sink_stores_it(outbound, monkeypatch):
    """The STOP has been processed (the window it opens is already honoured) but the outbox sink
    has not written it yet: a marketing template is refused all the same."""
    ob = await outbound()
    await ob.inbound("whatsapp", A, text="hello")
    sink = ob.gw.app[keys.SINKS]["outbox"]
    release = asyncio.Event()
    write = sink.write

    async def held(records):
        await release.wait()
        await write(records)

    monkeypatch.setattr(sink, "write", held)
    status, _ = await ob.gw.post("whatsapp", json.dumps(
        inbound_body("STOP", int(time.time()), "wamid.IN.stop.race")).encode())
    assert status == 200
    for _ in range(500):  # until the processor published it: the window it opens is known
        if ob.service.recent.get(("whatsapp", WA, A), (0, None))[1] == "wamid.IN.stop.race":
            break
        await asyncio.sleep(0.01)
    assert not (await ob.service.outbox.customer("whatsapp", WA, A)).opted_out  # not stored yet
    status, answer = await ob.send(MARKETING)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    release.set()
    await ob.gw.settle()
    assert (await ob.service.outbox.customer("whatsapp", WA, A)).opted_out
    assert ob.sim.accepted == []
