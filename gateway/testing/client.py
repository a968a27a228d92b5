"""Signing and waiting helpers (standard library + the gateway's own signer)."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

from gateway.signatures import sign


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign_headers(secret: str, body: bytes) -> dict[str, str]:
    """The headers Meta sends with a webhook POST of ``body``."""
    return {"Content-Type": "application/json",
            "X-Hub-Signature-256": sign(secret.encode(), body)}


def wait_http(url: str, timeout: float = 20.0, status: int = 200) -> None:
    """Poll ``url`` until it answers ``status``; raise TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == status:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.code
            if exc.code == status:
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer {status} within {timeout}s (last: {last})")
