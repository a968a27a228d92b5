"""Property-based tests on the channel normalisers themselves (no HTTP).

Whatever the bytes, a channel's ``normalise`` returns a list of valid canonical events or raises
``BadPayload``; never anything else. Structured strategies build real-shaped envelopes (every
WhatsApp message type and status shape, every Instagram item kind, handover included) with
arbitrary or missing field values, and every event that comes out must round-trip through the
wire encoding and carry the contract's required fields. Ids depend only on Meta's fields: the
same items batched differently, or serialised differently, keep their ids.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from channels.envelope import as_str
from channels.instagram.normalise import normalise as instagram
from channels.whatsapp.normalise import normalise as whatsapp
from gateway.errors import BadPayload
from gateway.events import (
    EVENT_CLASSES,
    KINDS,
    MESSAGE_TYPES,
    Event,
    Party,
    conversation_id,
    decode,
    encode,
)

NORMALISE = {"whatsapp": whatsapp, "instagram": instagram}
REQUIRED = ("id", "kind", "channel", "direction", "account_id", "conversation_id", "sender",
            "timestamp")
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=30)

# -- leaves and arbitrary JSON -------------------------------------------------------------------

# Numbers JSON allows that no float or int64 holds, and the edges of those ranges.
NASTY_NUMBERS = st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 2**64, 1e308, -1e308,
                                 5e-324, 0, -0.0, -1, 1.5])
leaves = (st.none() | st.booleans() | st.integers()
          | st.floats(allow_nan=False, allow_infinity=False) | NASTY_NUMBERS | st.text(max_size=12))
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=12,
)


def anything(realistic: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the realistic value, sometimes any JSON at all."""
    return st.one_of(realistic, realistic, json_values)


def obj(required: dict | None = None, optional: dict | None = None) -> st.SearchStrategy:
    """A JSON object whose ``optional`` keys may be missing and whose values may be anything."""
    return st.fixed_dictionaries({k: anything(v) for k, v in (required or {}).items()},
                                 optional={k: anything(v) for k, v in (optional or {}).items()})


ids = st.text(alphabet="abcXYZ0123456789._-/+=", min_size=1, max_size=16)
digits = st.integers(min_value=10**9, max_value=10**16).map(str)
texts = st.text(max_size=20)
seconds = st.integers(min_value=0, max_value=4_000_000_000)
millis = st.integers(min_value=0, max_value=4_000_000_000_000)
urls = st.sampled_from(["https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=1&signature=x",
                        "https://www.instagram.com/p/FAKE/", ""])

# -- WhatsApp --------------------------------------------------------------------------------------

wa_error = obj({"code": st.sampled_from([131026, 131047, 131051, 130429, 131000]) | st.integers()},
               {"title": texts, "message": texts,
                "error_data": obj({"details": texts}), "href": urls})
wa_errors = st.lists(wa_error, max_size=2)
wa_pricing = obj(optional={"billable": st.booleans(),
                           "pricing_model": st.sampled_from(["PMP", "CBP"]),
                           "type": st.sampled_from(["regular", "free_customer_service",
                                                    "free_entry_point"]),
                           "category": st.sampled_from(["marketing", "utility", "service",
                                                        "authentication"])})
wa_conversation = obj(optional={"id": ids, "expiration_timestamp": seconds.map(str),
                                "origin": obj({"type": st.sampled_from(["service", "utility"])})})
STATUS_VALUES = st.sampled_from(["sent", "delivered", "read", "failed", "played"])
wa_status = obj(
    {"id": ids, "status": STATUS_VALUES | texts,
     "timestamp": seconds.map(str), "recipient_id": digits},
    {"errors": wa_errors, "pricing": wa_pricing, "conversation": wa_conversation,
     "biz_opaque_callback_data": texts, "recipient_type": st.just("individual")},
)
wa_media = obj(optional={"id": digits, "mime_type": texts, "sha256": texts, "caption": texts,
                         "filename": texts, "url": urls, "voice": st.booleans(),
                         "animated": st.booleans()})
