"""A gateway killed (SIGKILL) between accepting sends and sending them loses none and sends none
twice: records still queued are sent after the restart, exactly once each."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from gateway.testing import GatewayProcess, free_port, sign_headers
from gateway.testing.graph import GraphSimulator
from tests.conftest import SECRET, fixture_bytes
from tests.outbound.conftest import TOKEN, WA

pytestmark = pytest.mark.slow
CONFIG = """
[server]
port = {{port}}
metrics_port = {{metrics_port}}
data_dir = "{{data_dir}}"
api_token = "{token}"
shutdown_timeout = 5
[channels.whatsapp]
app_secret = "{secret}"
access_token = "EAAB-test"
phone_number_id = "{wa}"
graph_base_url = "{url}"
pair_burst = 45
pair_interval_seconds = 0.1
[outbound]
backoff_initial = 2
backoff_max = 3
reconcile_seconds = 1
[sinks.storage]
"""


def _post(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


async def test_sigkill_between_accept_and_send(tmp_path):
    dead_port = free_port()  # nothing listens here: sends fail before reaching "Meta"
    proc = GatewayProcess(tmp_path, CONFIG.format(token=TOKEN, secret=SECRET, wa=WA,
                                                  url=f"http://127.0.0.1:{dead_port}"))
    customer = "15550001234"
    inbound = json.loads(fixture_bytes("whatsapp/text.json"))
    inbound["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = str(int(time.time()))
    raw = json.dumps(inbound).encode()
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    ids = []
    try:
        proc.start()
        assert _post(f"{proc.url}/webhooks/whatsapp", raw, sign_headers(SECRET, raw))[0] == 200
        await asyncio.sleep(0.5)  # the window opens once the event is processed
        for i in range(20):
            body = json.dumps({"channel": "whatsapp", "to": customer, "type": "text",
                               "text": f"reply {i}"}).encode()
            status, answer = _post(f"{proc.url}/v1/messages", body, auth)
            assert status == 202
            ids.append(answer["id"])
        proc.kill()  # accepted, not sent (connection refused; retries are scheduled in the outbox)
        async with GraphSimulator(port=dead_port) as sim:  # "Meta" is reachable now
            proc.start()
            deadline = time.monotonic() + 20
            while len(sim.accepted) < 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything sent twice would show up now
            texts = sorted(m.body["text"]["body"] for m in sim.accepted)
    finally:
        proc.kill()
    assert texts == sorted(f"reply {i}" for i in range(20)), "lost or duplicated sends"
    assert {m.body["biz_opaque_callback_data"] for m in sim.accepted} == set(ids)


# -- killed during the call: sending -> uncertain -> reconcile -------------------------------------

MID_CALL = CONFIG.replace("pair_burst = 45", "pair_burst = 45\nsend_timeout = 10").replace(
    "reconcile_seconds = 1", "reconcile_seconds = 3")


async def _killed_mid_call(tmp_path, session):
    """A gateway killed (SIGKILL) while Meta holds its answer; restarted. Returns the process,
    the simulator (started), the record id and the message Meta accepted."""
    import sqlite3

    sim = await GraphSimulator().start()
    proc = GatewayProcess(tmp_path, MID_CALL.format(token=TOKEN, secret=SECRET, wa=WA,
                                                    url=sim.url))
    await asyncio.to_thread(proc.start)
    inbound = json.loads(fixture_bytes("whatsapp/text.json"))
    inbound["entry"][0]["changes"][0]["value"]["messages"][0]["timestamp"] = str(int(time.time()))
    raw = json.dumps(inbound).encode()
    async with session.post(f"{proc.url}/webhooks/whatsapp", data=raw,
                            headers=sign_headers(SECRET, raw)) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.5)  # the window opens once the event is processed
    sim.delay_next(WA, 60.0)  # Meta accepts the message and sits on the answer
    async with session.post(f"{proc.url}/v1/messages", headers=AUTH, json={
            "channel": "whatsapp", "to": "15550001234", "type": "text", "text": "once"}) as resp:
        assert resp.status == 202
        record_id = (await resp.json())["id"]
    for _ in range(250):
        if sim.accepted:
            break
        await asyncio.sleep(0.02)
    (accepted,) = sim.accepted
    proc.kill()  # mid-call: the answer never came back
    db = proc.data_dir / "outbox.db"

    def state() -> str:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT state FROM outbox WHERE id = ?", (record_id,)).fetchone()[0]

    assert state() == "sending"
    await asyncio.to_thread(proc.start)
    assert state() == "uncertain"
    assert "outbox_uncertain_after_restart" in proc.log()
    return proc, sim, record_id, accepted


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _record(session, proc, record_id: str) -> dict:
    async with session.get(f"{proc.url}/v1/messages/{record_id}", headers=AUTH) as resp:
        return await resp.json()


async def test_killed_mid_call_the_status_webhook_reconciles_without_a_second_send(tmp_path):
    import aiohttp

    from gateway.testing.simulator import MetaSimulator

    async with aiohttp.ClientSession() as session:
        proc, sim, record_id, accepted = await _killed_mid_call(tmp_path, session)
        try:
            meta = MetaSimulator(proc.url, app_secret=SECRET, graph=False)
            async with meta:
                status = meta.whatsapp_status(accepted.message_id, "sent", accepted.to,
                                              time.time(), phone_number_id=WA,
                                              callback_data=record_id)
                assert (await meta.deliver("whatsapp", status)).ok
            record = {}
            for _ in range(100):
                record = await _record(session, proc, record_id)
                if record["status"] == "sent":
                    break
                await asyncio.sleep(0.05)
            assert record["status"] == "sent"
            assert record["provider_message_id"] == accepted.message_id
            await asyncio.sleep(4.5)  # past reconcile_seconds (3): anything resent shows now
            assert len(sim.accepted) == 1, "exactly one send at Meta"
            assert len([r for r in sim.requests if r["method"] == "POST"]) == 1
        finally:
            proc.kill()
            await sim.stop()


async def test_killed_mid_call_without_a_webhook_it_is_sent_again_after_reconcile(tmp_path):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        proc, sim, record_id, accepted = await _killed_mid_call(tmp_path, session)
        restarted = time.time()
        try:
            record = {}
            for _ in range(200):
                record = await _record(session, proc, record_id)
                if record["status"] == "sent":
                    break
                await asyncio.sleep(0.05)
            assert record["status"] == "sent"
            first, second = sim.accepted
            assert second.at - restarted >= 2.5, "it waited reconcile_seconds for a webhook"
            assert second.body == first.body  # the same message, the same callback data
            assert record["provider_message_id"] == second.message_id
        finally:
            proc.kill()
            await sim.stop()
