"""SQLite schema of the storage sink: the three collections of CONTRACT §8 as tables.

``messages`` rows are large (ids, text, JSON), so it is a rowid table with a unique index on ``id``:
a new row is appended and only the small index entry lands at a random place; as a WITHOUT ROWID
table every insert moved whole rows around a random page (measured: about 35% more time per
message, inserts and commit). Databases made with the earlier WITHOUT ROWID layout keep working:
every statement addresses rows by ``id``.

The rules shared with the Firestore sink's model (``sinks/firestore/model.py``) live here too:
``STATUS_RANK`` and ``doc_id``; what an edit is, ``gateway.events.edit_target``, the AI sink reads
as well.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS contacts (
    id TEXT PRIMARY KEY,                 -- {channel}:{contact_id}
    channel TEXT NOT NULL, contact_id TEXT NOT NULL, name TEXT, account_id TEXT,
    first_seen TEXT, last_seen TEXT, last_inbound_at TEXT,
    opted_out INTEGER NOT NULL DEFAULT 0, opted_out_at TEXT,
    name_at TEXT,                        -- the timestamp of the event that gave the name
    user_id TEXT,                        -- WhatsApp BSUID beside the wa_id, or NULL
    user_id_at TEXT,                     -- the timestamp of the event that gave the BSUID
    username TEXT,                       -- WhatsApp username of the profile, or NULL
    username_at TEXT) WITHOUT ROWID;     -- the timestamp of the event that gave the username
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,                 -- conversation_id with '/' replaced by '_'
    channel TEXT NOT NULL, account_id TEXT NOT NULL, contact_id TEXT NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0,
    last_message_at TEXT, last_inbound_at TEXT, last_text TEXT) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS conversations_contact ON conversations(channel, contact_id);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT NOT NULL UNIQUE,             -- message_id with '/' replaced by '_'
    message_id TEXT NOT NULL, event_id TEXT, kind TEXT, channel TEXT NOT NULL,
    direction TEXT, account_id TEXT, conversation_id TEXT NOT NULL,  -- conversations.id
    sender_id TEXT, sender_name TEXT, recipient_id TEXT, timestamp TEXT,
    type TEXT, text TEXT, payload TEXT, reply_to TEXT,
    media TEXT, location TEXT, error TEXT, extra TEXT,   -- JSON objects
    status TEXT, status_updated_at TEXT,
    reactions TEXT,                       -- JSON: {sender_id: emoji}
    schema INTEGER, emoji TEXT,          -- the event's schema version; emoji (reactions only)
    edited_at TEXT,                      -- the timestamp of the latest edit applied
    pricing TEXT,                        -- JSON: what Meta charges (the first status to say)
    reactions_at TEXT                    -- JSON: {sender_id: time of their latest reaction}
);
CREATE INDEX IF NOT EXISTS messages_conversation ON messages(conversation_id, timestamp);
"""

# How a conversation's row takes in newer counts and times (a batch's, or a renamed copy's).
CONVERSATION_MERGE = (
    "message_count = message_count + excluded.message_count,"
    " last_text = CASE WHEN excluded.last_message_at >= coalesce(last_message_at, '')"
    "   THEN excluded.last_text ELSE last_text END,"
    " last_message_at = coalesce(max(coalesce(last_message_at, ''), excluded.last_message_at),"
    "   last_message_at),"  # a stand-in's count comes without a time (excluded NULL)
    " last_inbound_at = CASE WHEN excluded.last_inbound_at IS NULL THEN last_inbound_at"
    "   ELSE max(coalesce(last_inbound_at, ''), excluded.last_inbound_at) END")


def migrate(c) -> None:
    """Bring a database made by an earlier version up to this schema, each step once."""
    for table, added in (("messages", (("schema", "INTEGER"), ("emoji", "TEXT"),
                                       ("edited_at", "TEXT"), ("pricing", "TEXT"),
                                       ("reactions_at", "TEXT"))),
                         ("contacts", (("name_at", "TEXT"), ("user_id", "TEXT"),
                                       ("user_id_at", "TEXT"), ("username", "TEXT"),
                                       ("username_at", "TEXT")))):
        columns = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
        for column, kind in added:
            if column not in columns:
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    # after the column: a contact found by the BSUID a payload names alone (webhooks.md §4.3)
    c.execute("CREATE INDEX IF NOT EXISTS contacts_user_id ON contacts(channel, user_id)"
              " WHERE user_id IS NOT NULL")
    # Contact ids kept '/' before (an older version run again may add such rows): on every start,
    # as ids never contain '/' on the wire, this finds nothing unless there is something to do.
    c.execute("UPDATE OR IGNORE contacts SET id = replace(id, '/', '_') WHERE instr(id, '/')")
    c.execute("DELETE FROM contacts WHERE instr(id, '/')")  # left by a conflict: a stale copy
    _slash_free_conversations(c)


def _slash_free_conversations(c) -> None:
    """Conversation ids of plugin channels kept '/' before: rename them (merged into a row of the
    new id when one exists) and point their messages at the new id."""
    if c.execute("SELECT 1 FROM conversations WHERE instr(id, '/') LIMIT 1").fetchone() is None:
        return  # the usual case: one indexed look-up at start
    c.execute("UPDATE messages SET conversation_id = replace(conversation_id, '/', '_')"
              " WHERE conversation_id IN (SELECT id FROM conversations WHERE instr(id, '/'))")
    c.execute("INSERT INTO conversations(id, channel, account_id, contact_id, message_count,"
              " last_message_at, last_inbound_at, last_text)"
              " SELECT replace(id, '/', '_'), channel, account_id, contact_id, message_count,"
              " coalesce(last_message_at, ''), last_inbound_at, last_text FROM conversations"
              f" WHERE instr(id, '/') ON CONFLICT(id) DO UPDATE SET {CONVERSATION_MERGE}")
    c.execute("UPDATE conversations SET last_message_at = NULL WHERE last_message_at = ''")
    c.execute("DELETE FROM conversations WHERE instr(id, '/')")


STATUS_RANK = {"sent": 1, "delivered": 2, "read": 3, "played": 4, "failed": 5, "deleted": 6}



def doc_id(value: str) -> str:
    """Document ids never contain ``/`` (CONTRACT §8): the storage and Firestore sinks' keys."""
    return value.replace("/", "_")
