"""The AI responder sink: who gets an answer, what is sent, how provider errors are classified.

Unit tests drive ``AISink.write`` with a recording outbound service; integration tests run a real
gateway whose replies go through the outbound service to a GraphSimulator, with customers played
by the MetaSimulator and OpenAI played by ``gateway.testing.openai_server``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime

import msgspec
import pytest

from gateway import config as gwconfig
from gateway import keys
from gateway.errors import ConfigError, PermanentError, RateLimited, RetryableError
from gateway.events import Message, Party, Status, conversation_id, encode
from gateway.sink import Record
from gateway.testing.graph import GraphSimulator
from gateway.testing.openai_server import OpenAIServer
from gateway.testing.simulator import MetaSimulator
from sinks.ai.sink import AIConfig, AISink, fit
from tests.conftest import SECRET, VERIFY, fixture_bytes

WA_ACCOUNT = "100000000000001"
IG_ACCOUNT = "17840000000000001"
_seq = itertools.count(1)


class RecordingOutbound:
    """Stands in for ``app[keys.OUTBOUND]``: records every body, optionally fails."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[dict] = []
        self.fail = fail

    async def send(self, body: dict) -> dict:
        if self.fail is not None:
            raise self.fail
        self.sent.append(body)
        return {"id": f"out-{len(self.sent)}", "status": "queued"}


def message(text: str | None = "Hi, is my order on its way?", *, customer: str = "15550001234",
            channel: str = "whatsapp", direction: str = "inbound", standby: bool = False,
            type: str = "text", name: str | None = "Alex Example", event_id: str | None = None,
            cls=Message) -> Message:
    account = WA_ACCOUNT if channel == "whatsapp" else IG_ACCOUNT
    n = next(_seq)
    customer_party = Party(customer, name)
    business = Party(account)
    inbound = direction == "inbound"
    return cls(schema=1, id=event_id or f"ev-{n}", channel=channel, direction=direction,
               account_id=account, conversation_id=conversation_id(channel, account, customer),
               sender=customer_party if inbound else business,
               recipient=business if inbound else customer_party,
               timestamp=datetime.now(UTC), message_id=f"wamid.{n}", type=type, text=text,
               standby=standby)


def records(*events) -> list[Record]:
    return [Record(next(_seq), ev, encode(ev), 0.0) for ev in events]


def ai_config(**kw) -> AIConfig:
    config = msgspec.convert(kw, AIConfig)
    config.validate("sinks.ai")
    return config


async def started_sink(outbound=None, **kw) -> tuple[AISink, RecordingOutbound]:
    sink = AISink(ai_config(**kw))
    await sink.start()
    outbound = outbound or RecordingOutbound()
    sink.attach({keys.OUTBOUND: outbound})
    return sink, outbound


# -- rules provider, unit ---------------------------------------------------------------------

async def test_rules_reply_once_per_inbound_text():
    sink, out = await started_sink()
    first = message("Hi, is my order on its way?")
    second = message("Do you ship to Lisbon?", customer="9000000000000001", channel="instagram",
                     name=None)
    await sink.write(records(first, second))
    assert [b["to"] for b in out.sent] == ["15550001234", "9000000000000001"]
    body = out.sent[0]
    assert body == {"channel": "whatsapp", "account_id": WA_ACCOUNT, "to": "15550001234",
                    "type": "text", "text": body["text"], "idempotency_key": f"ai:{first.id}"}
    assert "order" in body["text"].lower()
    assert "ship" in out.sent[1]["text"].lower()
    await sink.close()


async def test_no_reply_to_echo_standby_status_reaction_media_or_empty_text():
    sink, out = await started_sink()
    skipped = [
        message(direction="outbound"),                      # echo of the business's own message
        message(standby=True, channel="instagram", customer="9000000000000001"),
        message(cls=Status, type=None, text=None),           # a delivery status
        message(type="image", text="a caption"),             # not in reply_types
        message(text="   "),
        msgspec.structs.replace(message(), raw_type="edit", reply_to="wamid.1"),  # a correction
        msgspec.structs.replace(message(channel="instagram", customer="9000000000000001"),
                                raw_type="message_edit", reply_to="aWdfTEST_IN_1"),
    ]
    await sink.write(records(*skipped))
    assert out.sent == []
    await sink.close()


async def test_never_twice_to_one_event():
    sink, out = await started_sink()
    event = message()
    await sink.write(records(event, event))      # the same event twice in a batch
    await sink.write(records(event))             # and handed over again later
    assert len(out.sent) == 1
    await sink.close()


