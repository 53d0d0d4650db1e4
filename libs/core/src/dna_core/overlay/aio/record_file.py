"""The records a node holds, on disk (SQLite), so that names and identities outlive a
restart of the node, or of the whole overlay.

Write-through: the Store handler saves each record it takes and deletes what it evicted;
upkeep deletes what expired, and saves the time it expired against (``expiry_time``, a
row of the ``meta`` table) so that a restarted node's `ExpiryClock` resumes from it
(`dna_core.expiry`: a wall clock stepped forward 31 days no longer deletes every record at
the first pass, or at the load). Nothing read back is trusted: `load_into` puts every row
through `RecordStore.put` again (signature, policy, proof of work, expiry, bounds) and
deletes the rows it refuses, so a file edited by hand, or a record that expired while
the node was down, never comes back. Expiry there is judged by the caller's protected
time, everything else by the wall clock. A saved time of the wrong type is ignored (the
node starts from the wall clock, as on a new file). Rows are read one at a time, and only
those whose columns have the types this module writes and whose record is within the
size cap: a row of the wrong type (a text record, a number where bytes belong) is deleted
unread, so no row can make the load fail or allocate more than one record's bytes. A file damaged
below its header (pages overwritten) raises ``sqlite3.DatabaseError`` from the load: the
node stops at start with one line, as for a file SQLite cannot open.

Once running, a write that fails (a full disk, an I/O error, damage found by a write) is
logged, not raised: the record is held in memory and served all the same, and the next
restart lacks only what was not written (its owner republishes it). Raised, it failed the
store that caused it after the store had taken the record, broke the session carrying
it, and ended the node's upkeep for good (no more expiry or republishing). The first
failure of a run of them is logged at ERROR, the recovery at INFO.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from dna_core.crypto.records import MAX_RECORD_BYTES
from dna_core.errors import ProtocolError
from dna_core.overlay.records import RecordStore

# A row as `save` writes it; any other is refused unread.
_WELL_FORMED = (
    "typeof(key) = 'blob' AND length(key) = 32 AND typeof(raw) = 'blob'"
    f" AND length(raw) <= {MAX_RECORD_BYTES} AND typeof(source) = 'text'"
)
log = logging.getLogger("dna.overlay")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key BLOB PRIMARY KEY,
    raw BLOB NOT NULL,
    source TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value)
"""
EXPIRY_TIME = "expiry_ms"  # the meta row: the latest time upkeep expired records against


class RecordFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: one row a write
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash, not power loss
        self._db.executescript(_SCHEMA)
        self.write_failures = 0  # writes that failed since the file was opened
        self._failing = False  # the last write failed

    def save(self, raw: bytes, key: bytes, source: str, expires_ms: int) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO records (key, raw, source, expires_ms) VALUES (?, ?, ?, ?)",
            (key, raw, source, expires_ms),
        ))  # fmt: skip

    def expiry_time(self) -> int | None:
        """The latest time an earlier run expired records against, if it saved one."""
        row = self._db.execute(
            "SELECT value FROM meta WHERE name = ? AND typeof(value) = 'integer'", (EXPIRY_TIME,)
        ).fetchone()
        return None if row is None else int(row[0])

    def save_expiry_time(self, ms: int) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (EXPIRY_TIME, ms)
        ))  # fmt: skip

    def delete(self, keys: Sequence[bytes]) -> None:
        if keys:
            rows = [(k,) for k in keys]
            self._write(lambda db: db.executemany("DELETE FROM records WHERE key = ?", rows))

    def _write(self, write: Callable[[sqlite3.Connection], object]) -> None:
        try:
            write(self._db)
        except (sqlite3.Error, OSError) as exc:
            self.write_failures += 1
            if not self._failing:
                log.error(
                    "record file %s: a write failed (%s); records are held and served, a "
                    "restart loses what was not written until it is republished",
                    self.path, exc,
                )  # fmt: skip
            self._failing = True
            return
        if self._failing:
            log.info("record file %s: writes succeed again", self.path)
            self._failing = False

    def load_into(
        self, store: RecordStore, now_ms: int, expiry_ms: int | None = None
    ) -> tuple[int, int]:
        """Verify every saved record again into ``store`` at wall time ``now_ms``, expiry
        judged at ``expiry_ms`` (default ``now_ms``); returns (loaded, dropped)."""
        malformed = self._db.execute(f"DELETE FROM records WHERE NOT ({_WELL_FORMED})")
        dropped: list[bytes] = []
        loaded = 0
        rows = self._db.execute(
            f"SELECT key, raw, source FROM records WHERE {_WELL_FORMED} ORDER BY rowid"
        )
        for key, raw, source in rows:  # (one row at a time: the file may hold many)
            try:
                result = store.put(
                    bytes(raw), now_ms, str(source), expiry_ms=expiry_ms, held_before=True
                )
            except ProtocolError:
                dropped.append(bytes(key))
                continue
            if result.record is None or result.record.body.key != key:
                dropped.append(bytes(key))  # a duplicate, or filed under a wrong key
                continue
            loaded += 1
            dropped.extend(result.evicted)
        self.delete(dropped)
        return loaded, len(dropped) + malformed.rowcount

    def close(self) -> None:
        self._db.close()