wa_bodies = {
    "text": obj({"body": texts}),
    **{t: wa_media for t in ("image", "audio", "video", "document", "sticker")},
    "location": obj({"latitude": st.floats(-90, 90) | NASTY_NUMBERS | st.just(10**400),
                     "longitude": st.floats(-180, 180) | NASTY_NUMBERS | st.just(-(10**400))},
                    {"name": texts, "address": texts, "url": urls}),
    "interactive": st.one_of(
        obj({"type": st.just("button_reply"), "button_reply": obj({"id": ids, "title": texts})}),
        obj({"type": st.just("list_reply"),
             "list_reply": obj({"id": ids, "title": texts}, {"description": texts})}),
        obj({"type": st.just("nfm_reply"),
             "nfm_reply": obj({"name": texts, "body": texts, "response_json": texts})}),
    ),
    "button": obj(optional={"payload": texts, "text": texts}),
    "reaction": obj({"message_id": ids}, {"emoji": st.sampled_from(["\U0001f44d", ""]) | texts}),
    "order": obj({"catalog_id": digits}, {"text": texts, "product_items": st.lists(
        obj({"product_retailer_id": ids, "quantity": st.integers(), "item_price": st.floats(0, 1e6),
             "currency": st.just("EUR")}), max_size=2)}),
    "system": obj({"body": texts}, {"type": st.sampled_from(
        ["user_changed_number", "user_changed_user_id", "customer_identity_changed"]),
        "wa_id": digits, "user_id": ids, "previous_user_id": ids}),
    "revoke": obj({"original_message_id": ids}),
    "edit": obj({"original_message_id": ids},
                {"message": obj({"type": st.just("text"), "text": obj({"body": texts})})}),
    "unsupported": obj({"type": texts}),
    "hologram": obj({"shape": texts}),
}
wa_contacts_card = st.lists(obj({"name": obj({"formatted_name": texts})},
                                {"phones": st.lists(obj({"phone": texts}, {"wa_id": digits}),
                                                    max_size=2)}), max_size=2)


@st.composite
def wa_message(draw, customers: list[str]) -> dict:
    kind = draw(st.sampled_from([*wa_bodies, "contacts", "unknown"]))
    message = {
        "from": draw(anything(st.sampled_from(customers))),
        "id": draw(anything(ids.map(lambda s: "wamid." + s))),
        "timestamp": draw(anything(seconds.map(str))),
        "type": draw(anything(st.just(kind))),
    }
    if kind == "contacts":
        message["contacts"] = draw(anything(wa_contacts_card))
    elif kind in wa_bodies:
        message[kind] = draw(wa_bodies[kind])
    for key, strategy in (("context", obj(optional={"from": digits, "id": ids,
                                                    "forwarded": st.booleans()})),
                          ("referral", obj(optional={"source_url": urls, "source_id": digits,
                                                     "source_type": st.just("ad"),
                                                     "ctwa_clid": ids})),
                          ("errors", wa_errors)):
        if draw(st.booleans()):
            message[key] = draw(strategy)
    return message


@st.composite
def wa_value(draw) -> dict:
    customers = draw(st.lists(digits, min_size=1, max_size=3))
    value: dict = {"messaging_product": "whatsapp",
                   "metadata": draw(anything(obj({"display_phone_number": digits,
                                                  "phone_number_id": digits})))}
    if draw(st.booleans()):
        value["contacts"] = draw(anything(st.lists(
            obj({"wa_id": st.sampled_from(customers)},
                {"profile": obj(optional={"name": texts, "username": texts}),
                 "user_id": ids}), max_size=3)))
    if draw(st.booleans()):
        value["messages"] = draw(anything(st.lists(wa_message(customers), max_size=3)))
    if draw(st.booleans()):
        value["statuses"] = draw(anything(st.lists(wa_status, max_size=3)))
    if draw(st.booleans()):
        value["errors"] = draw(wa_errors)
    return value


wa_change = obj({"field": st.sampled_from(["messages", "messages", "user_preferences",
                                           "message_template_status_update"]),
                 "value": wa_value()})
wa_envelope = st.fixed_dictionaries({
    "object": st.just("whatsapp_business_account"),
    "entry": st.lists(obj({"id": digits, "changes": st.lists(wa_change, max_size=3)}), max_size=3),
})

# -- Instagram -------------------------------------------------------------------------------------

ig_attachment = obj({"type": st.sampled_from(["image", "video", "audio", "file", "share",
                                              "story_mention", "ig_reel", "reel", "template"])},
                    {"payload": obj(optional={"url": urls, "reel_video_id": digits,
                                              "title": texts})})
