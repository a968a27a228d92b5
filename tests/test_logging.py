"""Log lines are JSON off a terminal; secrets are masked always, message content unless log_text."""

from __future__ import annotations

import io
import json

import pytest

from gateway import logging as gwlog
from gateway.config import LoggingConfig


def log_line(log_text: bool) -> dict:
    stream = io.StringIO()
    gwlog.setup(LoggingConfig(format="json", log_text=log_text), stream=stream)
    gwlog.get("test").info("sent", app_secret="s3cr3t", access_token="EAAB", api_key="sk-1",
                           erasure_audit_key="k" * 32,
                           authorization="Bearer x", text="hello there", body="{}", sink="jsonl")
    return json.loads(stream.getvalue().splitlines()[-1])


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    gwlog.setup(LoggingConfig())


def test_default_masks_secrets_and_content():
    line = log_line(log_text=False)
    for key in ("app_secret", "access_token", "api_key", "authorization", "erasure_audit_key",
                "text", "body"):
        assert line[key] == "***", key
    assert line["sink"] == "jsonl" and line["event"] == "sent" and line["component"] == "test"


def test_log_text_shows_content_but_never_secrets():
    line = log_line(log_text=True)
    assert line["text"] == "hello there" and line["body"] == "{}"
    for key in ("app_secret", "access_token", "api_key", "authorization"):
        assert line[key] == "***", key


def test_url_credentials_are_masked_in_every_string_value():
    stream = io.StringIO()
    gwlog.setup(LoggingConfig(format="json"), stream=stream)
    log = gwlog.get("test")
    log.warning("POST https://u:hunter2@crm.example/hook failed", sink="forward",
                reason="redis://:redis-pw-3@127.0.0.1:6379/0 refused",
                targets=["https://a:b-pw-4@x.example/?api_key=key-5&page=2"])
    try:
        raise RuntimeError("cannot reach https://bob:exc-pw-6@crm.example/hook")
    except RuntimeError:
        log.exception("sink_failed")
    text = stream.getvalue()
    first, second = (json.loads(line) for line in text.splitlines()[-2:])
    assert first["event"] == "POST https://***@crm.example/hook failed"
    assert first["reason"] == "redis://***@127.0.0.1:6379/0 refused"
    assert first["targets"] == ["https://***@x.example/?api_key=***&page=2"]
    assert "https://***@crm.example/hook" in second["exception"]
    for leak in ("hunter2", "redis-pw-3", "b-pw-4", "key-5", "exc-pw-6"):
        assert leak not in text, leak
