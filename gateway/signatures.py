"""Meta's ``X-Hub-Signature-256``: HMAC-SHA256 over the raw body, constant-time, fail closed."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(secret: bytes, body: bytes) -> str:
    """The header value Meta sends for ``body``: ``sha256=`` + 64 lowercase hex digits."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes | None, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is Meta's signature of the exact bytes ``body`` under ``secret``.

    Fails closed: no secret, no header, a wrong prefix or a wrong length is False. The digest is
    compared with ``hmac.compare_digest``; the expected value is never returned or logged.
    """
    if not secret or not header or not header.startswith(PREFIX):
        return False
    got = header[len(PREFIX):].strip()
    if len(got) != 64:
        return False
    try:
        given = bytes.fromhex(got)
    except ValueError:  # not hex
        return False
    return hmac.compare_digest(hmac.digest(secret, body, "sha256"), given)


def tokens_equal(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of a verify token or API token; False when either is empty."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))
