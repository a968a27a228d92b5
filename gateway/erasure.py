"""``DELETE /v1/contacts/{channel}/{contact_id}``: erase one contact everywhere (GDPR).

Every sink implementing :meth:`gateway.sink.Sink.erase_contact` deletes what it holds about the
contact (storage, Firestore, the outbox, plugins); a sink answering None keeps no contact data and
is listed under ``not_stored``. The journal forgets the contact's events and dead letters, so no
sink is handed them again. The erasure is recorded in ``<data_dir>/erasures.jsonl`` without the
personal data: the contact id appears only as an HMAC-SHA256 under a secret key
(``server.erasure_audit_key`` / ``GATEWAY_ERASURE_AUDIT_KEY``, or a random key generated once
into ``<data_dir>/erasure-audit.key``), so the line cannot be traced back to a phone number by
hashing them all; ``scripts/erasure-check.py`` answers "was this contact erased?" with the key
(see ``docs/erasure.md``).

Before erasing, the handler waits (at most ``SETTLE_SECONDS``) until what is already journaled has
reached every sink, so that an event received just before the request cannot re-create the data
afterwards; ``settled`` in the answer says whether that wait completed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import keys
from gateway import logging as gwlog
from gateway.auth import check_bearer
from gateway.intake import error
from gateway.journal import contact_matcher

log = gwlog.get("gateway.erasure")
SETTLE_SECONDS = 5.0
BATCH_WAIT_SECONDS = 30.0  # for the processor's batch in progress, before erasing the journal
AUDIT_FILE = "erasures.jsonl"
KEY_FILE = "erasure-audit.key"  # generated once when server.erasure_audit_key is not set
KEY_ID_MESSAGE = b"erasure-audit-key-id"  # HMAC'd to tell keys apart without revealing them


def routes() -> list[web.RouteDef]:
    return [web.delete("/v1/contacts/{channel}/{contact_id}", erase)]


def contact_hmac(key: bytes, contact_id: str) -> str:
    """What the audit log keeps instead of the contact id: HMAC-SHA256 under the audit key, hex.

    Without the key nobody can test a guessed phone number against it (a plain hash of the id
    could be reversed by hashing every number)."""
    return hmac.new(key, contact_id.encode("utf-8"), hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short public fingerprint of the audit key: which key an audit line was made with."""
    return hmac.new(key, KEY_ID_MESSAGE, hashlib.sha256).hexdigest()[:16]


