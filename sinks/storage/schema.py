"""SQLite schema of the storage sink: the three collections of CONTRACT §8 as tables.

``messages`` rows are large (ids, text, JSON), so it is a rowid table with a unique index on ``id``:
a new row is appended and only the small index entry lands at a random place; as a WITHOUT ROWID
table every insert moved whole rows around a random page (measured: about 35% more time per
message, inserts and commit). Databases made with the earlier WITHOUT ROWID layout keep working:
every statement addresses rows by ``id``.
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id TEXT PRIMARY KEY,                 -- {channel}:{contact_id}
    channel TEXT NOT NULL, contact_id TEXT NOT NULL, name TEXT, account_id TEXT,
    first_seen TEXT, last_seen TEXT, last_inbound_at TEXT,
    opted_out INTEGER NOT NULL DEFAULT 0, opted_out_at TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,                 -- conversation_id
    channel TEXT NOT NULL, account_id TEXT NOT NULL, contact_id TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    last_message_at TEXT, last_inbound_at TEXT, last_text TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_contact ON conversations(channel, contact_id);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT NOT NULL UNIQUE,             -- message_id with '/' replaced by '_'
    message_id TEXT NOT NULL, event_id TEXT, kind TEXT, channel TEXT NOT NULL,
    direction TEXT, account_id TEXT, conversation_id TEXT NOT NULL,
    sender_id TEXT, sender_name TEXT, recipient_id TEXT, timestamp TEXT,
    type TEXT, text TEXT, payload TEXT, reply_to TEXT,
    media TEXT, location TEXT, error TEXT, extra TEXT,   -- JSON objects
    status TEXT, status_updated_at TEXT,
    reactions TEXT,                       -- JSON: {sender_id: emoji}
    schema INTEGER, emoji TEXT           -- the event's schema version; emoji (reactions only)
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation_id, timestamp);
"""


def migrate(c) -> None:
    """Bring a database made by an earlier version up to this schema, each step once."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(messages)")}
    for column, kind in (("schema", "INTEGER"), ("emoji", "TEXT")):
        if column not in columns:
            c.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
    # Contact ids kept '/' before (an older version run again may add such rows): on every start,
    # as ids never contain '/' on the wire, this finds nothing unless there is something to do.
    c.execute("UPDATE OR IGNORE contacts SET id = replace(id, '/', '_') WHERE instr(id, '/')")
    c.execute("DELETE FROM contacts WHERE instr(id, '/')")  # left by a conflict: a stale copy


STATUS_RANK = {"sent": 1, "delivered": 2, "read": 3, "played": 4, "failed": 5, "deleted": 6}
