"""The Redis client shared by the scale-out journal and the outbox: connecting (with a
``prefix=`` in the URL), riding out outages, readiness, and the lease scripts both use."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

T = TypeVar("T")
OUTAGE_BACKOFF_MAX = 5.0  # background loops wait for Redis to come back, retrying this often

# A lease (a sink's delivery, an account's sending): taken or renewed by its owner, released
# only by it.
ACQUIRE_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def split_url(url: str) -> tuple[str, str | None]:
    """The Redis URL without a ``prefix=`` query parameter, and that parameter (or None)."""
    parts = urlsplit(url)
    prefix = parse_qs(parts.query).get("prefix", [None])[0]
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith("prefix="))
    return urlunsplit(parts._replace(query=query)), prefix


def as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def cancellable(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, then raise a cancellation of the current task that arrived meanwhile.

    redis-py (seen with 8.1) may complete a command normally although the task awaiting it was
    cancelled, swallowing the cancellation; a loop around it would then never stop (and whoever
    cancelled it would wait forever). Only a cancellation requested *during* the call counts, so
    cleanup code running after an earlier cancellation is not disturbed."""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    result = await awaitable
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
    return result


def connect(url: str):
    """The Redis client of the journal and the outbox. A blip is retried by the client (about 1 s
    at most, so a webhook or a POST /v1/messages is answered quickly: 503, and Meta retries);
    longer outages are waited out by the background loops (``_outage``)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff

    return aioredis.from_url(
        url, socket_connect_timeout=3, socket_timeout=15, socket_keepalive=True,
        health_check_interval=30, retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), 3))


def unavailable() -> tuple[type[BaseException], ...]:
    """The errors of a Redis that is unreachable or read-only (during a fail-over)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError


async def retry_through_outages(logger, what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``; while Redis is unavailable, log, wait (backing off to
    ``OUTAGE_BACKOFF_MAX``) and try again. A cancellation is never swallowed
    (:func:`cancellable`)."""
    delay = 0.1
    while True:
        try:
            return await cancellable(call())
        except unavailable() as exc:
            logger.warning("redis_unavailable", operation=what, error=repr(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(OUTAGE_BACKOFF_MAX, delay * 2)


async def redis_ping(client) -> bool:
    """Whether Redis answers (within 2 s): the readiness check of the journal and the outbox."""
    try:
        return bool(await asyncio.wait_for(client.ping(), timeout=2.0))
    except Exception:  # noqa: BLE001 - readiness is a yes/no question
        return False
