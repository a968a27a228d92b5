"""Bearer-token authentication for the ``/v1/*`` API (``server.api_token``)."""

from __future__ import annotations

from aiohttp import web

from gateway import keys
from gateway.intake import error
from gateway.signatures import tokens_equal


def check_bearer(request: web.Request) -> web.Response | None:
    """None when the request carries ``Authorization: Bearer <server.api_token>``; else the 401/503.

    The API is closed (503) while no ``api_token`` is configured: never open by default.
    """
    expected = request.app[keys.CONFIG].server.api_token
    if not expected:
        return error(503, "api_disabled",
                     "the /v1 API is disabled: set server.api_token or GATEWAY_API_TOKEN")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not tokens_equal(expected, token.strip()):
        return error(401, "unauthorized", "missing or invalid bearer token",
                     {"WWW-Authenticate": 'Bearer realm="gateway"'})
    return None
