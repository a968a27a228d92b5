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