ig_message = obj(
    {"mid": ids.map(lambda s: "aWdf" + s)},
    {"text": texts, "quick_reply": obj({"payload": texts}),
     "attachments": st.lists(ig_attachment, max_size=2),
     "reply_to": st.one_of(obj({"mid": ids}), obj({"story": obj({"url": urls, "id": digits})})),
     "is_echo": st.booleans(), "is_deleted": st.booleans(), "is_unsupported": st.booleans()},
)
ig_referral = obj({"ref": texts}, {"source": st.sampled_from(["SHORTLINK", "SHORTLINKS", "ADS"]),
                                   "type": st.just("OPEN_THREAD"), "ad_id": digits,
                                   "ads_context_data": obj(optional={"ad_title": texts,
                                                                     "photo_url": urls})})
ig_handover = obj(optional={"previous_owner_app_id": digits, "new_owner_app_id": digits,
                            "metadata": texts})
IG_KINDS = {
    "message": ig_message,
    "postback": obj({"title": texts}, {"mid": ids, "payload": texts, "referral": ig_referral}),
    "reaction": obj({"mid": ids}, {"action": st.sampled_from(["react", "unreact"]) | texts,
                                   "reaction": st.sampled_from(["love", "like"]) | texts,
                                   "emoji": st.sampled_from(["\u2764\ufe0f", "\U0001f44d"])}),
    "read": obj(optional={"mid": ids, "watermark": millis}),
    "referral": ig_referral,
    "pass_thread_control": ig_handover,
    "take_thread_control": ig_handover,
    "request_thread_control": obj(optional={"requested_owner_app_id": digits,
                                            "metadata": texts}),
    "message_edit": obj({"mid": ids}, {"text": texts, "num_edit": st.integers(0, 5)}),
    "optin": obj(optional={"type": st.just("notification_messages"), "payload": texts}),
    "hologram": json_values,
}
ACCOUNT = "17840000000000001"


@st.composite
def ig_item(draw, realistic: bool = False, kind: str | None = None) -> dict:
    """One ``messaging[]`` / ``standby[]`` item (of ``kind``, else any); ``realistic`` keeps the
    addressing and the event object well formed (its inner values may still be anything)."""
    wrap = (lambda s: s) if realistic else anything
    kind = kind or draw(st.sampled_from(sorted(IG_KINDS)))
    customer = draw(digits)
    echo = kind == "message" and draw(st.booleans())
    sender, recipient = (ACCOUNT, customer) if echo else (customer, ACCOUNT)
    item = {"sender": draw(wrap(st.fixed_dictionaries({"id": st.just(sender)}))),
            "recipient": draw(wrap(st.fixed_dictionaries({"id": st.just(recipient)}))),
            "timestamp": draw(wrap(millis))}
    if realistic and kind == "message":
        body = draw(ig_message.filter(lambda m: isinstance(m.get("mid"), str) and m["mid"]))
        item[kind] = {**body, "is_echo": True} if echo else body
    elif realistic and kind != "hologram":
        item[kind] = draw(IG_KINDS[kind].filter(lambda v: isinstance(v, dict)))
    else:
        item[kind] = draw(IG_KINDS[kind])
    return item


def ig_envelope(realistic: bool = False) -> st.SearchStrategy:
    items = st.lists(ig_item(realistic), max_size=3)
    entry = st.fixed_dictionaries(
        {"id": st.just(ACCOUNT) if realistic else anything(st.just(ACCOUNT)),
         "time": millis},
        optional={"messaging": items, "standby": items})
    return st.fixed_dictionaries({"object": st.sampled_from(["instagram", "page"]),
                                  "entry": st.lists(entry, max_size=3)})


# -- checks ----------------------------------------------------------------------------------------


