"""Plugin loading fails loudly and by name; ``gateway check-config`` names every bad key.

Throwaway distributions are real ones: a ``*.dist-info`` directory with an ``entry_points.txt`` in
a temporary directory on ``sys.path`` (or ``PYTHONPATH`` for a subprocess), which is all
``importlib.metadata`` needs to report an installed plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gateway import Channel, PluginError, Sink, cli, hookimpl, plugins
from gateway import config as gwconfig
from gateway.config import SinkConfig, section
from gateway.testing import free_port
from tests.conftest import CHANNELS_TOML

SECRET_VARS = ("META_APP_SECRET", "WHATSAPP_APP_SECRET", "INSTAGRAM_APP_SECRET",
               "WHATSAPP_VERIFY_TOKEN", "INSTAGRAM_VERIFY_TOKEN", "WHATSAPP_ACCESS_TOKEN",
               "INSTAGRAM_ACCESS_TOKEN", "GATEWAY_API_TOKEN", "GATEWAY_REDIS_URL",
               "GATEWAY_DATA_DIR", "OPENAI_API_KEY")


def make_distribution(root: Path, dist: str, group: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> Path:
    """Write modules and a ``<dist>-0.1.dist-info`` declaring ``entry_points`` under ``root``."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}")
    return root


def install(tmp_path: Path, monkeypatch, dist: str, entry: str, module: str, source: str,
            group: str = "gateway.sinks", site: str = "site") -> Path:
    """An installed distribution ``dist`` declaring ``entry = module`` in ``group``, with the
    module's ``source`` beside it, importable for this test; its site directory."""
    root = tmp_path / site
    root.mkdir()
    make_distribution(root, dist, group, {entry: module}, {module: source})
    monkeypatch.syspath_prepend(str(root))
    return root