async def test_answered_memory_is_bounded():
    sink, out = await started_sink(remember_events=2)
    events = [message(event_id=f"bounded-{i}") for i in range(3)]
    await sink.write(records(*events))
    assert len(out.sent) == 3
    assert not sink.memory.answered("bounded-0")
    assert sink.memory.answered("bounded-2")
    await sink.close()


async def test_configured_rules_come_first_and_greeting_opens_a_conversation():
    sink, out = await started_sink(rules=[{"match": ["lisbon", "porto"], "reply": "Yes, {name}!"}],
                                   greeting="Welcome, {name}.")
    await sink.write(records(message("Do you ship to Lisbon?"),
                             message("hmm", customer="15550005678", name="Sam Sample")))
    assert [b["text"] for b in out.sent] == ["Yes, Alex!", "Welcome, Sam."]
    await sink.close()


async def test_reply_types_are_configurable():
    sink, out = await started_sink(reply_types=["button"])
    button = message("Confirm", type="button")
    await sink.write(records(message("text"), button))
    assert [b["idempotency_key"] for b in out.sent] == [f"ai:{button.id}"]
    await sink.close()


async def test_without_outbound_service_the_write_is_retryable():
    sink = AISink(ai_config())
    await sink.start()
    sink.attach({})
    with pytest.raises(RetryableError, match="outbound"):
        await sink.write(records(message()))
    await sink.close()


async def test_partial_batch_failure_retries_one_by_one_and_never_repeats():
    class FailFor(RecordingOutbound):
        async def send(self, body):
            if body["to"] == "bad":
                raise PermanentError("recipient refused")
            return await super().send(body)

    sink, out = await started_sink(FailFor())
    good, bad = message(), message(customer="bad")
    with pytest.raises(RetryableError) as info:  # never Permanent for a batch: it would
        await sink.write(records(good, bad))     # dead-letter the answered event too
    assert not isinstance(info.value, PermanentError)
    assert len(out.sent) == 1
    await sink.write(records(good))              # the dispatcher's one-by-one retry
    with pytest.raises(PermanentError):
        await sink.write(records(bad))
    assert len(out.sent) == 1
    await sink.close()


async def test_outbound_refusals_are_classified():
    from gateway.outbound.service import Refused

    window = Refused("outside_window", "type", "free-form message outside the 24-hour window")
    sink, out = await started_sink(RecordingOutbound(fail=window))
    with pytest.raises(RetryableError) as info:  # the outbox sink has not seen it yet
        await sink.write(records(message()))
    assert not isinstance(info.value, PermanentError)
    sink, out = await started_sink(RecordingOutbound(fail=ValueError("to: not a wa_id")))
    with pytest.raises(PermanentError, match="not a wa_id"):
        await sink.write(records(message()))


async def test_messages_older_than_max_age_get_no_answer():
    from datetime import timedelta

    sink, out = await started_sink(max_age_seconds=3600)
    old = message()
    old = msgspec.structs.replace(old, timestamp=old.timestamp - timedelta(hours=2))
    await sink.write(records(old, message("and a fresh one")))
    assert len(out.sent) == 1 and sink.memory.answered(old.id)
    await sink.close()


@pytest.mark.parametrize("channel", ["whatsapp", "instagram"])
async def test_a_message_to_an_account_we_do_not_send_as_gets_no_reply(channel):
    """The customer wrote to another number of the app (or an Instagram account whose id is not
    configured): no reply, and none from the one account we do send as. It used to be sent from
    that account: a reply from a number the customer never wrote to."""
    class Channel:
        def accounts(self):
            return {"page-1": {}}

    sink, out = await started_sink()
    sink.attach({keys.OUTBOUND: out, keys.CHANNELS: {channel: Channel()}})
    event = message("hi", channel=channel, customer="9000000000000001")
    await sink.write(records(event))
    assert out.sent == [] and sink.memory.answered(event.id)
    sink.attach({keys.OUTBOUND: out, keys.CHANNELS: {channel: type("Ours", (), {
        "accounts": lambda self: {event.account_id: {}}})()}})
    await sink.write(records(message("hi again", channel=channel, customer="9000000000000001")))
    assert [b["account_id"] for b in out.sent] == [event.account_id]
    await sink.close()


