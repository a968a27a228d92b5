"""Consent from inbound messages: an opt-out keyword (``STOP``) or an opt-in keyword (``START``),
and from WhatsApp's marketing preference (``user_preferences``: stop / resume).

One rule, shared by the outbox (which refuses marketing templates to opted-out contacts) and the
storage sinks (``contacts.opted_out``, CONTRACT §8), so every store agrees. Keywords come from
``[outbound] opt_out_keywords`` / ``opt_in_keywords``; the whole text, trimmed and case-folded,
must equal one of them ("stop" opts out, "please stop the spam" does not).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.events import Event


MARKETING = "marketing_messages"  # the category of Meta's user_preferences


class Consent:
    """Decides what an inbound message says about consent."""

    def __init__(self, opt_out: Iterable[str], opt_in: Iterable[str]) -> None:
        self.opt_out = {word.strip().casefold() for word in opt_out}
        self.opt_in = {word.strip().casefold() for word in opt_in}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Consent:
        return cls(config.outbound.opt_out_keywords, config.outbound.opt_in_keywords)

    def of(self, event: Event) -> bool | None:
        """True: the customer opted out; False: opted (back) in; None: says nothing about it.

        Besides the keywords, WhatsApp's ``user_preferences`` (a ``preference`` event of
        ``marketing_messages``) stops or resumes marketing messages: the very thing an opt-out
        here withholds (marketing templates; utility and authentication ones still go)."""
        if event.direction != "inbound":
            return None
        if event.kind == "preference":
            if event.type != MARKETING:
                return None
            return {"stop": True, "resume": False}.get((event.payload or "").strip().casefold())
        if event.kind not in ("message", "postback"):
            return None
        word = (event.text or "").strip().casefold()
        if word in self.opt_out:
            return True
        if word in self.opt_in:
            return False
        return None
