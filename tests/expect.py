"""Comparing canonical events (as JSON dicts) with the fixtures' expectations."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

DATA = Path(__file__).parent / "data"
SKIP = {"covers", "identity", "conversation", "extra", "note"}


def expected_files() -> dict[str, dict]:
    """expected.json merged with expected_extra.json (cases added by this project)."""
    files = json.loads((DATA / "expected.json").read_text())["files"]
    extra = DATA / "expected_extra.json"
    if extra.exists():
        files.update(json.loads(extra.read_text())["files"])
    return files


EDITS = ("edit", "message_edit")  # raw_type of an edit (sinks.storage.schema.EDITS)


def stored_as(event: dict) -> dict:
    """An expected message event as the storage sinks keep it: an edit that came before its
    original stands in for it, under the original's id (``reply_to``), replying to nothing."""
    if event.get("raw_type") in EDITS and event.get("reply_to") and event.get("message_id"):
        return {**event, "message_id": event["reply_to"], "reply_to": None, "raw_type": None}
    return event


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def matches(actual: dict, want: dict) -> list[str]:
    """The differences between an event dict and one expectation ([] when it matches)."""
    problems = []
    for key, value in want.items():
        if key in SKIP:
            continue
        got = actual.get(key)
        if key == "timestamp" and value is not None:
            if got is None or instant(got) != instant(value):
                problems.append(f"timestamp {got!r} != {value!r}")
        elif value is None:
            if got not in (None, ""):
                problems.append(f"{key} should be absent, got {got!r}")
        elif isinstance(value, dict):
            for sub, subvalue in value.items():
                have = (got or {}).get(sub)
                if ((subvalue is None and have is not None)
                        or (subvalue is not None and have != subvalue)):
                    problems.append(f"{key}.{sub} {have!r} != {subvalue!r}")
        elif got != value:
            problems.append(f"{key} {got!r} != {value!r}")
    return problems


def pair_up(actual: list[dict], wanted: list[dict]) -> list[tuple[dict, dict]]:
    """Match each expectation to a distinct actual event (order is not asserted)."""
    left = list(actual)
    pairs = []
    for want in wanted:
        found = next((a for a in left if not matches(a, want)), None)
        if found is None:
            close = [matches(a, want) for a in left if a.get("kind") == want.get("kind")]
            raise AssertionError(f"no event matches {want}: {close}")
        left.remove(found)
        pairs.append((found, want))
    return pairs


def as_stored(wanted: list[dict], events: list[dict]) -> list[dict]:
    """A fixture's expected message events as the storage sinks keep them, ``events`` being what
    the fixture gave (they say which are edits): an edit of a message of the same fixture
    rewrites that one's content and has no row of its own; an edit or unsend of one the fixture
    lacks stands in for it, under its id, replying to nothing, with no timestamp until the
    original comes."""
    pairs = pair_up(events, [w for w in wanted if w["kind"] in ("message", "postback")])
    originals = {actual["message_id"]: i for i, (actual, _) in enumerate(pairs)
                 if stored_as(actual) is actual and actual.get("message_id")}
    sent = {actual.get("message_id") for actual, _ in pairs if actual.get("type") != "deleted"}
    kept: list[dict | None] = [want for _, want in pairs]
    for i, (actual, want) in enumerate(pairs):
        if stored_as(actual) is actual:
            if actual.get("type") == "deleted" and actual.get("message_id") not in sent:
                kept[i] = {**want, "timestamp": None}  # a stand-in for its original
            continue
        j = originals.get(actual["reply_to"])
        if j is None:
            kept[i] = {**want, "message_id": actual["reply_to"], "reply_to": None,
                       "raw_type": None, "timestamp": None}
            continue
        kept[j] = {**kept[j], **{k: want.get(k) for k in ("type", "text", "payload", "media")}}
        kept[i] = None
    return [w for w in kept if w is not None]