async def test_an_unsent_message_leaves_the_history_and_is_never_answered(openai_server):
    """webhooks.md: a customer may unsend (WhatsApp ``revoke``, Instagram ``is_deleted``). What
    they took back must not go to the provider with every later message."""
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    card = message("my card is 4111 1111 1111 1111")
    await sink.write(records(card))
    unsend = msgspec.structs.replace(message(None, type="deleted"), message_id=card.message_id)
    await sink.write(records(unsend))
    await sink.write(records(message("what are your opening hours?")))
    contents = [m["content"] for m in openai_server.requests[-1]["messages"]]
    assert not any("4111" in c for c in contents)
    assert contents[-1] == "what are your opening hours?" and len(contents) == 2  # system + it
    # unsent before it was answered: in the same batch, or a retry after the unsend
    late = message("my pin is 1234")
    gone = msgspec.structs.replace(message(None, type="deleted"), message_id=late.message_id)
    before = len(openai_server.requests)
    await sink.write(records(late, gone))
    await sink.write(records(late))
    assert len(openai_server.requests) == before and sink.memory.answered(late.id)
    await sink.close()


@pytest.mark.parametrize("together", [False, True], ids=["later-batch", "same-batch"])
async def test_an_edit_replaces_the_customers_text_in_the_history(openai_server, together):
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    first = message("my adress is 5 Mian St")
    fixed = msgspec.structs.replace(message("my address is 5 Main St"), raw_type="edit",
                                    reply_to=first.message_id)
    if together:
        await sink.write(records(first, fixed))
    else:
        await sink.write(records(first))
        await sink.write(records(fixed))
    assert len(out.sent) == 1  # an edit is not answered
    await sink.write(records(message("when will it ship?")))
    contents = [m["content"] for m in openai_server.requests[-1]["messages"]]
    assert "my address is 5 Main St" in contents and "my adress is 5 Mian St" not in contents
    await sink.close()


@pytest.mark.parametrize("finish_reason, refusal", [("length", None), ("content_filter", None),
                                                    ("stop", "I can't help with that.")])
async def test_an_answer_that_is_not_whole_is_not_sent(openai_server, finish_reason, refusal):
    """A completion cut off at ``max_tokens``, filtered, or refused is not a reply to send."""
    openai_server.finish_reason, openai_server.refusal = finish_reason, refusal
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url, max_tokens=5)
    event = message("Where is my refund?")
    await sink.write(records(event))
    assert out.sent == [] and sink.memory.answered(event.id)
    await sink.close()


