"""A plugin that misbehaves while the gateway starts, serves or stops is named in one line, and
never costs the data: what had started is closed again, and a shutdown always drains and closes.

``start()`` of sinks and channels, and the lifecycle hooks ``register_routes``,
``gateway_started`` and ``gateway_stopping``, as ``gateway serve`` runs them (the main port's
runner, in-process), and ``gateway serve`` itself for a real backend that cannot be reached.
"""

from __future__ import annotations

import asyncio
import types

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway import Channel, PluginError, Sink, hookimpl, keys, plugins
from gateway import config as gwconfig
from gateway.app import create_app
from gateway.config import SinkConfig
from gateway.server import main_runner
from gateway.testing import free_port
from tests.conftest import CHANNELS_TOML, fixture_bytes
from tests.test_plugins import env, run_cli

PLUGIN = "gateway_misbehaving_plugin"


def plugin(**hooks) -> types.SimpleNamespace:
    """A throwaway plugin named :data:`PLUGIN` implementing ``hooks`` (name -> function)."""
    return types.SimpleNamespace(__name__=PLUGIN,
                                 **{name: hookimpl(fn) for name, fn in hooks.items()})


def boom(message: str):
    def raises():
        raise RuntimeError(message)

    return raises


def load(tmp_path, text: str = "") -> gwconfig.GatewayConfig:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\nshutdown_timeout = 5\n'
                    f"{CHANNELS_TOML}{text}")
    return gwconfig.load(str(path), environ={})


class Recording(Sink):
    """Remembers what it was given; ``start`` raises ``fail`` when set."""

    def __init__(self, name: str, fail: BaseException | None = None) -> None:
        super().__init__(SinkConfig())
        self.name = name
        self.fail = fail
        self.started = self.closed = False
        self.records: list = []

    async def start(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.started = True

    async def write(self, records) -> None:
        self.records += records

    async def close(self) -> None:
        self.closed = True


class Flaky(Channel):
    name = "flaky"

    def __init__(self) -> None:
        super().__init__(app_secret="s", verify_token=None)

    def check_envelope(self, body: bytes) -> None:
        pass

    def normalise(self, body: bytes) -> list:
        return []

    async def start(self) -> None:
        raise ConnectionRefusedError(111, "Connection refused")


async def failed_start(app: web.Application) -> PluginError:
    """Start ``app`` as ``gateway serve`` does, expecting a PluginError; clean up as it does."""
    runner = main_runner(app)
    try:
        with pytest.raises(PluginError) as err:
            await runner.setup()
    finally:
        await runner.cleanup()
    return err.value


# -- start() of sinks and channels ----------------------------------------------------------------

async def test_a_sink_that_fails_to_start_is_named_and_what_started_is_closed(tmp_path):
    early = Recording("early")  # sinks start by name: this one first
    failing = Recording("sf", fail=RuntimeError("cannot connect to backend"))
    app = create_app(load(tmp_path), pm=plugins.manager(
        extra=[plugin(register_sinks=lambda: [early, failing])]))
    error = await failed_start(app)
    assert error.plugin == PLUGIN
    assert "sink 'sf' failed to start: RuntimeError('cannot connect to backend')" in str(error)
    assert early.started and early.closed
    assert not failing.closed  # never started: nothing to close
    assert not await app[keys.JOURNAL].ping()  # the journal is closed again


async def test_a_channel_that_fails_to_start_is_named_and_the_journal_closed(tmp_path):
    app = create_app(load(tmp_path), pm=plugins.manager(
        extra=[plugin(register_channels=lambda: [Flaky()])]))
    error = await failed_start(app)
    assert error.plugin == PLUGIN
    assert "channel 'flaky' failed to start: ConnectionRefusedError(111" in str(error)
    assert not await app[keys.JOURNAL].ping()


def test_serve_with_a_firestore_it_cannot_authenticate_to_is_one_line(tmp_path):
    """Firestore's ``start`` refuses a credentials file that is no service account key."""
    pytest.importorskip("firebase_admin")
    credentials = tmp_path / "credentials.json"
    credentials.write_text('{"type": "service_account"}')
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                    f'metrics_port = {free_port()}\ndata_dir = "{tmp_path / "data"}"\n'
                    f'{CHANNELS_TOML}[sinks.firestore]\nproject_id = "p"\n'
                    f'credentials = "{credentials}"\n')
    environ = {k: v for k, v in env().items() if k != "FIRESTORE_EMULATOR_HOST"}
    result = run_cli("serve", "--config", str(path), cwd=tmp_path, environ=environ)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("gateway: ")]
    assert line.startswith("gateway: plugin 'sinks.firestore': sink 'firestore' failed to start:")
    assert "certificate credential" in line


