"""Webhook intake through a real gateway on 127.0.0.1: handshake, signatures, errors, limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import time

import aiohttp
import pytest

from gateway import keys
from gateway.signatures import sign
from gateway.testing import sign_headers
from tests.conftest import SECRET, VERIFY, fixture_bytes
from tests.test_listener import exchange, post

TEXT = "whatsapp/text.json"


def _metric(gw, channel: str, outcome: str) -> float:
    value = gw.app[keys.METRICS].registry.get_sample_value(
        "gateway_webhook_requests_total", {"channel": channel, "outcome": outcome})
    return value or 0.0


def _assert_error(body, code: str) -> None:
    assert isinstance(body, dict), body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_handshake_right_token_echoes_challenge(gateway):
    gw = await gateway()
    status, body, resp = await gw.get("/webhooks/whatsapp", params={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"})
    assert status == 200 and body == 1158201444  # the text "1158201444", parsed by the helper
    assert resp.content_type == "text/plain"


async def test_handshake_wrong_token_is_403(gateway):
    gw = await gateway()
    status, body, _ = await gw.get("/webhooks/instagram", params={
        "hub.mode": "subscribe", "hub.verify_token": "nope", "hub.challenge": "42"})
    assert status == 403
    _assert_error(body, "forbidden")
    assert "42" not in json.dumps(body)


async def test_handshake_without_mode_is_400(gateway):
    gw = await gateway()
    status, body, _ = await gw.get("/webhooks/whatsapp", params={"hub.challenge": "1"})
    assert status == 400
    _assert_error(body, "bad_request")


async def test_valid_signature_is_accepted(gateway):
    gw = await gateway()
    status, body = await gw.post("whatsapp", fixture_bytes(TEXT))
    assert status == 200 and body == {"status": "accepted"}
    assert _metric(gw, "whatsapp", "accepted") == 1


@pytest.mark.parametrize("case", ["missing", "wrong", "wrong_secret", "altered", "reserialised",
                                  "sha1_only", "no_prefix", "short"])
async def test_bad_signatures_are_401(gateway, case):
    gw = await gateway()
    body = fixture_bytes("whatsapp/unicode_text.json")
    headers = sign_headers(SECRET, body)
    sent = body
    if case == "missing":
        del headers["X-Hub-Signature-256"]
    elif case == "wrong":
        headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    elif case == "wrong_secret":
        headers = sign_headers("another-secret", body)
    elif case == "altered":
        sent = body[:-2] + bytes([body[-2] ^ 1]) + body[-1:]
    elif case == "reserialised":
        sent = json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":")).encode()
        assert sent != body
    elif case == "sha1_only":
        del headers["X-Hub-Signature-256"]
        headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    elif case == "no_prefix":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"][7:]
    elif case == "short":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"][:-1]
    status, answer = await gw.post("whatsapp", sent, secret=None, headers=headers)
    assert status == 401
    _assert_error(answer, "bad_signature")
    sent_header = headers.get("X-Hub-Signature-256")
    if sent_header:
        assert sent_header[7:] not in json.dumps(answer)  # nothing about digests is echoed
    assert _metric(gw, "whatsapp", "bad_signature") == 1
    await gw.settle()
    assert gw.jsonl() == []


def _assert_error_shape(body, code: str) -> None:
    """Exactly the contract's error body: ``{"error": {"code": ..., "message": ...}}``."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("channel", ["whatsapp", "instagram"])
@pytest.mark.parametrize("signature", ["missing", "wrong", "wrong_secret"])
@pytest.mark.parametrize("body", [b"{not json", b'{"hello": "world"}', b"[1, 2, 3]", b"",
                                  b'{"object": "page_of_something_else", "entry": []}'],
                         ids=["not_json", "not_meta", "json_array", "empty", "other_object"])
