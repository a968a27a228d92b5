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

from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec

from gateway.errors import PermanentError, RateLimited, RetryableError


class MetaError(Exception):
    """What every Meta error carries (mixed into the retryable / permanent classes).

    ``retry_after`` (seconds) is Meta's own hint when the answer carried one (a ``Retry-After``
    header, or ``estimated_time_to_regain_access`` in ``X-Business-Use-Case-Usage``);
    ``backoff`` names the throttle policy (``short``, ``long``, ``pair``); ``headers`` are the
    usage headers of the answer.
    """

    code: int = 0
    subcode: int | None = None
    fbtrace_id: str | None = None
    http_status: int = 0
    retryable: bool = False
    alert: bool = False
    hint: str = ""
    scope: str | None = None
    backoff: str | None = None
    retry_after: float | None = None
    headers: dict[str, str] = {}  # noqa: RUF012 - replaced per instance, never mutated

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
    """The account cannot send until an operator acts (token, payment, blocked, not registered).

    The service holds the account's messages instead of failing them (nothing is lost, no retry
    is spent), probes now and then, and fails what it holds after ``outbound.max_pause_seconds``.
    """


class TokenExpired(AccountPaused):
    """190 (and 0): the access token expired or is invalid. Replace it, then restart."""


class Rule(NamedTuple):
    """How one Meta error code is handled: class, limiter scope, alert, operator hint and, for
    throttling codes, the backoff policy (``short``: 1 s doubling, ``long``: Meta asks for at
    least a minute, ``pair``: 4^X s)."""

    kind: type[MetaError]
    scope: str | None
    alert: bool
    hint: str
    backoff: str | None = None


WINDOW_HINT = ("outside the 24-hour customer-service window: send an approved template "
               "(WhatsApp) or use the HUMAN_AGENT tag within 7 days (Instagram)")
TEMPLATE_HINT = "fix the template name, language or parameters to match the approved template"
TOKEN_HINT = ("the access token expired or is invalid: create a new token (a System User token "
              "from Meta Business Settings does not expire) with the messaging permissions, set "
              "it as this account's access_token, then restart the gateway")
BILLING_HINT = ("payment or eligibility problem on the WhatsApp Business Account: in Meta "
                "Business Suite (WhatsApp Manager > Settings > Payment methods) add a valid "
                "payment method or settle the balance, and check that the business is eligible "
                "to send")
SLOW = MetaThrottled
RULES: dict[int, Rule] = {
    0: Rule(TokenExpired, None, True, TOKEN_HINT),
    1: Rule(MetaRetryable, None, False, "unknown Meta error; retried"),
    2: Rule(MetaRetryable, None, False, "Meta service temporarily unavailable; retried"),
    3: Rule(MetaPermanent, None, True, "the app lacks a capability for this call"),
    4: Rule(SLOW, "app", False, "application request limit reached; slowing down", "long"),
    10: Rule(MetaPermanent, None, True, "permission denied: check the token's permissions"),
    17: Rule(SLOW, "token", False, "user request limit reached; slowing down", "long"),
    32: Rule(SLOW, "page", False, "page request limit reached; slowing down", "long"),
    100: Rule(MetaPermanent, None, False, "invalid parameter: the request body is wrong"),
    190: Rule(TokenExpired, None, True, TOKEN_HINT),
    368: Rule(AccountPaused, None, True, "temporarily blocked for policy violations: see the "
              "account's quality and policy notices in WhatsApp Manager / the Page's inbox"),
    551: Rule(MetaPermanent, None, False, "this person is not available (blocked or deactivated)"),
    613: Rule(SLOW, "ig_account", False, "Instagram rate limit; slowing down", "long"),
    80007: Rule(SLOW, "waba", False, "WhatsApp Business Account rate limit; slowing down", "long"),
    130429: Rule(SLOW, "number", False, "throughput limit of the phone number; slowing down",
                 "short"),
    130472: Rule(MetaPermanent, None, False, "the user's number is part of a Meta experiment"),
    130497: Rule(MetaPermanent, None, True, "integrity restriction on the account"),
    131000: Rule(MetaRetryable, None, False, "something went wrong at Meta; retried"),
    131005: Rule(MetaPermanent, None, True, "access denied: check the token's permissions"),
    131008: Rule(MetaPermanent, None, False, "a required parameter is missing"),
    131009: Rule(MetaPermanent, None, False, "a parameter value is invalid"),
    131016: Rule(MetaRetryable, None, False, "Meta service unavailable; retried"),
    131021: Rule(MetaPermanent, None, False, "the recipient is the sender's own number"),
    131026: Rule(MetaPermanent, None, False, "message undeliverable (not on WhatsApp, old app, or "
                 "the recipient has not accepted the terms)"),
    131030: Rule(MetaPermanent, None, True, "recipient not in the allowed list of a test number: "
                 "add it in the app dashboard"),
    131031: Rule(AccountPaused, None, True, "the WhatsApp Business Account is locked: see "
                 "WhatsApp Manager"),
    131042: Rule(AccountPaused, None, True, BILLING_HINT),
    131045: Rule(MetaPermanent, None, True, "incorrect certificate: register the number again"),
    131047: Rule(MetaPermanent, None, False, WINDOW_HINT),
    131048: Rule(SLOW, "number", True, "spam rate limit: message quality is low", "long"),
    131049: Rule(MetaPermanent, None, False, "not delivered to keep the ecosystem healthy; do not "
                 "retry immediately"),
    131050: Rule(MetaPermanent, None, False, "the user stopped marketing messages"),
    131051: Rule(MetaPermanent, None, False, "unsupported message type"),
    131052: Rule(MetaPermanent, None, False, "media download error"),
    131053: Rule(MetaPermanent, None, False, "media upload error: check the link or format"),
    131056: Rule(SLOW, "pair", False, "pair rate limit: too many messages to this user", "pair"),
    131057: Rule(MetaRetryable, None, False, "account in maintenance mode (throughput upgrade)"),
    131062: Rule(MetaPermanent, None, False, "this message cannot be sent to a business-scoped "
                 "user id (one-tap, zero-tap and copy-code authentication templates need the "
                 "customer's phone number)"),
    131064: Rule(SLOW, "pair", False, "messaging limit (tier) reached: business-initiated "
                 "messages wait until the rolling 24 h frees up", "long"),
    132000: Rule(MetaPermanent, None, True, TEMPLATE_HINT),
    132001: Rule(MetaPermanent, None, True, TEMPLATE_HINT),
    132005: Rule(MetaPermanent, None, False, "translated text too long"),
    132007: Rule(MetaPermanent, None, True, "template format character policy violated"),
    132008: Rule(MetaPermanent, None, False, TEMPLATE_HINT),
    132012: Rule(MetaPermanent, None, False, TEMPLATE_HINT),
    132015: Rule(MetaPermanent, None, True, "template is paused (low quality)"),
    132016: Rule(MetaPermanent, None, True, "template is disabled"),
    132068: Rule(MetaPermanent, None, False, "the flow is blocked"),
    132069: Rule(SLOW, "number", False, "the flow is throttled; slowing down", "short"),
    133000: Rule(MetaPermanent, None, True, "incomplete deregistration: deregister the number "
                 "again, then register it"),
    133004: Rule(MetaRetryable, None, False, "registration server unavailable; retried"),
    133010: Rule(AccountPaused, None, True, "phone number not registered on the Cloud API: "
                 "register it (POST /{phone_number_id}/register)"),
    133016: Rule(SLOW, "number", False, "register/deregister rate limit; slowing down", "long"),
    135000: Rule(MetaPermanent, None, False, "generic user error"),
}
PERMISSION = Rule(MetaPermanent, None, True, "API permission not granted or removed: grant it to "
                  "the app and the token")  # 200-299
