"""Shared fixtures: a real gateway on 127.0.0.1 (in-process), fixtures, signing."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from gateway import config as gwconfig
from gateway import keys, plugins
from gateway.app import create_app
from gateway.listener import Listener
from gateway.server import main_runner
from gateway.testing import sign_headers

DATA = Path(__file__).parent / "data"
SECRET = "test-app-secret"
VERIFY = "test-verify-token"
CHANNELS_TOML = f"""
[channels.whatsapp]
app_secret = "{SECRET}"
verify_token = "{VERIFY}"
[channels.instagram]
app_secret = "{SECRET}"
verify_token = "{VERIFY}"
"""
SINKS_TOML = """
[sinks.jsonl]
[sinks.storage]
"""


def fixture_bytes(name: str) -> bytes:
    """A webhook fixture's exact bytes, e.g. ``whatsapp/text.json``."""
    return (DATA / name).read_bytes()


class Served:
    """An app served on 127.0.0.1 as ``gateway serve`` serves its main port (gateway.listener)."""

    def __init__(self, app: web.Application, fast: bool = True) -> None:
        self.app = app
        self.fast = fast
        self.port = 0
        self._runner = main_runner(app)
        self._listener: Listener | None = None

    async def start_server(self) -> None:
        await self._runner.setup()
        self._listener = Listener(self._runner, fast=self.fast)
        self.port = await self._listener.start("127.0.0.1", 0)

    def make_url(self, path: str) -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def close(self) -> None:
        """Graceful, as on SIGTERM: answer what is in flight, drain, close (once)."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        await listener.stop(5.0)
        await self._runner.cleanup()


class RunningGateway:
    """An in-process gateway served on a real 127.0.0.1 port, with helpers for tests."""

    def __init__(self, app, server: Served, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.server = server
        self.session = session
        self.config = app[keys.CONFIG]
        self.data_dir = Path(self.config.server.data_dir)

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    async def post(self, channel: str, body: bytes, secret: str | None = SECRET,
                   headers: dict | None = None) -> tuple[int, dict | str]:
        hdrs = sign_headers(secret, body) if secret else {"Content-Type": "application/json"}
        hdrs.update(headers or {})
        async with self.session.post(f"{self.url}/webhooks/{channel}", data=body,
                                     headers=hdrs) as resp:
            return resp.status, await _body(resp)

    async def get(self, path: str, **kw) -> tuple[int, dict | str, aiohttp.ClientResponse]:
        async with self.session.get(self.url + path, **kw) as resp:
            return resp.status, await _body(resp), resp

    async def settle(self, timeout: float = 15.0) -> None:
        """Wait until everything journaled is processed and every sink caught up."""
        journal = self.app[keys.JOURNAL]
        dispatcher = self.app[keys.DISPATCHER]
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            self.app[keys.PROCESSOR].wake.set()
            if journal.pending == 0 and await dispatcher.caught_up():
                await asyncio.sleep(0.05)
                if journal.pending == 0 and await dispatcher.caught_up():
                    return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"not settled: pending={journal.pending}")

    def jsonl(self) -> list[dict]:
        path = self.data_dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_bytes().splitlines()]

    async def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        return await self.app[keys.SINKS]["storage"].query(query, args)


async def _body(resp: aiohttp.ClientResponse) -> dict | str:
    text = await resp.text()
    try:
        return json.loads(text)
    except ValueError:
        return text


@pytest.fixture
def intake_path() -> str:
    """Which path answers webhook POSTs: "fast" (gateway.listener, the default) or "aiohttp".
    A test module overrides this fixture to run its tests on both."""
    return "fast"


@pytest.fixture
async def gateway(tmp_path, intake_path):
    """Factory: ``await gateway(extra_toml, plugins=[...], sinks=SINKS_TOML)`` → RunningGateway."""
    started: list[tuple[Served, aiohttp.ClientSession]] = []

    async def start(extra: str = "", extra_plugins: list | None = None,
                    sinks: str = SINKS_TOML, channels: str = CHANNELS_TOML) -> RunningGateway:
        data_dir = tmp_path / "data"
        text = (f'[server]\ndata_dir = "{data_dir}"\nshutdown_timeout = 5\n'
                f'{extra}\n{channels}\n{sinks}')
        path = tmp_path / "gateway.toml"
        path.write_text(text)
        tomllib.loads(text)
        config = gwconfig.load(str(path), environ={})
        pm = plugins.manager(extra=extra_plugins)
        app = create_app(config, pm=pm)
        server = Served(app, fast=intake_path == "fast")
        await server.start_server()
        session = aiohttp.ClientSession()
        started.append((server, session))
        return RunningGateway(app, server, session)

    yield start
    for server, session in reversed(started):
        await session.close()
        await server.close()


class ThreadedGateway:
    """A gateway serving from its own thread and event loop, for synchronous tests (hypothesis)."""

    def __init__(self, config_path: Path, extra_plugins: list | None = None) -> None:
        import threading

        from gateway.testing import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._config_path = config_path
        self._plugins = extra_plugins
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.app = None
        self.error: BaseException | None = None

    def start(self) -> ThreadedGateway:
        self._thread.start()
        self._ready.wait(30)
        if self.error:
            raise self.error
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            config = gwconfig.load(str(self._config_path), environ={})
            self.app = create_app(config, pm=plugins.manager(extra=self._plugins))
            runner = main_runner(self.app)
            await runner.setup()
            listener = Listener(runner)
            await listener.start("127.0.0.1", self.port)
            self.loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()
            await listener.stop(5.0)
            await runner.cleanup()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self.error = exc
            self._ready.set()

    def call(self, coro):
        """Run a coroutine on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def settle(self, timeout: float = 15.0) -> None:
        import time

        journal = self.app[keys.JOURNAL]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if journal.pending == 0 and self.call(self.app[keys.DISPATCHER].caught_up()):
                return
            time.sleep(0.05)
        raise TimeoutError("not settled")

    def stop(self) -> None:
        if self.app is not None and not self.error:
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)


@pytest.fixture
def threaded_gateway(tmp_path):
    """A gateway with both channels, jsonl and storage, served from a background thread."""
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nshutdown_timeout = 5\n'
                    f"{CHANNELS_TOML}\n{SINKS_TOML}")
    gw = ThreadedGateway(path).start()
    yield gw
    gw.stop()
