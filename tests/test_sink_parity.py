"""The storage sink (a real SQLite file) and the Firestore sink's model (``sinks.firestore.model``
applied to documents in memory, one ``Plan`` per batch as the sink commits them) agree, scenario by
scenario: unsends and ``last_text``, a failed status's error, edits, conversation ids with ``/``,
consent under an unsend that comes first, and a contact's name by timestamp.

Each scenario is a list of batches and what the three collections must then say; both sinks are
checked against it (``tests/firestore/`` checks the real Firestore sink against storage on the
emulator).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from channels.instagram.normalise import normalise as instagram
from gateway.consent import Consent
from gateway.events import (
    ErrorInfo,
    Event,
    Message,
    Party,
    Reaction,
    Status,
    conversation_id,
    encode,
)
from gateway.sink import Record
from sinks.firestore.model import DELETE, Key, Plan, keys_of
from sinks.storage.sink import StorageConfig, StorageSink
from tests.conftest import fixture_bytes

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ACCOUNT, CUSTOMER = "100000000000001", "15550002222"
CONV = conversation_id("whatsapp", ACCOUNT, CUSTOMER)
CONSENT = Consent(["STOP"], ["START"])


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stamp(value: datetime | None) -> str | None:
    """The storage sink's fixed-width RFC 3339 text for an instant."""
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def msg(eid: str, mid: str, seconds: float, text: str | None = "hi", **fields: Any) -> Message:
    outbound = fields.pop("direction", "inbound") == "outbound"
    name, user_id = fields.pop("name", None), fields.pop("user_id", None)
    sender, recipient = (Party(ACCOUNT), Party(CUSTOMER, user_id=user_id)) if outbound else (
        Party(CUSTOMER, name, user_id), Party(ACCOUNT))
    return Message(schema=1, id=eid, channel=fields.pop("channel", "whatsapp"),
                   direction="outbound" if outbound else "inbound", account_id=ACCOUNT,
                   conversation_id=fields.pop("conv", CONV), sender=sender, recipient=recipient,
                   timestamp=at(seconds), message_id=mid, type=fields.pop("type", "text"),
                   text=text, **fields)


def revoke(eid: str, mid: str, seconds: float) -> Message:
    """WhatsApp's ``revoke`` as channels/whatsapp/normalise.py maps it."""
    return msg(eid, mid, seconds, None, type="deleted")


def edit(eid: str, own: str, original: str, seconds: float, text: str, **fields: Any) -> Message:
    """WhatsApp's ``edit``: a message of its own wamid replying to the edited one."""
    return msg(eid, own, seconds, text, raw_type="edit", reply_to=original, **fields)


def react(seconds: float, emoji: str, mid: str = "wamid.O1") -> Reaction:
    """The customer's reaction to our message ``mid`` ("" removes it)."""
    return Reaction(schema=1, id=f"re-{seconds}-{emoji}", channel="whatsapp", direction="inbound",
                    account_id=ACCOUNT, conversation_id=CONV, sender=Party(CUSTOMER),
                    recipient=Party(ACCOUNT), timestamp=at(seconds), message_id=mid, emoji=emoji)


def failed(mid: str, seconds: float, channel: str = "whatsapp", conv: str = CONV) -> Status:
    return Status(schema=1, id=f"st-{mid}", channel=channel, direction="outbound",
                  account_id=ACCOUNT, conversation_id=conv, sender=Party(ACCOUNT),
                  recipient=Party(CUSTOMER), timestamp=at(seconds), message_id=mid,
                  status="failed", error=ErrorInfo(code=131026, title="Message undeliverable"))


# --- the two sinks, seen the same way ------------------------------------------------------------

class View:
    """What a scenario asserts: per message (type, text, error code), per conversation
    (message_count, last_text), per contact (name, opted_out, opted_out_at, first_seen)."""

    def __init__(self, messages: dict, conversations: dict, contacts: dict,
                 message_conversations: set[str], reactions: dict[str, dict],
                 times: dict[str, str | None], last_at: dict[str, str | None],
                 last_seen: dict[str, str | None], pricing: dict[str, dict | None],
                 last_inbound: dict[str, str | None] | None = None,
                 usernames: dict[str, str | None] | None = None) -> None:
        self.messages, self.conversations, self.contacts = messages, conversations, contacts
        self.message_conversations = message_conversations  # messages' conversation_id values
        self.reactions = reactions  # per message: {sender id: emoji}
        self.times, self.last_at = times, last_at  # messages' timestamp, last_message_at
        self.last_seen, self.pricing = last_seen, pricing  # contacts' last_seen, messages' pricing
        self.last_inbound = last_inbound or {}  # contacts' last_inbound_at
        self.usernames = usernames or {}  # contacts' username


