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


def hold_processing(monkeypatch, journal) -> asyncio.Event:
    """The processor's next commit waits for the returned event: webhooks are acknowledged
    (journaled) but not yet processed."""
    release = asyncio.Event()
    commit = journal.commit_processed

    async def held(*args):
        await release.wait()
        return await commit(*args)

    monkeypatch.setattr(journal, "commit_processed", held)
    return release


async def test_a_stop_acknowledged_but_not_yet_processed_is_honoured(outbound, monkeypatch):
    """The STOP's webhook got its 200 a moment before the send: the send waits for the processor
    to read it (read-your-writes), then is refused."""
    ob = await outbound()
    await ob.inbound("whatsapp", A, text="hello")
    release = hold_processing(monkeypatch, ob.gw.app[keys.JOURNAL])
    status, _ = await ob.gw.post("whatsapp", json.dumps(
        inbound_body("STOP", int(time.time()), "wamid.IN.stop.unprocessed")).encode())
    assert status == 200
    send = asyncio.ensure_future(ob.send(MARKETING))
    await asyncio.sleep(0.3)
    assert not send.done()  # waiting for the acknowledged STOP to be processed
    release.set()
    status, answer = await send
    assert status == 422 and answer["error"]["code"] == "opted_out"
    assert ob.sim.accepted == []


async def test_a_send_waits_for_the_processor_only_so_long(outbound, monkeypatch):
    """A processor stuck (a failing journal) holds a send for SETTLE_SECONDS, no longer: then it
    is checked with what is known, as before."""
    from gateway.outbound import service

    monkeypatch.setattr(service, "SETTLE_SECONDS", 0.2)
    ob = await outbound()
    release = hold_processing(monkeypatch, ob.gw.app[keys.JOURNAL])
    status, _ = await ob.gw.post("whatsapp", json.dumps(
        inbound_body("STOP", int(time.time()), "wamid.IN.stop.stuck")).encode())
    assert status == 200
    started = time.monotonic()
    status, _ = await ob.send(MARKETING)
    assert status == 202 and 0.2 <= time.monotonic() - started < 2.0
    release.set()


async def test_a_send_does_not_wait_for_a_processor_that_has_stopped(outbound):
    """At shutdown the processor may stop with requests pending (its drain ran out of time):
    sends then are checked at once with what is known, not after SETTLE_SECONDS each."""
    ob = await outbound()
    processor = ob.gw.app[keys.PROCESSOR]
    processor.stop()  # returns once the journal is empty; nothing processed after that
    for _ in range(200):
        if processor.stopped:
            break
        await asyncio.sleep(0.01)
    assert processor.stopped
    status, _ = await ob.gw.post("whatsapp", json.dumps(
        inbound_body("hello", int(time.time()), "wamid.IN.pending")).encode())
    assert status == 200 and ob.gw.app[keys.JOURNAL].pending == 1
    started = time.monotonic()
    assert await processor.caught_up(5.0) is False
    assert time.monotonic() - started < 0.5


def preference_body(value: str, ts: int) -> dict:
    body = json.loads(fixture_bytes("whatsapp/user_preferences_stop.json"))
    change = body["entry"][0]["changes"][0]["value"]
    change["metadata"]["phone_number_id"] = WA
    change["user_preferences"][0].update(wa_id=A, value=value, timestamp=ts)
    return body


async def test_whatsapps_marketing_preference_is_an_opt_out_until_resumed(outbound):
    """Meta's ``user_preferences`` (limits.md §9): a customer who stopped marketing messages in
    WhatsApp gets no marketing template, without ever having written; a utility one still goes;
    resuming, or a later START, lets marketing go again. The preference opens no window. Every
    store agrees: the outbox and the storage sink's ``contacts.opted_out``."""
    ob = await outbound()
    now = int(time.time())
    await ob.webhook("whatsapp", preference_body("stop", now - 100))
    status, answer = await ob.send(MARKETING)
    assert status == 422 and answer["error"]["code"] == "opted_out"
    utility = {**MARKETING, "template": {**MARKETING["template"], "category": "utility"}}
    assert (await ob.send(utility))[0] == 202
    free_form = {"channel": "whatsapp", "to": A, "type": "text", "text": "hi"}
    status, answer = await ob.send(free_form)
    assert status == 422 and answer["error"]["code"] == "outside_window"
    rows = await ob.gw.sql("SELECT opted_out FROM contacts WHERE contact_id = ?", (A,))
    assert rows == [(1,)]
    await ob.webhook("whatsapp", preference_body("stop", now - 200))  # older: changes nothing
    await ob.webhook("whatsapp", preference_body("resume", now - 50))
    assert (await ob.send(MARKETING))[0] == 202
    assert await ob.gw.sql("SELECT opted_out FROM contacts WHERE contact_id = ?", (A,)) == [(0,)]
    await ob.webhook("whatsapp", preference_body("stop", now - 10))
    assert (await ob.send(MARKETING))[0] == 422
    await ob.webhook("whatsapp", inbound_body("START", now - 5, "wamid.IN.start.after"))
    assert (await ob.send(MARKETING))[0] == 202
