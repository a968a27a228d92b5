"""Meta's ``X-Hub-Signature-256``: HMAC-SHA256 over the raw body, constant-time, fail closed."""

from __future__ import annotations

import functools
import hashlib
import hmac

PREFIX = "sha256="
# hashlib releases the GIL while it hashes 2048 bytes or more in one call, and the one-shot
# ``hmac.digest`` always does. On the event loop that hand-over costs far more than the hash: a
# journal or sink thread takes the GIL and the loop waits to get it back. So bodies up to
# _HOLD_GIL_UNDER bytes are hashed in slices the GIL is kept for; larger ones release it.
_SLICE = 2047
_HOLD_GIL_UNDER = 64 * 1024


def sign(secret: bytes, body: bytes) -> str:
    """The header value Meta sends for ``body``: ``sha256=`` + 64 lowercase hex digits."""
    return PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes | None, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is Meta's signature of the exact bytes ``body`` under ``secret``.

    Fails closed: no secret, no header, a wrong prefix, a wrong length or a non-ASCII byte is
    False. Only OWS (space, tab) around the digest is ignored, as HTTP defines it, so both intake
    paths agree. The digest is compared with ``hmac.compare_digest``; the expected value is never
    returned or logged.
    """
    if not secret or not header or not header.startswith(PREFIX):
        return False
    got = header[len(PREFIX):].strip(" \t")
    if len(got) != 64 or not got.isascii():
        return False
    try:
        given = bytes.fromhex(got)
    except ValueError:  # not hex
        return False
    return hmac.compare_digest(digest(secret, body), given)


def digest(secret: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of ``body`` under ``secret``, keeping the GIL for bodies of usual size."""
    mac = _keyed(secret).copy()
    if len(body) < _HOLD_GIL_UNDER:
        view = memoryview(body)
        for start in range(0, len(body), _SLICE):
            mac.update(view[start:start + _SLICE])
    else:
        mac.update(body)
    return mac.digest()


@functools.lru_cache(maxsize=64)
def _keyed(secret: bytes) -> hmac.HMAC:
    """The HMAC state after the key (copied for every body: the key is not re-hashed)."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def tokens_equal(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of a verify token or API token; False when either is empty."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))