# -- register_routes ------------------------------------------------------------------------------

async def hello(request: web.Request) -> web.Response:
    return web.Response(text="plugin")


@pytest.mark.parametrize(("returns", "says"), [
    (boom("routes boom"), "register_routes failed: RuntimeError('routes boom')"),
    (lambda: "junk", "register_routes returned 'str', not a list of aiohttp route definitions"),
    (lambda: [object()], "register_routes returned a 'object', not an aiohttp route definition"),
    (lambda: [web.get("no-slash", hello)], "register_routes returned a route aiohttp refuses"),
])
def test_register_routes_that_raises_or_returns_junk_is_named(tmp_path, returns, says):
    config = load(tmp_path)
    pm = plugins.manager(extra=[plugin(register_routes=returns)])
    with pytest.raises(PluginError) as err:
        create_app(config, pm=pm)
    assert err.value.plugin == PLUGIN and says in str(err.value)
    assert [str(e) for e in plugins.check(pm, config)] == [str(err.value)]  # check-config too


@pytest.mark.parametrize("path", ["/v1/evil", "/v1", "/webhooks/whatsapp", "/healthz", "/readyz",
                                  "/metrics", "/{tail:.*}", "/v{version}/messages", "/v%31/evil"])
def test_a_route_on_a_path_the_core_reserves_is_refused(tmp_path, path):
    config = load(tmp_path)
    pm = plugins.manager(extra=[plugin(register_routes=lambda: [web.get(path, hello)])])
    with pytest.raises(PluginError) as err:
        create_app(config, pm=pm)
    assert err.value.plugin == PLUGIN
    assert f"returned a route for {path!r}" in str(err.value)
    assert [str(e) for e in plugins.check(pm, config)] == [str(err.value)]


async def test_a_route_elsewhere_is_served(gateway):
    routes = [web.get("/eventlog/sinks", hello), web.get("/eventlog/{id}", hello),
              web.get("/v1x", hello), web.get("/webhooksinfo", hello)]
    gw = await gateway(extra_plugins=[plugin(register_routes=lambda: routes)])
    for path in ("/eventlog/sinks", "/eventlog/7", "/v1x", "/webhooksinfo"):
        status, body, _ = await gw.get(path)
        assert (status, body) == (200, "plugin"), path


# -- gateway_started and gateway_stopping ---------------------------------------------------------

@pytest.mark.parametrize(("started", "says"), [
    (boom("started hook boom"), "gateway_started failed: RuntimeError('started hook boom')"),
    (lambda: asyncio.sleep(0), "gateway_started must be a plain function (def, not async def)"),
])
async def test_gateway_started_that_fails_stops_the_start_and_closes_what_started(
        tmp_path, started, says):
    sink = Recording("rec")
    app = create_app(load(tmp_path), pm=plugins.manager(
        extra=[plugin(register_sinks=lambda: [sink], gateway_started=started)]))
    error = await failed_start(app)
    assert error.plugin == PLUGIN and says in str(error)
    assert sink.started and sink.closed
    assert not await app[keys.JOURNAL].ping()
    assert not app[keys.READY]["ready"]


@pytest.mark.parametrize("hook", ["gateway_started", "gateway_stopping", "register_routes"])
def test_an_async_lifecycle_hook_is_refused_when_the_plugins_load(hook):
    async def implementation():
        pass

    with pytest.raises(PluginError) as err:
        plugins.manager(extra=[plugin(**{hook: implementation})])
    assert err.value.plugin == PLUGIN
    assert f"{hook} must be a plain function (def, not async def)" in str(err.value)


async def test_gateway_stopping_that_raises_is_logged_and_the_shutdown_still_drains(gateway):
    """The sink's write waits until shutdown has begun: that it arrives proves the drain ran."""
    stopping = asyncio.Event()

    class Gated(Recording):
        async def write(self, records) -> None:
            await stopping.wait()
            self.records += records

    def gateway_stopping():
        stopping.set()
        raise RuntimeError("stopping hook boom")

    sink = Gated("gated")
    gw = await gateway(extra_plugins=[plugin(register_sinks=lambda: [sink],
                                             gateway_stopping=gateway_stopping)])
    journal = gw.app[keys.JOURNAL]
    status, _ = await gw.post("whatsapp", fixture_bytes("whatsapp/text.json"))
    assert status == 200
    with capture_logs() as logs:
        await gw.server.close()
    [failure] = [e for e in logs if e["event"] == "plugin_hook_failed"]
    assert (failure["hook"], failure["plugin"]) == ("gateway_stopping", PLUGIN)
    assert "stopping hook boom" in failure["error"]
    assert [r.event.kind for r in sink.records] == ["message"]  # drained
    assert sink.closed
    assert not await journal.ping()
