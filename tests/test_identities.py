"""One customer, one contact (gateway.identities): a WhatsApp customer named by BSUID alone (they
hide their number behind a username) is the customer that BSUID was seen beside, through a
running gateway into the storage and jsonl sinks, across a restart, and until an erasure."""

from __future__ import annotations

import json

from tests.conftest import fixture_bytes

BSUID, WA_ID, ACCOUNT = "US.13491208655302741918", "16315551234", "100000000000001"
TOKEN = "identities-test-token"
CONVERSATION = f"whatsapp:{ACCOUNT}:{WA_ID}"


def bsuid_only(message_id: str, at: int | None = None, text: str | None = None) -> bytes:
    """A message naming its sender by BSUID alone (``from_user_id``, no ``from``); ``at`` and
    ``text`` replace the fixture's timestamp and text."""
    body = json.loads(fixture_bytes("whatsapp/bsuid_only.json"))
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    message["id"] = message_id
    if at is not None:
        message["timestamp"] = str(at)
    if text is not None:
        message["text"] = {"body": text}
    return json.dumps(body).encode()


def status_to_bsuid(message_id: str) -> bytes:
    """A status of one of our messages to a recipient named by BSUID alone."""
    body = json.loads(fixture_bytes("whatsapp/status_bsuid_recipient.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["statuses"] = [dict(value["statuses"][0], id=message_id)]
    return json.dumps(body).encode()


async def start(gateway):
    return await gateway(f'api_token = "{TOKEN}"')


async def post(gw, body: bytes) -> None:
    assert (await gw.post("whatsapp", body))[0] == 200
    await gw.settle()


async def where(gw, message_id: str) -> tuple:
    (row,) = await gw.sql("SELECT sender_id, recipient_id, conversation_id FROM messages"
                          " WHERE id = ?", (message_id,))
    return row


async def test_a_customer_named_by_bsuid_alone_stays_the_contact_it_was_seen_as(gateway):
    gw = await start(gateway)
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.BEFORE"))  # before any pair: its own contact
    assert await where(gw, "wamid.TEST.IN.BSUID.BEFORE") == (
        BSUID, ACCOUNT, f"whatsapp:{ACCOUNT}:{BSUID}")

    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))  # wa_id and BSUID
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.AFTER"))
    assert await where(gw, "wamid.TEST.IN.BSUID.AFTER") == (WA_ID, ACCOUNT, CONVERSATION)
    await post(gw, status_to_bsuid("wamid.TEST.OUT.BSUID.REPLY"))
    (status,) = [e for e in gw.jsonl() if e.get("message_id") == "wamid.TEST.OUT.BSUID.REPLY"]
    assert status["recipient"] == {"id": WA_ID, "user_id": BSUID}
    assert status["conversation_id"] == CONVERSATION
    (event,) = [e for e in gw.jsonl() if e.get("message_id") == "wamid.TEST.IN.BSUID.AFTER"]
    assert event["sender"] == {"id": WA_ID, "name": "Kerry Fisher", "user_id": BSUID,
                               "username": "kerry"}  # the profile's, carried as it came
    assert event["conversation_id"] == CONVERSATION
    assert await gw.sql("SELECT message_count FROM conversations WHERE id = ?",
                        (CONVERSATION,)) == [(3,)]  # the two beside, the one after
    assert await gw.sql("SELECT contact_id FROM contacts WHERE user_id = ? ORDER BY 1",
                        (BSUID,)) == [(WA_ID,), (BSUID,)]

    await gw.server.close()  # a restart: the pair is the journal's, not memory's
    gw = await start(gateway)
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.RESTART"))
    assert await where(gw, "wamid.TEST.IN.BSUID.RESTART") == (WA_ID, ACCOUNT, CONVERSATION)

    status, body = await erase(gw, WA_ID)
    assert status == 200 and body["linked_ids"] == [BSUID], body
    # 5 messages (the one stored under the BSUID before the pair included), 2 statuses' stubs
    assert body["erased"]["storage"]["messages"] == 7
    assert await gw.sql("SELECT count(*) FROM contacts") == [(0,)]
    assert await gw.sql("SELECT count(*) FROM messages") == [(0,)]
    from tests.test_erasure import erasure_check

    checked = erasure_check(WA_ID, BSUID, "--data-dir", str(gw.data_dir))
    assert checked.returncode == 0, checked.stdout
    assert f"{BSUID}: erased at" in checked.stdout and "(a linked id)" in checked.stdout
    assert BSUID not in (gw.data_dir / "erasures.jsonl").read_text()  # only its HMAC
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.ERASED"))  # the pair went with the contact
    assert await where(gw, "wamid.TEST.IN.BSUID.ERASED") == (
        BSUID, ACCOUNT, f"whatsapp:{ACCOUNT}:{BSUID}")