async def test_signature_is_checked_before_any_parsing(gateway, channel, signature, body):
    """A body that would be a 400 is a 401 first when unsigned: the signature comes first."""
    gw = await gateway()
    headers = {"Content-Type": "application/json"}
    if signature == "wrong":
        headers["X-Hub-Signature-256"] = "sha256=" + "f" * 64
    elif signature == "wrong_secret":
        headers.update(sign_headers("another-secret", body))
    async with gw.session.post(f"{gw.url}/webhooks/{channel}", data=body,
                               headers=headers) as resp:
        assert resp.status == 401, await resp.text()
        assert resp.content_type == "application/json"
        _assert_error_shape(await resp.json(), "bad_signature")
    assert _metric(gw, channel, "bad_signature") == 1
    assert _metric(gw, channel, "bad_request") == 0
    # the same bytes correctly signed are refused by the envelope check: a 400, not a 200
    status, answer = await gw.post(channel, body)
    assert status == 400
    _assert_error_shape(answer, "bad_request")
    assert _metric(gw, channel, "bad_request") == 1
    assert gw.app[keys.JOURNAL].pending == 0
    await gw.settle()
    assert gw.jsonl() == []


async def test_signature_over_escaped_slashes_verifies(gateway):
    gw = await gateway()
    body = fixture_bytes("instagram/image.json")
    assert b"\\/" in body
    status, _ = await gw.post("instagram", body)
    assert status == 200


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "JSON"),
    (b"", "JSON"),
    (b'{"hello": "world"}', "envelope"),
    (b'[1, 2, 3]', "envelope"),
    (b'{"object": "instagram", "entry": []}', "whatsapp_business_account"),
    (b'{"object": "whatsapp_business_account", "entry": {"id": 1}}', "entry"),
    (b'{"object": "whatsapp_business_account", "entry": [{"id": "1", "x": '
     + b"[" * 50_000 + b"]" * 50_000 + b"}]}", "nested too deeply"),  # never a 500
])
async def test_not_a_meta_envelope_is_400(gateway, body, fragment):
    gw = await gateway()
    status, answer = await gw.post("whatsapp", body)
    assert status == 400
    _assert_error(answer, "bad_request")
    assert fragment.lower() in answer["error"]["message"].lower()
    assert _metric(gw, "whatsapp", "bad_request") == 1


async def test_oversized_body_is_413(gateway):
    gw = await _small_limit(gateway)
    body = b'{"object":"whatsapp_business_account","entry":[],"pad":"' + b"x" * 4096 + b'"}'
    status, answer = await gw.post("whatsapp", body)
    assert status == 413
    _assert_error(answer, "payload_too_large")
    assert _metric(gw, "whatsapp", "too_large") == 1


async def test_oversized_chunked_body_is_413(gateway):
    gw = await _small_limit(gateway)

    async def chunks():
        for _ in range(8):
            yield b"x" * 1024

    headers = sign_headers(SECRET, b"")
    async with gw.session.post(f"{gw.url}/webhooks/whatsapp", data=chunks(),
                               headers=headers) as resp:
        assert resp.status == 413
        _assert_error(await resp.json(), "payload_too_large")


async def _small_limit(gateway):
    gw = await gateway(extra="max_body_bytes = 2048")
    assert gw.config.server.max_body_bytes == 2048
    return gw


async def test_unknown_channel_is_404(gateway):
    gw = await gateway()
    status, answer = await gw.post("telegram", fixture_bytes(TEXT))
    assert status == 404
    _assert_error(answer, "unknown_channel")
    status, answer, _ = await gw.get("/webhooks/telegram", params={"hub.mode": "subscribe"})
    assert status == 404


async def test_unknown_route_and_method_are_json(gateway):
    gw = await gateway()
    status, answer, _ = await gw.get("/nowhere")
    assert status == 404
    _assert_error(answer, "not_found")
    async with gw.session.put(f"{gw.url}/webhooks/whatsapp", data=b"{}") as resp:
        assert resp.status == 405
        _assert_error(await resp.json(), "method_not_allowed")


async def test_journal_full_is_503_with_retry_after(gateway):
    gw = await gateway(extra="[queue]\nmax_pending = 1\nretry_after_seconds = 17")
    processor = gw.app[keys.PROCESSOR]
    processor.stop()  # returns once the journal is empty; nothing is processed after that
    await gw.settle()
    assert (await gw.post("whatsapp", fixture_bytes(TEXT)))[0] == 200
    status, answer = await gw.post("whatsapp", fixture_bytes("whatsapp/image.json"))
    assert status == 503
    _assert_error(answer, "journal_full")
    async with gw.session.post(f"{gw.url}/webhooks/whatsapp", data=fixture_bytes(TEXT),
                               headers=sign_headers(SECRET, fixture_bytes(TEXT))) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "17"
    assert _metric(gw, "whatsapp", "unavailable") == 2


