"""Opt-out and opt-in keywords set ``contacts.opted_out`` (CONTRACT §8) in the SQLite storage sink
and in Firestore, by the rule the outbox applies: the latest decision by Meta's timestamp wins, and
a redelivery or a late, older keyword changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway import keys
from gateway.consent import Consent
from gateway.events import Message, Party
from tests.firestore.conftest import firestore_emulator, storage_gateway  # noqa: F401

CUSTOMER = "15557700001"
BASE = 1_760_000_000


def says(text: str, offset: int, customer: str = CUSTOMER) -> bytes:
    return json.dumps({"object": "whatsapp_business_account", "entry": [{
        "id": "190000000000001", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001000",
                         "phone_number_id": "100000000000001"},
            "contacts": [{"profile": {"name": "Consenting"}, "wa_id": customer}],
            "messages": [{"from": customer, "id": f"wamid.CONSENT.{customer}.{offset}",
                          "timestamp": str(BASE + offset), "type": "text",
                          "text": {"body": text}}]}}]}]}).encode()


@pytest.mark.parametrize("backends", ["storage", "storage+firestore"])
async def test_keywords_set_opted_out_in_both_sinks(gateway, request, backends):
    gw = await storage_gateway(gateway, request, backends, "consent")
    sinks = gw.app[keys.SINKS]

    async def opted_out(customer: str = CUSTOMER) -> set[tuple[bool, str | None]]:
        rows = await gw.sql("SELECT opted_out, opted_out_at FROM contacts WHERE id = ?",
                            (f"whatsapp:{customer}",))
        found = {(bool(flag), at) for flag, at in rows}
        if "firestore" in sinks:
            snap = await sinks["firestore"].collection("contacts").document(
                f"whatsapp:{customer}").get()
            doc = snap.to_dict()
            at = doc.get("opted_out_at")
            found.add((doc["opted_out"], None if at is None else
                       at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")))
        return found

    def at(offset: int) -> str:
        return datetime.fromtimestamp(BASE + offset, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    async def post(text: str, offset: int, customer: str = CUSTOMER) -> None:
        assert (await gw.post("whatsapp", says(text, offset, customer)))[0] == 200
        await gw.settle()

    await post("Where is my order?", 0)
    assert await opted_out() == {(False, None)}
    await post("  stop ", 60)  # trimmed, any case
    assert await opted_out() == {(True, at(60))}
    await post("stop sending me the catalogue please", 90)  # not the keyword alone
    assert await opted_out() == {(True, at(60))}
    await post("START", 120)
    assert await opted_out() == {(False, at(120))}
    await post("UNSUBSCRIBE", 30)  # older than the START, delivered late
    assert await opted_out() == {(False, at(120))}
    await post("START", 120)  # a redelivery
    assert await opted_out() == {(False, at(120))}
    await post("STOP", 0, customer="15557700002")  # a first message can opt out at once
    assert await opted_out("15557700002") == {(True, at(0))}


def test_the_rule_reads_only_inbound_messages_whole():
    consent = Consent(["STOP", "Unsubscribe"], ["start"])

    def message(text: str, direction: str = "inbound") -> Message:
        return Message(schema=1, id="x", channel="whatsapp", direction=direction,
                       account_id="a", conversation_id="c", sender=Party("s"),
                       recipient=Party("a"), timestamp=datetime(2026, 1, 1, tzinfo=UTC),
                       type="text", text=text)

    assert consent.of(message("unsubscribe")) is True
    assert consent.of(message(" Start\n")) is False
    assert consent.of(message("stop it")) is None
    assert consent.of(message("STOP", direction="outbound")) is None  # our own echo
