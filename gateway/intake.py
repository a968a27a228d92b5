"""Webhook intake: Meta's handshake (GET) and deliveries (POST).

The POST path does only this: look up the channel, read the raw bytes (size-limited), verify the
signature over exactly those bytes, check the envelope cheaply, append to the journal (durable,
group commit), answer 200. Normalisation and sinks happen after the ack. :func:`accept` is that
path without HTTP; the aiohttp route and the main port's lean listener (:mod:`gateway.listener`)
both answer through it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import NamedTuple

from aiohttp import hdrs, web

from gateway import keys
from gateway import logging as gwlog
from gateway.budget import (
    REQUEST_SECONDS,
    Busy,
    TooSlow,
    closing,
    compressed,
    expect_continue,
    fits,
    held_body,
)
from gateway.errors import BadPayload
from gateway.signatures import tokens_equal, verify

log = gwlog.get("gateway.intake")
SIGNATURE_HEADER = "X-Hub-Signature-256"
_ACCEPTED = b'{"status":"accepted"}'


def error(status: int, code: str, message: str,
          headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error: ``{"error": {"code": ..., "message": ...}}``."""
    return to_response(Reply(status, error_body(code, message), headers))


async def handshake(request: web.Request) -> web.Response:
    """``GET /webhooks/{channel}``: echo ``hub.challenge`` when ``hub.verify_token`` matches."""
    name = request.match_info["channel"]
    channel = request.app[keys.CHANNELS].get(name)
    if channel is None:
        return to_response(unknown_channel(name))
    query = request.query
    challenge = query.get("hub.challenge")
    if query.get("hub.mode") != "subscribe" or challenge is None:
        return error(400, "bad_request", "expected hub.mode=subscribe and hub.challenge")
    if not tokens_equal(channel.verify_token, query.get("hub.verify_token")):
        log.warning("handshake_refused", channel=name)
        return error(403, "forbidden",
                     "hub.verify_token does not match the configured verify_token")
    log.info("handshake_ok", channel=name)
    return web.Response(text=challenge, content_type="text/plain")