def env(**extra: str) -> dict[str, str]:
    """The current environment without any gateway secret, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    return {**base, **extra}


def run_cli(*args: str, cwd: Path, environ: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m gateway ARGS`` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, timeout=timeout,
                          env=environ or env(), capture_output=True, text=True)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n' + text)
    return str(path)


# -- plugins that fail to load -------------------------------------------------------------------

@pytest.fixture
def broken_distribution(tmp_path, monkeypatch):
    """An installed ``gateway-broken-plugin`` whose sink module raises on import."""
    return install(tmp_path, monkeypatch, "gateway-broken-plugin", "broken", "gateway_broken_sink",
                   "raise RuntimeError('broken at import time')\n")


def test_plugin_that_fails_to_import_is_reported_by_name(broken_distribution):
    with pytest.raises(PluginError) as err:
        plugins.manager()
    assert err.value.plugin == "sinks.broken"
    assert "gateway_broken_sink" in str(err.value)
    assert "broken at import time" in str(err.value)


def test_gateway_plugins_lists_the_broken_plugin_and_fails(broken_distribution, capsys):
    assert cli.main(["plugins"]) == cli.EXIT_CONFIG
    out = capsys.readouterr().out
    row = next(line.split() for line in out.splitlines() if " broken " in line)
    assert row == ["sink", "broken", "gateway_broken_sink", "gateway-broken-plugin", "0.1"]
    assert "loading: error: plugin 'sinks.broken'" in out


def test_serve_refuses_to_start_naming_the_broken_plugin(broken_distribution, tmp_path):
    path = write_config(tmp_path, f"port = {free_port()}\nmetrics_port = {free_port()}\n"
                        + CHANNELS_TOML)
    result = run_cli("serve", "--config", path, cwd=tmp_path,
                     environ=env(PYTHONPATH=str(broken_distribution)))
    assert result.returncode == 2, result.stderr
    assert "sinks.broken" in result.stderr and "broken at import time" in result.stderr


def test_misspelt_hook_implementation_fails_naming_plugin_and_hook():
    plugin = types.ModuleType("gateway_misspelt_plugin")

    @hookimpl
    def register_sink(config):  # the hook is register_sinks
        return []

    plugin.register_sink = register_sink
    with pytest.raises(PluginError) as err:
        plugins.manager(extra=[plugin])
    assert err.value.plugin == "gateway_misspelt_plugin"
    assert "register_sink" in str(err.value)


def test_misspelt_hook_in_an_installed_plugin_fails_naming_it(tmp_path, monkeypatch):
    source = ("from gateway import hookimpl\n\n"
              "@hookimpl\ndef register_sink(config):\n    return []\n")
    install(tmp_path, monkeypatch, "gateway-misspelt", "misspelt", "gateway_misspelt_sink", source)
    with pytest.raises(PluginError) as err:
        plugins.manager()
    assert "gateway_misspelt_sink" in str(err.value) and "register_sink" in str(err.value)


# -- two plugins, one name -----------------------------------------------------------------------

class NamedSink(Sink):
    def __init__(self, name: str, config: SinkConfig) -> None:
        super().__init__(config)
        self.name = name

    async def write(self, records) -> None:
        pass


class ProvidesSink:
    """A plugin providing a sink called ``name`` when ``[sinks.<name>]`` is present."""

    def __init__(self, name: str) -> None:
        self.sink_name = name

    @hookimpl
    def register_sinks(self, config):
        table = section(config, "sinks", self.sink_name, SinkConfig)
        return [NamedSink(self.sink_name, table)] if table else []


@pytest.mark.parametrize("name", ["dup", "jsonl"])
def test_two_plugins_providing_the_same_sink_fail(tmp_path, name):
    config = gwconfig.load(write_config(tmp_path, f"[sinks.{name}]\n"), environ={})
    extra = [ProvidesSink(name)] if name == "jsonl" else [ProvidesSink(name), ProvidesSink(name)]
    pm = plugins.manager(extra=extra)
    with pytest.raises(PluginError) as err:
        plugins.components(pm, config)
    assert repr(name) in str(err.value)


def test_one_plugin_per_sink_name_is_fine(tmp_path):
    config = gwconfig.load(write_config(tmp_path, "[sinks.dup]\n[sinks.other]\n"), environ={})
    pm = plugins.manager(extra=[ProvidesSink("dup"), ProvidesSink("other")])
    assert sorted(plugins.components(pm, config).sinks) == ["dup", "other"]


# -- check-config --------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["sinks.nosuch", "channels.nosuch"])
def test_table_no_plugin_provides_fails_check_config(tmp_path, table):
    path = write_config(tmp_path, CHANNELS_TOML + f"[{table}]\n")
    result = run_cli("check-config", "--config", path, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{table}: no installed plugin provides" in result.stderr


def test_check_config_names_each_unknown_key(tmp_path):
    path = write_config(tmp_path, "prot = 8080\n[queu]\nbackend = 'sqlite'\n" + CHANNELS_TOML)
    result = run_cli("check-config", "--config", path, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "config error" in line]
    assert errors == ["gateway: config error: server.prot: unknown key",
                      "gateway: config error: queu: unknown key"]


def test_check_config_names_an_unknown_key_in_a_plugin_table(tmp_path):
    path = write_config(tmp_path, CHANNELS_TOML + "[sinks.jsonl]\npth = 'x.jsonl'\n")
    result = run_cli("check-config", "--config", path, cwd=tmp_path)
    assert result.returncode == 2
    assert "sinks.jsonl.pth: unknown key" in result.stderr


def test_check_config_on_embedded_defaults_without_app_secret_fails(tmp_path):
    result = run_cli("check-config", cwd=tmp_path, environ=env(GATEWAY_DATA_DIR=str(tmp_path)))
    assert result.returncode == 2, result.stdout
    assert "channels.whatsapp.app_secret" in result.stderr
    assert "META_APP_SECRET" in result.stderr  # says how to fix it


def test_check_config_on_embedded_defaults_with_app_secret_redacts_it(tmp_path):
    secret = "meta-app-secret-4f1c9a"
    result = run_cli("check-config", cwd=tmp_path,
                     environ=env(META_APP_SECRET=secret, GATEWAY_DATA_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr
    assert "config OK (embedded defaults)" in result.stderr


def test_check_config_redacts_every_secret(tmp_path):
    secrets = {
        "wa_secret": "inline-wa-secret-1", "wa_verify": "inline-wa-verify-2",
        "wa_access": "inline-wa-access-3", "api": "env-api-token-4",
        "redis": "redis-password-5", "openai": "sk-inline-openai-6", "ig": "ig-from-env-7",
    }
    path = write_config(tmp_path, f"""
