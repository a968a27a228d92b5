"""``create_app(config)``: the aiohttp application, its routes and its lifecycle (cleanup_ctx)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pluggy
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import erasure, intake, keys, plugins
from gateway import logging as gwlog
from gateway.budget import ByteBudget
from gateway.config import GatewayConfig
from gateway.dispatch import Dispatcher
from gateway.errors import ConfigError, failed_to_start
from gateway.journal import open_journal
from gateway.metrics import Metrics
from gateway.outbound import OutboundService, OutboxSink
from gateway.outbound import api as outbound_api
from gateway.processor import Processor

if TYPE_CHECKING:
    from gateway.channel import Channel

log = gwlog.get("gateway.app")
# Re-exported so plugin handlers can write ``request.app[gateway.app.CHANNELS]``.
CONFIG, CHANNELS, SINKS, JOURNAL, METRICS = (
    keys.CONFIG, keys.CHANNELS, keys.SINKS, keys.JOURNAL, keys.METRICS)
HOUSEKEEPING_SECONDS = 5.0
PRUNE_SECONDS = 60.0
GC_SECONDS = 60.0  # a full collection this often: the young threshold is raised (server.tune_gc)


def create_app(config: GatewayConfig, pm: pluggy.PluginManager | None = None,
               metrics: Metrics | None = None) -> web.Application:
    """Build the gateway application from a validated config.

    Raises:
        ConfigError: a plugin table is invalid, or an enabled channel has no app secret while
            ``server.insecure_skip_signature`` is off.
        PluginError: a plugin failed to load, or one of its hooks raised or returned something
            the core cannot use (a component without a name, a reserved sink name or path, ...).
    """
    pm = pm or plugins.manager()
    provided = plugins.components(pm, config)
    channels, sinks = provided.channels, provided.sinks
    require_secrets(config, channels)
    require_distinct_files(config, sinks)
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          middlewares=[in_flight, json_errors])
    app[keys.IN_FLIGHT] = {"requests": 0}
    app[keys.CONFIG] = config
    app[keys.PLUGINS] = pm
    app[keys.CHANNELS] = channels
    app[keys.SINKS] = sinks
    app[keys.OWNERS] = provided.owners
    app[keys.METRICS] = metrics or Metrics()
    app[keys.READY] = {"ready": False}
    app[keys.BUDGET] = ByteBudget(config.server.max_buffered_bytes)
    if any(channel.accounts() for channel in channels.values()):
        service = OutboundService(config, channels, app[keys.METRICS])
        app[keys.OUTBOUND] = service
        sinks["outbox"] = OutboxSink(service)
    app.router.add_get("/webhooks/{channel}", intake.handshake)
    app.router.add_post("/webhooks/{channel}", intake.receive, expect_handler=intake.expect)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_routes(erasure.routes())
    app.router.add_routes(outbound_api.routes())
    if config.server.metrics_port == config.server.port:
        app.router.add_get("/metrics", metrics_handler)
    plugins.add_routes(app.router, pm, config)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_not_ready)
    return app


def require_secrets(config: GatewayConfig, channels: dict) -> None:
    """Refuse to start when an enabled channel could accept unsigned requests.

    Raises:
        ConfigError: naming each channel without an app secret (``ConfigErrors`` when several).
    """
    from gateway.config import ConfigErrors

    if config.server.insecure_skip_signature:
        log.warning("insecure_skip_signature", detail="webhook signatures are NOT checked")
        return
    errors = [ConfigError(
        f"channel {name!r} is enabled but has no app secret: set {name.upper()}_APP_SECRET or "
        "META_APP_SECRET (or app_secret in the config), or disable the channel",
        f"channels.{name}.app_secret") for name, channel in channels.items()
        if not channel.app_secret]
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)


def require_distinct_files(config: GatewayConfig, sinks: dict) -> None:
    """Refuse two sinks writing one file (what each sink's ``files()`` names), or a sink writing
    one of the gateway's own files (databases, the erasure audit log and key): each would corrupt
    the other's (a jsonl sink's repair truncating a SQLite file).

    Raises:
        ConfigError: naming each sink ``path`` key that is taken (``ConfigErrors`` when several).
    """
    from gateway.config import ConfigErrors

    data_dir = config.server.data_dir
    own = [f"{db}{suffix}" for db in ("journal.db", "outbox.db") for suffix in ("", "-wal", "-shm")]
    owners = {os.path.realpath(os.path.join(data_dir, name)): f"the gateway's {name}"
              for name in (*own, "erasures.jsonl", "erasure-audit.key")}
    errors = []
    for name, sink in sinks.items():
        for path in sink.files():
            real = os.path.realpath(path)
            if real in owners:
                errors.append(ConfigError(f"{path} is already used by {owners[real]}: give each "
                                          "sink a file of its own", f"sinks.{name}.path"))
                break
            owners[real] = f"sinks.{name}.path"
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    # Whatever has started is stopped again in reverse order: after the drain at shutdown, and
    # also when a later step fails to start (a sink that cannot reach its backend, a plugin's
    # gateway_started raising), so that a failed start leaves no database or thread open.
    async with contextlib.AsyncExitStack() as stack:
        tasks, processor, dispatcher = await _start(app, stack)
        yield
        await _drain(app, tasks, processor, dispatcher, app[keys.CONFIG].server.shutdown_timeout)
    log.info("gateway_stopped")


async def _start(app: web.Application, stack: contextlib.AsyncExitStack
                 ) -> tuple[list[asyncio.Task], Processor, Dispatcher]:
    config, metrics, owners = app[keys.CONFIG], app[keys.METRICS], app[keys.OWNERS]
    journal = open_journal(config)
    await journal.open()
    stack.push_async_callback(journal.close)
    app[keys.JOURNAL] = journal
    for name, channel in app[keys.CHANNELS].items():
        await _start_channel(name, channel, owners.get(("channel", name), ""))
        stack.push_async_callback(_close_channel, name, channel)
    outbound = app.get(keys.OUTBOUND)
    if outbound is not None:
        await outbound.start()
        stack.push_async_callback(outbound.stop)
    dispatcher = Dispatcher(journal, app[keys.SINKS], metrics,
                            {name: owner for (what, name), owner in owners.items()
                             if what == "sink"})
    if outbound is not None:
        dispatcher.observers.append(outbound.observe)
    await dispatcher.start()  # a sink that fails to start: the ones started before are closed
    stack.push_async_callback(dispatcher.stop, 0)  # after the drain's stop: does nothing
    processor = Processor(journal, app[keys.CHANNELS], dispatcher, metrics)
    if outbound is not None:  # read-your-writes: sends are checked against acknowledged webhooks
        outbound.inbound_caught_up = processor.caught_up
        outbound.resolve_customer = processor.identities.resolve  # one customer, one window
        outbound.aliases_of = processor.identities.aliases_of  # ... and one word on consent
        processor.notice_observers.append(outbound.notices)  # Meta's out-of-band throttling
    app[keys.DISPATCHER] = dispatcher
    app[keys.PROCESSOR] = processor
    tasks = [asyncio.create_task(processor.run(), name="processor"),
             asyncio.create_task(_housekeeping(app), name="housekeeping")]
    stack.push_async_callback(_cancel, processor, tasks)
    app[keys.READY]["ready"] = True
    stack.callback(app[keys.READY].__setitem__, "ready", False)
    plugins.notify(app[keys.PLUGINS], "gateway_started", app=app, config=config)
    log.info("gateway_started", channels=sorted(app[keys.CHANNELS]), sinks=sorted(app[keys.SINKS]),
             journal=config.queue.backend, pending=journal.pending)
    return tasks, processor, dispatcher


async def _start_channel(name: str, channel: Channel, plugin: str) -> None:
    """As :meth:`Dispatcher.start` starts sinks: a failure is a PluginError naming both."""
    try:
        await channel.start()
    except Exception as exc:
        raise failed_to_start("channel", name, plugin, exc)  # noqa: B904 - its cause is set


async def _close_channel(name: str, channel: Channel) -> None:
    try:
        await channel.close()
    except Exception as exc:  # noqa: BLE001 - one channel's failure must not stop the others
        log.error("channel_close_failed", channel=name, error=repr(exc))


async def _cancel(processor: Processor, tasks: list[asyncio.Task]) -> None:
    """Stop the processor and housekeeping tasks now (after the drain: they are done already)."""
    processor.stop()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _drain(app, tasks, processor, dispatcher, timeout: float) -> None:
    """Process what is journaled and let sinks catch up, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    processor.stop()
    try:
        await asyncio.wait_for(asyncio.shield(tasks[0]),
                               timeout=max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        log.warning("drain_incomplete", pending=app[keys.JOURNAL].pending)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await dispatcher.stop(max(0.1, deadline - time.monotonic()))


async def _housekeeping(app: web.Application) -> None:
    journal, metrics = app[keys.JOURNAL], app[keys.METRICS]
    dispatcher = app[keys.DISPATCHER]
    last_prune, last_gc = 0.0, time.monotonic()
    dead_labels: set[str] = set()  # every sink label the gauge was set for: back to 0 when empty
    while True:
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
        if time.monotonic() - last_gc > GC_SECONDS:  # whatever cycle still holds memory
            last_gc = time.monotonic()
            gc.collect()
        with contextlib.suppress(Exception):
            counts = await journal.dead_letter_counts()
            dead_labels |= set(dispatcher.sinks) | set(counts)
            for name in dead_labels:
                metrics.dead_letters.labels(name).set(counts.get(name, 0))
            for name, worker in dispatcher.workers.items():
                metrics.queue_depth.labels(f"sink:{name}").set(worker.lag())
            metrics.queue_depth.labels("journal").set(journal.pending)
            if time.monotonic() - last_prune > PRUNE_SECONDS:
                last_prune = time.monotonic()
                await journal.prune(time.time())


async def _not_ready(app: web.Application) -> None:
    app[keys.READY]["ready"] = False
    # whatever a plugin does here, the drain and the closing of sinks and journal must follow
    for plugin, error in plugins.notify_each(app[keys.PLUGINS], "gateway_stopping", app=app):
        log.error("plugin_hook_failed", hook="gateway_stopping", plugin=plugin, error=str(error))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: started, not shutting down, journal and sinks reachable."""
    app = request.app
    checks = {"started": app[keys.READY]["ready"]}
    if keys.JOURNAL in app:
        checks["journal"] = await app[keys.JOURNAL].ping()
    for name, sink in app[keys.SINKS].items():
        try:
            checks[f"sink:{name}"] = await asyncio.wait_for(sink.ready(), timeout=2.0)
        except Exception:  # noqa: BLE001 - not ready is the answer
            checks[f"sink:{name}"] = False
    ok = all(checks.values())
    return web.json_response({"status": "ready" if ok else "unavailable", "checks": checks},
                             status=200 if ok else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus exposition of this app's registry."""
    registry = request.app[keys.METRICS].registry
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app(metrics: Metrics) -> web.Application:
    """The small app served on ``metrics_port``."""
    app = web.Application()
    app[keys.METRICS] = metrics
    app.router.add_get("/metrics", metrics_handler)
    return app


@web.middleware
async def in_flight(request: web.Request, handler) -> web.StreamResponse:
    """Counts the requests being served (``keys.IN_FLIGHT``), for the drain at SIGTERM."""
    counter = request.app[keys.IN_FLIGHT]
    counter["requests"] += 1
    try:
        return await handler(request)
    finally:
        counter["requests"] -= 1


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error the framework raises (404, 405, 413, …) becomes the JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return intake.error(exc.status, code, exc.text or exc.reason, keep)
    except ConnectionResetError as exc:  # the client left mid-request: there is no one to answer
        # The request's payload keeps this exception; its traceback holds the frames that hold
        # the request: a reference cycle that would keep the body (up to max_body_bytes) alive
        # until a full collection. Dropping the traceback lets reference counting free it now.
        exc.__traceback__ = None
        log.debug("client_disconnected", path=request.path)
        return intake.error(400, "connection_lost", "the client closed the connection")
    except Exception as exc:  # noqa: BLE001 - never a bare 500 page
        log.exception("unhandled_error", path=request.path)
        exc.__traceback__ = None  # logged: free the frames (and the request) with it
        return intake.error(500, "internal_error", "internal error; see the gateway's log")
