"""``gateway analytics``: the analytics sink's figures per day, as a table or JSON lines.

    gateway analytics [--config gateway.toml] [--days 7] [--json]

Reads ``[sinks.analytics].path`` (default ``<data_dir>/analytics.db``) of the configuration; the
gateway may be running (SQLite WAL: readers never block it).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from datetime import UTC, datetime, timedelta

from gateway.command import Command
from gateway.errors import ConfigError
from sinks.analytics.sink import DB_FILE

REPORT = """
SELECT d.day, d.channel, d.account_id,
       sum(CASE WHEN d.direction = 'inbound' AND d.kind = 'message' THEN d.events ELSE 0 END),
       sum(CASE WHEN d.direction = 'outbound' AND d.kind = 'message' THEN d.events ELSE 0 END),
       sum(CASE WHEN d.kind = 'status' THEN d.events ELSE 0 END),
       (SELECT count(*) FROM active a WHERE a.day = d.day AND a.channel = d.channel
          AND a.account_id = d.account_id),
       coalesce(r.replies, 0), r.seconds, coalesce(r.under_5m, 0), {billable}
FROM daily d LEFT JOIN responses r
  ON r.day = d.day AND r.channel = d.channel AND r.account_id = d.account_id
WHERE d.day >= ?
GROUP BY d.day, d.channel, d.account_id ORDER BY d.day, d.channel, d.account_id
"""
BILLABLE = """(SELECT coalesce(sum(b.messages), 0) FROM billing b WHERE b.day = d.day
          AND b.channel = d.channel AND b.account_id = d.account_id AND b.billable)"""
COLUMNS = ("day", "channel", "account_id", "messages_in", "messages_out", "statuses",
           "active_conversations", "replies", "mean_first_reply_seconds", "replied_within_5m",
           "billable")


def report(path: str, days: int, today: datetime | None = None) -> list[dict]:
    """One row per day, channel and account over the last ``days`` days (today included)."""
    if not os.path.exists(path):
        raise ConfigError(f"no analytics database at {path} (is [sinks.analytics] on?)")
    since = ((today or datetime.now(UTC)) - timedelta(days=days - 1)).strftime("%Y-%m-%d")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        billing = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'billing'").fetchone()
        # a database the sink has not opened since billing was added counts none yet
        rows = conn.execute(REPORT.format(billable=BILLABLE if billing else "0"),
                            (since,)).fetchall()
    except sqlite3.DatabaseError as exc:  # another file, or not SQLite at all
        raise ConfigError(f"{path} is not an analytics database ({exc})") from None
    finally:
        conn.close()
    out = []
    for row in rows:
        item = dict(zip(COLUMNS, row, strict=True))
        seconds = item["mean_first_reply_seconds"]
        item["mean_first_reply_seconds"] = (round(seconds / item["replies"], 1)
                                            if item["replies"] else None)
        out.append(item)
    return out


def run(args: argparse.Namespace) -> int:
    """Print the report of the configured analytics database."""
    from gateway import config as gwconfig

    config = gwconfig.load(args.config)
    table = config.sinks.get("analytics")
    if table is None:
        raise ConfigError("[sinks.analytics] is not in the configuration")
    path = table.get("path") or os.path.join(config.server.data_dir, DB_FILE)
    rows = report(path, args.days)
    if args.json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return 0
    widths = [max(len(c), *(len(_cell(r[c])) for r in rows)) for c in COLUMNS] if rows else []
    if not rows:
        print(f"no events in the last {args.days} day(s)")
        return 0
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    for row in rows:
        print("  ".join(_cell(row[c]).ljust(w) for c, w in zip(COLUMNS, widths, strict=True)))
    return 0


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML file (default: embedded defaults)")
    parser.add_argument("--days", type=int, default=7, help="how many days back (default 7)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


COMMAND = Command("analytics", "daily volumes and first-reply times of the analytics sink", run,
                  arguments)
