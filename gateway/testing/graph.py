"""``GraphSimulator``: a real aiohttp server on 127.0.0.1 speaking the Graph API's send endpoints.

For tests and ``gateway demo``; importable by plugin authors. It answers like Meta does:

- ``POST /{version}/{phone_number_id}/messages`` (WhatsApp): validates the body as Meta would
  (400, code 100, naming the bad parameter), answers the documented success shapes (send, template,
  mark-as-read / typing), enforces each number's throughput (130429 when more than ``mps`` messages
  arrive within any one second) and, optionally, the pair limit (131056);
- ``POST /{version}/{page_id}/messages`` and ``/me/messages`` (Instagram): text, attachments, quick
  replies, sender actions;
- ``GET /{version}/{media_id}``: a media URL;
- every answer carries ``X-Business-Use-Case-Usage`` for the account's share of its limit.

Public API: ``start()`` / ``stop()`` (or ``async with``), ``url``, ``accepted`` (every accepted
``AcceptedMessage``), ``requests`` (every request: path, body, status), ``on_accept`` (callables —
plain or async — called with each AcceptedMessage, e.g. to deliver status webhooks),
``fail_next(account, error_code_or_body, status=400, count=1)`` and ``drop_next(account, count=1)``
for fault injection, ``set_mps(account, mps)``, ``next_message_ids`` (ids to hand out first),
``count_130429``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.testing.client import free_port

WA_TYPES = ("text", "template", "image", "audio", "video", "document", "sticker", "interactive",
            "reaction", "location", "contacts")


@dataclass
class AcceptedMessage:
    """A message the simulator accepted (and for which Meta would send webhooks)."""

    channel: str
    account_id: str
    to: str
    message_id: str | None
    body: dict[str, Any]
    at: float = field(default_factory=time.time)


def meta_error(code: int, message: str, subcode: int | None = None, **extra: Any) -> dict[str, Any]:
    """Meta's error envelope."""
    error = {"message": message, "type": "OAuthException", "code": code,
             "fbtrace_id": f"AFakeTrace{code}", **extra}
    if subcode is not None:
        error["error_subcode"] = subcode
    return {"error": error}


class _BadParam(Exception):
    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param


