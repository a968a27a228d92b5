"""A gateway whose channels send to a real GraphSimulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from gateway.testing.graph import GraphSimulator
from tests.conftest import SECRET, fixture_bytes

WA = "100000000000001"
IG = "17840000000000001"
TOKEN = "api-token"


def channels_toml(url: str, extra_wa: str = "", outbound: str = "") -> str:
    return f"""
[channels.whatsapp]
app_secret = "{SECRET}"
access_token = "EAAB-test"
phone_number_id = "{WA}"
graph_base_url = "{url}"
{extra_wa}
[channels.instagram]
app_secret = "{SECRET}"
access_token = "IGAA-test"
page_id = "{IG}"
graph_base_url = "{url}"
[outbound]
backoff_initial = 0.05
backoff_max = 0.2
reconcile_seconds = 0.5
{outbound}
"""


class Outbound:
    def __init__(self, gw, sim: GraphSimulator) -> None:
        self.gw, self.sim = gw, sim
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    async def send(self, body: dict, headers: dict | None = None) -> tuple[int, dict]:
        async with self.gw.session.post(f"{self.gw.url}/v1/messages", json=body,
                                        headers=self.auth if headers is None else headers) as r:
            return r.status, await r.json()

    async def status(self, record_id: str) -> dict:
        async with self.gw.session.get(f"{self.gw.url}/v1/messages/{record_id}",
                                       headers=self.auth) as r:
            return await r.json()

    async def wait(self, record_id: str, *states: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await self.status(record_id)
            if found.get("status") in states:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"{record_id} never reached {states}: {found}")

    async def inbound(self, channel: str, customer: str, text: str = "hi", mid: str | None = None,
                      at: float | None = None) -> None:
        """A fresh customer message (opens the service window)."""
        ts = int(at or time.time())
        if channel == "whatsapp":
            body = json.loads(fixture_bytes("whatsapp/text.json"))
            value = body["entry"][0]["changes"][0]["value"]
            value["contacts"][0]["wa_id"] = customer
            message = value["messages"][0]
            message.update({"from": customer, "id": mid or f"wamid.IN.{customer}.{ts}.{text}",
                            "timestamp": str(ts), "text": {"body": text}})
        else:
            body = json.loads(fixture_bytes("instagram/text.json"))
            item = body["entry"][0]["messaging"][0]
            item["sender"]["id"] = customer
            item["timestamp"] = ts * 1000
            item["message"] = {"mid": mid or f"aWdf.IN.{customer}.{ts}.{text}", "text": text}
        status, _ = await self.gw.post(channel, json.dumps(body).encode())
        assert status == 200
        await self.gw.settle()

    async def webhook(self, channel: str, body: dict) -> None:
        status, _ = await self.gw.post(channel, json.dumps(body).encode())
        assert status == 200
        await self.gw.settle()


@pytest.fixture
async def outbound(gateway):
    """Factory: ``await outbound(extra_wa="", outbound="", mps=80)`` → Outbound helper."""
    sims: list[GraphSimulator] = []

    async def start(extra_wa: str = "", outbound: str = "", mps: float = 80.0,
                    pair_limit: int | None = None) -> Outbound:
        sim = await GraphSimulator(mps=mps, pair_limit=pair_limit).start()
        sims.append(sim)
        gw = await gateway(extra=f'api_token = "{TOKEN}"',
                           channels=channels_toml(sim.url, extra_wa, outbound))
        return Outbound(gw, sim)

    yield start
    for sim in sims:
        await sim.stop()