def _encode_body(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


def check_events(channel: str, body: bytes) -> list[Event]:
    """``normalise(body)`` is BadPayload or a list of valid canonical events of ``channel``."""
    try:
        events = NORMALISE[channel](body)
    except BadPayload:
        return []
    assert isinstance(events, list)
    for event in events:
        check_event(channel, event)
    return events


def check_event(channel: str, event: Event) -> None:
    assert type(event) in EVENT_CLASSES.values(), type(event)
    wire = encode(event)
    assert decode(wire) == event  # every field has the type the Struct declares
    data = json.loads(wire)
    for key in REQUIRED:
        assert data.get(key) not in (None, "", {}), (key, data)
    assert data["schema"] == 1 and data["kind"] in KINDS and data["channel"] == channel
    assert data["direction"] in ("inbound", "outbound")
    assert isinstance(event.sender, Party) and event.sender.id
    assert isinstance(event.recipient, Party) and event.recipient.id
    assert isinstance(event.timestamp, datetime)
    assert event.timestamp.utcoffset() == UTC.utcoffset(None)
    assert event.conversation_id == conversation_id(channel, event.account_id, event.customer_id)
    assert "/" not in event.conversation_id
    if event.kind == "message":
        assert event.type in MESSAGE_TYPES, event.type
    else:
        assert event.type is None
    if event.kind == "reaction":
        assert isinstance(event.emoji, str)
    if event.kind == "status":
        assert isinstance(event.status, str) and event.status
    if event.error is not None:
        assert isinstance(event.error.code, int) and not isinstance(event.error.code, bool)


# -- arbitrary input -------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", sorted(NORMALISE))
@SETTINGS
@given(body=st.binary(max_size=400))
def test_arbitrary_bytes_are_events_or_bad_payload(channel, body):
    check_events(channel, body)


@pytest.mark.parametrize("channel", sorted(NORMALISE))
@SETTINGS
@given(value=json_values)
def test_arbitrary_json_is_events_or_bad_payload(channel, value):
    check_events(channel, _encode_body(value))


@pytest.mark.parametrize("channel,object_", [("whatsapp", "whatsapp_business_account"),
                                             ("instagram", "instagram")])
@SETTINGS
@given(entry=st.lists(json_values, max_size=4))
def test_arbitrary_entries_in_a_valid_envelope(channel, object_, entry):
    events = check_events(channel, _encode_body({"object": object_, "entry": entry}))
    assert events == [] or all(e.channel == channel for e in events)


# -- real-shaped envelopes -------------------------------------------------------------------------


@SETTINGS
@given(envelope=wa_envelope)
def test_real_shaped_whatsapp_envelopes(envelope):
    body = _encode_body(envelope)
    events = check_events("whatsapp", body)
    # ids come from Meta's fields only: other whitespace or batching keeps them
    again = check_events("whatsapp", json.dumps(envelope, indent=1).encode())
    assert [e.id for e in again] == [e.id for e in events]
    singles = []
    for entry in envelope["entry"]:
        changes = entry.get("changes") if isinstance(entry, dict) else None
        for change in changes if isinstance(changes, list) else ():
            single = {"id": "1", "changes": [change]}
            singles += check_events("whatsapp", _encode_body(
                {"object": "whatsapp_business_account", "entry": [single]}))
    assert Counter(e.id for e in singles) == Counter(e.id for e in events)


@st.composite
def wa_statuses_value(draw) -> tuple[dict, list[dict]]:
    """A ``messages`` change holding only statuses that are all well formed at the top level."""
    statuses = draw(st.lists(st.fixed_dictionaries(
        {"id": ids.map(lambda s: "wamid." + s), "status": STATUS_VALUES,
         "timestamp": seconds.map(str), "recipient_id": digits},
        # errors, callback data and participant may be any JSON: an odd one is no error, no
        # callback_data, no participant, and the status is kept
        optional={"errors": anything(st.lists(anything(wa_error), max_size=3)),
                  "pricing": anything(wa_pricing), "conversation": anything(wa_conversation),
                  "biz_opaque_callback_data": anything(texts),
                  "recipient_participant_id": anything(digits)}), min_size=1, max_size=4))
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550001000",
                          "phone_number_id": "100000000000001"},
             "statuses": statuses}
    return value, statuses