@pytest.mark.parametrize("raw, content_type", [
    (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    (b'{"id": "chatcmpl-1", "choices": [', "application/json"),
], ids=["html", "cut-json"])
async def test_an_answer_that_is_no_completion_is_retryable(openai_server, raw, content_type):
    openai_server.answer_next_raw(raw, content_type)
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    with pytest.raises(RetryableError, match="malformed provider answer"):
        await sink.write(records(message("hello?")))
    await sink.close()


async def test_an_edit_before_its_message_is_the_text_the_history_keeps(openai_server):
    """Meta keeps no order: the edit may come first. The message is answered as it was sent,
    and the history then holds the edit, as if they had come in order."""
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    first = message("my adress is 5 Mian St")
    fixed = msgspec.structs.replace(message("my address is 5 Main St"), raw_type="edit",
                                    reply_to=first.message_id)
    await sink.write(records(fixed))
    await sink.write(records(first))
    await sink.write(records(message("when will it ship?")))
    contents = [m["content"] for m in openai_server.requests[-1]["messages"]]
    assert "my address is 5 Main St" in contents and "my adress is 5 Mian St" not in contents
    await sink.close()


async def test_what_is_kept_of_unsent_and_edited_messages_goes_with_an_erasure():
    """A wamid embeds the customer's number: the unsent ids the sink keeps are opaque hashes,
    owned by nobody after an erasure; an edit waiting for its message (their words) is gone."""
    sink, out = await started_sink()
    late = message("hi")
    unsend = msgspec.structs.replace(message(None, type="deleted"), message_id="wamid.HBgL1650")
    edit = msgspec.structs.replace(message("fixed"), raw_type="edit", reply_to="wamid.NOT.YET")
    await sink.write(records(unsend, edit, late))
    kept = repr(vars(sink.memory))
    assert "wamid.HBgL1650" not in kept and "wamid.NOT.YET" not in kept
    await sink.erase_contact("whatsapp", late.customer_id)
    assert sink.memory._edits == {}
    assert set(sink.memory._revoked.values()) == {("", "")}
    assert sink.memory.revoked("whatsapp", "wamid.HBgL1650")  # still never answered
    await sink.close()


@pytest.mark.parametrize("reason", ["eos", "eos_token", None])
async def test_a_whole_answer_of_another_server_is_sent(openai_server, reason):
    """Servers that speak Chat Completions end a whole answer otherwise than OpenAI's "stop"
    (Together "eos", TGI and watsonx "eos_token", proxies none): it is a reply."""
    openai_server.finish_reason = reason
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    await sink.write(records(message("Where is my refund?")))
    assert [b["text"] for b in out.sent] == ["Happy to help!"]
    await sink.close()


async def test_a_draft_of_a_message_unsent_before_its_retry_is_dropped(openai_server):
    outbound = RecordingOutbound(fail=RetryableError("Meta is down"))
    sink, _ = await started_sink(outbound, provider="openai", api_key="sk-test",
                                 base_url=openai_server.base_url)
    event = message("my card is 4111")
    with pytest.raises(RetryableError):
        await sink.write(records(event))
    assert event.id in sink._drafts
    unsend = msgspec.structs.replace(message(None, type="deleted"), message_id=event.message_id)
    await sink.write(records(event, unsend))
    assert sink._drafts == {} and outbound.sent == []
    await sink.close()


async def test_a_draft_for_a_contact_erased_meanwhile_is_not_kept(openai_server):
    """The erasure lands while the provider answers and the send then fails: the draft (the
    reply's text, about the erased contact) must not stay in memory."""
    openai_server.delay = 0.3
    outbound = RecordingOutbound(fail=RetryableError("Meta is down"))
    sink, _ = await started_sink(outbound, provider="openai", api_key="sk-test",
                                 base_url=openai_server.base_url)
    event = message("ship to 5 Main St")
    task = asyncio.ensure_future(sink.write(records(event)))
    await asyncio.sleep(0.1)
    await sink.erase_contact("whatsapp", event.customer_id)
    with pytest.raises(RetryableError):
        await task
    assert sink._drafts == {}
    await sink.close()


async def test_a_channel_name_no_channel_has_is_logged_at_start():
    from structlog.testing import capture_logs

    sink = AISink(ai_config(channels=["whatsap"]))
    await sink.start()
    with capture_logs() as logs:
        sink.attach({keys.OUTBOUND: RecordingOutbound(), keys.CHANNELS: {"whatsapp": object()}})
    (entry,) = [e for e in logs if e["event"] == "ai_unknown_channels"]
    assert entry["channels"] == ["whatsap"] and entry["log_level"] == "error"
    await sink.close()


def test_instagram_replies_fit_in_1000_bytes():
    text = "\u00e9" * 900  # 1800 bytes
    fitted = fit("instagram", text)
    assert len(fitted.encode()) <= 1000 and fitted.endswith("...")
    assert fit("whatsapp", text) == text


@pytest.mark.parametrize("table, key", [
    ({"provider": "openai"}, "sinks.ai.api_key"),
    ({"reply_types": ["text", "hologram"]}, "sinks.ai.reply_types"),
    ({"rules": [{"match": "x", "reply": "y", "typo": 1}]}, "sinks.ai.rules"),
    ({"modle": "gpt"}, "sinks.ai.modle"),
    ({"history": -1}, "sinks.ai.history"),
    ({"model": "  "}, "sinks.ai.model"),
    ({"provider": "openai", "api_key": "   "}, "sinks.ai.api_key"),
    ({"temperature": 7.5}, "sinks.ai.temperature"),
    ({"temperature": float("nan")}, "sinks.ai.temperature"),
    ({"max_tokens": 0}, "sinks.ai.max_tokens"),
    ({"base_url": "localhost:11434/v1"}, "sinks.ai.base_url"),
    ({"base_url": "ftp://models.example/v1"}, "sinks.ai.base_url"),
    ({"channels": ["whatsapp", "whatsapp"]}, "sinks.ai.channels"),
    ({"channels": [""]}, "sinks.ai.channels"),
    ({"base_url": "http://[::1:11434/v1"}, "sinks.ai.base_url"),
])
def test_bad_config_names_the_key(table, key, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = gwconfig.GatewayConfig(sinks={"ai": table})
    with pytest.raises(ConfigError) as info:
        gwconfig.section(config, "sinks", "ai", AIConfig)
    assert info.value.key.startswith(key)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    config = gwconfig.GatewayConfig(sinks={"ai": {"provider": "openai"}})
    assert gwconfig.section(config, "sinks", "ai", AIConfig).api_key == "sk-from-env"


# -- openai provider, unit (real SDK against the OpenAI-compatible test server) ---------------

@pytest.fixture
async def openai_server():
    async with OpenAIServer(api_key="sk-test", reply="Happy to help!") as server:
        yield server


async def test_openai_request_has_model_system_prompt_and_history(openai_server):
    sink, out = await started_sink(provider="openai", api_key="sk-test", model="gpt-test",
                                   base_url=openai_server.base_url, system_prompt="Be brief.",
                                   history=4)
    await sink.write(records(message("Hi there")))
    await sink.write(records(message("Where is my order?")))
    first, second = openai_server.requests
    assert first["model"] == "gpt-test"
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi there"}]
    assert second["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Hi there"},
                                  {"role": "assistant", "content": "Happy to help!"},
                                  {"role": "user", "content": "Where is my order?"}]
    assert openai_server.headers[0]["Authorization"] == "Bearer sk-test"
    assert [b["text"] for b in out.sent] == ["Happy to help!", "Happy to help!"]
    for i in range(3):  # history keeps the last 4 messages only
        await sink.write(records(message(f"more {i}")))
    assert len(openai_server.requests[-1]["messages"]) == 1 + 4 + 1
    await sink.close()


async def test_openai_history_is_per_conversation(openai_server):
    openai_server.reply = None  # echo
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    await sink.write(records(message("from Alex")))
    await sink.write(records(message("from Sam", customer="15550005678")))
    assert len(openai_server.requests[1]["messages"]) == 2
    assert out.sent[1]["text"] == "echo: from Sam"
    await sink.close()


@pytest.mark.parametrize("status, error", [(429, RateLimited), (500, RetryableError),
                                           (503, RetryableError), (400, PermanentError)])
async def test_openai_errors_are_classified(openai_server, status, error):
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    openai_server.fail_next(status)
    event = message()
    with pytest.raises(error):
        await sink.write(records(event))
    assert out.sent == []
    if error is not PermanentError:
        await sink.write(records(event))  # the retry succeeds, once
        await sink.write(records(event))
        assert len(out.sent) == 1
    await sink.close()


async def test_openai_bad_key_is_permanent(openai_server):
    sink, out = await started_sink(provider="openai", api_key="sk-wrong",
                                   base_url=openai_server.base_url)
    with pytest.raises(PermanentError, match="401"):
        await sink.write(records(message()))
    await sink.close()


async def test_openai_timeout_is_retryable(openai_server):
    openai_server.delay = 2.0
    sink, out = await started_sink(provider="openai", api_key="sk-test", timeout=0.3,
                                   base_url=openai_server.base_url)
    with pytest.raises(RetryableError):
        await sink.write(records(message()))
    await sink.close()


async def test_openai_unreachable_is_retryable():
    from gateway.testing import free_port

    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(RetryableError):
        await sink.write(records(message()))
    await sink.close()


# -- integration: a real gateway, its outbound service, the Meta simulator --------------------

SINKS_AI_RULES = """
[sinks.jsonl]
[sinks.ai]
backoff_initial = 0.05
backoff_max = 0.2
"""


def channels_toml(graph_url: str) -> str:
    return f"""
[channels.whatsapp]
app_secret = "{SECRET}"
verify_token = "{VERIFY}"
access_token = "test-access-token"
phone_number_id = "{WA_ACCOUNT}"
graph_base_url = "{graph_url}"
[channels.instagram]
app_secret = "{SECRET}"
verify_token = "{VERIFY}"
access_token = "test-access-token"
page_id = "{IG_ACCOUNT}"
graph_base_url = "{graph_url}"
"""


@pytest.fixture
async def meta(request):
    """A started MetaSimulator factory bound to a gateway URL later (``await meta(gw)``)."""
    graph = GraphSimulator()
    await graph.start()
    sims = []

    def bind(gw):
        sim = MetaSimulator(gw.url, app_secret=SECRET, graph=graph, status_delays=(0, 0, 0),
                            echo_delay=0, read_delay=0)
        sims.append(sim)
        return sim

    bind.graph = graph
    yield bind
    for sim in sims:
        await sim.stop()
    await graph.stop()


class Accepted:
    """Collects what the GraphSimulator accepts (attach before anything is sent)."""

    def __init__(self, graph) -> None:
        self.graph = graph
        self.items: list = []
        graph.on_accept.append(self.items.append)

    def to(self, customer: str) -> list:
        return [a for a in self.items if str(a.to) == customer]

    async def wait(self, customer: str, count: int = 1, timeout: float = 10.0) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.to(customer)) < count and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.to(customer)

    def close(self) -> None:
        self.graph.on_accept.remove(self.items.append)


