"""One shared ``httpx.AsyncClient`` per account for Graph API calls (pooling, keep-alive)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from gateway.outbound.errors import MetaError, MetaRetryable, Rule, from_response


class SendUncertain(MetaRetryable):
    """The request may have reached Meta (a timeout after sending): do not resend blindly."""


@dataclass
class SendResult:
    """What a successful send returned."""

    message_id: str | None
    headers: dict[str, str] = field(default_factory=dict)


class GraphClient:
    """Graph API calls for one account: ``{base}/{version}/{path}`` with its bearer token."""

    def __init__(self, base_url: str, version: str, token: str | None, timeout: float = 10.0,
                 errors: dict[int, Rule] | None = None) -> None:
        self.token = token
        self.errors = errors or {}
        self.client = httpx.AsyncClient(
            base_url=f"{base_url.rstrip('/')}/{version}/",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
            headers={"Authorization": f"Bearer {token}"} if token else {})

    async def post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """POST JSON; return (parsed body, headers), or raise the MetaError for the answer."""
        try:
            resp = await self.client.post(path, content=msgspec.json.encode(body),
                                          headers={"Content-Type": "application/json"})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise MetaRetryable(f"Graph API unreachable: {exc!r}") from None  # never sent
        except httpx.TransportError as exc:
            raise SendUncertain(f"Graph API call interrupted after sending: {exc!r}") from None
        headers = {k: v for k, v in resp.headers.items()
                   if k.lower() in ("x-app-usage", "x-business-use-case-usage")}
        if resp.status_code >= 300:
            error: MetaError = from_response(resp.status_code, resp.content, self.errors)
            error.headers = headers  # type: ignore[attr-defined]
            raise error
        try:
            return msgspec.json.decode(resp.content), headers
        except msgspec.DecodeError:
            return {}, headers

    async def close(self) -> None:
        await self.client.aclose()
