"""Fan-out: every event to every enabled sink, each sink on its own worker.

Each worker reads the event log after its own cursor (from memory while it keeps up, from the
journal after a restart or when it lags), hands batches to its sink, and moves its cursor once a
batch is done. A failed batch is split into conversation lanes that retry concurrently — one
conversation's events stay in order, the batch's other conversations are not held by it — with
exponential backoff and jitter, then dead letters; the next batch waits for the slowest lane.
A slow or failing sink never delays the others: they do not share a task.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from gateway import logging as gwlog
from gateway.aio import wait_event
from gateway.errors import PermanentError, RetryableError, failed_to_start
from gateway.events import decode
from gateway.journal import StoredEvent
from gateway.sink import Record

if TYPE_CHECKING:
    from gateway.journal import Journal
    from gateway.metrics import Metrics
    from gateway.sink import Sink

log = gwlog.get("gateway.dispatch")
LEASE_MS = 10_000  # a replica that stops renewing its sink lease loses it after this long
RETRY_MAX = 5.0  # a worker whose journal fails retries at least this often
TAIL_SIZE = 5_000  # records kept in memory (at most twice this before trimming)


class Tail:
    """The newest records in memory, so that workers that keep up never re-read or re-decode."""

    def __init__(self, covered_from: int, disabled: bool = False) -> None:
        self.disabled = disabled  # a shared journal: other processes add events we never see here
        self.records: list[Record] = []
        self.covered_from = covered_from  # every record with seq >= this is held here
        self.last_seq = covered_from - 1
        self.erased: set[int] = set()  # held records of an erased contact: never handed out

    def add(self, records: list[Record]) -> None:
        if not records:
            return
        gap = records[0].seq != self.last_seq + 1  # events this process committed, not added
        self.last_seq = max(self.last_seq, records[-1].seq)
        if self.disabled:
            return
        if gap:  # never claim to hold what was not added: workers read the gap from the journal
            self.records = []
            self.covered_from = records[0].seq
        self.records.extend(records)
        if len(self.records) > 2 * TAIL_SIZE:
            dropped = self.records[:-TAIL_SIZE]
            self.records = self.records[-TAIL_SIZE:]
            self.covered_from = dropped[-1].seq + 1
        if self.erased:
            self.erased = {seq for seq in self.erased if seq >= self.covered_from}

    def forget(self, matches) -> int:
        """GDPR: the held records whose canonical JSON ``matches(data, "")`` (a contact's, as
        :func:`gateway.journal.contact_matcher` tells) are never handed to a sink again, as the
        journal no longer holds them; how many. Their positions still count as passed."""
        found = {r.seq for r in self.records if matches(r.data, "")}
        self.erased |= found
        return len(found)

    def after(self, seq: int, limit: int) -> list[Record] | None:
        """Records after ``seq`` (up to ``limit``), or None when the tail no longer holds them."""
        if self.disabled or seq + 1 < self.covered_from:
            return None
        start = bisect.bisect_right(self.records, seq, key=lambda r: r.seq)
        return self.records[start:start + limit]


class LeaseLost(Exception):
    """The sink's lease could not be renewed in time: another replica may deliver now."""


