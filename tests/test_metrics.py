"""The /metrics exposition of a real gateway process, checked by Prometheus' own promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import urllib.request

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway import PermanentError, Sink, hookimpl, keys
from gateway.app import metrics_app
from gateway.config import SinkConfig, section
from gateway.testing import GatewayProcess
from gateway.testing.graph import GraphSimulator
from tests.conftest import CHANNELS_TOML, fixture_bytes
from tests.test_crash import CONFIG

CONTRACT = {  # CONTRACT §6: name -> (type, label names)
    "gateway_webhook_requests_total": ("counter", {"channel", "outcome"}),
    "gateway_webhook_ack_seconds": ("histogram", {"channel"}),
    "gateway_events_total": ("counter", {"channel", "kind", "type"}),
    "gateway_sink_deliveries_total": ("counter", {"sink", "outcome"}),
    "gateway_sink_latency_seconds": ("histogram", {"sink"}),
    "gateway_outbound_messages_total": ("counter", {"channel", "type", "outcome"}),
    "gateway_response_time_seconds": ("histogram", {"channel"}),
    "gateway_queue_depth": ("gauge", {"queue"}),
    "gateway_dead_letters": ("gauge", {"sink"}),
    "gateway_ratelimit_headroom_ratio": ("gauge", {"channel", "account", "scope"}),
}
OUTCOMES = {  # the label values the contract enumerates
    ("gateway_webhook_requests_total", "outcome"): {"accepted", "duplicate", "bad_signature",
                                                    "bad_request", "too_large", "unavailable"},
    ("gateway_sink_deliveries_total", "outcome"): {"ok", "retry", "dead"},
    ("gateway_outbound_messages_total", "outcome"): {"sent", "failed", "retried"},
}


def contract_samples(text: str) -> dict[str, list]:
    """Parse an exposition with Prometheus' own parser and check it against CONTRACT §6: every
    metric is there with its type, and every sample has exactly the contract's label names
    (plus ``le`` on histogram buckets). Returns each contract metric's samples."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    found = {}
    for name, (kind, labels) in CONTRACT.items():
        family = families.get(name.removesuffix("_total"))
        assert family is not None, f"{name} is not exposed"
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            names = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            assert names == labels, (sample.name, sample.labels)
            for (metric, label), allowed in OUTCOMES.items():
                if metric == name:
                    assert sample.labels[label] in allowed, sample
        found[name] = [s for s in family.samples if not s.name.endswith("_created")]
    return found


assert CHANNELS_TOML  # the config below embeds it


def _post(proc: GatewayProcess, channel: str, name: str, secret: str = "test-app-secret") -> int:
    return proc.post_webhook(channel, fixture_bytes(name), secret)


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
            if ('gateway_sink_deliveries_total{outcome="ok",sink="storage"} 8.0' in text
                    and 'outcome="duplicate"} 1.0' in text):  # the redelivery is processed too
                break
            import time
            time.sleep(0.1)
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    # promtool exits 0 when clean and 3 for lint-only findings; 1 means the exposition is broken.
    assert check.returncode in (0, 3), check.stdout + check.stderr
    assert "error" not in check.stderr.lower(), check.stderr
    contract_samples(text)
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert 'gateway_webhook_requests_total{channel="whatsapp",outcome="accepted"} 2.0' in samples
    assert 'gateway_webhook_requests_total{channel="whatsapp",outcome="duplicate"} 1.0' in samples
    assert ('gateway_webhook_requests_total{channel="instagram",outcome="bad_signature"} 1.0'
            in samples)
    assert 'gateway_events_total{channel="whatsapp",kind="status",type=""} 4.0' in samples
    assert 'gateway_sink_deliveries_total{outcome="ok",sink="storage"} 8.0' in samples, [
        s for s in samples if "sink" in s]
    assert any(s.startswith('gateway_webhook_ack_seconds_bucket{channel="whatsapp"')
               for s in samples)
    assert any(s.startswith('gateway_queue_depth{queue="journal"} 0.0') for s in samples)



class BrokenSink(Sink):
    """[sinks.broken]: refuses every event for good, so each one ends in the dead letters."""

    name = "broken"

    async def write(self, records):
        raise PermanentError("broken on purpose")


class StuckSink(Sink):
    """[sinks.stuck]: every write waits until ``release`` is set (a sink that fell behind)."""

    name = "stuck"

    def __init__(self, config: SinkConfig) -> None:
        super().__init__(config)
        self.release = asyncio.Event()
        self.received = 0

    async def write(self, records):
        await self.release.wait()
        self.received += len(records)


