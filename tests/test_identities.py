"""One customer, one contact (gateway.identities): a WhatsApp customer named by BSUID alone (they
hide their number behind a username) is the customer that BSUID was seen beside, through a
running gateway into the storage and jsonl sinks, across a restart, and until an erasure."""

from __future__ import annotations

import json

from tests.conftest import fixture_bytes

BSUID, WA_ID, ACCOUNT = "US.13491208655302741918", "16315551234", "100000000000001"
TOKEN = "identities-test-token"
CONVERSATION = f"whatsapp:{ACCOUNT}:{WA_ID}"


def bsuid_only(message_id: str) -> bytes:
    """A message naming its sender by BSUID alone (``from_user_id``, no ``from``)."""
    body = json.loads(fixture_bytes("whatsapp/bsuid_only.json"))
    body["entry"][0]["changes"][0]["value"]["messages"][0]["id"] = message_id
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
    assert event["sender"] == {"id": WA_ID, "name": "Kerry Fisher", "user_id": BSUID}
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
