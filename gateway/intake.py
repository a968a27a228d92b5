"""Webhook intake: Meta's handshake (GET) and deliveries (POST).

The POST path does only this: look up the channel, read the raw bytes (size-limited), verify the
signature over exactly those bytes, check the envelope cheaply, append to the journal (durable,
group commit), answer 200. Normalisation and sinks happen after the ack.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway import keys
from gateway import logging as gwlog
from gateway.errors import BadPayload
from gateway.signatures import tokens_equal, verify

log = gwlog.get("gateway.intake")
SIGNATURE_HEADER = "X-Hub-Signature-256"
_ACCEPTED = b'{"status":"accepted"}'


def error(status: int, code: str, message: str,
          headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error: ``{"error": {"code": ..., "message": ...}}``."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


def _unknown_channel(name: str) -> web.Response:
    return error(404, "unknown_channel", f"no enabled channel is named {name!r}")


async def handshake(request: web.Request) -> web.Response:
    """``GET /webhooks/{channel}``: echo ``hub.challenge`` when ``hub.verify_token`` matches."""
    name = request.match_info["channel"]
    channel = request.app[keys.CHANNELS].get(name)
    if channel is None:
        return _unknown_channel(name)
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
    """``POST /webhooks/{channel}``: verify, journal, 200."""
    started = time.perf_counter()
    app = request.app
    name = request.match_info["channel"]
    channel = app[keys.CHANNELS].get(name)
    if channel is None:
        return _unknown_channel(name)
    metrics = app[keys.METRICS]
    config = app[keys.CONFIG]
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _refuse(metrics, name, 413, "too_large", f"body exceeds {limit} bytes")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _refuse(metrics, name, 413, "too_large", f"body exceeds {limit} bytes")
    if config.server.insecure_skip_signature:
        log.warning("signature_not_checked", channel=name, reason="server.insecure_skip_signature")
    elif not verify(channel.app_secret, body, request.headers.get(SIGNATURE_HEADER)):
        return _refuse(metrics, name, 401, "bad_signature",
                       f"missing or invalid {SIGNATURE_HEADER} for this channel's app secret")
    try:
        channel.check_envelope(body)
    except BadPayload as exc:
        return _refuse(metrics, name, 400, "bad_request", str(exc))
    journal = app[keys.JOURNAL]
    if journal.pending >= config.queue.max_pending:
        retry = str(config.queue.retry_after_seconds)
        return _refuse(metrics, name, 503, "unavailable",
                       "the journal is full; retry later", {"Retry-After": retry})
    await journal.append(name, body, time.time())
    app[keys.PROCESSOR].wake.set()
    accepted, ack = metrics.intake(name)
    accepted.inc()
    ack.observe(time.perf_counter() - started)
    return web.Response(body=_ACCEPTED, content_type="application/json")


def _refuse(metrics, channel: str, status: int, outcome: str, message: str,
            headers: dict[str, str] | None = None) -> web.Response:
    metrics.webhook_requests.labels(channel, outcome).inc()
    log.info("webhook_refused", channel=channel, status=status, outcome=outcome)
    code = {"too_large": "payload_too_large", "unavailable": "journal_full"}.get(outcome, outcome)
    return error(status, code, message, headers)
