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

    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{WA_ID}",
                                 headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    await post(gw, bsuid_only("wamid.TEST.IN.BSUID.ERASED"))  # the pair went with the contact
    assert await where(gw, "wamid.TEST.IN.BSUID.ERASED") == (
        BSUID, ACCOUNT, f"whatsapp:{ACCOUNT}:{BSUID}")


async def test_a_batch_teaches_the_pair_to_its_own_bsuid_only_events(gateway):
    """The pair and a BSUID-only message in one webhook (the BSUID-only one first)."""
    gw = await start(gateway)
    beside = json.loads(fixture_bytes("whatsapp/bsuid_beside_wa_id.json"))
    alone = json.loads(bsuid_only("wamid.TEST.IN.BSUID.SAME"))
    beside["entry"][0]["changes"].insert(0, alone["entry"][0]["changes"][0])
    await post(gw, json.dumps(beside).encode())
    assert await where(gw, "wamid.TEST.IN.BSUID.SAME") == (WA_ID, ACCOUNT, CONVERSATION)