async def erase(gw, contact_id: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{contact_id}",
                                 headers=headers) as resp:
        return resp.status, await resp.json()


async def test_an_erasure_by_either_id_erases_the_person_and_what_waits_to_be_processed(
        gateway, monkeypatch):
    """By BSUID: the wa_id contact it was seen beside goes too (and the BSUID beside it); a
    BSUID-only request journaled before the erasure and not yet processed yields nothing."""
    from gateway import erasure
    from tests.test_erasure import hold_processor

    monkeypatch.setattr(erasure, "SETTLE_SECONDS", 0.2)
    gw = await start(gateway)
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    gate = hold_processor(gw)
    assert (await gw.post("whatsapp", bsuid_only("wamid.TEST.IN.BSUID.WAITING")))[0] == 200
    status, body = await erase(gw, BSUID)
    assert status == 200 and body["linked_ids"] == [WA_ID], body
    assert body["erased"]["storage"] == {"contacts": 1, "conversations": 1, "messages": 3}
    gate.set()
    await gw.settle()
    assert await gw.sql("SELECT id, user_id FROM contacts") == []
    assert await gw.sql("SELECT id FROM messages WHERE id LIKE 'wamid.TEST.IN.%'") == []
    assert BSUID not in (gw.data_dir / "events.jsonl").read_text()


async def test_a_repeat_after_a_failed_sink_still_erases_the_linked_ids(gateway):
    """The pairs are retired at once (a message by BSUID alone after the failed erasure is not
    filed under the erased number), and the ids stay together until every sink has erased: the
    repeat the failed answer asks for finds the BSUID again, across a restart."""
    from tests.conftest import SINKS_TOML
    from tests.test_erasure import ThirdPartyPlugin

    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.crm]\n")
    crm = plugin.sinks["crm"]
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.ALONE"))  # a contact of its own, then the pair
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    assert crm.of(("whatsapp", BSUID)) == 1
    crm.fail = RuntimeError("the crm is down")
    status, body = await erase(gw, WA_ID)
    assert status == 500 and body["linked_ids"] == [BSUID] and "crm" in body["failed"]
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.SINCE"))
    assert await where(gw, "wamid.TEST.IN.BSUID.SINCE") == (
        BSUID, ACCOUNT, f"whatsapp:{ACCOUNT}:{BSUID}")
    kept = crm.events
    await gw.server.close()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.crm]\n")
    crm = plugin.sinks["crm"]  # the restarted gateway's, with what the crm still holds
    crm.events = kept
    assert crm.of(("whatsapp", BSUID)) == 2 and crm.of(("whatsapp", WA_ID)) == 3
    status, body = await erase(gw, WA_ID)
    assert status == 200 and body["linked_ids"] == [BSUID], body
    assert crm.of(("whatsapp", BSUID)) == 0 and crm.of(("whatsapp", WA_ID)) == 0
    assert await gw.sql("SELECT count(*) FROM messages") == [(0,)]
    status, body = await erase(gw, WA_ID)  # finished: the ids are no longer kept together
    assert status == 200 and body["linked_ids"] == [], body


