"""The example distribution ``plugins/gateway-webhook-forwarder``, as an operator meets it.

``make install`` installs every ``plugins/*/`` editable; the root ``testpaths`` are ``tests`` only,
so the plugin's own suite runs from here, in a subprocess with the plugin's own pytest settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.testing import GatewayProcess
from gateway.testing.simulator import MetaSimulator
from tests.conftest import CHANNELS_TOML, SECRET

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "gateway-webhook-forwarder"
FORWARD_SECRET = "forwarder-test-secret-9d2e"


def test_the_plugins_own_test_suite_passes():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=PLUGIN, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_gateway_plugins_lists_forward_from_its_distribution():
    result = subprocess.run([sys.executable, "-m", "gateway", "plugins"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["sink", "forward", "gateway_webhook_forwarder", "gateway-webhook-forwarder",
            "0.1.0"] in rows, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


async def test_gateway_process_forwards_a_signed_webhook(tmp_path):
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((dict(request.headers), await request.read()))
        return web.Response(status=204)

    receiver_app = web.Application()
    receiver_app.router.add_post("/hook", hook)
    receiver = TestServer(receiver_app, host="127.0.0.1")
    await receiver.start_server()
    gw = GatewayProcess(tmp_path, f"""
[server]
host = "127.0.0.1"
port = {{port}}
metrics_port = {{metrics_port}}
data_dir = "{{data_dir}}"
shutdown_timeout = 5
{CHANNELS_TOML}
[sinks.forward]
url = "{receiver.make_url('/hook')}"
secret = {{{{ env = "FORWARD_SECRET_FOR_TEST" }}}}
""", env={"FORWARD_SECRET_FOR_TEST": FORWARD_SECRET})
    try:
        await asyncio.to_thread(gw.start)
        async with MetaSimulator(gw.url, app_secret=SECRET, graph=False) as sim:
            delivery = await sim.customer_says("whatsapp", "15551234567", "Hola, ¿dónde está?",
                                               name="Ana")
        assert delivery.status == 200, delivery
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert received, f"nothing forwarded; gateway log:\n{gw.log()}"
    finally:
        code = await asyncio.to_thread(gw.stop)
        await receiver.close()
    assert code == 0, gw.log()

    [(headers, body)] = received
    parts = dict(p.split("=", 1) for p in headers["X-Gateway-Signature"].split(","))
    want = hmac.new(FORWARD_SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(parts["v1"], want.hexdigest())
    assert headers["Content-Type"] == "application/x-ndjson"
    [event] = [json.loads(line) for line in body.splitlines()]
    assert headers["X-Gateway-Event-Ids"] == event["id"]
    assert (event["kind"], event["channel"], event["direction"], event["type"]) == (
        "message", "whatsapp", "inbound", "text")
    assert (event["message_id"], event["text"]) == (delivery.message_id, "Hola, ¿dónde está?")
    assert event["sender"]["id"] == "15551234567"
    assert FORWARD_SECRET not in gw.log()