class ScenarioPlugin:
    def __init__(self) -> None:
        self.sinks: dict[str, Sink] = {}

    @hookimpl
    def register_sinks(self, config):
        for name, cls in (("broken", BrokenSink), ("stuck", StuckSink)):
            table = section(config, "sinks", name, SinkConfig)
            if table:
                self.sinks[name] = cls(table)
        return list(self.sinks.values())


def _value(samples: dict[str, list], name: str, **labels) -> float | None:
    return next((s.value for s in samples[name] if s.labels == labels), None)


async def test_metric_values_after_dead_letters_replies_and_a_backlog(gateway):
    """Every CONTRACT §6 metric is exposed with exactly its labels, and the values of
    ``gateway_response_time_seconds``, ``gateway_dead_letters`` and
    ``gateway_queue_depth{queue="sink:<name>"}`` follow what happened."""
    sim = await GraphSimulator().start()
    plugin = ScenarioPlugin()
    whatsapp_sends = ('access_token = "EAAB-test"\nphone_number_id = "100000000000001"\n'
                      f'graph_base_url = "{sim.url}"\n[channels.instagram]')
    gw = await gateway(
        extra='api_token = "metrics-token"', extra_plugins=[plugin],
        channels=CHANNELS_TOML.replace("[channels.instagram]", whatsapp_sends),
        sinks="[sinks.jsonl]\n[sinks.storage]\n[sinks.broken]\nmax_attempts = 1\n[sinks.stuck]\n")
    exposition = TestServer(metrics_app(gw.app[keys.METRICS]), host="127.0.0.1")
    await exposition.start_server()
    stuck = plugin.sinks["stuck"]

    async def scrape() -> dict[str, list]:
        async with gw.session.get(exposition.make_url("/metrics")) as resp:
            assert resp.status == 200
            return contract_samples(await resp.text())

    try:
        # a customer message, then our reply's "sent" status 300 s later (WhatsApp); a DM, then
        # the echo of our answer 149.877 s later (Instagram)
        for name in ("whatsapp/text.json", "whatsapp/status_sent.json",
                     "instagram/text.json", "instagram/echo.json"):
            assert (await gw.post(name.split("/")[0], fixture_bytes(name)))[0] == 200
        # a template sent through the API: the outbound and rate-limit metrics get samples
        async with gw.session.post(f"{gw.url}/v1/messages", json={
                "channel": "whatsapp", "to": "15550001234", "type": "template",
                "template": {"name": "order_update", "language": "en_US"}},
                headers={"Authorization": "Bearer metrics-token"}) as resp:
            assert resp.status == 202, await resp.text()
        deadline = time.monotonic() + 20  # housekeeping refreshes the gauges every 5 s
        while True:
            found = await scrape()
            if (_value(found, "gateway_dead_letters", sink="broken") == 4
                    and _value(found, "gateway_queue_depth", queue="sink:stuck") == 4
                    and found["gateway_outbound_messages_total"]
                    and found["gateway_ratelimit_headroom_ratio"]):
                break
            assert time.monotonic() < deadline, {k: found[k] for k in (
                "gateway_dead_letters", "gateway_queue_depth", "gateway_outbound_messages_total")}
            await asyncio.sleep(0.1)
        for name in CONTRACT:
            assert found[name], f"{name} has no samples after the scenario"
        assert _value(found, "gateway_outbound_messages_total", channel="whatsapp",
                      type="template", outcome="sent") == 1
        # gateway_dead_letters: the four events the broken sink refused, none elsewhere
        assert len(await gw.app[keys.JOURNAL].dead_letters("broken")) == 4
        for sink in ("jsonl", "storage", "stuck"):
            assert _value(found, "gateway_dead_letters", sink=sink) == 0
        # gateway_queue_depth: the stuck sink is 4 events behind, the others caught up
        for sink in ("jsonl", "storage", "broken"):
            assert _value(found, "gateway_queue_depth", queue=f"sink:{sink}") == 0
        assert _value(found, "gateway_queue_depth", queue="journal") == 0
        # gateway_response_time_seconds: one reply per channel, measured on Meta's clock
        times = {(s.name, s.labels.get("channel"), s.labels.get("le")): s.value
                 for s in found["gateway_response_time_seconds"]}
        prefix = "gateway_response_time_seconds"
        for channel, seconds in (("whatsapp", 300.0), ("instagram", 149.877)):
            assert times[(f"{prefix}_count", channel, None)] == 1
            assert times[(f"{prefix}_sum", channel, None)] == pytest.approx(seconds, abs=1e-6)
            assert times[(f"{prefix}_bucket", channel, "120.0")] == 0
            assert times[(f"{prefix}_bucket", channel, "300.0")] == 1
        # the backlog drains once the sink moves again: its depth goes back to 0
        stuck.release.set()
        await gw.settle()
        assert stuck.received == 4
        assert _value(await scrape(), "gateway_queue_depth", queue="sink:stuck") == 0
    finally:
        stuck.release.set()
        await exposition.close()
        await sim.stop()