[queue]
redis_url = "redis://:{secrets['redis']}@127.0.0.1:6379/0"
[channels.whatsapp]
app_secret = "{secrets['wa_secret']}"
verify_token = "{secrets['wa_verify']}"
access_token = "{secrets['wa_access']}"
[channels.instagram]
app_secret = {{ env = "IG_SECRET_FOR_TEST" }}
[sinks.ai]
provider = "rules"
api_key = "{secrets['openai']}"
""")
    result = run_cli("check-config", "--config", path, cwd=tmp_path,
                     environ=env(GATEWAY_API_TOKEN=secrets["api"],
                                 IG_SECRET_FOR_TEST=secrets["ig"]))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert [name for name, value in secrets.items() if value in output] == []
    assert output.count('"***"') >= 6


# -- commands plugins add to the CLI (register_commands) -----------------------------------------

COMMAND_PLUGIN = '''
from gateway import Command, hookimpl


def greet(args):
    print(f"hello {args.who}")
    return 3


def arguments(parser):
    parser.add_argument("--who", default="world")


@hookimpl
def register_commands():
    return [Command("{name}", "say hello", greet, arguments)]
'''


def command_distribution(tmp_path: Path, monkeypatch, name: str) -> Path:
    module = f"gateway_hello_{name}"  # a module of its own per test (imports are cached)
    return install(tmp_path, monkeypatch, "gateway-hello", "hello", module,
                   COMMAND_PLUGIN.replace("{name}", name), site=f"site-{name}")


def test_a_plugin_command_runs_with_its_arguments(tmp_path, monkeypatch, capsys):
    command_distribution(tmp_path, monkeypatch, "hello")
    assert cli.main(["hello", "--who", "plugin"]) == 3
    assert capsys.readouterr().out == "hello plugin\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = [line.split(None, 1) for line in capsys.readouterr().out.splitlines()]
    assert ["hello", "say hello"] in listed


def test_a_plugin_command_may_not_take_a_core_name(tmp_path, monkeypatch, capsys):
    command_distribution(tmp_path, monkeypatch, "plugins")
    with pytest.raises(PluginError, match="'sinks.hello' provides a command 'plugins'"):
        plugins.commands(plugins.manager(), cli.CORE_COMMANDS)
    # the core command still runs, and is the core's; it names the plugin whose commands are lost
    assert cli.main(["plugins"]) == cli.EXIT_CONFIG
    out = capsys.readouterr().out
    assert "KIND" in out
    assert "loading: error: plugin 'sinks.hello' provides a command 'plugins'" in out


def test_two_plugins_with_one_command_name_fail_naming_both():
    from gateway import Command

    twin = types.SimpleNamespace(__name__="twin", register_commands=hookimpl(
        lambda: [Command("firestore", "twin", lambda args: 0)]))
    with pytest.raises(PluginError, match="both provide a command named 'firestore'"):
        plugins.commands(plugins.manager(extra=[twin]), cli.CORE_COMMANDS)


def test_a_broken_plugin_leaves_core_commands_and_explains_plugin_ones(broken_distribution,
                                                                       tmp_path, capsys):
    assert cli.main(["firestore", "indexes"]) == cli.EXIT_CONFIG
    assert "sinks.broken" in capsys.readouterr().err
    path = write_config(tmp_path, CHANNELS_TOML)
    assert cli.main(["check-config", "--config", path]) == cli.EXIT_CONFIG  # the broken sink
    assert "broken at import time" in capsys.readouterr().err


def test_gateway_firestore_indexes_through_the_cli(tmp_path):
    path = write_config(tmp_path, '[sinks.firestore]\nproject_id = "p"\n'
                                  'collection_prefix = "shop_"\n')
    result = run_cli("firestore", "indexes", "--config", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    import json

    spec = json.loads(result.stdout)
    assert {i["collectionGroup"] for i in spec["indexes"]} == {"shop_conversations",
                                                                "shop_messages"}


# -- plugins whose register hooks misbehave ------------------------------------------------------

def _raises(config):
    raise RuntimeError("boom in register_sinks")


@pytest.mark.parametrize(("returns", "says"), [
    (_raises, "register_sinks failed: RuntimeError('boom in register_sinks')"),
    (lambda config: [object()], "register_sinks returned a 'object', not a Sink"),
    (lambda config: NamedSink("one", SinkConfig()), "returned 'NamedSink', not a list of Sink"),
])
def test_a_plugin_whose_register_hook_raises_or_returns_junk_is_named(tmp_path, returns, says):
    plugin = types.SimpleNamespace(__name__="gateway_junk_plugin",
                                   register_sinks=hookimpl(returns))
    config = gwconfig.load(write_config(tmp_path, "[sinks.jsonl]\npth = 'x'\n"), environ={})
    pm = plugins.manager(extra=[plugin])
    with pytest.raises(PluginError) as err:
        plugins.components(pm, config)
    assert err.value.plugin == "gateway_junk_plugin" and says in str(err.value)
    found = [str(e) for e in plugins.check(pm, config)]  # named next to the config errors
    assert "sinks.jsonl.pth: unknown key" in found
    assert any("'gateway_junk_plugin'" in e and says in e for e in found), found


class BareChannel(Channel):
    name = "bare"

    def check_envelope(self, body: bytes) -> None:
        pass

    def normalise(self, body: bytes) -> list:
        return []


def test_a_register_hook_returning_a_channel_as_a_sink_is_named():
    plugin = types.SimpleNamespace(__name__="gateway_mixed_plugin", register_sinks=hookimpl(
        lambda config: [BareChannel(app_secret="s", verify_token=None)]))
    with pytest.raises(PluginError, match="'gateway_mixed_plugin'.*not a Sink"):
        plugins.components(plugins.manager(extra=[plugin]), gwconfig.GatewayConfig())


@pytest.fixture
def raising_distribution(tmp_path, monkeypatch):
    """An installed plugin whose ``register_sinks`` raises."""
    source = ("from gateway import hookimpl\n\n@hookimpl\ndef register_sinks(config):\n"
              "    raise RuntimeError('boom in register_sinks')\n")
    return install(tmp_path, monkeypatch, "gateway-raising", "raising", "gateway_raising_sink",
                   source)


def test_gateway_plugins_and_check_config_name_a_plugin_whose_hook_raises(raising_distribution,
                                                                          tmp_path, capsys):
    assert cli.main(["plugins"]) == cli.EXIT_CONFIG
    out = capsys.readouterr().out
    assert "loading: error: plugin 'sinks.raising': register_sinks failed" in out
    assert cli.main(["check-config", "--config", write_config(tmp_path, CHANNELS_TOML)]) == 2
    err = capsys.readouterr().err
    assert "config error: plugin 'sinks.raising': register_sinks failed" in err
    assert "Traceback" not in err


def test_check_config_masks_url_credentials_and_query_in_plugin_tables(tmp_path):
    path = write_config(tmp_path, CHANNELS_TOML + '[sinks.forward]\n'
                        'url = "https://hook-user:hook-pw-41@crm.example/in?token=tok-42"\n'
                        'secret = "fwd-secret-43"\n')
    result = run_cli("check-config", "--config", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"url": "https://***@crm.example/in?***"' in result.stdout
    for leak in ("hook-user", "hook-pw-41", "tok-42", "fwd-secret-43"):
        assert leak not in result.stdout + result.stderr, leak


# -- components the core cannot use --------------------------------------------------------------

class Nameless(Sink):
    async def write(self, records) -> None:
        pass


class ConfiglessSink(Sink):
    name = "configless"

    def __init__(self) -> None:  # no super().__init__(config): the dispatcher reads sink.config
        pass

    async def write(self, records) -> None:
        pass


class NamelessChannel(BareChannel):
    name = ""


class SecretlessChannel(BareChannel):
    name = "secretless"

    def __init__(self) -> None:  # no super().__init__(...): the intake reads channel.app_secret
        pass


class SlashedChannel(BareChannel):
    name = "a/b"


@pytest.mark.parametrize(("hook", "make", "says"), [
    ("register_sinks", lambda: Nameless(SinkConfig()), "returned a 'Nameless' without a name"),
    ("register_sinks", ConfiglessSink, "sink 'configless' without a SinkConfig `config`"),
    ("register_channels", lambda: NamelessChannel(app_secret="s", verify_token=None),
     "returned a 'NamelessChannel' without a name"),
    ("register_channels", SecretlessChannel,
     "channel 'secretless' without app_secret: its __init__ must call super().__init__("),
    ("register_channels", lambda: SlashedChannel(app_secret="s", verify_token=None),
     "a channel named 'a/b'"),
    ("register_sinks", lambda: NamedSink("outbox", SinkConfig()), "a sink named 'outbox'"),
    ("register_sinks", lambda: NamedSink("normalise:whatsapp", SinkConfig()),
     "a sink named 'normalise:whatsapp'"),
], ids=["sink-nameless", "sink-configless", "channel-nameless", "channel-secretless",
        "channel-slashed", "sink-outbox", "sink-normalise"])
def test_a_component_the_core_cannot_use_is_refused_naming_the_plugin(tmp_path, hook, make, says):
    from gateway.app import create_app

    plugin = types.SimpleNamespace(__name__="gateway_odd_plugin",
                                   **{hook: hookimpl(lambda: [make()])})
    config = gwconfig.load(write_config(tmp_path, CHANNELS_TOML), environ={})
    pm = plugins.manager(extra=[plugin])
    with pytest.raises(PluginError) as err:
        create_app(config, pm=pm)
    assert err.value.plugin == "gateway_odd_plugin" and says in str(err.value)
    assert [str(e) for e in plugins.check(pm, config)] == [str(err.value)]


def test_a_plugin_outbox_is_refused_where_the_core_would_replace_it(tmp_path):
    """With an account to send from, the core's outbound queue is the sink ``outbox``."""
    from gateway.app import create_app

    config = gwconfig.load(write_config(tmp_path, CHANNELS_TOML.replace(
        "[channels.instagram]", 'access_token = "t"\nphone_number_id = "123"\n'
        "[channels.instagram]") + "[sinks.outbox]\n"), environ={})
    with pytest.raises(PluginError, match="'outbox' and names starting 'normalise:' are the "):
        create_app(config, pm=plugins.manager(extra=[ProvidesSink("outbox")]))