async def test_concurrent_requests_cannot_overfill_the_journal(gateway):
    """``pending`` grows only when a commit lands: appends in flight count against the limit."""
    gw = await gateway(extra="[queue]\nmax_pending = 3\nretry_after_seconds = 17")
    gw.app[keys.PROCESSOR].stop()  # returns once the journal is empty; nothing processed after
    await gw.settle()
    journal = gw.app[keys.JOURNAL]
    # The journal's writer is held busy, so every request arrives while the first appends wait
    # for their commit.
    busy = asyncio.ensure_future(journal._writer.run(lambda c: time.sleep(0.3)))
    body = fixture_bytes(TEXT)

    async def one(i: int) -> tuple[int, str | None]:
        data = body.replace(b"wamid.", b"wamid.C%03d" % i)
        async with gw.session.post(f"{gw.url}/webhooks/whatsapp", data=data,
                                   headers=sign_headers(SECRET, data)) as resp:
            return resp.status, resp.headers.get("Retry-After")

    answers = await asyncio.gather(*(one(i) for i in range(20)))
    assert sorted(answers, key=str) == [(200, None)] * 3 + [(503, "17")] * 17
    assert journal.pending == 3
    assert _metric(gw, "whatsapp", "unavailable") == 17
    await busy


@pytest.mark.parametrize("after,status", [
    (b"", 200), (b" ", 200), (b"\t \t", 200),  # OWS is not part of the value
    (b"\xa0", 401), (b"\x85", 401), (b"\xe9", 401),  # latin-1 NBSP / NEL, or any other byte
    ("\u00a0".encode(), 401), ("\u3000".encode(), 401), ("\u2028".encode(), 401),  # UTF-8
    (b" 0", 401), (b"\x0b", 400), (b"\x0c", 400),  # control bytes: aiohttp's 400 on both
], ids=repr)
async def test_bytes_after_the_digest_get_the_same_answer_on_both_paths(gateway, after, status):
    """The same raw bytes in the signature header: the same status from the lean path and the
    aiohttp route (each is checked against the one expected here)."""
    gw = await gateway()
    body = fixture_bytes(TEXT)
    signature = sign(SECRET.encode(), body).encode()
    data = post(body).replace(signature, signature + after)
    [(got, _, answer)] = await exchange(gw, data)
    assert got == status, answer
    if status == 401:
        _assert_error_shape(json.loads(answer), "bad_signature")


async def test_health_and_readiness(gateway):
    gw = await gateway()
    status, body, _ = await gw.get("/healthz")
    assert status == 200 and body == {"status": "ok"}
    status, body, _ = await gw.get("/readyz")
    assert status == 200 and body["status"] == "ready"
    assert body["checks"] == {"started": True, "journal": True, "sink:jsonl": True,
                              "sink:storage": True}


async def test_insecure_mode_accepts_unsigned_requests(gateway):
    gw = await gateway(extra="insecure_skip_signature = true",
                       channels="[channels.whatsapp]\n")
    status, _ = await gw.post("whatsapp", fixture_bytes(TEXT), secret=None)
    assert status == 200


async def test_insecure_mode_still_checks_every_channel_that_has_a_secret(gateway):
    """The flag lets a channel *without* an app secret run unsigned; it never switches off the
    check of a channel that has one (set only to get past one channel, it would otherwise open
    them all)."""
    gw = await gateway(extra="insecure_skip_signature = true",
                       channels=f'[channels.whatsapp]\napp_secret = "{SECRET}"\n'
                                "[channels.instagram]\n")
    status, body = await gw.post("whatsapp", fixture_bytes(TEXT), secret=None)
    assert status == 401 and body["error"]["code"] == "bad_signature"
    status, _ = await gw.post("whatsapp", fixture_bytes(TEXT), secret="not-the-secret")
    assert status == 401
    assert (await gw.post("whatsapp", fixture_bytes(TEXT)))[0] == 200
    status, _ = await gw.post("instagram", fixture_bytes("instagram/text.json"), secret=None)
    assert status == 200


