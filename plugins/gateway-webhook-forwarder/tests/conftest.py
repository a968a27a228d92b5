"""Real servers on 127.0.0.1: a webhook receiver, and an in-process gateway that forwards to it.

The gateway runs with one throwaway channel (``testchan``), so that these tests depend only on the
gateway's public plugin API, not on the WhatsApp or Instagram payload formats.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from gateway import BadPayload, Channel, Message, events, hookimpl, keys, plugins
from gateway import config as gwconfig
from gateway.app import create_app
from gateway.testing import sign_headers

APP_SECRET = "channel-app-secret"
FORWARD_SECRET = "forward-signing-secret"


class SampleChannel(Channel):
    """``{"object": "test", "messages": [{"id", "from", "text"}]}`` → one Message per item."""

    name = "testchan"

    def check_envelope(self, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise BadPayload("not JSON") from exc
        if not isinstance(payload, dict) or payload.get("object") != "test":
            raise BadPayload("not a test envelope")

    def normalise(self, body: bytes) -> list[events.Event]:
        self.check_envelope(body)
        return [self._message(item) for item in json.loads(body).get("messages", [])]

    def _message(self, item: dict) -> Message:
        customer = str(item["from"])
        return Message(
            schema=events.SCHEMA_VERSION, id=events.event_id(self.name, item["id"]),
            channel=self.name, direction="inbound", account_id="acct",
            conversation_id=events.conversation_id(self.name, "acct", customer),
            sender=events.Party(id=customer), recipient=events.Party(id="acct"),
            timestamp=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC), message_id=item["id"],
            type="text", text=item.get("text", ""))


class SampleChannelPlugin:
    @hookimpl
    def register_channels(self, config):
        return [SampleChannel(app_secret=APP_SECRET, verify_token=None)]


@dataclass
class Received:
    status: int
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1 answering from a script, then ``default``."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    default: int = 200
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    async def handle(self, request: web.Request) -> web.Response:
        status, headers = self.script.pop(0) if self.script else (self.default, {})
        if self.delay:
            await asyncio.sleep(self.delay)
        self.requests.append(Received(status, dict(request.headers), await request.read(),
                                      time.monotonic()))
        return web.Response(status=status, headers=headers, text="nope" if status >= 300 else "ok")

    def delivered_ids(self) -> list[str]:
        """Event ids of every request answered 2xx, in arrival order."""
        return [i for r in self.requests if r.status < 300
                for i in r.headers["X-Gateway-Event-Ids"].split(",")]

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.requests)} of {count} requests arrived")
            await asyncio.sleep(0.02)
        return self.requests


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    yield rec
    await rec.server.close()


class Gateway:
    def __init__(self, app, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.app, self.server, self.session = app, server, session

    async def post(self, *messages: dict) -> int:
        body = json.dumps({"object": "test", "messages": list(messages)}).encode()
        url = str(self.server.make_url("/webhooks/testchan"))
        async with self.session.post(url, data=body,
                                     headers=sign_headers(APP_SECRET, body)) as resp:
            return resp.status

    async def dead_letters(self, want: int, timeout: float = 15.0) -> list:
        deadline = time.monotonic() + timeout
        while True:
            letters = await self.app[keys.JOURNAL].dead_letters("forward")
            if len(letters) >= want or time.monotonic() > deadline:
                return letters
            await asyncio.sleep(0.05)


@pytest.fixture
async def gateway(tmp_path, receiver):
    """Factory: ``await gateway(extra_forward_toml)`` → an in-process gateway forwarding to
    ``receiver`` through the installed ``forward`` entry point."""
    started: list[tuple[TestServer, aiohttp.ClientSession]] = []

    async def start(extra: str = "", url: str | None = None) -> Gateway:
        path = tmp_path / "gateway.toml"
        path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nshutdown_timeout = 5\n'
                        f'[sinks.forward]\nurl = "{url or receiver.url}"\n'
                        f'secret = "{FORWARD_SECRET}"\n{extra}\n')
        config = gwconfig.load(str(path), environ={})
        app = create_app(config, pm=plugins.manager(extra=[SampleChannelPlugin()]))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        session = aiohttp.ClientSession()
        started.append((server, session))
        return Gateway(app, server, session)

    yield start
    for server, session in reversed(started):
        await session.close()
        await server.close()
