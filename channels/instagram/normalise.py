"""Instagram Messaging webhook → canonical events (CONTRACT §5, meta/webhooks.md §5).

Every entry × ``messaging[]`` / ``standby[]`` item yields one event. A malformed part (an entry
that is no object, a ``messaging`` / ``standby`` that is no list, an item of the wrong shape) is
skipped on its own; every valid item beside it still counts. Mapping choices
(shared/fixtures/README.md "Conventions"):

- ``account_id`` = ``entry[].id`` (meta/webhooks.md §5.3; CONTRACT §5 names ``recipient.id`` of
  inbound: the same id in every payload Meta documents); an entry without an ``id`` takes each
  item's business id, ``recipient.id`` (``sender.id`` of an echo), instead of losing its events;
  the customer is ``sender.id``, or ``recipient.id`` on echoes (``is_echo``: ``direction``
  outbound);
- a message with several attachments is ONE event carrying the first attachment as ``media`` (the
  others are not lost from the journal's raw body, but not modelled); ``file`` → ``document``,
  ``ig_reel`` / ``reel`` → ``video`` (``raw_type`` keeps the original; ``media.id`` is the
  ``reel_video_id``, ``media.caption`` its ``title``); an attachment type we do not know, or none,
  is ``unsupported`` (``raw_type`` the type, when there is one);
- ``reply_to.story`` → ``story_reply`` with ``story_id``, and the story URL as ``media.url``;
  when the story reply also carries an attachment (a photo sent in answer to the story), that
  attachment is ``media`` (as on any message, first one, reel id and title included) and its
  Meta type is ``raw_type``. CONTRACT §5 has one ``media``: it holds what the customer sent,
  the message's content, while the story (the business's own, which it answers) is referenced by
  ``story_id`` as a quoted message is by ``reply_to``; the story's CDN URL, which expires, is
  then not kept. A ``story_reply`` with ``raw_type`` set carries the attachment as ``media``,
  one without carries the story;
- ``is_deleted`` → ``deleted`` (its id differs from the original's), ``is_unsupported`` →
  ``unsupported``, keeping what it answers (``reply_to``, or the ``story_id`` of a story it
  answers);
- a reaction's ``emoji`` is Meta's, else the emoji of its label (``love``), else the label itself
  (``""`` only on ``unreact``);
- ``read`` / ``reaction`` / ``postback`` / ``referral`` / ``*_thread_control`` → those kinds
  (``handover`` for thread control); items on ``standby[]`` are marked ``standby``;
- a referral that arrives with a message (the customer wrote from an ad, or after an ig.me link:
  ``referral`` beside ``message`` in the item, or inside the message) rides on that message as its
  ``referral`` (extra field, as on WhatsApp), like one inside a ``postback``;
- ``message_edit`` (``{mid, text, num_edit}``) → an edit, shaped as WhatsApp's ``edit``: a
  ``message`` of type ``text`` (``unsupported`` without a text), ``text`` = the edited text,
  ``raw_type`` ``message_edit``, ``reply_to`` = the edited ``mid``, and ``message_id`` = that
  ``mid`` too (an edit has no id of its own; the storage sinks rewrite that message's content in
  place, ``gateway.events.edit_target``, and never count it again). One without a ``mid``
  edits nothing known: ``unsupported`` with ``raw_type`` ``message_edit``;
- an item whose event key is none of those (``optin``, a key Meta adds later) is a ``message``
  of type ``unsupported`` with ``raw_type`` = that key, never dropped; when its object names a
  ``mid`` (the message it is about) that is ``reply_to`` (``message_id`` stays unset, so the
  referenced message is never overwritten in storage).

Ids come only from Meta's fields (webhooks.md §3): a message's ``mid`` (+ the deleted flag), a
reaction's (mid, sender, action, label, timestamp), a read's (sender, mid), an edit's (mid,
num_edit; its timestamp when Meta gives no ``num_edit``), an unknown item's (key, sender,
timestamp, mid), and so on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from channels.envelope import as_str, decode_each, raw_items
from channels.envelope import parse_envelope as _parse
from channels.instagram import schemas
from gateway.events import (
    SCHEMA_VERSION,
    Event,
    Handover,
    Media,
    Message,
    Party,
    Postback,
    Reaction,
    Read,
    Referral,
    conversation_id,
    event_id,
    from_epoch_millis,
)

CHANNEL = "instagram"
OBJECTS = frozenset({"instagram", "page"})
ATTACHMENT_TYPES = {"image": "image", "video": "video", "audio": "audio", "file": "document",
                    "share": "share", "story_mention": "story_mention", "ig_reel": "video",
                    "reel": "video"}
LABELS = {"love": "\u2764\ufe0f"}  # reaction labels (webhooks.md §5) and their emoji
HANDOVER = ("pass_thread_control", "take_thread_control", "request_thread_control")
ADDRESSING = frozenset({"sender", "recipient", "timestamp"})


def parse_envelope(body: bytes) -> None:
    """The intake's cheap check: JSON with ``object`` instagram (or page) and an entry list.

    Raises:
        BadPayload: not JSON, or not an Instagram envelope.
    """
    _parse(body, OBJECTS)


def normalise(body: bytes) -> list[Event]:
    """Every canonical event in one webhook body.

    Raises:
        BadPayload: not JSON, or not an Instagram envelope.
    """
    events: list[Event] = []
    for entry in decode_each(_parse(body, OBJECTS).entry, schemas.entry_decoder):
        account = as_str(entry.id)  # None: each item's business id (recipient; echo: sender)
        for standby, items in ((False, entry.messaging), (True, entry.standby)):
            for raw in raw_items(items):
                try:
                    item = schemas.item_decoder.decode(raw)
                except (msgspec.DecodeError, RecursionError):
                    continue  # one malformed item never spoils the batch
                event = _item(item, raw, account, standby)
                if event is not None:
                    events.append(event)
    return events


def _item(item: schemas.Item, raw: msgspec.Raw, account: str | None,
          standby: bool) -> Event | None:
    sender = as_str(item.sender.id) if item.sender else None
    recipient = as_str(item.recipient.id) if item.recipient else None
    try:
        when = from_epoch_millis(item.timestamp)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    if sender is None or recipient is None:
        return None
    echo = isinstance(item.message, dict) and item.message.get("is_echo") is True
    customer = recipient if echo else sender
    account = account or (sender if echo else recipient)
    common = dict(
        schema=SCHEMA_VERSION, channel=CHANNEL, direction="outbound" if echo else "inbound",
        account_id=account, conversation_id=conversation_id(CHANNEL, account, customer),
        sender=Party(id=sender), recipient=Party(id=recipient), timestamp=when, standby=standby,
    )
    stamp = str(item.timestamp)
    for key, build in BUILDERS:
        value = getattr(item, key)
        if isinstance(value, dict):
            event = build(value, common, sender, stamp, key)
            if key == "message" and isinstance(item.referral, dict) and isinstance(event, Message):
                event = msgspec.structs.replace(event, referral=event.referral or item.referral)
            return event
    return _unknown(raw, common, sender, stamp)


def _unknown(raw: msgspec.Raw, common: dict, sender: str, stamp: str) -> Event | None:
    """An item of a kind this channel does not model: ``unsupported``, keyed by its event key.

    The key is the first one that is neither addressing nor a known event key (those were
    handled, or are not objects); an item with no such key carries no event at all.
    """
    fields = schemas.fields_decoder.decode(raw)
    key = next((k for k in fields if k not in ADDRESSING and k not in KNOWN), None)
    if key is None:
        return None
    value = msgspec.json.decode(fields[key])  # a part of an item that decoded: valid JSON
    mid = as_str(value.get("mid")) if isinstance(value, dict) else None
    return Message(id=event_id(CHANNEL, "unsupported", key, sender, stamp, mid or ""), **common,
                   type="unsupported", raw_type=key, reply_to=mid)


def _message(msg: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event | None:
    mid = as_str(msg.get("mid"))
    if mid is None:
        return None
    if msg.get("is_deleted") is True:
        return Message(id=event_id(CHANNEL, "message", mid, "deleted"), **common, message_id=mid,
                       type="deleted")
    fields: dict[str, Any] = {"text": _str(msg.get("text"))}
    if msg.get("is_unsupported") is True:  # what it answers still counts (a GIF to a story)
        answered = _content(None, msg.get("reply_to"))
        fields.update(type="unsupported", reply_to=answered.get("reply_to"),
                      story_id=answered.get("story_id"))
    else:
        fields.update(_content(msg.get("attachments"), msg.get("reply_to")))
        fields.setdefault("type", "text")
    quick = msg.get("quick_reply")
    if isinstance(quick, dict):
        fields["payload"] = as_str(quick.get("payload"))
    if isinstance(msg.get("referral"), dict):
        fields["referral"] = msg["referral"]
    return Message(id=event_id(CHANNEL, "message", mid), **common, message_id=mid, **fields)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _content(attachments: Any, reply: Any) -> dict[str, Any]:
    """``type``, ``media`` and what the message answers, from its attachment and ``reply_to``.

    A story reply that carries an attachment keeps it: the attachment is what the customer sent,
    so it is ``media`` (its Meta type in ``raw_type``) and the story is referenced by ``story_id``,
    as a quoted message is by ``reply_to``. Without an attachment (or with one that names nothing
    to fetch) the story's URL is ``media``.
    """
    attachment = _attachment(attachments)
    reply = reply if isinstance(reply, dict) else {}
    story = reply.get("story")
    if isinstance(story, dict):
        if attachment is None or attachment[2] == Media():
            attachment = None, "", Media(url=_str(story.get("url")))
        raw, _, media = attachment
        return {"type": "story_reply", "raw_type": raw, "media": media,
                "story_id": as_str(story.get("id"))}
    fields: dict[str, Any] = {"reply_to": as_str(reply.get("mid"))}
    if attachment is not None:
        raw, kind, media = attachment
        fields.update(type=kind, raw_type=raw if kind != raw else None, media=media)
    return fields


def _attachment(attachments: Any) -> tuple[str | None, str, Media] | None:
    """The first attachment as (Meta's type, the canonical type, its media); None without one."""
    if not isinstance(attachments, list) or not attachments or not isinstance(attachments[0], dict):
        return None
    first = attachments[0]
    raw = _str(first.get("type"))
    payload = first.get("payload") if isinstance(first.get("payload"), dict) else {}
    kind = ATTACHMENT_TYPES.get(raw or "", "unsupported")
    media = Media(url=_str(payload.get("url")))
    if kind == "video" and raw != "video":  # a reel shared into the DM: its id and title
        media = Media(id=as_str(payload.get("reel_video_id")), url=media.url,
                      caption=_str(payload.get("title")))
    return raw, kind, media


def _message_edit(edit: dict[str, Any], common: dict, sender: str, stamp: str,
                  key: str) -> Event:
    mid = as_str(edit.get("mid"))
    if mid is None:
        return Message(id=event_id(CHANNEL, "unsupported", key, sender, stamp, ""), **common,
                       type="unsupported", raw_type=key)
    number = edit.get("num_edit")
    nth = str(number) if isinstance(number, int) and not isinstance(number, bool) else f"@{stamp}"
    text = _str(edit.get("text"))
    return Message(id=event_id(CHANNEL, "message_edit", mid, nth), **common, message_id=mid,
                   type="text" if text is not None else "unsupported", text=text,
                   raw_type="message_edit", reply_to=mid)


def _postback(pb: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event:
    mid = as_str(pb.get("mid"))
    payload = as_str(pb.get("payload"))
    ident = event_id(CHANNEL, "postback", mid) if mid else event_id(
        CHANNEL, "postback", sender, stamp, payload or "")
    referral = pb.get("referral") if isinstance(pb.get("referral"), dict) else None
    return Postback(id=ident, **common, message_id=mid, text=_str(pb.get("title")),
                    payload=payload, referral=referral)


def _reaction(r: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event:
    mid = as_str(r.get("mid"))
    action = _str(r.get("action")) or "react"
    label = _str(r.get("reaction")) or ""
    # Without Meta's emoji: the one a known label stands for, else the label itself (never "",
    # which means a removal)
    emoji = "" if action == "unreact" else (_str(r.get("emoji")) or LABELS.get(label, label))
    return Reaction(id=event_id(CHANNEL, "reaction", mid or "", sender, action, label, stamp),
                    **common, message_id=mid, emoji=emoji)


def _read(r: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event:
    mid = as_str(r.get("mid"))
    mark = mid if mid else f"watermark:{as_str(r.get('watermark')) or stamp}"
    return Read(id=event_id(CHANNEL, "read", sender, mark), **common, message_id=mid)


def _referral(r: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event:
    return Referral(id=event_id(CHANNEL, "referral", sender, stamp), **common,
                    payload=as_str(r.get("ref")), referral=r)


def _handover(h: dict[str, Any], common: dict, sender: str, stamp: str, key: str) -> Event:
    detail = {"action": key.split("_", 1)[0], **h}
    return Handover(id=event_id(CHANNEL, "handover", sender, key, stamp), **common, handover=detail)


BUILDERS = (
    ("message", _message), ("postback", _postback), ("reaction", _reaction), ("read", _read),
    ("referral", _referral), ("message_edit", _message_edit),
    *((key, _handover) for key in HANDOVER),
)
KNOWN = frozenset(key for key, _ in BUILDERS)
