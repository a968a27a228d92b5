"""One customer, one contact: a customer known by an alias alone is the one it was seen beside.

A channel sets ``Party.user_id`` beside a customer's ``id`` when the platform names the customer
two ways: WhatsApp names a customer by wa_id (their phone number) and by business-scoped user id
(BSUID). A customer who adopts a username may hide their number: later payloads then name them by
BSUID alone, and the channel gives such a party ``id == user_id``.

The processor learns every (channel, user_id) -> id pair it sees, durably in the journal (the
``aliases`` of :class:`gateway.journal.Journal`), before the batch is committed. An event whose
customer is known by an alias alone is then rewritten to the customer that alias was seen beside:
its customer id, and its conversation id when the channel built it the standard way
(:func:`gateway.events.conversation_id`). So the person keeps one contact, one conversation and
one AI history when their number stops showing, and a reply is addressed by the number. An alias
seen beside another customer later points at that one from then on (for the events after it).
A message that says the alias changed (:meth:`gateway.channel.Channel.previous_alias`: WhatsApp's
``user_changed_user_id``) pairs the new alias with the customer the old one was paired with.

Event ids do not change (they come from Meta's message ids), so de-duplication is unaffected.
A send addressed to an alias goes to that alias (Meta routes a BSUID to its owner, even on a
recycled number), but is checked against the window and consent of the alias's customer as well
(:meth:`Identities.resolve`). An erasure of any id of the person erases every id linked to it
(:meth:`Identities.linked`) and retires the pairs at once (:meth:`Identities.retire`).

Resolution always asks the journal (a pair erased by another replica is gone at once); memory
only spares writing a pair seen again, for :data:`KNOWN_SECONDS`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec

from gateway import logging as gwlog
from gateway.events import Event, Party, conversation_id, encode

if TYPE_CHECKING:
    from collections.abc import Mapping

    from gateway.channel import Channel
    from gateway.journal import Journal

log = gwlog.get("gateway.identities")
KNOWN_PAIRS = 50_000  # pairs remembered in memory, so that a pair seen again costs no write
KNOWN_SECONDS = 300.0  # ... for this long (another replica's erasure may have removed it)
LOOKUP_SECONDS = 5.0  # a send's or an erasure's look-up gives up after this long


class JournalUnavailable(Exception):
    """The journal did not answer a look-up (a send answers 503, an erasure reports it)."""

Key = tuple[str, str]  # (channel, alias)


def customer(event: Event) -> Party:
    """The customer's party: the sender of inbound events, the recipient of outbound ones."""
    return event.sender if event.direction == "inbound" else event.recipient


