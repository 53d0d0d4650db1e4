"""The SQLite schema as a version 3 node wrote it (each tombstone holding its whole signed
delete), frozen here so migration tests build old files without the current DDL."""

V3_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox_id BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL,         -- never decreases: cursors stay valid after GC
    blobs INTEGER NOT NULL DEFAULT 0,  -- held, expired-but-not-collected included:
    bytes INTEGER NOT NULL DEFAULT 0   -- kept by the triggers below
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (     -- payload last: scans of the other columns skip it
    mailbox_id BLOB NOT NULL,
    blob_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    size INTEGER NOT NULL,
    pow BLOB,                          -- common.encode_pow; NULL: stored before version 3
    blob BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS blobs_cursor ON blobs (mailbox_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS blobs_id ON blobs (mailbox_id, blob_id);
CREATE INDEX IF NOT EXISTS blobs_usage ON blobs (mailbox_id, expires_ms, size);
CREATE INDEX IF NOT EXISTS blobs_expiry ON blobs (expires_ms, mailbox_id, blob_id);
CREATE TABLE IF NOT EXISTS tombstones ( -- rowid table: authorizations are kilobytes
    mailbox_id BLOB NOT NULL,
    blob_id BLOB NOT NULL,
    deleted_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    authorization BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tombstones_id ON tombstones (mailbox_id, blob_id);
CREATE INDEX IF NOT EXISTS tombstones_expiry ON tombstones (expires_ms, mailbox_id, blob_id);
CREATE TABLE IF NOT EXISTS totals (     -- kept by triggers: O(1) metrics on a million blobs
    id INTEGER PRIMARY KEY CHECK (id = 0),
    blobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('incarnation', randomblob(8));
CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs BEGIN
    UPDATE totals SET blobs = blobs + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs BEGIN
    UPDATE totals SET blobs = blobs - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_blob_added AFTER INSERT ON blobs BEGIN
    UPDATE mailboxes SET blobs = blobs + 1, bytes = bytes + NEW.size
    WHERE mailbox_id = NEW.mailbox_id;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_blob_removed AFTER DELETE ON blobs BEGIN
    UPDATE mailboxes SET blobs = blobs - 1, bytes = bytes - OLD.size
    WHERE mailbox_id = OLD.mailbox_id;
END;
"""
