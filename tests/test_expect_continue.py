"""``Expect: 100-continue``: a request the gateway refuses whatever its body is answered before
the client uploads it (and its connection closed); any other gets ``100 Continue`` and is served.

Over raw sockets, since an HTTP client library hides the interim response."""

from __future__ import annotations

import asyncio
import json

from gateway import keys
from gateway.signatures import sign
from tests.conftest import SECRET, fixture_bytes
from tests.test_listener import read_response

TEXT = fixture_bytes("whatsapp/text.json")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def head(path: str, length: int, extra: bytes = b"", expect: bytes = b"100-continue") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nExpect: " + expect + b"\r\n" + extra
            + b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def webhook_head(body: bytes, channel: str = "whatsapp", length: int | None = None) -> bytes:
    signature = b"X-Hub-Signature-256: " + sign(SECRET.encode(), body).encode() + b"\r\n"
    return head(f"/webhooks/{channel}", len(body) if length is None else length, signature)


async def refused_before_upload(gw, data: bytes) -> tuple[int, dict, bytes]:
    """Send only a head; the final answer must come without a 100 and close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(data)
        answer = await read_response(reader)
        assert answer[1]["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        return answer
    finally:
        writer.close()


async def continued(gw, data: bytes, body: bytes) -> tuple[int, dict, bytes]:
    """Send a head, wait for ``100 Continue``, then the body; the final answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(data)
        assert await asyncio.wait_for(reader.readexactly(len(CONTINUE)), 5) == CONTINUE
        writer.write(body)
        return await read_response(reader)
    finally:
        writer.close()


def webhooks(gw, outcome: str) -> float | None:
    return gw.app[keys.METRICS].registry.get_sample_value(
        "gateway_webhook_requests_total", {"channel": "whatsapp", "outcome": outcome})


async def test_a_webhook_that_can_be_accepted_gets_100_continue_then_200(gateway):
    gw = await gateway()
    status, _, body = await continued(gw, webhook_head(TEXT), TEXT)
    assert status == 200 and json.loads(body) == {"status": "accepted"}
    await gw.settle()
    assert [e["type"] for e in gw.jsonl()] == ["text"]


async def test_a_webhook_over_the_size_limit_is_413_before_its_upload(gateway):
    gw = await gateway(extra="max_body_bytes = 2048")
    status, _, body = await refused_before_upload(gw, webhook_head(TEXT, length=4096))
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    assert webhooks(gw, "too_large") == 1


async def test_a_webhook_for_an_unknown_channel_is_404_before_its_upload(gateway):
    gw = await gateway()
    status, _, body = await refused_before_upload(gw, webhook_head(TEXT, channel="telegram"))
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_channel"


async def test_a_webhook_the_budget_has_no_room_for_is_503_before_its_upload(gateway):
    gw = await gateway(extra="max_body_bytes = 2048\nmax_buffered_bytes = 2048\n"
                             "[queue]\nretry_after_seconds = 17")
    gw.app[keys.BUDGET].held = 2048 - len(TEXT) + 1  # what other connections hold
    status, headers, body = await refused_before_upload(gw, webhook_head(TEXT))
    assert status == 503 and headers["retry-after"] == "17"
    assert json.loads(body)["error"]["code"] == "busy"
    gw.app[keys.BUDGET].held = 0
    assert (await continued(gw, webhook_head(TEXT), TEXT))[0] == 200  # room again


async def test_a_webhook_while_the_journal_is_full_is_503_before_its_upload(gateway):
    gw = await gateway(extra="[queue]\nmax_pending = 1\nretry_after_seconds = 9")
    journal = gw.app[keys.JOURNAL]
    journal.pending += 1  # one request journaled and not yet processed
    try:
        status, headers, body = await refused_before_upload(gw, webhook_head(TEXT))
    finally:
        journal.pending -= 1
    assert status == 503 and headers["retry-after"] == "9"
    assert json.loads(body)["error"]["code"] == "journal_full"
    assert webhooks(gw, "unavailable") == 1


async def test_an_unknown_expectation_is_417(gateway):
    gw = await gateway()
    status, _, body = await refused_before_upload(
        gw, head("/webhooks/whatsapp", len(TEXT), expect=b"something-else"))
    assert status == 417 and json.loads(body)["error"]["code"] == "expectation_failed"


async def test_post_v1_messages_refuses_before_the_upload(gateway):
    gw = await gateway(extra='api_token = "t0k"\nmax_body_bytes = 2048')
    auth = b"Authorization: Bearer t0k\r\n"
    status, _, _ = await refused_before_upload(gw, head("/v1/messages", 100))
    assert status == 401  # no bearer token
    status, _, body = await refused_before_upload(gw, head("/v1/messages", 100, auth))
    assert status == 503 and json.loads(body)["error"]["code"] == "outbound_disabled"
