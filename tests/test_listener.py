"""The main port's lean webhook path (gateway.listener), over raw sockets on 127.0.0.1.

What it answers itself must be answered exactly as the aiohttp route answers; everything else must
reach aiohttp intact, on the same connection, in order.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from gateway import keys, listener
from gateway.listener import parse_head
from gateway.signatures import sign
from tests.conftest import SECRET, fixture_bytes

TEXT = fixture_bytes("whatsapp/text.json")
IMAGE = fixture_bytes("whatsapp/image.json")
HEAD = (b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nX-Hub-Signature-256: sha256=ab\r\nContent-Length: 12")


def fields(count: int) -> bytes:
    """``count`` header fields, each after its CRLF."""
    return b"".join(b"\r\nX-F%03d: 1" % i for i in range(count))


def post(body: bytes, channel: str = "whatsapp", secret: str | None = SECRET,
         extra: bytes = b"", length: int | None = None) -> bytes:
    """A raw webhook POST as Meta (or a proxy in front of us) sends it."""
    signature = b"X-Hub-Signature-256: " + sign(secret.encode(), body).encode() + b"\r\n" \
        if secret else b""
    size = len(body) if length is None else length
    return (b"POST /webhooks/" + channel.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + signature + extra
            + b"Content-Length: " + str(size).encode() + b"\r\n\r\n" + body)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, headers, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 5)
    return status, headers, body


async def exchange(gw, data: bytes, answers: int = 1) -> list[tuple[int, dict, bytes]]:
    """Send ``data`` on a fresh connection; read ``answers`` responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(data)
        await writer.drain()
        return [await read_response(reader) for _ in range(answers)]
    finally:
        writer.close()


def test_parse_head_reads_a_webhook_head():
    head = parse_head(HEAD)
    assert (head.channel, head.length, head.signature, head.close) == (
        "whatsapp", 12, "sha256=ab", False)
    assert parse_head(HEAD + b"\r\nConnection: close").close
    assert parse_head(HEAD + b"\r\nconnection: Keep-Alive").close is False
    assert parse_head(HEAD.replace(b"Content-Length: 12", b"Content-Length:12 ")).length == 12
    assert parse_head(HEAD + fields(listener.MAX_HEADERS - 4)) is not None  # MAX_HEADERS: allowed
    # kept, to be refused (415) on this path: aiohttp would inflate the body while parsing it
    assert parse_head(HEAD + b"\r\nContent-Encoding: gzip").encoding == "gzip"
    assert parse_head(HEAD).encoding is None


@pytest.mark.parametrize("head", [
    HEAD.replace(b"POST", b"PUT"),
    HEAD.replace(b"POST", b"post"),
    HEAD.replace(b"/webhooks/whatsapp", b"/webhooks/whatsapp?x=1"),
    HEAD.replace(b"/webhooks/whatsapp", b"/webhooks/whatsapp/"),
    HEAD.replace(b"/webhooks/whatsapp", b"/webhooks/what%73app"),
    HEAD.replace(b"/webhooks/whatsapp", b"/webhooks/"),
    HEAD.replace(b"HTTP/1.1", b"HTTP/1.0"),
    HEAD + b"\r\nTransfer-Encoding: chunked",
    HEAD + b"\r\nExpect: 100-continue",
    HEAD + b"\r\nUpgrade: websocket\r\nConnection: Upgrade",
    HEAD + b"\r\nConnection: keep-alive, upgrade",
    HEAD + b"\r\nContent-Length: 12",  # repeated (the same value or not)
    HEAD + b"\r\ncontent-length: 13",
    HEAD + b"\r\nX-Hub-Signature-256: sha256=cd",
    HEAD.replace(b"Content-Length: 12", b"Content-Length : 12"),  # space before the colon
    HEAD.replace(b"Content-Length: 12", b"Content-Length: +12"),
    HEAD.replace(b"Content-Length: 12", b"Content-Length: 1 2"),
    HEAD.replace(b"Content-Length: 12", b"Content-Length: 0x1"),
    HEAD.replace(b"Content-Length: 12", b"Content-Length: 1" + b"0" * 15),
    HEAD.replace(b"Content-Length: 12", b"X-No-Length: 1"),
    HEAD + b"\r\n folded continuation",  # obs-fold
    HEAD + b"\r\nX-Evil: a\x00b",
    HEAD + b"\r\nX-Evil: a\rb",
    HEAD + b"\r\nX-Evil: a\nb",
    HEAD + b"\r\n: no name",
    HEAD.replace(b"Host: 127.0.0.1\r\n", b""),  # no Host: aiohttp's 400 (RFC 9112 section 3.2)
    HEAD + fields(listener.MAX_HEADERS - 3),  # one too many: aiohttp's "Too many headers"
])
def test_parse_head_hands_anything_unusual_to_aiohttp(head):
    assert parse_head(head) is None


