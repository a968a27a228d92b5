"""The channel interface: what a channel plugin provides to the core."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from gateway.events import Event, Notice
    from gateway.outbound.http import SendResult
    from gateway.outbound.request import OutboundRequest


class Channel(abc.ABC):
    """A messaging channel: verifies and normalises its webhooks (and, optionally, sends).

    Attributes:
        name: the ``{channel}`` in ``/webhooks/{channel}`` and the events' ``channel`` field.
        app_secret: the Meta app secret that signs this channel's webhooks (bytes), or None.
        verify_token: the token Meta's GET handshake must present, or None (handshake refused).
    """

    name: ClassVar[str]

    def __init__(self, *, app_secret: str | None, verify_token: str | None) -> None:
        self.app_secret = app_secret.encode("utf-8") if app_secret else None
        self.verify_token = verify_token or None

    @abc.abstractmethod
    def check_envelope(self, body: bytes) -> None:
        """Cheap check, on the request path, that ``body`` is this channel's Meta envelope.

        Raises:
            gateway.errors.BadPayload: not JSON, or not this channel's envelope (HTTP 400).
        """

    @abc.abstractmethod
    def normalise(self, body: bytes) -> list[Event]:
        """Turn one raw, verified request body into canonical events (after the ack).

        Must return one event per message / status / reaction / … in the body and never raise for
        odd content inside a valid envelope (unknown types become ``unsupported``).

        Raises:
            gateway.errors.BadPayload: the body is not this channel's envelope.
        """

    def notices(self) -> list[Notice]:
        """The out-of-band account errors the :meth:`normalise` calls met since the last call,
        each handed out once (WhatsApp: the value-level ``errors[]``, which yield no event). The
        processor calls it after normalising each batch; it counts them
        (``gateway_meta_errors_total``), and the outbound service slows the account down on a
        throttling code. The default has none."""
        return []

    def accounts(self) -> dict[str, dict[str, Any]]:
        """Accounts this channel can send from: id -> limits (``rate`` per second, optional
        ``pair_interval`` seconds and ``pair_burst`` for a per-recipient limit).
        Empty: receive only."""
        return {}

    def recipient(self, to: str) -> str:
        """The canonical form of a ``to`` an API client wrote: the id inbound events carry for
        that customer (the window, consent and erasure of outbound messages are keyed by it).
        The default keeps it as written."""
        return to

    def may_be_alias(self, to: str) -> bool:
        """Whether ``to`` (as :meth:`recipient` made it) can be an alias this channel sets as a
        party's ``user_id`` (WhatsApp: a BSUID, never a wa_id): the outbound service then asks
        the journal which customer it names (:mod:`gateway.identities`). The default says yes
        (one look-up per send); a channel that sets no ``user_id`` says no."""
        return True

    def previous_alias(self, event: Event) -> str | None:
        """For a ``system`` message (``event.type == "system"``) that says its customer's alias
        changed (WhatsApp's ``user_changed_user_id``, whose customer is the new BSUID): the
        alias it replaces. The processor then pairs the new alias with the customer the old
        one was paired with (:mod:`gateway.identities`). The default: None (no such message)."""
        return None

    async def send(self, account_id: str, request: OutboundRequest,
                   callback_data: str | None) -> SendResult:
        """Send one message through the provider's API.

        Raises:
            gateway.outbound.request.InvalidRequest: the channel cannot send this request.
            gateway.outbound.errors.MetaError: the provider refused (retryable or permanent).
        """
        raise NotImplementedError(f"channel {self.name!r} cannot send")

    async def start(self) -> None:  # noqa: B027 - optional hook: a no-op unless overridden
        """Open connections (HTTP clients for sending). Called once before intake opens."""

    async def close(self) -> None:  # noqa: B027 - optional hook: a no-op unless overridden
        """Release what ``start`` opened. Called once at shutdown."""