def pair(message_id: str, wa_id: str, bsuid: str, at: int = 1760000000,
         text: str = "hi") -> bytes:
    """One text from ``wa_id`` with ``bsuid`` beside it (the pair is learned from it)."""
    body = json.loads(fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    value = body["entry"][0]["changes"][0]["value"]
    value["contacts"][0].update(wa_id=wa_id, user_id=bsuid)
    value["messages"] = [{"from": wa_id, "from_user_id": bsuid, "id": message_id,
                          "timestamp": str(at), "type": "text", "text": {"body": text}}]
    del body["entry"][0]["changes"][1:]
    return json.dumps(body).encode()


async def test_an_erasure_reaches_one_pair_away_not_a_recycled_numbers_other_owner(gateway):
    """A number once paired with one person's BSUID, later with another's (a recycled number):
    erasing the first BSUID erases it and the number, never the second person's own contact."""
    gw = await start(gateway)
    first, second = "US.1111", "US.2222"
    alone = json.loads(bsuid_only("wamid.TEST.IN.P2.ALONE"))  # the second person, by BSUID alone
    alone["entry"][0]["changes"][0]["value"]["contacts"][0]["user_id"] = second
    alone["entry"][0]["changes"][0]["value"]["messages"][0]["from_user_id"] = second
    await post(gw, json.dumps(alone).encode())
    await post(gw, pair("wamid.TEST.IN.P1", WA_ID, first))
    await post(gw, pair("wamid.TEST.IN.P2", WA_ID, second))
    status, body = await erase(gw, first)
    assert status == 200 and body["linked_ids"] == [WA_ID], body
    assert await gw.sql("SELECT contact_id FROM contacts") == [(second,)]


async def test_a_message_by_bsuid_alone_during_an_erasure_is_not_filed_under_the_number(gateway):
    """The pairs go with the journal's erasure, before the sinks erase: a message naming the
    BSUID alone that arrives while a slow sink erases is its own contact's, not the number's."""
    import asyncio

    from tests.conftest import SINKS_TOML
    from tests.test_erasure import ThirdPartyPlugin

    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.archive]\n")
    archive = plugin.sinks["archive"]
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    gate, erase_contact, erasing = asyncio.Event(), archive.erase_contact, []

    async def slow(channel, contact_id):  # e.g. Firestore deleting in batches of 500
        erasing.append(contact_id)
        await gate.wait()
        return await erase_contact(channel, contact_id)

    archive.erase_contact = slow
    task = asyncio.create_task(erase(gw, WA_ID))
    for _ in range(100):
        if erasing:
            break
        await asyncio.sleep(0.02)
    assert erasing == [WA_ID]
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.DURING"))
    assert await where(gw, "wamid.TEST.IN.BSUID.DURING") == (
        BSUID, ACCOUNT, f"whatsapp:{ACCOUNT}:{BSUID}")
    gate.set()
    status, body = await task
    assert status == 200 and body["linked_ids"] == [BSUID], body


async def test_an_erasure_meanwhile_of_a_new_bsuid_keeps_what_the_failed_ones_repeat_needs(
        gateway):
    """A failed erasure of the number, then the person's new BSUID seen beside it and erased:
    the repeat of the first still reaches the first BSUID (the record of the ids kept together
    only grows, and the second erasure takes out of it only what it erased)."""
    from tests.conftest import SINKS_TOML
    from tests.test_erasure import ThirdPartyPlugin

    plugin = ThirdPartyPlugin()
    gw = await gateway(f'api_token = "{TOKEN}"', extra_plugins=[plugin],
                       sinks=SINKS_TOML + "[sinks.crm]\n")
    crm = plugin.sinks["crm"]
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.ALONE"))  # filed under the BSUID
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    crm.fail = RuntimeError("the crm is down")
    status, body = await erase(gw, WA_ID)
    assert status == 500 and body["linked_ids"] == [BSUID]
    crm.fail = None
    new = "US.99999"  # the person's new BSUID, seen beside the number
    await post(gw, pair("wamid.TEST.IN.NEW", WA_ID, new))
    status, body = await erase(gw, new)
    assert status == 200 and body["linked_ids"] == [WA_ID], body
    status, body = await erase(gw, WA_ID)  # the repeat the first answer asked for
    assert status == 200 and body["linked_ids"] == [BSUID], body
    assert crm.of(("whatsapp", BSUID)) == 0 and crm.events == {}
    status, body = await erase(gw, WA_ID)
    assert status == 200 and body["linked_ids"] == [], body  # nothing kept once all finished


def bsuid_changed(old: str, new: str, message_id: str = "wamid.TEST.IN.SYSTEM.CHANGED") -> bytes:
    """WhatsApp's user_changed_user_id system message (no "from"): ``old`` became ``new``."""
    body = json.loads(fixture_bytes("whatsapp/system_user_changed_user_id.json"))
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    message["id"] = message_id
    message["system"].update(previous_user_id=old, user_id=new,
                             body=f"User changed from {old} to {new}")
    return json.dumps(body).encode()