async def test_webhook_is_answered_and_journaled(gateway):
    gw = await gateway()
    [(status, headers, body)] = await exchange(gw, post(TEXT))
    assert status == 200 and json.loads(body) == {"status": "accepted"}
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["server"] == "multichannel-gateway" and headers["date"].endswith("GMT")
    await gw.settle()
    assert [e["type"] for e in gw.jsonl()] == ["text"]


async def test_keep_alive_and_pipelined_requests_answer_in_order(gateway):
    gw = await gateway()
    bad = post(IMAGE, secret="not-the-secret")
    answers = await exchange(gw, post(TEXT) + bad + post(IMAGE) + post(b"{bad"), answers=4)
    assert [a[0] for a in answers] == [200, 401, 200, 400]
    assert json.loads(answers[1][2])["error"]["code"] == "bad_signature"
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]


async def test_request_split_into_small_pieces(gateway):
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    data = post(TEXT)
    for start in range(0, len(data), 7):
        writer.write(data[start:start + 7])
        await writer.drain()
        await asyncio.sleep(0)
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == 200


async def test_a_request_that_starts_like_a_webhook_but_is_not_goes_to_aiohttp(gateway):
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(b"POST /webhooks/whatsa")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"pp/extra HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = await read_response(reader)
    writer.close()
    assert status == 404 and "aiohttp" in headers["server"]
    assert json.loads(body)["error"]["code"] == "not_found"


async def test_other_requests_are_handed_to_aiohttp_on_the_same_connection(gateway):
    gw = await gateway()
    chunked = (b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"X-Hub-Signature-256: " + sign(SECRET.encode(), IMAGE).encode() + b"\r\n\r\n"
               + f"{len(IMAGE):x}\r\n".encode() + IMAGE + b"\r\n0\r\n\r\n")
    answers = await exchange(
        gw, post(TEXT) + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + chunked + post(TEXT),
        answers=4)
    assert [a[0] for a in answers] == [200, 200, 200, 200]
    assert answers[0][1]["server"] == "multichannel-gateway"
    assert all("aiohttp" in a[1]["server"] for a in answers[1:])  # the connection is aiohttp's
    assert json.loads(answers[1][2]) == {"status": "ok"}
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]  # text once: a redelivery


async def test_a_malformed_head_gets_aiohttps_400(gateway):
    gw = await gateway()
    twice = post(TEXT).replace(b"Content-Length:", b"Content-Length: 3\r\nContent-Length:", 1)
    [(status, headers, _)] = await exchange(gw, twice)
    assert status == 400 and "aiohttp" in headers["server"]
    await gw.settle()
    assert gw.jsonl() == []


@pytest.mark.parametrize("data", [
    post(TEXT).replace(b"Host: 127.0.0.1\r\n", b""),
    post(TEXT, extra=fields(listener.MAX_HEADERS - 3)[2:] + b"\r\n"),  # one too many, with post's 4
], ids=["no_host", "too_many_fields"])
async def test_heads_aiohttp_refuses_get_its_400(gateway, data):
    gw = await gateway()
    [(status, headers, _)] = await exchange(gw, data)
    assert status == 400 and "aiohttp" in headers["server"]
    await gw.settle()
    assert gw.jsonl() == []


async def test_errors_match_the_aiohttp_route(gateway, tmp_path):
    """Each refusal, byte for byte in its JSON body, with the same status and headers."""
    cases = [post(TEXT, secret=None), post(TEXT, secret="wrong"),
             post(TEXT).replace(b'"text"', b'"texT"'),  # the body altered after signing
             post(b"[1, 2]"), post(b'{"object": "page", "entry": []}'),
             post(TEXT, channel="telegram")]
    fast = await gateway()
    got = [(await exchange(fast, data))[0] for data in cases]
    await fast.server.close()  # the same data directory: one gateway at a time
    slow = await gateway(extra="fast_intake = false")
    want = [(await exchange(slow, data))[0] for data in cases]
    assert [g[0] for g in got] == [w[0] for w in want] == [401, 401, 401, 400, 400, 404]
    assert [g[2] for g in got] == [w[2] for w in want]
    assert all(g[1]["content-type"] == w[1]["content-type"] for g, w in zip(got, want, strict=True))