class SinkWorker:
    """Delivers the event log to one sink."""

    def __init__(self, sink: Sink, journal: Journal, tail: Tail, metrics: Metrics) -> None:
        self.sink = sink
        self.journal = journal
        self.tail = tail
        self.metrics = metrics
        self.cursor_name = f"sink:{sink.name}"
        self.cursor = 0
        self.owner = uuid.uuid4().hex
        self.wake = asyncio.Event()
        self.idle = asyncio.Event()
        self._stopping = False
        self._leased = False
        self._leasing = tail.disabled and hasattr(journal, "acquire_lease")
        self._lease_until = 0.0  # monotonic: the lease, as last taken or renewed, is ours until
        self._loaded = False
        # Seqs after the cursor that already have a dead letter (the batch holding them was not
        # finished when the gateway stopped): they are not delivered again, their replay is.
        self._dead_ahead: set[int] = set()
        # Seqs after the cursor already delivered by a batch that then failed as a whole (a
        # journal error in another lane): its retry skips them (written and counted once).
        self._done_ahead: set[int] = set()
        self._replayed: list[int] = []  # dead letters delivered, not yet deleted from the store
        self.replaying = False  # dead letters are being redelivered right now
        self.in_hand: list[Record] = []  # the batch being delivered (retries included)
        # Records being replayed (by id()) -> their dead letter: one that fails again replaces
        # its letter in the same transaction, so a crash leaves exactly one letter of it.
        self._letter_of: dict[int, int] = {}
        self.erased: set[int] = set()  # id() of those an erasure removed: never written now

    async def run(self) -> None:
        """Deliver until :meth:`stop` and caught up. A failing journal (locked, unreachable)
        is logged and retried with backoff: the worker never ends while the gateway runs."""
        failures = 0
        while True:
            try:
                if failures or not self._loaded:
                    await self._load_position()
                self.wake.clear()
                moved = await self._step()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - retried; intake keeps journaling meanwhile
                failures += 1
                log.error("sink_worker_failed", sink=self.sink.name, error=repr(exc),
                          failures=failures)
                await asyncio.sleep(min(RETRY_MAX, 0.1 * 2 ** min(failures, 10)))
                continue
            if moved:
                continue
            self.idle.set()
            if self._stopping:
                return
            await wait_event(self.wake, self.poll_seconds)

    async def _load_position(self) -> None:
        """The cursor and the dead letters ahead of it, as stored in the journal."""
        self.cursor = max(self.cursor, await self.journal.cursor(self.cursor_name) or 0)
        self._dead_ahead = await self.journal.dead_lettered_after(self.sink.name, self.cursor)
        self._loaded = True

    @property
    def poll_seconds(self) -> float:
        """How often an idle worker looks for events (and replays) nobody woke it for."""
        return 0.2 if self.tail.disabled else 1.0

    def stop(self) -> None:
        """Return once caught up."""
        self._stopping = True
        self.wake.set()

    def lag(self) -> int:
        """Events behind the newest this process knows of."""
        return max(0, self.tail.last_seq - self.cursor)

    async def _step(self) -> int:
        """Deliver the replays due and the next batch; how many events moved."""
        # -- shared journal (Redis): one replica delivers to this sink at a time (a lease) --
        if not self._leasing:
            return await self._replays() + await self._next_batch()
        if not await self._renew_lease():
            # another replica delivers: follow its cursor, so lag() and caught_up() are true
            self._leased = False
            self.cursor = max(self.cursor, await self.journal.cursor(self.cursor_name) or 0)
            return 0
        if not self._leased:  # taken over: the last holder may have left dead letters ahead
            await self._load_position()
            self._leased = True
        self.cursor = await self.journal.cursor(self.cursor_name) or 0
        renewing = asyncio.create_task(self._keep_lease())  # a slow or retrying sink keeps it
        try:
            return await self._replays() + await self._next_batch()
        except LeaseLost:
            log.warning("sink_lease_lost", sink=self.sink.name)
            self._leased = False
            return 0
        finally:
            renewing.cancel()

    async def _renew_lease(self) -> bool:
        """Take or renew the sink's lease; whether it is ours (for 90% of its time to live)."""
        started = time.monotonic()
        if not await self.journal.acquire_lease(self.cursor_name, self.owner, LEASE_MS):
            return False  # held elsewhere, or Redis unreachable: what we had lapses by itself
        self._lease_until = started + LEASE_MS * 0.9 / 1000
        return True

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            if time.monotonic() >= self._lease_until:
                # lapsed (Redis out of reach): another replica may have delivered this batch
                # meanwhile; taking the lease again would not make the batch ours again
                return
            await self._renew_lease()

    def _check_lease(self) -> None:
        """Before anything reaches the sink or the dead letters: is the lease still ours?"""
        if self._leasing and time.monotonic() >= self._lease_until:
            raise LeaseLost(self.cursor_name)

    async def _next_batch(self) -> int:
        """Deliver the events after the cursor (one batch); how many positions it moved."""
        size = self.sink.config.batch_size
        batch = self.tail.after(self.cursor, size)
        if batch is None:
            stored = await self.journal.events_after(self.cursor, size)
            if not stored:
                return 0
            last = stored[-1].seq
            batch = await self._decoded(stored)
        elif not batch:
            return 0
        else:
            last = batch[-1].seq
        self.idle.clear()
        if self._dead_ahead:
            batch = [r for r in batch if r.seq not in self._dead_ahead]
            self._dead_ahead = {seq for seq in self._dead_ahead if seq > last}
        if self.tail.erased:
            batch = [r for r in batch if r.seq not in self.tail.erased]
        if self._done_ahead:
            batch = [r for r in batch if r.seq not in self._done_ahead]
        if batch:
            await self.deliver(batch)
        moved = last - self.cursor  # positions passed, delivered or not (dead letters ahead)
        self.cursor = last
        self._done_ahead = {seq for seq in self._done_ahead if seq > last}
        await self.journal.set_cursor(self.cursor_name, self.cursor)
        self.metrics.queue_depth.labels(self.cursor_name).set(self.lag())
        return max(moved, 1)

    async def _decoded(self, stored: list[StoredEvent]) -> list[Record]:
        """The journal's events as records. One that does not decode (a channel plugin's own
        event class, a journal written by a newer version) is dead-lettered with the reason, not
        retried forever: it would hold every event after it."""
        records, undecodable = [], []
        for ev in stored:
            if ev.seq in self._dead_ahead:
                continue  # already dead-lettered; never delivered again
            try:
                records.append(_record(ev))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                undecodable.append((ev, f"event:{ev.seq}", f"undecodable: {exc}", 0))
        if undecodable:
            self._check_lease()
            log.error("dead_letter", sink=self.sink.name, reason="undecodable",
                      count=len(undecodable), error=undecodable[0][2])
            await self.journal.add_dead_letters(self.sink.name, undecodable)
            self.metrics.sink_deliveries.labels(self.sink.name, "dead").inc(len(undecodable))
        return records

    async def _replays(self) -> int:
        """Redeliver dead letters marked for replay; each leaves the store only once it has been
        delivered (or dead-lettered anew), so a crash in between replays it again."""
        if self._replayed:  # delivered before the journal failed: delete, never deliver again
            await self.journal.finish_replays(self._replayed)
            self._replayed = []
        letters = await self.journal.replays_due(self.sink.name, self.sink.config.batch_size)
        # A letter ahead of the cursor whose event is still in the log (dead-lettered while its
        # batch was still retrying other lanes, then the gateway stopped) waits until the batch
        # has passed it: only its dead letter keeps the batch from delivering it again.
        # Shared journal: other replicas add events this one never sees, so the log's own head
        # says how far it goes (the tail holds only what this replica published).
        if any(d.seq > self.cursor for d in letters):
            head = (await self.journal.last_event_seq() if self.tail.disabled
                    else self.tail.last_seq)
            letters = [d for d in letters if not self.cursor < d.seq <= head]
        if letters:
            log.info("replaying_dead_letters", sink=self.sink.name, count=len(letters))
            self.replaying = True  # not caught up meanwhile (an erasure waits for this)
            try:
                records, undecodable, stale = [], [], []
                for d in letters:
                    try:
                        record = _record(StoredEvent(d.seq, d.data, d.received_at))
                    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                        undecodable.append((StoredEvent(d.seq, d.data, d.received_at),
                                            d.event_id, f"undecodable: {exc}", d.attempts))
                        stale.append(d.id)
                        continue
                    records.append(record)
                    self._letter_of[id(record)] = d.id
                if undecodable:  # a dead letter again, with why: replaying cannot help it
                    self._check_lease()
                    await self.journal.add_dead_letters(self.sink.name, undecodable,
                                                        replacing=stale)
                if records:
                    await self.deliver(records)
                self._replayed = [d.id for d in letters]
                await self.journal.finish_replays(self._replayed)
                self._replayed = []
            finally:
                self.replaying = False
                self._letter_of.clear()
        return len(letters)

    async def deliver(self, batch: list[Record]) -> None:
        """Write ``batch``; on failure retry per conversation lane, then dead-letter."""
        self.in_hand = batch  # seen by Dispatcher.forget (an erasure)
        try:
            await self._deliver(batch)
        finally:
            self.in_hand = []
            self.erased.clear()

    async def _deliver(self, batch: list[Record]) -> None:
        self._check_lease()
        try:
            await _write(self.sink, batch)
        except Exception as exc:  # noqa: BLE001 - any sink failure is retried per lane
            log.warning("sink_batch_failed", sink=self.sink.name, size=len(batch), error=repr(exc))
            lanes: dict[str, list[Record]] = {}
            for record in batch:
                lanes.setdefault(record.event.conversation_id, []).append(record)
            batched = len(batch) > 1
            tasks = [asyncio.ensure_future(self._lane(lane, exc, batched))
                     for lane in lanes.values()]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # One lane's failure (the journal, a lost lease) ends the batch for all of them:
                # none may go on writing while the batch is retried, or a conversation would have
                # two lanes at once (out of order, dead-lettered twice).
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            return
        self._delivered(batch)

    async def _lane(self, lane: list[Record], first: BaseException, batched: bool) -> None:
        if batched and _hint(first):  # the batch was told to wait (a 429's Retry-After): so
            await asyncio.sleep(min(_hint(first), self.sink.config.backoff_max))  # is the lane
        for record in lane:
            await self._one(record, first, batched)

    async def _one(self, record: Record, error: BaseException, batched: bool) -> None:
        """Retry one event alone. After a failed batch, every event gets one attempt of its own
        (a permanent error of the batch may be one bad event's); then backoff until
        ``max_attempts`` or a permanent error. An event an erasure removed meanwhile is given up
        (neither written nor dead-lettered)."""
        cfg = self.sink.config
        attempts = 0 if batched else 1
        while attempts < cfg.max_attempts and not (attempts and isinstance(error, PermanentError)):
            self.metrics.sink_deliveries.labels(self.sink.name, "retry").inc()
            if attempts:
                await asyncio.sleep(self._backoff(attempts, error))
            if self._erased(record, attempts):
                return
            attempts += 1
            self._check_lease()
            try:
                await _write(self.sink, [record])
            except Exception as exc:  # noqa: BLE001 - classified on the next turn
                error = exc
                continue
            self._delivered([record])
            return
        if self._erased(record, attempts):
            return
        await self._dead(record, error, max(attempts, 1))

    def _erased(self, record: Record, attempts: int) -> bool:
        """Whether an erasure removed ``record`` meanwhile (GDPR: then it is neither written
        nor dead-lettered after it)."""
        if id(record) not in self.erased:
            return False
        log.info("erased_event_not_retried", sink=self.sink.name, attempts=attempts)
        return True

    def _backoff(self, attempt: int, error: BaseException) -> float:
        cfg = self.sink.config
        delay = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (attempt - 1))
        # the sink's hint is honoured up to backoff_max: one conversation's retry holds the
        # sink's next batch (its cursor is one position), so no hint may stall it for hours
        return max(min(_hint(error), cfg.backoff_max), delay * random.uniform(0.5, 1.0))

    async def _dead(self, record: Record, error: BaseException, attempts: int) -> None:
        reason = f"{type(error).__name__}: {error}"
        self._check_lease()  # a replica that lost the lease leaves the verdict to the next one
        log.error("dead_letter", sink=self.sink.name, event_id=record.event.id,
                  conversation_id=record.event.conversation_id, attempts=attempts, reason=reason)
        replaced = self._letter_of.pop(id(record), None)  # a replay that failed again
        await self.journal.add_dead_letters(self.sink.name, [(
            StoredEvent(record.seq, record.data, record.received_at), record.event.id, reason,
            attempts)], replacing=[replaced] if replaced is not None else [])
        self.metrics.sink_deliveries.labels(self.sink.name, "dead").inc()

    def _delivered(self, records: list[Record]) -> None:
        self._done_ahead.update(r.seq for r in records if r.seq > self.cursor)
        if self._letter_of:  # replayed letters, done as soon as written: if another lane fails
            self._replayed.extend(letter for r in records  # the replay, they are not redelivered
                                  if (letter := self._letter_of.get(id(r))) is not None)
        now = time.time()
        latency = self.metrics.sink_latency.labels(self.sink.name)
        for record in records:
            latency.observe(max(0.0, now - record.received_at))
        self.metrics.sink_deliveries.labels(self.sink.name, "ok").inc(len(records))