class GraphSimulator:
    """The Graph API side of Meta, on 127.0.0.1."""

    def __init__(self, mps: float = 80.0, pair_limit: int | None = None,
                 pair_window: float = 6.0, port: int | None = None) -> None:
        self.port = port or free_port()
        self.default_mps = mps
        self.mps: dict[str, float] = {}
        self.pair_limit = pair_limit
        self.pair_window = pair_window
        self.accepted: list[AcceptedMessage] = []
        self.requests: list[dict[str, Any]] = []
        self.on_accept: list[Any] = []
        self.next_message_ids: deque[str] = deque()
        self.count_130429 = 0
        self._faults: dict[str, deque[tuple[int, dict[str, Any] | None]]] = defaultdict(deque)
        self._windows: dict[str, deque[float]] = defaultdict(deque)
        self._pairs: dict[tuple[str, str], deque[float]] = defaultdict(deque)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> GraphSimulator:
        app = web.Application()
        app.router.add_post("/{version}/{account}/messages", self._messages)
        app.router.add_get("/{version}/{media_id}", self._media)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
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
        self.mps[account] = mps

    def fail_next(self, account: str, error: int | dict[str, Any], status: int = 400,
                  count: int = 1) -> None:
        """The next ``count`` sends from ``account`` get this error (a code or a full body)."""
        body = error if isinstance(error, dict) else meta_error(error, f"(#{error}) Simulated error")
        for _ in range(count):
            self._faults[account].append((status, body))

    def drop_next(self, account: str, count: int = 1) -> None:
        """The next ``count`` sends from ``account`` get a 503 with no JSON body."""
        for _ in range(count):
            self._faults[account].append((503, None))

    def bodies(self, account: str | None = None) -> list[dict[str, Any]]:
        """Bodies of accepted messages (optionally of one account), in order."""
        return [m.body for m in self.accepted if account in (None, m.account_id)]

    # -- handlers -------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.Response:
        account = request.match_info["account"]
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._answer(request, account, {}, 400, meta_error(100, "(#100) Invalid JSON"))
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return self._answer(request, account, body, 401, meta_error(
                190, "Error validating access token: no token", subcode=463))
        fault = self._faults[account].popleft() if self._faults[account] else None
        if fault is not None:
            status, error = fault
            if error is None:
                return self._answer(request, account, body, status, None)
            return self._answer(request, account, body, status, error)
        whatsapp = body.get("messaging_product") == "whatsapp" if isinstance(body, dict) else False
        try:
            if whatsapp:
                return await self._whatsapp(request, account, body)
            return await self._instagram(request, account, body)
        except _BadParam as exc:
            return self._answer(request, account, body, 400, meta_error(
                100, f"(#100) Param {exc.param} is invalid", error_data={"details": str(exc)}))

    async def _whatsapp(self, request: web.Request, account: str, body: dict) -> web.Response:
        if body.get("status") == "read":
            if not isinstance(body.get("message_id"), str):
                raise _BadParam("message_id", "message_id is required")
            return self._answer(request, account, body, 200, {"success": True})
        to, kind = body.get("to"), body.get("type")
        if not isinstance(to, str) or not to.isdigit():
            raise _BadParam("to", "to must be the recipient's phone number digits")
        if kind not in WA_TYPES:
            raise _BadParam("type", f"type must be one of {', '.join(WA_TYPES)}")
        _check_content(kind, body.get(kind))
        limited = self._over_limit(account, to)
        if limited:
            return self._answer(request, account, body, 400, limited)
        message_id = self._new_id("wamid.SIM.")
        answer: dict[str, Any] = {"messaging_product": "whatsapp",
                                  "contacts": [{"input": to, "wa_id": to}],
                                  "messages": [{"id": message_id}]}
        if kind == "template":
            answer["messages"][0]["message_status"] = "accepted"
        self._accept(AcceptedMessage("whatsapp", account, to, message_id, body))
        return self._answer(request, account, body, 200, answer)

    async def _instagram(self, request: web.Request, account: str, body: dict) -> web.Response:
        recipient = body.get("recipient") if isinstance(body, dict) else None
        if not isinstance(recipient, dict) or not isinstance(recipient.get("id"), str):
            raise _BadParam("recipient", "recipient.id is required")
        to = recipient["id"]
        if "sender_action" in body:
            if body["sender_action"] not in ("typing_on", "typing_off", "mark_seen", "react", "unreact"):
                raise _BadParam("sender_action", "unknown sender_action")
            return self._answer(request, account, body, 200, {"recipient_id": to})
        message = body.get("message")
        if not isinstance(message, dict) or not (message.get("text") or message.get("attachment")):
            raise _BadParam("message", "message needs text or attachment")
        if isinstance(message.get("text"), str) and len(message["text"].encode()) > 1000:
            raise _BadParam("message", "text longer than 1000 bytes")
        if self._over_limit(account, to):
            return self._answer(request, account, body, 400, meta_error(
                613, "(#613) Calls to this api have exceeded the rate limit."))
        message_id = self._new_id("aWdfSIM_")
        self._accept(AcceptedMessage("instagram", account, to, message_id, body))
        return self._answer(request, account, body, 200, {"recipient_id": to, "message_id": message_id})

    async def _media(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        return web.json_response({
            "messaging_product": "whatsapp", "id": media_id, "mime_type": "image/jpeg",
            "sha256": "FAKE", "file_size": 1024,
            "url": f"{self.url}/media-bytes/{media_id}"})

    # -- helpers --------------------------------------------------------------------------------

    _limit_error = meta_error(130429, "(#130429) Rate limit hit",
                              error_data={"details": "Message failed to send because there were "
                                          "too many messages sent from this phone number in a "
                                          "short period of time"})

    def _over_limit(self, account: str, to: str) -> dict[str, Any] | None:
        """The throttling error this send triggers, or None (then it counts against the limits)."""
        now = time.monotonic()
        window = self._windows[account]
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= self.mps.get(account, self.default_mps):
            self.count_130429 += 1
            return self._limit_error
        if self.pair_limit is not None:
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

    def _answer(self, request: web.Request, account: str, body: Any, status: int,
                answer: dict[str, Any] | None) -> web.Response:
        self.requests.append({"path": request.path, "account": account, "body": body,
                              "status": status})
        used = min(100, int(100 * len(self._windows[account]) / max(1, self.mps.get(
            account, self.default_mps))))
        headers = {"X-Business-Use-Case-Usage": json.dumps({account: [{
            "type": "whatsapp_business_messaging", "call_count": used, "total_cputime": 1,
            "total_time": 1, "estimated_time_to_regain_access": 0}]})}
        if answer is None:
            return web.Response(status=status, text="Service Unavailable", headers=headers)
        return web.json_response(answer, status=status, headers=headers)


def _check_content(kind: str, content: Any) -> None:
    if not isinstance(content, dict) and kind != "contacts":
        raise _BadParam(kind, f"{kind} object is required")
    if kind == "text" and not (isinstance(content.get("body"), str) and content["body"]):
        raise _BadParam("text.body", "text.body is required")
    if kind == "template":
        if not isinstance(content.get("name"), str):
            raise _BadParam("template.name", "template.name is required")
        if not isinstance((content.get("language") or {}).get("code"), str):
            raise _BadParam("template.language", "template.language.code is required")
    if kind in ("image", "audio", "video", "document", "sticker"):
        if not (content.get("id") or content.get("link")):
            raise _BadParam(kind, f"{kind} needs id or link")
        if "caption" in content and kind not in ("image", "video", "document"):
            raise _BadParam(f"{kind}.caption", f"caption is not allowed on {kind}")
        if "filename" in content and kind != "document":
            raise _BadParam(f"{kind}.filename", "filename is only allowed on documents")
    if kind == "reaction" and not isinstance(content.get("message_id"), str):
        raise _BadParam("reaction.message_id", "reaction.message_id is required")
    if kind == "interactive" and content.get("type") not in ("button", "list", "cta_url", "product",
                                                              "product_list", "flow"):
        raise _BadParam("interactive.type", "interactive.type is invalid")
    if kind == "location":
        for key in ("latitude", "longitude"):
            if not isinstance(content.get(key), (int, float)):
                raise _BadParam(f"location.{key}", f"location.{key} is required")
    if kind == "contacts" and not (isinstance(content, list) and content):
        raise _BadParam("contacts", "contacts must be a non-empty list")