def audit_key(configured: str | None, data_dir: str) -> bytes:
    """The HMAC key: ``server.erasure_audit_key`` when set, else the key in
    ``<data_dir>/erasure-audit.key``, generated on first use (32 random bytes as 64 hex digits,
    mode 0600). Either way the key is the text, stripped, as UTF-8.

    Raises:
        OSError: the key file cannot be read or created, or is empty.
    """
    if configured and configured.strip():
        return configured.strip().encode("utf-8")
    path = os.path.join(data_dir, KEY_FILE)
    if not os.path.exists(path):
        _create_key_file(data_dir, path)
    with open(path, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        key = handle.read().strip()
    if not key:
        raise OSError(errno.EINVAL, "the erasure audit key file is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("erasure_audit_key_readable", detail=f"{KEY_FILE} is readable by others "
                    "than its owner: chmod 600 it")
    return key


def _create_key_file(data_dir: str, path: str) -> None:
    """Write a new random key to ``path`` atomically, never replacing one that exists (two
    erasures at once: the first link wins, both use that key)."""
    os.makedirs(data_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=data_dir)  # mode 0600
    try:
        os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("erasure_audit_key_created", detail=f"{KEY_FILE} in the data directory: back "
                 "it up, or set server.erasure_audit_key (GATEWAY_ERASURE_AUDIT_KEY)")
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


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
        server = app[keys.CONFIG].server
        await asyncio.to_thread(_audit, server.data_dir, server.erasure_audit_key, channel,
                                contact_id, result)
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
    """Erase from the journal, then from every sink (concurrently); counts per sink.

    The journal goes first, between two of the processor's batches: from then on no sink is
    handed the contact's events again (not from the journal, nor from memory, nor by a retry),
    and the requests still waiting to be processed yield none of the contact's events. A sink
    erased first could be refilled by its worker while the others erase.

    The person's other ids are erased with ``contact_id`` (``linked_ids``: a WhatsApp customer's
    BSUID and wa_id, :mod:`gateway.identities`); the counts are their sums."""
    out: dict[str, Any] = {"erasure_id": f"era_{uuid.uuid4().hex}", "erased": {},
                           "not_stored": [], "failed": {}, "journal": None, "warnings": [],
                           "linked_ids": []}
    processor = app.get(keys.PROCESSOR)
    lock = processor.batch_lock if processor is not None else asyncio.Lock()
    ids = [contact_id]
    try:
        await asyncio.wait_for(lock.acquire(), BATCH_WAIT_SECONDS)
    except TimeoutError:  # a batch stuck on its journal (an outage): the journal is not erased
        out["failed"]["journal"] = (f"TimeoutError: the processor's batch did not finish within "
                                    f"{BATCH_WAIT_SECONDS:g} s")
    else:
        try:
            if processor is not None:
                out["linked_ids"] = await processor.identities.linked(channel, contact_id)
                ids += out["linked_ids"]
            await _erase_journal(app, channel, ids, out)
            if processor is not None:  # no event is filed under these ids by an alias from now
                await processor.identities.retire(channel, ids)
        except Exception as exc:  # noqa: BLE001 - reported like a sink's failure
            out["failed"].setdefault("journal", f"{type(exc).__name__}: {exc}")
        finally:
            lock.release()
    sinks = app[keys.SINKS]
    for one in ids:
        results = await asyncio.gather(*(s.erase_contact(channel, one) for s in sinks.values()),
                                       return_exceptions=True)
        for name, found in zip(sinks, results, strict=True):
            if isinstance(found, BaseException):
                log.error("erasure_failed", sink=name, error=type(found).__name__)
                out["failed"].setdefault(name, f"{type(found).__name__}: {found}")
            elif found is None:
                if name not in out["not_stored"]:
                    out["not_stored"].append(name)
            else:
                out["erased"][name] = _summed(out["erased"].get(name), found)
    if processor is not None and not out["failed"]:  # else a repeat still finds the linked ids
        try:
            await processor.identities.forget(channel, ids)
        except Exception as exc:  # noqa: BLE001 - reported; the repeat forgets them
            out["failed"].setdefault("journal", f"{type(exc).__name__}: {exc}")
    return out


def _summed(counts: dict[str, int] | None, more: dict[str, int]) -> dict[str, int]:
    if counts is None:
        return dict(more)
    return {k: counts.get(k, 0) + more.get(k, 0) for k in {*counts, *more}}


async def _erase_journal(app: web.Application, channel: str, contact_ids: list[str],
                         out: dict[str, Any]) -> None:
    journal = app.get(keys.JOURNAL)
    eraser = getattr(journal, "erase_contact", None)
    if eraser is None:
        out["warnings"].append(f"the {type(journal).__name__} cannot erase events: they leave it "
                               "with its retention")
        return
    try:  # one pass over the journal for all the person's ids
        out["journal"] = await eraser(channel, *contact_ids)
    except Exception as exc:  # noqa: BLE001 - reported like a sink's failure
        out["failed"].setdefault("journal", f"{type(exc).__name__}: {exc}")
        return
    # nor may the dispatcher's memory of recent events hand them to a lagging sink
    dispatcher = app.get(keys.DISPATCHER)
    if dispatcher is not None:
        dispatcher.forget(contact_matcher(channel, *contact_ids))


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


def _audit(data_dir: str, configured_key: str | None, channel: str, contact_id: str,
           result: dict[str, Any]) -> None:
    """Append one line to ``erasures.jsonl``: no contact id, no message content, no error text."""
    key = audit_key(configured_key, data_dir)
    line = {
        "erasure_id": result["erasure_id"],
        "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "channel": channel,
        "contact_hmac": contact_hmac(key, contact_id),
        "linked_hmacs": [contact_hmac(key, one) for one in result.get("linked_ids", [])],
        "key_id": key_id(key),
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