async def test_oversized_body_is_413_and_the_connection_closes(gateway):
    gw = await gateway(extra="max_body_bytes = 2048")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(post(b"x" * 4096))
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    writer.close()


async def test_journal_full_is_503_with_retry_after(gateway):
    gw = await gateway(extra="[queue]\nmax_pending = 1\nretry_after_seconds = 17")
    gw.app[keys.PROCESSOR].stop()  # returns once the journal is empty; nothing processed after
    await gw.settle()
    [_, (status, headers, body)] = await exchange(gw, post(TEXT) + post(IMAGE), answers=2)
    assert status == 503 and headers["retry-after"] == "17"
    assert json.loads(body)["error"]["code"] == "journal_full"


async def test_connection_close_is_honoured(gateway):
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(post(TEXT, extra=b"Connection: close\r\n") + post(IMAGE))
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the second request is not read
    writer.close()
    await gw.settle()
    assert [e["type"] for e in gw.jsonl()] == ["text"]


async def test_idle_connections_are_closed(gateway, monkeypatch):
    monkeypatch.setattr(listener, "KEEPALIVE_SECONDS", 0.2)
    monkeypatch.setattr(listener, "SWEEP_SECONDS", 0.05)
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(post(TEXT))
    assert (await read_response(reader))[0] == 200
    writer.write(b"POST /webhooks/whatsapp HTTP/1.1\r\n")  # half a head, then silence
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_shutdown_answers_the_request_in_flight(gateway):
    gw = await gateway()
    journal = gw.app[keys.JOURNAL]
    original = journal.append
    entered = asyncio.Event()

    async def slow_append(*args):
        entered.set()
        await asyncio.sleep(0.3)
        await original(*args)

    journal.append = slow_append
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(post(TEXT))
    await entered.wait()
    closing = asyncio.create_task(gw.server.close())
    status, headers, _ = await read_response(reader)
    await closing
    assert status == 200 and headers["connection"] == "close"
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.close()
    assert (gw.data_dir / "events.jsonl").read_bytes().count(b"\n") == 1  # drained into the sink


async def test_shutdown_reads_and_answers_a_body_still_arriving(gateway):
    gw = await gateway()
    request = post(TEXT)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    idle = await asyncio.open_connection("127.0.0.1", gw.server.port)  # nothing sent: closed
    head_end = request.index(b"\r\n\r\n") + 4
    writer.write(request[:head_end + 10])
    await writer.drain()
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(gw.server.close())
    await asyncio.sleep(0.2)
    assert await idle[0].read() == b""
    writer.write(request[head_end + 10:])
    status, headers, _ = await read_response(reader)
    await closing
    assert status == 200 and headers["connection"] == "close"
    writer.close()
    idle[1].close()
    assert (gw.data_dir / "events.jsonl").read_bytes().count(b"\n") == 1


async def test_many_pipelined_requests_past_the_read_pause(gateway, monkeypatch):
    monkeypatch.setattr(listener, "MAX_PIPELINED", 4096)
    gw = await gateway()
    bodies = [TEXT.replace(b"wamid.", b"wamid.P%03d" % i) for i in range(60)]
    answers = await exchange(gw, b"".join(post(b) for b in bodies), answers=60)
    assert [a[0] for a in answers] == [200] * 60
    await gw.settle()
    assert len(gw.jsonl()) == 60


async def test_thousands_of_pipelined_refusals_are_all_answered(gateway):
    """Refusals are answered without a journal wait; each must not start the next one from
    inside the last (a pipeline of them would recurse once per request)."""
    gw = await gateway()
    count = 3000
    data = post(b'{"object":"whatsapp_business_account","entry":[]}', secret="not-the-secret")
    answers = await exchange(gw, data * count, answers=count)
    assert {a[0] for a in answers} == {401} and len(answers) == count


async def test_a_body_in_many_small_pieces_is_answered_and_its_head_parsed_once(
        gateway, monkeypatch):
    calls = []
    parse = listener.parse_head
    monkeypatch.setattr(listener, "parse_head", lambda head: calls.append(1) or parse(head))
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = post(TEXT, extra=fields(listener.MAX_HEADERS - 4)[2:] + b"\r\n") + post(IMAGE)
    body_start = data.index(b"\r\n\r\n") + 4
    writer.write(data[:body_start])
    for start in range(body_start, len(data), 3):
        writer.write(data[start:start + 3])
        await writer.drain()
        await asyncio.sleep(0)
    answers = [await read_response(reader) for _ in range(2)]
    writer.close()
    assert [a[0] for a in answers] == [200, 200]
    assert [a[1]["server"] for a in answers] == ["multichannel-gateway"] * 2  # not handed off
    assert len(calls) == 2  # one parse per request, however its body arrives
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]


