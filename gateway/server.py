"""Running the gateway: two listeners (HTTP and metrics), signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import signal
import time

from aiohttp import web

from gateway import keys
from gateway import logging as gwlog
from gateway.app import create_app, metrics_app
from gateway.config import GatewayConfig
from gateway.listener import KEEPALIVE_SECONDS, LINGER_SECONDS, MAX_HEADERS, Listener
from gateway.metrics import Metrics

log = gwlog.get("gateway.server")


# Every aiohttp handler of the gateway (the main port's handed-off connections, the metrics
# port) as the lean path: its keep-alive (aiohttp's own default is an hour), its header limit,
# and its linger after an early answer (aiohttp's: 10 s spent discarding an unread body).
# auto_decompress off: aiohttp would inflate a Content-Encoding body while parsing it, so a few KB
# on the wire (what max_body_bytes and the byte budget see) could become megabytes in memory, and
# one that does not inflate would fail in the parser. Webhooks refuse encoded bodies (415).
HANDLER_LIMITS = {"keepalive_timeout": KEEPALIVE_SECONDS, "max_headers": MAX_HEADERS,
                  "lingering_time": LINGER_SECONDS, "auto_decompress": False}
GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (Python: 700)


def tune_gc() -> None:
    """Move what start-up built (modules, the app, plugins) out of the collector's way, and
    collect the young generation less often: the request path allocates many short-lived objects
    that reference counting frees anyway. Called once the gateway serves (process-wide)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(config: GatewayConfig, stop: asyncio.Event | None = None,
                started: asyncio.Event | None = None, gc_tuning: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain and close cleanly.

    On a stop signal the gateway stops accepting connections, lets in-flight requests finish,
    processes what is journaled and lets sinks catch up, all within ``server.shutdown_timeout``.
    """
    stop = stop or asyncio.Event()
    metrics = Metrics()
    app = create_app(config, metrics=metrics)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners = [main_runner(app)]
    if config.server.metrics_port != config.server.port:
        runners.append(web.AppRunner(metrics_app(metrics), access_log=None, **HANDLER_LIMITS))
    listener: Listener | None = None
    try:
        for runner in runners:
            await runner.setup()
        listener = Listener(runners[0], fast=config.server.fast_intake)
        await listener.start(config.server.host, config.server.port)
        if len(runners) > 1:
            await web.TCPSite(runners[1], config.server.host, config.server.metrics_port,
                              reuse_address=True).start()
        log.info("listening", host=config.server.host, port=config.server.port,
                 metrics_port=config.server.metrics_port)
        if gc_tuning:
            tune_gc()
        if started:
            started.set()
        await stop.wait()
        log.info("shutting_down", timeout=config.server.shutdown_timeout)
    finally:
        deadline = time.monotonic() + config.server.shutdown_timeout
        if listener is not None:
            await listener.stop(config.server.shutdown_timeout)
        # aiohttp's shutdown stops reading at once: a request whose body is still arriving (an
        # API call, a webhook handed to aiohttp) would never be answered. Let them finish first.
        serving = app[keys.IN_FLIGHT]
        while serving["requests"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for runner in reversed(runners):
            await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main_runner(app: web.Application) -> web.AppRunner:
    """The main port's aiohttp runner (behind :class:`gateway.listener.Listener`), as ``gateway
    serve`` sets it up."""
    return web.AppRunner(app, access_log=None,
                         shutdown_timeout=app[keys.CONFIG].server.shutdown_timeout,
                         **HANDLER_LIMITS)


def run(config: GatewayConfig) -> None:
    """Blocking entry point used by ``gateway serve``: uvloop when installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(config, gc_tuning=True))
        return
    uvloop.run(serve(config, gc_tuning=True))
