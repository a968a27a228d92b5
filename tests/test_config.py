"""Configuration: every bad key named in one run, env overlay, secret references."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway import config as gwconfig
from gateway.errors import ConfigError

BAD = """
[server]
prot = 1
[queu]
x = 1
[channels.whatsapp]
app_secret = "s"
bogus = 1
other = 2
[sinks.jsonl]
pth = "x"
[sinks.nosuch]
"""


def test_check_config_names_every_bad_key_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    for key in ("server.prot", "queu", "channels.whatsapp.bogus", "channels.whatsapp.other",
                "sinks.jsonl.pth", "sinks.nosuch"):
        assert f"config error: {key}:" in run.stderr, run.stderr


def test_the_buffer_budget_may_not_be_below_max_body_bytes(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("[server]\nmax_body_bytes = 4096\nmax_buffered_bytes = 4095\n")
    with pytest.raises(ConfigError) as exc:
        gwconfig.load(str(path), environ={})
    assert exc.value.key == "server.max_buffered_bytes" and "max_body_bytes" in str(exc.value)
    path.write_text("[server]\nmax_body_bytes = 4096\nmax_buffered_bytes = 4096\n")
    assert gwconfig.load(str(path), environ={}).server.max_buffered_bytes == 4096


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = "eighty"\n')
    with pytest.raises(ConfigError) as exc:
        gwconfig.load(str(path), environ={})
    assert exc.value.key == "server.port" and "int" in str(exc.value)


def test_environment_overrides_the_file_and_secret_references(tmp_path, monkeypatch):
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    path = tmp_path / "g.toml"
    path.write_text(f'[server]\napi_token = {{ file = "{secret_file}" }}\n'
                    '[channels.instagram]\napp_secret = { env = "MY_IG_SECRET" }\n')
    monkeypatch.setenv("MY_IG_SECRET", "from-env-ref")
    config = gwconfig.load(str(path), environ={"GATEWAY_DATA_DIR": "/srv/data"})
    assert config.server.api_token == "from-file" and config.server.data_dir == "/srv/data"
    from channels.instagram import InstagramConfig

    table = gwconfig.section(config, "channels", "instagram", InstagramConfig, environ={})
    assert table.app_secret == "from-env-ref"
    table = gwconfig.section(config, "channels", "instagram", InstagramConfig,
                             environ={"INSTAGRAM_APP_SECRET": "env-wins"})
    assert table.app_secret == "env-wins"
    assert gwconfig.redacted({"app_secret": "x", "nested": {"access_token": "y", "port": 1}}) == {
        "app_secret": "***", "nested": {"access_token": "***", "port": 1}}


def test_missing_secret_reference_names_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = tmp_path / "g.toml"
    path.write_text('[channels.whatsapp]\napp_secret = { env = "NOT_SET_ANYWHERE" }\n')
    config = gwconfig.load(str(path), environ={})
    from channels.whatsapp import WhatsAppConfig

    with pytest.raises(ConfigError) as exc:
        gwconfig.section(config, "channels", "whatsapp", WhatsAppConfig, environ={})
    assert exc.value.key == "channels.whatsapp.app_secret" and "NOT_SET_ANYWHERE" in str(exc.value)


def test_an_environment_override_makes_an_unresolvable_reference_no_error(tmp_path,
                                                                        monkeypatch):
    """The README's ``app_secret = { env = "WHATSAPP_APP_SECRET" }  # falls back to
    META_APP_SECRET``: with only META_APP_SECRET set, the override wins and the reference,
    never read, is no error. The same for a core key (GATEWAY_API_TOKEN)."""
    for name in ("WHATSAPP_APP_SECRET", "NOT_SET_ANYWHERE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "g.toml"
    path.write_text('[server]\napi_token = { env = "NOT_SET_ANYWHERE" }\n'
                    '[channels.whatsapp]\napp_secret = { env = "WHATSAPP_APP_SECRET" }\n')
    config = gwconfig.load(str(path), environ={"GATEWAY_API_TOKEN": "token-from-env"})
    assert config.server.api_token == "token-from-env"
    from channels.whatsapp import WhatsAppConfig

    table = gwconfig.section(config, "channels", "whatsapp", WhatsAppConfig,
                             environ={"META_APP_SECRET": "meta-secret"})
    assert table.app_secret == "meta-secret"
    with pytest.raises(ConfigError) as exc:  # without any override the reference must resolve
        gwconfig.load(str(path), environ={})
    assert exc.value.key == "server.api_token"


def test_an_unresolvable_required_key_is_one_error_not_two(tmp_path, monkeypatch):
    """A reference that fails drops its key; it is not reported a second time as missing."""
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    import msgspec

    class Required(msgspec.Struct, kw_only=True):
        secret: str
        env = {}

    path = tmp_path / "g.toml"
    path.write_text('[sinks.forward]\nsecret = { env = "NOT_SET_ANYWHERE" }\n')
    config = gwconfig.load(str(path), environ={})
    with pytest.raises(ConfigError) as exc:
        gwconfig.section(config, "sinks", "forward", Required, environ={})
    assert not isinstance(exc.value, gwconfig.ConfigErrors), str(exc.value)
    assert exc.value.key == "sinks.forward.secret" and "NOT_SET_ANYWHERE" in str(exc.value)


def test_serve_refuses_to_start_without_app_secret(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[channels.whatsapp]\n')
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.endswith("APP_SECRET")}
    run = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    assert "channels.whatsapp.app_secret" in run.stderr and "WHATSAPP_APP_SECRET" in run.stderr


def test_secret_references_resolve_at_any_depth_and_stay_references(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBER_TWO_TOKEN", "EAAB-two")
    monkeypatch.setenv("HOOK_AUTH", "Bearer hook")
    path = tmp_path / "g.toml"
    path.write_text('[channels.whatsapp]\napp_secret = "s"\nphone_number_id = "1"\n'
                    'access_token = "t1"\n'
                    '[[channels.whatsapp.accounts]]\nphone_number_id = "2"\n'
                    'access_token = { env = "NUMBER_TWO_TOKEN" }\n')
    config = gwconfig.load(str(path), environ={})
    from channels.whatsapp import WhatsAppConfig

    table = gwconfig.section(config, "channels", "whatsapp", WhatsAppConfig, environ={})
    assert [a.access_token for a in table.accounts] == ["EAAB-two"]
    # the loaded config keeps the reference (nothing resolved into it, nothing to print)
    assert config.channels["whatsapp"]["accounts"][0]["access_token"] == {"env": "NUMBER_TWO_TOKEN"}
    resolved = gwconfig.resolve_secrets(
        {"headers": {"Authorization": {"env": "HOOK_AUTH"}}, "list": [{"file": str(path)}]}, "x")
    assert resolved["headers"] == {"Authorization": "Bearer hook"}
    assert resolved["list"][0].startswith("[channels.whatsapp]")
    with pytest.raises(ConfigError) as exc:
        gwconfig.resolve_secrets({"accounts": [{"access_token": {"env": "NOT_SET_ANYWHERE"}}]},
                                 "channels.whatsapp")
    assert exc.value.key == "channels.whatsapp.accounts[0].access_token"
    assert gwconfig.redacted({"headers": {"Authorization": "Bearer x", "X-Api-Key": "k"}}) == {
        "headers": {"Authorization": "***", "X-Api-Key": "***"}}


SEVERAL = """
[server]
port = "eighty"
metrics_port = "ninety"
max_body_bytes = 10
[queue]
backend = "kafka"
max_pending = 0
[logging]
level = "verbose"
[outbound]
max_attempts = 0
concurrency = 0
[channels.whatsapp]
graph_version = 5
enabled = "yes"
verfy_token = "x"
[channels.instagram]
page_idd = "1"
[sinks.storage]
batch_size = 0
max_attempts = 0
[sinks.jsonl]
pth = "x"
"""


def test_check_config_names_every_independent_error_across_core_and_plugin_tables(tmp_path):
    path = tmp_path / "several.toml"
    path.write_text(SEVERAL.replace("[server]", f'[server]\ndata_dir = "{tmp_path}"')
                    + "[channels.extra]\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.endswith(("APP_SECRET", "_TOKEN", "REDIS_URL", "DATA_DIR"))}
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    for key in ("server.port", "server.metrics_port", "server.max_body_bytes", "queue.backend",
                "queue.max_pending", "logging.level", "outbound.max_attempts",
                "outbound.concurrency", "channels.whatsapp.graph_version",
                "channels.whatsapp.enabled", "channels.whatsapp.verfy_token",
                "channels.instagram.page_idd", "sinks.storage.batch_size",
                "sinks.storage.max_attempts", "sinks.jsonl.pth", "channels.extra"):
        assert f"config error: {key}:" in run.stderr, (key, run.stderr)
    assert "Traceback" not in run.stderr


def test_every_channel_without_an_app_secret_is_named(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\nport = "x"\n'
                    '[channels.whatsapp]\n[channels.instagram]\n')
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("APP_SECRET")}
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 2
    for key in ("server.port", "channels.whatsapp.app_secret", "channels.instagram.app_secret"):
        assert f"config error: {key}:" in run.stderr, (key, run.stderr)


def test_load_collects_each_core_error_and_check_keeps_the_good_keys(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = "x"\nhost = "127.0.0.2"\nshutdown_timeout = -1\n'
                    '[queue]\nbackend = "kafka"\n')
    with pytest.raises(gwconfig.ConfigErrors) as exc:
        gwconfig.load(str(path), environ={})
    assert [e.key for e in exc.value.errors] == ["server.port", "server.shutdown_timeout",
                                                 "queue.backend"]
    errors, config = gwconfig.check_all(str(path), environ={})
    assert len(errors) == 3 and config is not None
    assert config.server.host == "127.0.0.2" and config.server.port == 8080  # bad key: default


def test_section_names_every_bad_key_of_a_plugin_table():
    from channels.whatsapp import WhatsAppConfig

    config = gwconfig.GatewayConfig(channels={"whatsapp": {
        "graph_version": 5, "bogus": 1, "pair_burst": 99, "accounts": [{"x": 1}]}})
    with pytest.raises(gwconfig.ConfigErrors) as exc:
        gwconfig.section(config, "channels", "whatsapp", WhatsAppConfig, environ={})
    assert sorted(e.key for e in exc.value.errors) == [
        "channels.whatsapp.accounts[0].x", "channels.whatsapp.bogus",
        "channels.whatsapp.graph_version", "channels.whatsapp.pair_burst"]


def test_redacted_masks_url_credentials_and_query_whatever_the_key():
    shown = gwconfig.redacted({"url": "https://u:pw-1@h.example/x?token=t-2", "n": "plain"})
    assert shown == {"url": "https://***@h.example/x?***", "n": "plain"}


# -- bounds: every value that cannot work is refused by check-config, naming the key and the bound

BOUNDS = [  # (table text, key named, part of the message)
    ("[server]\nport = 0", "server.port", "1-65535"),
    ("[server]\nmetrics_port = 0", "server.metrics_port", "1-65535"),
    ('[server]\napi_token = "   "', "server.api_token", "blank"),
    ("[queue]\nretry_after_seconds = 0", "queue.retry_after_seconds", "at least 1"),
    ("[queue]\ndedupe_window_seconds = 0", "queue.dedupe_window_seconds", "at least 1"),
    ('[queue]\nredis_url = "http://127.0.0.1:6379/0"', "queue.redis_url", "redis://, rediss://"),
    ('[queue]\nredis_url = "127.0.0.1:6379"', "queue.redis_url", "redis://, rediss://"),
    ('[queue]\nredis_url = "redis://127.0.0.1:port/0"', "queue.redis_url", "not a valid URL"),
    ("[outbound]\nbackoff_initial = 0", "outbound.backoff_initial", "greater than 0"),
    ("[outbound]\nbackoff_max = -1.0", "outbound.backoff_max", "greater than 0"),
    ("[outbound]\nbackoff_initial = 10\nbackoff_max = 5", "outbound.backoff_max",
     "at least backoff_initial"),
    ("[outbound]\nthrottle_backoff_initial = 10\nthrottle_backoff_max = 5",
     "outbound.throttle_backoff_max", "at least throttle_backoff_initial"),
    ("[outbound]\nreconcile_seconds = 0", "outbound.reconcile_seconds", "greater than 0"),
    ("[outbound]\nwindow_hours = 0", "outbound.window_hours", "greater than 0"),
    ("[outbound]\nwindow_hours = nan", "outbound.window_hours", "greater than 0"),
    ("[server]\nshutdown_timeout = nan", "server.shutdown_timeout", "finite"),  # no drain at all
    ("[server]\nshutdown_timeout = inf", "server.shutdown_timeout", "finite"),  # until SIGKILL
    ("[outbound]\npause_probe_seconds = nan", "outbound.pause_probe_seconds", "finite"),
    ('[channels.whatsapp]\ngraph_base_url = "graph.facebook.com"',
     "channels.whatsapp.graph_base_url", "http(s) URL"),
    ('[channels.instagram]\ngraph_base_url = "https://"', "channels.instagram.graph_base_url",
     "http(s) URL"),
    ('[channels.whatsapp]\ngraph_version = ""', "channels.whatsapp.graph_version",
     "Graph API version"),
    ("[outbound]\nhuman_agent_days = -1", "outbound.human_agent_days", "greater than 0"),
    ("[sinks.jsonl]\nbackoff_initial = 0", "sinks.jsonl.backoff_initial", "greater than 0"),
    ("[sinks.jsonl]\nbackoff_max = -1", "sinks.jsonl.backoff_max", "greater than 0"),
    ("[sinks.storage]\nbackoff_initial = 1\nbackoff_max = 0.5", "sinks.storage.backoff_max",
     "at least backoff_initial"),
    ("[channels.whatsapp]\nsend_timeout = 0", "channels.whatsapp.send_timeout", "greater than 0"),
    ("[channels.whatsapp]\npair_interval_seconds = 0", "channels.whatsapp.pair_interval_seconds",
     "greater than 0"),
    ("[channels.instagram]\nsend_timeout = -1", "channels.instagram.send_timeout",
     "greater than 0"),
    ('[channels.whatsapp]\napp_secret = "   "', "channels.whatsapp.app_secret", "blank"),
    ('[channels.instagram]\nverify_token = " \\t"', "channels.instagram.verify_token", "blank"),
    ('[channels.whatsapp]\n[[channels.whatsapp.accounts]]\nphone_number_id = "2"\n'
     'access_token = "  "', "channels.whatsapp.accounts[0].access_token", "blank"),
    ('[channels.whatsapp]\n[[channels.whatsapp.accounts]]\nphone_number_id = " "',
     "channels.whatsapp.accounts[0].phone_number_id", "must not be empty"),
    # one number twice would be merged silently (one token and one rate winning)
    ('[channels.whatsapp]\nphone_number_id = "7"\n[[channels.whatsapp.accounts]]\n'
     'phone_number_id = "7"', "channels.whatsapp.accounts[0].phone_number_id",
     "already configured by channels.whatsapp.phone_number_id"),
    ('[channels.whatsapp]\n[[channels.whatsapp.accounts]]\nphone_number_id = "7"\n'
     '[[channels.whatsapp.accounts]]\nphone_number_id = "7"',
     "channels.whatsapp.accounts[1].phone_number_id",
     "already configured by channels.whatsapp.accounts[0].phone_number_id"),
]


def checked_config(tmp_path, text: str) -> list[ConfigError]:
    """What ``gateway check-config`` finds in ``text``: the core's errors and every plugin's."""
    from gateway import plugins

    path = tmp_path / "g.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path}"\n' + text.replace("[server]\n", ""))
    errors, config = gwconfig.check_all(str(path), environ={})
    return errors + plugins.check(plugins.manager(), config)


@pytest.fixture
def no_secret_env(monkeypatch):
    from tests.test_plugins import SECRET_VARS

    for name in SECRET_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(("text", "key", "bound"), BOUNDS, ids=[b[1] for b in BOUNDS])
def test_a_value_out_of_bounds_is_refused_naming_the_key_and_the_bound(tmp_path, no_secret_env,
                                                                        text, key, bound):
    errors = checked_config(tmp_path, text)
    assert [str(e) for e in errors if getattr(e, "key", "") == key], (key, [str(e) for e in errors])
    [error] = [e for e in errors if e.key == key]
    assert bound in error.message, str(error)


def test_the_bounds_themselves_are_accepted(tmp_path, no_secret_env):
    edges = ('[server]\nport = 1\nmetrics_port = 65535\n'
             '[queue]\nretry_after_seconds = 1\ndedupe_window_seconds = 1\n'
             'redis_url = "unix:///run/redis.sock"\n'
             '[outbound]\nbackoff_initial = 5\nbackoff_max = 5\nthrottle_backoff_initial = 2\n'
             'throttle_backoff_max = 2\nreconcile_seconds = 0.1\nwindow_hours = 0.5\n'
             'human_agent_days = 0.5\n'
             '[sinks.jsonl]\nbackoff_initial = 0.5\nbackoff_max = 0.5\n'
             '[channels.whatsapp]\nsend_timeout = 0.1\npair_interval_seconds = 0.1\n'
             '[channels.instagram]\nsend_timeout = 0.1\nthread_interval_seconds = 0\n')
    assert [str(e) for e in checked_config(tmp_path, edges)] == []
    for url in ("redis://:pw@h:6379/0?prefix=a", "rediss://h/1", "REDIS://h"):
        assert checked_config(tmp_path, f'[queue]\nredis_url = "{url}"\n') == [], url


# -- secret references and tables of the wrong shape ---------------------------------------------

def test_a_secret_reference_that_cannot_be_read_names_the_key(tmp_path, no_secret_env):
    binary = tmp_path / "binary-secret"
    binary.write_bytes(b"\xff\xfe")
    text = (f'[server]\napi_token = {{ file = "{binary}" }}\n'
            f'[channels.whatsapp]\napp_secret = {{ file = "{binary}" }}\n'
            '[channels.instagram]\napp_secret = { env = 1 }\n')
    found = {e.key: e.message for e in checked_config(tmp_path, text)}
    assert found == {
        "server.api_token": f"secret file {str(binary)!r} is not UTF-8",
        "channels.whatsapp.app_secret": f"secret file {str(binary)!r} is not UTF-8",
        "channels.instagram.app_secret":
            "{ env = ... }: the environment variable name must be a string, not int"}


def test_a_plugin_entry_that_is_not_a_table_says_so(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("[channels]\nwhatsapp = 1\n[sinks]\njsonl = true\n")
    errors, config = gwconfig.check_all(str(path), environ={})
    assert [str(e) for e in errors] == ["channels.whatsapp: must be a table, not int",
                                        "sinks.jsonl: must be a table, not bool"]
    assert config.channels == {} and config.sinks == {}


def test_unknown_keys_of_a_disabled_table_are_errors_and_nothing_else_is_read(tmp_path,
                                                                               monkeypatch):
    """A table turned off is not used, so an unresolvable reference or a bad value there is no
    error; a misspelt key is (the docs: unknown keys are errors in every plugin's table)."""
    from sinks.jsonl.sink import JsonlConfig

    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    config = gwconfig.GatewayConfig(sinks={"jsonl": {
        "enabled": False, "bogus": 1, "pth": "x", "fsync": {"env": "NOT_SET_ANYWHERE"},
        "batch_size": 0}})
    with pytest.raises(gwconfig.ConfigErrors) as exc:
        gwconfig.section(config, "sinks", "jsonl", JsonlConfig, environ={})
    assert [e.key for e in exc.value.errors] == ["sinks.jsonl.bogus", "sinks.jsonl.pth"]
    config = gwconfig.GatewayConfig(sinks={"jsonl": {"enabled": False, "batch_size": 0,
                                                     "fsync": {"env": "NOT_SET_ANYWHERE"}}})
    assert gwconfig.section(config, "sinks", "jsonl", JsonlConfig, environ={}) is None
