"""SQLite mailbox backend: the embedded default.

Durability: WAL with ``synchronous=FULL``, so a write is acknowledged only after its commit
reached the disk. A FULL commit costs ~260 us here, so paying it per write would cap a node at
a few thousand writes a second; instead all writes go through ONE writer thread that does
*group commit*: every write request that queued up while the previous transaction was being
committed joins the next transaction (one savepoint each, so one failing request does not sink
the others), and all of them are answered after that single commit. Reads run on a second
connection in their own thread (WAL lets them proceed during a commit). The asyncio loop only
enqueues work and awaits futures: it never blocks on SQLite.

Semantics beyond ``base.py`` (expiry, tombstone lifetime, GC order, digests) are the shared
rules of ``common.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dna_core import trace

from dna_storage.backends.base import (
    MailboxDigest,
    Page,
    PutOutcome,
    Quota,
    StorageFullError,
    StoreDamagedError,
    StoredBlob,
    StoreUnavailableError,
    SyncIndex,
    Tombstone,
    TombstoneBounds,
    Usage,
)
from dna_storage.backends.common import (
    check_limit,
    decode_pow,
    delete_steps,
    encode_pow,
    in_range,
    mailbox_digest,
    per_authorization,
    refused_at_step,
    unique,
)

# 2: per-mailbox blob and byte counters (usage in O(expired), not O(held));
# 3: each blob keeps its put's proof of work (replicas check it again in sync);
# 4: a signed delete is stored once (``signed_deletes``), its tombstones reference it
# 5: tombstones counted per mailbox, the mailboxes held counted in ``totals``
# 6: each mailbox's blobs and bytes per hour of expiry (``expiry_hours``: usage in O(1)),
#    a mailbox's live IDs read from an index (``blobs_live``, for ``blobs_usage``)
# 7: each tombstone says whether it was stored for an ID the node held neither way
#    (``unheld``), counted node-wide in ``totals`` (``unheld_tombstones``)
SCHEMA_VERSION = 7
# The width of an ``expiry_hours`` bucket: usage reads the whole hours that expired from
# the buckets and the blobs of the current hour from the rows.
EXPIRY_HOUR_MS = 3_600_000
MAX_JOBS_PER_COMMIT = 256  # bounds one transaction's size and the latency it adds
# ... and its work: a job's is the bytes it writes (payloads and signed deletes) plus
# ``ROW_WORK`` a row. 32 writers of 4 MiB batches made transactions of ~128 MiB, and a
# 100 B put waited 2.9-3.5 s for its group; a transaction now stops at this much, and a
# small job (``SMALL_WORK``) still joins the one being formed, ahead of large ones queued.
MAX_WORK_PER_COMMIT = 8 * 1024 * 1024
SMALL_WORK = 64 * 1024
ROW_WORK = 512
# Tombstones (or IDs forgotten) per writer job: a delete of 1,000 is 10 jobs, one at a time,
# so the writer is held ~40 ms at once, not 0.4-0.9 s (blobs of 60 KB dropped with them).
WRITE_CHUNK = 100
_IN_CHUNK = 500  # IDs per `IN (...)` query, well under SQLite's variable limit
# Blobs named by ID are looked up by ID. With "AND expires_ms > ?" beside the IDs, SQLite's
# planner took ``blobs_live`` (mailbox, expiry, ...) instead and stepped through every live
# blob of the mailbox for each read: 8 blobs (a repair pull's chunk) of a 30,000-blob mailbox
# took 40 ms, a whole pull of it O(n^2); the IDs a delete names, 7 ms for 200.
_BY_ID = "INDEXED BY blobs_id"
# A mailbox holding more expired blobs (GC has not reached) than live ones, and no more live
# ones than this, is paged from its live blobs (``blobs_live``, by expiry), not by stepping
# through its seqs past every expired row: 100,000 expired took 46 ms a fetch.
_FEW_LIVE = 4096
BUSY_TIMEOUT_MS = 10_000  # how long a call waits for a lock another process holds on the file
# Primary result codes of a file that cannot be reached now (``_storage_error``).
_UNAVAILABLE = (
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
)  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox_id BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL,         -- never decreases: cursors stay valid after GC
    blobs INTEGER NOT NULL DEFAULT 0,  -- held, expired-but-not-collected included:
    bytes INTEGER NOT NULL DEFAULT 0,  -- kept by the triggers below
    tombstones INTEGER NOT NULL DEFAULT 0
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
-- Covering: a mailbox's live IDs (digests, repair's whole index) and sizes (usage) are read
-- without a table row (rows hold payloads): repair's whole index of 100,000 blobs of 2 KB
-- read 630 ms of rows on the reader every fetch waits for.
CREATE INDEX IF NOT EXISTS blobs_live ON blobs (mailbox_id, expires_ms, size, blob_id);
CREATE INDEX IF NOT EXISTS blobs_expiry ON blobs (expires_ms, mailbox_id, blob_id);
-- A mailbox's blobs and bytes per hour of expiry, kept by triggers (MAILBOX_COUNTERS): the
-- quota's usage subtracts what expired without reading each expired blob (``_usage``).
CREATE TABLE IF NOT EXISTS expiry_hours (
    mailbox_id BLOB NOT NULL,
    hour INTEGER NOT NULL,             -- expires_ms / EXPIRY_HOUR_MS
    blobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    mailbox_id BLOB NOT NULL,
    blob_id BLOB NOT NULL,
    deleted_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    auth_digest BLOB NOT NULL,         -- signed_deletes.digest: its authorization
    unheld INTEGER NOT NULL DEFAULT 0  -- 1: stored where no blob or live tombstone was
);
CREATE UNIQUE INDEX IF NOT EXISTS tombstones_id ON tombstones (mailbox_id, blob_id);
CREATE INDEX IF NOT EXISTS tombstones_expiry ON tombstones (expires_ms, mailbox_id, blob_id);
-- One row per signed delete (up to 200 IDs, ~13 KB): stored once, not once per tombstone.
CREATE TABLE IF NOT EXISTS signed_deletes ( -- rowid table: authorizations are kilobytes
    digest BLOB PRIMARY KEY,           -- SHA-256 of the authorization
    refs INTEGER NOT NULL,             -- tombstones referencing it: kept by the triggers below
    authorization BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (     -- kept by triggers: O(1) metrics on a million blobs
    id INTEGER PRIMARY KEY CHECK (id = 0),
    blobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    signed_deletes INTEGER NOT NULL DEFAULT 0,
    signed_delete_bytes INTEGER NOT NULL DEFAULT 0,
    mailboxes INTEGER NOT NULL DEFAULT 0, -- with a blob or a tombstone: `mailboxes()`
    unheld_tombstones INTEGER NOT NULL DEFAULT 0  -- tombstones.unheld summed: the node's bound
);
INSERT OR IGNORE INTO totals (id, blobs, bytes) VALUES (0, 0, 0);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('incarnation', randomblob(8));
CREATE TRIGGER IF NOT EXISTS blobs_added AFTER INSERT ON blobs BEGIN
    UPDATE totals SET blobs = blobs + 1, bytes = bytes + NEW.size WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS blobs_removed AFTER DELETE ON blobs BEGIN
    UPDATE totals SET blobs = blobs - 1, bytes = bytes - OLD.size WHERE id = 0;
END;
-- Every way a tombstone goes (GC, forget, replacement by a later one) releases its signed
-- delete here, so no code path can leak one or drop one still referenced.
CREATE TRIGGER IF NOT EXISTS tombstone_added AFTER INSERT ON tombstones BEGIN
    UPDATE signed_deletes SET refs = refs + 1 WHERE digest = NEW.auth_digest;
END;
CREATE TRIGGER IF NOT EXISTS tombstone_removed AFTER DELETE ON tombstones BEGIN
    UPDATE signed_deletes SET refs = refs - 1 WHERE digest = OLD.auth_digest;
    DELETE FROM signed_deletes WHERE digest = OLD.auth_digest AND refs <= 0;
END;
CREATE TRIGGER IF NOT EXISTS signed_delete_added AFTER INSERT ON signed_deletes BEGIN
    UPDATE totals SET signed_deletes = signed_deletes + 1,
        signed_delete_bytes = signed_delete_bytes + length(NEW.authorization) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS signed_delete_removed AFTER DELETE ON signed_deletes BEGIN
    UPDATE totals SET signed_deletes = signed_deletes - 1,
        signed_delete_bytes = signed_delete_bytes - length(OLD.authorization) WHERE id = 0;
END;
"""