async def storage_view(batches: list[list[Event]], tmp_path) -> View:
    tmp_path.mkdir(parents=True, exist_ok=True)
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")), CONSENT)
    await sink.start()
    try:
        for n, batch in enumerate(batches):
            await sink.write([Record(100 * n + i, e, encode(e), 1.0) for i, e in enumerate(batch)])
        messages = {key: (kind, text, error and json.loads(error)["code"])
                    for key, kind, text, error
                    in await sink.query("SELECT id, type, text, error FROM messages")}
        conversations = {key: (count, text) for key, count, text in await sink.query(
            "SELECT id, message_count, last_text FROM conversations")}
        contacts = {key: (name, bool(out), out_at, first, user) for key, name, out, out_at, first,
                    user in await sink.query("SELECT id, name, opted_out, opted_out_at,"
                                             " first_seen, user_id FROM contacts")}
        linked = {c for (c,) in await sink.query("SELECT conversation_id FROM messages")}
        reactions = {key: json.loads(r or "{}") for key, r in await sink.query(
            "SELECT id, reactions FROM messages")}
        times = dict(await sink.query("SELECT id, timestamp FROM messages"))
        last_at = dict(await sink.query("SELECT id, last_message_at FROM conversations"))
        last_seen = dict(await sink.query("SELECT id, last_seen FROM contacts"))
        pricing = {key: p and json.loads(p) for key, p in await sink.query(
            "SELECT id, pricing FROM messages")}
        last_inbound = dict(await sink.query("SELECT id, last_inbound_at FROM contacts"))
        usernames = dict(await sink.query("SELECT id, username FROM contacts"))
        return View(messages, conversations, contacts, linked, reactions, times, last_at,
                    last_seen, pricing, last_inbound, usernames)
    finally:
        await sink.close()


def apply_changes(store: dict[Key, dict], plan: Plan) -> None:
    for change in plan.changes():
        if change.create:
            store[change.key] = dict(change.fields)
            continue
        doc = store[change.key]
        for name, value in change.fields.items():
            if value is DELETE:
                doc.pop(name, None)
            else:
                doc[name] = value


def firestore_view(batches: list[list[Event]]) -> View:
    store: dict[Key, dict] = {}
    for batch in batches:
        plan = Plan({k: store.get(k) for ev in batch for k in keys_of(ev)}, CONSENT)
        for ev in batch:
            plan.apply(ev)
        apply_changes(store, plan)
    docs: dict[str, dict[str, dict]] = {"messages": {}, "conversations": {}, "contacts": {}}
    for key, doc in store.items():
        docs[key.collection][key.id] = doc
    return View(
        {k: (d.get("type"), d.get("text"), (d.get("error") or {}).get("code"))
         for k, d in docs["messages"].items()},
        {k: (d["message_count"], d["last_text"]) for k, d in docs["conversations"].items()},
        {k: (d["name"], d["opted_out"], stamp(d["opted_out_at"]), stamp(d["first_seen"]),
             d["user_id"]) for k, d in docs["contacts"].items()},
        {d["conversation_id"] for d in docs["messages"].values()},
        {k: d.get("reactions") or {} for k, d in docs["messages"].items()},
        {k: stamp(d.get("timestamp")) for k, d in docs["messages"].items()},
        {k: stamp(d.get("last_message_at")) for k, d in docs["conversations"].items()},
        {k: stamp(d.get("last_seen")) for k, d in docs["contacts"].items()},
        {k: d.get("pricing") for k, d in docs["messages"].items()},
        {k: stamp(d.get("last_inbound_at")) for k, d in docs["contacts"].items()},
        {k: d.get("username") for k, d in docs["contacts"].items()})


