"""The Firestore sink, on firebase-admin's async Firestore client (CONTRACT §8).

How a batch from the dispatcher is written:

1. One read: ``get_all`` (chunks of 500, concurrently) of the conversations and contacts the
   batch touches and of the messages its statuses, reads, reactions, unsends and edits refer to.
   A new message's own document is not read: it is created with an ``exists = false``
   precondition.
2. Events are grouped into conversation lanes (in order). A lane longer than one commit is cut
   into consecutive chunks; chunk *n* of every lane forms round *n*, and rounds run one after the
   other, so a conversation's events are written in order.
3. Within a round, chunks are packed into write batches of at most 500 operations (Firestore's
   limit) — many small conversations share one commit — and the batches commit concurrently.
4. Every write carries a precondition on what was read: ``create`` (the document must not exist)
   or an update conditioned on the document's ``update_time``. Values are computed from the
   documents as read (``model.Plan``), so a concurrent writer (another replica, an erasure, a
   concurrent retry, a message that existed after all) makes the commit fail as a whole with
   ALREADY_EXISTS / FAILED_PRECONDITION / NOT_FOUND instead of losing an update; the sink then
   re-reads that batch's documents and recomputes (optimistic
   concurrency, no transaction round trips). A message is therefore counted once, a status never
   moves backwards and ``first_seen`` keeps the minimum under redelivery, crash replay and
   concurrency. A redelivered batch changes nothing and sends no write at all.

Errors: UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED, INTERNAL (and transport
errors) raise :class:`RetryableError`; PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT,
NOT_FOUND (outside a commit: no such database) and a FAILED_PRECONDITION that is not a version
mismatch raise :class:`PermanentError` — the dispatcher retries the former with backoff and
dead-letters the latter with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

from gateway import logging as gwlog
from gateway.config import SinkConfig
from gateway.consent import Consent
from gateway.errors import ConfigError, PermanentError, RetryableError
from gateway.events import Event
from gateway.sink import Record, Sink
from sinks.firestore.model import (
    CONTACTS,
    CONVERSATIONS,
    DELETE,
    MESSAGES,
    Change,
    Key,
    Plan,
    doc_id,
    keys_of,
    keys_to_read,
)

log = gwlog.get("sinks.firestore")
MAX_OPS = 500  # writes per commit: Firestore's limit for a batched write
READ_CHUNK = 500  # documents per BatchGetDocuments call
CONFLICT_ATTEMPTS = 8  # re-read and recompute this often before handing back to the dispatcher
_apps = itertools.count(1)
State = dict[Key, tuple[dict[str, Any] | None, Any]]  # document -> (data or None, update_time)


class FirestoreConfig(SinkConfig):
    """``[sinks.firestore]``.

    Attributes:
        project_id: the Google Cloud project.
        credentials: path of a service-account JSON file; empty: Application Default Credentials.
        database: a named Firestore database; empty: ``(default)``.
        collection_prefix: prepended to ``contacts``, ``conversations``, ``messages``.
        emulator_host: ``host:port`` of a Firestore emulator (no credentials needed); empty: the
            ``FIRESTORE_EMULATOR_HOST`` environment variable when set.
        concurrency: commits in flight at once.
        timeout: seconds for one read or commit call.
        retry_seconds: how long the client itself retries a transient error (UNAVAILABLE, ...)
            before the dispatcher's backoff takes over; 0 leaves every retry to the dispatcher.
    """

    project_id: str = ""
    credentials: str | None = None
    database: str | None = None
    collection_prefix: str = ""
    emulator_host: str | None = None
    concurrency: int = 16
    timeout: float = 30.0
    retry_seconds: float = 10.0

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if not self.project_id:
            raise ConfigError("required: the Google Cloud project id", f"{prefix}.project_id")
        if "/" in self.collection_prefix:
            raise ConfigError("must not contain '/'", f"{prefix}.collection_prefix")
        if self.concurrency < 1:
            raise ConfigError("must be at least 1", f"{prefix}.concurrency")
        if self.timeout <= 0 or self.retry_seconds < 0:
            raise ConfigError("must be positive", f"{prefix}.timeout" if self.timeout <= 0
                              else f"{prefix}.retry_seconds")
        if self.credentials and not os.path.isfile(self.credentials):
            raise ConfigError(f"no such file: {self.credentials!r}", f"{prefix}.credentials")


def classify(exc: BaseException) -> BaseException:
    """Map a Firestore / transport error onto the gateway's Retryable / Permanent split."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(exc, RetryableError | PermanentError):
        return exc
    retryable = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted,
                 gexc.TooManyRequests, gexc.InternalServerError, gexc.GatewayTimeout,
                 gexc.Cancelled, gexc.Unknown, gexc.RetryError, auth_exc.TransportError,
                 ConnectionError, TimeoutError)
    if isinstance(exc, retryable):
        return RetryableError(f"Firestore {type(exc).__name__}: {exc}")
    if isinstance(exc, gexc.GoogleAPICallError | auth_exc.GoogleAuthError | ValueError | TypeError):
        return PermanentError(f"Firestore {type(exc).__name__}: {exc}")
    return exc


