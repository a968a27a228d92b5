"""The /metrics exposition of a real gateway process, checked by Prometheus' own promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

from gateway.testing import GatewayProcess
from tests.conftest import CHANNELS_TOML, fixture_bytes
from tests.test_crash import CONFIG

CONTRACT = {
    "gateway_webhook_requests_total": {"channel", "outcome"},
    "gateway_webhook_ack_seconds": {"channel"},
    "gateway_events_total": {"channel", "kind", "type"},
    "gateway_sink_deliveries_total": {"sink", "outcome"},
    "gateway_sink_latency_seconds": {"sink"},
    "gateway_outbound_messages_total": {"channel", "type", "outcome"},
    "gateway_response_time_seconds": {"channel"},
    "gateway_queue_depth": {"queue"},
    "gateway_dead_letters": {"sink"},
    "gateway_ratelimit_headroom_ratio": {"channel", "account", "scope"},
}
assert CHANNELS_TOML  # the config below embeds it


def _post(proc: GatewayProcess, channel: str, name: str, secret: str = "test-app-secret") -> int:
    from gateway.testing import sign_headers

    body = fixture_bytes(name)
    req = urllib.request.Request(f"{proc.url}/webhooks/{channel}", data=body,
                                 headers=sign_headers(secret, body), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_exposition_passes_promtool_and_has_contract_metrics(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (make install installs Debian's prometheus)")
    with GatewayProcess(tmp_path, CONFIG) as proc:
        assert _post(proc, "whatsapp", "whatsapp/batch_mixed.json") == 200
        assert _post(proc, "whatsapp", "whatsapp/batch_mixed.json") == 200
        assert _post(proc, "instagram", "instagram/text.json", secret="wrong") == 401
        url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
        text = ""
        for _ in range(100):
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = resp.read().decode()
            if 'gateway_sink_deliveries_total{outcome="ok",sink="storage"} 8.0' in text:
                break
            import time
            time.sleep(0.1)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    # promtool exits 0 when clean and 3 for lint-only findings; 1 means the exposition is broken.
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "error" not in check.stderr.lower(), check.stderr
    for name, labels in CONTRACT.items():
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert 'gateway_webhook_requests_total{channel="whatsapp",outcome="accepted"} 2.0' in samples
    assert 'gateway_webhook_requests_total{channel="whatsapp",outcome="duplicate"} 1.0' in samples
    assert 'gateway_webhook_requests_total{channel="instagram",outcome="bad_signature"} 1.0' in samples
    assert 'gateway_events_total{channel="whatsapp",kind="status",type=""} 4.0' in samples
    assert 'gateway_sink_deliveries_total{outcome="ok",sink="storage"} 8.0' in samples, [
        s for s in samples if "sink" in s]
    assert any(s.startswith('gateway_webhook_ack_seconds_bucket{channel="whatsapp"') for s in samples)
    assert any(s.startswith('gateway_queue_depth{queue="journal"} 0.0') for s in samples)
