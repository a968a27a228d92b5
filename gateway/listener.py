"""The main port: a lean HTTP/1.1 path for Meta's webhook POSTs, aiohttp for everything else.

On one core, aiohttp's request cycle (request and response objects, router, middleware, stream
reader, header writer) costs more than all the gateway's own work for a webhook except the
journal's commit. Webhook deliveries have one narrow shape: ``POST /webhooks/{channel}`` with a
``Content-Length`` body over a keep-alive connection. :class:`WebhookConnection` answers exactly
that shape itself, with the steps of :func:`gateway.intake.accept` run without a task per request
(the aiohttp route awaits ``accept``, so statuses, bodies, metrics and logs are the same). It hands
the connection to aiohttp, with every byte not yet answered, the moment it sees anything else:
another method or path, a query string, HTTP/1.0, chunked, compressed or ``Expect: 100-continue``
bodies, an upgrade, no ``Host``, more than :data:`MAX_HEADERS` header fields, or any header it does
not accept strictly (a repeated header, a space before the colon, obs-fold, control bytes). From
then on that connection is aiohttp's, and its parser (llhttp) applies the full rules, so nothing is
accepted here that aiohttp would refuse, but one: a complete request with ``Connection: close``
followed by more bytes is answered (and nothing after it processed), where llhttp refuses the
whole buffer. ``server.fast_intake = false`` leaves the whole port to aiohttp.

Requests on one connection are answered in order, one at a time (pipelined bytes wait, reading
pauses past :data:`MAX_PIPELINED`). While the transport's write buffer is over its high-water
mark (a client that sends and does not read) the next request waits too. A connection idle for
:data:`KEEPALIVE_SECONDS` is closed; a connection that sends part of a request and then nothing
for that long is closed too. However it trickles, a request must arrive whole within
:data:`REQUEST_SECONDS` of its first byte (for a pipelined request: of the moment the one before
it was answered), or its connection is closed: otherwise a byte every few seconds would hold a
connection and its buffer for ever.

Memory is bounded across connections too. The :class:`Listener` counts the request bytes its
connections hold (:attr:`Listener.buffered`, in the port's :class:`gateway.budget.ByteBudget`,
which the aiohttp routes that read a body share): what each buffer holds, a body whose head has
arrived at its declared length (its bytes are on their way), and a body being answered until its
answer is ready. Each connection keeps that count exact as it buffers, consumes, clears or hands
off bytes, or goes away. A head whose declared body, with what the other connections hold, would
take the count over ``server.max_buffered_bytes`` is answered at once with 503 and ``Retry-After``
(as a full journal is; Meta retries) and its connection is closed, like a body over
``max_body_bytes`` (413). Without it, connections that each declare 3 MB and send all but a byte
would hold 3 MB each.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway import intake, keys
from gateway import logging as gwlog
from gateway.budget import REQUEST_SECONDS

log = gwlog.get("gateway.listener")

PREFIX = b"POST /webhooks/"
MAX_HEAD = 8190  # bytes of request line and headers (aiohttp's max_line_size / max_field_size)
# Header fields: the main port's aiohttp handler is given the same max_headers (so llhttp refuses
# the next one), and its default field size is MAX_HEAD. aiohttp's default of 128 let one
# unfinished head hold about 1 MB; at 32, about 260 KB (Meta sends about a dozen fields).
MAX_HEADERS = 32
MAX_PIPELINED = 256 * 1024  # bytes received ahead of the request being answered; then pause
KEEPALIVE_SECONDS = 75.0  # as aiohttp's web.run_app sets its keepalive_timeout
SWEEP_SECONDS = 5.0
LINGER_SECONDS = 2.0  # after an early 413/404, unread body bytes are discarded this long
# The request line, then header fields as RFC 9110 has them: token ":" OWS value OWS, the value
# of visible bytes, obs-text, SP and HTAB only (so no obs-fold, bare CR or LF, control bytes, or
# space before the colon).
_HEAD = re.compile(rb"POST /webhooks/([A-Za-z0-9_.\-]{1,100}) HTTP/1\.1"
                   rb"((?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*)")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_HAND_OFF_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_SIGNATURE = intake.SIGNATURE_HEADER.lower().encode()
_SERVER = b"multichannel-gateway"


class Head:
    """What the lean path needs from a request's head."""

    __slots__ = ("channel", "length", "signature", "close", "encoding")

    def __init__(self, channel: str, length: int, signature: str | None, close: bool,
                 encoding: str | None = None) -> None:
        self.channel = channel
        self.length = length
        self.signature = signature
        self.close = close
        self.encoding = encoding  # Content-Encoding: refused (gateway.intake.refuse_early)


