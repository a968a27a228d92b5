"""Meta's Graph API errors as exceptions (meta/outbound.md §4-6).

The sender decides on ``error.code`` (and ``error_subcode`` for code 10), never on the message
text or the HTTP status. Each code maps to a behaviour:

- ``retry``: transient, retry with backoff (``MetaRetryable``);
- ``slow``: throttled, keep the message and park a limiter scope (``MetaThrottled``, ``scope``);
- ``fail``: permanent for this message (``MetaPermanent``);
- ``pause``: stop the account's queue until an operator acts (``AccountPaused``; 190 is
  ``TokenExpired``). ``alert`` marks the errors an operator must hear about.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from gateway.errors import PermanentError, RateLimited, RetryableError


class MetaError(Exception):
    """What every Meta error carries (mixed into the retryable / permanent classes)."""

    code: int = 0
    subcode: int | None = None
    fbtrace_id: str | None = None
    http_status: int = 0
    retryable: bool = False
    alert: bool = False
    hint: str = ""
    scope: str | None = None

    def describe(self) -> dict[str, Any]:
        """The error as stored on an outbox record and shown by ``GET /v1/messages/{id}``."""
        return {"code": self.code, "subcode": self.subcode, "message": str(self),
                "fbtrace_id": self.fbtrace_id, "hint": self.hint or None}


class MetaRetryable(MetaError, RetryableError):
    """Transient: retry with backoff (1, 2, 131000, 131057, 5xx, network)."""

    retryable = True


class MetaThrottled(MetaError, RateLimited):
    """Throttled: park ``scope`` (number, pair, waba, app, ig_account) and try later."""

    retryable = True


class MetaPermanent(MetaError, PermanentError):
    """Permanent for this message: fail it at once with ``hint`` for the operator."""


class AccountPaused(MetaPermanent):
    """The account cannot send until an operator acts (blocked, payment, not registered)."""


class TokenExpired(AccountPaused):
    """190: the access token expired or is invalid. Refresh it, then resume."""


class Rule(NamedTuple):
    kind: type[MetaError]
    scope: str | None
    alert: bool
    hint: str


WINDOW_HINT = ("outside the 24-hour customer-service window: send an approved template "
               "(WhatsApp) or use the HUMAN_AGENT tag within 7 days (Instagram)")
TEMPLATE_HINT = "fix the template name, language or parameters to match the approved template"
RULES: dict[int, Rule] = {
    0: Rule(TokenExpired, None, True, "authentication failed: check the access token"),
    1: Rule(MetaRetryable, None, False, "unknown Meta error; retried"),
    2: Rule(MetaRetryable, None, False, "Meta service temporarily unavailable; retried"),
    3: Rule(MetaPermanent, None, True, "the app lacks a capability for this call"),
    4: Rule(MetaThrottled, "app", False, "application request limit reached; slowing down"),
    10: Rule(MetaPermanent, None, True, "permission denied: check the token's permissions"),
    17: Rule(MetaThrottled, "app", False, "user request limit reached; slowing down"),
    32: Rule(MetaThrottled, "app", False, "page request limit reached; slowing down"),
    100: Rule(MetaPermanent, None, False, "invalid parameter: the request body is wrong"),
    190: Rule(TokenExpired, None, True, "access token expired or invalid: create a new token "
              "(a System User token does not expire) and update channels.<name>.access_token"),
    368: Rule(AccountPaused, None, True, "temporarily blocked for policy violations"),
    551: Rule(MetaPermanent, None, False, "this person is not available (blocked or deactivated)"),
    613: Rule(MetaThrottled, "ig_account", False, "Instagram rate limit; slowing down"),
    80007: Rule(MetaThrottled, "waba", False, "WhatsApp Business Account rate limit; slowing down"),
    130429: Rule(MetaThrottled, "number", False, "throughput limit of the phone number; slowing down"),
    131000: Rule(MetaRetryable, None, False, "something went wrong at Meta; retried"),
    131026: Rule(MetaPermanent, None, False, "message undeliverable (not on WhatsApp, old app, or "
                 "the recipient has not accepted the terms)"),
    131030: Rule(MetaPermanent, None, True, "recipient not in the allowed list of a test number: "
                 "add it in the app dashboard"),
    131042: Rule(AccountPaused, None, True, "payment issue on the WhatsApp Business Account"),
    131047: Rule(MetaPermanent, None, False, WINDOW_HINT),
    131048: Rule(MetaThrottled, "number", True, "spam rate limit: message quality is low"),
    131049: Rule(MetaPermanent, None, False, "not delivered to keep the ecosystem healthy; do not "
                 "retry immediately"),
    131050: Rule(MetaPermanent, None, False, "the user stopped marketing messages"),
    131051: Rule(MetaPermanent, None, False, "unsupported message type"),
    131052: Rule(MetaPermanent, None, False, "media download error"),
    131053: Rule(MetaPermanent, None, False, "media upload error: check the link or format"),
    131056: Rule(MetaThrottled, "pair", False, "pair rate limit: too many messages to this user"),
    131057: Rule(MetaRetryable, None, False, "account in maintenance mode (throughput upgrade)"),
    132000: Rule(MetaPermanent, None, True, TEMPLATE_HINT),
    132001: Rule(MetaPermanent, None, True, TEMPLATE_HINT),
    132005: Rule(MetaPermanent, None, False, "translated text too long"),
    132007: Rule(MetaPermanent, None, True, "template format character policy violated"),
    132012: Rule(MetaPermanent, None, False, TEMPLATE_HINT),
    132015: Rule(MetaPermanent, None, True, "template is paused (low quality)"),
    132016: Rule(MetaPermanent, None, True, "template is disabled"),
    133010: Rule(AccountPaused, None, True, "phone number not registered: register it"),
}
SUBCODE_RULES: dict[tuple[int, int], Rule] = {
    (10, 2018300): Rule(MetaPermanent, None, False, "another app controls this thread "
                        "(handover protocol): take thread control first"),
    (10, 2534022): Rule(MetaPermanent, None, False, WINDOW_HINT),
}


class _Body(msgspec.Struct):
    error: dict[str, Any] | None = None


def from_response(status: int, body: bytes, table: dict[int, Rule] | None = None) -> MetaError:
    """The exception for a non-2xx Graph answer (``table`` extends :data:`RULES` per channel)."""
    try:
        error = msgspec.json.decode(body, type=_Body).error or {}
    except msgspec.DecodeError:
        error = {}
    code = error.get("code") if isinstance(error.get("code"), int) else None
    if code is None:
        cls = MetaRetryable if status >= 500 or status in (0, 408, 429) else MetaPermanent
        exc = cls(f"HTTP {status} from the Graph API without an error body")
        exc.http_status = status
        return exc
    subcode = error.get("error_subcode") if isinstance(error.get("error_subcode"), int) else None
    rule = SUBCODE_RULES.get((code, subcode or 0)) or {**RULES, **(table or {})}.get(code)
    if rule is None:
        rule = Rule(MetaRetryable if status >= 500 else MetaPermanent, None, False, "")
    exc = rule.kind(str(error.get("message") or f"Meta error {code}"))
    exc.code, exc.subcode, exc.http_status = code, subcode, status
    exc.fbtrace_id = error.get("fbtrace_id") if isinstance(error.get("fbtrace_id"), str) else None
    exc.alert, exc.hint = rule.alert, rule.hint
    exc.scope = "account" if issubclass(rule.kind, AccountPaused) else rule.scope
    return exc
