"""Instagram's limits (limits.md §8) at the simulator: per account, text and the rest at one rate,
audio and video at a lower one, and a per-thread (per recipient) limit; the simulator enforces the
same limits (613 beyond them) and never sees more."""

from __future__ import annotations

from tests.outbound.conftest import IG

LIMITS = """audio_video_per_second = {av}
messages_per_second = {mps}
thread_interval_seconds = {thread}
thread_burst = 1
"""


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    return max((sum(1 for t in times[i:] if t - s < 1.0) for i, s in enumerate(times)), default=0)


async def test_audio_video_and_text_rates_are_never_exceeded(outbound):
    ob = await outbound(extra_ig=LIMITS.format(av=4, mps=40, thread=0), ig_mps=40,
                        ig_media_mps=4)
    media = [f"91000000000{i:05d}" for i in range(12)]
    texts = [f"92000000000{i:05d}" for i in range(80)]
    await ob.open_windows("instagram", media + texts)
    ids = []
    for i, to in enumerate(media):
        kind = "audio" if i % 2 else "video"
        ids.append((await ob.send({"channel": "instagram", "to": to, "type": kind,
                                   "media": {"link": f"https://x.io/{i}.mp4"}}))[1]["id"])
    for to in texts:
        ids.append((await ob.send({"channel": "instagram", "to": to, "type": "text",
                                   "text": "hi"}))[1]["id"])
    for record_id in ids:
        await ob.wait(record_id, "sent", timeout=20)
    assert ob.sim.count_613 == 0
    accepted = [m for m in ob.sim.accepted if m.account_id == IG]
    av = [m.at for m in accepted if m.body["message"].get("attachment")]
    assert len(av) == 12 and most_in_one_second(av) <= 4
    assert most_in_one_second([m.at for m in accepted]) <= 40
    headroom = ob.metric("gateway_ratelimit_headroom_ratio", channel="instagram", account=IG,
                         scope="type:audio_video")
    assert headroom is not None


async def test_the_thread_limit_spaces_one_recipient_only(outbound):
    ob = await outbound(extra_ig=LIMITS.format(av=10, mps=300, thread=0.5), pair_limit=1,
                        pair_window=0.35)  # the simulator allows one per 0.35 s per thread
    busy, other = "9300000000000001", "9300000000000002"
    await ob.open_windows("instagram", [busy, other])
    ids = [(await ob.send({"channel": "instagram", "to": busy, "type": "text",
                           "text": f"m{i}"}))[1]["id"] for i in range(4)]
    quick = (await ob.send({"channel": "instagram", "to": other, "type": "text",
                            "text": "not held back"}))[1]["id"]
    await ob.wait(quick, "sent", timeout=2)
    assert (await ob.status(ids[-1]))["status"] == "queued"
    for record_id in ids:
        await ob.wait(record_id, "sent", timeout=10)
    times = sorted(m.at for m in ob.sim.accepted if m.to == busy)
    assert all(b - a >= 0.35 for a, b in zip(times, times[1:], strict=False)), times
    assert ob.sim.count_613 == 0