# -- two plugins, one name: check-config and gateway plugins say so too --------------------------

@pytest.fixture
def duplicate_distribution(tmp_path, monkeypatch):
    """An installed ``gateway-dupjsonl`` whose sink is named ``jsonl``, like the built-in one."""
    source = ("from gateway import Sink, hookimpl\nfrom gateway.config import SinkConfig\n\n"
              "class S(Sink):\n    name = 'jsonl'\n\n    async def write(self, records):\n"
              "        pass\n\n@hookimpl\ndef register_sinks(config):\n"
              "    return [S(SinkConfig())]\n")
    return install(tmp_path, monkeypatch, "gateway-dupjsonl", "dupjsonl", "gateway_dupjsonl_sink",
                   source)


def test_check_config_and_gateway_plugins_name_two_plugins_providing_one_sink(
        duplicate_distribution, tmp_path, capsys):
    both = ("'sinks.jsonl'", "'sinks.dupjsonl'", "both provide a sink named 'jsonl'")
    path = write_config(tmp_path, CHANNELS_TOML + "[sinks.jsonl]\n")
    assert cli.main(["check-config", "--config", path]) == cli.EXIT_CONFIG
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "both provide" in ln]
    assert line.startswith("gateway: config error: plugins ") and all(w in line for w in both)
    assert cli.main(["plugins", "--config", path]) == cli.EXIT_CONFIG
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if "loading:" in ln]
    assert all(word in line for word in both), line


