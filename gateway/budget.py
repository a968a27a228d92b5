"""The main port's memory bound: request bytes held at once, across connections and both paths.

``server.max_buffered_bytes`` caps what the port's connections hold: the lean webhook path
(:mod:`gateway.listener`) charges what each connection buffers, and the aiohttp routes that read
a body (a webhook POST aiohttp serves, ``POST /v1/messages``) reserve theirs through
:func:`held_body` before reading it. A body that would not fit is refused at once (503 +
``Retry-After``); a body that does not arrive whole within :data:`REQUEST_SECONDS` of its handler's
start is answered 408 and its connection closed, however it trickles.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway import keys

# A request's head and body, from its first byte: a client that trickles is closed. Meta waits
# far less than this for its answer (and retries), so no honest delivery takes this long.
REQUEST_SECONDS = 60.0


def compressed(content_encoding: str | None) -> str | None:
    """The ``Content-Encoding`` of a body the main port refuses (415), or None. Nothing on it
    accepts compressed bodies (``auto_decompress`` is off): inflated, a few KB on the wire, all
    that ``max_body_bytes`` and the budget see, could become megabytes in memory."""
    value = (content_encoding or "").strip()
    return None if value.lower() in ("", "identity") else value[:40]


class ByteBudget:
    """Request bytes held in memory (``held``) against ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the limit."""
        return self.held + size <= self.limit


class Busy(Exception):
    """The body would take the port over ``server.max_buffered_bytes``."""


class TooSlow(Exception):
    """The body did not arrive within :data:`REQUEST_SECONDS`: answer with :func:`closing`."""


def closing(response: web.StreamResponse) -> web.StreamResponse:
    """``response`` with ``Connection: close``: aiohttp closes the connection once it is written,
    after at most its ``lingering_time`` (gateway.server.HANDLER_LIMITS) spent discarding what
    the client still sends."""
    response.force_close()
    return response


def reservation(request: web.Request) -> int:
    """What a request's body reserves of the budget: its declared ``Content-Length``
    (``max_body_bytes`` for a chunked body, nothing without a body), at most ``max_body_bytes``."""
    limit = request.app[keys.CONFIG].server.max_body_bytes
    declared = request.content_length
    if not request.body_exists:
        return 0
    return limit if declared is None else min(declared, limit)  # chunked: may grow to the limit


def fits(request: web.Request) -> bool:
    """Whether the request's body would fit in the budget now."""
    return request.app[keys.BUDGET].fits(reservation(request))


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """What aiohttp's default ``expect_handler`` does, for handlers that refuse first: ``100
    Continue`` for ``Expect: 100-continue`` on HTTP/1.1, 417 for any other expectation."""
    expect = request.headers.get("Expect", "")
    if request.version != aiohttp.HttpVersion11:
        return None
    if expect.lower() != "100-continue":
        return closing(web.json_response(
            {"error": {"code": "expectation_failed", "message": f"unknown Expect: {expect}"}},
            status=417))
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer's own size starts after the interim response
    return None


@contextlib.asynccontextmanager
async def held_body(request: web.Request) -> AsyncIterator[bytes]:
    """The request's body, read within the port's byte budget and deadline; its bytes count
    against the budget until the block ends (the answer is ready).

    The reservation is the declared ``Content-Length`` (``max_body_bytes`` for a chunked body,
    nothing without a body), never more than ``max_body_bytes``: aiohttp refuses a longer body
    (413).

    Raises:
        Busy: no room for the body now (answer 503 + ``Retry-After``).
        TooSlow: the body is still arriving after :data:`REQUEST_SECONDS` (answer 408 through
            :func:`closing`).
    """
    budget: ByteBudget = request.app[keys.BUDGET]
    reserve = reservation(request)
    if not budget.fits(reserve):
        raise Busy(reserve)
    budget.held += reserve
    started = time.monotonic()
    try:
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                body = await request.read()
        except TimeoutError:
            raise TooSlow(time.monotonic() - started) from None
        yield body
    finally:
        budget.held -= reserve
