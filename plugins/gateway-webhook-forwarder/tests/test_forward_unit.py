"""The sink on its own: config, status classification (httpx.MockTransport), signing helpers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest
from gateway import ConfigError, PermanentError, RateLimited, Record, RetryableError, events
from gateway.config import GatewayConfig, section

from gateway_webhook_forwarder import ForwardConfig, ForwardSink, register_sinks, sign, verify
from gateway_webhook_forwarder.sink import retry_after

URL = "https://receiver.example/hook"


def config(**table) -> GatewayConfig:
    return GatewayConfig(sinks={"forward": {"url": URL, "secret": "s3cret", **table}})


def record(n: int = 1) -> Record:
    ev = events.Message(
        schema=1, id=f"ev{n}", channel="whatsapp", direction="inbound", account_id="100",
        conversation_id="whatsapp:100:155", sender=events.Party(id="155"),
        recipient=events.Party(id="100"), timestamp=datetime(2025, 1, 1, tzinfo=UTC),
        message_id=f"wamid.{n}", type="text", text="hi")
    return Record(n, ev, events.encode(ev), time.time())


async def started(handler, **table) -> ForwardSink:
    sink = ForwardSink(section(config(**table), "sinks", "forward", ForwardConfig),
                       transport=httpx.MockTransport(handler))
    await sink.start()
    return sink


# -- configuration -------------------------------------------------------------------------------

def test_absent_or_disabled_table_registers_nothing():
    assert register_sinks(config=GatewayConfig()) == []
    assert register_sinks(config=config(enabled=False)) == []
    [sink] = register_sinks(config=config())
    assert sink.name == "forward" and sink.config.url == URL


@pytest.mark.parametrize(("table", "key"), [
    ({"url": None}, "sinks.forward.url"),
    ({"ulr": URL}, "sinks.forward.ulr"),
    ({"url": "ftp://x/"}, "sinks.forward.url"),
    ({"secret": ""}, "sinks.forward.secret"),
    ({"timeout": 0}, "sinks.forward.timeout"),
    ({"format": "xml"}, "sinks.forward.format"),
    ({"batch_size": 1000}, "sinks.forward.batch_size"),
])
def test_bad_config_names_the_key(table, key):
    data = {"url": URL, "secret": "s3cret", **table}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        section(GatewayConfig(sinks={"forward": data}), "sinks", "forward", ForwardConfig)
    assert err.value.key == key


def test_secret_from_env_reference_and_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_FORWARD_SECRET", "from-env")
    table = section(config(secret={"env": "MY_FORWARD_SECRET"}), "sinks", "forward", ForwardConfig)
    assert table.secret == "from-env"
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    table = section(config(secret={"file": str(secret_file)}), "sinks", "forward", ForwardConfig)
    assert table.secret == "from-file"
    monkeypatch.setenv("GATEWAY_FORWARD_SECRET", "overridden")
    assert section(config(), "sinks", "forward", ForwardConfig).secret == "overridden"


# -- what a write sends and how answers are classified -------------------------------------------

async def test_one_client_for_every_write_with_configured_timeout_and_headers():
    seen = []
    sink = await started(lambda req: seen.append(req) or httpx.Response(204), timeout=2.5,
                         headers={"Authorization": "Bearer abc"})
    client = sink._client
    await sink.write([record(1), record(2)])
    await sink.write([record(3)])
    assert sink._client is client and client.timeout == httpx.Timeout(2.5)
    assert [r.headers["X-Gateway-Event-Ids"] for r in seen] == ["ev1,ev2", "ev3"]
    assert all(r.headers["Authorization"] == "Bearer abc" for r in seen)
    assert seen[0].content == record(1).data + b"\n" + record(2).data + b"\n"
    assert verify("s3cret", seen[0].content, seen[0].headers["X-Gateway-Signature"])
    await sink.close()
    assert sink._client is None and client.is_closed


@pytest.mark.parametrize(("status", "error"), [
    (200, None), (202, None), (204, None),
    (301, PermanentError), (400, PermanentError), (401, PermanentError), (403, PermanentError),
    (404, PermanentError), (409, PermanentError), (413, PermanentError), (422, PermanentError),
    (408, RetryableError), (429, RateLimited),
    (500, RetryableError), (502, RetryableError), (503, RetryableError), (504, RetryableError),
])
async def test_status_classification(status, error):
    sink = await started(lambda req: httpx.Response(status, text="why"))
    if error is None:
        await sink.write([record()])
    else:
        with pytest.raises(error) as err:
            await sink.write([record()])
        assert type(err.value) is error
        assert str(status) in str(err.value)
    await sink.close()


@pytest.mark.parametrize("exc", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"),
                                 httpx.RemoteProtocolError("eof")])
async def test_network_errors_are_retryable(exc):
    def boom(request):
        raise exc

    sink = await started(boom)
    with pytest.raises(RetryableError) as err:
        await sink.write([record()])
    assert type(exc).__name__ in str(err.value)
    await sink.close()


async def test_retry_after_is_honoured_and_capped():
    answers = iter([httpx.Response(429, headers={"Retry-After": "7"}),
                    httpx.Response(503, headers={"Retry-After": "99999"}),
                    httpx.Response(500)])
    sink = await started(lambda req: next(answers), max_retry_after=60)
    hints = []
    for _ in range(3):
        with pytest.raises(RetryableError) as err:
            await sink.write([record()])
        hints.append(err.value.retry_after)
    assert hints == [7.0, 60.0, None]
    await sink.close()


def test_retry_after_parses_seconds_and_http_dates():
    now = 1_700_000_000.0
    later = format_datetime(datetime.fromtimestamp(now + 30, tz=UTC), usegmt=True)
    assert retry_after("12", now) == 12.0
    assert retry_after(later, now) == pytest.approx(30.0)
    assert retry_after(format_datetime(datetime.fromtimestamp(now - 30, tz=UTC), usegmt=True),
                       now) == 0.0
    assert retry_after("soon", now) is None
    assert retry_after(None, now) is None


# -- signing -------------------------------------------------------------------------------------

def test_sign_and_verify():
    body = b'{"id":"x"}\n'
    header = sign("k", body, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify("k", body, header, now=1_700_000_100)
    assert not verify("k", body + b" ", header, now=1_700_000_100)      # tampered body
    assert not verify("other", body, header, now=1_700_000_100)          # wrong secret
    assert not verify("k", body, header, now=1_700_000_000 + 301)       # too old (replay)
    assert not verify("k", body, None) and not verify("k", body, "v1=abc")
    rotated = header.replace(",v1=", ",v1=" + "0" * 64 + ",v1=")        # old + new signature
    assert verify("k", body, rotated, now=1_700_000_000)


SECRET_URL = "https://hook-user:hook-pass-8e1f@receiver.example:8443/hook?token=tok-5c2a&x=1"


@pytest.mark.parametrize("answer", [lambda req: httpx.Response(403, text="no"),
                                    lambda req: httpx.Response(503, text="later")])
async def test_errors_never_carry_url_credentials_or_query(answer):
    sink = await started(answer, url=SECRET_URL)
    with pytest.raises((PermanentError, RetryableError)) as err:
        await sink.write([record()])
    await sink.close()
    text = str(err.value)
    assert "https://receiver.example:8443/hook answered" in text
    for leak in ("hook-user", "hook-pass-8e1f", "tok-5c2a", "?"):
        assert leak not in text


async def test_network_error_never_carries_url_credentials_or_query():
    def boom(request):
        raise httpx.ConnectError("refused")

    sink = await started(boom, url=SECRET_URL)
    with pytest.raises(RetryableError) as err:
        await sink.write([record()])
    await sink.close()
    assert str(err.value) == "POST https://receiver.example:8443/hook failed: ConnectError"