def parse_head(head: bytes) -> Head | None:
    """The request line and headers (without the final CRLF CRLF), or None: hand it to aiohttp."""
    match = _HEAD.fullmatch(head)
    if match is None:
        return None
    channel, block = match.groups()
    lines = block.split(b"\r\n")[1:]
    if len(lines) > MAX_HEADERS:
        return None
    fields: dict[bytes, bytes] = {}
    for raw in lines:
        name, _, value = raw.partition(b":")
        name = name.lower()
        if name in fields or name in _HAND_OFF_FIELDS:
            return None
        fields[name] = value
    if b"host" not in fields:  # RFC 9112 §3.2: aiohttp answers 400
        return None
    length = fields.get(b"content-length", b"").strip(b" \t")
    if not length.isdigit() or len(length) > 15:
        return None
    close = False
    connection = fields.get(b"connection")
    if connection is not None:
        tokens = {t.strip(b" \t").lower() for t in connection.split(b",")}
        if b"upgrade" in tokens:
            return None
        close = b"close" in tokens
    signature = fields.get(_SIGNATURE)
    if signature is not None:  # decoded as aiohttp decodes header values
        signature = signature.strip(b" \t").decode("utf-8", "surrogateescape")
    encoding = fields.get(b"content-encoding")
    return Head(channel.decode(), int(length), signature, close,
                None if encoding is None
                else encoding.strip(b" \t").decode("utf-8", "surrogateescape"))


class Listener:
    """Serves the main port: :class:`WebhookConnection` per connection with aiohttp behind it,
    or (``fast`` off) aiohttp alone.

    Start it once the runner is set up; :meth:`stop` it before ``runner.cleanup()``, which drains
    and closes the connections aiohttp holds.
    """

    def __init__(self, runner: web.AppRunner, fast: bool = True) -> None:
        assert runner.server is not None, "set the runner up first"
        self.app = runner.app
        self.aiohttp_server = runner.server  # a protocol factory: aiohttp's RequestHandler
        self.fast = fast
        self.bytes = self.app[keys.BUDGET]  # shared with the aiohttp routes' bodies
        self.connections: set[WebhookConnection] = set()
        self.starved: set[WebhookConnection] = set()  # paused while the budget is over its limit
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._date_second = -1
        self._date = b""
        self._accepted = b""

    @property
    def buffered(self) -> int:
        """Request bytes the port holds (see the module docstring): the lean connections' and
        the bodies aiohttp's routes are reading or answering (:mod:`gateway.budget`)."""
        return self.bytes.held

    @buffered.setter
    def buffered(self, value: int) -> None:
        self.bytes.held = value

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port``; the port bound (``port`` 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        factory = (lambda: WebhookConnection(self)) if self.fast else self.aiohttp_handler
        self._server = await loop.create_server(factory, host, port, reuse_address=True,
                                                backlog=128)
        if self.fast:
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, timeout: float) -> None:
        """Stop accepting; answer the requests in flight (within ``timeout``); close the rest.

        Connections already handed to aiohttp are aiohttp's to drain (``AppRunner.cleanup``)."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        for conn in list(self.connections):
            if not conn.in_flight:
                conn.close()
        while any(c.in_flight for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.close()

    def unstarve(self) -> None:
        """Let the connections paused for the byte budget read again if it has room now."""
        if self.starved and self.bytes.fits(0):
            for conn in list(self.starved):
                conn._pace()

    def _sweep(self) -> None:
        self.unstarve()  # room made by the aiohttp routes, which do not call it
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.transport is not None and conn.transport.is_closing():
                # closed on an earlier sweep (or after an answer) and still here: its answers
                # wait for a client that does not read (a zero window keeps the socket open for
                # good). Drop them, so its buffers and its share of the byte budget are released.
                conn.abort()
                continue
            if conn.busy:
                continue
            started = conn.request_started
            if (now - conn.last_seen > KEEPALIVE_SECONDS
                    or (started is not None and now - started > REQUEST_SECONDS)):
                conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def aiohttp_handler(self) -> asyncio.Protocol:
        """aiohttp's protocol for one connection, answering what its parser refuses (a
        malformed head, a bad chunk) with the gateway's JSON error body instead of aiohttp's
        text, which echoes the offending bytes."""
        server = self.aiohttp_server
        try:  # as web.Server.__call__ builds its RequestHandler
            return _JsonErrors(server, loop=server._loop, **server._kwargs)
        except (AttributeError, TypeError):  # another aiohttp: its own handler, text errors
            return server()

    def date(self) -> bytes:
        """The ``Date`` header's value, computed once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode()
            self._accepted = render(intake.ACCEPTED, self._date, close=False)
        return self._date

    def accepted(self) -> bytes:
        """The whole 200 response of an accepted webhook (rebuilt once a second for ``Date``)."""
        self.date()
        return self._accepted


