"""The WhatsApp normaliser's one-pass decode gives exactly what the tolerant path gives, and a body
with a malformed item falls back to the tolerant path without losing the well-formed items."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from channels.whatsapp import normalise as wn
from channels.whatsapp import schemas

DATA = Path(__file__).parent / "data" / "whatsapp"
FIXTURES = sorted(DATA.glob("*.json"))


def takes_fast_path(body: bytes) -> bool:
    try:
        schemas.fast_decoder.decode(body)
    except msgspec.DecodeError:
        return False
    return True


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_fast_and_tolerant_paths_agree(path):
    body = path.read_bytes()
    assert wn.normalise(body) == wn._tolerant(body)


def test_well_formed_fixtures_take_the_fast_path():
    fast = [p.name for p in FIXTURES if takes_fast_path(p.read_bytes())]
    assert len(fast) >= len(FIXTURES) - 3, f"only {fast} decode in one pass"


def test_one_malformed_item_falls_back_and_keeps_the_rest():
    body = json.loads((DATA / "three_messages.json").read_bytes())
    messages = body["entry"][0]["changes"][0]["value"]["messages"]
    expected = [e for e in wn.normalise(json.dumps(body).encode())
                if e.message_id != messages[1]["id"]]
    messages[1]["timestamp"] = {"not": "a timestamp"}  # fails the typed decode
    broken = json.dumps(body).encode()
    assert not takes_fast_path(broken)
    assert wn.normalise(broken) == expected and len(expected) == 2


def test_numbers_in_unread_fields_and_timestamps_keep_the_fast_path():
    """``display_phone_number`` is not declared (never read) and a timestamp may be a JSON float,
    so ``numeric_fields.json`` decodes in one pass. Before, either one failed the typed decode."""
    body = (DATA / "numeric_fields.json").read_bytes()
    assert takes_fast_path(body)
    assert [e.message_id for e in wn.normalise(body)] == [
        "wamid.TEST.IN.NUMERIC.0001", "wamid.TEST.IN.NUMERIC.0002", "wamid.TEST.OUT.NUMERIC.0001"]


def test_odd_optional_fields_keep_the_fast_path_and_a_malformed_list_leaves_it():
    """Fields no event needs are read as whatever JSON came, so a body with odd ones
    (``odd_optional_fields.json``) still decodes in one pass, each of its items an event; a list
    that is not one (``malformed_lists.json``) fails the one-pass decode, and the tolerant path
    keeps every valid item beside it. Before, an odd optional field failed the one-pass decode
    too, and then the decode of its item."""
    odd = (DATA / "odd_optional_fields.json").read_bytes()
    assert takes_fast_path(odd)
    assert [e.message_id for e in wn.normalise(odd)] == [
        "wamid.TEST.IN.ODD.0001", "wamid.TEST.IN.ODD.0002", "wamid.TEST.OUT.ODD.0001",
        "wamid.TEST.OUT.ODD.0002"]
    malformed = (DATA / "malformed_lists.json").read_bytes()
    assert not takes_fast_path(malformed)
    assert [e.message_id for e in wn.normalise(malformed)] == [
        "wamid.TEST.IN.MALFORMED.0001", "wamid.TEST.OUT.MALFORMED.0001",
        "wamid.TEST.OUT.MALFORMED.0002", "wamid.TEST.IN.MALFORMED.0002",
        "wamid.TEST.IN.MALFORMED.0003"]
