"""``gateway demo``: the whole pipeline on one machine, no Meta account, stops by itself.

One process runs, all on 127.0.0.1:

- the gateway (``create_app``) on embedded defaults — a temporary data dir, both channels with a
  generated app secret and the simulator as ``graph_base_url``, the ``storage``, ``jsonl`` and
  ``ai`` (rules) sinks, a generated API token — or on ``--config PATH`` with the demo's
  essentials filled in (see ``docs/demo.md``);
- :class:`gateway.testing.simulator.MetaSimulator` with its GraphSimulator: signed webhooks in,
  Graph API sends out, statuses / echoes back;
- six simulated customers (three on WhatsApp, three on Instagram) who write in at random
  intervals (seeded, so every run tells the same story) and wait for each answer.

The terminal shows one line per customer message, reply and status, a progress line, and a
summary. The exit status is 0 when every customer message got a reply, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

SEED = 20251009
# The time budget: at the default duration (30 s) the whole run, start-up to exit, fits in
# DEADLINE_SECONDS (under a minute). Traffic is cut short when start-up was slow, the drain
# ends SHUTDOWN_RESERVE seconds before the deadline, and shutdown is bounded by its timeouts.
DEADLINE_SECONDS = 55.0
DRAIN_SECONDS = 15.0
MIN_DRAIN_SECONDS = 5.0
SHUTDOWN_RESERVE = 6.0
SHUTDOWN_TIMEOUT = 3.0  # the gateway's own drain (server.shutdown_timeout) during the demo
REPLY_WAIT_SECONDS = 10.0
PHONE_NUMBER_ID = "100000000000001"
IG_ACCOUNT_ID = "17840000000000001"


@dataclass
class Customer:
    """A simulated customer and the lines they will write, in order (cycled)."""

    channel: str
    id: str
    name: str
    lines: tuple[str, ...]
    pending: deque[float] = field(default_factory=deque)  # perf_counter of unanswered messages
    answered: asyncio.Event = field(default_factory=asyncio.Event)


def customers() -> list[Customer]:
    """The cast: three WhatsApp and three Instagram customers."""
    return [
        Customer("whatsapp", "15550001234", "Alex Example", (
            "Hi!", "Is my order #4521 on its way?", "How long does delivery to Porto take?",
            "Perfect, thanks \U0001f44d", "One more thing: can I return shoes that don't fit?")),
        Customer("whatsapp", "15550005678", "Sam Sample", (
            "Hello, are you open on Sunday?", "I received a damaged mug \U0001f61e",
            "Do you have a discount code?", "Can I talk to a human please?", "Great, thank you!")),
        Customer("whatsapp", "15550009876", "Dana Demo", (
            "Ol\u00e1! Do you ship to Lisbon?", "How much is the blue jacket?",
            "Where can I track my package?", "Obrigada!", "Are you open on holidays?")),
        Customer("instagram", "9000000000000001", "Lena", (
            "hey \U0001f44b love the new collection", "Do you ship to Berlin?",
            "How much is shipping?", "Danke sch\u00f6n!", "Can I still change my order?")),
        Customer("instagram", "9000000000000002", "Marco", (
            "Ciao! What are your opening hours?", "Where is my package? Order 7781",
            "It says delivered but it's not here", "Can I get a refund?", "ok thanks")),
        Customer("instagram", "9000000000000003", "Priya", (
            "Hi there", "Is there a sale this weekend?", "I'd like to return a dress",
            "Thanks! \u2764\ufe0f", "What time do you close today?")),
    ]


class DemoError(Exception):
    """The demo cannot run in this build or environment (message says why)."""


def run_demo(config_path: str | None, duration: float) -> int:
    """Run the demo for ``duration`` seconds of traffic, then drain and summarise.

    Returns:
        0 when every customer message got a reply, 1 otherwise (or when the demo cannot run).
    """
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    demo = Demo(config_path, max(1.0, duration), sys.stdout)
    try:
        return asyncio.run(_until_sigterm(demo.run()))
    except DemoError as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("gateway demo: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM


async def _until_sigterm(work: Coroutine[Any, Any, int]) -> int:
    """``work``, cancelled by SIGTERM like Ctrl-C cancels it: its ``finally`` clauses stop the
    simulator and the gateway and remove the demo's temporary directory."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals: not main thread
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