def _failed(head: Head, error: BaseException | None) -> intake.Reply:
    """The 500 of a request whose checks or append raised (``error``; None: cancelled)."""
    log.error("unhandled_error", path=f"/webhooks/{head.channel}",
              **({"exc_info": error} if error is not None else {"error": "cancelled"}))
    return intake.Reply(500, intake.error_body(
        "internal_error", "internal error; see the gateway's log"))


class _JsonErrors(RequestHandler):
    """aiohttp's protocol, whose errors are answered as JSON."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own (its logging, its checks), answered with the gateway's error body:
        ``{"error": {"code": ..., "message": <the status' phrase>}}``, the connection closed."""
        super().handle_error(request, status, exc, message)
        code = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large",
                500: "internal_error", 504: "timeout"}.get(status, "error")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        text = {400: f"{phrase}: the request is not well-formed HTTP/1.1",
                500: "internal error; see the gateway's log"}.get(status, phrase)
        response = web.Response(status=status, body=intake.error_body(code, text),
                                content_type="application/json", charset="utf-8")
        response.force_close()
        return response


def render(reply: intake.Reply, date: bytes, close: bool) -> bytes:
    """The HTTP/1.1 response bytes of ``reply``."""
    parts = [b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
             b"Content-Length: %d\r\nDate: %s\r\nServer: %s\r\n"
             % (reply.status, HTTPStatus(reply.status).phrase.encode(), len(reply.body), date,
                _SERVER)]
    for name, value in (reply.headers or {}).items():
        parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(reply.body)
    return b"".join(parts)


