"""``GraphSimulator``: a real aiohttp server on 127.0.0.1 speaking the Graph API's send endpoints.

For tests and ``gateway demo``; importable by plugin authors. It answers like Meta does:

- ``POST /{version}/{phone_number_id}/messages`` (WhatsApp): validates the body as Meta would
  (400, code 100, naming the bad parameter: types, media, templates, interactive buttons / lists /
  CTA URLs with their count and length limits), answers the documented success shapes (send,
  template, mark-as-read / typing), enforces each number's throughput (130429 when more than
  ``mps`` messages arrive within any one second) and, optionally, the pair limit (131056);
- ``POST /{version}/{page_id}/messages`` and ``/me/messages`` (Instagram): text, attachments,
  quick replies, sender actions; 613 beyond ``ig_mps`` (text and the rest) or ``ig_media_mps``
  (audio and video) per account in any one second;
- ``POST /{version}/{phone_number_id}/media`` (multipart upload → ``{"id"}``),
  ``GET /{version}/{media_id}`` (the media object with a short-lived ``url``), ``GET <url>`` (the
  bytes, bearer token required; 404 once the URL expired) and ``DELETE /{version}/{media_id}``;
- every call needs a bearer token (190 otherwise, or for a token :meth:`revoke_token` expired);
- every answer carries ``X-App-Usage`` (the app's calls in the last hour against
  ``app_calls_per_hour``; at 100 % calls are refused with code 4) and
  ``X-Business-Use-Case-Usage`` (the account's share of its throughput;
  ``estimated_time_to_regain_access`` while :meth:`block` holds it).

Public API: ``start()`` / ``stop()`` (or ``async with``), ``url``, ``accepted`` (every accepted
``AcceptedMessage``), ``requests`` (every request: method, path, account, body, status, at),
``on_accept`` (callables — plain or async — called with each AcceptedMessage, e.g. to deliver
status webhooks), fault injection: ``fail_next(account, error_code_or_body, status=400, count=1,
headers=None)``, ``drop_next(account, count=1)`` (503 without a body), ``delay_next(account,
seconds, count=1)`` (accept the message, answer late: a client timeout after Meta accepted);
limits and usage: ``set_mps``, ``set_ig_limits``, ``block``, ``set_app_usage``,
``set_business_usage``; ``revoke_token``; ``add_media``; counters ``count_130429``,
``count_613``, ``count_4``; ``next_message_ids`` (ids to hand out first).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import itertools
import json
import math
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.testing.client import free_port
from gateway.testing.graph_checks import (
    BadParam,
    check_content,
    check_ig_message,
)

WA_TYPES = ("text", "template", "image", "audio", "video", "document", "sticker", "interactive",
            "reaction", "location", "contacts")
IG_ACTIONS = ("typing_on", "typing_off", "mark_seen", "react", "unreact")
# A business-scoped user id as Meta writes it: "US.13491208655302741918", "US.ENT.1181579921"
BSUID = re.compile(r"[A-Z]{2}\.[A-Za-z0-9]+(\.[A-Za-z0-9]+)*")


@dataclass
class AcceptedMessage:
    """A message the simulator accepted (and for which Meta would send webhooks)."""

    channel: str
    account_id: str
    to: str
    message_id: str | None
    body: dict[str, Any]
    at: float = field(default_factory=time.time)


@dataclass
class MediaObject:
    """An uploaded (or :meth:`GraphSimulator.add_media`) media object."""

    id: str
    account_id: str
    data: bytes
    mime_type: str
    filename: str | None
    sha256: str


@dataclass
class _Fault:  # delay: accept the message, then answer this late
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] | None = None
    delay: float | None = None


def meta_error(code: int, message: str, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    """Meta's error envelope."""
    error = {"message": message, "type": "OAuthException", "code": code,
             "fbtrace_id": f"AFakeTrace{code}", **extra}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


