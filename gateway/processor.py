"""Turns journaled raw requests into de-duplicated canonical events, after the ack.

One batch of requests becomes one transaction: the new events are stored, the requests are
dropped and the processed position moves together, so a crash replays a batch whole or not at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gateway import logging as gwlog
from gateway.aio import wait_event
from gateway.consent import MARKETING
from gateway.errors import BadPayload
from gateway.events import MESSAGE_TYPES, Event, Notice, encode
from gateway.identities import Identities
from gateway.journal import NewEvent, RawRequest, contact_matcher
from gateway.sink import Record

if TYPE_CHECKING:
    from gateway.channel import Channel
    from gateway.dispatch import Dispatcher
    from gateway.journal import Journal
    from gateway.metrics import Metrics

log = gwlog.get("gateway.processor")
RETRY_MAX = 5.0  # a processor whose journal fails retries at least this often
# gateway_events_total's ``type`` label: CONTRACT §5's message types, the preference category;
# any other (a plugin channel's own word) counts as "other", so the label stays bounded
LABEL_TYPES = frozenset({"", *MESSAGE_TYPES, MARKETING})
REPLAY_CHECK_SECONDS = 1.0  # how often replays of raw requests (normalise:*) are looked for
REPLAY_LEASE_MS = 10_000  # a shared journal: one replica at a time replays them
NOTICE_SERIES = 200  # distinct (account, code) label pairs of gateway_meta_errors_total


class ResponseTimer:
    """Feeds ``gateway_response_time_seconds``: first outbound after a customer's message."""

    def __init__(self, metrics: Metrics, size: int = 100_000) -> None:
        self._metrics = metrics
        self._waiting: OrderedDict[str, float] = OrderedDict()
        self._size = size

    def observe(self, event: Event) -> None:
        """Note an inbound message, or measure the reply that answers one."""
        if event.kind != "message" and event.kind != "status":
            return
        at = event.timestamp.timestamp()
        if event.direction == "inbound" and event.kind == "message":
            self._waiting.setdefault(event.conversation_id, at)
            if len(self._waiting) > self._size:
                self._waiting.popitem(last=False)
            return
        if event.kind == "status" and event.status != "sent":
            return
        asked = self._waiting.get(event.conversation_id)
        if asked is not None and at >= asked:  # an older reply arriving late leaves the wait
            del self._waiting[event.conversation_id]
            self._metrics.response_time.labels(event.channel).observe(at - asked)


def _mentions_erased(req: RawRequest, erasures: dict[tuple[str, str], int]) -> bool:
    """Whether a request journaled before an erasure holds the erased contact's id (as the
    erasure tells a raw-request dead letter of the contact)."""
    return any(contact_matcher(channel, contact)(req.body, f"normalise:{req.channel}")
               for (channel, contact), upto in erasures.items() if upto >= req.seq)


def _checked(event: Event) -> Event:
    """``event`` if it is one the journal can keep (a channel plugin may return anything)."""
    if not isinstance(event, Event):
        raise TypeError(f"normalise produced {type(event).__name__}, not a gateway.events.Event")
    for field in ("id", "channel", "conversation_id"):
        value = getattr(event, field)
        if not isinstance(value, str) or not value:
            raise TypeError(f"normalise produced an event whose {field} is {value!r}")
    return event