TEMPLATE_ERROR = Rule(MetaPermanent, None, True, TEMPLATE_HINT)  # any other 132xxx
SUBCODE_RULES: dict[tuple[int, int], Rule] = {
    (10, 2018300): Rule(MetaPermanent, None, False, "another app controls this thread "
                        "(handover protocol): take thread control first"),
    (10, 2534022): Rule(MetaPermanent, None, False, WINDOW_HINT),
}


def rule_for(code: int, subcode: int | None, status: int,
             table: dict[int, Rule] | None = None) -> Rule:
    """The rule for a Meta error code (the channel's ``table`` first, then :data:`RULES`)."""
    found = SUBCODE_RULES.get((code, subcode or 0)) or (table or {}).get(code) or RULES.get(code)
    if found is not None:
        return found
    if 200 <= code <= 299:
        return PERMISSION
    if 132000 <= code <= 132999:
        return TEMPLATE_ERROR
    return Rule(MetaRetryable if status >= 500 else MetaPermanent, None, False, "")


class _Body(msgspec.Struct):
    error: dict[str, Any] | None = None


def from_response(status: int, body: bytes, table: dict[int, Rule] | None = None,
                  headers: Mapping[str, str] | None = None) -> MetaError:
    """The exception for a non-2xx Graph answer (``table`` extends :data:`RULES` per channel).

    ``headers`` (the answer's) give ``retry_after``: a ``Retry-After`` header, or the longest
    ``estimated_time_to_regain_access`` of ``X-Business-Use-Case-Usage`` on a throttling error.
    """
    try:
        error = msgspec.json.decode(body, type=_Body).error or {}
    except msgspec.DecodeError:
        error = {}
    code = error.get("code") if _is_int(error.get("code")) else None
    if code is None:
        cls = MetaRetryable if status >= 500 or status in (0, 408, 429) else MetaPermanent
        exc = cls(f"HTTP {status} from the Graph API without an error body")
        exc.http_status = status
        exc.retry_after = _retry_after(headers, False)
        return exc
    subcode = error.get("error_subcode") if _is_int(error.get("error_subcode")) else None
    rule = rule_for(code, subcode, status, table)
    exc = rule.kind(str(error.get("message") or f"Meta error {code}"))
    exc.code, exc.subcode, exc.http_status = code, subcode, status
    exc.fbtrace_id = error.get("fbtrace_id") if isinstance(error.get("fbtrace_id"), str) else None
    exc.alert, exc.hint, exc.backoff = rule.alert, rule.hint, rule.backoff
    exc.scope = "account" if issubclass(rule.kind, AccountPaused) else rule.scope
    exc.retry_after = _retry_after(headers, issubclass(rule.kind, MetaThrottled))
    return exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _retry_after(headers: Mapping[str, str] | None, throttled: bool) -> float | None:
    """Meta's wait hint in seconds, or None."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    waits: list[float] = []
    try:
        waits.append(float(lower.get("retry-after", "")))
    except ValueError:
        pass
    if throttled and lower.get("x-business-use-case-usage"):
        try:
            for items in msgspec.json.decode(lower["x-business-use-case-usage"]).values():
                for item in items:
                    minutes = item.get("estimated_time_to_regain_access")
                    if _is_int(minutes) or isinstance(minutes, float):
                        waits.append(60.0 * minutes)
        except (msgspec.DecodeError, AttributeError, TypeError):
            pass
    waits = [w for w in waits if w > 0]
    return max(waits) if waits else None
