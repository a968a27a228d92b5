"""De-duplication across a restart of a real ``gateway serve`` process (SQLite journal, the
default): a payload delivered before the restart and redelivered after it reaches the sinks once.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from gateway.testing import GatewayProcess
from tests.conftest import SECRET, fixture_bytes
from tests.test_crash import CONFIG

BEFORE = ["whatsapp/batch_mixed.json", "instagram/text.json"]  # 8 + 1 events
BARRIER = "whatsapp/image.json"  # new after the restart: once it is in the sink, all is processed


def _post(proc: GatewayProcess, name: str) -> int:
    return proc.post_webhook(name.split("/")[0], fixture_bytes(name), SECRET)


def _jsonl(proc: GatewayProcess) -> list[dict]:
    path = proc.data_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def _wait_for(proc: GatewayProcess, count: int, timeout: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = _jsonl(proc)
        if len(events) >= count:
            return events
        time.sleep(0.05)
    raise AssertionError(f"{len(_jsonl(proc))} events in the jsonl sink, expected {count}")


def _metric(proc: GatewayProcess, sample: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("restart", ["sigterm", "sigkill"])
def test_redelivery_after_a_restart_is_one_event(tmp_path, restart):
    proc = GatewayProcess(tmp_path, CONFIG)
    try:
        proc.start()
        for name in BEFORE:
            assert _post(proc, name) == 200
        before = _wait_for(proc, 9)
        if restart == "sigterm":
            assert proc.stop() == 0
        else:
            time.sleep(0.3)  # the sinks have it; the crash comes after, with nothing flushed
            proc.kill()
        proc.start()
        for name in BEFORE:
            assert _post(proc, name) == 200  # Meta's redelivery is acknowledged like any POST
        assert _post(proc, BARRIER) == 200
        _wait_for(proc, 10)
        time.sleep(0.5)  # anything stored twice would show up by now
        events = _jsonl(proc)
        duplicates = _metric(
            proc, 'gateway_webhook_requests_total{channel="whatsapp",outcome="duplicate"}')
        ig_duplicates = _metric(
            proc, 'gateway_webhook_requests_total{channel="instagram",outcome="duplicate"}')
    finally:
        proc.kill()
    assert len(events) == 10, [e.get("message_id") for e in events]
    assert len({e["id"] for e in events}) == 10
    assert events[:9] == before
    assert events[9]["message_id"] == "wamid.TEST.IN.IMAGE.0001"
    assert (duplicates, ig_duplicates) == (1.0, 1.0)
    db = sqlite3.connect(proc.data_dir / "storage.db")
    try:
        (stored,) = db.execute(
            "SELECT count(*) FROM messages WHERE message_id = 'aWdfTEST_IN_0001'").fetchone()
        (count,) = db.execute(
            "SELECT message_count FROM conversations WHERE id = ?",
            (next(e for e in before if e["channel"] == "instagram")["conversation_id"],)
        ).fetchone()
    finally:
        db.close()
    assert (stored, count) == (1, 1)
