"""A send Meta accepted but answered too late (the client timed out): the record waits
``outbound.reconcile_seconds`` for the status webhook naming it (``biz_opaque_callback_data``)
instead of resending blindly; only without one is it sent again."""

from __future__ import annotations

import asyncio

from gateway.testing.simulator import MetaSimulator
from tests.outbound.conftest import WA

A = "15550001234"
SLOW_META = "send_timeout = 0.5"


async def test_a_late_answer_is_reconciled_by_the_status_webhook(outbound):
    ob = await outbound(extra_wa=SLOW_META, outbound="reconcile_seconds = 2.0")
    await ob.inbound("whatsapp", A)
    ob.sim.delay_next(WA, 5.0)
    _, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "once"})
    for _ in range(100):
        if ob.sim.accepted:
            break
        await asyncio.sleep(0.02)
    (accepted,) = ob.sim.accepted
    await asyncio.sleep(0.8)  # the client timed out: uncertain, waiting for the webhook
    record = await ob.status(answer["id"])
    assert record["status"] == "queued" and "interrupted" in record["error"]["message"]
    meta = MetaSimulator(ob.gw.url, app_secret="test-app-secret", graph=False)
    await meta.start()
    try:
        status = meta.whatsapp_status(accepted.message_id, "delivered", A, accepted.at,
                                      phone_number_id=WA, callback_data=answer["id"])
        assert (await meta.deliver("whatsapp", status)).ok
    finally:
        await meta.stop()
    record = await ob.wait(answer["id"], "delivered", timeout=5)
    assert record["provider_message_id"] == accepted.message_id
    await asyncio.sleep(2.0)  # past reconcile_seconds: nothing is sent again
    assert len(ob.sim.accepted) == 1


async def test_without_a_webhook_it_is_sent_again_after_reconcile_seconds(outbound):
    ob = await outbound(extra_wa=SLOW_META, outbound="reconcile_seconds = 1.5")
    await ob.inbound("whatsapp", A)
    ob.sim.delay_next(WA, 5.0)
    _, answer = await ob.send({"channel": "whatsapp", "to": A, "type": "text", "text": "twice"})
    await asyncio.sleep(1.2)
    assert len(ob.sim.accepted) == 1  # not yet: within reconcile_seconds of the timeout
    record = await ob.wait(answer["id"], "sent", timeout=5)
    first, second = ob.sim.accepted
    assert second.at - first.at >= 1.5 + 0.5  # the timeout, then the reconcile wait
    assert record["provider_message_id"] == second.message_id
    assert second.body["biz_opaque_callback_data"] == answer["id"]