async def test_a_client_that_does_not_read_holds_a_bounded_write_buffer(gateway, monkeypatch):
    """Pipelined requests from a client that reads nothing: answers stop at the transport's
    high-water mark (and reading pauses), then all arrive, in order, once the client reads."""
    monkeypatch.setattr(listener, "MAX_PIPELINED", 4096)
    gw = await gateway()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", gw.server.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)  # reads 2 KB at most
    while not gw.server._listener.connections:
        await asyncio.sleep(0.01)
    [conn] = gw.server._listener.connections
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.transport.set_write_buffer_limits(high=16384)
    requests = [post(b"{bad") if i % 3 == 0 else post(b"{}", secret=None) for i in range(2000)]
    writer.write(b"".join(requests + [post(TEXT)]))  # ~600 KB of answers, none read yet
    await asyncio.sleep(0.5)
    assert conn.transport.get_write_buffer_size() < 16384 + 1024  # one answer past the mark
    assert conn.paused and conn.write_paused
    answers = [await read_response(reader) for _ in range(len(requests) + 1)]
    writer.close()
    assert [a[0] for a in answers] == [400 if i % 3 == 0 else 401
                                       for i in range(len(requests))] + [200]
    await gw.settle()
    assert [e["type"] for e in gw.jsonl()] == ["text"]


async def test_an_upload_the_client_abandons_is_freed_at_once(gateway):
    # aiohttp keeps the ConnectionResetError of an abandoned body in the request's payload, and
    # its traceback held the request: a cycle that kept every abandoned body (up to 3 MB) alive
    # until a full collection, which the raised GC threshold makes rare. Now nothing waits.
    import gc

    from aiohttp import web

    gw = await gateway()
    head = (b"POST /webhooks/whatsapp?via=aiohttp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 200000\r\n\r\n")
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
            writer.write(head + b"x" * 100_000)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        alive = [o for o in gc.get_objects() if isinstance(o, web.BaseRequest)]
    finally:
        gc.enable()
    assert alive == []
    assert (await gw.post("whatsapp", TEXT))[0] == 200  # and the gateway carries on


async def wait_for(predicate, timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds (the gateway runs on this loop, between the polls)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_bodies_over_the_buffer_budget_get_503_and_the_connection_closes(gateway):
    """The budget counts a body at its declared length from its head on, across connections."""
    gw = await gateway(extra="max_body_bytes = 2048\nmax_buffered_bytes = 2048\n"
                             "[queue]\nretry_after_seconds = 17")
    served = gw.server._listener
    first = post(TEXT)  # its declared body and IMAGE's: more than 2048 bytes
    body_start = first.index(b"\r\n\r\n") + 4
    reader1, writer1 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer1.write(first[:body_start + 10])
    await wait_for(lambda: served.buffered > 0)
    assert served.buffered == len(first)  # 10 body bytes received, all of them counted
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer2.write(post(IMAGE))
    status, headers, body = await read_response(reader2)
    assert status == 503 and headers["retry-after"] == "17" and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "busy"
    assert await asyncio.wait_for(reader2.read(), 5) == b""  # closed by the gateway
    assert gw.app[keys.METRICS].registry.get_sample_value(
        "gateway_webhook_requests_total", {"channel": "whatsapp", "outcome": "unavailable"}) == 1
    assert served.buffered == len(first)
    writer1.write(first[body_start + 10:])
    assert (await read_response(reader1))[0] == 200
    assert served.buffered == 0  # an idle keep-alive connection holds nothing
    [(status, _, _)] = await exchange(gw, post(IMAGE))  # room again
    assert status == 200
    for writer in (writer1, writer2):
        writer.close()
    await wait_for(lambda: not served.connections)
    assert served.buffered == 0
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]