async def _require_outbound(gw):
    assert keys.OUTBOUND in gw.app, "the gateway has no outbound service"


async def test_rules_reply_goes_through_outbound_to_graph(gateway, meta):
    gw = await gateway(sinks=SINKS_AI_RULES, channels=channels_toml(meta.graph.url))
    await _require_outbound(gw)
    accepted = Accepted(meta.graph)
    async with meta(gw) as sim:
        delivery = await sim.customer_says("whatsapp", "15550001234", "Is my order on its way?")
        assert delivery.ok
        await sim.customer_says("instagram", "9000000000000001", "Do you ship to Lisbon?")
        [reply] = await accepted.wait("15550001234")
        [ig_reply] = await accepted.wait("9000000000000001")
        assert reply.body["type"] == "text" and "order" in reply.body["text"]["body"].lower()
        assert "ship" in ig_reply.body["message"]["text"].lower()
        assert await sim.drain()
        await gw.settle()
    statuses = [e for e in gw.jsonl() if e["kind"] == "status"]
    assert {e["status"] for e in statuses} >= {"sent", "delivered", "read"}
    echoes = [e for e in gw.jsonl() if e["kind"] == "message" and e["direction"] == "outbound"]
    assert [e["message_id"] for e in echoes] == [ig_reply.message_id]
    accepted.close()