@SETTINGS
@given(case=wa_statuses_value())
def test_every_whatsapp_status_is_one_status_event(case):
    value, statuses = case
    events = check_events("whatsapp", _encode_body({
        "object": "whatsapp_business_account",
        "entry": [{"id": "190000000000001", "changes": [{"field": "messages", "value": value}]}]}))
    implied = {"played": "read"}  # statuses CONTRACT §5 does not name; Meta's in raw_type
    assert [(e.kind, e.message_id, e.status, e.recipient.id) for e in events] == [
        ("status", s["id"], implied.get(s["status"], s["status"]), s["recipient_id"])
        for s in statuses]
    assert [e.raw_type for e in events] == [
        s["status"] if s["status"] in implied else None for s in statuses]
    for event, status in zip(events, statuses, strict=True):
        assert event.direction == "outbound" and event.sender.id == "100000000000001"
        errors = status.get("errors")
        first = next((e for e in errors if isinstance(e, dict) and type(e.get("code")) is int),
                     None) if isinstance(errors, list) else None
        assert (event.error.code if event.error else None) == (first or {}).get("code")


@SETTINGS
@given(envelope=ig_envelope())
def test_real_shaped_instagram_envelopes(envelope):
    events = check_events("instagram", _encode_body(envelope))
    again = check_events("instagram", json.dumps(envelope, indent=1).encode())
    assert [e.id for e in again] == [e.id for e in events]
    singles = []
    for entry in envelope["entry"]:
        for key in ("messaging", "standby"):
            for item in entry.get(key, ()):
                singles += check_events("instagram", _encode_body(
                    {"object": "instagram", "entry": [{**entry, "messaging": [], "standby": [],
                                                       key: [item]}]}))
    assert Counter(e.id for e in singles) == Counter(e.id for e in events)


HANDOVER_KEYS = ("pass_thread_control", "take_thread_control", "request_thread_control")
EXPECTED_KIND = {"message": "message", "postback": "postback", "reaction": "reaction",
                 "read": "read", "referral": "referral", "message_edit": "message",
                 "optin": "message", "hologram": "message",
                 **{k: "handover" for k in HANDOVER_KEYS}}


@FEW
@given(envelope=ig_envelope(realistic=True))
def test_every_well_addressed_instagram_item_is_one_event(envelope):
    """Nothing is silently lost: one event per item, of the kind its key names, standby kept."""
    events = check_events("instagram", _encode_body(envelope))
    items = [(key == "standby", item) for entry in envelope["entry"]
             for key in ("messaging", "standby") for item in entry.get(key, ())]
    assert len(events) == len(items)
    for event, (standby, item) in zip(events, items, strict=True):
        (key,) = set(item) - {"sender", "recipient", "timestamp"}
        assert event.kind == EXPECTED_KIND[key]
        assert event.standby is standby
        assert event.account_id == ACCOUNT and event.timestamp.timestamp() * 1000 == pytest.approx(
            item["timestamp"], abs=1)
        if key == "message" and item["message"].get("is_echo") is True:
            assert (event.direction, event.recipient.id) == ("outbound", event.customer_id)
        if key in ("optin", "hologram"):
            assert (event.type, event.raw_type) == ("unsupported", key)
        if key == "message_edit":  # an edit of the mid it names, or (no mid) of nothing
            edited = item["message_edit"]
            mid = as_str(edited.get("mid"))  # Meta's ids: strings, sometimes numbers
            assert (event.raw_type, event.message_id, event.reply_to) == ("message_edit", mid, mid)
            text = edited.get("text") if mid and isinstance(edited.get("text"), str) else None
            assert (event.type, event.text) == ("text" if text is not None else "unsupported", text)
        if event.kind == "handover":
            assert event.handover["action"] == key.split("_", 1)[0]


@FEW
@given(envelope=ig_envelope(realistic=True), data=st.data())
def test_a_malformed_instagram_list_loses_only_itself(envelope, data):
    """A ``messaging`` / ``standby`` that is not a list (any other JSON) yields what an empty one
    would: its entry's other list and the other entries keep every event."""
    entries = envelope["entry"]
    if not entries:
        entries.append({"id": ACCOUNT})
    index = data.draw(st.integers(min_value=0, max_value=len(entries) - 1))
    key = data.draw(st.sampled_from(["messaging", "standby"]))
    shape = data.draw(json_values.filter(lambda v: not isinstance(v, list)))
    entries[index] = {**entries[index], key: []}
    kept = check_events("instagram", _encode_body(envelope))
    entries[index] = {**entries[index], key: shape}
    assert check_events("instagram", _encode_body(envelope)) == kept


