"""More start-up failures an operator can fix, each one line with exit 2 and no traceback: a
database file the gateway cannot open, a host that does not resolve, bad command-line numbers,
a ``demo --config`` of the wrong shape, and ``gateway plugins`` with a config it cannot read."""

from __future__ import annotations

from gateway.testing import free_port
from tests.test_cli_errors import one_line_failure, serve_config
from tests.test_plugins import run_cli


def test_a_directory_where_the_journal_file_goes_names_the_key(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "journal.db").mkdir(parents=True)
    result = run_cli("serve", "--config", serve_config(tmp_path, free_port(), str(data_dir)),
                     cwd=tmp_path)
    one_line_failure(result, "cannot use a SQLite database", "server.data_dir",
                     str(data_dir / "journal.db"))


def test_a_directory_where_a_sinks_database_goes_names_the_sinks_key(tmp_path):
    target = tmp_path / "storage-as-dir"
    target.mkdir()
    config = serve_config(tmp_path, free_port(), str(tmp_path / "data"),
                          f'[sinks.storage]\npath = "{target}"\n')
    result = run_cli("serve", "--config", config, cwd=tmp_path)
    one_line_failure(result, "cannot use a SQLite database", "sinks.storage.path")


def test_a_host_that_does_not_resolve_names_server_host(tmp_path):
    config = serve_config(tmp_path, free_port(), str(tmp_path / "data"))
    text = open(config).read().replace('host = "127.0.0.1"', 'host = "not a host!!"')
    open(config, "w").write(text)
    result = run_cli("serve", "--config", config, cwd=tmp_path)
    one_line_failure(result, "cannot resolve the host 'not a host!!'", "server.host")


def test_command_line_numbers_out_of_range_are_refused(tmp_path):
    for args, needle in ((["demo", "--duration", "inf"], "finite number of seconds"),
                         (["demo", "--duration", "-5"], "above 0"),
                         (["demo", "--duration", "soon"], "not a number"),
                         (["dead-letters", "list", "--limit", "-1"], "above 0"),
                         (["dead-letters", "list", "--limit", "0"], "above 0")):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and needle in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_demo_config_of_the_wrong_shape_names_the_table(tmp_path):
    for text, key in (("server = 1\n", "server"), ('sinks = "x"\n', "sinks"),
                      ("channels = [1]\n", "channels")):
        path = tmp_path / "demo.toml"
        path.write_text(text)
        one_line_failure(run_cli("demo", "--config", str(path), "--duration", "1", cwd=tmp_path),
                         key, "must be a table")
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[server]")
    one_line_failure(run_cli("demo", "--config", str(path), "--duration", "1", cwd=tmp_path),
                     "cannot read", "binary.toml")


def test_plugins_with_a_config_it_cannot_read_says_so(tmp_path):
    result = run_cli("plugins", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot read config file" in result.stdout and "missing.toml" in result.stdout
