"""Meta's side of a conversation, on 127.0.0.1: signed webhooks in, Graph API sends out.

:class:`MetaSimulator` plays Meta for a gateway under test (or for ``gateway demo``):

- **customers write in**: :meth:`MetaSimulator.customer_says` posts a real-shaped WhatsApp or
  Instagram text webhook (a unique wamid / mid each time) to the gateway's ``/webhooks/{channel}``,
  signed with ``X-Hub-Signature-256`` over the exact bytes sent, serialised like Meta does
  (compact JSON, every non-ASCII character as a ``\\uXXXX`` escape);
- **the business answers**: a :class:`gateway.testing.graph.GraphSimulator` (started here unless
  one is passed in) speaks the Graph API send endpoints; point the channels' ``graph_base_url``
  at :attr:`MetaSimulator.graph_url`;
- **Meta reports back**: for every message the GraphSimulator accepted, WhatsApp statuses
  ``sent`` → ``delivered`` → ``read`` (``biz_opaque_callback_data`` echoed when the send set it;
  a reaction yields only ``sent``), and on Instagram the ``is_echo`` message (same ``mid`` as the
  send response) followed by the customer's ``read``;
- **Meta retries**: a delivery answered with anything but 200 (or not answered) is retried after
  each of ``retry_delays`` and then given up, like Meta's (much longer) schedule.

Everything is bounded: a fixed number of attempts per delivery, a fixed number of statuses per
accepted message, and :meth:`stop` cancels whatever is still in flight::

    async with MetaSimulator(gateway_url, app_secret="s3cret") as sim:
        delivery = await sim.customer_says("whatsapp", "15550001234", "Hi, where is my order?")
        assert delivery.status == 200
        ...
        await sim.drain()          # every status / echo delivered

Observers: ``sim.on_delivery`` holds callables that receive each :class:`Delivery` once its last
attempt is done (sync functions or coroutine functions).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import itertools
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.signatures import sign

SIGNATURE_HEADER = "X-Hub-Signature-256"
CHANNELS = ("whatsapp", "instagram")

DEFAULT_PHONE_NUMBER_ID = "100000000000001"
DEFAULT_DISPLAY_PHONE_NUMBER = "15550001000"
DEFAULT_WABA_ID = "190000000000001"
DEFAULT_INSTAGRAM_ACCOUNT_ID = "17840000000000001"


@dataclass(frozen=True)
class Delivery:
    """One webhook POST (after its retries).

    Attributes:
        channel: ``whatsapp`` or ``instagram``.
        kind: ``message`` (a customer wrote), ``status`` (WhatsApp status), ``echo`` / ``read``
            (Instagram), or ``raw`` (:meth:`MetaSimulator.deliver` with a payload of yours).
        customer: the customer's wa_id / IGSID ("" for raw payloads).
        message_id: the wamid / mid the webhook carries or refers to.
        text: the message text (customer messages and echoes).
        state: the status value for ``kind == "status"`` (``sent``, ``delivered``, ``read``, ...).
        status: the gateway's last HTTP status (0: no answer at all).
        attempts: how many POSTs it took (1 = no retry).
        ack_seconds: how long the last POST took to be answered.
        body: the exact bytes sent (and signed).
        at: epoch seconds when the first attempt started.
    """

    channel: str
    kind: str
    customer: str
    message_id: str | None
    text: str | None
    state: str | None
    status: int
    attempts: int
    ack_seconds: float
    body: bytes
    at: float

    @property
    def ok(self) -> bool:
        """Whether the gateway finally answered 200."""
        return self.status == 200


def dumps(payload: Any, escape_slashes: bool = False) -> bytes:
    """Serialise like Meta: compact JSON, pure ASCII (``\\uXXXX`` escapes, surrogate pairs)."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    if escape_slashes:  # some Messenger-family deliveries write "/" as "\/"
        text = text.replace("/", "\\/")
    return text.encode("ascii")


