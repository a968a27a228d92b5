"""``DELETE /v1/contacts/{channel}/{contact_id}``: erase one contact everywhere (GDPR).

Every sink implementing :meth:`gateway.sink.Sink.erase_contact` deletes what it holds about the
contact (storage, Firestore, the outbox, plugins); a sink answering None keeps no contact data and
is listed under ``not_stored``. The journal forgets the contact's events and dead letters, so no
sink is handed them again. The erasure is recorded in ``<data_dir>/erasures.jsonl`` without the
personal data: the contact id appears only as its SHA-256 (see ``docs/erasure.md``).

Before erasing, the handler waits (at most ``SETTLE_SECONDS``) until what is already journaled has
reached every sink, so that an event received just before the request cannot re-create the data
afterwards; ``settled`` in the answer says whether that wait completed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import keys
from gateway import logging as gwlog
from gateway.auth import check_bearer
from gateway.intake import error

log = gwlog.get("gateway.erasure")
SETTLE_SECONDS = 5.0
AUDIT_FILE = "erasures.jsonl"


def routes() -> list[web.RouteDef]:
    return [web.delete("/v1/contacts/{channel}/{contact_id}", erase)]


def contact_hash(contact_id: str) -> str:
    """What the audit log keeps instead of the contact id: plain SHA-256, hex."""
    return hashlib.sha256(contact_id.encode("utf-8")).hexdigest()


async def erase(request: web.Request) -> web.Response:
    """Erase a contact from every sink and the journal; 200 with what was removed."""
    refused = check_bearer(request)
    if refused is not None:
        return refused
    app = request.app
    channel, contact_id = request.match_info["channel"], request.match_info["contact_id"]
    if channel not in app[keys.CHANNELS]:
        return error(404, "unknown_channel", f"no enabled channel is named {channel!r}")
    settled = await _settle(app, SETTLE_SECONDS)
    result = await erase_contact(app, channel, contact_id)
    result["settled"] = settled
    try:
        await asyncio.to_thread(_audit, app[keys.CONFIG].server.data_dir, channel, contact_id,
                                result)
    except OSError as exc:  # erased, but not recorded: say so (and never log the path)
        result["failed"]["audit"] = f"{type(exc).__name__}: {exc.strerror}"
    log.info("contact_erased", channel=channel, erasure_id=result["erasure_id"],
             sinks=sorted(result["erased"]), failed=sorted(result["failed"]))
    body = {"channel": channel, "contact_id": contact_id, **result}
    if result["failed"]:
        body["error"] = {"code": "erasure_incomplete",
                         "message": "some sinks could not erase; repeat the request (it is "
                                    "idempotent): " + ", ".join(sorted(result["failed"]))}
        return web.json_response(body, status=500)
    return web.json_response(body)


async def erase_contact(app: web.Application, channel: str, contact_id: str) -> dict[str, Any]:
    """Erase from every sink (concurrently) and the journal; counts per sink."""
    sinks = app[keys.SINKS]
    results = await asyncio.gather(*(s.erase_contact(channel, contact_id) for s in sinks.values()),
                                   return_exceptions=True)
    out: dict[str, Any] = {"erasure_id": f"era_{uuid.uuid4().hex}", "erased": {},
                           "not_stored": [], "failed": {}, "journal": None, "warnings": []}
    for name, found in zip(sinks, results, strict=True):
        if isinstance(found, BaseException):
            log.error("erasure_failed", sink=name, error=type(found).__name__)
            out["failed"][name] = f"{type(found).__name__}: {found}"
        elif found is None:
            out["not_stored"].append(name)
        else:
            out["erased"][name] = found
    journal = app.get(keys.JOURNAL)
    eraser = getattr(journal, "erase_contact", None)
    if eraser is None:
        out["warnings"].append(f"the {type(journal).__name__} cannot erase events: they leave it "
                               "with its retention")
    else:
        try:
            out["journal"] = await eraser(channel, contact_id)
        except Exception as exc:  # noqa: BLE001 - reported like a sink's failure
            out["failed"]["journal"] = f"{type(exc).__name__}: {exc}"
    if "jsonl" in out["not_stored"]:
        out["warnings"].append("the jsonl sink is an append-only log: purge it as docs/erasure.md "
                               "describes (scripts/purge-jsonl.py)")
    return out


async def _settle(app: web.Application, timeout: float) -> bool:
    """Wait until the journal is processed and every sink caught up (False after ``timeout``)."""
    journal, dispatcher = app.get(keys.JOURNAL), app.get(keys.DISPATCHER)
    if journal is None or dispatcher is None:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if journal.pending == 0 and await dispatcher.caught_up():
            return True
        processor = app.get(keys.PROCESSOR)
        if processor is not None:
            processor.wake.set()
        await asyncio.sleep(0.05)
    return False


def _audit(data_dir: str, channel: str, contact_id: str, result: dict[str, Any]) -> None:
    """Append one line to ``erasures.jsonl``: no contact id, no message content, no error text."""
    line = {
        "erasure_id": result["erasure_id"],
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "channel": channel,
        "contact_sha256": contact_hash(contact_id),
        "erased": result["erased"],
        "journal": result["journal"],
        "not_stored": result["not_stored"],
        "failed": {name: reason.split(":", 1)[0] for name, reason in result["failed"].items()},
        "settled": result["settled"],
    }
    os.makedirs(data_dir, exist_ok=True)
    fd = os.open(os.path.join(data_dir, AUDIT_FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, json.dumps(line, sort_keys=True).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