@pytest.mark.parametrize("phase", ["head", "body"])
async def test_a_request_that_trickles_past_its_deadline_is_closed(gateway, monkeypatch, phase):
    """A byte at a time keeps the connection from being idle, not the request from its deadline;
    a connection idle between requests is not touched by it."""
    monkeypatch.setattr(listener, "REQUEST_SECONDS", 0.5)
    monkeypatch.setattr(listener, "SWEEP_SECONDS", 0.05)
    gw = await gateway()
    served = gw.server._listener
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer2.write(post(TEXT))
    assert (await read_response(reader2))[0] == 200
    data = post(IMAGE)
    sent = 20 if phase == "head" else data.index(b"\r\n\r\n") + 4
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(data[:sent])
    loop = asyncio.get_running_loop()
    started = loop.time()
    closed = None
    while loop.time() - started < 5 and sent < len(data):
        try:
            closed = await asyncio.wait_for(reader.read(), 0.1)
            break
        except TimeoutError:
            writer.write(data[sent:sent + 1])
            sent += 1
    assert closed == b"" and 0.4 < loop.time() - started < 3  # unanswered, closed
    assert sent < len(data)
    writer.close()
    await wait_for(lambda: len(served.connections) == 1)
    assert served.buffered == 0
    writer2.write(post(IMAGE))  # the idle keep-alive connection is still open
    assert (await read_response(reader2))[0] == 200
    writer2.close()
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]


def chunked(body: bytes, pieces: int = 2) -> list[bytes]:
    """A webhook POST with a chunked body (handed to aiohttp), as ``pieces`` writes: the head
    and chunks, the last write ending the body."""
    head = (b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"X-Hub-Signature-256: " + sign(SECRET.encode(), body).encode() + b"\r\n\r\n")
    cut = len(body) // 2
    return [head + b"%x\r\n%s\r\n" % (cut, body[:cut]),
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - cut, body[cut:])]


async def test_bodies_aiohttp_reads_count_against_the_same_budget(gateway):
    """A handed-off webhook (chunked) reserves its body in the port's budget while aiohttp reads
    it: a second one that would not fit is 503 at once, and there is room again after."""
    gw = await gateway(extra="max_body_bytes = 2048\nmax_buffered_bytes = 2048\n"
                             "[queue]\nretry_after_seconds = 17")
    served = gw.server._listener
    first, rest = chunked(TEXT)
    reader1, writer1 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer1.write(first)  # half its body: aiohttp is reading it, reserved at max_body_bytes
    await wait_for(lambda: served.buffered == 2048)
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer2.write(b"".join(chunked(IMAGE)))
    status, headers, body = await read_response(reader2)
    assert status == 503 and headers["retry-after"] == "17"
    assert json.loads(body)["error"]["code"] == "busy"
    writer1.write(rest)
    assert (await read_response(reader1))[0] == 200
    assert served.buffered == 0
    writer2.close()
    reader3, writer3 = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer3.write(b"".join(chunked(IMAGE)))
    assert (await read_response(reader3))[0] == 200  # room again
    for writer in (writer1, writer3):
        writer.close()
    await gw.settle()
    assert sorted(e["type"] for e in gw.jsonl()) == ["image", "text"]


async def test_a_body_aiohttp_reads_that_trickles_past_the_deadline_is_408(gateway, monkeypatch):
    """However a handed-off body trickles, it must arrive within REQUEST_SECONDS: then 408 and
    the connection is closed, and its bytes leave the budget."""
    from gateway import budget

    monkeypatch.setattr(budget, "REQUEST_SECONDS", 0.5)
    gw = await gateway()
    served = gw.server._listener
    first, _ = chunked(TEXT)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(first)
    status, _, body = await read_response(reader)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    assert served.buffered == 0
    assert gw.app[keys.METRICS].registry.get_sample_value(
        "gateway_webhook_requests_total", {"channel": "whatsapp", "outcome": "bad_request"}) == 1
    writer.close()


async def test_a_post_without_a_body_reserves_nothing(gateway):
    """No Content-Length and no Transfer-Encoding: an empty body (aiohttp serves it). It must
    not reserve max_body_bytes: with the budget all but full it is answered, not 503."""
    gw = await gateway(extra="max_body_bytes = 2048\nmax_buffered_bytes = 2048\n")
    gw.app[keys.BUDGET].held = 2047  # what other connections hold
    data = (b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"X-Hub-Signature-256: sha256=00\r\n\r\n")
    [(status, _, body)] = await exchange(gw, data)
    assert status == 401 and json.loads(body)["error"]["code"] == "bad_signature"
    assert gw.app[keys.BUDGET].held == 2047
    gw.app[keys.BUDGET].held = 0


