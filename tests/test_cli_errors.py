"""Start-up and runtime failures an operator can fix: one clear line, exit 2, no traceback and no
password (the gateway started as a subprocess on 127.0.0.1, as an operator runs it)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from gateway import config as gwconfig
from gateway.journal import open_journal
from gateway.testing import free_port
from tests.conftest import CHANNELS_TOML
from tests.test_plugins import env, run_cli


def serve_config(tmp_path: Path, port: int, data_dir: str, extra: str = "") -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\nmetrics_port = {free_port()}\n'
                    f'data_dir = "{data_dir}"\nshutdown_timeout = 2\n{extra}' + CHANNELS_TOML)
    return str(path)


def one_line_failure(result, *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("gateway: ")]
    for needle in needles:
        assert needle in line, line
    return line


def test_port_in_use_is_one_line_naming_the_address(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_cli("serve", "--config", serve_config(tmp_path, port, str(tmp_path / "d")),
                         cwd=tmp_path)
    one_line_failure(result, f"cannot listen on 127.0.0.1:{port}", "address already in use",
                     "server.port")


def test_data_dir_that_cannot_be_created_is_one_line_naming_path_and_key(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data_dir = blocker / "data"
    result = run_cli("serve", "--config", serve_config(tmp_path, free_port(), str(data_dir)),
                     cwd=tmp_path)
    one_line_failure(result, "cannot create or open", str(blocker), "server.data_dir")
    result = run_cli("dead-letters", "list", "--config",
                     serve_config(tmp_path, free_port(), str(data_dir)), cwd=tmp_path)
    one_line_failure(result, "server.data_dir")


def test_sink_path_that_cannot_be_created_names_the_sink_key(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = serve_config(tmp_path, free_port(), str(tmp_path / "d"),
                          f'[sinks.jsonl]\npath = "{blocker}/events.jsonl"\n')
    result = run_cli("serve", "--config", config, cwd=tmp_path)
    one_line_failure(result, str(blocker), "sinks.jsonl.path")


def test_unreachable_redis_is_one_line_without_the_password(tmp_path):
    config = serve_config(tmp_path, free_port(), str(tmp_path / "d"),
                          '[queue]\nbackend = "redis"\n')
    redis_url = f"redis://:redis-pw-71@127.0.0.1:{free_port()}/0"
    for args in (("serve",), ("dead-letters", "list")):
        result = run_cli(*args, "--config", config, cwd=tmp_path,
                         environ=env(GATEWAY_REDIS_URL=redis_url))
        line = one_line_failure(result, "cannot use Redis at redis://***@127.0.0.1:",
                                "queue.redis_url")
        assert "redis-pw-71" not in result.stdout + result.stderr, line


def test_dead_letters_of_a_data_dir_without_a_journal_is_an_error_not_an_empty_list(tmp_path):
    """A wrong --config or data_dir must not create an empty journal and report 0 letters."""
    data_dir = tmp_path / "never-served"
    config = serve_config(tmp_path, free_port(), str(data_dir))
    for args in (("list",), ("replay",)):
        result = run_cli("dead-letters", *args, "--config", config, cwd=tmp_path)
        one_line_failure(result, "no journal at", str(data_dir), "server.data_dir")
    assert not data_dir.exists()


def test_dead_letters_of_an_unknown_sink_is_an_error(tmp_path):
    data_dir = tmp_path / "d"
    config = serve_config(tmp_path, free_port(), str(data_dir), "[sinks.jsonl]\n")

    async def create() -> None:  # the journal a gateway with this config leaves behind
        journal = open_journal(gwconfig.load(config))
        await journal.open()
        await journal.close()

    asyncio.run(create())
    for args in (("list", "--sink", "jsonl"), ("list", "--sink", "normalise:whatsapp"),
                 ("replay", "--sink", "jsonl")):
        result = run_cli("dead-letters", *args, "--config", config, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    for args in (("list", "--sink", "jsnol"), ("replay", "--sink", "jsnol")):
        result = run_cli("dead-letters", *args, "--config", config, cwd=tmp_path)
        one_line_failure(result, "no sink named 'jsnol'", "configured: jsonl")


def test_two_sinks_on_one_file_are_refused_naming_both_keys(tmp_path):
    """The README's sample once gave the analytics sink the jsonl file: the jsonl sink's repair
    then truncated a SQLite database. Such configs are refused by check-config and serve."""
    data_dir = tmp_path / "d"
    extra = (f'[sinks.jsonl]\n[sinks.analytics]\npath = "{data_dir}/events.jsonl"\n'
             f'[sinks.storage]\npath = "{data_dir}/journal.db"\n')
    config = serve_config(tmp_path, free_port(), str(data_dir), extra)
    checked = run_cli("check-config", "--config", config, cwd=tmp_path)
    assert checked.returncode == 2, checked.stderr
    errors = checked.stderr
    assert "sinks.jsonl.path: " in errors and "used by sinks.analytics.path" in errors
    assert "sinks.storage.path: " in errors and "the gateway's journal.db" in errors
    served = run_cli("serve", "--config", config, cwd=tmp_path)
    assert served.returncode == 2 and "give each sink a file of its own" in served.stderr
    assert not (data_dir / "events.jsonl").exists()


def test_a_sink_on_a_sqlite_side_file_is_refused_and_a_path_that_is_no_file_is_not(tmp_path):
    """What a sink's files() names counts (a SQLite sink's -wal and -shm too); a plugin's config
    key called ``path`` that is no file (a URL path) does not."""
    from gateway.app import require_distinct_files
    from gateway.config import SinkConfig
    from gateway.errors import ConfigError
    from gateway.sink import Sink
    from sinks.jsonl.sink import JsonlConfig, JsonlSink

    class HttpConfig(SinkConfig):
        path: str = "/events"

    class Http(Sink):
        name = "http"

        async def write(self, records):
            pass

    config = gwconfig.load(serve_config(tmp_path, free_port(), str(tmp_path / "d")))
    wal = JsonlSink(JsonlConfig(path=str(tmp_path / "d" / "journal.db-wal")))
    with pytest.raises(ConfigError) as exc:
        require_distinct_files(config, {"jsonl": wal})
    assert exc.value.key == "sinks.jsonl.path" and "journal.db-wal" in str(exc.value)
    require_distinct_files(config, {"crm_a": Http(HttpConfig()), "crm_b": Http(HttpConfig())})


# -- configs that once gave a traceback (or a misleading line) from check-config or serve ----------

BAD_CONFIGS = {  # name: (config text, words its one line must hold); BINARY: a non-UTF-8 file
    "not_utf8": (None, ["gateway.toml is not UTF-8 TOML"]),
    "core_secret_file": ('[server]\napi_token = { file = "BINARY" }\n',
                         ["server.api_token", "secret file", "is not UTF-8"]),
    "plugin_secret_file": ('[channels.whatsapp]\napp_secret = { file = "BINARY" }\n',
                           ["channels.whatsapp.app_secret", "secret file", "is not UTF-8"]),
    "env_not_a_string": ('[channels.whatsapp]\napp_secret = { env = 1 }\n',
                         ["channels.whatsapp.app_secret", "must be a string"]),
    "redis_scheme": ('[queue]\nbackend = "redis"\nredis_url = "http://127.0.0.1:1/0"\n',
                     ["queue.redis_url", "redis://"]),
    "channel_not_a_table": ("[channels]\nwhatsapp = 1\n", ["channels.whatsapp", "must be a table"]),
    "disabled_table_unknown_key": ("[sinks.jsonl]\nenabled = false\nbogus = 1\n",
                                   ["sinks.jsonl.bogus", "unknown key"]),
    "blank_app_secret": ('[channels.whatsapp]\napp_secret = "   "\n',
                         ["channels.whatsapp.app_secret", "blank"]),
}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_the_key_from_check_config_and_serve(tmp_path, command,
                                                                             case):
    text, needles = BAD_CONFIGS[case]
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe[server]\n")
    path = tmp_path / "gateway.toml"
    if text is None:
        path.write_bytes(binary.read_bytes())
    else:
        path.write_text(f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\n'
                        f'metrics_port = {free_port()}\ndata_dir = "{tmp_path / "d"}"\n'
                        + text.replace("[server]\n", "").replace("BINARY", str(binary)))
    result = run_cli(command, "--config", str(path), cwd=tmp_path, timeout=20)
    one_line_failure(result, *needles)