async def test_no_reply_to_standby_echo_status_or_duplicate(gateway, meta):
    gw = await gateway(sinks=SINKS_AI_RULES, channels=channels_toml(meta.graph.url))
    await _require_outbound(gw)
    accepted = Accepted(meta.graph)
    async with meta(gw) as sim:
        for name in ("instagram/standby.json", "instagram/echo.json",
                     "whatsapp/status_delivered.json", "instagram/read.json"):
            channel = name.split("/")[0]
            assert (await gw.post(channel, fixture_bytes(name)))[0] == 200
        body = sim.whatsapp_message("15550005678", sim.new_wamid(), "Where is my order?",
                                    time.time(), name="Sam Sample")
        for _ in range(3):  # Meta redelivers the same message
            assert (await sim.deliver("whatsapp", body)).ok
        await gw.settle()
        assert len(await accepted.wait("15550005678")) == 1
        await asyncio.sleep(0.5)
        await gw.settle()
    assert len(accepted.to("15550005678")) == 1
    assert accepted.to("9000000000000001") == [] and len(accepted.items) == 1
    accepted.close()


async def test_openai_reply_429_retried_then_sent(gateway, meta, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with OpenAIServer(api_key="sk-test", reply="An answer from the model.") as server:
        sinks = (SINKS_AI_RULES + f'provider = "openai"\napi_key = "sk-test"\n'
                 f'base_url = "{server.base_url}"\nmodel = "gpt-test"\n')
        gw = await gateway(sinks=sinks, channels=channels_toml(meta.graph.url))
        await _require_outbound(gw)
        server.fail_next(429)
        accepted = Accepted(meta.graph)
        async with meta(gw) as sim:
            await sim.customer_says("whatsapp", "15550001234", "Hello?")
            [reply] = await accepted.wait("15550001234")
        accepted.close()
        assert reply.body["text"]["body"] == "An answer from the model."
        assert len(server.requests) == 2 and server.requests[1]["model"] == "gpt-test"
        registry = gw.app[keys.METRICS].registry
        assert registry.get_sample_value("gateway_sink_deliveries_total",
                                         {"sink": "ai", "outcome": "retry"}) >= 1


async def test_openai_bad_key_dead_letters(gateway, meta, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with OpenAIServer(api_key="sk-right") as server:
        sinks = (SINKS_AI_RULES + f'provider = "openai"\napi_key = "sk-wrong"\n'
                 f'base_url = "{server.base_url}"\n')
        gw = await gateway(sinks=sinks, channels=channels_toml(meta.graph.url))
        await _require_outbound(gw)
        async with meta(gw) as sim:
            await sim.customer_says("whatsapp", "15550001234", "Hello?")
            await gw.settle()
            for _ in range(100):
                letters = await gw.app[keys.JOURNAL].dead_letters("ai", 10)
                if letters:
                    break
                await asyncio.sleep(0.05)
        assert len(letters) == 1 and "401" in letters[0].reason
        assert len(server.requests) == 1  # permanent: not retried


# -- erasure (GDPR): the remembered history goes with the contact ------------------------------

ERASED = "15550001234"
KEPT = "15550005678"
TOKEN = "ai-erasure-token"


def user_texts(request: dict) -> list[str]:
    return [m["content"] for m in request["messages"] if m["role"] != "system"]


async def test_erasure_through_the_endpoint_forgets_the_contacts_history(gateway, meta,
                                                                        monkeypatch):
    """Before the erasure, a customer's old texts are sent to OpenAI with every new message;
    after ``DELETE /v1/contacts/...`` they are gone, while another customer keeps theirs."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with OpenAIServer(api_key="sk-test", reply=None) as server:  # echoes the user
        sinks = (SINKS_AI_RULES + f'provider = "openai"\napi_key = "sk-test"\n'
                 f'base_url = "{server.base_url}"\n')
        gw = await gateway(f'api_token = "{TOKEN}"', sinks=sinks,
                           channels=channels_toml(meta.graph.url))
        await _require_outbound(gw)
        ai = gw.app[keys.SINKS]["ai"]
        accepted = Accepted(meta.graph)
        async with meta(gw) as sim:
            await sim.customer_says("whatsapp", ERASED, "I live at 1 Secret Street")
            await sim.customer_says("whatsapp", KEPT, "I am Sam")
            await accepted.wait(ERASED)
            await accepted.wait(KEPT)
            await sim.customer_says("whatsapp", ERASED, "Did you get my address?")
            assert len(await accepted.wait(ERASED, 2)) == 2
            assert user_texts(server.requests[-1]) == [  # the history the erasure must drop
                "I live at 1 Secret Street", "echo: I live at 1 Secret Street",
                "Did you get my address?"]
            await gw.settle()

            async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{ERASED}",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                status, body = resp.status, await resp.json()
            assert status == 200, body
            assert body["erased"]["ai"] == {"conversations": 1, "messages": 4,
                                            "answered_events": 2}
            assert "ai" not in body["not_stored"]
            conv = conversation_id("whatsapp", WA_ACCOUNT, ERASED)
            assert ai.memory.history(conv) == [] and not ai.memory.known(conv)

            await sim.customer_says("whatsapp", ERASED, "Hello again")
            assert len(await accepted.wait(ERASED, 3)) == 3
            again = [r for r in server.requests if user_texts(r)[-1] == "Hello again"]
            assert [user_texts(r) for r in again] == [["Hello again"]]
            assert not any("Secret Street" in m["content"] for m in again[0]["messages"])

            await sim.customer_says("whatsapp", KEPT, "Still there?")
            assert len(await accepted.wait(KEPT, 2)) == 2
            assert user_texts(server.requests[-1]) == ["I am Sam", "echo: I am Sam",
                                                       "Still there?"]
            await gw.settle()
        accepted.close()
        # A second erasure finds only what was remembered since.
        async with gw.session.delete(f"{gw.url}/v1/contacts/whatsapp/{ERASED}",
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert (await resp.json())["erased"]["ai"] == {
                "conversations": 1, "messages": 2, "answered_events": 1}


async def test_erasure_during_a_reply_is_not_undone(openai_server):
    """The contact is erased while the provider is still answering: the reply goes out (it is
    on its way), its text is not remembered afterwards, and the event is never answered again
    (its id stays, owned by nobody)."""
    openai_server.delay = 0.5
    sink, out = await started_sink(provider="openai", api_key="sk-test",
                                   base_url=openai_server.base_url)
    erased, kept = message("my secret", customer=ERASED), message("hello", customer=KEPT)
    task = asyncio.create_task(sink.write(records(erased, kept)))
    while len(openai_server.requests) < 2:
        await asyncio.sleep(0.01)
    assert await sink.erase_contact("whatsapp", ERASED) == {
        "conversations": 0, "messages": 0, "answered_events": 0}
    await task
    assert sorted(b["to"] for b in out.sent) == [ERASED, KEPT]
    assert sink.memory.history(erased.conversation_id) == []
    assert sink.memory.answered(erased.id)
    assert len(sink.memory.history(kept.conversation_id)) == 2 and sink.memory.answered(kept.id)
    await sink.write(records(erased))  # the dispatcher retrying it: no second reply
    assert sorted(b["to"] for b in out.sent) == [ERASED, KEPT]
    assert sink.memory.erase("whatsapp", ERASED)["answered_events"] == 0  # not theirs any more
    await sink.close()


async def test_erase_contact_matches_channel_and_contact_exactly():
    sink, out = await started_sink()
    events = [message("hi", customer=ERASED), message("hi", customer=ERASED, channel="instagram"),
              message("hi", customer=KEPT)]
    await sink.write(records(*events))
    # the rules provider reads no history, so it remembers no texts: only the conversation
    assert sink.memory.history(events[0].conversation_id) == []
    assert await sink.erase_contact("whatsapp", ERASED) == {
        "conversations": 1, "messages": 0, "answered_events": 1}
    assert [sink.memory.known(e.conversation_id) for e in events] == [False, True, True]
    assert [sink.memory.answered(e.id) for e in events] == [True, True, True]  # ids stay
    await sink.write(records(events[0]))  # redelivered after the erasure: not answered again
    assert len(out.sent) == 3
    assert await sink.erase_contact("whatsapp", ERASED) == {
        "conversations": 0, "messages": 0, "answered_events": 0}
    await sink.close()


async def test_no_reply_to_a_consent_keyword(gateway, meta):
    """STOP and START are commands, not questions: neither is answered. A question the
    opted-out contact asks is (a reply to their own message, which the opt-out does not
    cover)."""
    gw = await gateway(sinks=SINKS_AI_RULES, channels=channels_toml(meta.graph.url))
    await _require_outbound(gw)
    accepted = Accepted(meta.graph)
    customer = "15550001234"
    async with meta(gw) as sim:
        for text in ("STOP", " start "):
            assert (await sim.customer_says("whatsapp", customer, text)).ok
            await gw.settle()
        assert await accepted.wait(customer, timeout=1.0) == []
        await sim.customer_says("whatsapp", customer, "STOP")
        await sim.customer_says("whatsapp", customer, "Is my order on its way?")
        [reply] = await accepted.wait(customer)
        assert "order" in reply.body["text"]["body"].lower()
        await gw.settle()
        assert len(accepted.to(customer)) == 1
    assert await gw.app[keys.JOURNAL].dead_letters() == []
    accepted.close()


async def test_the_timeout_bounds_the_whole_request_to_the_provider():
    """A provider (or a proxy) that trickles its answer a byte at a time: ``timeout`` ends the
    request as a whole (retryable), not each read of it; the sink's worker is free again."""
    import json

    from aiohttp import web

    body = json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 1,
                       "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "hi"}}]}).encode()

    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": str(len(body))})
        await response.prepare(request)
        for i in range(len(body)):
            await response.write(body[i:i + 1])
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", trickle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    sink, out = await started_sink(provider="openai", api_key="sk-test", timeout=0.5,
                                   base_url=f"http://127.0.0.1:{port}/v1")
    started = time.monotonic()
    try:
        with pytest.raises(RetryableError, match="within 0.5 s"):
            await sink.write(records(message("hello")))
        assert time.monotonic() - started < 3  # the answer would take about 10 s
        assert out.sent == []
    finally:
        await sink.close()
        await runner.cleanup()


def test_the_history_is_bounded_in_characters_too():
    """Long messages over many conversations: the texts kept stay within
    ``max_history_chars`` (the least recently used conversations go first), each text within
    4096 characters, and the count follows erasures."""
    from sinks.ai.sink import TURN_CHARS, Memory

    memory = Memory(history=10, conversations=10_000, events=10, chars=50_000)
    for n in range(200):
        memory.add_turn(f"c{n}", "Ж" * 10_000, "r" * 500, ("whatsapp", str(n)))
    kept = [c for c in (f"c{n}" for n in range(200)) if memory.known(c)]
    assert kept == [f"c{n}" for n in range(200 - len(kept), 200)]  # the newest
    texts = [t["content"] for c in kept for t in memory.history(c)]
    assert sum(map(len, texts)) <= 50_000 and max(map(len, texts)) == TURN_CHARS
    assert memory._chars == sum(map(len, texts))
    memory.erase("whatsapp", "199")
    assert memory._chars == sum(len(t["content"]) for c in kept[:-1] for t in memory.history(c))
    for _ in range(20):  # a long conversation: its oldest turns leave the count as they go
        memory.add_turn("c198", "q" * 100, "a" * 100, ("whatsapp", "198"))
    assert memory._chars == sum(len(t["content"]) for c in kept[:-1] for t in memory.history(c))


async def test_a_reply_whose_send_failed_is_sent_again_as_it_was():
    """The provider answered, the send failed (retryable): the retry sends the same text, without
    asking (and paying) the provider again; the history holds what the customer got. An erasure
    drops such a kept reply too."""
    answers = itertools.count(1)
    reply = lambda body: f"answer #{next(answers)}"  # noqa: E731 - a new text per request
    async with OpenAIServer(api_key="sk-test", reply=reply) as srv:
        out = RecordingOutbound(fail=RetryableError("the outbox is busy"))
        sink, _ = await started_sink(out, provider="openai", api_key="sk-test",
                                     base_url=srv.base_url)
        event = message("hello")
        with pytest.raises(RetryableError):
            await sink.write(records(event))
        out.fail = None
        await sink.write(records(event))
        assert len(srv.requests) == 1
        assert [b["text"] for b in out.sent] == ["answer #1"]
        assert sink.memory.history(event.conversation_id)[-1]["content"] == "answer #1"
        other = message("hi again", customer="15550009999")
        out.fail = RetryableError("busy")
        with pytest.raises(RetryableError):
            await sink.write(records(other))
        await sink.erase_contact("whatsapp", "15550009999")
        out.fail = None
        await sink.write(records(other))  # its kept reply was erased: asked afresh
        assert len(srv.requests) == 3 and out.sent[-1]["text"] == "answer #3"
        await sink.close()