class GraphSimulator:
    """The Graph API side of Meta, on 127.0.0.1."""

    def __init__(self, mps: float = 80.0, pair_limit: int | None = None,
                 pair_window: float = 6.0, port: int | None = None, *, ig_mps: float = 300.0,
                 ig_media_mps: float = 10.0, app_calls_per_hour: int = 100_000,
                 media_url_ttl: float = 300.0) -> None:
        self.port = port or free_port()
        self.default_mps = mps
        self.mps: dict[str, float] = {}
        self.pair_limit = pair_limit
        self.pair_window = pair_window
        self.ig_limits: dict[str, tuple[float, float]] = defaultdict(lambda: (ig_mps, ig_media_mps))
        self.app_calls_per_hour = app_calls_per_hour
        self.media_url_ttl = media_url_ttl
        self.accepted: list[AcceptedMessage] = []
        self.requests: list[dict[str, Any]] = []
        self.on_accept: list[Any] = []
        self.next_message_ids: deque[str] = deque()
        self.media: dict[str, MediaObject] = {}
        self.revoked: set[str] = set()
        self.count_130429 = self.count_613 = self.count_4 = 0
        self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
        self._windows: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._pairs: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._app_calls: deque[float] = deque()
        self._app_usage: dict[str, int] | None = None
        self._buc_usage: dict[str, dict[str, int]] = {}
        self._blocked: dict[str, tuple[float, int]] = {}
        self._media_urls: dict[str, tuple[str, float]] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> GraphSimulator:
        app = web.Application(client_max_size=100 * 1024 * 1024)
        app.router.add_get("/whatsapp_business/attachments/", self._media_bytes)
        app.router.add_post("/{version}/{account}/messages", self._messages)
        app.router.add_post("/{version}/{account}/media", self._upload)
        app.router.add_get("/{version}/{media_id}", self._media_get)
        app.router.add_delete("/{version}/{media_id}", self._media_delete)
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self._closing.set()  # answers held by delay_next go out now
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> GraphSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test controls ------------------------------------------------------------------------

    def set_mps(self, account: str, mps: float) -> None:
        """A WhatsApp number's throughput (130429 beyond it)."""
        self.mps[account] = mps

    def set_ig_limits(self, account: str, mps: float | None = None,
                      media_mps: float | None = None) -> None:
        """An Instagram account's calls per second: text and the rest / audio and video."""
        text, media = self.ig_limits[account]
        self.ig_limits[account] = (mps or text, media_mps or media)

    def fail_next(self, account: str, error: int | dict[str, Any], status: int = 400,
                  count: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next ``count`` sends from ``account`` get this error (a code or a full body),
        with extra response ``headers`` if given."""
        body = error if isinstance(error, dict) else meta_error(error, f"(#{error}) Simulated")
        self._faults[account].extend(_Fault(status, body, headers) for _ in range(count))

    def drop_next(self, account: str, count: int = 1) -> None:
        """The next ``count`` sends from ``account`` get a 503 with no JSON body."""
        self._faults[account].extend(_Fault(503, None) for _ in range(count))

    def delay_next(self, account: str, seconds: float, count: int = 1) -> None:
        """The next ``count`` sends from ``account`` are accepted (and reported to
        ``on_accept``) at once, but answered only after ``seconds`` (or at :meth:`stop`)."""
        self._faults[account].extend(_Fault(200, None, None, seconds) for _ in range(count))

    def block(self, account: str, seconds: float, code: int | None = None) -> None:
        """For ``seconds``, sends from ``account`` are refused with ``code`` (80007 on WhatsApp,
        613 on Instagram by default) and ``estimated_time_to_regain_access`` says how long."""
        self._blocked[account] = (time.monotonic() + seconds, code or 0)

    def set_app_usage(self, call_count: int | None = None, total_cputime: int = 0,
                      total_time: int = 0) -> None:
        """Fix ``X-App-Usage`` percentages (None: computed from the calls of the last hour).
        At 100 % every call is refused with code 4, as Meta does."""
        self._app_usage = None if call_count is None else {
            "call_count": call_count, "total_cputime": total_cputime, "total_time": total_time}

    def set_business_usage(self, account: str, call_count: int | None = None,
                           total_cputime: int = 0, total_time: int = 0) -> None:
        """Fix the account's ``X-Business-Use-Case-Usage`` percentages (None: computed)."""
        if call_count is None:
            self._buc_usage.pop(account, None)
        else:
            self._buc_usage[account] = {"call_count": call_count,
                                        "total_cputime": total_cputime, "total_time": total_time}

    def revoke_token(self, token: str) -> None:
        """Calls with this bearer token now get 190 (HTTP 401), like an expired token."""
        self.revoked.add(token)

    def add_media(self, data: bytes, mime_type: str, account: str = "",
                  filename: str | None = None) -> str:
        """Store a media object (e.g. a customer's image) and return its id."""
        media_id = str(1_000_000_000_000 + next(self._ids))
        self.media[media_id] = MediaObject(media_id, account, data, mime_type, filename,
                                           hashlib.sha256(data).hexdigest())
        return media_id

    def bodies(self, account: str | None = None) -> list[dict[str, Any]]:
        """Bodies of accepted messages (optionally of one account), in order."""
        return [m.body for m in self.accepted if account in (None, m.account_id)]

    # -- sends ----------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        account = request.match_info["account"]
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._answer(request, account, None, 400, meta_error(
                100, "(#100) The parameter body is not valid JSON"))
        refused = self._refused(request, account, body)
        if refused is not None:
            return refused
        whatsapp = isinstance(body, dict) and body.get("messaging_product") == "whatsapp"
        blocked = self._blocked.get(account)
        if blocked and blocked[0] > time.monotonic():
            code = blocked[1] or (80007 if whatsapp else 613)
            return self._answer(request, account, body, 400, meta_error(
                code, f"(#{code}) Rate limit reached: too many calls for this account",
                is_transient=True))
        fault = self._faults[account].popleft() if self._faults[account] else None
        if fault is not None and fault.delay is None:
            return self._answer(request, account, body, fault.status, fault.body, fault.headers)
        try:
            if not isinstance(body, dict):
                raise BadParam("body", "the body must be a JSON object")
            handle = self._whatsapp if whatsapp else self._instagram
            status, answer = handle(account, body)
        except BadParam as exc:
            return self._answer(request, account, body, 400, meta_error(
                100, f"(#100) Param {exc.param} is invalid", error_data={"details": str(exc)}))
        if fault is not None and status == 200:  # Meta has it; the answer comes late
            self.requests.append({"method": "POST", "path": request.path, "account": account,
                                  "body": body, "status": 0, "at": time.time()})
            try:
                await asyncio.wait_for(self._closing.wait(), fault.delay)
            except TimeoutError:
                pass
        return self._answer(request, account, body, status, answer)

    def _whatsapp(self, account: str, body: dict) -> tuple[int, dict[str, Any]]:
        if body.get("status") == "read":
            if not isinstance(body.get("message_id"), str):
                raise BadParam("message_id", "message_id is required")
            if "typing_indicator" in body and body["typing_indicator"] != {"type": "text"}:
                raise BadParam("typing_indicator", "typing_indicator.type must be text")
            return 200, {"success": True}
        to, kind = body.get("to"), body.get("type")
        by_bsuid = to is None and "recipient" in body  # Meta: "to" wins when both are given
        if by_bsuid:
            to = body["recipient"]
            if not isinstance(to, str) or not BSUID.fullmatch(to):
                raise BadParam("recipient", "recipient must be a business-scoped user id")
        elif not isinstance(to, str) or not to.isdigit():
            raise BadParam("to", "to must be the recipient's phone number digits")
        if kind not in WA_TYPES:
            raise BadParam("type", f"type must be one of {', '.join(WA_TYPES)}")
        check_content(kind, body.get(kind))
        limited = self._over_limit(account, to, "whatsapp", self.mps.get(account,
                                                                          self.default_mps))
        if limited:
            self.count_130429 += limited["error"]["code"] == 130429
            return 400, limited
        message_id = self._new_id("wamid.SIM.")
        answer: dict[str, Any] = {"messaging_product": "whatsapp",
                                  "contacts": [{"input": to,
                                                "user_id" if by_bsuid else "wa_id": to}],
                                  "messages": [{"id": message_id}]}
        if kind == "template":
            answer["messages"][0]["message_status"] = "accepted"
        self._accept(AcceptedMessage("whatsapp", account, to, message_id, body))
        return 200, answer

    def _instagram(self, account: str, body: dict) -> tuple[int, dict[str, Any]]:
        recipient = body.get("recipient")
        if not isinstance(recipient, dict) or not isinstance(recipient.get("id"), str):
            raise BadParam("recipient", "recipient.id is required")
        to = recipient["id"]
        media = False
        if "sender_action" in body:
            if body["sender_action"] not in IG_ACTIONS:
                raise BadParam("sender_action", "unknown sender_action")
            extra = set(body) - {"recipient", "sender_action", "payload"}
            if extra or ("payload" in body and body["sender_action"] not in ("react", "unreact")):
                raise BadParam(sorted(extra or {"payload"})[0],
                                "a sender action body takes nothing else")
        else:
            media = check_ig_message(body.get("message"))
        text_mps, media_mps = self.ig_limits[account]
        limited = self._over_limit(account, to, "ig_media" if media else "instagram",
                                   media_mps if media else text_mps)
        if limited:
            self.count_613 += 1
            return 400, meta_error(613, "(#613) Calls to this api have exceeded the rate limit.")
        if "sender_action" in body:
            return 200, {"recipient_id": to}
        message_id = self._new_id("aWdfSIM_")
        self._accept(AcceptedMessage("instagram", account, to, message_id, body))
        return 200, {"recipient_id": to, "message_id": message_id}

    # -- media ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        refused = self._refused(request, account, None)
        if refused is not None:
            return refused
        fields: dict[str, Any] = {}
        try:
            async for part in await request.multipart():
                if part.name == "file":
                    fields["file"] = (await part.read(), part.filename,
                                      part.headers.get("Content-Type"))
                elif part.name:
                    fields[part.name] = await part.text()
        except (ValueError, AssertionError):
            return self._answer(request, account, None, 400, meta_error(
                100, "(#100) The upload must be multipart/form-data"))
        body = {k: v for k, v in fields.items() if k != "file"}
        for param, bad in (("messaging_product", fields.get("messaging_product") != "whatsapp"),
                           ("file", not fields.get("file", (b"",))[0]),
                           ("type", not fields.get("type"))):
            if bad:
                return self._answer(request, account, body, 400, meta_error(
                    100, f"(#100) Param {param} is invalid", error_data={"details": param}))
        data, filename, _ = fields["file"]
        media_id = self.add_media(data, fields["type"], account, filename)
        return self._answer(request, account, body, 200, {"id": media_id})

    async def _media_get(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        refused = self._refused(request, "", None)
        if refused is not None:
            return refused
        media = self.media.get(media_id)
        if media is None:
            return self._answer(request, "", None, 400, meta_error(
                100, f"Unsupported get request. Object with ID '{media_id}' does not exist",
                subcode=33))
        token = secrets.token_urlsafe(12)
        self._media_urls[token] = (media_id, time.monotonic() + self.media_url_ttl)
        return self._answer(request, media.account_id, None, 200, {
            "messaging_product": "whatsapp", "id": media_id, "mime_type": media.mime_type,
            "sha256": media.sha256, "file_size": len(media.data),
            "url": f"{self.url}/whatsapp_business/attachments/?mid={media_id}&hash={token}"})

    async def _media_delete(self, request: web.Request) -> web.Response:
        refused = self._refused(request, "", None)
        if refused is not None:
            return refused
        if self.media.pop(request.match_info["media_id"], None) is None:
            return self._answer(request, "", None, 400, meta_error(
                100, "(#100) Unsupported delete request", subcode=33))
        return self._answer(request, "", None, 200, {"success": True})

    async def _media_bytes(self, request: web.Request) -> web.Response:
        refused = self._refused(request, "", None)
        if refused is not None:
            return refused
        found = self._media_urls.get(request.query.get("hash", ""))
        media = self.media.get(found[0]) if found and found[1] > time.monotonic() else None
        if media is None or media.id != request.query.get("mid"):
            return web.Response(status=404, text="URL expired or unknown: fetch a fresh url")
        return web.Response(body=media.data, content_type=media.mime_type.split(";")[0])

    # -- helpers --------------------------------------------------------------------------------

    def _refused(self, request: web.Request, account: str, body: Any) -> web.Response | None:
        """190 for a missing or revoked token; code 4 when the app is over its hourly limit."""
        header = request.headers.get("Authorization", "")
        token = (header.removeprefix("Bearer ").strip() if header.startswith("Bearer ")
                 else request.query.get("access_token", ""))
        if not token:
            return self._answer(request, account, body, 401, meta_error(
                190, "An active access token must be used to query information.", subcode=463))
        if token in self.revoked:
            return self._answer(request, account, body, 401, meta_error(
                190, "Error validating access token: Session has expired.", subcode=463))
        now = time.monotonic()
        self._app_calls.append(now)
        while self._app_calls and now - self._app_calls[0] >= 3600:
            self._app_calls.popleft()
        if self._app_usage_now()["call_count"] >= 100:
            self.count_4 += 1
            return self._answer(request, account, body, 400, meta_error(
                4, "(#4) Application request limit reached", is_transient=True))
        return None

    def _app_usage_now(self) -> dict[str, int]:
        if self._app_usage is not None:
            return self._app_usage
        pct = min(100, 100 * len(self._app_calls) // max(1, self.app_calls_per_hour))
        return {"call_count": pct, "total_cputime": pct // 4, "total_time": pct // 3}

    def _over_limit(self, account: str, to: str, scope: str,
                    mps: float) -> dict[str, Any] | None:
        """The throttling error this send triggers, or None (then it counts against the limits)."""
        now = time.monotonic()
        window = self._windows[(account, scope)]
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= mps:
            return _LIMIT_ERROR
        if self.pair_limit is not None and scope != "ig_media":
            pair = self._pairs[(account, to)]
            while pair and now - pair[0] >= self.pair_window:
                pair.popleft()
            if len(pair) >= self.pair_limit:
                return meta_error(131056, "(#131056) (Business Account, Consumer Account) pair "
                                  "rate limit hit", subcode=2494055)
            pair.append(now)
        window.append(now)
        return None

    def _new_id(self, prefix: str) -> str:
        if self.next_message_ids:
            return self.next_message_ids.popleft()
        return f"{prefix}{next(self._ids):08d}"

    def _accept(self, message: AcceptedMessage) -> None:
        self.accepted.append(message)
        for hook in self.on_accept:
            result = hook(message)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _usage_headers(self, account: str, whatsapp: bool) -> dict[str, str]:
        headers = {"X-App-Usage": json.dumps(self._app_usage_now())}
        if not account:
            return headers
        scope = "whatsapp" if whatsapp else "instagram"
        mps = (self.mps.get(account, self.default_mps) if whatsapp
               else self.ig_limits[account][0])
        used = min(100, int(100 * len(self._windows[(account, scope)]) / max(1.0, mps)))
        usage = self._buc_usage.get(account) or {"call_count": used, "total_cputime": 1,
                                                 "total_time": 1}
        left = self._blocked.get(account, (0.0, 0))[0] - time.monotonic()
        # Meta writes whole minutes; a block shorter than a minute (tests) as a fraction.
        regain = 0 if left <= 0 else math.ceil(left / 60) if left >= 60 else round(left / 60, 3)
        headers["X-Business-Use-Case-Usage"] = json.dumps({account: [{
            "type": "whatsapp_business_messaging" if whatsapp else "instagram", **usage,
            "estimated_time_to_regain_access": regain}]})
        return headers

    def _answer(self, request: web.Request, account: str, body: Any, status: int,
                answer: dict[str, Any] | None,
                extra: dict[str, str] | None = None) -> web.Response:
        self.requests.append({"method": request.method, "path": request.path, "account": account,
                              "body": body, "status": status, "at": time.time()})
        whatsapp = not isinstance(body, dict) or body.get("messaging_product") == "whatsapp"
        headers = {**self._usage_headers(account, whatsapp), **(extra or {})}
        if answer is None:
            return web.Response(status=status, text="Service Unavailable", headers=headers)
        return web.json_response(answer, status=status, headers=headers)


_LIMIT_ERROR = meta_error(130429, "(#130429) Rate limit hit", error_data={
    "details": "Message failed to send because there were too many messages sent from this "
               "phone number in a short period of time"})