class WebhookConnection(asyncio.Protocol):
    """One client connection, answered on the lean path until it needs aiohttp."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False  # a request is being answered
        self.paused = False  # reading is paused
        self.write_paused = False  # the transport's write buffer is over its high-water mark
        self.discarding = False  # an early error was sent; the rest of its body is dropped
        self.head: Head | None = None  # the head of the request whose body is still arriving
        self.body_start = 0  # where that request's body starts in the buffer
        self.last_seen = time.monotonic()
        self.request_started: float | None = None  # the unanswered request's clock (or None)
        self.charged = 0  # this connection's share of ``listener.buffered``, but for ``answering``
        self.answering = 0  # bytes of the body being answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self.transport = None
        self.buffer.clear()
        self.head = None
        self.request_started = None
        self._recharge()  # a body being answered is let go of when its answer is done
        self.listener.starved.discard(self)
        self.listener.unstarve()

    def data_received(self, data: bytes) -> None:
        now = self.last_seen = time.monotonic()
        if self.discarding:
            return
        if self.request_started is None:
            self.request_started = now
        self.buffer += data
        if not self.busy:
            self._next()
        self._recharge()
        self._pace()

    def pause_writing(self) -> None:
        """The client reads slower than we answer: start no request until it catches up."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The write buffer drained below its low-water mark: carry on with the pipeline."""
        self.write_paused = False
        if not self.busy:
            self._next()
        self._recharge()
        self._pace()

    def _recharge(self) -> None:
        """Bring ``listener.buffered`` up to date with the buffer (after any change to it or to
        the head): the buffer, or the whole request once its head is known, if that is more."""
        charge = len(self.buffer)
        head = self.head
        if head is not None and self.body_start + head.length > charge:
            charge = self.body_start + head.length
        self.listener.buffered += charge - self.charged
        self.charged = charge

    @property
    def in_flight(self) -> bool:
        """A request is being answered, or its head has arrived and its body is arriving: at
        shutdown it is still read and answered (within the timeout)."""
        return self.busy or self.head is not None

    def close(self) -> None:
        """Close the connection (after writing what is buffered)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close the connection at once, dropping what is buffered (``connection_lost`` follows,
        releasing what it holds)."""
        if self.transport is not None:
            self.transport.abort()

    def _pace(self) -> None:
        """Pause reading while more than :data:`MAX_PIPELINED` bytes wait behind a request being
        answered or a full write buffer, or while the port is over its byte budget and this
        connection holds bytes beyond its current request (the budget is checked when a head
        arrives; bytes pipelined behind it would otherwise take the port past it). Read again
        once they are taken, or the budget has room (:meth:`Listener.unstarve`)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            self.listener.starved.discard(self)
            return
        head = self.head
        beyond = len(self.buffer) - (self.body_start + head.length if head is not None else 0)
        starved = beyond > 0 and not self.listener.bytes.fits(0)
        if starved:
            self.listener.starved.add(self)
        else:
            self.listener.starved.discard(self)
        hold = starved or ((self.busy or self.write_paused) and len(self.buffer) > MAX_PIPELINED)
        if hold and not self.paused:
            transport.pause_reading()
            self.paused = True
        elif not hold and self.paused:
            transport.resume_reading()
            self.paused = False

    def _next(self) -> None:
        """Answer the next complete request in the buffer, or hand the connection off. Nothing
        once the transport closes (the client reset it, or our ``Connection: close`` answer
        waits to drain): no request after that is journaled or handed to aiohttp."""
        buf = self.buffer
        if not buf or self.transport is None or self.write_paused or self.transport.is_closing():
            return
        head = self.head
        if head is None:
            if self.listener.closing:  # shutting down: finish what has begun, start nothing
                return
            head = self._read_head()
            if head is None:
                return
        total = self.body_start + head.length
        if len(buf) < total:
            return  # the body is still arriving
        body = bytes(buf[self.body_start:total])
        del buf[:total]
        self.head = None
        self.busy = True
        self.request_started = None  # what follows is timed once this request is answered
        self.answering = len(body)
        self.listener.buffered += self.answering
        self._start(head, body, time.perf_counter())

    def _read_head(self) -> Head | None:
        """Parse the head at the start of the buffer once it is complete and keep it (its body
        may arrive in many pieces); None while it is incomplete or once the request is refused
        early or handed off."""
        buf = self.buffer
        if not buf.startswith(PREFIX):
            if len(buf) >= len(PREFIX) or not PREFIX.startswith(buf):
                self._hand_off()
            return None
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            # a head over the limit, or lines ending in a bare LF (whose CRLF CRLF never comes):
            # aiohttp's parser answers both at once (the lean path would wait for the deadline)
            if len(buf) > MAX_HEAD or _BARE_LF.search(buf, 0, MAX_HEAD):
                self._hand_off()
            return None
        head = parse_head(bytes(buf[:end]))
        if head is None:
            self._hand_off()
            return None
        early = intake.refuse_early(self.listener.app, head.channel, head.length, head.encoding)
        if early is None and not self.listener.bytes.fits(head.length - self.charged):
            early = intake.busy(self.listener.app, head.channel)
        if early is not None:
            self._refuse_early(early, len(buf) - end - 4 < head.length)
            return None
        self.head, self.body_start = head, end + 4
        return head

    def _start(self, head: Head, body: bytes, started: float) -> None:
        """:func:`gateway.intake.accept` without a task per request: the checks now, the answer
        from a callback once the journal has the body (the aiohttp route awaits the same steps)."""
        app = self.listener.app
        try:
            reply = intake.admit(app, head.channel, body, head.signature)
        except Exception as exc:  # noqa: BLE001 - never a dropped connection without an answer
            reply = _failed(head, exc)
        if reply is None:
            try:
                waiter = asyncio.ensure_future(intake.journal(app, head.channel, body))
            except Exception as exc:  # noqa: BLE001 - refused at once (its writer has ended):
                reply = intake.journal_failed(app, head.channel, exc)  # as a failed commit, 503
            else:
                waiter.add_done_callback(functools.partial(self._journaled, head, started))
                return
        # Answered on the next turn of the loop, not from here: _answer starts the next pipelined
        # request, and refusing each one from the last would recurse once per request.
        asyncio.get_running_loop().call_soon(self._answer, head, reply)

    def _journaled(self, head: Head, started: float, waiter: asyncio.Future) -> None:
        if waiter.cancelled():
            reply = _failed(head, None)
        elif waiter.exception() is not None:  # not durable: 503, Meta delivers it again
            reply = intake.journal_failed(self.listener.app, head.channel, waiter.exception())
        else:
            try:
                reply = intake.journaled(self.listener.app, head.channel, started)
            except Exception as exc:  # noqa: BLE001 - the connection must still be answered
                reply = _failed(head, exc)
        self._answer(head, reply)

    def _answer(self, head: Head, reply: intake.Reply) -> None:
        self.busy = False
        self.listener.buffered -= self.answering
        self.answering = 0
        self.listener.unstarve()
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client left; the request was still journaled (or refused) as answered
        close = head.close or self.listener.closing
        if reply is intake.ACCEPTED and not close:
            transport.write(self.listener.accepted())
        else:
            transport.write(render(reply, self.listener.date(), close))
        if close:
            transport.close()
            return
        if self.buffer:
            self.request_started = time.monotonic()
        self._next()
        self._recharge()
        self._pace()

    def _refuse_early(self, reply: intake.Reply, body_pending: bool) -> None:
        """Answer before reading the body, then close: the unread body cannot be skipped safely.
        Bytes still arriving are dropped for a moment, so the client reads the answer."""
        transport = self.transport
        assert transport is not None
        self.discarding = True
        self.buffer.clear()
        self.request_started = None
        self._recharge()
        transport.write(render(reply, self.listener.date(), close=True))
        if body_pending and transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def _hand_off(self) -> None:
        """Give this connection to aiohttp, starting with every byte not yet answered."""
        transport = self.transport
        assert transport is not None
        data = bytes(self.buffer)
        self.buffer.clear()
        self._recharge()  # the bytes are aiohttp's now
        self.transport = None
        self.listener.connections.discard(self)
        handler = self.listener.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)