async def test_a_changed_bsuid_stays_the_customer_the_old_one_was_seen_beside(gateway):
    """user_changed_user_id: the system message and every later message by the new BSUID alone
    are the number's; an erasure of the number takes both BSUIDs. A change of a BSUID never
    paired with a number changes nothing (a person of their own, under the new BSUID)."""
    new = "US.2222"
    gw = await start(gateway)
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    await post(gw, bsuid_changed(BSUID, new))
    assert await where(gw, "wamid.TEST.IN.SYSTEM.CHANGED") == (WA_ID, ACCOUNT, CONVERSATION)
    (event,) = [e for e in gw.jsonl() if e.get("message_id") == "wamid.TEST.IN.SYSTEM.CHANGED"]
    assert event["sender"] == {"id": WA_ID, "user_id": new}
    alone = json.loads(bsuid_only("wamid.TEST.IN.NEW.ALONE"))
    value = alone["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["user_id"] = value["messages"][0]["from_user_id"] = new
    await post(gw, json.dumps(alone).encode())
    assert await where(gw, "wamid.TEST.IN.NEW.ALONE") == (WA_ID, ACCOUNT, CONVERSATION)

    await post(gw, bsuid_changed("US.7777", "US.8888", "wamid.TEST.IN.SYSTEM.UNPAIRED"))
    assert await where(gw, "wamid.TEST.IN.SYSTEM.UNPAIRED") == (
        "US.8888", ACCOUNT, f"whatsapp:{ACCOUNT}:US.8888")

    status, body = await erase(gw, WA_ID)
    assert status == 200 and body["linked_ids"] == [BSUID, new], body
    assert await gw.sql("SELECT contact_id FROM contacts") == [("US.8888",)]


async def test_a_bsuid_changed_in_the_batch_that_pairs_it_follows_its_number(gateway):
    from tests.test_erasure import hold_processor

    gw = await start(gateway)
    gate = hold_processor(gw)
    for body in (fixture_bytes("whatsapp/bsuid_beside_wa_id.json"), bsuid_changed(BSUID, "US.3")):
        assert (await gw.post("whatsapp", body))[0] == 200
    gate.set()  # both requests in one batch: the pair is learned there, then followed
    await gw.settle()
    assert await where(gw, "wamid.TEST.IN.SYSTEM.CHANGED") == (WA_ID, ACCOUNT, CONVERSATION)


async def test_a_batch_resolves_as_its_events_would_one_by_one(gateway):
    """A change of BSUID, then the new BSUID beside another number, then the new BSUID alone,
    all in one batch: the message from the other number stays that number's, and the last one
    follows the latest pair, as they would in three batches (a party with a number of its own
    is never rewritten)."""
    from tests.test_erasure import hold_processor

    other, new = "16315559999", "US.NEW"
    gw = await start(gateway)
    await post(gw, pair("wamid.TEST.IN.OLD", WA_ID, BSUID))
    gate = hold_processor(gw)
    alone = json.loads(bsuid_only("wamid.TEST.IN.NEW.ALONE"))
    value = alone["entry"][0]["changes"][0]["value"]
    value["contacts"][0]["user_id"] = value["messages"][0]["from_user_id"] = new
    for body in (bsuid_changed(BSUID, new), pair("wamid.TEST.IN.OTHER", other, new),
                 json.dumps(alone).encode()):
        assert (await gw.post("whatsapp", body))[0] == 200
    gate.set()
    await gw.settle()
    assert await where(gw, "wamid.TEST.IN.SYSTEM.CHANGED") == (WA_ID, ACCOUNT, CONVERSATION)
    assert await where(gw, "wamid.TEST.IN.OTHER") == (
        other, ACCOUNT, f"whatsapp:{ACCOUNT}:{other}")
    assert await where(gw, "wamid.TEST.IN.NEW.ALONE") == (
        other, ACCOUNT, f"whatsapp:{ACCOUNT}:{other}")


async def test_a_previous_alias_hook_that_raises_is_logged_and_never_stops_processing(
        gateway, monkeypatch):
    from structlog.testing import capture_logs

    from channels.whatsapp import WhatsAppChannel

    def broken(self, event):
        raise KeyError("a plugin's bug")

    monkeypatch.setattr(WhatsAppChannel, "previous_alias", broken)
    gw = await start(gateway)
    with capture_logs() as logs:
        await post(gw, bsuid_changed(BSUID, "US.NEW"))
        await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    assert await where(gw, "wamid.TEST.IN.SYSTEM.CHANGED") == (
        "US.NEW", ACCOUNT, f"whatsapp:{ACCOUNT}:US.NEW")  # as without the hook
    assert await gw.sql("SELECT count(*) FROM messages") == [(4,)]  # 3 messages, 1 status
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["previous_alias_failed"]


async def test_a_change_message_from_a_number_stays_that_numbers(gateway):
    """A user_changed_user_id message that names its sender by a number (``from``): that number
    is the customer; it is never filed under the old BSUID's customer nor made its alias."""
    other = "16315559999"
    gw = await start(gateway)
    await post(gw, fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    body = json.loads(bsuid_changed(BSUID, "US.NEW"))
    body["entry"][0]["changes"][0]["value"]["messages"][0]["from"] = other
    await post(gw, json.dumps(body).encode())
    assert await where(gw, "wamid.TEST.IN.SYSTEM.CHANGED") == (
        other, ACCOUNT, f"whatsapp:{ACCOUNT}:{other}")
    status, body = await erase(gw, WA_ID)
    assert status == 200 and body["linked_ids"] == [BSUID], body  # not the other number
    assert await gw.sql("SELECT contact_id FROM contacts") == [(other,)]
