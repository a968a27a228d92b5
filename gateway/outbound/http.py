"""One shared ``httpx.AsyncClient`` per account for Graph API calls (pooling, keep-alive)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from gateway.outbound.errors import MetaError, MetaRetryable, Rule, from_response

USAGE_HEADERS = {"x-app-usage": "X-App-Usage",
                 "x-business-use-case-usage": "X-Business-Use-Case-Usage"}


def usage_headers(headers: Any) -> dict[str, str]:
    """Meta's usage headers of an answer (limits.md §5) under their documented names (httpx
    hands header names over in lower case)."""
    return {USAGE_HEADERS[k.lower()]: v for k, v in headers.items() if k.lower() in USAGE_HEADERS}


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
        resp = await self._call("POST", path, content=msgspec.json.encode(body),
                                headers={"Content-Type": "application/json"})
        return self._answer(resp)

    async def upload(self, path: str, fields: dict[str, str], filename: str, data: bytes,
                     mime_type: str) -> tuple[dict[str, Any], dict[str, str]]:
        """POST ``multipart/form-data`` (``fields`` and one ``file`` part), e.g. a media upload.

        An upload creates nothing a resend would duplicate harmfully, so an interrupted call is
        plain retryable here (never :class:`SendUncertain`).
        """
        try:
            resp = await self._call("POST", path, data=fields,
                                    files={"file": (filename, data, mime_type)})
        except SendUncertain as exc:
            raise MetaRetryable(str(exc)) from None
        return self._answer(resp)

    async def get(self, path: str, params: dict[str, str] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, str]]:
        """GET a Graph object (JSON)."""
        try:
            resp = await self._call("GET", path, params=params)
        except SendUncertain as exc:
            raise MetaRetryable(str(exc)) from None
        return self._answer(resp)

    async def download(self, url: str) -> tuple[bytes, str | None]:
        """GET an absolute URL (a media URL from ``GET /{media_id}``) with the bearer token,
        following redirects; return (bytes, content type). An expired URL raises the
        MetaError for the answer (fetch a fresh URL)."""
        try:
            resp = await self._call("GET", url, follow_redirects=True)
        except SendUncertain as exc:
            raise MetaRetryable(str(exc)) from None
        if resp.status_code >= 300:
            raise self._error(resp)
        return resp.content, resp.headers.get("content-type")

    async def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            return await self.client.request(method, url, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise MetaRetryable(f"Graph API unreachable: {exc!r}") from None  # never sent
        except httpx.TransportError as exc:
            raise SendUncertain(f"Graph API call interrupted after sending: {exc!r}") from None

    def _answer(self, resp: httpx.Response) -> tuple[dict[str, Any], dict[str, str]]:
        if resp.status_code >= 300:
            raise self._error(resp)
        try:
            answer = msgspec.json.decode(resp.content)
        except msgspec.DecodeError:
            answer = {}
        return (answer if isinstance(answer, dict) else {}), usage_headers(resp.headers)

    def _error(self, resp: httpx.Response) -> MetaError:
        headers = usage_headers(resp.headers)
        error = from_response(resp.status_code, resp.content, self.errors, resp.headers)
        error.headers = headers
        return error

    async def close(self) -> None:
        await self.client.aclose()