class MetaSimulator:
    """Plays Meta for a gateway: signed customer webhooks, Graph API sends, statuses, retries.

    Args:
        gateway_url: the gateway's base URL (``http://127.0.0.1:8080``); webhooks go to
            ``{gateway_url}/webhooks/{channel}``.
        app_secret: the app secret both channels are signed with.
        app_secrets: per-channel secrets (``{"instagram": "..."}``) overriding ``app_secret``.
        graph: a GraphSimulator to observe; by default (None) one is created, started and stopped
            here; ``False`` runs without one (customer webhooks only).
        phone_number_id, display_phone_number, waba_id: the business WhatsApp number.
        instagram_account_id: the business Instagram account (``entry[].id``).
        instagram_accounts: Graph ``account_id`` (a Page id, or ``me``) → IG account id, when
            the gateway sends through ids that differ from ``instagram_account_id``.
        names: customer id → profile name used in WhatsApp ``contacts[]``.
        status_delays: seconds before ``sent``, then ``delivered``, then ``read``.
        echo_delay, read_delay: Instagram: seconds before the echo, then before the ``read``.
        retry_delays: the pause before each retry of a delivery that was not answered 200; the
            number of attempts is ``1 + len(retry_delays)``.
        statuses: send statuses / echoes for accepted messages (False: customer messages only).
        timeout: seconds per POST.
        escape_slashes: write ``/`` as ``\\/`` in bodies (legal JSON; Messenger-style escaping).
    """

    def __init__(self, gateway_url: str, *, app_secret: str,
                 app_secrets: Mapping[str, str] | None = None, graph: Any = None,
                 phone_number_id: str = DEFAULT_PHONE_NUMBER_ID,
                 display_phone_number: str = DEFAULT_DISPLAY_PHONE_NUMBER,
                 waba_id: str = DEFAULT_WABA_ID,
                 instagram_account_id: str = DEFAULT_INSTAGRAM_ACCOUNT_ID,
                 instagram_accounts: Mapping[str, str] | None = None,
                 names: Mapping[str, str] | None = None,
                 status_delays: tuple[float, float, float] = (0.05, 0.05, 0.1),
                 echo_delay: float = 0.02, read_delay: float = 0.1,
                 retry_delays: Iterable[float] = (0.2, 0.5, 1.0, 2.0),
                 statuses: bool = True, timeout: float = 10.0,
                 escape_slashes: bool = False) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.secrets = {c: app_secret for c in CHANNELS} | dict(app_secrets or {})
        self.phone_number_id = phone_number_id
        self.display_phone_number = display_phone_number
        self.waba_id = waba_id
        self.instagram_account_id = instagram_account_id
        self.instagram_accounts = dict(instagram_accounts or {})
        self.names = dict(names or {})
        self.status_delays = tuple(status_delays)
        self.echo_delay = echo_delay
        self.read_delay = read_delay
        self.retry_delays = tuple(retry_delays)
        self.statuses = statuses
        self.timeout = timeout
        self.escape_slashes = escape_slashes
        self.graph = graph or None
        self._own_graph = graph is None
        self.on_delivery: list[Callable[[Delivery], Any]] = []
        self.deliveries: deque[Delivery] = deque(maxlen=100_000)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._seq = itertools.count(1)
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def graph_url(self) -> str:
        """The GraphSimulator's base URL: the channels' ``graph_base_url``."""
        if self.graph is None:
            raise RuntimeError("no GraphSimulator: start() first, or it was disabled (graph=False)")
        return str(self.graph.url)

    async def start(self) -> MetaSimulator:
        """Start the GraphSimulator (when owned) and subscribe to what it accepts."""
        if self._started:
            return self
        if self._own_graph:
            from gateway.testing.graph import GraphSimulator

            self.graph = GraphSimulator()
            await self.graph.start()
        if self.graph is not None:
            self.graph.on_accept.append(self._accepted)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"User-Agent": "facebookexternalua"})
        self._started = True
        return self

    async def stop(self) -> None:
        """Cancel deliveries in flight, close the HTTP session, stop an owned GraphSimulator."""
        if not self._started:
            return
        self._started = False
        if self.graph is not None and self._accepted in self.graph.on_accept:
            self.graph.on_accept.remove(self._accepted)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_graph and self.graph is not None:
            await self.graph.stop()
            self.graph = None

    async def __aenter__(self) -> MetaSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every status / echo / read scheduled so far is delivered (or given up).

        Returns:
            True when nothing is left in flight, False when ``timeout`` passed first.
        """
        deadline = time.monotonic() + timeout
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.wait(list(self._tasks), timeout=left)
        return True

    @property
    def in_flight(self) -> int:
        """Status / echo / read chains not finished yet."""
        return len(self._tasks)

    # -- customers ----------------------------------------------------------------------------

    async def customer_says(self, channel: str, customer_id: str, text: str, *,
                            name: str | None = None, reply_to: str | None = None) -> Delivery:
        """Deliver a text message from ``customer_id`` on ``channel`` (with retries).

        Args:
            channel: ``whatsapp`` or ``instagram``.
            customer_id: the customer's wa_id (digits) or IGSID.
            text: the message; any Unicode (sent as ``\\uXXXX`` escapes).
            name: WhatsApp profile name (default: ``names[customer_id]`` or none).
            reply_to: the wamid / mid this message quotes.

        Returns:
            The :class:`Delivery`; ``delivery.message_id`` is the new wamid / mid.
        """
        now = time.time()
        if channel == "whatsapp":
            message_id = self.new_wamid(customer_id)
            payload = self.whatsapp_message(customer_id, message_id, text, now, name, reply_to)
        elif channel == "instagram":
            message_id = self.new_mid()
            payload = self.instagram_message(customer_id, message_id, text, now, reply_to)
        else:
            raise ValueError(f"unknown channel {channel!r}; choose from {CHANNELS}")
        return await self.deliver(channel, payload, kind="message", customer=customer_id,
                                  message_id=message_id, text=text)

    def new_wamid(self, customer_id: str = "") -> str:
        """A unique, real-looking WhatsApp message id (``wamid.HBgL...``)."""
        raw = f"{customer_id}{next(self._seq):010d}".encode() + os.urandom(9)
        return "wamid.HBgL" + base64.b64encode(raw).decode("ascii")

    def new_mid(self) -> str:
        """A unique, real-looking Instagram message id (``aWdf...``)."""
        raw = f"{next(self._seq):010d}".encode() + os.urandom(12)
        token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return "aWdfZAG1faXRlbToxOklHTWVzc2FnZA" + token

    # -- payloads (the same shapes as tests/data/<channel>/*.json) -----------------------------

    def _wa_envelope(self, value: dict[str, Any], phone_number_id: str | None = None) -> dict:
        pnid = phone_number_id or self.phone_number_id
        display = self.display_phone_number if pnid == self.phone_number_id else pnid[-11:]
        return {"object": "whatsapp_business_account", "entry": [{
            "id": self.waba_id,
            "changes": [{
                "value": {"messaging_product": "whatsapp",
                          "metadata": {"display_phone_number": display, "phone_number_id": pnid},
                          **value},
                "field": "messages"}]}]}

    def whatsapp_message(self, customer_id: str, message_id: str, text: str, at: float,
                         name: str | None = None, reply_to: str | None = None) -> dict:
        """A WhatsApp ``messages[]`` text webhook (``whatsapp/text.json``'s shape)."""
        name = name or self.names.get(customer_id)
        contact: dict[str, Any] = {"profile": {"name": name}} if name else {}
        contact["wa_id"] = customer_id
        message: dict[str, Any] = {}
        if reply_to:
            message["context"] = {"from": self.display_phone_number, "id": reply_to}
        message.update({"from": customer_id, "id": message_id, "timestamp": str(int(at)),
                        "type": "text", "text": {"body": text}})
        return self._wa_envelope({"contacts": [contact], "messages": [message]})

    def whatsapp_status(self, message_id: str, state: str, recipient_id: str, at: float, *,
                        phone_number_id: str | None = None, callback_data: str | None = None,
                        errors: list[dict] | None = None) -> dict:
        """A WhatsApp ``statuses[]`` webhook (``whatsapp/status_*.json``'s shape, v24.0)."""
        status: dict[str, Any] = {"id": message_id, "status": state, "timestamp": str(int(at)),
                                  "recipient_id": recipient_id}
        if callback_data is not None:
            status["biz_opaque_callback_data"] = callback_data
        if state in ("sent", "delivered"):
            status["pricing"] = {"billable": False, "pricing_model": "PMP",
                                 "type": "free_customer_service", "category": "service"}
        if errors:
            status["errors"] = errors
        return self._wa_envelope({"statuses": [status]}, phone_number_id)

    def _ig_envelope(self, account_id: str, event: dict[str, Any], at: float) -> dict:
        return {"object": "instagram", "entry": [{
            "time": int(at * 1000) + 250, "id": account_id, "messaging": [event]}]}

    def instagram_message(self, customer_id: str, mid: str, text: str, at: float,
                          reply_to: str | None = None, account_id: str | None = None) -> dict:
        """An Instagram ``messaging[]`` text webhook (``instagram/text.json``'s shape)."""
        account = account_id or self.instagram_account_id
        message: dict[str, Any] = {"mid": mid, "text": text}
        if reply_to:
            message["reply_to"] = {"mid": reply_to}
        return self._ig_envelope(account, {
            "sender": {"id": customer_id}, "recipient": {"id": account},
            "timestamp": int(at * 1000), "message": message}, at)

    def instagram_echo(self, customer_id: str, mid: str, message: Mapping[str, Any], at: float,
                       account_id: str | None = None) -> dict:
        """The ``is_echo`` webhook of a message the business sent (``instagram/echo.json``)."""
        account = account_id or self.instagram_account_id
        echo: dict[str, Any] = {"mid": mid}
        if message.get("text") is not None:
            echo["text"] = message["text"]
        if message.get("attachment"):
            echo["attachments"] = [message["attachment"]]
        echo["is_echo"] = True
        return self._ig_envelope(account, {
            "sender": {"id": account}, "recipient": {"id": customer_id},
            "timestamp": int(at * 1000), "message": echo}, at)

    def instagram_read(self, customer_id: str, mid: str, at: float,
                       account_id: str | None = None) -> dict:
        """The customer's ``read`` of ``mid`` (``instagram/read.json``'s shape)."""
        account = account_id or self.instagram_account_id
        return self._ig_envelope(account, {
            "sender": {"id": customer_id}, "recipient": {"id": account},
            "timestamp": int(at * 1000), "read": {"mid": mid}}, at)

    # -- delivery -----------------------------------------------------------------------------

    async def deliver(self, channel: str, payload: Any, *, kind: str = "raw", customer: str = "",
                      message_id: str | None = None, text: str | None = None,
                      state: str | None = None) -> Delivery:
        """Sign and POST ``payload`` (a dict, or bytes sent as they are) to the gateway, retrying
        like Meta until it answers 200 or ``retry_delays`` are used up."""
        if self._session is None:
            raise RuntimeError("MetaSimulator is not started (use start() or 'async with')")
        body = payload if isinstance(payload, bytes) else dumps(payload, self.escape_slashes)
        headers = {"Content-Type": "application/json",
                   SIGNATURE_HEADER: sign(self.secrets[channel].encode(), body)}
        url = f"{self.gateway_url}/webhooks/{channel}"
        started = time.time()
        status, attempts, ack = 0, 0, 0.0
        for pause in (None, *self.retry_delays):
            if pause is not None:
                await asyncio.sleep(pause)
            attempts += 1
            status, ack = await self._post(url, body, headers)
            if status == 200:
                break
        delivery = Delivery(channel, kind, customer, message_id, text, state, status, attempts,
                            ack, body, started)
        self.deliveries.append(delivery)
        await self._notify(delivery)
        return delivery

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
        assert self._session is not None
        t0 = time.perf_counter()
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status, time.perf_counter() - t0
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 0, time.perf_counter() - t0

    async def _notify(self, delivery: Delivery) -> None:
        for observer in list(self.on_delivery):
            result = observer(delivery)
            if inspect.isawaitable(result):
                await result

    # -- closing the loop for accepted sends ----------------------------------------------------

    def _accepted(self, accepted: Any) -> None:
        """GraphSimulator ``on_accept`` hook: schedule the statuses / echo for one send."""
        if not self._started or not self.statuses or not getattr(accepted, "message_id", None):
            return
        if accepted.channel == "whatsapp":
            work = self._whatsapp_statuses(accepted)
        elif accepted.channel == "instagram":
            work = self._instagram_echo(accepted)
        else:
            return
        task = asyncio.get_running_loop().create_task(work, name="meta-simulator-statuses")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _whatsapp_statuses(self, accepted: Any) -> None:
        body = accepted.body if isinstance(accepted.body, Mapping) else {}
        states = ("sent",) if body.get("type") == "reaction" else ("sent", "delivered", "read")
        callback = body.get("biz_opaque_callback_data")
        for state, pause in zip(states, self.status_delays, strict=False):
            await asyncio.sleep(pause)
            payload = self.whatsapp_status(accepted.message_id, state, accepted.to, time.time(),
                                           phone_number_id=accepted.account_id,
                                           callback_data=callback)
            await self.deliver("whatsapp", payload, kind="status", customer=accepted.to,
                               message_id=accepted.message_id, state=state)

    async def _instagram_echo(self, accepted: Any) -> None:
        body = accepted.body if isinstance(accepted.body, Mapping) else {}
        message = body.get("message") if isinstance(body.get("message"), Mapping) else {}
        account = self.instagram_accounts.get(str(accepted.account_id), self.instagram_account_id)
        await asyncio.sleep(self.echo_delay)
        payload = self.instagram_echo(accepted.to, accepted.message_id, message, time.time(),
                                      account)
        await self.deliver("instagram", payload, kind="echo", customer=accepted.to,
                           message_id=accepted.message_id, text=message.get("text"))
        await asyncio.sleep(self.read_delay)
        payload = self.instagram_read(accepted.to, accepted.message_id, time.time(), account)
        await self.deliver("instagram", payload, kind="read", customer=accepted.to,
                           message_id=accepted.message_id, state="read")
