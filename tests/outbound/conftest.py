"""A gateway whose channels send to a real GraphSimulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
import tomllib

import pytest

from gateway import keys
from gateway.testing.graph import GraphSimulator
from tests.conftest import SECRET, fixture_bytes

WA = "100000000000001"
IG = "17840000000000001"
TOKEN = "api-token"


def channels_toml(url: str, extra_wa: str = "", outbound: str = "",
                  extra_ig: str = "") -> str:
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
{extra_ig}
[outbound]
{outbound_table(outbound)}
"""


# Fast retries and throttle backoff for tests; a test's ``outbound`` text overrides any of them.
OUTBOUND_DEFAULTS = {"backoff_initial": 0.05, "backoff_max": 0.2, "reconcile_seconds": 0.5,
                     "throttle_backoff_initial": 0.05, "throttle_backoff_long": 0.1,
                     "throttle_backoff_max": 1.0}


def outbound_table(extra: str) -> str:
    table = {**OUTBOUND_DEFAULTS, **tomllib.loads(extra)}
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in table.items())


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

    async def open_windows(self, channel: str, customers: list[str]) -> None:
        """One webhook carrying a fresh message from each customer (opens every window)."""
        ts = int(time.time())
        if channel == "whatsapp":
            body = json.loads(fixture_bytes("whatsapp/text.json"))
            value = body["entry"][0]["changes"][0]["value"]
            value["contacts"] = [{"profile": {"name": "C"}, "wa_id": c} for c in customers]
            value["messages"] = [{"from": c, "id": f"wamid.IN.{c}.{ts}", "timestamp": str(ts),
                                  "type": "text", "text": {"body": "hi"}} for c in customers]
        else:
            body = json.loads(fixture_bytes("instagram/text.json"))
            entry = body["entry"][0]
            item = entry["messaging"][0]
            entry["messaging"] = [{**item, "sender": {"id": c}, "timestamp": ts * 1000,
                                   "message": {"mid": f"aWdf.IN.{c}.{ts}", "text": "hi"}}
                                  for c in customers]
        await self.webhook(channel, body)

    @property
    def service(self):
        return self.gw.app[keys.OUTBOUND]

    def metric(self, name: str, **labels: str) -> float | None:
        return self.gw.app[keys.METRICS].registry.get_sample_value(name, labels)

    async def webhook(self, channel: str, body: dict) -> None:
        status, _ = await self.gw.post(channel, json.dumps(body).encode())
        assert status == 200
        await self.gw.settle()


@pytest.fixture
async def outbound(gateway):
    """Factory: ``await outbound(extra_wa="", outbound="", mps=80, extra_ig="", **sim_options)``
    → Outbound helper (``sim_options`` go to the GraphSimulator)."""
    sims: list[GraphSimulator] = []

    async def start(extra_wa: str = "", outbound: str = "", mps: float = 80.0,
                    pair_limit: int | None = None, extra_ig: str = "", **sim_options) -> Outbound:
        sim = await GraphSimulator(mps=mps, pair_limit=pair_limit, **sim_options).start()
        sims.append(sim)
        gw = await gateway(extra=f'api_token = "{TOKEN}"',
                           channels=channels_toml(sim.url, extra_wa, outbound, extra_ig))
        return Outbound(gw, sim)

    yield start
    for sim in sims:
        await sim.stop()