@pytest.fixture(params=["storage", "firestore-model"])
def view_of(request, tmp_path):
    """``await view_of(batches)``: the batches written to a fresh store of that sink."""
    runs = iter(range(1_000))

    async def view(batches: list[list[Event]]) -> View:
        if request.param == "storage":
            return await storage_view(batches, tmp_path / str(next(runs)))
        return firestore_view(batches)

    return view


CONTACT = f"whatsapp:{CUSTOMER}"


# --- 1. an unsent message leaves last_text ------------------------------------------------------

M1, M2 = msg("e1", "m1", 10, "first"), msg("e2", "m2", 20, "second")


@pytest.mark.parametrize("batches,last_text", [
    ([[M1, M2], [revoke("rv2", "m2", 30)]], None),  # the latest, unsent in a later batch
    ([[M1, M2, revoke("rv2", "m2", 30)]], None),  # ... in the same batch
    ([[M1], [M2, revoke("rv1", "m1", 30)]], "second"),  # an older one: last_text stays
    ([[M2], [revoke("rv2", "m2", 30), M1]], None),  # unsent, then an older one arrives
    ([[M1, M2], [revoke("rv2", "m2", 30), msg("e3", "m3", 40, "third")]], "third"),
], ids=["latest-later-batch", "latest-same-batch", "older", "then-older", "then-newer"])
async def test_an_unsent_latest_message_leaves_last_text(view_of, batches, last_text):
    view = await view_of(batches)
    assert view.conversations[CONV][1] == last_text
    assert all(text is None for kind, text, _ in view.messages.values() if kind == "deleted")


# --- 2. a failed status's error survives its message's arrival ----------------------------------

@pytest.mark.parametrize("together", [False, True])
async def test_a_failed_status_error_stays_when_its_message_arrives(view_of, together):
    status, echo = failed("wamid.O1", 30), msg("ev-o1", "wamid.O1", 5, "ours",
                                                direction="outbound")
    batches = [[status, echo]] if together else [[status], [echo]]
    view = await view_of(batches)
    assert view.messages["wamid.O1"] == ("text", "ours", 131026)
    assert view.conversations[CONV] == (1, "ours")


# --- 3. edits rewrite the original, never counted -----------------------------------------------

async def test_an_edit_rewrites_the_latest_original_in_place(view_of):
    batches = [[M1], [edit("ed1", "wamid.E1", "m1", 50, "first (edited)")]]
    view = await view_of(batches)
    assert view.messages == {"m1": ("text", "first (edited)", None)}  # no row of its own
    assert view.conversations[CONV] == (1, "first (edited)")


async def test_an_edit_of_an_older_message_leaves_last_text(view_of):
    batches = [[M1, M2], [edit("ed1", "wamid.E1", "m1", 50, "first (edited)")]]
    view = await view_of(batches)
    assert view.messages["m1"] == ("text", "first (edited)", None)
    assert set(view.messages) == {"m1", "m2"}
    assert view.conversations[CONV] == (2, "second")


@pytest.mark.parametrize("together", [False, True])
async def test_an_edit_before_its_original_stands_in_for_it_counted_once(view_of, together):
    first, then = [edit("ed1", "wamid.E1", "m1", 50, "first (edited)")], [M1]
    batches = [first + then] if together else [first, then]
    view = await view_of(batches)
    assert view.messages == {"m1": ("text", "first (edited)", None)}  # the edit is newer
    assert view.conversations[CONV] == (1, "first (edited)")
    assert view.contacts[CONTACT][3] == stamp(at(10))  # the original still was activity


async def test_an_older_edit_and_an_edit_of_an_unsent_message_change_nothing(view_of):
    newer, older = edit("ed2", "wamid.E2", "m1", 60, "v2"), edit("ed1", "wamid.E1", "m1", 50, "v1")
    batches = [[M1], [newer], [older], [newer]]  # and a redelivery of the newer one
    view = await view_of(batches)
    assert view.messages == {"m1": ("text", "v2", None)}
    assert view.conversations[CONV] == (1, "v2")
    batches = [[M1], [revoke("rv1", "m1", 30)], [newer]]
    view = await view_of(batches)
    assert view.messages == {"m1": ("deleted", None, None)}
    assert view.conversations[CONV] == (1, None)