WA_TYPES = sorted([*wa_bodies, "contacts", "unknown"])
EXPECTED_TYPE = {"revoke": "deleted", "hologram": "unsupported", "unknown": "unsupported",
                 "edit": ("text", "unsupported"), "location": "location"}


def _coordinate(value, bound: float) -> bool:
    """The oracle: a finite JSON number (not a bool) within ±``bound``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:
        return False
    return math.isfinite(number) and -bound <= number <= bound


@st.composite
def wa_addressed_message(draw, customer: str, kind: str) -> dict:
    """One well-addressed message of type ``kind``: its id, ``from`` and timestamp are valid;
    its content, context, errors, ``from_user_id`` and an object of another type beside its own
    may be any JSON."""
    message = {"from": customer, "id": "wamid." + draw(ids), "timestamp": draw(seconds.map(str)),
               "type": kind}
    if kind == "contacts":
        message["contacts"] = draw(anything(wa_contacts_card))
    elif kind in wa_bodies:
        message[kind] = draw(anything(wa_bodies[kind]))
    # "unknown" (Meta's older name of unsupported) reads the "unsupported" object as its own
    others = sorted({*wa_bodies, "contacts"} - {kind, "unsupported" if kind == "unknown" else kind})
    for key, strategy in (("context", anything(obj(optional={"from": digits, "id": ids}))),
                          ("errors", anything(st.lists(anything(wa_error), max_size=2))),
                          ("from_user_id", anything(ids.map(lambda s: "US." + s))),
                          (draw(st.sampled_from(others)), json_values)):
        if draw(st.booleans()):
            message[key] = draw(strategy)
    return message


@st.composite
def wa_one_message(draw, kind: str) -> tuple[dict, dict]:
    """A ``messages`` change with one well-addressed message of type ``kind`` (its content may be
    any JSON)."""
    customer = draw(digits)
    message = draw(wa_addressed_message(customer, kind))
    value = {"messaging_product": "whatsapp",
             "metadata": {"display_phone_number": "15550001000",
                          "phone_number_id": "100000000000001"},
             "contacts": [{"profile": {"name": draw(texts)}, "wa_id": customer}],
             "messages": [message]}
    return value, message


@pytest.mark.parametrize("kind", WA_TYPES)
@FEW
@given(data=st.data())
def test_every_whatsapp_message_type_is_one_event(kind, data):
    """Each type, well addressed, with any content: exactly one valid event, never a crash."""
    value, message = data.draw(wa_one_message(kind))
    body = _encode_body({"object": "whatsapp_business_account", "entry": [
        {"id": "190000000000001", "changes": [{"field": "messages", "value": value}]}]})
    (event,) = check_events("whatsapp", body)
    assert event.sender.id == message["from"] and event.account_id == "100000000000001"
    if kind == "reaction":
        assert event.kind == "reaction"
        return
    assert event.kind == "message"
    want = EXPECTED_TYPE.get(kind, kind)
    assert event.type in (want if isinstance(want, tuple) else (want,))
    if kind in ("hologram", "unknown"):
        assert event.raw_type == kind if kind == "hologram" else event.raw_type is None
    if kind == "location":  # coordinates only when both are real latitude / longitude values
        location = message["location"] if isinstance(message["location"], dict) else {}
        lat, lon = (location.get(k) for k in ("latitude", "longitude"))
        valid = _coordinate(lat, 90.0) and _coordinate(lon, 180.0)
        assert event.type == "location"
        assert (event.location is not None) == valid
        if valid:
            assert (event.location.latitude, event.location.longitude) == (float(lat), float(lon))


@st.composite
def wa_addressed_value(draw) -> dict:
    """A ``messages`` change's value of one number whose lists are lists of well-addressed items
    (their other fields may be any JSON)."""
    customers = draw(st.lists(digits, min_size=1, max_size=2, unique=True))
    contacts = [draw(obj({"wa_id": st.just(c), "profile": obj({"name": texts})},
                         {"user_id": ids.map(lambda s: "US." + s)})) for c in customers]
    messages = [draw(wa_addressed_message(draw(st.sampled_from(customers)),
                                          draw(st.sampled_from(WA_TYPES))))
                for _ in range(draw(st.integers(0, 3)))]
    statuses = draw(st.lists(st.fixed_dictionaries(
        {"id": ids.map(lambda s: "wamid." + s), "status": STATUS_VALUES,
         "timestamp": seconds.map(str), "recipient_id": st.sampled_from(customers)},
        optional={"errors": anything(wa_errors), "pricing": anything(wa_pricing),
                  "biz_opaque_callback_data": anything(texts),
                  "recipient_participant_id": anything(digits)}), max_size=3))
    return {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001000",
                         "phone_number_id": draw(st.sampled_from(["100000000000001",
                                                                  "100000000000002"]))},
            "contacts": contacts, "messages": messages, "statuses": statuses}


wa_addressed_envelope = st.fixed_dictionaries({
    "object": st.just("whatsapp_business_account"),
    "entry": st.lists(st.fixed_dictionaries({
        "id": digits,
        "changes": st.lists(st.fixed_dictionaries({"field": st.just("messages"),
                                                   "value": wa_addressed_value()}),
                            min_size=1, max_size=2)}), min_size=1, max_size=2),
})
not_a_list = json_values.filter(lambda v: not isinstance(v, list))


@SETTINGS
@given(envelope=wa_addressed_envelope, data=st.data())
def test_a_malformed_whatsapp_list_loses_only_itself(envelope, data):
    """A ``changes`` / ``contacts`` / ``messages`` / ``statuses`` that is not a list (any other
    JSON) yields what an empty one would: the other lists of its value, and the other changes
    and entries, keep every event."""
    holders = [(entry, "changes") for entry in envelope["entry"]]
    holders += [(change["value"], key) for entry in envelope["entry"]
                for change in entry["changes"] for key in ("contacts", "messages", "statuses")]
    holder, key = data.draw(st.sampled_from(holders))
    holder[key] = []
    kept = check_events("whatsapp", _encode_body(envelope))
    holder[key] = data.draw(not_a_list)
    assert check_events("whatsapp", _encode_body(envelope)) == kept


# The JSON types each read field of an item is read as; a value of any other type is odd.
IDS = (str, int)
STAMP = (str, int, float)
WA_READ_AS = {
    "messages": {"id": str, "timestamp": STAMP, "from": IDS, "from_user_id": IDS, "type": str,
                 "context": dict, "referral": dict, "errors": list, "contacts": list,
                 **{key: dict for key in wa_bodies}},
    "statuses": {"id": str, "status": str, "timestamp": STAMP, "recipient_id": IDS,
                 "recipient_user_id": IDS, "recipient_participant_id": IDS,
                 "biz_opaque_callback_data": str, "errors": list},
    "contacts": {"wa_id": IDS, "user_id": IDS, "profile": dict},
}


@SETTINGS
@given(envelope=wa_addressed_envelope, data=st.data())
def test_an_odd_whatsapp_field_is_read_as_absent(envelope, data):
    """Any field of a message, status or contact, of a JSON type other than the one it is read
    as, yields what the same item without it would: a field no event needs loses only itself (an
    odd callback data: no ``callback_data``; an odd object of another message type: ignored);
    one an event needs (id, customer, timestamp) drops its item, as without it, and only it."""
    items = [(key, item) for entry in envelope["entry"] for change in entry["changes"]
             for key in WA_READ_AS for item in change["value"][key]]
    assume(items)
    key, item = data.draw(st.sampled_from(items))
    field = data.draw(st.sampled_from(sorted(WA_READ_AS[key])))
    read_as = WA_READ_AS[key][field]
    odd = data.draw(json_values.filter(
        lambda v: isinstance(v, bool) or not isinstance(v, read_as)))
    item.pop(field, None)
    absent = check_events("whatsapp", _encode_body(envelope))
    item[field] = odd
    assert check_events("whatsapp", _encode_body(envelope)) == absent


@pytest.mark.parametrize("kind", sorted(IG_KINDS))
@FEW
@given(data=st.data())
def test_every_instagram_item_kind_is_one_event(kind, data):
    """Each item kind, well addressed, with any content: exactly one event of that kind."""
    item = data.draw(ig_item(realistic=True, kind=kind))
    for key in ("messaging", "standby"):
        body = _encode_body({"object": "instagram", "entry": [
            {"id": ACCOUNT, "time": 1760000000000, key: [item]}]})
        (event,) = check_events("instagram", body)
        assert event.kind == EXPECTED_KIND[kind] and event.standby is (key == "standby")
