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