async def test_an_edited_caption_replaces_the_media_and_text(view_of):
    from gateway.events import Media

    image = msg("e1", "m1", 10, "old caption", type="image",
                media=Media(id="1", mime_type="image/jpeg", caption="old caption"))
    changed = edit("ed1", "wamid.E1", "m1", 50, "new caption", type="image",
                   media=Media(id="1", mime_type="image/jpeg", caption="new caption"))
    view = await view_of([[image], [changed]])
    assert view.messages == {"m1": ("image", "new caption", None)}
    assert view.conversations[CONV] == (1, "new caption")


async def test_an_instagram_message_edit_edits_the_mid_it_names(view_of):
    """Through the channel's normaliser: ``message_edit`` is an edit of ``mid``."""
    text = instagram(fixture_bytes("instagram/text.json"))
    edited = instagram(fixture_bytes("instagram/message_edit.json"))
    conv = text[0].conversation_id
    edited_text = "Do you ship to Lisbon or Porto?"
    for batches in ([text, edited], [edited, text], [text + edited + edited]):
        view = await view_of(batches)
        assert view.messages == {"aWdfTEST_IN_0001": ("text", edited_text, None)}
        assert view.conversations[conv] == (1, edited_text)


# --- 4. conversation ids never hold '/' ---------------------------------------------------------

async def test_a_plugin_conversation_id_with_a_slash_is_a_slash_free_key(view_of):
    conv = "telegram:bot/1:user/9"
    plugin = msg("p1", "pm/1", 1, "hello", channel="telegram", conv=conv)
    status = failed("pm/2", 2, channel="telegram", conv=conv)  # a stub row of its own
    view = await view_of([[plugin, status]])
    assert set(view.conversations) == {"telegram:bot_1:user_9"}
    assert view.message_conversations == {"telegram:bot_1:user_9"}  # the key, as erase uses


# --- 5. consent of a message whose unsend came first --------------------------------------------

async def test_an_opt_out_counts_when_its_unsend_arrives_first(view_of):
    stop = msg("s1", "m1", 20, "STOP")
    for batches in ([[revoke("rv1", "m1", 25)], [stop]], [[revoke("rv1", "m1", 25), stop]]):
        view = await view_of(batches)
        _, opted_out, opted_out_at, first_seen, _ = view.contacts[CONTACT]
        assert (opted_out, opted_out_at, first_seen) == (True, stamp(at(20)), stamp(at(20)))
        assert view.messages == {"m1": ("deleted", None, None)}
        assert view.conversations[CONV][0] == 1


# --- 6. a contact's name is that of their latest event ------------------------------------------

@pytest.mark.parametrize("batches", [
    [[msg("e1", "m1", 20, name="New"), msg("e2", "m2", 10, name="Old")],
     [msg("e3", "m3", 5, name="Oldest")]],
    [[msg("e3", "m3", 5, name="Oldest"), msg("e1", "m1", 20, name="New")]],
    [[msg("e1", "m1", 20, name="New")], [msg("e3", "m3", 5, name="Oldest")],
     [msg("e4", "m4", 30)]],  # a later event without a name keeps it
], ids=["late-older-batch", "one-batch", "nameless-later"])
async def test_a_contact_name_follows_timestamps_not_arrival(view_of, batches):
    view = await view_of(batches)
    assert view.contacts[CONTACT][0] == "New"


# --- 7. a contact's BSUID is that of their latest event naming one ------------------------------

@pytest.mark.parametrize("batches", [
    [[msg("e1", "m1", 20, user_id="US.2"), msg("e2", "m2", 10, user_id="US.1")],
     [msg("e3", "m3", 5, user_id="US.0")]],
    [[msg("e3", "m3", 5, user_id="US.0"), msg("e1", "m1", 20, user_id="US.2")]],
    [[msg("e1", "m1", 20, user_id="US.2")], [msg("e4", "m4", 30)]],  # none later: it stays
    [[msg("e5", "m5", 1)], [msg("o1", "o1", 20, direction="outbound", user_id="US.2")]],
    [[msg("e1", "m1", 20, user_id="US.2")], [msg("e6", "m6", 30), msg("e7", "m7", 10,
                                                                        user_id="US.1")]],
    [[msg("e1", "m1", 20, user_id="US.2"), msg("e6", "m6", 30), msg("e7", "m7", 10,
                                                                     user_id="US.1")]],
], ids=["late-older-batch", "one-batch", "none-later", "from-a-reply", "old-beside-newer",
        "old-beside-newer-one-batch"])