async def test_client_can_reuse_connection_after_errors(gateway):
    gw = await gateway()
    for _ in range(3):
        assert (await gw.post("whatsapp", b"{bad"))[0] == 400
    assert (await gw.post("whatsapp", fixture_bytes(TEXT)))[0] == 200
    assert isinstance(gw.session, aiohttp.ClientSession)


@pytest.fixture(params=["fast", "aiohttp"])
def intake_path(request) -> str:
    """Every test here runs on the main port's lean path and on the aiohttp route."""
    return request.param


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP ", "x-unknown"])
async def test_a_compressed_body_is_refused_before_it_is_read(gateway, encoding):
    """Meta never compresses webhooks. A compressed body is refused (415, JSON) before it is
    read: inflated, a few KB that the byte budget and max_body_bytes see as a few KB would be
    megabytes in memory; one that does not inflate was a 500. Unsigned as signed, and before
    the upload under ``Expect: 100-continue``. ``identity`` is no compression."""
    gw = await gateway()
    bomb = gzip.compress(b" " * 3_000_000)  # about 3 KB on the wire
    for body, headers in ((bomb, {}), (b"not gzip at all", {}), (bomb, {"Expect": "100-continue"}),
                          (bomb, sign_headers(SECRET, bomb))):
        status, answer = await gw.post("whatsapp", body, secret=None,
                                       headers={"Content-Encoding": encoding, **headers})
        assert status == 415, (encoding, headers, answer)
        _assert_error(answer, "unsupported_content_encoding")
        assert "Content-Encoding" in answer["error"]["message"]
    assert _metric(gw, "whatsapp", "bad_request") == 4
    assert gw.app[keys.JOURNAL].pending == 0
    body = fixture_bytes("whatsapp/text.json")
    status, _ = await gw.post("whatsapp", body, headers={"Content-Encoding": "identity"})
    assert status == 200


async def test_a_journal_whose_writer_has_ended_answers_503_on_both_paths(gateway):
    """The journal's thread is gone (its database closed under the running gateway, as after
    an I/O error it could not reopen from): the journal refuses at once instead of failing a
    commit later, and the answer is still 503 journal_unavailable, never a 500."""
    gw = await gateway()
    await gw.app[keys.JOURNAL].close()
    for _ in range(2):
        status, answer = await gw.post("whatsapp", fixture_bytes(TEXT))
        assert status == 503, answer
        _assert_error(answer, "journal_unavailable")
    assert _metric(gw, "whatsapp", "unavailable") == 2


async def test_a_journal_that_cannot_store_the_body_answers_503_and_recovers(gateway):
    """The journal's disk is full (SQLite's own limit here): its commit fails, nothing was
    stored or counted as accepted, so the answer is 503 with Retry-After (Meta delivers it
    again), not a 500 with a traceback per request; the connection still answers, and once
    there is room the same delivery is accepted."""
    gw = await gateway()
    writer = gw.app[keys.JOURNAL]._writer
    pages = await writer.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await writer.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    envelope["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] = "x" * 50_000
    body = json.dumps(envelope).encode()  # needs new pages: the database may not grow
    for _ in range(3):
        status, answer = await gw.post("whatsapp", body)
        assert status == 503, answer
        _assert_error(answer, "journal_unavailable")
    assert _metric(gw, "whatsapp", "unavailable") == 3
    assert _metric(gw, "whatsapp", "accepted") == 0
    journal = gw.app[keys.JOURNAL]
    assert journal.pending == 0 and journal.appending == 0
    await writer.run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
    assert (await gw.post("whatsapp", body))[0] == 200
    await gw.settle()
    assert [len(e["text"]) for e in gw.jsonl()] == [50_000]


@pytest.mark.parametrize("raw", [
    b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
    b"\r\n{}",
    b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\n folded\r\nContent-Length: 2\r\n\r\n{}",
    b"BR\x01W /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nsecret",
])
async def test_malformed_http_gets_a_json_400_that_echoes_nothing(gateway, raw):
    """What aiohttp's parser refuses is answered with the gateway's JSON error body, not
    aiohttp's text (which echoed the offending bytes back), and the connection is closed."""
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(raw)
        head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")) and b"application/json" in head, head
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert b"secret" not in body and b"folded" not in body
