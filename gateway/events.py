"""The canonical event (CONTRACT §5).

Every channel turns Meta's payloads into these msgspec Structs; every sink receives them. The
JSON encoding (``encode``) is the public wire form: the ``jsonl`` sink writes it byte for byte.

Events form a tagged union on ``kind``: ``Message``, ``Status``, ``Reaction``, ``Postback``,
``Read``, ``Handover``, ``Referral`` and ``Preference`` (an extra kind: WhatsApp's marketing
opt-out) share every field of ``Event`` and differ only in their tag,
so code can match on the class (``isinstance(ev, Status)``) or on ``ev.kind``.

Fields the contract does not name but Meta's payloads carry (``referral``, ``order``, ``system``,
``contacts``, ``handover``, ``story_id``, ``raw_type``, ``standby``, ``callback_data``,
``pricing``, ``context``, ``participant``, ``interactive``, ``identity``, and
``Party.username``, ``Party.parent_user_id``, ``Media.voice``, ``Media.animated``,
``Location.url``) are extra fields, omitted when empty. ``STORED_EXTRAS`` are the ones the
storage sinks keep in a message's ``extra``.
"""

from __future__ import annotations

import functools
import hashlib
from datetime import UTC, datetime
from typing import Any, ClassVar, Union

import msgspec

SCHEMA_VERSION = 1

KINDS = ("message", "status", "reaction", "postback", "read", "handover", "referral",
         "preference")
MESSAGE_TYPES = (
    "text", "image", "audio", "video", "document", "sticker", "location", "contacts",
    "interactive", "button", "order", "share", "story_mention", "story_reply", "system",
    "unsupported", "deleted",
)
STATUSES = ("sent", "delivered", "read", "played", "failed", "deleted")
# ``raw_type`` of a message that edits another (``reply_to`` names it): WhatsApp's ``edit``,
# Instagram's ``message_edit``. Sinks apply it to the original; the AI sink does not answer it.
EDITS = frozenset({"edit", "message_edit"})


def customer_wrote(ev: Event) -> bool:
    """Whether ``ev`` is the customer writing: an inbound message or postback, but not an unsend
    (``deleted``: no content) nor a ``system`` message (WhatsApp's own notice of a changed
    number or identity). What opens the service window (limits.md §8: "after the user's last
    message") and moves ``last_inbound_at``; a read, reaction, referral or handover is the
    customer (or another app) active, not writing."""
    return (ev.direction == "inbound" and ev.kind in ("message", "postback")
            and ev.type not in ("deleted", "system"))


def edit_target(ev: Event) -> str | None:
    """The id of the message ``ev`` edits (its ``reply_to``), or None when ``ev`` is no edit.

    An edit replaces the original's content in the original's row: it is never a message of its
    own and never counted again. An edit has a ``message_id`` (WhatsApp: its own wamid;
    Instagram: the edited mid); Instagram's ``message_edit`` items normalised before they were
    edits (``unsupported``, no ``message_id``), replayed from a journal, stay rows of their own."""
    if ev.kind == "message" and ev.raw_type in EDITS and ev.message_id:
        return ev.reply_to
    return None


# Extra fields the storage sinks keep on a message (SQLite: the ``extra`` JSON column; Firestore:
# fields of the document), each only when set. ``pricing`` and ``participant`` are statuses'.
STORED_EXTRAS = ("raw_type", "standby", "story_id", "callback_data", "referral", "order", "system",
                 "contacts", "handover", "context", "interactive", "identity")


class Party(msgspec.Struct, omit_defaults=True, frozen=True):
    """Who sent or received an event: a wa_id, an IGSID or a business account id.

    ``user_id`` (an extra field) is a WhatsApp customer's business-scoped user id (BSUID,
    ``US.1349...``) when Meta sends one: beside the wa_id, which stays the ``id`` while Meta sends
    it, so that a later payload naming the BSUID alone can be matched to the same customer.
    ``username`` (an extra field) is the WhatsApp username of the customer's profile, and
    ``parent_user_id`` (an extra field) the parent BSUID Meta names beside the BSUID."""

    id: str
    name: str | None = None
    user_id: str | None = None
    username: str | None = None  # WhatsApp: the customer's username, when Meta sends one (extra)
    parent_user_id: str | None = None  # WhatsApp: the parent BSUID (US.ENT...), when sent (extra)


class Media(msgspec.Struct, omit_defaults=True, frozen=True):
    """A media attachment as Meta describes it (ids and URLs only; media is never inlined)."""

    id: str | None = None
    url: str | None = None
    mime_type: str | None = None
    sha256: str | None = None
    caption: str | None = None
    filename: str | None = None
    voice: bool = False  # WhatsApp: a push-to-talk voice note (an extra field)
    animated: bool = False  # WhatsApp: an animated sticker (an extra field)


class Location(msgspec.Struct, omit_defaults=True, frozen=True):
    """A shared location."""

    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None
    url: str | None = None  # WhatsApp: the place's link (an extra field)