# Counters per mailbox; created after MIGRATIONS so that an older file gets its columns
# first. A blob is only ever inserted after its mailbox's row (`_put_one`); a tombstone
# makes its mailbox's row if there is none (a delete replicated before any blob). The
# mailboxes held (a blob or a tombstone) are counted as rows cross zero: counting them
# by reading every tombstone took 0.3-0.7 s at 400,000 on the one reader connection.
MAILBOX_COUNTERS = """
CREATE TRIGGER IF NOT EXISTS mailbox_blob_added AFTER INSERT ON blobs BEGIN
    UPDATE mailboxes SET blobs = blobs + 1, bytes = bytes + NEW.size
    WHERE mailbox_id = NEW.mailbox_id;
    INSERT INTO expiry_hours VALUES (NEW.mailbox_id, NEW.expires_ms / 3600000, 1, NEW.size)
    ON CONFLICT (mailbox_id, hour) DO UPDATE SET
        blobs = blobs + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_blob_removed AFTER DELETE ON blobs BEGIN
    UPDATE mailboxes SET blobs = blobs - 1, bytes = bytes - OLD.size
    WHERE mailbox_id = OLD.mailbox_id;
    UPDATE expiry_hours SET blobs = blobs - 1, bytes = bytes - OLD.size
    WHERE mailbox_id = OLD.mailbox_id AND hour = OLD.expires_ms / 3600000;
    DELETE FROM expiry_hours
    WHERE mailbox_id = OLD.mailbox_id AND hour = OLD.expires_ms / 3600000 AND blobs <= 0;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_tombstone_added AFTER INSERT ON tombstones BEGIN
    INSERT OR IGNORE INTO mailboxes (mailbox_id, last_seq) VALUES (NEW.mailbox_id, 0);
    UPDATE mailboxes SET tombstones = tombstones + 1 WHERE mailbox_id = NEW.mailbox_id;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_tombstone_removed AFTER DELETE ON tombstones BEGIN
    UPDATE mailboxes SET tombstones = tombstones - 1 WHERE mailbox_id = OLD.mailbox_id;
END;
CREATE TRIGGER IF NOT EXISTS unheld_tombstone_added AFTER INSERT ON tombstones
WHEN NEW.unheld = 1 BEGIN
    UPDATE totals SET unheld_tombstones = unheld_tombstones + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS unheld_tombstone_removed AFTER DELETE ON tombstones
WHEN OLD.unheld = 1 BEGIN
    UPDATE totals SET unheld_tombstones = unheld_tombstones - 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS mailbox_held_changed AFTER UPDATE OF blobs, tombstones
ON mailboxes WHEN (OLD.blobs > 0 OR OLD.tombstones > 0) != (NEW.blobs > 0 OR NEW.tombstones > 0)
BEGIN
    UPDATE totals SET mailboxes = mailboxes
        + (CASE WHEN NEW.blobs > 0 OR NEW.tombstones > 0 THEN 1 ELSE -1 END) WHERE id = 0;
END;
"""

