"""structlog set-up: JSON lines off a terminal, console rendering on one. Secrets never logged."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from gateway.config import LoggingConfig, mask_url

SECRET_WORDS = ("secret", "token", "authorization", "api_key", "password", "private_key",
                "audit_key", "signing_key")  # always masked
CONTENT_WORDS = ("text", "body")  # personal data: masked unless ``logging.log_text``


def _masker(words: tuple[str, ...]):
    """Mask values under a secret (or content) key, and URL credentials in every other string
    value, tracebacks included (``scheme://user:pass@`` -> ``scheme://***@``)."""
    def mask(_: object, __: str, event_dict: dict) -> dict:
        for key, value in list(event_dict.items()):
            if key != "event" and any(word in key.lower() for word in words):
                event_dict[key] = "***"
            else:
                event_dict[key] = _masked_urls(value)
        return event_dict

    return mask


def _masked_urls(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {k: _masked_urls(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked_urls(v) for v in value]
    if isinstance(value, BaseException) and "://" in str(value):
        return mask_url(f"{type(value).__name__}: {value}")
    return value


def setup(config: LoggingConfig | None = None, stream=None) -> None:
    """Configure structlog and the stdlib root logger once per process."""
    config = config or LoggingConfig()
    stream = stream or sys.stderr
    as_json = config.format == "json" or (config.format == "auto" and not stream.isatty())
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    processors.append(structlog.processors.format_exc_info)  # tracebacks pass the masker too
    processors.append(_masker(SECRET_WORDS if config.log_text else SECRET_WORDS + CONTENT_WORDS))
    renderer = (structlog.processors.JSONRenderer() if as_json
                else structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    level = getattr(logging, config.level.upper())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=stream)


def get(name: str = "gateway") -> structlog.typing.FilteringBoundLogger:
    """A bound logger named ``name``."""
    return structlog.get_logger(component=name)
