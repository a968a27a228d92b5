"""``gateway demo`` end to end: a real subprocess, no Meta account, stops by itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.demo import histogram_quantile, quantile, to_toml

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_and_every_message_gets_a_reply(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WHATSAPP_", "INSTAGRAM_", "META_", "GATEWAY_", "OPENAI_"))}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gateway", "demo", "--duration", "5"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    took = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert took < 60
    assert "\x1b[" not in out and "\r" not in out  # not a terminal: plain lines only
    for label in ("Summary", "messages in:", "messages out:", "statuses:", "response time:",
                  "webhook ack:", "result:"):
        assert label in out, label
    got_in = int(re.search(r"messages in:\s+(\d+)", out).group(1))
    got_out = int(re.search(r"messages out:\s+(\d+)", out).group(1))
    assert got_in >= 6 and got_out == got_in  # every customer wrote at least once
    assert re.search(r"response time:\s+p50 [\d.]+ m?s\s+p99 [\d.]+ m?s", out)
    assert re.search(r"webhook ack:\s+p50 [\d.]+ m?s\s+p99 [\d.]+ m?s", out)
    assert "OK - all" in out
    for channel in ("whatsapp", "instagram"):  # the conversation flow is shown live
        assert re.search(rf"{channel}\s+\S.*>  ", out) and re.search(rf"{channel}\s+\S.*<  ", out)
    assert not list(tmp_path.iterdir())  # embedded defaults: a temporary data dir, cleaned up


@pytest.mark.slow
def test_demo_with_its_default_duration_stops_within_a_minute(tmp_path):
    """``gateway demo`` with no arguments: 30 s of traffic, the drain and the shutdown all fit
    the demo's 55 s budget; the summary has the figures."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WHATSAPP_", "INSTAGRAM_", "META_", "GATEWAY_", "OPENAI_"))}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gateway", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert took < 60, f"took {took:.1f} s"
    assert "30 s of traffic" in out
    got_in = int(re.search(r"messages in:\s+(\d+) \(whatsapp (\d+), instagram (\d+)\)",
                           out).group(1))
    got_out = int(re.search(r"messages out:\s+(\d+)", out).group(1))
    assert got_in >= 30 and got_out == got_in
    assert re.search(r"response time:\s+p50 [\d.]+ m?s\s+p99 [\d.]+ m?s", out)
    assert re.search(r"webhook ack:\s+p50 [\d.]+ m?s\s+p99 [\d.]+ m?s", out)
    assert re.search(r"took:\s+[\d.]+ s \(30 s of traffic; stops by 55 s at the latest\)", out)
    assert "OK - all" in out


def test_the_time_budget():
    import io

    from gateway.demo import DEADLINE_SECONDS, Demo

    assert Demo(None, 30.0, io.StringIO()).deadline - time.monotonic() <= DEADLINE_SECONDS
    longer = Demo(None, 100.0, io.StringIO())  # asked for more traffic: the budget grows
    assert 120 < longer.deadline - longer.t0 <= 130


def test_quantiles():
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0
    buckets = [(0.001, 50.0), (0.01, 100.0), (float("inf"), 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.001)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.001 + 0.009 * 49 / 50)
    assert histogram_quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_demo_config_is_valid_toml_for_the_gateway(tmp_path):
    import tomllib

    from gateway.demo import demo_config

    data = demo_config(None, tmp_path, "http://127.0.0.1:1", 8123)
    text = to_toml(data)
    assert tomllib.loads(text) == data
    assert data["channels"]["whatsapp"]["graph_base_url"] == "http://127.0.0.1:1"
    assert data["sinks"]["ai"] == {"provider": "rules"}
    assert data["server"]["port"] == data["server"]["metrics_port"] == 8123
    user = tmp_path / "user.toml"
    user.write_text('[server]\ndata_dir = "/srv/x"\n[channels.whatsapp]\nphone_number_id = "42"\n'
                    '[sinks.jsonl]\n')
    data = demo_config(str(user), tmp_path, "http://127.0.0.1:1", 8123)
    assert data["server"]["data_dir"] == "/srv/x"
    assert data["channels"]["whatsapp"]["phone_number_id"] == "42"
    assert data["channels"]["instagram"]["graph_base_url"] == "http://127.0.0.1:1"
    assert set(data["sinks"]) == {"jsonl", "ai"}
    assert tomllib.loads(to_toml(data)) == data


def test_demo_without_outbound_service_explains(monkeypatch, capsys):
    """A build without ``app[keys.OUTBOUND]`` fails with a clear message, not a traceback."""
    import warnings

    from gateway import app as gwapp
    from gateway import demo, keys

    real = gwapp.create_app

    def without_outbound(*args, **kwargs):
        app = real(*args, **kwargs)

        async def drop(app):  # runs after every other start-up step
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                app.pop(keys.OUTBOUND, None)
            yield

        app.cleanup_ctx.append(drop)
        return app

    monkeypatch.setattr(gwapp, "create_app", without_outbound)
    assert demo.run_demo(None, 1) == 1
    err = capsys.readouterr().err
    assert "no outbound service" in err and "Traceback" not in err


def test_sigterm_stops_the_demo_and_removes_its_temporary_directory(tmp_path):
    """A demo stopped by SIGTERM (a terminal closed, ``timeout``, a CI job cancelled) shuts the
    gateway down and leaves no temporary data directory behind, as Ctrl-C does."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WHATSAPP_", "INSTAGRAM_", "META_", "GATEWAY_", "OPENAI_"))}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env["TMPDIR"] = str(scratch)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--duration", "30"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # traffic has begun: the gateway and its data dir are up
            if re.search(r"(whatsapp|instagram)\s+\S.*>  ", line):
                break
        assert [p.name for p in scratch.iterdir()][0].startswith("gateway-demo-")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert not list(scratch.iterdir())
