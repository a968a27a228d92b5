"""The deterministic responder: keyword rules → canned replies, a greeting, a fallback.

No network, no randomness: the same conversation state and text always give the same reply, which
is what ``gateway demo`` and tests need. Rules are tried in order; the first whose keyword occurs
in the text (case-insensitive, at a word start, so ``order`` matches "Orders?" but not "border")
wins. A message that matches no rule gets the greeting when it opens the conversation (or is
itself a greeting) and the fallback otherwise.

``{name}`` in a reply becomes the customer's profile name (or "there" when unknown); nothing else
is interpolated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec


class Rule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``rules = [{match = "order", reply = "..."}]`` item.

    ``match`` is a keyword or a list of keywords; with ``regex = true`` each is a regular
    expression searched case-insensitively instead.
    """

    match: str | list[str]
    reply: str
    regex: bool = False

    def keywords(self) -> list[str]:
        return [self.match] if isinstance(self.match, str) else list(self.match)


DEFAULT_GREETING = ("Hi {name}! Thanks for writing to us. Ask me about an order, shipping, "
                    "returns, prices or opening hours.")
DEFAULT_FALLBACK = ("Thanks for your message! A member of our team will get back to you soon. "
                    "Meanwhile you can ask about orders, shipping, returns, prices or opening "
                    "hours.")
GREETING_WORDS = ("hi", "hello", "hey", "hiya", "good morning", "good afternoon", "good evening",
                  "ola", "olá", "hola", "bonjour", "hallo")

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(match=["human", "agent", "person", "operator"],
         reply="Sure, {name}: I have asked a colleague to take over this conversation."),
    Rule(match=["refund", "return", "exchange", "broken", "damaged"],
         reply="Sorry to hear that! Returns are free within 30 days: reply with your order number "
               "and we will send you a return label."),
    Rule(match=["order", "tracking", "track", "parcel", "package"],
         reply="Your order is on its way! You will get a tracking link as soon as the carrier "
               "scans the parcel. Reply with your order number for details."),
    Rule(match=["ship", "shipping", "deliver", "delivery"],
         reply="We ship worldwide: 2-3 business days in Europe and the US, 5-8 elsewhere. "
               "Shipping is free over 50 EUR."),
    Rule(match=["price", "cost", "how much", "discount", "coupon", "sale"],
         reply="Prices are on our website; this week everything is 10% off with code WELCOME10."),
    Rule(match=["hours", "open", "opening", "close", "closing"],
         reply="We are open Monday to Saturday, 9:00-19:00 (CET). Messages are answered around "
               "the clock."),
    Rule(match=["thank", "thanks", "great", "perfect", "awesome"],
         reply="You're welcome, {name}! Anything else I can help with?"),
)


class RulesEngine:
    """Picks a canned reply for a customer's text.

    Args:
        rules: tried in order before ``defaults``.
        defaults: built-in rules tried after ``rules`` (pass ``()`` for none).
        greeting: reply to the first message of a conversation (or a greeting) that no rule
            matched.
        fallback: reply to any other message that no rule matched.
    """

    def __init__(self, rules: Iterable[Rule] = (), defaults: Iterable[Rule] = DEFAULT_RULES,
                 greeting: str = DEFAULT_GREETING, fallback: str = DEFAULT_FALLBACK) -> None:
        self.greeting = greeting
        self.fallback = fallback
        self._compiled = [(_pattern(rule), rule.reply) for rule in (*rules, *defaults)]
        self._greeting = re.compile(
            "|".join(rf"(?:{re.escape(w)})(?!\w)" for w in GREETING_WORDS), re.IGNORECASE)

    def reply(self, text: str, *, first: bool = False, name: str | None = None) -> str:
        """The reply to ``text``; ``first`` says whether it opens the conversation."""
        for pattern, reply in self._compiled:
            if pattern.search(text):
                return _fill(reply, name)
        if first or self._greeting.match(text.strip()):
            return _fill(self.greeting, name)
        return _fill(self.fallback, name)


def _pattern(rule: Rule) -> re.Pattern[str]:
    words = rule.keywords()
    if rule.regex:
        parts = words
    else:
        parts = [r"(?<!\w)" + re.escape(word.strip()) for word in words if word.strip()]
    if not parts:
        raise ValueError("a rule needs at least one non-empty keyword")
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE)


def _fill(reply: str, name: str | None) -> str:
    first_name = (name or "").split()[0] if (name or "").strip() else "there"
    return reply.replace("{name}", first_name)