async def test_a_contacts_bsuid_follows_timestamps_not_arrival(view_of, batches):
    view = await view_of(batches)
    assert view.contacts[CONTACT][4] == "US.2"


# --- a sender's reaction follows timestamps, not arrival ----------------------------------------

@pytest.mark.parametrize("batches,left", [
    ([[react(10, "👍")], [react(20, "")]], {}),  # in order
    ([[react(20, "")], [react(10, "👍")]], {}),  # the removal first (webhooks.md §3: no order)
    ([[react(20, ""), react(10, "👍")]], {}),  # ... in one batch
    ([[react(20, "❤")], [react(10, "👍")]], {CUSTOMER: "❤"}),  # an older reaction arrives late
    ([[react(10, "👍")], [react(20, "")], [react(30, "🎉")], [react(10, "👍")]],
     {CUSTOMER: "🎉"}),  # a newer one after the removal, then a redelivery of the first
    ([[react(10, "👍")], [react(10, "❤")]], {CUSTOMER: "👍"}),  # one second: the greater emoji
    ([[react(10, "❤")], [react(10, "👍")]], {CUSTOMER: "👍"}),  # ... whichever came first
    ([[react(10, "")], [react(10, "👍")], [react(10, "")]], {CUSTOMER: "👍"}),  # removal last
], ids=["in-order", "removal-first", "removal-first-one-batch", "older-late", "newer-again",
        "same-second", "same-second-reversed", "same-second-removal"])
async def test_a_reaction_follows_timestamps_not_arrival(view_of, batches, left):
    view = await view_of(batches)
    assert view.reactions["wamid.O1"] == left


# --- an unsend or edit that comes before its original -------------------------------------------

X, A = msg("ex", "mx", 10, "oops wrong address"), msg("ea", "ma", 20, "my address is 1 Main St")
UNSEND_X, EDIT_X = revoke("rvx", "mx", 30), edit("edx", "wamid.EX", "mx", 30, "oops, 2 Main St")


@pytest.mark.parametrize("change,text", [(UNSEND_X, None), (EDIT_X, "oops, 2 Main St")],
                         ids=["unsend", "edit"])
@pytest.mark.parametrize("order", [
    lambda c: [[X], [A], [c]], lambda c: [[A], [c], [X]], lambda c: [[A, c, X]],
    lambda c: [[c], [A, X]]], ids=["in-order", "original-last", "one-batch", "change-first"])
async def test_a_change_before_its_original_ends_as_in_order(view_of, change, text, order):
    """webhooks.md §3: Meta keeps no order. The unsend's or edit's time is not the message's:
    the row takes the original's time when it comes, and the conversation's latest message and
    text are the ones in-order delivery gives."""
    view = await view_of(order(change))
    assert view.messages["mx"][1] == text
    assert view.times["mx"] == stamp(at(10))
    assert view.conversations[CONV] == (2, "my address is 1 Main St")
    assert view.last_at[CONV] == stamp(at(20))


async def test_a_change_whose_original_never_comes_moves_no_conversation_time(view_of):
    # e.g. an edit of a message sent before the gateway was installed
    view = await view_of([[A], [EDIT_X]])
    assert view.messages["mx"] == ("text", "oops, 2 Main St", None)
    assert view.times["mx"] is None  # no time of its own until the original comes
    assert view.conversations[CONV] == (2, "my address is 1 Main St")
    assert view.last_at[CONV] == stamp(at(20))


@pytest.mark.parametrize("order", [
    lambda m, r: [[m], [r]], lambda m, r: [[r], [m]], lambda m, r: [[m, r]],
    lambda m, r: [[r, m]]], ids=["in-order", "unsend-first", "one-batch", "one-batch-reversed"])
async def test_a_contacts_last_seen_is_the_same_whichever_comes_first(view_of, order):
    view = await view_of(order(msg("e2", "m2", 20, "second"), revoke("rv2", "m2", 30)))
    assert view.last_seen[CONTACT] == stamp(at(30))  # the unsend is the customer's doing too


