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
seen beside another customer later points at that one from then on.

Event ids do not change (they come from Meta's message ids), so de-duplication is unaffected. An
erasure forgets the pairs of the contact, by either id.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import msgspec

from gateway.events import Event, Party, conversation_id, encode

if TYPE_CHECKING:
    from gateway.journal import Journal

KNOWN_PAIRS = 50_000  # pairs remembered in memory, so that a pair seen again costs no write

Key = tuple[str, str]  # (channel, alias)


def customer(event: Event) -> Party:
    """The customer's party: the sender of inbound events, the recipient of outbound ones."""
    return event.sender if event.direction == "inbound" else event.recipient


class Identities:
    """The processor's alias resolution, over the journal's durable pairs."""

    def __init__(self, journal: Journal, size: int = KNOWN_PAIRS) -> None:
        self.journal = journal
        self._known: OrderedDict[Key, str] = OrderedDict()  # (channel, alias) -> customer id
        self._size = size

    async def apply(self, events: list[tuple[Event, bytes, float]]
                    ) -> list[tuple[Event, bytes, float]]:
        """Learn the batch's pairs and resolve its alias-only customers (``(event, encoded,
        received_at)`` tuples, as the processor holds them); the batch, rewritten events
        encoded anew. Without any ``user_id`` in the batch, the batch as it is, at once."""
        taught: dict[Key, str] = {}
        wanted: set[Key] = set()
        for event, _, _ in events:
            party = customer(event)
            if party.user_id is None:
                continue
            key = (event.channel, party.user_id)
            if party.id != party.user_id:
                taught[key] = party.id  # the latest in the batch wins
            else:
                wanted.add(key)
        if not taught and not wanted:
            return events
        learning = {k: v for k, v in taught.items() if self._known.get(k) != v}
        if learning:
            await self.journal.learn_aliases(learning)
        asked = [k for k in wanted if k not in taught and k not in self._known]
        found = await self.journal.aliases(asked) if asked else {}
        for key, contact in (*learning.items(), *found.items()):
            self._remember(key, contact)
        if not wanted:
            return events
        out = []
        for item in events:
            event = item[0]
            party = customer(event)
            key = (event.channel, party.user_id or "")
            target = ((taught.get(key) or found.get(key) or self._known.get(key))
                      if key in wanted else None)
            if target is None or target == party.id:
                out.append(item)
                continue
            resolved = _resolved(event, party, target)
            out.append((resolved, encode(resolved), item[2]))
        return out

    def forget(self, channel: str, contact_id: str) -> None:
        """Erasure: drop the remembered pairs naming ``contact_id`` either way."""
        for key in [k for k, v in self._known.items()
                    if k[0] == channel and contact_id in (k[1], v)]:
            del self._known[key]

    def _remember(self, key: Key, contact: str) -> None:
        self._known[key] = contact
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