MIGRATIONS = {  # from user_version N to N + 1, in one transaction with the version bump
    1: """
ALTER TABLE mailboxes ADD COLUMN blobs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE mailboxes ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
UPDATE mailboxes SET
    blobs = (SELECT count(*) FROM blobs b WHERE b.mailbox_id = mailboxes.mailbox_id),
    bytes = (SELECT coalesce(sum(size), 0) FROM blobs b WHERE b.mailbox_id = mailboxes.mailbox_id);
""",
    2: """
ALTER TABLE blobs ADD COLUMN pow BLOB;
""",
    # Each tombstone held its own copy of the signed delete: keep one per distinct one.
    # (SCHEMA, run after this, adds the indexes and the reference-counting triggers.)
    3: """
CREATE TABLE signed_deletes (
    digest BLOB PRIMARY KEY,
    refs INTEGER NOT NULL,
    authorization BLOB NOT NULL
);
INSERT INTO signed_deletes (digest, refs, authorization)
    SELECT sha256(authorization), count(*), authorization FROM tombstones GROUP BY 1;
CREATE TABLE tombstones_v4 (
    mailbox_id BLOB NOT NULL,
    blob_id BLOB NOT NULL,
    deleted_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    auth_digest BLOB NOT NULL
);
INSERT INTO tombstones_v4 (mailbox_id, blob_id, deleted_ms, expires_ms, auth_digest)
    SELECT mailbox_id, blob_id, deleted_ms, expires_ms, sha256(authorization) FROM tombstones;
DROP TABLE tombstones;
ALTER TABLE tombstones_v4 RENAME TO tombstones;
ALTER TABLE totals ADD COLUMN signed_deletes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN signed_delete_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET
    signed_deletes = (SELECT count(*) FROM signed_deletes),
    signed_delete_bytes = (SELECT coalesce(sum(length(authorization)), 0) FROM signed_deletes);
""",
    # Tombstones counted per mailbox, and the mailboxes held in totals (MAILBOX_COUNTERS).
    4: """
ALTER TABLE mailboxes ADD COLUMN tombstones INTEGER NOT NULL DEFAULT 0;
INSERT OR IGNORE INTO mailboxes (mailbox_id, last_seq)
    SELECT DISTINCT mailbox_id, 0 FROM tombstones;
UPDATE mailboxes SET tombstones =
    (SELECT count(*) FROM tombstones t WHERE t.mailbox_id = mailboxes.mailbox_id);
ALTER TABLE totals ADD COLUMN mailboxes INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET mailboxes = (SELECT count(*) FROM mailboxes WHERE blobs > 0 OR tombstones > 0);
""",
    # Blobs and bytes per mailbox and hour of expiry (SCHEMA's expiry_hours; the triggers
    # that keep it are MAILBOX_COUNTERS'), filled by one read of the blobs' expiry index.
    5: """
CREATE TABLE expiry_hours (
    mailbox_id BLOB NOT NULL,
    hour INTEGER NOT NULL,
    blobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, hour)
) WITHOUT ROWID;
INSERT INTO expiry_hours
    SELECT mailbox_id, expires_ms / 3600000, count(*), sum(size) FROM blobs GROUP BY 1, 2;
DROP INDEX blobs_usage;
""",
    # Tombstones for IDs not held, counted node-wide (MAILBOX_COUNTERS' triggers). Which of
    # the tombstones already stored were is not known: they count as held (0) and leave
    # within a tombstone lifetime; ADD COLUMN with a default rewrites no row.
    6: """
ALTER TABLE tombstones ADD COLUMN unheld INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN unheld_tombstones INTEGER NOT NULL DEFAULT 0;
""",
}

_BLOB_COLUMNS = "mailbox_id, blob_id, blob, stored_ms, expires_ms, seq, pow"
# A tombstone as the wire has it: its row joined with its signed delete.
_TOMBSTONES = (
    "SELECT t.mailbox_id, t.blob_id, t.deleted_ms, t.expires_ms, s.authorization"
    " FROM tombstones t JOIN signed_deletes s ON s.digest = t.auth_digest"
)


def auth_digest(authorization: bytes) -> bytes:
    """The key a signed delete is stored under (content-addressed: equal bytes, one row)."""
    return hashlib.sha256(authorization).digest()


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    work: int = ROW_WORK  # bytes written, about (``MAX_WORK_PER_COMMIT``)


_STOP = object()


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Runs on the event loop: hand a result over unless the caller gave up waiting."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _deliver(job: _Job, value: Any, error: BaseException | None) -> None:
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        job.loop.call_soon_threadsafe(_settle, job.future, value, _storage_error(error))


