"""The AI responder sink: answers customers' messages through the gateway's outbound service.

For every inbound ``message`` event whose type is in ``reply_types`` the sink asks its provider
for a reply and sends it with ``await app[gateway.keys.OUTBOUND].send({...})`` — the same path as
``POST /v1/messages``, so the outbox, the rate limiter and the 24-hour window apply.

It never answers outbound echoes, ``standby`` events (another app owns the thread), edits (the
customer corrected a message it has answered: WhatsApp ``edit``, Instagram ``message_edit``),
statuses, reactions or anything else, nor a consent keyword (STOP, START: a command, not a
question), and never twice to one event: answered event ids are kept in a
bounded memory set (the dispatcher hands a batch over again after a crash or a partial failure),
and each send carries ``idempotency_key = "ai:<event id>"`` so the durable outbox drops a repeat
across restarts too.

Providers:

- ``rules`` (default): :class:`sinks.ai.rules.RulesEngine`, deterministic keyword rules.
- ``openai``: the official ``openai`` SDK (``AsyncOpenAI``, ``max_retries=0``: the dispatcher owns
  retries) against ``base_url`` (any Chat Completions-compatible server), with the system prompt
  and the conversation's last ``history`` messages, kept in memory per conversation.

Erasure (``DELETE /v1/contacts/...``): :meth:`AISink.erase_contact` forgets the contact's
conversation history and answered event ids, so their old texts never reach the provider again.

Errors: 429, 5xx, timeouts and connection errors are ``RetryableError`` (429 as ``RateLimited``
with the server's ``retry-after`` hint); 400, 401, 403, 404 and 422 are ``PermanentError`` (dead
letter at once).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

import msgspec

from gateway import keys
from gateway import logging as gwlog
from gateway.aio import wait_event
from gateway.config import SinkConfig, require_not_blank
from gateway.errors import ConfigError, PermanentError, RateLimited, RetryableError
from gateway.events import EDITS, MESSAGE_TYPES, edit_target
from gateway.events import event_id as opaque_id
from gateway.sink import Record, Sink
from sinks.ai.rules import DEFAULT_FALLBACK, DEFAULT_GREETING, DEFAULT_RULES, Rule, RulesEngine

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.events import Event

log = gwlog.get("sinks.ai")

DEFAULT_SYSTEM_PROMPT = (
    "You are the friendly customer-service assistant of an online shop, answering customers on "
    "WhatsApp and Instagram. Reply in the customer's language, in at most three short sentences, "
    "without markdown. If you cannot help, say that a colleague will follow up.")
# Meta's limits on one text message: WhatsApp 4096 characters, Instagram 1000 UTF-8 bytes.
MAX_TEXT_CHARS = 4096
INSTAGRAM_MAX_BYTES = 1000
START_WAIT_SECONDS = 5.0


class AIConfig(SinkConfig):
    """``[sinks.ai]``: see ``docs/ai.md`` for every key."""

    env: ClassVar = {"api_key": ("OPENAI_API_KEY",)}
    provider: Literal["rules", "openai"] = "rules"
    reply_types: list[str] = msgspec.field(
        default_factory=lambda: ["text", "interactive", "button"])
    channels: list[str] = msgspec.field(default_factory=list)  # empty: every channel
    # rules provider
    rules: list[Rule] = msgspec.field(default_factory=list)
    default_rules: bool = True
    greeting: str = DEFAULT_GREETING
    fallback: str = DEFAULT_FALLBACK
    # openai provider
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    timeout: float = 20.0
    temperature: float | None = None
    max_tokens: int | None = None
    max_age_seconds: float = 86_400.0  # older messages get no answer (24-hour window)
    history: int = 10  # messages (customer + assistant) remembered per conversation
    # bounded memory and concurrency
    max_conversations: int = 10_000
    max_history_chars: int = 5_000_000  # characters of history kept in all (about 10-20 MB)
    remember_events: int = 100_000
    concurrency: int = 8

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        unknown = sorted(set(self.reply_types) - set(MESSAGE_TYPES))
        if unknown:
            raise ConfigError(f"unknown message types {unknown}; choose from {list(MESSAGE_TYPES)}",
                              f"{prefix}.reply_types")
        for key in ("history", "max_conversations", "max_history_chars", "remember_events",
                    "concurrency"):
            if getattr(self, key) < (0 if key == "history" else 1):
                raise ConfigError("must be positive", f"{prefix}.{key}")
        for key in ("timeout", "max_age_seconds"):
            if getattr(self, key) <= 0:
                raise ConfigError("must be positive", f"{prefix}.{key}")
        require_not_blank(self, prefix, "api_key")
        if self.provider == "openai" and not self.api_key:
            raise ConfigError("required for provider 'openai' (or set OPENAI_API_KEY)",
                              f"{prefix}.api_key")
        if not self.model.strip():
            raise ConfigError("must name a model, e.g. \"gpt-4o-mini\"", f"{prefix}.model")
        if self.base_url is not None:
            try:
                url = urlsplit(self.base_url)
            except ValueError:  # "http://[::1:11434/v1": an unclosed IPv6 address
                url = urlsplit("")
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ConfigError("must be an http(s) URL with a host, e.g. "
                                  "\"http://127.0.0.1:11434/v1\"", f"{prefix}.base_url")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ConfigError("must be between 0 and 2 (OpenAI's range)", f"{prefix}.temperature")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("must be at least 1", f"{prefix}.max_tokens")
        if len(set(self.channels)) != len(self.channels) or not all(
                isinstance(c, str) and c.strip() for c in self.channels):
            raise ConfigError("must be distinct channel names", f"{prefix}.channels")
        for index, rule in enumerate(self.rules):
            try:
                RulesEngine([rule], defaults=())
            except Exception as exc:  # noqa: BLE001 - a bad regex or an empty keyword
                raise ConfigError(f"invalid rule: {exc}", f"{prefix}.rules[{index}]") from None


Owner = tuple[str, str]  # (channel, customer id): whose data an entry is, for erasure
MAX_DRAFTS = 1000  # replies kept for the retry of a send that failed
TURN_CHARS = 4096  # of a remembered text (a reply is at most this already: WhatsApp's limit)


REVOKED = 10_000  # unsent and edited messages remembered, so that one that came first counts


def _message_key(channel: str, message_id: str) -> str:
    """An opaque key for a message id (a wamid embeds the customer's number): what the memory
    keeps after an erasure is a hash, as the answered event ids are."""
    return opaque_id(channel, "ai-message", message_id)


class Memory:
    """Bounded per-conversation history (LRU over conversations) and answered event ids, each
    entry tagged with its customer so that :meth:`erase` can forget one contact (GDPR).

    A turn keeps the id of the customer's message it answers: an unsend removes that exchange
    (:meth:`revoke`), an edit replaces the customer's text (:meth:`edit`), so what they took
    back never reaches the provider again. Meta keeps no order: an unsend or an edit that comes
    before its message is remembered (bounded, by an opaque key, owner-tagged) and applied when
    the message is answered."""

    def __init__(self, history: int, conversations: int, events: int,
                 chars: int = 5_000_000) -> None:
        self._history = history
        # conversation -> (owner, turns): each turn (message id or None, {"role", "content"})
        self._conversations: OrderedDict[
            str, tuple[Owner, deque[tuple[str | None, dict[str, str]]]]] = OrderedDict()
        self._max_conversations = conversations
        self._answered: OrderedDict[str, Owner] = OrderedDict()
        self._max_events = events
        self._max_chars = chars  # all the texts together: long messages must not add up
        self._chars = 0
        self._revoked: OrderedDict[str, Owner] = OrderedDict()  # message key -> owner
        # message key -> (owner, edit time, new text): edits whose message has no turn yet
        self._edits: OrderedDict[str, tuple[Owner, float, str]] = OrderedDict()

    def history(self, conversation_id: str) -> list[dict[str, str]]:
        entry = self._conversations.get(conversation_id)
        return [turn for _, turn in entry[1]] if entry else []

    def known(self, conversation_id: str) -> bool:
        return conversation_id in self._conversations

    def add_turn(self, conversation_id: str, user: str, assistant: str,
                 owner: Owner = ("", ""), message_id: str | None = None) -> None:
        if message_id is not None and self._edits:
            edited = self._edits.pop(_message_key(owner[0], message_id), None)
            if edited is not None:  # edited before it was answered: the history has the edit
                user = edited[2]
        entry = self._conversations.pop(conversation_id, None)
        turns = entry[1] if entry is not None else deque(maxlen=self._history)
        for role, content in (("user", user[:TURN_CHARS]), ("assistant", assistant[:TURN_CHARS])):
            if self._history and len(turns) == self._history:
                self._chars -= len(turns[0][1]["content"])
            if self._history:
                self._chars += len(content)
            turns.append((message_id, {"role": role, "content": content}))
        self._conversations[conversation_id] = (owner, turns)
        while len(self._conversations) > self._max_conversations or (
                self._chars > self._max_chars and len(self._conversations) > 1):
            self._drop_oldest()

    def revoke(self, conversation_id: str, message_id: str, owner: Owner = ("", "")) -> None:
        """The customer unsent ``message_id``: drop it and our answer to it from the history;
        remember it, so that the message is not answered if it comes (or is retried) later."""
        key = _message_key(owner[0], message_id)
        self._revoked[key] = owner
        self._revoked.move_to_end(key)
        while len(self._revoked) > REVOKED:
            self._revoked.popitem(last=False)
        self._edits.pop(key, None)
        entry = self._conversations.get(conversation_id)
        if entry is None:
            return
        turns = entry[1]
        kept = [t for t in turns if t[0] != message_id]
        if len(kept) != len(turns):
            self._chars -= sum(len(t[1]["content"]) for t in turns if t[0] == message_id)
            turns.clear()
            turns.extend(kept)

    def revoked(self, channel: str, message_id: str | None) -> bool:
        return message_id is not None and _message_key(channel, message_id) in self._revoked

    def edit(self, conversation_id: str, message_id: str, text: str, owner: Owner = ("", ""),
             at: float = 0.0) -> None:
        """The customer edited ``message_id`` (at ``at``): the history holds the new text
        instead; before the message is answered, the latest edit waits for it."""
        entry = self._conversations.get(conversation_id)
        for index, (mid, turn) in enumerate(entry[1] if entry else ()):
            if mid == message_id and turn["role"] == "user":
                self._chars += len(text) - len(turn["content"])
                entry[1][index] = (mid, {"role": "user", "content": text})
                return
        key = _message_key(owner[0], message_id)
        known = self._edits.get(key)
        if known is None or at >= known[1]:
            self._edits[key] = (owner, at, text)
            self._edits.move_to_end(key)
            while len(self._edits) > REVOKED:
                self._edits.popitem(last=False)

    def _drop_oldest(self) -> None:
        _, (_, turns) = self._conversations.popitem(last=False)
        self._chars -= sum(len(t[1]["content"]) for t in turns)

    def answered(self, event_id: str) -> bool:
        return event_id in self._answered

    def mark_answered(self, event_id: str, owner: Owner = ("", "")) -> None:
        self._answered[event_id] = owner
        while len(self._answered) > self._max_events:
            self._answered.popitem(last=False)

    def erase(self, channel: str, contact_id: str) -> dict[str, int]:
        """Forget one contact: the history of their conversations, and whose the ids of their
        answered events were. The ids themselves stay, unowned: they are opaque hashes, and an
        event of the contact still in a retry must not be answered (and its text sent to the
        provider) again. Returns how many conversations, remembered messages and event ids went."""
        owner = (channel, contact_id)
        conversations = [c for c, (who, _) in self._conversations.items() if who == owner]
        messages = 0
        for conversation in conversations:
            turns = self._conversations.pop(conversation)[1]
            messages += len(turns)
            self._chars -= sum(len(t[1]["content"]) for t in turns)
        events = [e for e, who in self._answered.items() if who == owner]
        for answered in events:
            self._answered[answered] = ("", "")
        for key in [k for k, who in self._revoked.items() if who == owner]:
            self._revoked[key] = ("", "")  # still unsent: an opaque key, owned by nobody
        for key in [k for k, (who, _, _) in self._edits.items() if who == owner]:
            del self._edits[key]  # their words
        return {"conversations": len(conversations), "messages": messages,
                "answered_events": len(events)}


class RulesProvider:
    """Deterministic keyword rules (``provider = "rules"``)."""

    def __init__(self, config: AIConfig) -> None:
        self.engine = RulesEngine(config.rules, DEFAULT_RULES if config.default_rules else (),
                                  config.greeting, config.fallback)

    async def reply(self, event: Event, history: list[dict[str, str]], first: bool) -> str:
        return self.engine.reply(event.text or "", first=first, name=event.sender.name)

    async def close(self) -> None:
        return None


class OpenAIProvider:
    """Chat Completions through the official SDK (``provider = "openai"``)."""

    def __init__(self, config: AIConfig) -> None:
        import openai

        self.config = config
        self.client = openai.AsyncOpenAI(api_key=config.api_key, base_url=config.base_url,
                                         timeout=config.timeout, max_retries=0)

    def messages(self, event: Event, history: list[dict[str, str]]) -> list[dict[str, str]]:
        """The request's ``messages``: system prompt, remembered turns, the customer's text."""
        system = [{"role": "system", "content": self.config.system_prompt}]
        return [*system, *history, {"role": "user", "content": event.text or ""}]

    async def reply(self, event: Event, history: list[dict[str, str]], first: bool) -> str:
        extra: dict[str, Any] = {}
        if self.config.temperature is not None:
            extra["temperature"] = self.config.temperature
        if self.config.max_tokens is not None:
            extra["max_tokens"] = self.config.max_tokens
        try:
            # the whole request within ``timeout``: the SDK's timeout bounds each read, so a
            # server that trickles its answer would hold the sink's worker for good
            async with asyncio.timeout(self.config.timeout):
                completion = await self.client.chat.completions.create(
                    model=self.config.model, messages=self.messages(event, history), **extra)
        except TimeoutError as exc:
            raise RetryableError(f"OpenAI did not answer within {self.config.timeout:g} s "
                                 "(sinks.ai.timeout)") from exc
        except Exception as exc:  # noqa: BLE001 - classified for the dispatcher
            raise classify_openai_error(exc) from exc
        return answer_text(completion, event)

    async def close(self) -> None:
        await self.client.close()


# finish_reason of an answer that is not a whole reply; any other (OpenAI's "stop", another
# server's "eos" / "eos_token" / none) with content is sent
NOT_WHOLE = frozenset({"length", "content_filter", "tool_calls", "function_call"})


def answer_text(completion: Any, event: Event) -> str:
    """The reply in a Chat Completions answer; "" (nothing is sent) when the answer is not a
    whole reply: cut off (``finish_reason`` ``length``), filtered (``content_filter``), a
    refusal, or a tool call. A body that is no completion at all (a proxy's HTML page, which the
    SDK hands back as a str) is a RetryableError."""
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list):
        raise RetryableError(f"malformed provider answer: no choices in a "
                             f"{type(completion).__name__} (is sinks.ai.base_url an OpenAI-"
                             "compatible API?)")
    if not choices:
        return ""
    choice = choices[0]
    message = getattr(choice, "message", None)
    reason = getattr(choice, "finish_reason", None)
    refusal = getattr(message, "refusal", None)
    if reason in NOT_WHOLE or refusal:
        log.warning("ai_answer_not_sent", event_id=event.id,
                    conversation_id=event.conversation_id, finish_reason=reason,
                    refusal=bool(refusal))
        return ""
    content = getattr(message, "content", None)
    return content.strip() if isinstance(content, str) else ""


def classify_openai_error(exc: Exception) -> Exception:
    """Map an ``openai`` SDK exception onto the gateway's retryable / permanent errors."""
    import openai

    if isinstance(exc, openai.RateLimitError):
        return RateLimited(f"OpenAI rate limit (429): {exc.message}", _retry_after(exc.response))
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return RetryableError(f"OpenAI unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError):  # a body that is not JSON (json.JSONDecodeError)
        return RetryableError(f"malformed provider answer: {type(exc).__name__}: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500 or status in (408, 409):
            return RetryableError(f"OpenAI error {status}: {exc.message}")
        hints = {401: "check sinks.ai.api_key / OPENAI_API_KEY",
                 403: "the key lacks access to this model or project",
                 404: "check sinks.ai.model and sinks.ai.base_url"}
        hint = hints.get(status, "the request is invalid")
        return PermanentError(f"OpenAI error {status} ({hint}): {exc.message}")
    return exc


def _retry_after(response: Any) -> float | None:
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, TypeError, ValueError):
            continue
    return None


def fit(channel: str, text: str) -> str:
    """Trim a reply to what Meta accepts in one text message on ``channel``."""
    text = text[:MAX_TEXT_CHARS]
    if channel == "instagram":
        data = text.encode("utf-8")
        if len(data) > INSTAGRAM_MAX_BYTES:
            text = data[:INSTAGRAM_MAX_BYTES - 3].decode("utf-8", "ignore") + "..."
    return text


class AISink(Sink):
    """Replies to customers (``[sinks.ai]``). Attached to the running app by ``gateway_started``."""

    name = "ai"

    def __init__(self, config: AIConfig) -> None:
        super().__init__(config)
        self.config: AIConfig = config
        self.app: web.Application | None = None
        # the rules provider reads no history: remember which conversations it knows, no texts
        self.memory = Memory(config.history if config.provider == "openai" else 0,
                             config.max_conversations, config.remember_events,
                             config.max_history_chars)
        self.provider: RulesProvider | OpenAIProvider | None = None
        self._attached = asyncio.Event()
        self._limit = asyncio.Semaphore(config.concurrency)
        self._inflight: dict[str, Owner] = {}  # event id -> customer, while being answered
        self._forget: set[str] = set()  # in-flight events whose contact was erased meanwhile
        # Replies the provider gave whose send failed (event id -> (reply, owner)): a retry sends
        # the same text, without asking (and paying) the provider again. Bounded; erased too.
        self._drafts: OrderedDict[str, tuple[str, Owner]] = OrderedDict()

    def attach(self, app: web.Application) -> None:
        """Remember the running app; replies go out through ``app[keys.OUTBOUND]``."""
        self.app = app
        self._attached.set()
        channels = app.get(keys.CHANNELS)
        unknown = sorted(set(self.config.channels) - set(channels or ())) if channels else []
        if unknown:  # a typo would answer nobody, silently
            log.error("ai_unknown_channels", channels=unknown, enabled=sorted(channels),
                      key="sinks.ai.channels")

    async def start(self) -> None:
        self.provider = (OpenAIProvider(self.config) if self.config.provider == "openai"
                         else RulesProvider(self.config))

    async def close(self) -> None:
        if self.provider is not None:
            await self.provider.close()

    def wants(self, event: Event) -> bool:
        """Whether ``event`` is a customer's message this sink answers."""
        return (event.kind == "message" and event.direction == "inbound" and not event.standby
                and event.raw_type not in EDITS and event.type in self.config.reply_types
                and bool((event.text or "").strip())
                and (not self.config.channels or event.channel in self.config.channels)
                and not self.memory.answered(event.id))

    async def write(self, records: list[Record]) -> None:
        events, revisions = [], []
        for record in records:
            event = record.event
            if self.wants(event):
                events.append(event)
            elif event.kind == "message" and event.direction == "inbound":
                revisions.append(event)
        for event in revisions:  # before the answers: an unsent message is not answered, an
            self._revise(event)  # edit waits for its message (Memory.edit)
        if not events:
            return
        outbound = await self._outbound()
        lanes: dict[str, list[Event]] = {}
        for event in events:
            lanes.setdefault(event.conversation_id, []).append(event)
        results = await asyncio.gather(*(self._lane(lane, outbound) for lane in lanes.values()),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return
        if len(records) == 1:
            raise errors[0]
        # A PermanentError on a batch would dead-letter every record in it, answered ones too:
        # let the dispatcher retry one by one instead (answered events are skipped then).
        hint = max((getattr(e, "retry_after", None) or 0.0 for e in errors), default=0.0)
        raise RetryableError(f"{len(errors)} of {len(lanes)} conversations failed; first: "
                             f"{type(errors[0]).__name__}: {errors[0]}", retry_after=hint or None)

    async def _lane(self, events: list[Event], outbound: Any) -> None:
        for event in events:  # one conversation in order; stop at its first failure
            async with self._limit:
                await self.answer(event, outbound)

    async def answer(self, event: Event, outbound: Any) -> None:
        """Ask the provider and send its reply for one event (no-op if already answered)."""
        if self.memory.answered(event.id):
            return
        assert self.provider is not None, "start() was not called"
        owner = (event.channel, event.customer_id)
        age = time.time() - event.timestamp.timestamp()
        if age > self.config.max_age_seconds:  # a free-form reply would be refused anyway
            log.info("ai_too_old", event_id=event.id, conversation_id=event.conversation_id,
                     age_seconds=round(age))
            self.memory.mark_answered(event.id, owner)
            return
        if self._silenced(event, outbound):
            log.info("ai_not_answered_consent", event_id=event.id,
                     conversation_id=event.conversation_id)
            self.memory.mark_answered(event.id, owner)
            return
        accounts = self._sending_accounts(event.channel)
        if accounts is not None and event.account_id not in accounts:
            # another number of the app, or an Instagram account whose account_id is not
            # configured: no reply, from no other account either
            log.warning("ai_not_our_account", event_id=event.id, channel=event.channel,
                        account_id=event.account_id, sending_accounts=sorted(accounts))
            self.memory.mark_answered(event.id, owner)
            return
        if self.memory.revoked(event.channel, event.message_id):  # unsent before we got to it
            self._drafts.pop(event.id, None)
            self.memory.mark_answered(event.id, owner)
            return
        self._inflight[event.id] = owner
        try:
            draft = self._drafts.get(event.id)
            if draft is not None:
                reply = draft[0]
            else:
                history = self.memory.history(event.conversation_id)
                first = not self.memory.known(event.conversation_id)
                reply = fit(event.channel, await self.provider.reply(event, history, first))
            if not reply:
                log.warning("ai_empty_reply", event_id=event.id,
                            conversation_id=event.conversation_id)
            else:
                if event.id not in self._forget:  # never a draft of an erased contact
                    self._drafts[event.id] = (reply, owner)
                    while len(self._drafts) > MAX_DRAFTS:
                        self._drafts.popitem(last=False)
                await self._send(outbound, self.body(event, reply))
                self._drafts.pop(event.id, None)
            if event.id in self._forget:  # the contact was erased while we were answering
                log.info("ai_erased_meanwhile", event_id=event.id)
                self.memory.mark_answered(event.id)  # answered, owned by nobody: never again
                return
            self.memory.mark_answered(event.id, owner)
            if reply:
                self.memory.add_turn(event.conversation_id, event.text or "", reply, owner,
                                     event.message_id)
                log.info("ai_replied", event_id=event.id, channel=event.channel,
                         conversation_id=event.conversation_id, provider=self.config.provider)
        finally:
            self._inflight.pop(event.id, None)
            self._forget.discard(event.id)

    def _revise(self, event: Event) -> None:
        """The customer unsent (``deleted``) or edited a message: its text leaves the history
        that goes to the provider (an edit's new text replaces it). Unsent before it was
        answered: it is not answered (:meth:`Memory.revoked`)."""
        owner = (event.channel, event.customer_id)
        if event.type == "deleted" and event.message_id:
            self.memory.revoke(event.conversation_id, event.message_id, owner)
        else:
            target = edit_target(event)
            if target is not None:
                self.memory.edit(event.conversation_id, target, (event.text or "")[:TURN_CHARS],
                                 owner, event.timestamp.timestamp())

    @staticmethod
    def _silenced(event: Event, outbound: Any) -> bool:
        """A consent keyword (STOP / START: a command to the business, not a question), by the
        outbound service's rule (an outbound without one, e.g. a test double, silences nothing).
        A question from an opted-out contact is still answered: a reply to their own message,
        which the opt-out (marketing) does not cover."""
        consent = getattr(outbound, "consent", None)
        return consent is not None and consent.of(event) is not None

    async def erase_contact(self, channel: str, contact_id: str) -> dict[str, int]:
        """GDPR: forget the contact's conversation history (their texts and our replies, which
        would otherwise go to the provider again when they write next) and whose the answered
        event ids were (the opaque ids stay, so nothing is answered twice). A reply being
        prepared for them right now is sent, its id kept unowned, its text not remembered."""
        for event_id, owner in self._inflight.items():
            if owner == (channel, contact_id):
                self._forget.add(event_id)
        for event_id in [e for e, (_, who) in self._drafts.items() if who == (channel, contact_id)]:
            del self._drafts[event_id]
        return self.memory.erase(channel, contact_id)

    def body(self, event: Event, reply: str) -> dict[str, Any]:
        """The ``POST /v1/messages`` body that answers ``event`` with ``reply``: from the account
        the customer wrote to, never another one."""
        return {"channel": event.channel, "account_id": event.account_id, "to": event.sender.id,
                "type": "text", "text": reply, "idempotency_key": f"ai:{event.id}"}

    def _sending_accounts(self, channel: str) -> set[str] | None:
        channels = self.app.get(keys.CHANNELS) if self.app is not None else None
        accounts = getattr((channels or {}).get(channel), "accounts", None)
        return set(accounts()) if callable(accounts) else None

    async def _outbound(self) -> Any:
        if self.app is None:
            if not await wait_event(self._attached, START_WAIT_SECONDS):
                raise RetryableError("the gateway has not started yet")
        assert self.app is not None
        if keys.OUTBOUND not in self.app:
            raise RetryableError("no outbound service in this gateway (app[keys.OUTBOUND] is "
                                 "missing): replies cannot be sent")
        return self.app[keys.OUTBOUND]

    @staticmethod
    async def _send(outbound: Any, body: dict[str, Any]) -> None:
        try:
            await outbound.send(body)
        except (PermanentError, RetryableError):
            raise
        except (ValueError, TypeError, KeyError) as exc:  # refused: invalid, window, consent
            if getattr(exc, "code", None) == "outside_window":
                # The message is recent (see max_age_seconds), so the outbox has not recorded
                # it yet: its own sink runs beside this one. Try again in a moment.
                raise RetryableError(f"outbound has not seen the customer's message yet: {exc}",
                                     retry_after=0.1) from exc
            raise PermanentError(f"outbound refused the reply: {exc}") from exc