async def test_a_client_that_never_reads_its_answers_is_dropped_with_what_it_holds(
        gateway, monkeypatch):
    """A client pipelining requests without reading the answers (a zero receive window) is
    closed at its deadline all the same: the buffered answers are dropped, and so is its share
    of the byte budget, which would otherwise end in 503 for everyone."""
    monkeypatch.setattr(listener, "KEEPALIVE_SECONDS", 0.5)
    monkeypatch.setattr(listener, "REQUEST_SECONDS", 0.5)
    monkeypatch.setattr(listener, "SWEEP_SECONDS", 0.05)
    gw = await gateway()
    served, budget = gw.server._listener, gw.app[keys.BUDGET]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.server.port))
    sock.setblocking(False)
    data, sent = post(b"{}", secret=None) * 40_000, 0  # 401 each: unsigned
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while sent < len(data) and loop.time() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            await asyncio.sleep(0.01)
    try:
        await wait_for(lambda: not served.connections, timeout=10)
        assert budget.held == 0
        status, _ = await gw.post("whatsapp", fixture_bytes("whatsapp/text.json"))
        assert status == 200
    finally:
        sock.close()


@pytest.mark.parametrize("head", [
    b"POST /webhooks/whatsapp HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 2\n\n{}",
    b"POST /webhooks/whatsapp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\n{}",
])
async def test_a_head_with_bare_line_feeds_is_answered_at_once(gateway, head):
    """Lines ending in a bare LF never make the CRLF CRLF the lean path waits for: aiohttp's
    parser answers such a head at once, instead of a silent close at the request deadline."""
    gw = await gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        writer.write(head)
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status == 400
    finally:
        writer.close()


async def test_pipelined_bytes_do_not_take_the_port_past_its_byte_budget(gateway):
    """Clients that pipeline requests without reading their answers: what the port holds stays
    near ``max_buffered_bytes`` (about one read per connection over it), instead of 256 KB more
    per connection; once they leave, an honest webhook is accepted."""
    limit = 65536
    gw = await gateway(extra=f"max_body_bytes = {limit}\nmax_buffered_bytes = {limit}")
    budget = gw.app[keys.BUDGET]
    data = post(b"{}", secret=None) * 40_000  # a 401 each: no journal wait
    socks, peak = [], 0
    loop = asyncio.get_running_loop()
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing
            sock.connect(("127.0.0.1", gw.server.port))
            sock.setblocking(False)
            socks.append(sock)
            sent, deadline = 0, loop.time() + 0.5
            while sent < len(data) and loop.time() < deadline:
                try:
                    sent += sock.send(data[sent:sent + 65536])
                except BlockingIOError:
                    await asyncio.sleep(0.005)
                except ConnectionResetError:
                    break
                peak = max(peak, budget.held)
        await asyncio.sleep(0.3)
        peak = max(peak, budget.held)
        # the limit, and about a read per connection (measured: 160 KB here; 467 KB when each
        # connection could still take 256 KB of pipelined requests over the limit)
        assert peak <= limit + 8 * 32768, peak
    finally:
        for sock in socks:
            sock.close()
    await wait_for(lambda: budget.held == 0, timeout=10)
    assert (await gw.post("whatsapp", fixture_bytes("whatsapp/text.json")))[0] == 200


class PausingTransport(asyncio.Transport):
    """A client that reads slowly: every answer fills the write buffer past its high-water
    mark (the protocol is told to pause writing), as a real transport does."""

    def __init__(self, protocol) -> None:
        super().__init__()
        self.protocol, self.written, self.closing = protocol, [], False

    def write(self, data) -> None:
        self.written.append(bytes(data))
        self.protocol.pause_writing()

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


async def test_no_pipelined_request_is_started_once_the_connection_closes(gateway):
    """RFC 9112 §9.6: nothing after a ``Connection: close`` request is processed. The answer
    that closes may still be draining; when it has, asyncio tells the protocol to resume
    writing on the closing transport, which used to start (and journal) the next request."""
    gw = await gateway()
    journal = gw.app[keys.JOURNAL]
    before = journal.committed_seq
    conn = listener.WebhookConnection(gw.server._listener)
    transport = PausingTransport(conn)
    conn.connection_made(transport)
    conn.data_received(post(TEXT, extra=b"Connection: close\r\n") + post(IMAGE))
    for _ in range(100):
        if transport.written:
            break
        await asyncio.sleep(0.01)
    assert transport.closing and len(transport.written) == 1
    assert b"connection: close" in transport.written[0].lower()
    conn.resume_writing()  # the kernel has drained the answer
    await asyncio.sleep(0.2)
    assert len(transport.written) == 1 and journal.committed_seq == before + 1
    conn.connection_lost(None)
