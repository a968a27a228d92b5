"""The analytics sink: daily volumes, active conversations and first-reply times, counted once,
through a running gateway and on its own (a real SQLite file), and its ``gateway analytics``."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from gateway import keys
from gateway.events import Message, Party, Status, conversation_id, encode
from gateway.sink import Record
from sinks.analytics.cli import report
from sinks.analytics.sink import AnalyticsConfig, AnalyticsSink
from tests.conftest import SINKS_TOML, fixture_bytes

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
ACCOUNT = "100000000000001"


def conversation(customer: str) -> str:
    return conversation_id("whatsapp", ACCOUNT, customer)


def inbound(i: int, customer: str, at: datetime) -> Message:
    return Message(schema=1, id=f"in-{i}", channel="whatsapp", direction="inbound",
                   account_id=ACCOUNT, conversation_id=conversation(customer),
                   sender=Party(customer), recipient=Party(ACCOUNT), timestamp=at,
                   message_id=f"wamid.in.{i}", type="text", text="hello")


def sent(i: int, customer: str, at: datetime, status: str = "sent",
         pricing: dict | None = None) -> Status:
    return Status(schema=1, id=f"st-{i}-{status}", channel="whatsapp", direction="outbound",
                  account_id=ACCOUNT, conversation_id=conversation(customer),
                  sender=Party(ACCOUNT), recipient=Party(customer), timestamp=at,
                  message_id=f"wamid.out.{i}", status=status, pricing=pricing)


UTILITY = {"billable": True, "pricing_model": "PMP", "type": "regular", "category": "utility"}
SERVICE = {"billable": False, "pricing_model": "PMP", "type": "free_customer_service",
           "category": "service"}


def records(*events) -> list[Record]:
    return [Record(i, e, encode(e), 1.0) for i, e in enumerate(events, 1)]


async def started(tmp_path) -> AnalyticsSink:
    sink = AnalyticsSink(AnalyticsConfig(path=str(tmp_path / "analytics.db")))
    await sink.start()
    return sink


async def test_volumes_and_first_reply_times_per_day(tmp_path):
    sink = await started(tmp_path)
    await sink.write(records(
        inbound(1, "111", T0), inbound(2, "111", T0 + timedelta(seconds=20)),  # one wait
        sent(1, "111", T0 + timedelta(seconds=45)),                             # 45 s
        sent(2, "111", T0 + timedelta(seconds=50)),                             # not a first reply
        inbound(3, "222", T0), sent(3, "222", T0 + timedelta(minutes=10)),      # 600 s
        inbound(4, "333", T0 + timedelta(days=1))))                             # next day, waiting
    daily = await sink.query("SELECT day, direction, kind, type, events FROM daily ORDER BY 1, 2")
    assert daily == [("2026-03-01", "inbound", "message", "text", 3),
                     ("2026-03-01", "outbound", "status", "", 3),
                     ("2026-03-02", "inbound", "message", "text", 1)]
    assert await sink.query("SELECT day, count(*) FROM active GROUP BY day ORDER BY day") == [
        ("2026-03-01", 2), ("2026-03-02", 1)]
    assert await sink.query("SELECT * FROM responses") == [
        ("2026-03-01", "whatsapp", ACCOUNT, 2, 645.0, 1, 1, 2)]
    await sink.close()
    rows = report(str(tmp_path / "analytics.db"), 7, today=T0 + timedelta(days=1))
    assert [(r["day"], r["messages_in"], r["statuses"], r["active_conversations"], r["replies"],
             r["mean_first_reply_seconds"], r["replied_within_5m"]) for r in rows] == [
        ("2026-03-01", 3, 3, 2, 2, 322.5, 1), ("2026-03-02", 1, 0, 1, 0, None, 0)]


async def test_a_batch_handed_over_again_counts_once(tmp_path):
    sink = await started(tmp_path)
    batch = records(inbound(1, "111", T0), sent(1, "111", T0 + timedelta(seconds=5)))
    await sink.write(batch)
    await sink.write(batch)  # after a crash, or a replayed dead letter
    await sink.write(batch[:1] * 3)  # the same event three times in one batch
    assert await sink.query("SELECT sum(events) FROM daily") == [(2,)]
    assert await sink.query("SELECT replies, seconds FROM responses") == [(1, 5.0)]
    await sink.close()


async def test_through_a_running_gateway_and_the_cli(gateway, tmp_path):
    gw = await gateway(sinks=SINKS_TOML + "[sinks.analytics]\n")
    for name in ("whatsapp/three_messages.json", "whatsapp/three_messages.json",
                 "whatsapp/status_sent.json"):
        assert (await gw.post("whatsapp", fixture_bytes(name)))[0] == 200
    await gw.settle()
    sink = gw.app[keys.SINKS]["analytics"]
    assert await sink.query("SELECT kind, sum(events) FROM daily GROUP BY kind ORDER BY kind") == [
        ("message", 3), ("status", 1)]  # the redelivered POST counted once
    config = tmp_path / "gateway.toml"
    out = subprocess.run([sys.executable, "-m", "gateway", "analytics", "--config", str(config),
                          "--days", "100000", "--json"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sum(r["messages_in"] for r in rows) == 3 and sum(r["statuses"] for r in rows) == 1
    table = subprocess.run([sys.executable, "-m", "gateway", "analytics", "--config", str(config),
                            "--days", "100000"], capture_output=True, text=True, check=True)
    assert table.stdout.splitlines()[0].split()[:3] == ["day", "channel", "account_id"]


def test_the_cli_names_a_missing_table(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[sinks.storage]\n')
    out = subprocess.run([sys.executable, "-m", "gateway", "analytics", "--config", str(config)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "[sinks.analytics] is not in the configuration" in out.stderr


async def test_a_replayed_old_message_does_not_open_a_wait_its_reply_closed(tmp_path):
    sink = await started(tmp_path)
    await sink.write(records(sent(1, "111", T0 + timedelta(seconds=30))))  # the reply first
    await sink.write(records(inbound(1, "111", T0)))  # its message, replayed from dead letters
    await sink.write(records(sent(2, "111", T0 + timedelta(hours=3))))
    assert await sink.query("SELECT * FROM responses") == []  # not a 3 h first reply
    await sink.write(records(inbound(2, "111", T0 + timedelta(hours=4)),
                             sent(3, "111", T0 + timedelta(hours=4, seconds=10))))
    assert await sink.query("SELECT replies, seconds FROM responses") == [(1, 10.0)]
    await sink.close()


def test_the_cli_names_a_file_that_is_not_an_analytics_database(tmp_path):
    import sqlite3

    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[sinks.analytics]\npath = "{other}"\n')
    out = subprocess.run([sys.executable, "-m", "gateway", "analytics", "--config", str(config)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "is not an analytics database" in out.stderr
    assert "Traceback" not in out.stderr


async def test_a_late_older_reply_leaves_the_current_wait_alone(tmp_path):
    sink = await started(tmp_path)
    await sink.write(records(inbound(1, "111", T0), sent(1, "111", T0 + timedelta(seconds=30)),
                             inbound(2, "111", T0 + timedelta(hours=1))))
    await sink.write(records(sent(2, "111", T0 + timedelta(seconds=40))))  # late, older
    await sink.write(records(sent(3, "111", T0 + timedelta(hours=1, seconds=10))))
    assert await sink.query("SELECT replies, seconds FROM responses") == [(2, 40.0)]
    await sink.close()


async def test_a_message_in_the_same_second_as_the_last_reply_starts_a_wait(tmp_path):
    sink = await started(tmp_path)  # Meta's timestamps are whole seconds
    await sink.write(records(inbound(1, "111", T0), sent(1, "111", T0 + timedelta(seconds=30)),
                             inbound(2, "111", T0 + timedelta(seconds=30)),
                             sent(2, "111", T0 + timedelta(seconds=90))))
    assert await sink.query("SELECT replies, seconds FROM responses") == [(2, 90.0)]
    await sink.close()


async def test_erasure_removes_the_customers_conversation_rows_only(tmp_path):
    sink = await started(tmp_path)
    await sink.write(records(inbound(1, "111", T0), sent(1, "111", T0 + timedelta(seconds=5)),
                             inbound(2, "111", T0 + timedelta(minutes=1)),
                             inbound(3, "2111", T0), inbound(4, "222", T0)))
    assert await sink.erase_contact("whatsapp", "111") == {
        "conversation_days": 1, "conversation_states": 2}  # active; waiting + replied
    left = await sink.query("SELECT conversation_id FROM active UNION ALL "
                            "SELECT conversation_id FROM waiting UNION ALL "
                            "SELECT conversation_id FROM replied")
    assert sorted({c for (c,) in left}) == [conversation("2111"), conversation("222")]
    assert await sink.query("SELECT sum(events) FROM daily") == [(5,)]  # anonymous counts stay
    await sink.close()


async def test_priced_messages_count_once_per_message_on_the_day_of_the_first_price(tmp_path):
    sink = await started(tmp_path)
    late = T0 + timedelta(hours=15)  # 2026-03-02 00:00
    await sink.write(records(
        sent(1, "111", T0, pricing=UTILITY),
        sent(1, "111", late, "delivered", pricing=UTILITY),  # priced again: the same message
        sent(2, "111", T0, pricing=UTILITY),
        sent(3, "222", T0, pricing=SERVICE),
        sent(4, "222", T0)))  # no pricing: not in the table
    await sink.write(records(sent(2, "111", T0, "read", pricing=UTILITY)))  # a later batch
    await sink.write(records(sent(1, "111", T0, pricing=UTILITY)))  # a redelivery
    assert await sink.query("SELECT * FROM billing ORDER BY category") == [
        ("2026-03-01", "whatsapp", ACCOUNT, "service", "free_customer_service", "PMP", 0, 1),
        ("2026-03-01", "whatsapp", ACCOUNT, "utility", "regular", "PMP", 1, 2)]
    await sink.close()
    rows = report(str(tmp_path / "analytics.db"), 7, today=late)
    assert [(r["day"], r["statuses"], r["billable"]) for r in rows] == [
        ("2026-03-01", 5, 2), ("2026-03-02", 1, 0)]


async def test_the_report_reads_a_database_from_before_billing(tmp_path):
    sink = await started(tmp_path)
    await sink.write(records(inbound(1, "111", T0)))
    await sink.close()
    db = sqlite3.connect(tmp_path / "analytics.db")
    db.execute("DROP TABLE billing")
    db.commit()
    db.close()
    rows = report(str(tmp_path / "analytics.db"), 7, today=T0)
    assert [(r["messages_in"], r["billable"]) for r in rows] == [(1, 0)]


async def test_a_priced_message_is_counted_on_its_earliest_status_whatever_the_order(tmp_path):
    """Meta keeps no order: a ``delivered`` (next day) that comes before its ``sent`` leaves the
    message counted on the sent day, once; a status priced again long after the counted ids
    are pruned (a message delivered days later) counts nothing more."""
    sink = AnalyticsSink(AnalyticsConfig(path=str(tmp_path / "analytics.db"), keep_days=1))
    await sink.start()
    sent_at = T0.replace(hour=23, minute=59, second=59)
    await sink.write(records(sent(1, "111", sent_at + timedelta(seconds=2), "delivered",
                                  pricing=UTILITY)))
    assert await sink.query("SELECT day, messages FROM billing") == [("2026-03-02", 1)]
    await sink.write(records(sent(1, "111", sent_at, pricing=UTILITY)))
    assert await sink.query("SELECT day, messages FROM billing") == [("2026-03-01", 1)]
    await sink.close()
    db = sqlite3.connect(tmp_path / "analytics.db")
    from sinks.analytics.sink import count
    now = time.time()
    count(db, [sent(1, "111", sent_at + timedelta(days=10), "read", pricing=UTILITY)],
          now + 10 * 86400, prune_before=now + 9 * 86400, priced_before=now - 86400)
    assert db.execute("SELECT day, messages FROM billing").fetchall() == [("2026-03-01", 1)]
    db.close()


async def test_a_database_of_the_first_billing_version_is_brought_up_to_date(tmp_path):
    db = sqlite3.connect(tmp_path / "analytics.db")
    db.executescript("CREATE TABLE priced (message_id TEXT PRIMARY KEY, at REAL NOT NULL)"
                     " WITHOUT ROWID; CREATE INDEX priced_at ON priced(at);")
    db.execute("INSERT INTO priced VALUES ('wamid.out.9', ?)", (time.time(),))
    db.commit()
    db.close()
    sink = await started(tmp_path)
    await sink.write(records(sent(1, "111", T0, pricing=UTILITY),
                             sent(9, "111", T0, "delivered", pricing=UTILITY)))  # counted before
    assert await sink.query("SELECT message_id, day FROM priced ORDER BY 1") == [
        ("wamid.out.1", "2026-03-01"), ("wamid.out.9", "")]
    assert await sink.query("SELECT sum(messages) FROM billing") == [(1,)]  # not out.9 again
    await sink.close()