class ErrorInfo(msgspec.Struct, omit_defaults=True, frozen=True):
    """Meta's error on a failed status or an unsupported message."""

    code: int
    title: str | None = None
    message: str | None = None


class Notice(msgspec.Struct, frozen=True):
    """An out-of-band error Meta reports for an account, with no message to carry it (WhatsApp's
    value-level ``errors[]``, webhooks.md §4.6). Not an event: no sink stores it. The processor
    counts it (``gateway_meta_errors_total``) and hands it to the outbound service, whose limiter
    slows the account down on a throttling code (:meth:`gateway.channel.Channel.notices`)."""

    channel: str
    account_id: str
    error: ErrorInfo


class Event(msgspec.Struct, tag_field="kind", omit_defaults=True, kw_only=True, frozen=True):
    """Fields shared by every canonical event (CONTRACT §5). Use a subclass, never this one."""

    schema: int  # always SCHEMA_VERSION; required so that it is never omitted on the wire
    id: str
    channel: str
    direction: str  # "inbound" | "outbound"; required for the same reason
    account_id: str
    conversation_id: str
    sender: Party
    recipient: Party
    timestamp: datetime
    message_id: str | None = None
    type: str | None = None
    text: str | None = None
    payload: str | None = None
    reply_to: str | None = None
    media: Media | None = None
    location: Location | None = None
    status: str | None = None
    error: ErrorInfo | None = None
    emoji: str | None = None
    # Extra fields: Meta's detail the contract has no column for.
    raw_type: str | None = None
    standby: bool = False
    story_id: str | None = None
    callback_data: str | None = None
    referral: dict[str, Any] | None = None
    order: dict[str, Any] | None = None
    system: dict[str, Any] | None = None
    contacts: list[Any] | None = None
    handover: dict[str, Any] | None = None
    pricing: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    participant: str | None = None
    interactive: dict[str, Any] | None = None
    identity: dict[str, Any] | None = None

    kind: ClassVar[str]

    @property
    def customer_id(self) -> str:
        """The customer's id: the sender of inbound events, the recipient of outbound ones."""
        return self.sender.id if self.direction == "inbound" else self.recipient.id


class Message(Event, tag="message"):
    """A message from a customer, or the echo of one the business sent."""

    kind: ClassVar[str] = "message"


class Status(Event, tag="status"):
    """A delivery status (`sent`, `delivered`, `read`, `failed`) of an outbound message."""

    kind: ClassVar[str] = "status"


class Reaction(Event, tag="reaction"):
    """A reaction to `message_id`; `emoji` is "" when the reaction was removed."""

    kind: ClassVar[str] = "reaction"


class Postback(Event, tag="postback"):
    """A button / ice-breaker postback (Instagram)."""

    kind: ClassVar[str] = "postback"


class Read(Event, tag="read"):
    """The customer has seen everything up to `message_id`."""

    kind: ClassVar[str] = "read"


class Handover(Event, tag="handover"):
    """Thread control moved between apps (Instagram handover protocol)."""

    kind: ClassVar[str] = "handover"


class Referral(Event, tag="referral"):
    """The customer arrived through a link or an ad (Instagram `messaging_referral`)."""

    kind: ClassVar[str] = "referral"


class Preference(Event, tag="preference"):
    """The customer stopped or resumed a category of messages outside a conversation (WhatsApp
    ``user_preferences``): ``type`` names the category (``marketing_messages``), ``payload`` says
    ``stop`` or ``resume``, ``text`` is Meta's detail. Sinks that keep consent read it through
    :class:`gateway.consent.Consent`."""

    kind: ClassVar[str] = "preference"


AnyEvent = Union[Message, Status, Reaction, Postback, Read, Handover, Referral,  # noqa: UP007
                 Preference]
EVENT_CLASSES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Message, Status, Reaction, Postback, Read, Handover, Referral,
                              Preference)
}

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyEvent)


def encode(event: Event) -> bytes:
    """The event's canonical JSON encoding (what the jsonl sink writes)."""
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """Parse one canonical JSON event back into its Struct."""
    return _decoder.decode(data)


def event_id(channel: str, *parts: object) -> str:
    """A stable event id derived only from fields Meta sets (never arrival time or position).

    The same Meta event redelivered yields the same id; different parts yield different ids.
    """
    key = "\x1f".join([channel, *(str(p) for p in parts)])
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def conversation_id(channel: str, account_id: str, customer_id: str) -> str:
    """Stable per (channel, account_id, customer); readable and free of ``/``."""
    return f"{channel}:{account_id}:{customer_id}".replace("/", "_")


@functools.lru_cache(maxsize=4096)  # the events of one second share their timestamp
def from_epoch_seconds(value: str | int | float) -> datetime:
    """WhatsApp timestamps: strings of epoch seconds."""
    return datetime.fromtimestamp(int(float(value)), tz=UTC)


def from_epoch_millis(value: int | float | str) -> datetime:
    """Instagram timestamps: integers of epoch milliseconds (millisecond precision kept)."""
    ms = int(float(value))
    return datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=(ms % 1000) * 1000)
