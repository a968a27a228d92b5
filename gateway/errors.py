"""The gateway's exception tree. Callers decide on the class, never on the message text.

::

    GatewayError
    ├── ConfigError            a bad config key (``key`` names it) — exit 2 at start-up
    ├── PluginError            a plugin failed to load or misbehaved (``plugin`` names it)
    ├── BadPayload             a webhook body that is not JSON or not the channel's Meta envelope
    ├── JournalFull            the intake journal is over its bound — answer 503 + Retry-After
    └── DeliveryError          delivering an event to a sink, or a message to Meta, failed
        ├── RetryableError     transient: retry with backoff (``retry_after`` is a hint, seconds)
        │   └── RateLimited    the other side asked us to slow down
        └── PermanentError     retrying cannot help: dead-letter or fail at once

A sink raises ``RetryableError`` or ``PermanentError`` (or lets any other exception through,
which the dispatcher treats as retryable) and the dispatcher decides retries and dead letters.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration problem. ``key`` is the dotted path of the bad key (or "" if none)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class PluginError(GatewayError):
    """A plugin failed to import, register or start. ``plugin`` names it."""

    def __init__(self, message: str, plugin: str = "") -> None:
        super().__init__(f"plugin {plugin!r}: {message}" if plugin else message)
        self.plugin = plugin


def failed_to_start(what: str, name: str, plugin: str, exc: Exception) -> Exception:
    """What to raise when a channel's or sink's ``start()`` raised ``exc``: a config problem, a
    plugin's own report, or a file (a database) it cannot open as it is (the CLI names the path
    and its config key); anything else as a PluginError naming the component and its plugin."""
    import sqlite3

    if isinstance(exc, ConfigError | PluginError | sqlite3.Error) or (
            isinstance(exc, OSError) and exc.filename):
        return exc
    error = PluginError(f"{what} {name!r} failed to start: {exc!r}", plugin=plugin)
    error.__cause__ = exc
    return error


class BadPayload(GatewayError):
    """A webhook body that is not JSON, or not the channel's Meta envelope (HTTP 400)."""


class JournalFull(GatewayError):
    """The intake journal holds more unprocessed requests than its bound (HTTP 503)."""

    def __init__(self, pending: int, bound: int, retry_after: float) -> None:
        super().__init__(f"journal holds {pending} unprocessed requests (bound {bound})")
        self.pending = pending
        self.bound = bound
        self.retry_after = retry_after


class DeliveryError(GatewayError):
    """Delivering to a sink or to Meta failed."""


class RetryableError(DeliveryError):
    """A transient failure: retry with backoff. ``retry_after`` is a hint in seconds, if known."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(RetryableError):
    """The other side asked us to slow down (e.g. Meta 130429, 131056); retry after a pause."""


class PermanentError(DeliveryError):
    """Retrying cannot help (bad data, permission denied): dead-letter or fail at once."""


__all__ = [
    "BadPayload",
    "ConfigError",
    "DeliveryError",
    "GatewayError",
    "JournalFull",
    "PermanentError",
    "PluginError",
    "RateLimited",
    "RetryableError",
]
