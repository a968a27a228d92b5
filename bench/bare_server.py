"""The baseline for bench/ingest.py: an aiohttp server that reads the body and answers 200.

Same event loop (uvloop) and same aiohttp as the gateway, no access log: what any aiohttp webhook
receiver costs before it does anything useful.
"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web


async def receive(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"status":"accepted"}', content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def main(port: int) -> None:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/webhooks/{channel}", receive)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    while True:
        await __import__("asyncio").sleep(3600)


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
