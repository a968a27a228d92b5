"""The channel normalisers on their own: every fixture's events field by field, stable and distinct
ids, the wire round trip, and the envelope errors."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from channels.instagram.normalise import normalise as instagram
from channels.instagram.normalise import parse_envelope as ig_envelope
from channels.whatsapp.normalise import _tolerant as whatsapp_tolerant
from channels.whatsapp.normalise import normalise as whatsapp
from channels.whatsapp.normalise import parse_envelope as wa_envelope
from gateway.errors import BadPayload
from gateway.events import conversation_id, decode, encode
from tests.conftest import fixture_bytes
from tests.expect import expected_files, pair_up

FILES = expected_files()
NORMALISE = {"whatsapp": whatsapp, "instagram": instagram}


def events_of(name: str) -> list[dict]:
    return [json.loads(encode(e)) for e in NORMALISE[name.split("/")[0]](fixture_bytes(name))]


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_fixture_matches_its_expected_events(name):
    events = events_of(name)
    assert len(events) == len(FILES[name]["events"])
    pair_up(events, FILES[name]["events"])


def test_ids_are_distinct_across_all_fixtures_and_stable():
    seen: dict[str, str] = {}
    for name in sorted(FILES):
        first, second = events_of(name), events_of(name)
        assert [e["id"] for e in first] == [e["id"] for e in second]
        for event in first:
            assert event["id"] not in seen, (name, seen.get(event["id"]))
            seen[event["id"]] = name
    assert len(seen) == sum(len(f["events"]) for f in FILES.values())


def test_conversation_ids_follow_the_triple():
    by_triple: dict[tuple, set[str]] = {}
    for name in sorted(FILES):
        pairs = pair_up(events_of(name), FILES[name]["events"])
        for event, want in pairs:
            by_triple.setdefault(tuple(want["conversation"]), set()).add(event["conversation_id"])
    assert all(len(ids) == 1 for ids in by_triple.values())
    assert len({next(iter(ids)) for ids in by_triple.values()}) == len(by_triple)


@pytest.mark.parametrize("name", sorted(FILES))
def test_events_survive_the_wire_round_trip(name):
    channel = name.split("/")[0]
    for event in NORMALISE[channel](fixture_bytes(name)):
        assert decode(encode(event)) == event
        assert json.loads(encode(event))["schema"] == 1


def test_unicode_is_decoded_from_escapes():
    (event,) = events_of("whatsapp/unicode_text.json")
    assert event["text"] == "Olá! Café ☕ naïve façade üß — مرحبا 😀👍"
    assert event["sender"]["name"] == "Zoë Ünal"


@pytest.mark.parametrize("check", [wa_envelope, ig_envelope, whatsapp, instagram])
@pytest.mark.parametrize("body", [b"", b"{", b"[]", b"null", b'"x"', b'{"entry": []}',
                                  b'{"object": "x", "entry": []}', b'{"object": 1, "entry": []}',
                                  b'{"object": "instagram", "entry": {}}',
                                  b'{"object": "whatsapp_business_account"}', b"\xff\xfe"])
def test_not_an_envelope_is_bad_payload(check, body):
    with pytest.raises(BadPayload):
        check(body)


def test_the_other_channels_envelope_is_bad_payload():
    with pytest.raises(BadPayload, match="whatsapp_business_account"):
        whatsapp(fixture_bytes("instagram/text.json"))
    with pytest.raises(BadPayload, match="instagram"):
        instagram(fixture_bytes("whatsapp/text.json"))


def test_one_malformed_item_does_not_spoil_the_batch():
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    good = value["messages"][0]
    value["messages"] = [{"id": 5, "timestamp": [], "type": {}}, "junk", good, {"type": "text"}]
    envelope["entry"].insert(0, {"id": "x", "changes": "not a list"})
    events = whatsapp(json.dumps(envelope).encode())
    assert [e.message_id for e in events] == [good["id"]]


BOTH_PATHS = pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant],
                                     ids=["fast", "tolerant"])


def _batch_mixed() -> tuple[dict, dict]:
    """``batch_mixed.json`` (8 events) and its value with all three lists: a contact, a text, a
    reaction and a status of the second number."""
    envelope = json.loads(fixture_bytes("whatsapp/batch_mixed.json"))
    return envelope, envelope["entry"][1]["changes"][0]["value"]


@BOTH_PATHS
@pytest.mark.parametrize("shape", [{}, {"wa_id": "15550009876"}, "junk", 5, 1.5, True,
                                   {"deep": [[[[]]]]}, None])
@pytest.mark.parametrize("key,lost", [("contacts", 0), ("messages", 2), ("statuses", 1),
                                      ("changes", 4)])
def test_a_malformed_whatsapp_list_loses_only_itself(key, lost, shape, normalise):
    """A ``contacts`` / ``messages`` / ``statuses`` that is not a list yields what an empty one
    would: the other lists of the same value, and the other changes and entries, keep every
    event; so does an entry's ``changes`` (``whatsapp/malformed_lists.json`` is the fixture).
    Before, the value failed to decode and every message and status in it was lost."""
    envelope, value = _batch_mixed()
    holder = envelope["entry"][1] if key == "changes" else value

    def events(part) -> list:
        holder[key] = part
        return normalise(json.dumps(envelope).encode())

    kept = events([])
    assert events(shape) == kept
    assert len(kept) == 8 - lost


@BOTH_PATHS
@pytest.mark.parametrize("items,index,field,odd,kept", [
    ("messages", 0, "from_user_id", ["US.13491208655302741918"], True),  # beside a valid "from"
    ("messages", 0, "from_user_id", 1.5, True),
    ("messages", 0, "image", "unavailable", True),  # an object of another type than its own
    ("messages", 0, "location", 5, True),
    ("messages", 0, "interactive", [], True),
    ("messages", 0, "reaction", "x", True),
    ("messages", 0, "text", "x", True),  # its own type's object: a text without a body
    ("messages", 0, "context", "wamid.TEST.OUT.0006", True),
    ("messages", 0, "referral", 7, True),
    ("messages", 0, "errors", {"code": 131051}, True),
    ("messages", 0, "type", 5, True),  # unsupported without raw_type, as without a type
    ("messages", 1, "reaction", "x", True),  # a reaction naming nothing: no message_id, no emoji
    ("messages", 1, "text", "x", True),
    ("statuses", 0, "biz_opaque_callback_data", {"outbox": "0007"}, True),
    ("statuses", 0, "biz_opaque_callback_data", 7, True),
    ("statuses", 0, "recipient_participant_id", ["15550005678"], True),
    ("statuses", 0, "recipient_participant_id", 1.5, True),
    ("statuses", 0, "recipient_user_id", {"id": "US.1"}, True),
    ("statuses", 0, "errors", "none", True),
    ("contacts", 0, "user_id", {"id": "US.13491208655302741918"}, True),  # wa_id still names
    ("contacts", 0, "user_id", 1.5, True),
    # what the event cannot exist without: its item is dropped, as without the field
    ("messages", 0, "id", 5, False),
    ("messages", 0, "timestamp", [], False),
    ("messages", 0, "from", {"id": "15550009876"}, False),  # and no from_user_id: no customer
    ("messages", 1, "timestamp", "yesterday", False),
    ("statuses", 0, "id", ["wamid.TEST.OUT.BATCH.0003"], False),
    ("statuses", 0, "status", 3, False),
    ("statuses", 0, "timestamp", {}, False),
    ("statuses", 0, "recipient_id", 1.5, False),  # and no recipient_user_id: no customer
])
def test_an_odd_whatsapp_field_is_read_as_absent(items, index, field, odd, kept, normalise):
    """A field of an odd type yields the events of the same body without that field: one its
    event does not need loses only itself, the item is kept
    (``whatsapp/odd_optional_fields.json`` is the fixture); one it needs (a message's id,
    customer or timestamp) drops that item and nothing beside it. Before, any odd declared field
    failed the decode of its item, which was dropped (a contact: its sender's name)."""
    envelope, value = _batch_mixed()
    item = value[items][index]
    item.pop(field, None)
    absent = normalise(json.dumps(envelope).encode())
    item[field] = odd
    assert normalise(json.dumps(envelope).encode()) == absent
    assert len(absent) == (8 if kept else 7)
    if items == "contacts":
        assert "Dana Demo" in {e.sender.name for e in absent}


def test_unknown_fields_and_types_pass_through():
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    message = envelope["entry"][0]["changes"][0]["value"]["messages"][0]
    message.update({"type": "poll", "poll": {"question": "?"}, "brand_new_field": {"x": 1}})
    (event,) = whatsapp(json.dumps(envelope).encode())
    assert (event.type, event.raw_type, event.error) == ("unsupported", "poll", None)


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
@pytest.mark.parametrize(("name", "text", "payload", "detail"), [
    ("interactive_list_reply", "09:00 - 10:00", "slot_0900",
     {"type": "list_reply", "description": "Morning delivery"}),
    ("interactive_nfm_reply", "Sent", None, {"type": "nfm_reply", "name": "flow"}),
    ("interactive_button_reply", "Yes, confirm", "confirm_yes", {"type": "button_reply"}),
])
def test_an_interactive_reply_keeps_what_no_canonical_field_holds(name, text, payload, detail,
                                                                  normalise):
    """webhooks.md §4.4: ``list_reply{id, title, description?}``, ``nfm_reply{name, body,
    response_json}``. Title / body and id / response_json are text and payload; the reply's type
    and the rest (a row's description, a Flow's name) are the extra field ``interactive``."""
    (event,) = normalise(fixture_bytes(f"whatsapp/{name}.json"))
    assert event.text == text
    if payload is not None:
        assert event.payload == payload
    else:  # a Flow's answers: the JSON string as Meta sent it
        assert json.loads(event.payload)["flow_token"] == "FAKE-FLOW-TOKEN-0001"
    assert event.interactive == detail
    assert decode(encode(event)).interactive == detail


@pytest.mark.parametrize("interactive", [{"type": "list_reply"}, {"type": "list_reply",
                                          "list_reply": "row"}, {"type": 7}, "x", None])
def test_an_interactive_reply_of_an_odd_shape_keeps_what_it_can(interactive):
    envelope = json.loads(fixture_bytes("whatsapp/interactive_list_reply.json"))
    envelope["entry"][0]["changes"][0]["value"]["messages"][0]["interactive"] = interactive
    (event,) = whatsapp(json.dumps(envelope).encode())
    assert (event.type, event.text, event.payload) == ("interactive", None, None)
    named = isinstance(interactive, dict) and isinstance(interactive.get("type"), str)
    assert event.interactive == ({"type": "list_reply"} if named else None)


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
def test_an_identity_change_keeps_the_identity_and_the_username(normalise):
    """webhooks.md §4.4: on ``customer_identity_changed`` the ``identity`` object sits on the
    message beside ``system``; §4.3: ``contacts[].profile.username``."""
    (event,) = normalise(fixture_bytes("whatsapp/system_customer_identity_changed.json"))
    assert event.identity == {"acknowledged": True, "created_timestamp": "1760000155",
                              "hash": "q1w2e3r4"}
    assert event.system["type"] == "customer_identity_changed"
    assert (event.sender.name, event.sender.username) == ("Kerry Fisher", "@kerry.fisher")
    wire = json.loads(encode(event))
    assert wire["identity"]["hash"] == "q1w2e3r4"
    assert wire["sender"]["username"] == "@kerry.fisher"


@pytest.mark.parametrize(("username", "kept"), [("", None), (5, None), (None, None),
                                                ("@ann", "@ann")])
def test_a_username_is_a_nonempty_string_or_absent(username, kept):
    envelope = json.loads(fixture_bytes("whatsapp/system_customer_identity_changed.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["profile"]["username"] = username
    value["messages"][0]["identity"] = ["not", "an", "object"]
    (event,) = whatsapp(json.dumps(envelope).encode())
    assert (event.sender.name, event.sender.username, event.identity) == ("Kerry Fisher", kept,
                                                                          None)
    assert "username" not in json.loads(encode(event))["sender"] or kept


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
def test_a_bsuid_only_sender_whose_contact_has_a_wa_id_is_that_wa_id(normalise):
    """webhooks.md §4.3: "Keep wa_id as the contact key while it is present". A message without
    ``from`` whose ``contacts`` item names the wa_id beside the BSUID is the wa_id's."""
    envelope = json.loads(fixture_bytes("whatsapp/bsuid_only.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["contacts"][0].update(wa_id="16315551234", parent_user_id="US.ENT.1181")
    (event,) = normalise(json.dumps(envelope).encode())
    assert (event.sender.id, event.sender.user_id) == ("16315551234", "US.13491208655302741918")
    assert event.sender.parent_user_id == "US.ENT.1181"
    assert event.conversation_id == conversation_id("whatsapp", "100000000000001", "16315551234")
    del value["contacts"][0]["wa_id"]  # without it, the BSUID stays the customer
    (event,) = normalise(json.dumps(envelope).encode())
    assert event.sender.id == event.sender.user_id == "US.13491208655302741918"


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
@pytest.mark.parametrize("profile", ["K", 5, ["Kerry"], None])
def test_a_contact_whose_profile_is_no_object_keeps_its_bsuid(normalise, profile):
    """An odd ``profile`` loses only itself: the contact's BSUID still rides on the sender."""
    envelope = json.loads(fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["profile"] = profile
    event = next(e for e in normalise(json.dumps(envelope).encode()) if e.kind == "message")
    assert (event.sender.name, event.sender.user_id) == (None, "US.13491208655302741918")


def test_an_animated_sticker_says_so():
    (event,) = whatsapp(fixture_bytes("whatsapp/sticker.json"))
    assert event.media.animated is False and "animated" not in json.loads(encode(event))["media"]
    envelope = json.loads(fixture_bytes("whatsapp/sticker.json"))
    envelope["entry"][0]["changes"][0]["value"]["messages"][0]["sticker"]["animated"] = True
    (event,) = whatsapp(json.dumps(envelope).encode())
    assert event.media.animated is True and decode(encode(event)) == event


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
@pytest.mark.parametrize("where", ["errors", "referral", "location"])
def test_a_number_no_float_holds_loses_only_itself(normalise, where):
    """``1e400`` in a field read as any JSON (a value's errors, a referral, a coordinate) is
    read as infinity: it used to fail the decode of its message, or of the whole change."""
    envelope = json.loads(fixture_bytes("whatsapp/three_messages.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    first = value["messages"][0]
    body = json.dumps(envelope)
    want = len(normalise(body.encode()))
    marker = "__HUGE__"
    if where == "errors":
        value["errors"] = [{"code": marker, "title": "x"}]
    elif where == "referral":
        first["referral"] = {"source_id": "1", "score": marker}
    else:
        first.update(type="location", location={"latitude": marker, "longitude": 1.0})
    body = json.dumps(envelope).replace(f'"{marker}"', "1e400")
    assert "1e400" in body
    events = normalise(body.encode())
    assert len(events) == want
    if where == "location":
        assert events[0].type == "location" and events[0].location is None


def test_a_preference_id_does_not_depend_on_how_its_time_is_written():
    envelope = json.loads(fixture_bytes("whatsapp/user_preferences_stop.json"))
    item = envelope["entry"][0]["changes"][0]["value"]["user_preferences"][0]
    ids = set()
    for stamp in (1760000300, "1760000300", 1760000300.0):
        item["timestamp"] = stamp
        ids.update(e.id for e in whatsapp(json.dumps(envelope).encode()))
    assert len(ids) == 1


def _warnings(event_name: str, body: bytes, normalise=whatsapp) -> tuple[list, list[dict]]:
    with capture_logs() as logs:
        events = normalise(body)
    return events, [entry for entry in logs
                    if entry["log_level"] == "warning" and entry["event"] == event_name]


@pytest.mark.parametrize("normalise", [whatsapp, whatsapp_tolerant], ids=["fast", "tolerant"])
def test_a_status_without_any_recipient_is_logged_and_its_siblings_kept(normalise):
    """A status with neither ``recipient_id`` nor ``recipient_user_id`` cannot be addressed to a
    conversation: no event, but a warning naming it (``whatsapp/status_bsuid_recipient.json``;
    the BSUID-only statuses beside it are events). Before, BSUID-only statuses were dropped too,
    and every drop was silent."""
    events, warned = _warnings("whatsapp_status_without_recipient",
                               fixture_bytes("whatsapp/status_bsuid_recipient.json"), normalise)
    assert [(e.message_id, e.recipient.id) for e in events] == [
        ("wamid.TEST.OUT.BSUID.0001", "US.13491208655302741918"),
        ("wamid.TEST.OUT.BSUID.0002", "US.13491208655302741918"),
        ("wamid.TEST.OUT.BSUID.0003", "15550001234")]
    assert [(w["message_id"], w["status"], w["phone_number_id"], w["channel"])
            for w in warned] == [("wamid.TEST.OUT.BSUID.0004", "delivered", "100000000000001",
                                  "whatsapp")]


@pytest.mark.parametrize("name,errors", [
    ("whatsapp/change_errors.json", [{"code": 130429, "title": "Rate limit hit"}]),
    ("whatsapp/message_with_value_errors.json",
     [{"code": 131000, "title": "Something went wrong"}]),
])
def test_value_level_errors_are_logged(name, errors):
    """``value.errors[]`` (webhooks.md §4.6) is out of band, with no message id: never silent, a
    warning with the number and each error's code and title (not Meta's prose). Before, the
    value's errors were not even decoded."""
    _, warned = _warnings("whatsapp_value_errors", fixture_bytes(name))
    assert [(w["phone_number_id"], w["errors"]) for w in warned] == [("100000000000001", errors)]
    assert "message" not in str(warned[0]["errors"])


def test_value_level_errors_are_the_channels_notices_once_each():
    """Each value-level error with an integer code is a Notice of its number (counted, and fed
    to the limiter by the processor), handed out once; none is an event."""
    from channels.whatsapp import WhatsAppChannel, WhatsAppConfig
    from gateway.events import ErrorInfo, Notice

    channel = WhatsAppChannel(WhatsAppConfig(app_secret="secret"))
    envelope = json.loads(fixture_bytes("whatsapp/change_errors.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["errors"] += [{"code": "80007"}, "junk", {"code": 131056, "title": "Pair"}]
    assert channel.normalise(json.dumps(envelope).encode()) == []
    assert whatsapp_tolerant(json.dumps(envelope).encode()) == []
    assert channel.notices() == [
        Notice("whatsapp", "100000000000001",
               ErrorInfo(130429, "Rate limit hit", "Rate limit hit")),
        Notice("whatsapp", "100000000000001", ErrorInfo(131056, "Pair"))]
    assert channel.notices() == []
    envelope["entry"][0]["changes"].append(["not", "a", "change"])  # the tolerant path
    assert channel.normalise(json.dumps(envelope).encode()) == []
    assert [(n.account_id, n.error.code) for n in channel.notices()] == [
        ("100000000000001", 130429), ("100000000000001", 131056)]
    del value["metadata"]  # no number to charge it to: logged only
    channel.normalise(json.dumps(envelope).encode())
    assert channel.notices() == []


@pytest.mark.parametrize("errors", [{}, "x", 5, None, [], ["junk", 7], [{"code": "131000"}]])
def test_value_errors_of_an_odd_shape_cost_nothing(errors):
    """Whatever ``value.errors`` holds, the value's messages still count; an error without an
    integer code is no canonical error."""
    envelope = json.loads(fixture_bytes("whatsapp/message_with_value_errors.json"))
    envelope["entry"][0]["changes"][0]["value"]["errors"] = errors
    body = json.dumps(envelope).encode()
    events, warned = _warnings("whatsapp_value_errors", body)
    assert [(e.message_id, e.error) for e in events] == [("wamid.TEST.IN.WITHERR.0001", None)]
    assert whatsapp_tolerant(body) == events
    assert len(warned) == (1 if isinstance(errors, list) and errors else 0)


def test_the_value_error_reaches_every_message_without_its_own():
    """Reactions and revokes are messages of the value too; statuses keep only their own."""
    envelope = json.loads(fixture_bytes("whatsapp/batch_mixed.json"))
    value = envelope["entry"][1]["changes"][0]["value"]  # a text, a reaction, two statuses
    value["errors"] = [{"code": 131000, "title": "Something went wrong"}]
    value["messages"].append({"from": "15550009876", "id": "wamid.TEST.IN.REVOKE.9",
                              "timestamp": "1760003000", "type": "revoke",
                              "revoke": {"original_message_id": "wamid.TEST.IN.BATCH.0003"}})
    events = [e for e in whatsapp(json.dumps(envelope).encode())
              if e.account_id == "100000000000002"]
    codes = {(e.kind, e.type, e.status): e.error.code if e.error else None for e in events}
    assert codes == {("message", "text", None): 131000, ("reaction", None, None): 131000,
                     ("message", "deleted", None): 131000, ("status", None, "sent"): None,
                     ("status", None, "failed"): 131047}


@pytest.mark.parametrize("inner,raw_type", [
    ({"type": "poll"}, "poll"),
    ({"type": "poll_creation", "extra": 1}, "poll_creation"),
    ({"type": ""}, None),
    ({"type": 5}, None),
    ({}, None),
    ("poll", None),  # not an object: no inner type, and the message still counts
    ([{"type": "poll"}], None),
    (None, None),
])
def test_metas_unsupported_keeps_the_inner_type(inner, raw_type):
    """``type: unsupported`` names what the customer sent in ``unsupported.type``; ``raw_type``
    keeps it (``whatsapp/unsupported_inner_type.json``). Before, it was lost."""
    envelope = json.loads(fixture_bytes("whatsapp/unsupported.json"))
    message = envelope["entry"][0]["changes"][0]["value"]["messages"][0]
    message["unsupported"] = inner
    body = json.dumps(envelope).encode()
    (event,) = whatsapp(body)
    assert (event.type, event.raw_type, event.error.code) == ("unsupported", raw_type, 131051)
    assert whatsapp_tolerant(body) == [event]


@pytest.mark.parametrize("display", [15550001000.0, 1.5, [1], {"n": 1}, True, "15550001000"])
def test_an_unread_field_of_any_type_drops_nothing(display):
    """``metadata.display_phone_number`` is never read: whatever its type, every message and
    status of the change counts (``whatsapp/numeric_fields.json``). Before, a float failed the
    typed decode of the whole change."""
    envelope = json.loads(fixture_bytes("whatsapp/batch_mixed.json"))
    want = whatsapp(json.dumps(envelope).encode())
    for entry in envelope["entry"]:
        entry["id"] = display
        for change in entry["changes"]:
            change["value"]["metadata"]["display_phone_number"] = display
    body = json.dumps(envelope).encode()
    assert whatsapp(body) == want and len(want) == 8
    assert whatsapp_tolerant(body) == want


@pytest.mark.parametrize("stamp", [1760000000, 1760000000.0, 1760000000.999, "1760000000",
                                   "1760000000.5"])
def test_a_numeric_timestamp_keeps_its_whole_seconds(stamp):
    """A JSON-number timestamp, integral or with a fraction, is its integer seconds. Before, a
    float dropped its message (and, in a status, the status)."""
    envelope = json.loads(fixture_bytes("whatsapp/text.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["messages"][0]["timestamp"] = stamp
    value["statuses"] = [{"id": "wamid.TEST.OUT.0007", "status": "read", "timestamp": stamp,
                          "recipient_id": "15550001234"}]
    body = json.dumps(envelope).encode()
    events = whatsapp(body)
    assert [(e.kind, e.timestamp.isoformat()) for e in events] == [
        ("message", "2025-10-09T08:53:20+00:00"), ("status", "2025-10-09T08:53:20+00:00")]
    assert whatsapp_tolerant(body) == events


@pytest.mark.parametrize("shape", [{"sender": {"id": "9000000000000001"}}, "junk", 7, True,
                                   {"deep": [[[[]]]]}, None])
@pytest.mark.parametrize("key", ["messaging", "standby"])
def test_a_malformed_instagram_list_is_skipped_on_its_own(key, shape):
    """``messaging`` / ``standby`` that is not a list loses only itself: the list beside it in the
    entry, and the other entries, keep every event (``instagram/malformed_lists.json`` is the
    fixture). Before, the entry failed to decode and both of its lists were dropped."""
    envelope = json.loads(fixture_bytes("instagram/unknown_key.json"))  # messaging[2], standby[1]
    other = json.loads(fixture_bytes("instagram/standby.json"))["entry"][0]
    junk = ["not an entry", 5, None, [], {"id": {"not": "an id"}, "messaging": []}]
    envelope["entry"] += [{**other, "changes": "not a list", "time": "not a time"}, *junk]

    def events(value) -> list:
        envelope["entry"][0][key] = value
        return instagram(json.dumps(envelope).encode())

    kept = events([])
    assert events(shape) == kept
    assert len(kept) == (1 if key == "messaging" else 2) + 1  # the other list + standby.json


def _instagram_item(**fields) -> bytes:
    item = {"sender": {"id": "9000000000000001"}, "recipient": {"id": "17840000000000001"},
            "timestamp": 1760003300000, **fields}
    return json.dumps({"object": "instagram", "entry": [
        {"id": "17840000000000001", "time": 1760003300000, "messaging": [item]}]}).encode()


@pytest.mark.parametrize("attachment,want", [
    ({"payload": {"url": "https://example.com/x"}}, ("unsupported", None)),  # no type at all
    ({"type": "fallback", "payload": {"url": "https://e.com/x"}}, ("unsupported", "fallback")),
    ({"type": "reel", "payload": {"reel_video_id": 1800, "title": "t"}}, ("video", "reel")),
    ({"type": "video", "payload": {"url": "https://example.com/v"}}, ("video", None)),
])
def test_instagram_attachment_types(attachment, want):
    (event,) = instagram(_instagram_item(message={"mid": "aWdfTEST_IN_A", "attachments": [
        attachment]}))
    assert (event.type, event.raw_type) == want
    payload = attachment["payload"]
    assert event.media.url == payload.get("url")
    if want[1] == "reel":  # a reel's id and title are kept
        assert (event.media.id, event.media.caption) == ("1800", "t")
    else:
        assert (event.media.id, event.media.caption) == (None, None)


STORY = {"url": "https://lookaside.fbsbx.com/ig_messaging_cdn/?asset_id=5&signature=S",
         "id": "18000000000000002"}


@pytest.mark.parametrize("attachment,raw_type,media", [
    ({"type": "image", "payload": {"url": "https://e.com/i"}}, "image", {"url": "https://e.com/i"}),
    ({"type": "audio", "payload": {"url": "https://e.com/a"}}, "audio", {"url": "https://e.com/a"}),
    ({"type": "file", "payload": {"url": "https://e.com/f"}}, "file", {"url": "https://e.com/f"}),
    ({"type": "ig_reel", "payload": {"reel_video_id": "1800", "title": "t", "url": "https://e.com/r"}},
     "ig_reel", {"id": "1800", "url": "https://e.com/r", "caption": "t"}),
    ({"type": "hologram", "payload": {"url": "https://e.com/h"}}, "hologram",
     {"url": "https://e.com/h"}),
    ({"type": "image", "payload": {}}, None, {"url": STORY["url"]}),  # nothing to fetch
    (None, None, {"url": STORY["url"]}),  # a plain story reply (instagram/story_reply.json)
])
def test_an_instagram_story_reply_keeps_its_attachment(attachment, raw_type, media):
    """A story reply with an attachment: the attachment is ``media`` (its Meta type in
    ``raw_type``), the story is ``story_id`` (``instagram/story_reply_attachment.json`` is the
    fixture). Before, the story replaced the attachment, which was lost."""
    message = {"mid": "aWdfTEST_IN_S", "text": "Love it", "reply_to": {"story": STORY}}
    if attachment is not None:
        message["attachments"] = [attachment]
    (event,) = instagram(_instagram_item(message=message))
    assert (event.type, event.raw_type, event.story_id) == ("story_reply", raw_type, STORY["id"])
    assert json.loads(encode(event))["media"] == media
    assert (event.text, event.reply_to, event.message_id) == ("Love it", None, "aWdfTEST_IN_S")
    assert decode(encode(event)) == event


@pytest.mark.parametrize("key,value", [
    ("optin", {"type": "notification_messages", "payload": "P"}),
    ("optin", {"mid": "aWdfTEST_IN_0001"}),
    ("messaging_feedback", {"feedback_screens": [{"screen_id": 0}]}),
    ("policy_enforcement", {"action": "block", "reason": "spam"}),
    ("brand_new_kind", "a string, not an object"),
    ("brand_new_kind", None),
    ("brand_new_kind", [1, 2]),
])
def test_unknown_instagram_item_keys_become_unsupported(key, value):
    (event,) = instagram(_instagram_item(**{key: value}))
    assert (event.kind, event.type, event.raw_type) == ("message", "unsupported", key)
    assert event.message_id is None  # never the referenced message's id: storage keeps that one
    assert event.reply_to == (value.get("mid") if isinstance(value, dict) else None)
    assert (event.sender.id, event.account_id) == ("9000000000000001", "17840000000000001")
    assert decode(encode(event)) == event
    (again,) = instagram(_instagram_item(**{key: value}))
    assert again.id == event.id  # a redelivery keeps the id


def test_unknown_instagram_ids_differ_by_key_sender_time_and_mid():
    base = {"mid": "aWdfTEST_IN_0001"}
    ids = {
        instagram(_instagram_item(hologram=base))[0].id,
        instagram(_instagram_item(optin=base))[0].id,
        instagram(_instagram_item(hologram={"mid": "aWdfTEST_IN_0002"}))[0].id,
        instagram(_instagram_item(hologram=base, timestamp=1760003300001))[0].id,
        instagram(_instagram_item(hologram=base, sender={"id": "9000000000000002"}))[0].id,
        instagram(_instagram_item(message={"mid": "aWdfTEST_IN_0001", "text": "x"}))[0].id,
    }
    assert len(ids) == 6


def test_an_instagram_message_edit_is_an_edit_of_its_mid():
    """Shaped as WhatsApp's ``edit``: text, ``reply_to`` the edited mid, and ``message_id`` that
    mid too (an edit has no id of its own), so the storage sinks rewrite that message in place
    (``gateway.events.edit_target``). The id is Meta's (mid, num_edit): a redelivery keeps
    it, the next edit of the same message differs."""
    from gateway.events import edit_target

    item = {"mid": "aWdfTEST_IN_0001", "text": "edited", "num_edit": 2}
    (event,) = instagram(_instagram_item(message_edit=item))
    assert (event.kind, event.type, event.text, event.raw_type) == (
        "message", "text", "edited", "message_edit")
    assert (event.message_id, event.reply_to) == ("aWdfTEST_IN_0001", "aWdfTEST_IN_0001")
    assert edit_target(event) == "aWdfTEST_IN_0001"
    assert decode(encode(event)) == event
    later = instagram(_instagram_item(message_edit=item, timestamp=1760003300999))[0]
    assert later.id == event.id  # (mid, num_edit) alone: the timestamp is not part of it
    ids = {event.id, instagram(_instagram_item(message_edit={**item, "num_edit": 3}))[0].id,
           instagram(_instagram_item(message_edit={**item, "mid": "aWdfTEST_IN_0002"}))[0].id,
           instagram(_instagram_item(message={"mid": "aWdfTEST_IN_0001", "text": "x"}))[0].id}
    assert len(ids) == 4
    (blank,) = instagram(_instagram_item(message_edit={"mid": "aWdfTEST_IN_0001"}))
    assert (blank.type, blank.text, blank.message_id) == ("unsupported", None, "aWdfTEST_IN_0001")
    (nothing,) = instagram(_instagram_item(message_edit={"text": "no mid"}))  # edits nothing
    assert (nothing.type, nothing.raw_type, nothing.message_id, nothing.reply_to) == (
        "unsupported", "message_edit", None, None)
    assert edit_target(nothing) is None


def test_known_key_wins_and_null_known_keys_fall_through_to_the_unknown_one():
    (event,) = instagram(_instagram_item(read={"mid": "m1"}, hologram={"mid": "m2"}))
    assert event.kind == "read"
    (event,) = instagram(_instagram_item(read=None, hologram={"mid": "m2"}))
    assert (event.type, event.raw_type) == ("unsupported", "hologram")
    assert instagram(_instagram_item(read=None)) == []  # no event object at all: nothing to keep
    assert instagram(_instagram_item()) == []


@pytest.mark.parametrize("latitude", [10**400, 91.5, -1e300])
def test_a_coordinate_that_is_no_latitude_is_dropped_not_a_crash(latitude):
    """Found by tests/test_normalise_properties.py: an integer latitude of 400 digits raised
    OverflowError, which dead-lettered the whole request (its sibling messages included). A
    coordinate that is no latitude / longitude is treated like a missing one."""
    envelope = json.loads(fixture_bytes("whatsapp/location.json"))
    value = envelope["entry"][0]["changes"][0]["value"]
    value["messages"][0]["location"]["latitude"] = latitude
    text = json.loads(fixture_bytes("whatsapp/text.json"))["entry"][0]["changes"][0]["value"]
    value["messages"].append(text["messages"][0])
    located, sibling = whatsapp(json.dumps(envelope).encode())
    assert (located.type, located.location) == ("location", None)
    assert located.message_id == "wamid.TEST.IN.LOC.0001"
    assert decode(encode(located)) == located
    assert (sibling.type, sibling.message_id) == ("text", "wamid.TEST.IN.TEXT.0001")


@pytest.mark.parametrize("reaction,emoji", [
    ({"mid": "m8", "action": "react", "reaction": "love", "emoji": "\u2764\ufe0f"},
     "\u2764\ufe0f"),
    ({"mid": "m8", "action": "react", "reaction": "love"}, "\u2764\ufe0f"),  # label only
    ({"mid": "m8", "action": "react", "reaction": "wow"}, "wow"),  # unknown: never "" (removal)
    ({"mid": "m8", "action": "unreact"}, ""),
])
def test_instagram_reaction_emoji(reaction, emoji):
    (event,) = instagram(_instagram_item(reaction=reaction))
    assert (event.kind, event.emoji) == ("reaction", emoji)


@pytest.mark.parametrize("entry_id", ["absent", None])
def test_an_instagram_entry_without_an_id_keeps_its_events(entry_id):
    """The business id is on every item too (``recipient.id``, ``sender.id`` of an echo): an
    entry whose ``id`` is missing or null loses none of its events."""
    body = json.loads(_instagram_item(message={"mid": "aWdfTEST_IN_NOID", "text": "hi"}))
    entry = body["entry"][0]
    entry["messaging"].append({"sender": {"id": "17840000000000001"},
                               "recipient": {"id": "9000000000000001"},
                               "timestamp": 1760003300001,
                               "message": {"mid": "aWdfTEST_OUT_NOID", "text": "hello",
                                           "is_echo": True}})
    if entry_id == "absent":
        del entry["id"]
    else:
        entry["id"] = None
    inbound, echo = instagram(json.dumps(body).encode())
    for event in (inbound, echo):
        assert event.account_id == "17840000000000001"
        assert event.conversation_id == conversation_id(
            "instagram", "17840000000000001", "9000000000000001")
    assert (inbound.direction, echo.direction) == ("inbound", "outbound")


def test_an_unsupported_instagram_message_keeps_what_it_answers():
    """A message Meta cannot render (``is_unsupported``: a GIF, a sticker) still answers a
    message or a story."""
    (quoted,) = instagram(_instagram_item(message={
        "mid": "aWdfTEST_IN_U1", "is_unsupported": True, "reply_to": {"mid": "aWdfTEST_OUT_0001"}}))
    assert (quoted.type, quoted.reply_to, quoted.story_id) == (
        "unsupported", "aWdfTEST_OUT_0001", None)
    (story,) = instagram(_instagram_item(message={
        "mid": "aWdfTEST_IN_U2", "is_unsupported": True, "reply_to": {"story": STORY}}))
    assert (story.type, story.reply_to, story.story_id) == ("unsupported", None, STORY["id"])
    assert decode(encode(story)) == story


@pytest.mark.parametrize("escape", [rb"\ud83d", rb"\ude00", rb"\ud83d\ud83d"])
def test_half_an_emoji_costs_one_character_not_the_webhook(escape):
    """A text cut in the middle of a surrogate pair (``\\ud83d`` alone) is valid JSON to most
    parsers: the body is accepted, every event in it kept, the broken character read as U+FFFD;
    an escaped backslash before ``u`` is text, kept as it is."""
    from channels.envelope import mend_surrogates

    body = json.loads(fixture_bytes("whatsapp/three_messages.json"))
    messages = body["entry"][0]["changes"][0]["value"]["messages"]
    messages[0]["text"]["body"] = "CUT_HERE"
    raw = json.dumps(body).encode().replace(b"CUT_HERE", b"Thanks " + escape)
    wa_envelope(raw)  # the intake's check accepts it (the raw body is journaled as it came)
    events = whatsapp(raw)
    assert len(events) == len(messages)
    assert events[0].text.startswith("Thanks \ufffd") and "\ufffd" not in events[1].text
    ig = _instagram_item(message={"mid": "aWdfTEST_IN_CUT", "text": "CUT_HERE"}).replace(
        b"CUT_HERE", b"Ok " + escape)
    ig_envelope(ig)
    (event,) = instagram(ig)
    assert event.text.startswith("Ok \ufffd")
    assert mend_surrogates(rb'{"t": "\\ud83d \ud83d\ude00"}') == rb'{"t": "\\ud83d \ud83d\ude00"}'


AD = {"ref": "ad_campaign_7", "ad_id": "120000000000002", "source": "ADS", "type": "OPEN_THREAD"}


@pytest.mark.parametrize("where", ["beside", "inside"])
def test_a_referral_that_comes_with_an_instagram_message_rides_on_it(where):
    message = {"mid": "m.ad.1", "text": "Is the sale still on?"}
    fields = {"message": {**message, "referral": AD}} if where == "inside" else {
        "message": message, "referral": AD}
    [event] = instagram(_instagram_item(**fields))
    assert (event.kind, event.message_id, event.text) == ("message", "m.ad.1", message["text"])
    assert event.referral == AD
    [alone] = instagram(_instagram_item(referral=AD))  # without a message: its own event
    assert (alone.kind, alone.payload, alone.referral) == ("referral", "ad_campaign_7", AD)
    [plain] = instagram(_instagram_item(message=message))
    assert plain.referral is None and plain.id == event.id  # the same message, the same id
