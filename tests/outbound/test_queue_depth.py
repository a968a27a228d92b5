"""``gateway_queue_depth{queue="outbox"}``: messages waiting in the outbox to be sent."""

from __future__ import annotations

import asyncio

from tests.outbound.conftest import WA

A = "15550001234"


async def depth_reaches(ob, value: float, timeout: float = 10.0) -> float | None:
    found = None
    for _ in range(int(timeout / 0.05)):
        found = ob.metric("gateway_queue_depth", queue="outbox")
        if found == value:
            return found
        await asyncio.sleep(0.05)
    return found


async def test_the_outbox_depth_counts_waiting_messages(outbound):
    ob = await outbound()
    await ob.inbound("whatsapp", A)
    assert await depth_reaches(ob, 0.0) == 0.0
    ob.sim.block(WA, 2.0)  # Meta refuses the account's sends for 2 s: they wait
    ids = [(await ob.send({"channel": "whatsapp", "to": A, "type": "text",
                           "text": str(i)}))[1]["id"] for i in range(5)]
    assert await depth_reaches(ob, 5.0) == 5.0
    assert ob.metric("gateway_queue_depth", queue="sink:outbox") != 5.0  # its own series
    for record_id in ids:
        await ob.wait(record_id, "sent", timeout=30)
    assert await depth_reaches(ob, 0.0) == 0.0