# -- register_commands and the commands' run ------------------------------------------------------

def test_gateway_plugins_names_a_plugin_whose_register_commands_raises(tmp_path, monkeypatch,
                                                                       capsys):
    source = ("from gateway import hookimpl\n\n@hookimpl\ndef register_commands():\n"
              "    raise RuntimeError('commands boom')\n")
    install(tmp_path, monkeypatch, "gateway-cmdboom", "cmdboom", "gateway_cmdboom_sink", source)
    assert cli.main(["plugins"]) == cli.EXIT_CONFIG
    assert ("loading: error: plugin 'sinks.cmdboom': register_commands failed: "
            "RuntimeError('commands boom')") in capsys.readouterr().out


@pytest.mark.parametrize(("raises", "status", "line"), [
    ("RuntimeError('command run boom')", 1,
     "gateway: plugin 'sinks.boom': command 'boom' failed: RuntimeError('command run boom')"),
    ("PluginError('no backend configured')", 2,
     "gateway: plugin 'sinks.boom': no backend configured"),
    ("ConfigError('must be set', 'sinks.boom.url')", 2, "gateway: sinks.boom.url: must be set"),
], ids=["error", "plugin-error", "config-error"])
def test_a_plugin_command_that_raises_is_one_line_naming_the_plugin(tmp_path, monkeypatch, capsys,
                                                                    raises, status, line):
    module = f"gateway_boom_{raises.split('(')[0].lower()}"  # one per case: imports are cached
    source = ("from gateway import Command, ConfigError, PluginError, hookimpl\n\n"
              f"def run(args):\n    raise {raises}\n\n"
              "@hookimpl\ndef register_commands():\n    return [Command('boom', 'fails', run)]\n")
    install(tmp_path, monkeypatch, "gateway-boom", "boom", module, source)
    assert cli.main(["boom"]) == status
    err = capsys.readouterr().err
    assert err.splitlines() == [line]