async def test_a_contact_last_wrote_when_it_last_sent_a_message(view_of):
    """limits.md §8: the window runs from the customer's last message. A read, a reaction or an
    unsend later is the customer active (``last_seen``), not writing (``last_inbound_at``), as
    the conversation's ``last_inbound_at`` already had it."""
    from gateway.events import Read

    read = Read(schema=1, id="rd-1", channel="whatsapp", direction="inbound", account_id=ACCOUNT,
                conversation_id=CONV, sender=Party(CUSTOMER), recipient=Party(ACCOUNT),
                timestamp=at(50), message_id="wamid.O1")
    view = await view_of([[msg("e1", "m1", 10, "hi")], [revoke("rv1", "m1", 20)],
                          [react(30, "\U0001f44d")], [read]])
    assert view.last_inbound[CONTACT] == stamp(at(10))
    assert view.last_seen[CONTACT] == stamp(at(50))


@pytest.mark.parametrize("batches", [
    lambda a, b, c: [[a], [b], [c]], lambda a, b, c: [[c], [b], [a]],
    lambda a, b, c: [[b, c, a]]], ids=["in-order", "reversed", "one-batch"])
async def test_a_contacts_username_follows_timestamps_not_arrival(view_of, batches):
    """The WhatsApp username of the latest message that names one (``contacts[].profile``),
    whichever arrives first; a message naming none keeps it."""
    def named(eid: str, seconds: float, username: str | None) -> Message:
        event = msg(eid, f"m-{eid}", seconds)
        return msgspec.structs.replace(event, sender=msgspec.structs.replace(
            event.sender, username=username))

    view = await view_of(batches(named("u1", 10, "kerry.f"), named("u2", 20, "kerry.fisher"),
                                 named("u3", 30, None)))
    assert view.usernames[CONTACT] == "kerry.fisher"


def priced(state: str, seconds: float, **pricing: Any) -> Status:
    return Status(schema=1, id=f"st-{state}", channel="whatsapp", direction="outbound",
                  account_id=ACCOUNT, conversation_id=CONV, sender=Party(ACCOUNT),
                  recipient=Party(CUSTOMER), timestamp=at(seconds), message_id="wamid.O1",
                  status=state, pricing={"billable": True, "category": "utility", **pricing})


@pytest.mark.parametrize("reverse", [False, True])
async def test_a_messages_pricing_is_the_same_whichever_status_comes_first(view_of, reverse):
    statuses = [priced("sent", 10, conversation_id="CONV1", expires_at="2026-01-02T00:00:10Z"),
                priced("delivered", 12)]
    view = await view_of([[s] for s in (statuses[::-1] if reverse else statuses)])
    assert view.pricing["wamid.O1"] == {"billable": True, "category": "utility",
                                        "conversation_id": "CONV1",
                                        "expires_at": "2026-01-02T00:00:10Z"}


# --- extra fields: Meta's detail rides on the message in both sinks --------------------------

@pytest.mark.parametrize("fixture,extra", [
    ("interactive_list_reply", {"interactive": {"type": "list_reply",
                                                "description": "Morning delivery"}}),
    ("system_customer_identity_changed", {
        "system": {"body": "User identity changed", "type": "customer_identity_changed"},
        "identity": {"acknowledged": True, "created_timestamp": "1760000155",
                     "hash": "q1w2e3r4"}}),
])
async def test_a_messages_extra_fields_are_stored_by_both_sinks(fixture, extra, tmp_path):
    """The storage sink keeps the extras in the row's ``extra`` JSON, the Firestore model as
    fields of the document (``gateway.events.STORED_EXTRAS``)."""
    from channels.whatsapp.normalise import normalise as whatsapp

    (event,) = whatsapp(fixture_bytes(f"whatsapp/{fixture}.json"))
    sink = StorageSink(StorageConfig(path=str(tmp_path / "storage.db")), CONSENT)
    await sink.start()
    try:
        await sink.write([Record(1, event, encode(event), 1.0)])
        ((stored,),) = await sink.query("SELECT extra FROM messages")
    finally:
        await sink.close()
    assert json.loads(stored) == extra
    plan = Plan({k: None for k in keys_of(event)}, CONSENT)
    plan.apply(event)
    store: dict[Key, dict] = {}
    apply_changes(store, plan)
    (doc,) = [d for k, d in store.items() if k.collection == "messages"]
    assert {name: doc[name] for name in extra} == extra