def _hint(error: BaseException) -> float:
    """A retryable error's ``retry_after`` (seconds; 0 without one)."""
    if not isinstance(error, RetryableError):
        return 0.0
    return getattr(error, "retry_after", None) or 0.0


class SinkCancelled(Exception):
    """The sink's ``write`` raised ``CancelledError`` of its own (it awaited something that was
    cancelled) while the worker was not being cancelled: a failure like any other."""


async def _write(sink: Sink, records: list[Record]) -> None:
    try:
        await sink.write(records)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the worker itself is being stopped
        raise SinkCancelled(f"{sink.name}: write raised CancelledError") from None


def _record(stored: StoredEvent) -> Record:
    return Record(stored.seq, decode(stored.data), stored.data, stored.received_at)


class Dispatcher:
    """Owns one :class:`SinkWorker` per sink and the shared in-memory tail."""

    def __init__(self, journal: Journal, sinks: dict[str, Sink], metrics: Metrics,
                 owners: dict[str, str] | None = None) -> None:
        self.journal = journal
        self.sinks = sinks
        self.metrics = metrics
        self.owners = owners or {}  # sink name -> the plugin providing it (error messages)
        self.workers: dict[str, SinkWorker] = {}
        self.tasks: list[asyncio.Task] = []
        self.tail = Tail(1)
        self._started: list[Sink] = []  # what stop() closes: the sinks whose start() returned
        self._stopped = False
        # Called with every published batch before any sink sees it (cheap, synchronous): lets
        # core services know of new events first, e.g. the outbound service's window check.
        self.observers: list = []

    async def start(self) -> None:
        """Start every sink and its worker. A sink seen for the first time starts at the end.

        Raises:
            PluginError: a sink's ``start`` raised, naming the sink and its plugin (a file it
                cannot create or open is raised as the ``OSError``, which names the file); the
                sinks started before it are closed again.
        """
        last = await self.journal.last_event_seq()
        shared = getattr(self.journal, "shared", False)
        self.tail = Tail(last + 1, disabled=shared)
        if not shared:  # a shared journal's other replicas may run sinks this one does not
            # A sink no longer configured (or disabled) must not pin the event log forever.
            await self.journal.forget_cursors(set(self.sinks))
        for name, sink in self.sinks.items():
            await self._start_sink(name, sink)
            cursor_name = f"sink:{name}"
            if await self.journal.cursor(cursor_name) is None:
                # A sink seen for the first time receives events from now on, not the history.
                await self.journal.set_cursor(cursor_name, last)
            worker = SinkWorker(sink, self.journal, self.tail, self.metrics)
            self.workers[name] = worker
            self.tasks.append(asyncio.create_task(worker.run(), name=f"sink:{name}"))

    async def _start_sink(self, name: str, sink: Sink) -> None:
        try:
            await sink.start()
        except Exception as exc:
            await self.stop(0)  # the workers already running, the sinks already started
            raise failed_to_start("sink", name, self.owners.get(name, ""), exc)  # noqa: B904 - its cause is set
        self._started.append(sink)

    def publish(self, records: list[Record]) -> None:
        """New events from the processor: remember them and wake every worker."""
        for observe in self.observers:
            try:
                observe(records)
            except Exception as exc:  # noqa: BLE001 - an observer must not cost the sinks events
                log.error("observer_failed", observer=repr(observe), error=repr(exc))
        self.tail.add(records)
        for worker in self.workers.values():
            worker.wake.set()

    def forget(self, matches) -> None:
        """GDPR: the events in memory whose canonical JSON ``matches(data, "")`` (a contact's,
        as :func:`gateway.journal.contact_matcher` tells) are never handed to a sink again, and
        those of a batch being delivered or retried are given up (no further attempt, no dead
        letter; the one being written at this moment lands)."""
        self.tail.forget(matches)
        for worker in self.workers.values():
            worker.erased |= {id(r) for r in worker.in_hand if matches(r.data, "")}

    async def caught_up(self) -> bool:
        """Whether every worker has delivered everything published."""
        return all(w.cursor >= self.tail.last_seq and not w.replaying
                   for w in self.workers.values())

    async def stop(self, timeout: float) -> None:
        """Let workers catch up for at most ``timeout`` seconds, then stop them and close the
        sinks that started (once: stopping again does nothing)."""
        if self._stopped:
            return
        self._stopped = True
        for worker in self.workers.values():
            worker.stop()
        done, pending = (await asyncio.wait(self.tasks, timeout=timeout) if self.tasks
                         else (set(), set()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for sink in self._started:
            try:
                await sink.close()
            except Exception as exc:  # noqa: BLE001 - one sink's failure must not stop the others
                log.error("sink_close_failed", sink=sink.name, error=repr(exc))
