"""Dead-letter replay on the shared (Redis) journal: a letter ahead of the cursor waits for its
batch even when another replica stored the events (this replica's tail never saw them)."""

from __future__ import annotations

import asyncio

from gateway.dispatch import Dispatcher
from gateway.errors import RetryableError
from gateway.events import encode
from gateway.journal import NewEvent, StoredEvent
from gateway.journal.redis import RedisJournal
from gateway.metrics import Metrics
from tests.journal.test_redis_journal import cfg
from tests.test_dispatch_durability import Recording, jsonl_config, message, until


async def test_a_replay_ahead_of_the_cursor_waits_for_its_batch_on_a_shared_journal(
        redis_url, tmp_path):
    # Replica A holds the sink's lease. This replica starts (its cursor 0), then events 1 and 2
    # are stored by another replica; A dead-letters ev-1 while ev-2's lane backs off, and the
    # operator replays ev-1 at once. A lets go; this replica takes the lease and is stopped
    # while ev-2 still backs off. Had it replayed ev-1 (and deleted its letter), the next
    # holder's batch would write ev-1 again.
    journal = RedisJournal(cfg(redis_url))
    await journal.open()
    assert await journal.acquire_lease("sink:jsonl", "replica-A", 60_000)
    written: list[str] = []

    class Written(Recording):
        async def write(self, records):
            await super().write(records)
            written.extend(r.event.id for r in records)

    def busy(record):
        return RetryableError("busy", retry_after=30) if record.event.id == "ev-2" else None

    this = Dispatcher(journal, {"jsonl": Written(jsonl_config(tmp_path, backoff_max=30), busy)},
                      Metrics())
    await this.start()
    events = [message(1, "111"), message(2, "222")]
    assert await journal.commit_processed(0, [
        NewEvent(e.id, e.channel, e.conversation_id, encode(e), 1.0) for e in events], []) == [1, 2]
    await journal.add_dead_letters("jsonl", [(StoredEvent(1, encode(events[0]), 1.0), "ev-1",
                                              "refused", 1)])
    assert await journal.request_replay("jsonl") == 1
    await journal.release_lease("sink:jsonl", "replica-A")
    await asyncio.sleep(1.5)  # this replica takes the lease, ev-2 backs off
    assert written == []  # the replay waits: ev-1's batch has not passed it
    assert [d.state for d in await journal.dead_letters("jsonl")] == ["replay"]
    await this.stop(0.3)

    async def passed() -> bool:
        return await journal.cursor("sink:jsonl") == 2 and not await journal.dead_letters("jsonl")

    next_one = Dispatcher(journal, {"jsonl": Written(jsonl_config(tmp_path))}, Metrics())
    await next_one.start()
    await until(passed)
    await next_one.stop(2)
    await journal.close()
    assert sorted(written) == ["ev-1", "ev-2"]  # each once