class Identities:
    """The processor's alias resolution, over the journal's durable pairs."""

    def __init__(self, journal: Journal, size: int = KNOWN_PAIRS,
                 channels: Mapping[str, Channel] | None = None) -> None:
        self.journal = journal
        self.channels = channels or {}  # for Channel.previous_alias
        # (channel, alias) -> (customer id, when written): pairs this process wrote lately
        self._known: OrderedDict[Key, tuple[str, float]] = OrderedDict()
        self._size = size

    async def apply(self, events: list[tuple[Event, bytes, float]]
                    ) -> list[tuple[Event, bytes, float]]:
        """Learn the batch's pairs and resolve its alias-only customers (``(event, encoded,
        received_at)`` tuples, as the processor holds them); the batch, rewritten events
        encoded anew. Without any ``user_id`` in the batch, the batch as it is, at once.

        Events are taken in their order, each with the pairs known at its place (the journal's,
        then the batch's so far), so a batch comes out as its events would one by one: a pair
        later in the batch does not reach back. Only a party named by the alias alone
        (``id == user_id``) is rewritten; a party with an id of its own keeps it.

        A ``system`` message saying the customer's alias changed (the channel's
        :meth:`~gateway.channel.Channel.previous_alias`; WhatsApp's ``user_changed_user_id``,
        whose customer is the new BSUID) pairs the new alias with the customer the old one was
        paired with, and is that customer's; an old alias with no pair changes nothing."""
        asked: set[Key] = set()
        taught: dict[Key, str] = {}  # the batch's latest pairs (what it teaches the journal)
        olds: dict[int, str] = {}  # index -> the alias a change message says it replaces
        changes = bool(self.channels)
        for index, (event, _, _) in enumerate(events):
            party = customer(event)
            if changes and event.type == "system":
                old = self._previous(event, party)
                if old is not None:
                    olds[index] = old
                    asked.add((event.channel, old))
            if party.user_id is None:
                continue
            key = (event.channel, party.user_id)
            if party.id == party.user_id:
                asked.add(key)
            else:
                taught[key] = party.id
        if not asked:  # nothing to resolve: only pairs to learn (or nothing at all)
            if taught:
                await self._learn(taught)
            return events
        found = await self.journal.aliases(list(asked))
        current: dict[Key, str] = {}  # the batch's pairs so far: (channel, alias) -> customer
        out = []
        for index, item in enumerate(events):
            event = item[0]
            party = customer(event)
            target = None
            if party.user_id is not None:
                key = (event.channel, party.user_id)
                if party.id != party.user_id:
                    current[key] = party.id
                else:
                    target = current.get(key, found.get(key))
            old = olds.get(index) if olds else None
            if old is not None:
                was = (event.channel, old)
                owner = current.get(was, found.get(was))
                if owner is not None and owner != party.id:
                    current[(event.channel, party.id)] = target = owner
                    party = msgspec.structs.replace(party, user_id=party.id)  # the new alias
            if target is None or target == party.id:
                out.append(item)
                continue
            resolved = _resolved(event, party, target)
            out.append((resolved, encode(resolved), item[2]))
        if current:
            await self._learn(current)
        return out

    async def _learn(self, pairs: dict[Key, str]) -> None:
        """Write the pairs this process did not write lately."""
        learning = {k: v for k, v in pairs.items() if not self._wrote(k, v)}
        if learning:
            await self.journal.learn_aliases(learning)
            now = time.monotonic()
            for key, contact in learning.items():
                self._remember(key, contact, now)

    def _previous(self, event: Event, party: Party) -> str | None:
        """The channel's :meth:`~gateway.channel.Channel.previous_alias` of a system message
        whose customer is named by an alias (:meth:`~gateway.channel.Channel.may_be_alias`; a
        customer with an id of its own, a number, is never rewritten). A hook that raises or
        answers no str is logged and taken as None (never a stuck batch)."""
        channel = self.channels.get(event.channel)
        if channel is None or party.user_id not in (None, party.id):
            return None
        try:
            if not channel.may_be_alias(party.id):
                return None
            old = channel.previous_alias(event)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not stop processing
            log.error("previous_alias_failed", channel=event.channel, event_id=event.id,
                      error=repr(exc))
            return None
        return old if isinstance(old, str) and old and old != party.id else None

    async def resolve(self, channel: str, customer_id: str) -> str:
        """The customer ``customer_id`` names: the one it was last seen beside when it is an
        alias, else itself (the outbound service checks that one's window and consent).

        Raises:
            JournalUnavailable: the journal did not answer (a Redis outage is not waited out).
        """
        key = (channel, customer_id)
        try:
            found = await asyncio.wait_for(self.journal.aliases([key], wait=False),
                                           LOOKUP_SECONDS)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises
            raise JournalUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return found.get(key, customer_id)

    async def aliases_of(self, channel: str, customer_id: str) -> list[str]:
        """The aliases (BSUIDs) last seen beside ``customer_id``: a template sent to the customer
        heeds their word on consent too.

        Raises:
            JournalUnavailable: the journal did not answer.
        """
        try:
            return await asyncio.wait_for(self.journal.aliases_of(channel, customer_id),
                                          LOOKUP_SECONDS)
        except Exception as exc:  # noqa: BLE001 - whatever the backend raises
            raise JournalUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def linked(self, channel: str, contact_id: str) -> list[str]:
        """The person's other ids, for an erasure, one pair away and no further: the customer an
        alias was last seen beside, or the aliases last seen beside a customer; and the ids an
        unfinished erasure retired with it (:meth:`retire`). Not the other aliases of an alias's
        customer: a recycled phone number pairs one wa_id with two people's BSUIDs, and erasing
        one person must not erase the other's. A journal failure raises."""
        owner = await self.resolve(channel, contact_id)
        found = set(await self.journal.retired_with(channel, contact_id))
        if owner != contact_id:
            found.add(owner)
        else:
            found.update(await self.journal.aliases_of(channel, contact_id))
        return sorted(found - {contact_id})

    async def retire(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure, between two batches (under the processor's lock): drop every pair naming one
        of the person's ids, in the journal and in memory, so no event is resolved to them from
        now on. The journal keeps the ids together until :meth:`forget`, so that the repeat a
        failed erasure asks for still erases all of them."""
        await self.journal.retire_aliases(channel, contact_ids)
        for one in contact_ids:
            self._forget_known(channel, one)

    async def forget(self, channel: str, contact_ids: list[str]) -> None:
        """Erasure, once every sink has erased: drop what :meth:`retire` kept."""
        await self.journal.forget_retired(channel, contact_ids)

    def _forget_known(self, channel: str, contact_id: str) -> None:
        for key in [k for k, (v, _) in self._known.items()
                    if k[0] == channel and contact_id in (k[1], v)]:
            del self._known[key]

    def _wrote(self, key: Key, contact: str) -> bool:
        """Whether this process wrote this very pair within KNOWN_SECONDS (then kept fresh)."""
        known = self._known.get(key)
        if known is None or known[0] != contact or time.monotonic() - known[1] > KNOWN_SECONDS:
            return False
        self._known.move_to_end(key)
        return True

    def _remember(self, key: Key, contact: str, now: float) -> None:
        self._known[key] = (contact, now)
        self._known.move_to_end(key)
        if len(self._known) > self._size:
            self._known.popitem(last=False)


def _resolved(event: Event, party: Party, target: str) -> Event:
    """``event`` with its customer ``target`` (its alias kept as ``user_id``), and the
    conversation of ``target`` when the channel named the conversation the standard way."""
    changes: dict = {"sender" if event.direction == "inbound" else "recipient":
                     msgspec.structs.replace(party, id=target)}
    if event.conversation_id == conversation_id(event.channel, event.account_id, party.id):
        changes["conversation_id"] = conversation_id(event.channel, event.account_id, target)
    return msgspec.structs.replace(event, **changes)
