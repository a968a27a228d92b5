"""Crash safety: a gateway killed with SIGKILL under load loses nothing it acknowledged and,
after a restart, delivers every acknowledged event to the sinks exactly once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import aiohttp
import pytest

from gateway.testing import GatewayProcess, sign_headers
from tests.conftest import CHANNELS_TOML, SECRET

pytestmark = pytest.mark.slow

CONFIG = """
[server]
port = {port}
metrics_port = {metrics_port}
data_dir = "{data_dir}"
shutdown_timeout = 10
""" + CHANNELS_TOML + """
[sinks.jsonl]
[sinks.storage]
"""


def message_body(i: int) -> bytes:
    """A distinct signed-able WhatsApp text webhook (never the same body twice)."""
    customer = f"1555{i % 50:07d}"
    return json.dumps({
        "object": "whatsapp_business_account",
        "entry": [{"id": "190000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001000",
                         "phone_number_id": "100000000000001"},
            "contacts": [{"profile": {"name": "Load Test"}, "wa_id": customer}],
            "messages": [{"from": customer, "id": f"wamid.CRASH.{i}",
                          "timestamp": str(1760000000 + i),
                          "type": "text", "text": {"body": f"message {i}"}}]}}]}],
    }, separators=(",", ":")).encode()


async def _load(url: str, start: int, seconds: float, acked: set[str], workers: int = 16) -> int:
    """POST distinct messages until ``seconds`` pass or the server dies; remember the 200s."""
    counter = iter(range(start, start + 1_000_000))
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            body = message_body(i)
            try:
                async with session.post(url, data=body, headers=sign_headers(SECRET, body)) as r:
                    if r.status == 200:
                        acked.add(f"wamid.CRASH.{i}")
            except (TimeoutError, aiohttp.ClientError, OSError):
                return  # the gateway is gone: stop this worker

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return next(counter)


def _jsonl_ids(proc: GatewayProcess) -> list[str]:
    path = proc.data_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["message_id"] for line in path.read_bytes().splitlines()]


async def _wait_for(proc: GatewayProcess, acked: set[str], timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = _jsonl_ids(proc)
        if acked <= set(ids):
            await asyncio.sleep(1.0)  # anything replayed twice would show up now
            return _jsonl_ids(proc)
        await asyncio.sleep(0.1)
    missing = acked - set(_jsonl_ids(proc))
    raise AssertionError(f"{len(missing)} acknowledged messages missing, "
                         f"e.g. {sorted(missing)[:3]}")


async def test_sigkill_under_load_loses_nothing_and_duplicates_nothing(tmp_path):
    proc = GatewayProcess(tmp_path, CONFIG)
    url = proc.url + "/webhooks/whatsapp"
    acked: set[str] = set()
    next_i = 0
    try:
        for round_ in range(3):
            proc.start()
            load = asyncio.create_task(_load(url, next_i, seconds=10.0, acked=acked))
            await asyncio.sleep(1.0 + 0.5 * round_)
            proc.kill()  # SIGKILL mid-stream: no flush, no drain
            next_i = await load
        proc.start()
        ids = await _wait_for(proc, acked)
    finally:
        proc.kill()
    assert len(acked) > 100, "the load did not get going"
    assert len(ids) == len(set(ids)), "an event reached the jsonl sink twice"
    assert acked <= set(ids)
    db = sqlite3.connect(proc.data_dir / "storage.db")
    stored = db.execute("SELECT count(*) FROM messages WHERE message_id LIKE 'wamid.CRASH.%'")
    counted = db.execute("SELECT sum(message_count) FROM conversations")
    assert stored.fetchone()[0] == counted.fetchone()[0] == len(set(ids))


async def test_sigterm_drains_and_exits_cleanly(tmp_path):
    proc = GatewayProcess(tmp_path, CONFIG)
    acked: set[str] = set()
    proc.start()
    try:
        await _load(proc.url + "/webhooks/whatsapp", 0, seconds=1.5, acked=acked)
        assert proc.stop() == 0
        log = proc.log()
        assert "gateway_stopped" in log
        assert SECRET not in log and "test-verify-token" not in log  # secrets are never logged
        assert all(line.startswith("{") for line in log.splitlines() if line)  # JSON off a terminal
        assert acked <= set(_jsonl_ids(proc)), "SIGTERM did not drain what was acknowledged"
        db = sqlite3.connect(proc.data_dir / "journal.db")
        assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 0
    finally:
        proc.kill()


@pytest.mark.parametrize("fast", [True, False])
async def test_sigterm_answers_a_request_whose_body_is_still_arriving(tmp_path, fast):
    """A webhook whose body is half sent when SIGTERM comes is still read, journaled and
    answered 200 within the shutdown timeout, on the lean path and on aiohttp's (whose own
    shutdown reads no more bytes: it used to leave the client without an answer)."""
    import signal
    import socket

    proc = GatewayProcess(tmp_path, CONFIG.replace(
        "shutdown_timeout = 10", f"shutdown_timeout = 10\nfast_intake = {str(fast).lower()}"))
    proc.start()
    try:
        body = message_body(7)
        head = (b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in sign_headers(SECRET, body).items())
                + f"Content-Length: {len(body)}\r\n\r\n".encode())
        sock = socket.create_connection(("127.0.0.1", proc.port))
        sock.settimeout(8)
        sock.sendall(head + body[:20])
        await asyncio.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        sock.sendall(body[20:])
        answer = await asyncio.to_thread(sock.recv, 4096)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        assert proc.proc.wait(30) == 0
        proc.proc = None
        assert _jsonl_ids(proc) == ["wamid.CRASH.7"]
    finally:
        proc.kill()
