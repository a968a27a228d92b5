"""Which outbox a gateway uses, and the per-account sending lease that goes with it.

``[queue] backend = "sqlite"`` (the default): the SQLite outbox in ``data_dir/outbox.db``, one
replica, no lease needed (:class:`LocalLease` always holds). ``backend = "redis"``: the
:class:`~gateway.outbound.redis_outbox.RedisOutbox` on ``queue.redis_url`` (same key prefix as the
journal), shared by every replica, and an
:class:`~gateway.outbound.redis_outbox.AccountLease` per sending account so that one replica at a
time sends for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.outbound.outbox import Outbox
from gateway.outbound.redis_outbox import LEASE_MS, AccountLease, RedisOutbox

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def open_outbox(config: GatewayConfig, **redis_options: Any) -> Outbox | RedisOutbox:
    """The outbox for ``config.queue.backend`` (not connected yet: ``await outbox.open(...)``).

    ``redis_options`` go to :class:`RedisOutbox` (``retention_seconds``, ``alive_ms``, ...)."""
    if config.queue.backend == "redis":
        redis_options.setdefault("retention_seconds", config.outbound.retention_days * 86400)
        return RedisOutbox(config.queue.redis_url, **redis_options)
    return Outbox(config.server.data_dir)


class LocalLease:
    """The lease of a gateway that is the only sender (SQLite outbox): always held."""

    held = True

    async def acquire(self) -> bool:
        return True

    async def release(self) -> bool:
        return True

    async def start(self) -> bool:
        return True

    async def wait(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        pass


def account_lease(outbox: Outbox | RedisOutbox, channel: str, account: str,
                  ttl_ms: int = LEASE_MS) -> AccountLease | LocalLease:
    """The sending lease of one account: shared through Redis, or local (always held)."""
    if isinstance(outbox, RedisOutbox):
        return AccountLease(outbox, channel, account, ttl_ms)
    return LocalLease()
