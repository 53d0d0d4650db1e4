"""The records a node holds, on disk (SQLite), so that names and identities outlive a
restart of the node, or of the whole overlay.

Write-through: the Store handler saves each record it takes and deletes what it evicted;
upkeep deletes what expired. Nothing read back is trusted: `load_into` puts every row
through `RecordStore.put` again (signature, policy, proof of work, expiry, bounds) and
deletes the rows it refuses, so a file edited by hand, or a record that expired while
the node was down, never comes back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from dna_core.errors import ProtocolError
from dna_core.overlay.records import RecordStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key BLOB PRIMARY KEY,
    raw BLOB NOT NULL,
    source TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
)
"""


class RecordFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: one row a write
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash, not power loss
        self._db.execute(_SCHEMA)

    def save(self, raw: bytes, key: bytes, source: str, expires_ms: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO records (key, raw, source, expires_ms) VALUES (?, ?, ?, ?)",
            (key, raw, source, expires_ms),
        )

    def delete(self, keys: Sequence[bytes]) -> None:
        if keys:
            self._db.executemany("DELETE FROM records WHERE key = ?", [(k,) for k in keys])

    def load_into(self, store: RecordStore, now_ms: int) -> tuple[int, int]:
        """Verify every saved record again into ``store``; returns (loaded, dropped)."""
        dropped: list[bytes] = []
        loaded = 0
        rows = self._db.execute("SELECT key, raw, source FROM records ORDER BY rowid")
        for key, raw, source in rows.fetchall():
            try:
                result = store.put(bytes(raw), now_ms, str(source))
            except ProtocolError:
                dropped.append(bytes(key))
                continue
            if result.record is None or result.record.body.key != key:
                dropped.append(bytes(key))  # a duplicate, or filed under a wrong key
                continue
            loaded += 1
            dropped.extend(result.evicted)
        self.delete(dropped)
        return loaded, len(dropped)

    def close(self) -> None:
        self._db.close()