def test_a_late_older_reply_leaves_the_response_time_wait():
    from datetime import UTC, datetime, timedelta

    from gateway.events import Message, Party, Status, conversation_id
    from gateway.metrics import Metrics
    from gateway.processor import ResponseTimer

    metrics = Metrics()
    timer = ResponseTimer(metrics)
    t, conv = datetime(2026, 3, 1, tzinfo=UTC), conversation_id("whatsapp", "1", "2")

    def sent(i: int, at: datetime) -> Status:
        return Status(schema=1, id=f"st-{i}", channel="whatsapp", direction="outbound",
                      account_id="1", conversation_id=conv, sender=Party("1"),
                      recipient=Party("2"), timestamp=at, message_id=f"out-{i}", status="sent")

    timer.observe(Message(schema=1, id="in-1", channel="whatsapp", direction="inbound",
                          account_id="1", conversation_id=conv, sender=Party("2"),
                          recipient=Party("1"), timestamp=t, message_id="in", type="text",
                          text="hi"))
    timer.observe(sent(1, t - timedelta(seconds=5)))  # an earlier reply's status, arriving late
    timer.observe(sent(2, t + timedelta(seconds=60)))
    labels = {"channel": "whatsapp"}
    registry = metrics.registry
    assert registry.get_sample_value("gateway_response_time_seconds_count", labels) == 1
    assert registry.get_sample_value("gateway_response_time_seconds_sum", labels) == 60


async def test_the_dead_letter_gauge_returns_to_0_when_a_sinks_last_letter_goes(
        gateway, monkeypatch):
    from gateway import app as gwapp
    from gateway.journal import StoredEvent

    monkeypatch.setattr(gwapp, "HOUSEKEEPING_SECONDS", 0.05)
    gw = await gateway()
    journal = gw.app[keys.JOURNAL]
    registry = gw.app[keys.METRICS].registry
    label = {"sink": "normalise:whatsapp"}
    await journal.add_dead_letters("normalise:whatsapp", [(StoredEvent(0, b"raw", 1.0),
                                                           "request:1", "BadPayload", 1)])
    for _ in range(100):
        if registry.get_sample_value("gateway_dead_letters", label) == 1:
            break
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("gateway_dead_letters", label) == 1
    [letter] = await journal.dead_letters("normalise:whatsapp")
    await journal.finish_replays([letter.id])  # gone (as an erasure deletes it)
    for _ in range(100):
        if registry.get_sample_value("gateway_dead_letters", label) == 0:
            break
        await asyncio.sleep(0.05)
    assert registry.get_sample_value("gateway_dead_letters", label) == 0


async def test_meta_error_series_stay_bounded(gateway):
    """gateway_meta_errors_total: the first NOTICE_SERIES (account, code) pairs keep their
    labels, later new ones are counted as account and code "other"."""
    import json

    from gateway import keys
    from gateway.processor import NOTICE_SERIES
    from tests.conftest import fixture_bytes

    gw = await gateway()
    body = json.loads(fixture_bytes("whatsapp/change_errors.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["errors"] = [{"code": 500000 + i, "title": "x"} for i in range(NOTICE_SERIES + 5)]
    assert (await gw.post("whatsapp", json.dumps(body).encode()))[0] == 200
    await gw.settle()
    registry = gw.app[keys.METRICS].registry
    account = value["metadata"]["phone_number_id"]

    def count(account: str, code: str) -> float | None:
        return registry.get_sample_value("gateway_meta_errors_total", {
            "channel": "whatsapp", "account": account, "code": code})

    assert count(account, "500000") == 1 and count(account, str(500000 + NOTICE_SERIES - 1)) == 1
    assert count(account, str(500000 + NOTICE_SERIES)) is None
    assert count("other", "other") == 5
    series = [s for m in registry.collect() if m.name == "gateway_meta_errors"
              for s in m.samples if s.name.endswith("_total")]
    assert len(series) == NOTICE_SERIES + 1


async def test_normalise_failures_are_exported_from_0_for_every_channel(gateway):
    """Before any failure, so that the alert's increase() sees the first one (a series born
    at its first failure starts at 1, and increase() finds no change)."""
    gw = await gateway()
    registry = gw.app[keys.METRICS].registry
    for channel in gw.app[keys.CHANNELS]:
        assert registry.get_sample_value("gateway_normalise_failures_total",
                                         {"channel": channel}) == 0.0, channel
