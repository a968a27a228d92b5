"""``[sinks.forward]``: POST every batch of canonical events to a URL, signed like Svix/Stripe.

Each request carries:

- the body: the batch's canonical events, as JSON lines (``application/x-ndjson``, the default)
  or as one JSON array (``application/json``), each event exactly ``gateway.events.encode``;
- ``X-Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under secret>``;
- ``X-Gateway-Event-Ids: <id>,<id>,...`` in body order, so that a receiver can drop events it
  has already stored (delivery is at least once).

The receiver's answer decides what happens next: 2xx delivered; 408, 429 and 5xx (and network
errors, timeouts) are retried by the gateway with backoff, honouring ``Retry-After``; any other
status is permanent and the events become dead letters (``gateway dead-letters list|replay``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from gateway import PermanentError, RateLimited, Record, RetryableError, Sink
from gateway.config import SinkConfig
from gateway.errors import ConfigError

SIGNATURE_HEADER = "X-Gateway-Signature"
EVENT_IDS_HEADER = "X-Gateway-Event-Ids"
RETRYABLE_STATUSES = frozenset({408, 429})
MAX_BATCH = 200  # keeps X-Gateway-Event-Ids under common 8 KiB header limits
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "array": "application/json"}


class ForwardConfig(SinkConfig, kw_only=True):
    """``[sinks.forward]``.

    Attributes:
        url: where batches are POSTed (``http://`` or ``https://``). Env ``GATEWAY_FORWARD_URL``.
        secret: the HMAC key the receiver verifies with. Env ``GATEWAY_FORWARD_SECRET``; also
            ``{ env = "NAME" }`` or ``{ file = "/run/secrets/forward" }``.
        format: ``"jsonl"`` (one event per line) or ``"array"`` (one JSON array).
        timeout: seconds for the whole request (connect, send, answer).
        max_retry_after: the longest ``Retry-After`` honoured, in seconds; longer hints are cut.
        headers: extra request headers (e.g. an ``Authorization`` the receiver wants).
    """

    env: ClassVar = {"url": ("GATEWAY_FORWARD_URL",), "secret": ("GATEWAY_FORWARD_SECRET",)}
    url: str
    secret: str
    format: Literal["jsonl", "array"] = "jsonl"
    timeout: float = 10.0
    max_retry_after: float = 300.0
    headers: dict[str, str] = {}
    batch_size: int = 100

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError("must be an http:// or https:// URL", f"{prefix}.url")
        if not self.secret:
            raise ConfigError("must not be empty: receivers verify every request with it",
                              f"{prefix}.secret")
        if self.timeout <= 0:
            raise ConfigError("must be positive", f"{prefix}.timeout")
        if self.max_retry_after < 0:
            raise ConfigError("must not be negative", f"{prefix}.max_retry_after")
        if self.batch_size > MAX_BATCH:
            raise ConfigError(f"must be at most {MAX_BATCH} (the event-id header grows with it)",
                              f"{prefix}.batch_size")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Gateway-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify(secret: str, body: bytes, header: str | None, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` under ``secret`` and is at most ``tolerance`` seconds old.

    For receivers: fails closed on a missing or malformed header, compares in constant time and
    accepts any of several ``v1=`` values (sent while a secret is being rotated).
    """
    if not secret or not header:
        return False
    parts = [p.partition("=") for p in header.split(",")]
    stamps = [v for k, _, v in parts if k.strip() == "t"]
    given = [v.strip() for k, _, v in parts if k.strip() == "v1"]
    if len(stamps) != 1 or not stamps[0].strip().isdigit() or not given:
        return False
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    want = sign(secret, body, timestamp).rpartition("v1=")[2].encode()
    return any(hmac.compare_digest(want, g.encode("ascii", "replace")) for g in given)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.fromtimestamp(time.time() if now is None else now, tz=UTC)
    return max(0.0, (when - current).total_seconds())


class ForwardSink(Sink):
    """Forwards canonical events to an HTTP endpoint, one signed POST per batch.

    Args:
        config: the ``[sinks.forward]`` table.
        transport: an httpx transport to use instead of the network (tests:
            ``httpx.MockTransport``).
    """

    name = "forward"

    def __init__(self, config: ForwardConfig, transport: httpx.AsyncBaseTransport | None = None
                 ) -> None:
        super().__init__(config)
        self.config: ForwardConfig = config
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        from gateway_webhook_forwarder import __version__

        self._client = httpx.AsyncClient(
            timeout=self.config.timeout, transport=self._transport, follow_redirects=False,
            headers={"User-Agent": f"gateway-webhook-forwarder/{__version__}",
                     **self.config.headers})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ready(self) -> bool:
        # Probing someone else's endpoint on every /readyz would be noise; failures show up as
        # retries and dead letters instead.
        return self._client is not None

    def body(self, records: list[Record]) -> bytes:
        """The request body: each record's canonical encoding, as lines or as an array."""
        if self.config.format == "array":
            return b"[" + b",".join(r.data for r in records) + b"]"
        return b"".join(r.data + b"\n" for r in records)

    def headers(self, records: list[Record], body: bytes, timestamp: int) -> dict[str, str]:
        """Content type, signature and event ids for one request."""
        return {"Content-Type": CONTENT_TYPES[self.config.format],
                SIGNATURE_HEADER: sign(self.config.secret, body, timestamp),
                EVENT_IDS_HEADER: ",".join(r.event.id for r in records)}

    async def write(self, records: list[Record]) -> None:
        """POST the batch; raise RetryableError / PermanentError for the dispatcher to act on."""
        if self._client is None:
            raise RetryableError("forward sink is not started")
        body = self.body(records)
        headers = self.headers(records, body, int(time.time()))
        try:
            response = await self._client.post(self.config.url, content=body, headers=headers)
        except httpx.TransportError as exc:  # connect, read, write, pool, timeouts
            raise RetryableError(f"POST {safe_url(self.config.url)} failed: "
                                 f"{type(exc).__name__}") from exc
        self.check(response)

    def check(self, response: httpx.Response) -> None:
        """Classify the receiver's answer.

        Raises:
            RateLimited: 429 (``retry_after`` from its ``Retry-After``).
            RetryableError: 408 or 5xx.
            PermanentError: any other status outside 2xx (3xx included: configure the final URL).
        """
        status = response.status_code
        if 200 <= status < 300:
            return
        detail = f"{safe_url(self.config.url)} answered {status} {_snippet(response)}".rstrip()
        hint = retry_after(response.headers.get("Retry-After"))
        if hint is not None:
            hint = min(hint, self.config.max_retry_after)
        if status == 429:
            raise RateLimited(detail, retry_after=hint)
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise RetryableError(detail, retry_after=hint)
        raise PermanentError(detail)


def safe_url(url: str) -> str:
    """``url`` fit for errors, logs and dead letters: without user, password or query string
    (tokens often travel there), e.g. ``https://crm.example.com:8443/hooks``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a malformed port: show nothing that could be a credential
        return "<forward url>"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")