def _gave_up(exc: BaseException | None) -> BaseException:
    """What to raise when re-reading did not get a commit through ``CONFLICT_ATTEMPTS`` times:
    contention (retry later), unless the precondition failure is not about versions at all."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.FailedPrecondition) and "version" not in str(exc):
        return PermanentError(f"Firestore FailedPrecondition: {exc}")
    return RetryableError(f"Firestore: documents kept changing under {CONFLICT_ATTEMPTS} "
                          f"attempts (contention): {exc}")


class FirestoreSink(Sink):
    """Writes the three collections of CONTRACT §8 to Cloud Firestore."""

    name = "firestore"

    def __init__(self, config: FirestoreConfig, consent: Consent | None = None) -> None:
        super().__init__(config)
        self.config: FirestoreConfig = config
        self.consent = consent
        self.client: Any = None
        self.app: Any = None
        self.retry: Any = None
        self.fast = False  # writes encoded by sinks.firestore.wire (checked at start)
        self.commits = 0  # commits sent (tests and the benchmark read it)
        self.largest_commit = 0

    def collection(self, name: str) -> Any:
        """A collection (``contacts``, ``conversations``, ``messages``) with the prefix."""
        return self.client.collection(f"{self.config.collection_prefix}{name}")

    def ref(self, key: Key) -> Any:
        return self.collection(key.collection).document(key.id)

    async def start(self) -> None:
        import firebase_admin
        from firebase_admin import firestore_async

        emulator = self.config.emulator_host or os.environ.get("FIRESTORE_EMULATOR_HOST")
        self.app = firebase_admin.initialize_app(
            _credential(self.config, emulator), {"projectId": self.config.project_id},
            name=f"gateway-firestore-{os.getpid()}-{next(_apps)}")
        with _emulator_env(emulator):  # the client reads the variable once, when it is built
            self.client = firestore_async.client(self.app, self.config.database or None)
        self.retry = _retry(self.config.retry_seconds)
        self.fast = _fast_writes_work(self.client, self.collection(CONTACTS).document("_probe"))
        if not self.fast:
            log.warning("firestore_fast_writes_off", detail="this google-cloud-firestore encodes "
                        "writes differently: using its public API (slower)")
        log.info("firestore_started", project=self.config.project_id,
                 database=self.config.database or "(default)", emulator=emulator or None)

    async def close(self) -> None:
        import firebase_admin

        api = getattr(self.client, "_firestore_api_internal", None)
        if api is not None:  # the grpc.aio channel: close it on the loop that opened it
            with contextlib.suppress(Exception):
                await api.transport.close()
        if self.app is not None:
            firebase_admin.delete_app(self.app)
            self.app = None

    async def ready(self) -> bool:
        """One document read (absent or not, it proves the database answers)."""
        try:
            await asyncio.wait_for(self.collection(CONTACTS).document("_ready").get(
                retry=None, timeout=2.0), timeout=2.5)
            return True
        except Exception:  # noqa: BLE001 - readiness is a yes/no question
            return False

    async def write(self, records: list[Record]) -> None:
        try:
            await self.write_events([r.event for r in records])
        except Exception as exc:  # noqa: BLE001 - classified for the dispatcher
            raise classify(exc) from exc

    async def write_events(self, events: list[Event]) -> None:
        """Apply ``events`` (each conversation's in order) with as few commits as possible."""
        state: State = {k: (None, None) for ev in events for k in keys_of(ev)}
        state.update(await self._read({k for ev in events for k in keys_to_read(ev)}))
        gate = asyncio.Semaphore(self.config.concurrency)

        async def commit(pack: list[Event]) -> None:
            async with gate:
                await self._commit(pack, state)

        for round_events in _rounds(events):
            await asyncio.gather(*(commit(pack) for pack in _packs(round_events)))

    async def _read(self, keys: set[Key]) -> State:
        refs = {self.ref(k).path: k for k in keys}
        state: State = {k: (None, None) for k in keys}
        paths = list(refs)

        async def chunk(part: list[str]) -> None:
            async for snap in self.client.get_all([self.ref(refs[p]) for p in part],
                                                  retry=self.retry, timeout=self.config.timeout):
                if snap.exists:
                    state[refs[snap.reference.path]] = (snap.to_dict(), snap.update_time)

        await asyncio.gather(*(chunk(paths[i:i + READ_CHUNK])
                               for i in range(0, len(paths), READ_CHUNK)))
        return state

    async def _commit(self, events: list[Event], state: State) -> None:
        """Write one pack atomically; on a lost race re-read its documents and recompute."""
        from google.api_core import exceptions as gexc

        keys = {k for ev in events for k in keys_of(ev)}
        last: BaseException | None = None
        for _ in range(CONFLICT_ATTEMPTS):
            plan = Plan({k: state[k][0] for k in keys}, self.consent)
            for ev in events:
                plan.apply(ev)
            changes = plan.changes()
            if not changes:
                return
            try:
                results = await self._send(changes, state)
            except (gexc.AlreadyExists, gexc.FailedPrecondition, gexc.NotFound) as exc:
                # One of our preconditions failed (a create of a document that exists, an update
                # of one that changed or was deleted): someone wrote in between. Nothing of this
                # commit was applied; read again and recompute.
                log.info("firestore_conflict", documents=len(changes), error=type(exc).__name__)
                last = exc
                state.update(await self._read(keys))
                continue
            for change, result in zip(changes, results, strict=True):
                state[change.key] = (plan.docs[change.key], result.update_time)
            return
        raise _gave_up(last)

    async def _send(self, changes: list[Change], state: State) -> list[Any]:
        batch = self.client.batch()
        if self.fast:
            from sinks.firestore import wire

            batch._add_write_pbs([wire.encode(c, self.ref(c.key)._document_path, state[c.key][1])
                                  for c in changes])
        else:
            _add_public(self.client, batch, [(self.ref(c.key), c, state[c.key][1])
                                             for c in changes])
        results = await batch.commit(retry=self.retry, timeout=self.config.timeout)
        self.commits += 1
        self.largest_commit = max(self.largest_commit, len(changes))
        return results

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """Delete the contact, their conversations and every message in them (GDPR).

        Uses the queries ``conversations where channel == X and contact_id == Y`` and
        ``messages where conversation_id == Z`` (see ``sinks/firestore/indexes.json``).

        A message is found only through its conversation's document, so the deletes go in this
        order, in commits of ``MAX_OPS`` sent one after the other: every message, then the
        conversations, then the contact. When a commit fails (the erasure is then reported
        incomplete), what it and the later ones would have deleted is still reachable — no
        conversation is gone while one of its messages is left — and a repeated erasure
        finishes the job. (A conversation may share a commit with the last messages: a commit
        is applied whole or not at all.)
        """
        from google.cloud.firestore_v1.base_query import FieldFilter

        try:
            convs = (self.collection(CONVERSATIONS)
                     .where(filter=FieldFilter("channel", "==", channel))
                     .where(filter=FieldFilter("contact_id", "==", contact_id)))
            conversations: list[Any] = []
            messages: list[Any] = []
            opts = {"retry": self.retry, "timeout": self.config.timeout}
            async for conv in convs.stream(**opts):
                conversations.append(conv.reference)
                query = self.collection(MESSAGES).where(
                    filter=FieldFilter("conversation_id", "==", conv.id))
                async for message in query.select([]).stream(**opts):
                    messages.append(message.reference)
            contact = self.collection(CONTACTS).document(doc_id(f"{channel}:{contact_id}"))
            contacts = [contact] if (await contact.get(**opts)).exists else []
            doomed = [*messages, *conversations, *contacts]  # the order matters: see above
            for start in range(0, len(doomed), MAX_OPS):
                batch = self.client.batch()
                for ref in doomed[start:start + MAX_OPS]:
                    batch.delete(ref)
                await batch.commit(**opts)
        except Exception as exc:  # noqa: BLE001 - the erasure endpoint reports the class
            raise classify(exc) from exc
        return {"contacts": len(contacts), "conversations": len(conversations),
                "messages": len(messages)}


def _rounds(events: list[Event]) -> Iterator[list[Event]]:
    """Round *n*: chunk *n* of every conversation lane, each chunk at most ``MAX_OPS`` writes."""
    lanes: dict[str, list[list[Event]]] = {}
    sizes: dict[str, set[Key]] = {}
    for ev in events:
        chunks = lanes.setdefault(ev.conversation_id, [[]])
        touched = sizes.setdefault(ev.conversation_id, set())
        keys = set(keys_of(ev))
        if chunks[-1] and len(touched | keys) > MAX_OPS:
            chunks.append([])
            touched.clear()
        chunks[-1].append(ev)
        touched |= keys
    depth = max((len(c) for c in lanes.values()), default=0)
    for n in range(depth):
        yield [ev for chunks in lanes.values() if n < len(chunks) for ev in chunks[n]]


def _packs(events: list[Event]) -> Iterator[list[Event]]:
    """Whole conversations packed into commits of at most ``MAX_OPS`` distinct documents."""
    lanes: dict[str, list[Event]] = {}
    for ev in events:
        lanes.setdefault(ev.conversation_id, []).append(ev)
    pack: list[Event] = []
    keys: set[Key] = set()
    for lane in lanes.values():
        lane_keys = {k for ev in lane for k in keys_of(ev)}
        if pack and len(keys | lane_keys) > MAX_OPS:
            yield pack
            pack, keys = [], set()
        pack.extend(lane)
        keys |= lane_keys
    if pack:
        yield pack


def _add_public(client: Any, batch: Any, writes: list[tuple[Any, Change, Any]]) -> None:
    """The same writes through the client's public API."""
    from google.cloud.firestore_v1 import DELETE_FIELD

    for ref, change, update_time in writes:
        if change.create:
            batch.create(ref, change.fields)
            continue
        fields = {k: DELETE_FIELD if v is DELETE else v for k, v in change.fields.items()}
        batch.update(ref, fields, option=client.write_option(last_update_time=update_time))


def _fast_writes_work(client: Any, ref: Any) -> bool:
    from proto.datetime_helpers import DatetimeWithNanoseconds  # what snapshots carry

    from sinks.firestore import wire

    stamp = DatetimeWithNanoseconds.from_rfc3339("2025-10-09T08:53:20.123456Z")
    return wire.self_test(client.batch(), ref, stamp)


def _retry(seconds: float) -> Any:
    """The client's own short retry of transient errors (None: the dispatcher retries)."""
    if seconds <= 0:
        return None
    from google.api_core import exceptions as gexc
    from google.api_core.retry import AsyncRetry, if_exception_type

    return AsyncRetry(predicate=if_exception_type(
        gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.ResourceExhausted,
        gexc.InternalServerError, gexc.Aborted), initial=0.1, maximum=2.0, multiplier=2.0,
        timeout=seconds)


@contextlib.contextmanager
def _emulator_env(host: str | None) -> Iterator[None]:
    """Point the client being built at ``host`` without changing the process for good."""
    if not host:
        yield
        return
    before = os.environ.get("FIRESTORE_EMULATOR_HOST")
    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)
        else:
            os.environ["FIRESTORE_EMULATOR_HOST"] = before


def _credential(config: FirestoreConfig, emulator: str | None) -> Any:
    """A service-account file, Application Default Credentials, or — for the emulator, which
    needs none but firebase-admin wants one anyway — an anonymous credential."""
    from firebase_admin import credentials

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        class Anonymous(credentials.Base):
            """firebase-admin credential shim around ``google.auth``'s AnonymousCredentials."""

            def get_credential(self) -> Any:
                return AnonymousCredentials()

        return Anonymous()
    if config.credentials:
        return credentials.Certificate(config.credentials)
    return credentials.ApplicationDefault()