async def receive(request: web.Request) -> web.Response:
    """``POST /webhooks/{channel}``: verify, journal, 200 (the aiohttp route).

    The main port usually answers webhook POSTs on :mod:`gateway.listener`'s lean path; both call
    :func:`accept`, so the statuses, bodies, metrics and logs are the same.
    """
    started = time.perf_counter()
    app = request.app
    name = request.match_info["channel"]
    early = refuse_early(app, name, request.content_length,
                         request.headers.get(hdrs.CONTENT_ENCODING))
    if early is not None:
        return to_response(early)
    try:
        async with held_body(request) as body:
            return to_response(await accept(app, name, body,
                                            request.headers.get(SIGNATURE_HEADER), started))
    except web.HTTPRequestEntityTooLarge:
        limit = app[keys.CONFIG].server.max_body_bytes
        return to_response(refuse(app[keys.METRICS], name, 413, "too_large",
                                  f"body exceeds {limit} bytes"))
    except Busy:
        return to_response(busy(app, name))
    except TooSlow:  # counted as a bad request (CONTRACT §6's outcomes), with its own code
        message = f"the body did not arrive within {REQUEST_SECONDS:g} s"
        return closing(to_response(refuse(app[keys.METRICS], name, 408, "bad_request", message,
                                          code="request_timeout")))


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` on a webhook POST: a request refused whatever its body (unknown
    channel, declared size over the limit, no room in the byte budget or the journal) is answered
    before the client uploads it, and its connection closed; any other gets ``100 Continue``."""
    app = request.app
    name = request.match_info["channel"]
    early = refuse_early(app, name, request.content_length,
                         request.headers.get(hdrs.CONTENT_ENCODING))
    if early is None and not fits(request):
        early = busy(app, name)
    if early is None:
        early = journal_full(app, name)
    if early is not None:
        return closing(to_response(early))
    return await expect_continue(request)


class Reply(NamedTuple):
    """What the intake answers: a status, a JSON body and extra headers."""

    status: int
    body: bytes
    headers: dict[str, str] | None = None


ACCEPTED = Reply(200, _ACCEPTED)


def to_response(reply: Reply) -> web.Response:
    """The aiohttp response of a :class:`Reply`."""
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers,
                        content_type="application/json", charset="utf-8")


def unknown_channel(name: str) -> Reply:
    """404: no enabled channel has this name."""
    return Reply(404, error_body("unknown_channel", f"no enabled channel is named {name!r}"))


def refuse_early(app: web.Application, name: str, content_length: int | None,
                 content_encoding: str | None = None) -> Reply | None:
    """The answer due before the body is read (unknown channel, declared size over the limit,
    a compressed body)."""
    if name not in app[keys.CHANNELS]:
        return unknown_channel(name)
    encoding = compressed(content_encoding)
    if encoding is not None:  # Meta never compresses webhooks
        return refuse(app[keys.METRICS], name, 415, "bad_request",
                      f"Content-Encoding {encoding!r} is not accepted: send the JSON body as it "
                      "is", code="unsupported_content_encoding")
    limit = app[keys.CONFIG].server.max_body_bytes
    if content_length is not None and content_length > limit:
        return refuse(app[keys.METRICS], name, 413, "too_large", f"body exceeds {limit} bytes")
    return None


async def accept(app: web.Application, name: str, body: bytes, signature: str | None,
                 started: float) -> Reply:
    """Verify ``body``, check its envelope, journal it durably; the reply to send.

    ``started`` is the request's ``time.perf_counter()`` at arrival (the ack-time histogram).
    The lean listener runs the same three steps without a coroutine: :func:`admit`, then
    :func:`journal` and its awaitable, then :func:`journaled`.
    """
    refused = admit(app, name, body, signature)
    if refused is not None:
        return refused
    try:
        await journal(app, name, body)
    except Exception as exc:  # noqa: BLE001 - not durable: Meta is to deliver it again
        return journal_failed(app, name, exc)
    return journaled(app, name, started)


def admit(app: web.Application, name: str, body: bytes, signature: str | None) -> Reply | None:
    """The checks before the journal: the refusal to send, or None when ``body`` is to be
    journaled (signature, envelope, room in the journal)."""
    channel = app[keys.CHANNELS].get(name)
    if channel is None:
        return unknown_channel(name)
    metrics = app[keys.METRICS]
    config = app[keys.CONFIG]
    if not channel.app_secret and config.server.insecure_skip_signature:
        # only a channel without a secret goes unchecked: one that has a secret always verifies
        log.warning("signature_not_checked", channel=name, reason="server.insecure_skip_signature")
    elif not verify(channel.app_secret, body, signature):
        return refuse(metrics, name, 401, "bad_signature",
                      f"missing or invalid {SIGNATURE_HEADER} for this channel's app secret")
    try:
        channel.check_envelope(body)
    except BadPayload as exc:
        return refuse(metrics, name, 400, "bad_request", str(exc))
    return journal_full(app, name)


def journal_full(app: web.Application, name: str) -> Reply | None:
    """503 + ``Retry-After`` when the journal holds ``queue.max_pending`` requests, else None.
    Appends in flight count too: concurrent requests all pass this check before any commits."""
    store = app[keys.JOURNAL]
    queue = app[keys.CONFIG].queue
    if store.pending + store.appending >= queue.max_pending:
        return refuse(app[keys.METRICS], name, 503, "unavailable",
                      "the journal is full; retry later",
                      {"Retry-After": str(queue.retry_after_seconds)})
    return None


def journal(app: web.Application, name: str, body: bytes) -> Awaitable[None]:
    """Append an admitted body to the journal: done once it is durable."""
    return app[keys.JOURNAL].append(name, body, time.time())


def journaled(app: web.Application, name: str, started: float) -> Reply:
    """The body is durable: wake the processor, count it, time the ack; the 200."""
    app[keys.PROCESSOR].wake.set()
    accepted, ack = app[keys.METRICS].intake(name)
    accepted.inc()
    ack.observe(time.perf_counter() - started)
    return ACCEPTED


_append_failures = {"logged_at": float("-inf"), "since": 0}
APPEND_FAILURE_LOG_SECONDS = 10.0  # a failing journal is logged at most this often


def journal_failed(app: web.Application, channel: str, exc: BaseException) -> Reply:
    """503 + ``Retry-After``: the journal could not store the body (disk full, I/O error, Redis
    down). Nothing was acknowledged, so Meta delivers it again. Counted as ``unavailable``; logged
    at most every :data:`APPEND_FAILURE_LOG_SECONDS` with how many failed since the last line
    (a full disk fails every request)."""
    now = time.monotonic()
    _append_failures["since"] += 1
    if now - _append_failures["logged_at"] >= APPEND_FAILURE_LOG_SECONDS:
        log.error("journal_append_failed", channel=channel, error=repr(exc)[:500],
                  failed=_append_failures["since"])
        _append_failures.update(logged_at=now, since=0)
    return refuse(app[keys.METRICS], channel, 503, "unavailable",
                  "the journal could not store the request; retry later",
                  {"Retry-After": str(app[keys.CONFIG].queue.retry_after_seconds)},
                  code="journal_unavailable")


def busy(app: web.Application, channel: str) -> Reply:
    """503 + ``Retry-After``: the port holds ``server.max_buffered_bytes`` of request bodies.
    Counted and logged as a full journal's (outcome ``unavailable``), with its own code."""
    return refuse(app[keys.METRICS], channel, 503, "unavailable",
                  "the gateway holds too many request bodies; retry later",
                  {"Retry-After": str(app[keys.CONFIG].queue.retry_after_seconds)}, code="busy")


def error_body(code: str, message: str) -> bytes:
    """The JSON error body: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def refuse(metrics, channel: str, status: int, outcome: str, message: str,
           headers: dict[str, str] | None = None, code: str | None = None) -> Reply:
    """Count and log a refused webhook; its reply (``code``: the error's, when not the
    outcome's own)."""
    metrics.webhook_requests.labels(channel, outcome).inc()
    log.info("webhook_refused", channel=channel, status=status, outcome=outcome)
    code = code or {"too_large": "payload_too_large",
                    "unavailable": "journal_full"}.get(outcome, outcome)
    return Reply(status, error_body(code, message), headers)
