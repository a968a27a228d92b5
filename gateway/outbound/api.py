"""``POST /v1/messages`` and ``GET /v1/messages/{id}`` (Bearer ``server.api_token``)."""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway import keys
from gateway.auth import check_bearer
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
from gateway.intake import error
from gateway.outbound.request import InvalidRequest
from gateway.outbound.service import Unavailable


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/messages", send, expect_handler=expect),
            web.get("/v1/messages/{id}", status)]


def _service(request: web.Request):
    return request.app.get(keys.OUTBOUND)


async def expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: what ``send`` refuses whatever the body (no bearer token,
    outbound disabled, over the size limit, no room in the byte budget) is answered before the
    upload, with the connection closed; any other request gets ``100 Continue``."""
    refused = check_bearer(request)
    if refused is None and _service(request) is None:
        refused = _disabled()
    if refused is None:
        refused = _encoded(request)
    limit = request.app[keys.CONFIG].server.max_body_bytes
    if refused is None and (request.content_length or 0) > limit:
        refused = error(413, "payload_too_large", f"body exceeds {limit} bytes")
    if refused is None and not fits(request):
        refused = _busy(request)
    if refused is not None:
        return closing(refused)
    return await expect_continue(request)


def _encoded(request: web.Request) -> web.Response | None:
    """415 for a compressed body (the main port inflates none: gateway.budget.compressed)."""
    encoding = compressed(request.headers.get(hdrs.CONTENT_ENCODING))
    if encoding is None:
        return None
    return error(415, "unsupported_content_encoding",
                 f"Content-Encoding {encoding!r} is not accepted: send the JSON body as it is")


def _disabled() -> web.Response:
    return error(503, "outbound_disabled", "no channel has an access_token: nothing can be sent")


def _busy(request: web.Request) -> web.Response:
    return error(503, "busy", "the gateway holds too many request bodies; retry later",
                 {"Retry-After": str(request.app[keys.CONFIG].queue.retry_after_seconds)})


async def send(request: web.Request) -> web.Response:
    """Accept a message: 202 ``{"id", "status": "queued"}`` once it is in the outbox."""
    refused = check_bearer(request)
    if refused is not None:
        return refused
    service = _service(request)
    if service is None:
        return _disabled()
    encoded = _encoded(request)
    if encoded is not None:
        return encoded
    try:
        async with held_body(request) as body:
            answer = await service.send(body)
    except InvalidRequest as exc:
        code = getattr(exc, "code", "invalid_request")
        body = {"error": {"code": code, "message": str(exc), "field": exc.field}}
        return web.json_response(body, status=422)
    except Busy:
        return _busy(request)
    except Unavailable as exc:
        return error(503, exc.code, str(exc), {
            "Retry-After": str(request.app[keys.CONFIG].queue.retry_after_seconds)})
    except TooSlow:
        return closing(error(408, "request_timeout",
                             f"the body did not arrive within {REQUEST_SECONDS:g} s"))
    return web.json_response(answer, status=202)


async def status(request: web.Request) -> web.Response:
    """The outbound record: queued / sent / delivered / read / failed (+ error)."""
    refused = check_bearer(request)
    if refused is not None:
        return refused
    service = _service(request)
    found = await service.status(request.match_info["id"]) if service else None
    if found is None:
        return error(404, "not_found", f"no outbound message {request.match_info['id']!r}")
    return web.json_response(found)
