"""Differential property test: for any request bytes, the main port's lean path (gateway.listener)
answers exactly what aiohttp alone answers on the same gateway configuration."""

from __future__ import annotations

import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.signatures import sign
from tests.conftest import CHANNELS_TOML, SECRET, SINKS_TOML, ThreadedGateway, fixture_bytes

TEXT = fixture_bytes("whatsapp/text.json")
NAMES = ["Content-Length", "content-length", "Transfer-Encoding", "Connection", "Expect",
         "X-Hub-Signature-256", "Content-Type", "Host", "Upgrade", "Content-Encoding", "X-Other",
         "Content-Length ", " Content-Length", "X Bad", ""]
VALUES = st.one_of(
    st.sampled_from(["chunked", "close", "keep-alive", "Upgrade", "100-continue", "gzip", "0",
                     "12", "+5", "-1", "1 2", "application/json", "sha256=00"]),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)


MUTATIONS = ["method", "path", "version", "no_signature", "wrong_secret", "no_length",
             "short_length", "header", "header", "header", "body"]


@st.composite
def requests(draw) -> bytes:
    """A valid signed webhook POST, then none, one or a few mutations of it."""
    body = draw(st.sampled_from([TEXT, b"{}", b"[1]", b""]))
    method, path, version, secret = "POST", "/webhooks/whatsapp", "HTTP/1.1", SECRET
    signed, length, extra = True, len(body), []
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "method":
            method = draw(st.sampled_from(["PUT", "post", "GET", "HEAD"]))
        elif mutation == "path":
            path = draw(st.sampled_from(["/webhooks/telegram", "/webhooks/whatsapp?x=1",
                                         "/webhooks/whatsapp/", "/healthz", "/webhooks/",
                                         "/webhooks/what%73app", "/webhooks/instagram"]))
        elif mutation == "version":
            version = draw(st.sampled_from(["HTTP/1.0", "HTTP/2.0", "HTTP/1.10"]))
        elif mutation == "no_signature":
            signed = False
        elif mutation == "wrong_secret":
            secret = "wrong"
        elif mutation == "no_length":
            length = None
        elif mutation == "short_length":
            length = max(0, len(body) - draw(st.integers(1, 3)))
        elif mutation == "header":
            extra.append(f"{draw(st.sampled_from(NAMES))}:{draw(VALUES)}")
        else:
            body = draw(st.binary(max_size=40))
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    if signed:
        lines.append("X-Hub-Signature-256: " + sign(secret.encode(), body))
    if length is not None:
        lines.append(f"Content-Length: {min(length, len(body))}")
    lines += extra
    if not any(line.lower().startswith("connection:") for line in lines):
        lines.append("Connection: close")  # one request per connection; both servers close
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def answer(port: int, data: bytes) -> tuple[int, bytes] | str:
    """The first response's status and body; or what happened instead."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.5) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
                parsed = _parse(got)
                if parsed is not None:
                    return parsed
        except TimeoutError:
            return "no answer"
        except ConnectionResetError:
            pass
    return _parse(got, complete=True) or "closed without an answer"


def _parse(raw: bytes, complete: bool = False) -> tuple[int, bytes] | None:
    """(status, body) once ``raw`` holds a whole response (or all there will be)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    status = int(head.split(b" ", 2)[1])
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), None)
    if length is not None and len(rest) >= length:
        return status, rest[:length]
    return (status, rest) if complete else None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    started = []
    for fast in (True, False):
        root = tmp_path_factory.mktemp("fast" if fast else "aiohttp")
        path = root / "gateway.toml"
        path.write_text(f'[server]\ndata_dir = "{root / "data"}"\nshutdown_timeout = 5\n'
                        f'max_body_bytes = 2048\nfast_intake = {str(fast).lower()}\n'
                        f"{CHANNELS_TOML}\n{SINKS_TOML}")
        started.append(ThreadedGateway(path).start())
    yield started
    for gw in started:
        gw.stop()


def test_the_lean_path_answers_as_aiohttp_does(pair):
    fast, plain = pair
    statuses = set()

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def same(data: bytes) -> None:
        got = answer(fast.port, data)
        assert got == answer(plain.port, data), data
        statuses.add(got[0] if isinstance(got, tuple) else got)

    same()
    assert {200, 400, 401, 404} <= statuses, statuses  # the lean path's answers were all compared