class Demo:
    """One run: gateway + simulator + customers + display."""

    def __init__(self, config_path: str | None, duration: float, out: TextIO) -> None:
        self.config_path = config_path
        self.duration = duration  # seconds of traffic (trimmed to the budget when it starts)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + max(DEADLINE_SECONDS,
                                      duration + DRAIN_SECONDS + SHUTDOWN_RESERVE + 4.0)
        self.screen = Screen(out)
        self.customers = customers()
        self.by_key = {(c.channel, c.id): c for c in self.customers}
        self.sent = Counter()          # channel -> customer messages delivered (200)
        self.undelivered = 0           # customer messages the gateway never acked
        self.replies = Counter()       # channel -> messages accepted by the Graph simulator
        self.statuses = Counter()      # (channel, state) -> delivered status / echo / read
        self.response_times: list[float] = []
        self.retries = 0
        self.webhooks = 0
        self.started = 0.0

    async def run(self) -> int:
        graph = _graph_class()()
        tmp = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
        code = None
        await graph.start()
        try:
            config = self._configure(tmp, str(graph.url))
            with DemoLog(Path(config.server.data_dir) / "gateway-demo.log") as log_path:
                code = await self._serve(config, graph, log_path)
        finally:
            await graph.stop()
            if code in (0, None) or self.config_path is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                self.screen.line(f"  kept {tmp} for a look (gateway-demo.log, events.jsonl)")
        return code

    async def _serve(self, config, graph, log_path: Path) -> int:
        from aiohttp import web

        from gateway import keys
        from gateway.app import create_app
        from gateway.metrics import Metrics

        metrics = Metrics()
        app = create_app(config, metrics=metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        sim = None
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", config.server.port).start()
            if keys.OUTBOUND not in app:
                raise DemoError(
                    "this build has no outbound service (app[gateway.keys.OUTBOUND] is missing), "
                    "so nobody can answer the customers. The demo needs the outbound messaging "
                    "service (POST /v1/messages); install a build that includes it.")
            sim = self._simulator(app, graph, f"http://127.0.0.1:{config.server.port}")
            await sim.start()
            budget = self.deadline - SHUTDOWN_RESERVE - MIN_DRAIN_SECONDS - time.monotonic()
            self.duration = max(1.0, min(self.duration, budget))
            self._intro(config, log_path)
            await self._traffic(sim)
            await self._drain(sim)
            self.screen.done()
            return self._summary(ack_quantiles(metrics), metrics)
        finally:
            if sim is not None:
                await sim.stop()
            await runner.cleanup()

    # -- set-up -------------------------------------------------------------------------------

    def _configure(self, tmp: Path, graph_url: str):
        from gateway import config as gwconfig
        from gateway.testing import free_port

        data = demo_config(self.config_path, tmp, graph_url, free_port())
        path = tmp / "demo.toml"
        path.write_text(to_toml(data), encoding="utf-8")
        # Embedded defaults ignore GATEWAY_DATA_DIR & co.: the demo never writes into real data.
        return gwconfig.load(str(path), environ=os.environ if self.config_path else {})

    def _simulator(self, app, graph, url: str):
        from gateway import keys
        from gateway.testing.simulator import MetaSimulator

        channels = app[keys.CHANNELS]
        # The effective values: the environment may override what the demo config says.
        app_secrets = {name: ch.app_secret.decode() for name, ch in channels.items()
                       if ch.app_secret}
        whatsapp, instagram = channels.get("whatsapp"), channels.get("instagram")
        pnid = getattr(getattr(whatsapp, "config", None), "phone_number_id", None)
        page = getattr(getattr(instagram, "config", None), "page_id", None)
        sim = MetaSimulator(
            url, app_secret=next(iter(app_secrets.values()), ""), app_secrets=app_secrets,
            graph=graph, phone_number_id=pnid or PHONE_NUMBER_ID,
            instagram_account_id=page or IG_ACCOUNT_ID,
            names={c.id: c.name for c in self.customers if c.channel == "whatsapp"},
            status_delays=(0.1, 0.25, 0.6), echo_delay=0.05, read_delay=0.6)
        self.customers = [c for c in self.customers if c.channel in channels]
        sim.on_delivery.append(self._on_delivery)
        graph.on_accept.append(self._on_accept)
        return sim

    def _intro(self, config, log_path: Path) -> None:
        counts = Counter(c.channel for c in self.customers)
        self.screen.line(
            f"gateway demo: gateway on http://127.0.0.1:{config.server.port}, "
            f"{len(self.customers)} customers "
            f"({', '.join(f'{n} on {ch}' for ch, n in counts.items())}), "
            f"{self.duration:.0f} s of traffic")
        self.screen.line(f"  data: {config.server.data_dir}   gateway log: {log_path}")
        self.screen.line(f"  {'time':>6}  {'channel':<9} {'customer':<14}   message")

    # -- traffic ------------------------------------------------------------------------------

    async def _traffic(self, sim) -> None:
        self.started = time.monotonic()
        self.screen.progress = self._progress
        tasks = [asyncio.create_task(self._customer(sim, c, random.Random(SEED + i)))
                 for i, c in enumerate(self.customers)]
        ticker = asyncio.create_task(self.screen.tick())
        try:  # a customer stuck in a delivery (retries, timeouts) is cut off at the end
            await asyncio.wait(tasks, timeout=self.duration + 1.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _customer(self, sim, customer: Customer, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0.2, min(2.0, self.duration / 3)))
        for turn in range(10_000):  # bounded; the clock ends it long before
            if self.elapsed() >= self.duration:
                return
            text = customer.lines[turn % len(customer.lines)]
            customer.answered.clear()
            customer.pending.append(time.perf_counter())
            self.event(customer.channel, customer.name, f">  {short(text)}", "in")
            try:
                delivery = await sim.customer_says(customer.channel, customer.id, text)
            except asyncio.CancelledError:  # traffic ended mid-delivery: not a missing reply
                customer.pending.pop()
                raise
            if not delivery.ok:
                customer.pending.pop()
                self.undelivered += 1
                self.event(customer.channel, customer.name, f"x  the gateway answered "
                           f"{delivery.status or 'nothing'} {delivery.attempts} times; giving up",
                           "in")
                return
            with contextlib.suppress(TimeoutError):  # the drain waits for the last replies
                await asyncio.wait_for(customer.answered.wait(),
                                       min(REPLY_WAIT_SECONDS, self.remaining()))
            await asyncio.sleep(min(rng.uniform(1.5, 5.0), self.remaining()))

    async def _drain(self, sim) -> None:
        self.screen.line(f"  -- {self.duration:.0f} s of traffic done; waiting for the last "
                         "replies and statuses")
        deadline = min(time.monotonic() + DRAIN_SECONDS, self.deadline - SHUTDOWN_RESERVE)
        while self.awaiting() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await sim.drain(max(0.5, min(5.0, deadline - time.monotonic())))

    def remaining(self) -> float:
        return max(0.0, self.duration - self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0

    def awaiting(self) -> int:
        return sum(len(c.pending) for c in self.customers)

    # -- observers ----------------------------------------------------------------------------

    def _on_delivery(self, delivery) -> None:
        self.webhooks += 1
        self.retries += delivery.attempts - 1
        customer = self.by_key.get((delivery.channel, delivery.customer))
        who = customer.name if customer else delivery.customer
        if delivery.kind == "message":  # shown when sent (see _customer)
            self.sent[delivery.channel] += delivery.ok
        elif delivery.ok:
            state = delivery.state if delivery.kind != "echo" else "echo"
            self.statuses[(delivery.channel, state)] += 1
            self.event(delivery.channel, who, f".  {state}", "status")

    def _on_accept(self, accepted) -> Any:
        self.replies[accepted.channel] += 1
        customer = self.by_key.get((accepted.channel, str(accepted.to)))
        if customer is not None and customer.pending:
            self.response_times.append(time.perf_counter() - customer.pending.popleft())
            customer.answered.set()
        who = customer.name if customer else str(accepted.to)
        self.event(accepted.channel, who, f"<  {short(reply_text(accepted.body))}", "out")
        return None

    def event(self, channel: str, who: str, text: str, kind: str) -> None:
        self.screen.line(f"  {self.elapsed():>5.1f}s  {channel:<9} {who[:14]:<14}   {text}", kind)

    def _progress(self) -> str:
        done = min(1.0, self.elapsed() / self.duration)
        bar = "#" * int(done * 24)
        return (f"  [{bar:<24}] {min(self.elapsed(), self.duration):4.1f}/{self.duration:.0f}s  "
                f"in {sum(self.sent.values())}  out {sum(self.replies.values())}  "
                f"statuses {sum(self.statuses.values())}  awaiting reply {self.awaiting()}")

    # -- summary ------------------------------------------------------------------------------

    def _summary(self, ack: tuple[float | None, float | None], metrics) -> int:
        total_in = sum(self.sent.values())
        missing = self.awaiting() + self.undelivered
        wa = {s: self.statuses[("whatsapp", s)] for s in ("sent", "delivered", "read")}
        ig = {s: self.statuses[("instagram", s)] for s in ("echo", "read")}
        p50, p99 = quantile(self.response_times, 0.5), quantile(self.response_times, 0.99)
        lines = [
            "",
            "Summary",
            f"  messages in:    {total_in} ({_by_channel(self.sent)})",
            f"  messages out:   {sum(self.replies.values())} ({_by_channel(self.replies)})",
            f"  statuses:       {sum(self.statuses.values())} (whatsapp sent {wa['sent']}, "
            f"delivered {wa['delivered']}, read {wa['read']}; instagram echo {ig['echo']}, "
            f"read {ig['read']})",
            f"  response time:  p50 {_ms(p50)}  p99 {_ms(p99)}  (customer message sent -> reply "
            "at the simulator)",
            f"  webhook ack:    p50 {_ms(ack[0])}  p99 {_ms(ack[1])}  "
            "(gateway_webhook_ack_seconds)",
            f"  deliveries:     {self.webhooks} webhooks, {self.retries} retried; "
            f"dead letters {_dead_letters(metrics)}",
            f"  took:           {time.monotonic() - self.t0:.1f} s ({self.duration:.0f} s of "
            f"traffic; stops by {self.deadline - self.t0:.0f} s at the latest)",
        ]
        if missing:
            lines.append(f"  result:         FAIL - {missing} of {total_in + self.undelivered} "
                         "customer messages got no reply")
        else:
            lines.append(f"  result:         OK - all {total_in} customer messages got a reply")
        for line in lines:
            self.screen.line(line)
        return 1 if missing or total_in == 0 else 0


# -- configuration ----------------------------------------------------------------------------

def demo_config(config_path: str | None, tmp: Path, graph_url: str, port: int) -> dict[str, Any]:
    """The demo's config: embedded defaults, or ``config_path`` with the demo's essentials."""
    if config_path is None:
        data: dict[str, Any] = {
            "server": {"data_dir": str(tmp / "data")},
            "channels": {"whatsapp": {}, "instagram": {}},
            "sinks": {"storage": {}, "jsonl": {}, "ai": {"provider": "rules"}},
        }
    else:
        from gateway.errors import ConfigError

        try:
            with open(config_path, "rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from None
        for key in ("server", "channels", "sinks"):  # the tables the demo adds its essentials to
            if not isinstance(data.get(key, {}), dict):
                raise ConfigError(f"must be a table, got {type(data[key]).__name__}", key)
        data.setdefault("sinks", {}).setdefault("ai", {"provider": "rules"})
        for name in ("whatsapp", "instagram"):
            data.setdefault("channels", {}).setdefault(name, {})
    server = data.setdefault("server", {})
    server.update(host="127.0.0.1", port=port, metrics_port=port)
    server.setdefault("shutdown_timeout", SHUTDOWN_TIMEOUT)
    server.setdefault("api_token", secrets.token_urlsafe(24))
    ids = {"whatsapp": ("phone_number_id", PHONE_NUMBER_ID),
           "instagram": ("page_id", IG_ACCOUNT_ID)}
    for name, table in data["channels"].items():
        if name not in ids or not isinstance(table, dict):
            continue
        table["graph_base_url"] = graph_url  # never Meta's real endpoint in a demo
        table.setdefault("app_secret", secrets.token_hex(16))
        table.setdefault("verify_token", "demo-verify-token")
        table.setdefault("access_token", "DEMO" + secrets.token_urlsafe(32))
        table.setdefault(*ids[name])
    return data


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for config dicts (tables of scalars, lists and inline tables)."""
    out: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        out.append(f"[{prefix}]")
        out.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
        out.append("")
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{prefix}.{_key(key)}", value)

    for key, value in data.items():
        if isinstance(value, dict):
            table(_key(key), value)
        else:
            out.insert(0, f"{_key(key)} = {_value(value)}")
    return "\n".join(out) + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _graph_class():
    try:
        from gateway.testing.graph import GraphSimulator
    except ImportError as exc:
        raise DemoError(f"the Graph API simulator (gateway.testing.graph) is not available in "
                        f"this build: {exc}") from None
    return GraphSimulator


class DemoLog:
    """The gateway's structured log goes to a file during the demo; restored afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stream: TextIO | None = None

    def __enter__(self) -> Path:
        import logging

        import structlog

        from gateway import logging as gwlog
        from gateway.config import LoggingConfig

        self._saved = structlog.get_config()
        self._handlers = list(logging.getLogger().handlers)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        gwlog.setup(LoggingConfig(level="info", format="json"), stream=self.stream)
        return self.path

    def __exit__(self, *exc: object) -> None:
        import logging

        import structlog

        structlog.configure(**self._saved)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in self._handlers:
                root.removeHandler(handler)
        if self.stream is not None:
            self.stream.close()


# -- numbers ----------------------------------------------------------------------------------

def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values`` (nearest rank), None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``buckets`` are cumulative (upper bound, count)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def ack_quantiles(metrics) -> tuple[float | None, float | None]:
    """p50 and p99 of ``gateway_webhook_ack_seconds`` over every channel."""
    cumulative: Counter[float] = Counter()
    for family in metrics.registry.collect():
        if family.name != "gateway_webhook_ack_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                cumulative[float(sample.labels["le"])] += sample.value
    buckets = list(cumulative.items())
    return histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)


def _dead_letters(metrics) -> int:
    total = 0.0
    for family in metrics.registry.collect():
        if family.name == "gateway_sink_deliveries":
            total += sum(s.value for s in family.samples
                         if s.name.endswith("_total") and s.labels.get("outcome") == "dead")
    return int(total)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _by_channel(counts: Counter) -> str:
    return ", ".join(f"{ch} {counts[ch]}" for ch in ("whatsapp", "instagram"))


def short(text: str | None, width: int = 70) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[:width - 3] + "..."


def reply_text(body: Any) -> str:
    """The text of a Graph API send body (WhatsApp or Instagram), or its type."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("text"), dict):
        return str(body["text"].get("body", ""))
    message = body.get("message")
    if isinstance(message, dict):
        attachment = message.get("attachment")
        kind = attachment.get("type") if isinstance(attachment, dict) else None
        return str(message.get("text") or f"[{kind or 'attachment'}]")
    return f"[{body.get('type') or body.get('sender_action') or 'message'}]"


# -- terminal ---------------------------------------------------------------------------------

class Screen:
    """Event lines and a progress line (redrawn with ``\\r`` on a terminal; plain lines off one)."""

    COLORS = {"in": "\033[36m", "out": "\033[32m", "status": "\033[2m"}

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.color = self.tty and not os.environ.get("NO_COLOR")
        self.progress = None
        self._last_plain = 0.0

    def line(self, text: str, kind: str = "") -> None:
        if self.color and kind in self.COLORS:
            text = f"{self.COLORS[kind]}{text}\033[0m"
        if self.tty:
            self.out.write("\r\033[K" + text + "\n")
            self._draw()
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def _draw(self) -> None:
        if self.tty and self.progress is not None:
            self.out.write("\r\033[K" + self.progress())
            self.out.flush()

    async def tick(self, every: float = 0.25, plain_every: float = 5.0) -> None:
        for _ in range(1_000_000):  # bounded; cancelled when traffic ends
            await asyncio.sleep(every)
            if self.tty:
                self._draw()
            elif self.progress is not None and time.monotonic() - self._last_plain >= plain_every:
                self._last_plain = time.monotonic()
                self.out.write(self.progress().replace("  [", "  -- [", 1) + "\n")
                self.out.flush()

    def done(self) -> None:
        self.progress = None
        if self.tty:
            self.out.write("\r\033[K")
            self.out.flush()