class Processor:
    """The loop between the journal and the dispatcher."""

    def __init__(self, journal: Journal, channels: dict[str, Channel], dispatcher: Dispatcher,
                 metrics: Metrics, batch_size: int = 500) -> None:
        self.journal = journal
        self.channels = channels
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.batch_size = batch_size
        self.wake = asyncio.Event()
        self.timer = ResponseTimer(metrics)
        # customers known by an alias alone (a BSUID)
        self.identities = Identities(journal, channels=channels)
        self._stopping = False
        self.processed_seq = 0  # the newest request processed, its events published
        self.stopped = False  # run() returned or was cancelled: nothing will be processed
        self._published = asyncio.Condition()  # notified after every batch is published
        self._event_counters: dict[tuple[str, str, str], Any] = {}  # label children, looked up once
        # Held for each batch, from reading its requests to publishing its events: an erasure
        # takes it to erase the journal between two batches, never in the middle of one.
        self.batch_lock = asyncio.Lock()
        self._owner = uuid.uuid4().hex  # this processor, as the holder of a replay lease
        # called with each batch's notices (out-of-band account errors, Channel.notices): the
        # outbound service's limiters slow down on a throttling code
        self.notice_observers: list[Callable[[list[Notice]], Awaitable[None]]] = []
        self._notice_series: set[tuple[str, str]] = set()  # (account, code) labels in use
        for name in channels:  # from 0, so that the first failure is an increase (the alert)
            metrics.normalise_failures.labels(name)

    async def run(self) -> None:
        """Process until :meth:`stop`; then finish what is journaled (bounded by the caller).

        A failing journal (locked, unreachable) is logged and retried with backoff; a batch is
        committed whole or not at all, so a retry processes it again from the start."""
        try:
            await self._run()
        finally:
            self.stopped = True
            async with self._published:  # a waiter must not wait for a processor that is gone
                self._published.notify_all()

    async def _run(self) -> None:
        failures = 0
        next_replay_check = 0.0
        while True:
            self.wake.clear()
            try:
                if time.monotonic() >= next_replay_check and not self._stopping:
                    next_replay_check = time.monotonic() + REPLAY_CHECK_SECONDS
                    await self.replay_requests()
                done = await self.process_batch()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - retried; intake keeps journaling meanwhile
                failures += 1
                log.error("processing_failed", error=repr(exc), failures=failures)
                await asyncio.sleep(min(RETRY_MAX, 0.1 * 2 ** min(failures, 10)))
                continue
            if done == 0:
                if self._stopping:
                    return
                await wait_event(self.wake, 1.0)

    async def replay_requests(self) -> int:
        """Journal again the raw requests of ``normalise:<channel>`` dead letters marked for
        replay (``gateway dead-letters replay``), for every channel this gateway runs: once the
        channel is enabled again or its bug fixed, they are processed like new requests. Each
        letter is deleted once its request is journaled (a crash in between journals it twice:
        its events are de-duplicated by id). Returns how many were journaled."""
        lease = getattr(self.journal, "acquire_lease", None)
        if lease is not None and not await lease("replay:normalise", self._owner, REPLAY_LEASE_MS):
            return 0
        async with self.batch_lock:  # an erasure between reading a letter and journaling its
            return await self._replay_requests()  # body would miss the body held here

    async def _replay_requests(self) -> int:
        total = 0
        for name in self.channels:
            letters = await self.journal.replays_due(f"normalise:{name}", self.batch_size)
            if not letters:
                continue
            for letter in letters:
                await self.journal.append(name, bytes(letter.data), letter.received_at)
            await self.journal.finish_replays([d.id for d in letters])
            log.info("requests_replayed", channel=name, count=len(letters))
            total += len(letters)
        return total

    def stop(self) -> None:
        """Ask the loop to return once the journal is empty."""
        self._stopping = True
        self.wake.set()

    async def process_batch(self) -> int:
        """Normalise one batch of requests and commit it; return how many requests it held."""
        async with self.batch_lock:
            return await self._process_batch()

    async def _process_batch(self) -> int:
        requests = await self.journal.unprocessed(self.batch_size)
        self.metrics.queue_depth.labels("journal").set(self.journal.pending)
        if not requests:
            return 0
        erasures = getattr(self.journal, "erasures", None)
        events, owners, failed = self._normalise(requests, await erasures() if erasures else {})
        notices = self._take_notices()  # a batch that fails drops them: its retry takes them anew
        events = await self.identities.apply(events)
        new = [NewEvent(ev.id, ev.channel, ev.conversation_id, data, received)
               for ev, data, received in events]
        seqs = await self.journal.commit_processed(requests[-1].seq, new, failed)
        for req, _ in failed:
            self.metrics.normalise_failures.labels(req.channel).inc()
        records = self._account(events, owners, seqs, requests)
        self.metrics.queue_depth.labels("journal").set(self.journal.pending)
        self.dispatcher.publish(records)
        self.processed_seq = requests[-1].seq
        async with self._published:
            self._published.notify_all()
        if notices:
            await self._hand_notices(notices)
        return len(requests)

    async def caught_up(self, timeout: float) -> bool:
        """Wait until every request the journal had committed when called is processed and its
        events published (the dispatcher's observers have seen them), for at most ``timeout``
        seconds; whether that happened. At once when nothing is pending, or when the processor
        has stopped (a shutdown's drain that ran out of time).

        Read-your-writes for the outbound service: a STOP the gateway acknowledged before a send
        was accepted is known when the send is checked. Only a journal that numbers its commits
        in this process (SQLite: ``committed_seq``) can say; with any other it returns True."""
        target = getattr(self.journal, "committed_seq", None)
        if target is None:
            return True

        def caught() -> bool:
            return self.journal.pending == 0 or self.processed_seq >= target

        if not caught() and not self.stopped:
            self.wake.set()
            try:
                async with self._published:
                    await asyncio.wait_for(self._published.wait_for(
                        lambda: caught() or self.stopped), timeout)
            except TimeoutError:
                return False
        return caught()

    def _normalise(self, requests: list[RawRequest], erasures: dict[tuple[str, str], int]):
        """Each request's events (encoded), the request each came from, and the requests that
        could not be normalised. ``erasures`` (GDPR): the contact's events of a request journaled
        before its erasure are dropped, and so is such a request that fails and mentions it."""
        events: list[tuple[Event, bytes, float]] = []
        owners: list[int] = []
        failed: list[tuple[RawRequest, str]] = []
        for index, req in enumerate(requests):
            channel = self.channels.get(req.channel)
            try:
                if channel is None:
                    raise BadPayload(f"channel {req.channel!r} is not enabled")
                # all of a request's events, encoded, before any is kept: a plugin's normalise
                # that fails while it is iterated (a generator), or yields what is no event,
                # dead-letters its own request instead of failing the batch again and again
                produced = [(event, encode(_checked(event)))
                            for event in channel.normalise(req.body)]
            except Exception as exc:  # noqa: BLE001 - kept as a dead letter, never lost
                log.error("normalise_failed", channel=req.channel, request=req.seq, error=repr(exc))
                if erasures and _mentions_erased(req, erasures):
                    log.info("erased_request_dropped", channel=req.channel, request=req.seq)
                    continue  # as the erasure deletes such a dead letter, never store it
                failed.append((req, repr(exc)))  # counted once committed (_account)
                continue
            if erasures:
                kept = [(e, d) for e, d in produced
                        if erasures.get((e.channel, e.customer_id), 0) < req.seq]
                if len(kept) < len(produced):
                    log.info("erased_events_dropped", channel=req.channel, request=req.seq,
                             events=len(produced) - len(kept))
                    produced = kept
            for event, data in produced:
                events.append((event, data, req.received_at))
                owners.append(index)
        return events, owners, failed

    def _take_notices(self) -> list[Notice]:
        """The notices the channels met normalising this batch (Channel.notices)."""
        found: list[Notice] = []
        for channel in self.channels.values():
            taken = getattr(channel, "notices", None)  # a channel written before the hook
            if taken is not None:
                found.extend(taken())
        return found

    async def _hand_notices(self, notices: list[Notice]) -> None:
        """Once the batch is committed: count its notices and hand them to the observers. They
        are not events, so nothing de-duplicates them: a redelivered body counts again (and
        slows sending down again, which never breaks a limit); a batch committed once counts
        once, however often it was normalised."""
        for notice in notices:
            self.metrics.meta_errors.labels(*self._notice_labels(notice)).inc()
        for observer in self.notice_observers:
            try:
                await observer(notices)
            except Exception as exc:  # noqa: BLE001 - an observer never fails the batch
                log.error("notice_observer_failed", error=repr(exc))

    def _notice_labels(self, notice: Notice) -> tuple[str, str, str]:
        """(channel, account, code): the first :data:`NOTICE_SERIES` (account, code) pairs as
        they are, later new ones as ("other", "other"), so the series stay bounded."""
        pair = (notice.account_id, str(notice.error.code))
        if pair not in self._notice_series:
            if len(self._notice_series) >= NOTICE_SERIES:
                return notice.channel, "other", "other"
            self._notice_series.add(pair)
        return notice.channel, *pair

    def _account(self, events, owners, seqs, requests) -> list[Record]:
        records = []
        fresh_per_request = [0] * len(requests)
        total_per_request = [0] * len(requests)
        counts: dict[tuple[str, str, str], int] = {}  # counters move once per batch, not per event
        duplicates: dict[str, int] = {}
        observe = self.timer.observe
        for (event, data, received), owner, seq in zip(events, owners, seqs, strict=True):
            total_per_request[owner] += 1
            if seq is None:
                duplicates[event.channel] = duplicates.get(event.channel, 0) + 1
                continue
            fresh_per_request[owner] += 1
            kind_type = event.type or ""
            if kind_type not in LABEL_TYPES:  # a plugin channel's own: bounded all the same
                kind_type = "other"
            labels = (event.channel, event.kind, kind_type)
            counts[labels] = counts.get(labels, 0) + 1
            observe(event)
            records.append(Record(seq, event, data, received))
        for labels, n in counts.items():
            counter = self._event_counters.get(labels)
            if counter is None:
                counter = self._event_counters[labels] = self.metrics.events.labels(*labels)
            counter.inc(n)
        for channel, n in duplicates.items():
            self.metrics.duplicate_events.labels(channel).inc(n)
        for req, total, fresh in zip(requests, total_per_request, fresh_per_request, strict=True):
            if total and not fresh:
                self.metrics.webhook_requests.labels(req.channel, "duplicate").inc()
        return records
