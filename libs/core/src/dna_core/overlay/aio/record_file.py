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

A store is written before the node holds it (`RecordStore.judge`, then `save`, then
`RecordStore.commit`), in one transaction with the rows of the records it evicts: a write
that fails (a full disk, an I/O error, damage found by a write) refuses the store
(`CapacityError`, RESOURCE_EXHAUSTED) and changes nothing, in memory or on disk. Before,
the store took the record in memory first and only logged the failed write: the node
acknowledged a version that a restart replaced with the older row still in the file.
Upkeep's deletions (`forget`) are logged, not raised: memory already dropped what expired,
and a row left behind is expired when the next load reads it. The first failure of a run
of them is logged at ERROR, the recovery at INFO.

Table ``gone`` keeps what the store remembers of deleted records (`records.Gone`: key,
signer, sequence, until when, and the source the record was stored from, whose share the
memory counts in), so a restart does not forget them and take a rollback; rows lapse at
their ``until_ms``, and the rows of memories the store forgot for room
(`RecordStore.take_forgotten`, at most ``max_gone`` kept, `records.GoneMemory`) are
deleted by the next upkeep (a minute), so the file keeps what memory keeps. A file from
before the ``source`` column gets it, empty: those memories count as one source's. A
record row the load finds expired is remembered the same way (it expired while the node
was down, or its deletion was not written).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from dna_core.crypto.records import MAX_RECORD_BYTES, open_record
from dna_core.errors import CapacityError, ExpiredError, ProtocolError
from dna_core.overlay.records import Gone, RecordStore, check_policy

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
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS gone (
    key BLOB PRIMARY KEY,
    signer BLOB NOT NULL,
    seq INTEGER NOT NULL,
    until_ms INTEGER NOT NULL,
    source TEXT NOT NULL DEFAULT ''
)
"""
_GONE_WELL_FORMED = (
    "typeof(key) = 'blob' AND length(key) = 32 AND typeof(signer) = 'blob'"
    " AND length(signer) = 32 AND typeof(seq) = 'integer' AND typeof(until_ms) = 'integer'"
    " AND typeof(source) = 'text'"
)
EXPIRY_TIME = "expiry_ms"  # the meta row: the latest time upkeep expired records against


class RecordFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: one row a write
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: survives a crash, not power loss
        self._db.executescript(_SCHEMA)
        gone_columns = {row[1] for row in self._db.execute("PRAGMA table_info(gone)")}
        if "source" not in gone_columns:  # a file written before memories had a source
            self._db.execute("ALTER TABLE gone ADD COLUMN source TEXT NOT NULL DEFAULT ''")
        self.write_failures = 0  # writes that failed since the file was opened
        self._failing = False  # the last write failed
        self.last_failure = ""  # why the last failed write failed

    def save(
        self, raw: bytes, key: bytes, source: str, expires_ms: int,
        evicted: Sequence[tuple[bytes, Gone]] = (),
    ) -> None:  # fmt: skip
        """Write a record the store is about to take, and delete (remembering them) the
        records it evicts, in one transaction; raises `CapacityError` if the file refuses
        it, having changed nothing: the store must then not take the record."""

        def write(db: sqlite3.Connection) -> None:
            _forget_rows(db, evicted)
            db.execute(
                "INSERT OR REPLACE INTO records (key, raw, source, expires_ms) VALUES (?, ?, ?, ?)",
                (key, raw, source, expires_ms),
            )

        if not self._write(write):
            raise CapacityError(
                f"record store: the record file refused the write ({self.last_failure}); not stored"
            )

    def forget(
        self, keys: Sequence[bytes], gone: Sequence[tuple[bytes, Gone]], now_ms: int,
        forgotten: Sequence[bytes] = (),
    ) -> None:  # fmt: skip
        """Delete the rows of records the store deleted (``keys``), remembering ``gone``
        (table ``gone``); drop memories lapsed by ``now_ms`` and those the store forgot
        for room (``forgotten``, `RecordStore.take_forgotten`)."""

        def write(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM records WHERE key = ?", [(key,) for key in keys])
            _forget_rows(db, gone)
            db.execute("DELETE FROM gone WHERE until_ms <= ?", (now_ms,))
            db.executemany("DELETE FROM gone WHERE key = ?", [(key,) for key in forgotten])

        self._write(write)

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

    def _write(self, write: Callable[[sqlite3.Connection], object]) -> bool:
        """Run ``write`` in one transaction; whether it was written (a failure is counted,
        logged once for a run of them, and rolled back)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                write(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self.write_failures += 1
            self.last_failure = str(exc)
            if not self._failing:
                log.error(
                    "record file %s: a write failed (%s); stores are refused until writes "
                    "succeed again, and what expired meanwhile is deleted at the next load",
                    self.path, exc,
                )  # fmt: skip
            self._failing = True
            return False
        if self._failing:
            log.info("record file %s: writes succeed again", self.path)
            self._failing = False
        return True

    def load_into(
        self, store: RecordStore, now_ms: int, expiry_ms: int | None = None
    ) -> tuple[int, int]:
        """Verify every saved record again into ``store`` at wall time ``now_ms``, expiry
        judged at ``expiry_ms`` (default ``now_ms``); returns (loaded, dropped)."""
        expired_by = now_ms if expiry_ms is None else expiry_ms
        self._db.execute(f"DELETE FROM gone WHERE NOT ({_GONE_WELL_FORMED})")
        self._db.execute("DELETE FROM gone WHERE until_ms <= ?", (expired_by,))
        for key, signer, seq, until_ms, source in self._db.execute(
            "SELECT key, signer, seq, until_ms, source FROM gone ORDER BY rowid"
        ):
            store.remember(bytes(key), Gone(bytes(signer), int(seq), int(until_ms), str(source)))
        malformed = self._db.execute(f"DELETE FROM records WHERE NOT ({_WELL_FORMED})")
        dropped: list[bytes] = []
        remembered: list[tuple[bytes, Gone]] = []
        loaded = 0
        rows = self._db.execute(
            f"SELECT key, raw, source FROM records WHERE {_WELL_FORMED} ORDER BY rowid"
        )
        for key, raw, source in rows:  # (one row at a time: the file may hold many)
            try:
                result = store.put(
                    bytes(raw), now_ms, str(source), expiry_ms=expiry_ms, held_before=True
                )
            except ExpiredError:
                dropped.append(bytes(key))
                gone = _expired_memory(store, bytes(key), bytes(raw), str(source), now_ms,
                                       expired_by)  # fmt: skip
                if gone is not None:
                    remembered.append((bytes(key), gone))
                continue
            except ProtocolError:
                dropped.append(bytes(key))
                continue
            if result.record is None or result.record.body.key != key:
                dropped.append(bytes(key))  # a duplicate, or filed under a wrong key
                continue
            loaded += 1
            dropped.extend(result.evicted)
            # remembered by the store (`RecordStore.commit`): by the file too, or the next
            # restart forgets them and takes an older version
            remembered.extend((k, g) for k in result.evicted if (g := store.gone(k)) is not None)
        self.forget(dropped, remembered, expired_by, store.take_forgotten())
        return loaded, len(dropped) + malformed.rowcount

    def close(self) -> None:
        self._db.close()


def _forget_rows(db: sqlite3.Connection, gone: Sequence[tuple[bytes, Gone]]) -> None:
    db.executemany("DELETE FROM records WHERE key = ?", [(key,) for key, _ in gone])
    db.executemany(
        "INSERT OR REPLACE INTO gone (key, signer, seq, until_ms, source) VALUES (?, ?, ?, ?, ?)",
        [(key, g.signer, g.seq, g.until_ms, g.source) for key, g in gone],
    )


def _expired_memory(
    store: RecordStore, key: bytes, raw: bytes, source: str, now_ms: int, expired_by: int
) -> Gone | None:
    """What to remember of a saved record that expired while the node was down (or whose
    deletion was not written), if it verifies apart from its expiry and is filed under
    its own key: forgotten, an older version of it was taken after the restart."""
    try:
        rec = open_record(raw, now_ms=now_ms, key=key, expiry_ms=-1)
        check_policy(rec, name_pow_bits=store.name_pow_bits,
                     identity_pow_bits=store.identity_pow_bits)  # fmt: skip
    except ProtocolError:
        return None
    gone = Gone.of(rec, source)
    if gone.until_ms <= expired_by:
        return None
    store.remember(key, gone)
    return gone