def _storage_error(error: BaseException | None) -> BaseException | None:
    """SQLITE_FULL (the disk, or ``max_page_count``) is a lack of room, not a bug: the
    transaction was rolled back, and the caller answers RESOURCE_EXHAUSTED. SQLITE_CORRUPT
    and SQLITE_NOTADB are a damaged file (a disk fault): the node says so once and answers
    UNAVAILABLE, instead of a traceback per request (`StorageNode`). A file that cannot be
    reached now (locked by another process past ``BUSY_TIMEOUT_MS``, an I/O error, a file
    system remounted read-only, a file gone) is the store unavailable: UNAVAILABLE as a
    Redis server down is, said once, the node ready again when a call is answered."""
    # Only errors SQLite itself raised carry a code (ours, raised by hand, do not); it is
    # the extended code (SQLITE_IOERR_WRITE, ...): its low byte is the primary one.
    code = getattr(error, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    translated: BaseException
    if primary == sqlite3.SQLITE_FULL:
        translated = StorageFullError(f"storage is full: {error}")
    elif primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        translated = StoreDamagedError(f"the mailbox store is damaged: {error}")
    elif primary in _UNAVAILABLE:
        translated = StoreUnavailableError(f"the mailbox store is unavailable: sqlite: {error}")
    else:
        return error
    translated.__cause__ = error
    return translated


def _connect(path: Path, *, writer: bool) -> sqlite3.Connection:
    """Open a connection in autocommit mode (we issue BEGIN/COMMIT ourselves)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if writer:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot enable WAL on {path}: journal_mode={mode}")
        conn.execute("PRAGMA synchronous = FULL")  # acknowledged == on disk
        # For migration 3 (moving each tombstone's authorization out by its digest).
        conn.create_function("sha256", 1, auth_digest, deterministic=True)
        _migrate(conn)
    else:
        conn.execute("PRAGMA query_only = ON")
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the schema, or bring an older file's up to ``SCHEMA_VERSION``."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"data file has schema version {version}, newer than this node's {SCHEMA_VERSION}"
        )
    fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not fresh:
            for step in range(max(version, 1), SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[step]):
                    conn.execute(statement)
        for script in (SCHEMA, MAILBOX_COUNTERS):
            for statement in _statements(script):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (``executescript`` would commit our
    transaction; trigger bodies hold semicolons, so split on complete statements)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]


@dataclass
class _Worker:
    """One thread owning one connection, fed by a queue.

    The writer (``group_commit=True``) runs the jobs it can drain from the queue in a single
    transaction, up to ``MAX_JOBS_PER_COMMIT`` and ``MAX_WORK_PER_COMMIT`` (small jobs join
    it past the work cap, those left wait in ``_pending`` for the next, oldest first); the
    reader runs each job in its own read transaction (one snapshot per call).
    """

    name: str
    connect: Callable[[], sqlite3.Connection]
    group_commit: bool
    commits: int = 0
    _queue: queue.SimpleQueue[_Job | object] = field(default_factory=queue.SimpleQueue)
    _thread: threading.Thread | None = None
    _closed: bool = False
    _pending: deque[_Job] = field(default_factory=deque)  # the writer thread's alone
    _stopping: bool = False

    async def start(self) -> None:
        """Start the thread and wait until its connection is open (or raise why not)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Any] = loop.create_future()
        self._thread = threading.Thread(
            target=self._main, args=(_Job(lambda c: None, ready, loop),), name=self.name
        )
        self._thread.daemon = True
        self._thread.start()
        await ready

    def submit(
        self, fn: Callable[[sqlite3.Connection], Any], work: int = ROW_WORK
    ) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("storage backend is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Job(fn, future, loop, work))
        return future

    async def stop(self) -> None:
        """Finish queued jobs, close the connection, join the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _main(self, ready: _Job) -> None:
        try:
            conn = self.connect()
        except BaseException as exc:
            _deliver(ready, None, exc)
            return
        _deliver(ready, None, None)
        run = self._run_batch if self.group_commit else self._run_reads
        try:
            while (batch := self._next_batch()) is not None:
                run(conn, batch)
        finally:
            self._closed = True  # a dead worker must refuse work, not leave callers hanging
            self._fail_queued()
            conn.close()

    def _fail_queued(self) -> None:
        while self._pending:
            _deliver(self._pending.popleft(), None, RuntimeError("storage backend is closed"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                _deliver(item, None, RuntimeError("storage backend is closed"))

    def _next_batch(self) -> list[_Job] | None:
        """The writer's next group (``_next_group``); the reader's next job, alone."""
        if self.group_commit:
            return self._next_group()
        first = self._queue.get()
        if first is _STOP:
            return None
        assert isinstance(first, _Job)
        return [first]

    def _next_group(self) -> list[_Job] | None:
        """The writer's next transaction: the oldest job waiting (blocking for one), then
        those after it while they fit the caps, and small ones past the work cap; the
        others stay pending, in order. None once stopped and nothing is left."""
        pending = self._pending
        if not pending:
            first = None if self._stopping else self._queue.get()
            if first is None or first is _STOP:
                return None
            assert isinstance(first, _Job)
            pending.append(first)
        while not self._stopping:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True  # what is queued before it still runs
            else:
                assert isinstance(item, _Job)
                pending.append(item)
        group: list[_Job] = []
        work = 0
        left: deque[_Job] = deque()
        for job in pending:
            room = len(group) < MAX_JOBS_PER_COMMIT
            fits = work + job.work <= MAX_WORK_PER_COMMIT or job.work <= SMALL_WORK
            if not group or (room and fits):
                group.append(job)
                work += job.work
            else:
                left.append(job)
        self._pending = left
        return group

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """One transaction for the whole group; answers go out only after COMMIT."""
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            began_ns = time.monotonic_ns()
            conn.execute("BEGIN IMMEDIATE")
            results = [_run_in_savepoint(conn, job) for job in batch]
            commit_ns = time.monotonic_ns()
            conn.execute("COMMIT")
            trace.mark_span("sqlite.run", began_ns, commit_ns, len(batch))
            trace.mark_span("sqlite.commit", commit_ns, time.monotonic_ns(), len(batch))
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the group is durable
            _rollback(conn)
            results = [(job, None, exc) for job in batch]
        else:
            self.commits += 1
        for job, value, error in results:
            _deliver(job, value, error)

    def _run_reads(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Each read in its own read transaction: one consistent snapshot per call."""
        for job in batch:
            value: Any = None
            error: Exception | None = None
            try:
                conn.execute("BEGIN")
                value = job.fn(conn)
                conn.execute("COMMIT")
            except Exception as exc:
                _rollback(conn)
                error = exc
            _deliver(job, value, error)


def _rollback(conn: sqlite3.Connection) -> None:
    """Leave no transaction open after a failure (SQLite may have rolled back already)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _run_in_savepoint(
    conn: sqlite3.Connection, job: _Job
) -> tuple[_Job, Any, BaseException | None]:
    """Run one request so that its failure undoes only its own changes."""
    conn.execute("SAVEPOINT job")
    try:
        value = job.fn(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
        return job, None, exc
    conn.execute("RELEASE job")
    return job, value, None


class SqliteBackend:
    """``MailboxBackend`` on one SQLite file (see the module docstring for the threading)."""

    def __init__(self, path: Path, writer: _Worker, reader: _Worker) -> None:
        self.path = path
        self._writer = writer
        self._reader = reader
        self._incarnation: bytes | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteBackend:
        """Open (creating if needed) the database at ``path``."""
        path = Path(path)
        writer = _Worker(f"sqlite-writer:{path.name}", lambda: _connect(path, writer=True), True)
        await writer.start()
        reader = _Worker(f"sqlite-reader:{path.name}", lambda: _connect(path, writer=False), False)
        try:
            await reader.start()
        except BaseException:
            await writer.stop()
            raise
        return cls(path, writer, reader)

    async def incarnation(self) -> bytes:
        if self._incarnation is None:  # a file's incarnation never changes while it is open
            row = await self._reader.submit(
                lambda c: c.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
            )
            self._incarnation = bytes(row[0])
        return self._incarnation

    @property
    def commits(self) -> int:
        """Write transactions committed so far (group commit makes this < writes)."""
        return self._writer.commits

    async def put_many(
        self, blobs: Sequence[StoredBlob], now_ms: int, quota: Quota | None = None
    ) -> list[PutOutcome]:
        """One writer job; with ``quota``, each blob judged against it in the job, after
        the jobs before it in the group (``_put_batch``)."""
        if not blobs:
            return []
        batch = list(blobs)
        work = sum(len(b.blob) + ROW_WORK for b in batch)
        result: list[PutOutcome] = await self._writer.submit(
            functools.partial(_put_batch, blobs=batch, now_ms=now_ms, quota=quota), work
        )
        return result

    async def delete(
        self, tombstones: Sequence[Tombstone], now_ms: int, bounds: TombstoneBounds | None = None
    ) -> int:
        """``WRITE_CHUNK`` tombstones per writer job, each job submitted once the last is
        committed: the writes queued meanwhile go between them. One job of 1,000 held the
        writer, and every put waiting for it, for 0.4-0.9 s (blobs of 60 KB). With
        ``bounds``, those for IDs not held first, in one job (``delete_steps``), each job
        judged against them inside its savepoint, after the jobs before it in the group
        (``_delete_batch``)."""
        if not tombstones:
            return 0
        batch = list(tombstones)
        digests = per_authorization([t.authorization for t in batch], auth_digest)
        held = None if bounds is None else self.held
        pairs = list(zip(batch, digests, strict=True))
        steps = await delete_steps(pairs, WRITE_CHUNK, now_ms, held)
        removed = 0
        for n, step in enumerate(steps):
            part = [t for t, _ in step]
            job = functools.partial(
                _delete_batch, batch=part, digests=[d for _, d in step], now_ms=now_ms,
                bounds=bounds,
            )  # fmt: skip
            work = ROW_WORK * len(part) + sum(len(a) for a in {t.authorization for t in part})
            with refused_at_step(n):
                removed += await self._writer.submit(job, work)
        return removed

    async def expire(self, now_ms: int, limit: int) -> int:
        """``WRITE_CHUNK`` at a time, as ``delete``: GC's default batch of 1,000 in one job
        held the writer 0.2-0.6 s (blobs of 100 B to 60 KB), every put waiting."""
        removed = 0
        while removed < limit:
            step = min(WRITE_CHUNK, limit - removed)
            done: int = await self._writer.submit(
                functools.partial(_expire, now_ms=now_ms, limit=step)
            )
            removed += done
            if done < step:
                break
        return removed

    async def forget(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], tombstone_ids: Sequence[bytes]
    ) -> int:
        """``WRITE_CHUNK`` IDs per writer job, as ``delete`` (a hand-off copy dropped whole
        can be a mailbox's every blob)."""
        blobs, tombs = unique(blob_ids), unique(tombstone_ids)
        removed = 0
        for i in range(0, len(blobs) + len(tombs), WRITE_CHUNK):
            part_blobs = blobs[i : i + WRITE_CHUNK]
            part_tombs = tombs[max(0, i - len(blobs)) : max(0, i + WRITE_CHUNK - len(blobs))]
            job = functools.partial(
                _forget, mailbox_id=mailbox_id, blob_ids=part_blobs, tomb_ids=part_tombs
            )
            removed += await self._writer.submit(job)
        return removed

    async def fetch(
        self, mailbox_id: bytes, cursor: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> Page:
        check_limit(limit)
        page: Page = await self._reader.submit(
            lambda c: _page(c, mailbox_id, cursor, limit, now_ms, max_bytes)
        )
        return page

    async def get_blobs(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[StoredBlob]:
        wanted = unique(blob_ids)
        found: dict[bytes, StoredBlob] = await self._reader.submit(
            lambda c: _blobs_by_id(c, mailbox_id, wanted, now_ms)
        )
        return [found[i] for i in wanted if i in found]

    async def sync_index(
        self, mailbox_id: bytes, now_ms: int, after: bytes = b"", limit: int = 0
    ) -> SyncIndex:
        result: SyncIndex = await self._reader.submit(
            lambda c: _sync_index(c, mailbox_id, now_ms, after, limit or -1)
        )
        return result

    async def get_tombstones(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[Tombstone]:
        wanted = unique(blob_ids)
        result: list[Tombstone] = await self._reader.submit(
            lambda c: _tombstones_by_id(c, mailbox_id, wanted, now_ms)
        )
        return sorted(result, key=lambda t: t.blob_id)

    async def held(
        self, mailbox_id: bytes, ids: Sequence[bytes], now_ms: int
    ) -> tuple[set[bytes], set[bytes]]:
        wanted = unique(ids)
        if not wanted:
            return set(), set()
        result: tuple[set[bytes], set[bytes]] = await self._reader.submit(
            lambda c: (
                _held_in(c, "blobs", mailbox_id, wanted, now_ms),
                _held_in(c, "tombstones", mailbox_id, wanted, now_ms),
            )
        )
        return result

    async def digests(self, start: bytes, end: bytes, now_ms: int) -> list[MailboxDigest]:
        if end and start >= end:
            return []
        result: list[MailboxDigest] = await self._reader.submit(
            lambda c: _digests(c, start, end, now_ms)
        )
        return result

    async def digests_of(self, mailbox_ids: Sequence[bytes], now_ms: int) -> list[MailboxDigest]:
        wanted = unique(mailbox_ids)
        found: dict[bytes, MailboxDigest] = await self._reader.submit(
            lambda c: _digests_of(c, wanted, now_ms)
        )
        return [found[m] for m in mailbox_ids]

    async def usage(self, mailbox_id: bytes, now_ms: int) -> Usage:
        """The mailbox's counters minus its expired blobs not yet collected: a read of
        what GC has not reached (usually nothing), not of everything held."""
        row = await self._reader.submit(lambda c: _usage(c, mailbox_id, now_ms))
        return Usage(int(row[0]), int(row[1]))

    async def tombstones(self, mailbox_id: bytes) -> int:
        """The ``mailboxes`` row's counter (triggers keep it)."""
        row = await self._reader.submit(lambda c: c.execute(
            "SELECT tombstones FROM mailboxes WHERE mailbox_id = ?", (mailbox_id,)
        ).fetchone())  # fmt: skip
        return 0 if row is None else int(row[0])

    async def unheld_tombstones(self) -> int:
        """``totals.unheld_tombstones`` (triggers keep it)."""
        count: int = await self._reader.submit(
            lambda c: c.execute("SELECT unheld_tombstones FROM totals WHERE id = 0").fetchone()[0]
        )
        return count

    async def totals(self) -> Usage:
        """Everything held, expired-but-not-yet-collected blobs included (it is disk used)."""
        row = await self._reader.submit(
            lambda c: c.execute("SELECT blobs, bytes FROM totals WHERE id = 0").fetchone()
        )
        return Usage(int(row[0]), int(row[1]))

    async def mailboxes(self) -> int:
        count: int = await self._reader.submit(
            lambda c: c.execute("SELECT mailboxes FROM totals WHERE id = 0").fetchone()[0]
        )
        return count

    async def signed_deletes(self) -> Usage:
        """Signed deletes held (each once, however many tombstones reference it) and their
        bytes: what tombstones cost beyond their fixed-size rows (counters kept by triggers)."""
        row = await self._reader.submit(lambda c: c.execute(
            "SELECT signed_deletes, signed_delete_bytes FROM totals WHERE id = 0"
        ).fetchone())  # fmt: skip
        return Usage(int(row[0]), int(row[1]))

    async def gc_time(self) -> int | None:
        row = await self._reader.submit(
            lambda c: c.execute("SELECT value FROM meta WHERE key = 'gc_time'").fetchone()
        )
        return None if row is None else int(row[0])

    async def save_gc_time(self, now_ms: int) -> None:
        await self._writer.submit(lambda c: c.execute(
            "INSERT INTO meta (key, value) VALUES ('gc_time', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (now_ms,),
        ))  # fmt: skip

    async def configuration_problems(self) -> list[str]:
        return []  # WAL and synchronous=FULL are set on every connection this opens

    async def close(self) -> None:
        """Close the reader first, so the writer's close is the last one and checkpoints."""
        await self._reader.stop()
        await self._writer.stop()


# --- work done on the writer connection ------------------------------------------------------


def _put_batch(
    conn: sqlite3.Connection, blobs: list[StoredBlob], now_ms: int, quota: Quota | None
) -> list[PutOutcome]:
    """``_put_one`` each. With ``quota``, a mailbox's usage is read once in the job (on the
    writer's connection: every job before it, this group's too, counted) and counted
    forward over the blobs this job stores."""
    room: _Room | None = None if quota is None else _Room(quota)
    return [_put_one(conn, b, now_ms, room) for b in blobs]


@dataclass(slots=True)
class _Room:
    """What each mailbox of a put job holds, for its quota: read at its first blob, counted
    forward. First the ``mailboxes`` row's counters, which count expired blobs GC has not
    reached too: a blob that fits them fits (one read; ``_usage``'s three cost the writer
    ~25 us a put); one that does not is judged against ``_usage`` (what the admission reads),
    read then, on this connection: this job's blobs stored so far included."""

    quota: Quota
    usage: dict[bytes, tuple[int, int, bool]] = field(default_factory=dict)  # blobs, bytes, exact

    def take(self, conn: sqlite3.Connection, blob: StoredBlob, now_ms: int) -> bool:
        """Whether ``blob`` fits its mailbox's quota; if it does, it is counted."""
        box, size = blob.mailbox_id, len(blob.blob)
        held = self.usage.get(box)
        if held is None:
            row = conn.execute(
                "SELECT blobs, bytes FROM mailboxes WHERE mailbox_id = ?", (box,)
            ).fetchone()
            held = (0, 0, True) if row is None else (int(row[0]), int(row[1]), False)
        if not held[2] and not self.quota.fits(held[0], held[1], size):
            held = (*_usage(conn, box, now_ms), True)
        if not self.quota.fits(held[0], held[1], size):
            self.usage[box] = held
            return False
        self.usage[box] = (held[0] + 1, held[1] + size, held[2])
        return True


def _put_one(
    conn: sqlite3.Connection, blob: StoredBlob, now_ms: int, room: _Room | None = None
) -> PutOutcome:
    """Decide and apply one put, in the order EXPIRED, TOMBSTONED, DUPLICATE, OVER_QUOTA
    (with ``room``), STORED. Every check reads before the put writes anything."""
    key = (blob.mailbox_id, blob.blob_id)
    if blob.expires_ms <= now_ms:
        return PutOutcome.EXPIRED
    if conn.execute(
        "SELECT 1 FROM tombstones WHERE mailbox_id = ? AND blob_id = ? AND expires_ms > ?",
        (*key, now_ms),
    ).fetchone():
        return PutOutcome.TOMBSTONED
    held = _held_expiry(conn, key)
    if held is not None and held > now_ms:
        return PutOutcome.DUPLICATE
    # An expired copy replaced below is not in the usage (``_usage`` leaves it out).
    if room is not None and not room.take(conn, blob, now_ms):
        return PutOutcome.OVER_QUOTA
    if held is not None:
        conn.execute("DELETE FROM blobs WHERE mailbox_id = ? AND blob_id = ?", key)
    seq = conn.execute(
        "INSERT INTO mailboxes (mailbox_id, last_seq) VALUES (?, 1) ON CONFLICT (mailbox_id)"
        " DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        (blob.mailbox_id,),
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO blobs (mailbox_id, blob_id, seq, stored_ms, expires_ms, size, pow, blob)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            *key,
            seq,
            blob.stored_ms,
            blob.expires_ms,
            len(blob.blob),
            encode_pow(blob.pow),
            blob.blob,
        ),
    )
    return PutOutcome.STORED


def _usage(conn: sqlite3.Connection, mailbox_id: bytes, now_ms: int) -> tuple[int, int]:
    """The held counters minus what expired: the whole hours from ``expiry_hours``, the hour
    under way from the rows. Counting every expired row cost 9 ms a put (on the reader
    every fetch waits for) at 100,000 expired that GC had not reached (a node restarted
    after a day: its GC lags a day, docs/storage.md)."""
    held = conn.execute(
        "SELECT blobs, bytes FROM mailboxes WHERE mailbox_id = ?", (mailbox_id,)
    ).fetchone()
    if held is None:
        return 0, 0
    hour = now_ms // EXPIRY_HOUR_MS
    past = conn.execute(
        "SELECT coalesce(sum(blobs), 0), coalesce(sum(bytes), 0) FROM expiry_hours"
        " WHERE mailbox_id = ? AND hour < ?",
        (mailbox_id, hour),
    ).fetchone()
    this_hour = conn.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM blobs"
        " WHERE mailbox_id = ? AND expires_ms >= ? AND expires_ms <= ?",
        (mailbox_id, hour * EXPIRY_HOUR_MS, now_ms),
    ).fetchone()
    return held[0] - past[0] - this_hour[0], held[1] - past[1] - this_hour[1]


def _held_expiry(conn: sqlite3.Connection, key: tuple[bytes, bytes]) -> int | None:
    row = conn.execute(
        "SELECT expires_ms FROM blobs WHERE mailbox_id = ? AND blob_id = ?", key
    ).fetchone()
    return None if row is None else int(row[0])


def _delete_batch(
    conn: sqlite3.Connection,
    batch: list[Tombstone],
    digests: list[bytes],
    now_ms: int,
    bounds: TombstoneBounds | None = None,
) -> int:
    """``_delete_one`` each, the batch's signed deletes stored once each (``stored``).
    With ``bounds``, the tombstones it stored for IDs not held are judged against them
    after the writes (the counts then include every job committed or run before it, this
    group's too): over them, `CapacityError` rolls this job back (its savepoint) alone."""
    stored: set[bytes] = set()
    before = {} if bounds is None else _mailbox_tombstones(conn, batch)
    removed = 0
    grown: dict[bytes, int] = {}  # tombstones for IDs not held, added per mailbox
    for tomb, digest in zip(batch, digests, strict=True):
        dropped, unheld = _delete_one(conn, tomb, digest, now_ms, stored)
        removed += dropped
        grown[tomb.mailbox_id] = grown.get(tomb.mailbox_id, 0) + unheld
    if bounds is not None:
        for box, unheld in grown.items():
            bounds.check_mailbox(before[box], unheld)
        node = conn.execute("SELECT unheld_tombstones FROM totals WHERE id = 0").fetchone()[0]
        node_grown = sum(grown.values())
        bounds.check_node(node - node_grown, node_grown)
    return removed


def _mailbox_tombstones(conn: sqlite3.Connection, batch: list[Tombstone]) -> dict[bytes, int]:
    """The tombstones each mailbox of ``batch`` holds (``mailboxes.tombstones``)."""
    counts = {}
    for box in unique(t.mailbox_id for t in batch):
        row = conn.execute(
            "SELECT tombstones FROM mailboxes WHERE mailbox_id = ?", (box,)
        ).fetchone()
        counts[box] = 0 if row is None else int(row[0])
    return counts


def _delete_one(
    conn: sqlite3.Connection, tomb: Tombstone, digest: bytes, now_ms: int, stored: set[bytes]
) -> tuple[int, int]:
    """Drop the blob; store the tombstone, extended to outlive it (common.py rules).
    ``stored``: the signed deletes this batch knows to be in ``signed_deletes``. Returns
    the live blobs dropped (0 or 1) and how much the node's count of tombstones for IDs not
    held grew (-1, a counted one replaced by one of a held blob; 0; 1)."""
    key = (tomb.mailbox_id, tomb.blob_id)
    expires = tomb.expires_ms
    removed = 0
    held = _held_expiry(conn, key)
    if held is not None:
        conn.execute("DELETE FROM blobs WHERE mailbox_id = ? AND blob_id = ?", key)
        if held > now_ms:
            removed = 1
            expires = max(expires, held)
    if expires <= now_ms:
        return removed, 0
    row = conn.execute(
        "SELECT expires_ms, auth_digest, unheld FROM tombstones"
        " WHERE mailbox_id = ? AND blob_id = ?",
        key,
    ).fetchone()
    if row is None or row[0] < expires:
        conn.execute("DELETE FROM tombstones WHERE mailbox_id = ? AND blob_id = ?", key)
        if row is not None:  # its last reference going drops the signed delete it named
            stored.discard(row[1])
        # Held neither as a live blob nor as a live tombstone of a held ID: counted against
        # the node's bound (``unheld_tombstones``), as the service's ``held`` judged it.
        unheld = removed == 0 and (row is None or row[0] <= now_ms or row[2] == 1)
        _insert_tombstone(conn, tomb, digest, expires, stored, unheld)
        return removed, int(unheld) - (0 if row is None else int(row[2]))
    return removed, 0


def _insert_tombstone(
    conn: sqlite3.Connection,
    tomb: Tombstone,
    digest: bytes,
    expires: int,
    stored: set[bytes],
    unheld: bool,
) -> None:
    """The signed delete once (its first tombstone stores it: the first of the batch sends
    its bytes, the others know it is there), then the row referencing it; the
    ``tombstone_added`` trigger counts the reference."""
    if digest not in stored:
        conn.execute(
            "INSERT INTO signed_deletes (digest, refs, authorization) VALUES (?, 0, ?)"
            " ON CONFLICT (digest) DO NOTHING",
            (digest, tomb.authorization),
        )
        stored.add(digest)
    conn.execute(
        "INSERT INTO tombstones"
        " (mailbox_id, blob_id, deleted_ms, expires_ms, auth_digest, unheld)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (tomb.mailbox_id, tomb.blob_id, tomb.deleted_ms, expires, digest, int(unheld)),
    )


def _forget(
    conn: sqlite3.Connection, mailbox_id: bytes, blob_ids: list[bytes], tomb_ids: list[bytes]
) -> int:
    """Delete rows outright: no tombstone, and ``mailboxes.last_seq`` stays."""
    removed = 0
    for table, ids in (("blobs", blob_ids), ("tombstones", tomb_ids)):
        for chunk, marks in _in_chunks(ids):
            removed += conn.execute(
                f"DELETE FROM {table} WHERE mailbox_id = ? AND blob_id IN ({marks})",
                (mailbox_id, *chunk),
            ).rowcount
    return removed


def _expire(conn: sqlite3.Connection, now_ms: int, limit: int) -> int:
    """Remove the ``limit`` oldest-expired rows of both tables (common.py GC order)."""
    candidates = [
        (row[0], kind, row[1], row[2], row[3])
        for kind, table in ((0, "blobs"), (1, "tombstones"))
        for row in conn.execute(
            f"SELECT expires_ms, mailbox_id, blob_id, rowid FROM {table} WHERE expires_ms <= ?"
            " ORDER BY expires_ms, mailbox_id, blob_id LIMIT ?",
            (now_ms, limit),
        )
    ]
    victims = sorted(candidates)[:limit]
    for kind, table in ((0, "blobs"), (1, "tombstones")):
        conn.executemany(
            f"DELETE FROM {table} WHERE rowid = ?", [(v[4],) for v in victims if v[1] == kind]
        )
    return len(victims)


def _in_chunks(ids: list[bytes]) -> Iterator[tuple[list[bytes], str]]:
    """``ids`` in chunks that fit one ``IN (...)``, each with its placeholders."""
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        yield chunk, ", ".join("?" * len(chunk))


# --- work done on the reader connection ------------------------------------------------------


def _blobs(conn: sqlite3.Connection, sql: str, params: Iterable[Any]) -> list[StoredBlob]:
    """Rows of ``_BLOB_COLUMNS``."""
    return [
        StoredBlob(row[0], row[1], row[2], row[3], row[4], row[5], decode_pow(row[6]))
        for row in conn.execute(sql, tuple(params))
    ]


def _page(
    conn: sqlite3.Connection, box: bytes, cursor: int, limit: int, now_ms: int, max_bytes: int
) -> Page:
    """The rows of a fetch, read one at a time and stopped at ``limit`` or ``max_bytes``."""
    rows = _page_rows(conn, box, cursor, limit, now_ms)
    taken: list[StoredBlob] = []
    size = 0
    for row in rows:
        full = len(taken) == limit or (max_bytes and taken and size + len(row[2]) > max_bytes)
        if full:
            return Page(taken, taken[-1].seq, True)
        taken.append(StoredBlob(row[0], row[1], row[2], row[3], row[4], row[5], decode_pow(row[6])))
        size += len(row[2])
    return Page(taken, taken[-1].seq if taken else cursor, False)


def _page_rows(
    conn: sqlite3.Connection, box: bytes, cursor: int, limit: int, now_ms: int
) -> Iterable[tuple[Any, ...]]:
    """A page's rows (``_BLOB_COLUMNS``) in seq order, read as they are used: by the seq
    index, or, for a mailbox of few live blobs behind an expired backlog (``_FEW_LIVE``),
    the page's seqs first from its live blobs' index entries (O(live), not O(expired)),
    then each row by its seq."""
    held = conn.execute("SELECT blobs FROM mailboxes WHERE mailbox_id = ?", (box,)).fetchone()
    live = _usage(conn, box, now_ms)[0] if held is not None else 0
    if held is not None and live <= _FEW_LIVE and held[0] - live > live:
        seqs = [
            row[0]
            for row in conn.execute(
                "SELECT seq FROM blobs INDEXED BY blobs_live WHERE mailbox_id = ?"
                " AND expires_ms > ? AND seq > ? ORDER BY seq LIMIT ?",
                (box, now_ms, cursor, limit + 1),
            )
        ]
        by_seq = f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE mailbox_id = ? AND seq = ?"
        return (row for seq in seqs if (row := conn.execute(by_seq, (box, seq)).fetchone()))
    return conn.execute(
        f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE mailbox_id = ? AND seq > ?"
        " AND expires_ms > ? ORDER BY seq LIMIT ?",
        (box, cursor, now_ms, limit + 1),
    )


def _blobs_by_id(
    conn: sqlite3.Connection, mailbox_id: bytes, wanted: list[bytes], now_ms: int
) -> dict[bytes, StoredBlob]:
    found: dict[bytes, StoredBlob] = {}
    for chunk, marks in _in_chunks(wanted):
        for blob in _blobs(
            conn,
            f"SELECT {_BLOB_COLUMNS} FROM blobs {_BY_ID} WHERE mailbox_id = ?"
            f" AND blob_id IN ({marks}) AND expires_ms > ?",
            (mailbox_id, *chunk, now_ms),
        ):
            found[blob.blob_id] = blob
    return found


def _sync_index(
    conn: sqlite3.Connection, mailbox_id: bytes, now_ms: int, after: bytes, limit: int
) -> SyncIndex:
    """``length()`` of a BLOB reads the record header, not the authorization itself. Each
    kind from ``after`` on, in ID order, along its (mailbox_id, blob_id) index; ``limit``
    -1: no limit."""
    key = (mailbox_id, after, now_ms, limit)
    return SyncIndex(
        _live_blob_ids(conn, mailbox_id, now_ms, after, limit),
        [(r[0], r[1]) for r in conn.execute(
            "SELECT t.blob_id, length(s.authorization)"
            " FROM tombstones t JOIN signed_deletes s ON s.digest = t.auth_digest"
            " WHERE t.mailbox_id = ? AND t.blob_id > ? AND t.expires_ms > ?"
            " ORDER BY t.blob_id LIMIT ?",
            key,
        )],
    )  # fmt: skip


def _live_blob_ids(
    conn: sqlite3.Connection, mailbox_id: bytes, now_ms: int, after: bytes, limit: int
) -> list[bytes]:
    """A page (``limit``): along the (mailbox_id, blob_id) index, a row read for each ID's
    expiry. The whole mailbox (-1): from the covering ``blobs_live`` index, no row read,
    then sorted (100,000 blobs of 2 KB: 630 ms of row reads, now 40-120 ms)."""
    if limit >= 0:
        return [r[0] for r in conn.execute(
            "SELECT blob_id FROM blobs WHERE mailbox_id = ? AND blob_id > ? AND expires_ms > ?"
            " ORDER BY blob_id LIMIT ?",
            (mailbox_id, after, now_ms, limit),
        )]  # fmt: skip
    rows = conn.execute(
        "SELECT blob_id FROM blobs INDEXED BY blobs_live WHERE mailbox_id = ? AND expires_ms > ?",
        (mailbox_id, now_ms),
    )
    return sorted(r[0] for r in rows if r[0] > after)


def _tombstones_by_id(
    conn: sqlite3.Connection, mailbox_id: bytes, ids: list[bytes], now_ms: int
) -> list[Tombstone]:
    found: list[Tombstone] = []
    for chunk, marks in _in_chunks(ids):
        found += [
            Tombstone(*row)
            for row in conn.execute(
                f"{_TOMBSTONES} WHERE t.mailbox_id = ? AND t.blob_id IN ({marks})"
                " AND t.expires_ms > ?",
                (mailbox_id, *chunk, now_ms),
            )
        ]
    return found


def _held_in(
    conn: sqlite3.Connection, table: str, mailbox_id: bytes, ids: list[bytes], now_ms: int
) -> set[bytes]:
    by_id = _BY_ID if table == "blobs" else ""
    found: set[bytes] = set()
    for chunk, marks in _in_chunks(ids):
        found.update(
            row[0]
            for row in conn.execute(
                f"SELECT blob_id FROM {table} {by_id} WHERE mailbox_id = ?"
                f" AND blob_id IN ({marks})"
                " AND expires_ms > ?",
                (mailbox_id, *chunk, now_ms),
            )
        )
    return found


def _digests(
    conn: sqlite3.Connection, start: bytes, end: bytes, now_ms: int
) -> list[MailboxDigest]:
    """Group the live IDs of every mailbox in range (one index range scan per table)."""
    bound = " AND mailbox_id < ?" if end else ""
    params = (start, end, now_ms) if end else (start, now_ms)
    groups: dict[bytes, tuple[list[bytes], list[bytes]]] = {}
    for slot, table in ((0, "blobs"), (1, "tombstones")):
        for mailbox_id, blob_id in conn.execute(
            f"SELECT mailbox_id, blob_id FROM {table} WHERE mailbox_id >= ?{bound}"
            " AND expires_ms > ?",
            params,
        ):
            groups.setdefault(mailbox_id, ([], []))[slot].append(blob_id)
    return [
        mailbox_digest(m, blobs, tombs)
        for m, (blobs, tombs) in sorted(groups.items())
        if in_range(m, start, end)
    ]


def _digests_of(
    conn: sqlite3.Connection, mailbox_ids: list[bytes], now_ms: int
) -> dict[bytes, MailboxDigest]:
    """Each named mailbox's digest: its live IDs read by ``IN (...)`` chunks (one index
    lookup per mailbox and table), the empty ones included."""
    groups: dict[bytes, tuple[list[bytes], list[bytes]]] = {m: ([], []) for m in mailbox_ids}
    for slot, table in ((0, "blobs"), (1, "tombstones")):
        for chunk, marks in _in_chunks(mailbox_ids):
            for mailbox_id, blob_id in conn.execute(
                f"SELECT mailbox_id, blob_id FROM {table} WHERE mailbox_id IN ({marks})"
                " AND expires_ms > ?",
                (*chunk, now_ms),
            ):
                groups[mailbox_id][slot].append(blob_id)
    return {m: mailbox_digest(m, blobs, tombs) for m, (blobs, tombs) in groups.items()}
