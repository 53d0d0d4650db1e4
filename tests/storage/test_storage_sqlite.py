"""SQLite-only guarantees: durability across reopen and SIGKILL, group commit, integrity."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

import pytest
from dna_storage.backends import sqlite as sqlite_backend
from dna_storage.backends.base import (
    PutOutcome,
    StoredBlob,
    StoreUnavailableError,
    Tombstone,
    Usage,
)
from dna_storage.backends.sqlite import SqliteBackend
from storage.sqlite_v3_schema import V3_SCHEMA
from storage.storage_harness import integrity_ok, listing

T0 = 1_700_000_000_000
DAY = 86_400_000
WRITER = Path(__file__).with_name("storage_crash_writer.py")


def blob(n: int, mailbox: bytes = b"\x01" * 32, size: int = 64) -> StoredBlob:
    payload = (b"blob %d " % n * size)[:size]
    return StoredBlob(mailbox, hashlib.sha256(payload).digest(), payload, T0, T0 + DAY)


def test_durable_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "mail.db"
    m = b"\x01" * 32

    async def write() -> bytes:
        b = await SqliteBackend.open(path)
        await b.put_many([blob(i) for i in range(5)], T0)
        await b.delete([Tombstone(m, blob(0).blob_id, T0, T0 + 2 * DAY, b"auth")], T0)
        incarnation = await b.incarnation()
        await b.close()
        return incarnation

    async def read(incarnation: bytes) -> None:
        b = await SqliteBackend.open(path)
        try:
            assert await b.incarnation() == incarnation  # cursors issued before stay valid
            page = await b.fetch(m, 0, 100, T0)
            assert [x.seq for x in page.blobs] == [2, 3, 4, 5]
            assert await b.put_many([blob(0)], T0) == [PutOutcome.TOMBSTONED]
            assert await b.put_many([blob(9)], T0) == [PutOutcome.STORED]
            assert (await b.fetch(m, 5, 10, T0)).blobs[0].seq == 6  # the counter persisted
            assert await b.totals() == Usage(5, 5 * 64)
            assert integrity_ok(b.path)
        finally:
            await b.close()

    asyncio.run(read(asyncio.run(write())))


def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    """N concurrent puts share commits; every one is still acknowledged only after its commit."""

    async def main() -> tuple[int, int]:
        b = await SqliteBackend.open(tmp_path / "mail.db")
        try:
            n = 200
            before = b.commits
            results = await asyncio.gather(*(b.put_many([blob(i)], T0) for i in range(n)))
            assert results == [[PutOutcome.STORED]] * n
            assert (await b.usage(b"\x01" * 32, T0)).blobs == n
            return b.commits - before, n
        finally:
            await b.close()

    commits, n = asyncio.run(main())
    assert 1 <= commits < n / 4, f"{commits} commits for {n} concurrent puts"


def test_a_transaction_is_capped_by_work_and_a_small_put_does_not_wait_for_it(
    tmp_path: Path,
) -> None:
    """16 batches of 4 x 1 MiB queued at once, then one small put: the writer's groups stop
    at ``MAX_WORK_PER_COMMIT`` (8 MiB: 8 commits at least, not one of 64 MiB holding every
    put until it ends), and the small put joins the first group formed after it, answered
    before most of the large ones. Fails without the work cap (checked: 1 commit, the
    small put answered last)."""

    async def main() -> None:
        b = await SqliteBackend.open(tmp_path / "mail.db")
        try:
            box = b"\x03" * 32
            mib = 1024 * 1024
            large = [[blob(4 * i + j, box, size=mib) for j in range(4)] for i in range(16)]
            done: list[str] = []

            async def put(name: str, batch: list[StoredBlob]) -> None:
                await b.put_many(batch, T0)
                done.append(name)

            before = b.commits
            tasks = [asyncio.create_task(put(f"large {i}", x)) for i, x in enumerate(large)]
            tasks.append(asyncio.create_task(put("small", [blob(999, box)])))
            await asyncio.gather(*tasks)
            assert b.commits - before >= 8
            assert done.index("small") < 8, done
            assert (await b.usage(box, T0)).blobs == 65
        finally:
            await b.close()

    asyncio.run(main())


def test_sequential_writes_commit_one_by_one(tmp_path: Path) -> None:
    async def main() -> None:
        b = await SqliteBackend.open(tmp_path / "mail.db")
        try:
            before = b.commits
            for i in range(10):
                await b.put_many([blob(i)], T0)
            assert b.commits - before == 10
        finally:
            await b.close()

    asyncio.run(main())


def test_a_failing_request_does_not_sink_its_group(tmp_path: Path) -> None:
    """Each request runs in its own savepoint: a failure undoes that request only, wholly."""

    async def main() -> None:
        b = await SqliteBackend.open(tmp_path / "mail.db")
        try:
            broken = StoredBlob(b"\x01" * 32, b"\x02" * 32, None, T0, T0 + DAY)  # type: ignore[arg-type]
            results = await asyncio.gather(
                b.put_many([blob(1)], T0),
                b.put_many([blob(2), broken], T0),  # atomic: blob(2) must not stay
                b.put_many([blob(3)], T0),
                return_exceptions=True,
            )
            assert results[0] == results[2] == [PutOutcome.STORED]
            assert isinstance(results[1], TypeError)
            page = await b.fetch(b"\x01" * 32, 0, 10, T0)
            assert [x.blob_id for x in page.blobs] == [blob(1).blob_id, blob(3).blob_id]
            assert [x.seq for x in page.blobs] == [1, 2]  # the failed put consumed no seq
        finally:
            await b.close()

    asyncio.run(main())


def test_closed_backend_refuses_work(tmp_path: Path) -> None:
    async def main() -> None:
        b = await SqliteBackend.open(tmp_path / "mail.db")
        await b.close()
        await b.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await b.put_many([blob(1)], T0)
        with pytest.raises(RuntimeError, match="closed"):
            await b.totals()

    asyncio.run(main())


def test_integrity_ok_detects_corruption(tmp_path: Path) -> None:
    """The check the other tests trust (``storage_harness.integrity_ok``) sees a damaged page."""
    path = tmp_path / "mail.db"

    async def fill() -> bool:
        b = await SqliteBackend.open(path)
        try:
            await b.put_many([blob(i, size=3000) for i in range(200)], T0)
            return integrity_ok(b.path)
        finally:
            await b.close()

    assert asyncio.run(fill())
    data = bytearray(path.read_bytes())
    page = 4096
    for offset in range(len(data) // 2 // page * page, len(data) // 2 // page * page + page):
        data[offset] = 0xA5  # one page in the middle: payload or index, never the schema
    path.write_bytes(bytes(data))
    assert not integrity_ok(path)


def _read_lines(stream: IO[str], into: list[str]) -> None:
    into.extend(stream)


def _kill_writer_mid_run(db: Path, after_lines: int) -> set[tuple[str, str]]:
    """Run the writer until it acknowledged ``after_lines`` blobs, SIGKILL it, return the acks."""
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, str(WRITER), str(db)], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines))
        reader.start()
        deadline = time.monotonic() + 20
        while len(lines) < after_lines and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        reader.join()
    assert lines and lines[0] == "READY\n", lines[:3]
    assert len(lines) >= after_lines, f"writer stalled or died after {len(lines)} lines"
    acked = [line.split() for line in lines[1:] if line.endswith("\n")]  # whole lines only
    return {(m, b) for m, b in acked}


async def _all_present(db: Path, acked: set[tuple[str, str]]) -> None:
    b = await SqliteBackend.open(db)
    try:
        assert integrity_ok(b.path)
        by_mailbox: dict[str, list[bytes]] = {}
        for m, i in acked:
            by_mailbox.setdefault(m, []).append(bytes.fromhex(i))
        now = int(time.time() * 1000)
        missing = 0
        for m, ids in by_mailbox.items():
            found = await b.get_blobs(bytes.fromhex(m), ids, now)
            missing += len(ids) - len(found)
        assert missing == 0, f"{missing} of {len(acked)} acknowledged blobs lost"
        assert (await b.totals()).blobs >= len(acked)
    finally:
        await b.close()


@pytest.mark.process  # starts a process itself
def test_sigkill_loses_no_acknowledged_blob(tmp_path: Path) -> None:
    """Kill the writer mid-run three times: integrity holds and every acked blob is there."""
    db = tmp_path / "crash.db"
    acked: set[tuple[str, str]] = set()
    for round_ in range(3):
        acked |= _kill_writer_mid_run(db, after_lines=300 + 97 * round_)
        asyncio.run(_all_present(db, acked))
    assert len(acked) >= 900


V1_MAILBOXES = """CREATE TABLE mailboxes (
    mailbox_id BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;"""


def _version_1_file(path: Path, m: bytes) -> None:
    """A data file as a schema version 1 node left it: no per-mailbox counters."""
    schema = V3_SCHEMA.split("CREATE TABLE IF NOT EXISTS blobs")[1].split(
        "CREATE TRIGGER IF NOT EXISTS mailbox_"
    )[0]
    schema = "\n".join(  # without the `pow` column version 3 added
        line for line in schema.splitlines() if not line.lstrip().startswith("pow BLOB")
    )
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_MAILBOXES + "CREATE TABLE IF NOT EXISTS blobs" + schema)
        conn.execute("INSERT INTO mailboxes VALUES (?, 3)", (m,))
        for n, expires in [(1, T0 + DAY), (2, T0 + DAY), (3, T0 + 10)]:
            b = blob(n, m)
            conn.execute(
                "INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (m, b.blob_id, n, T0, expires, len(b.blob), b.blob),
            )
        conn.execute("PRAGMA user_version = 1")


def test_a_version_1_file_gains_counters_and_usage_stays_exact(tmp_path: Path) -> None:
    path, m = tmp_path / "old.db", b"\x07" * 32
    _version_1_file(path, m)

    async def go() -> None:
        b = await SqliteBackend.open(path)
        try:
            assert await b.usage(m, T0) == Usage(3, 3 * 64)
            assert await b.usage(m, T0 + 10) == Usage(2, 2 * 64)  # one expired, not collected
            await b.put_many([blob(4, m)], T0)
            await b.delete([Tombstone(m, blob(1, m).blob_id, T0, T0 + 2 * DAY, b"auth")], T0)
            assert await b.expire(T0 + 11, 100) == 1
            assert await b.usage(m, T0 + 11) == Usage(2, 2 * 64)  # blobs 2 and 4
            assert await b.usage(b"\x08" * 32, T0) == Usage(0, 0)
            assert integrity_ok(b.path)
        finally:
            await b.close()

    asyncio.run(go())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (sqlite_backend.SCHEMA_VERSION,)


def test_a_file_from_a_newer_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {sqlite_backend.SCHEMA_VERSION + 1}")
    with pytest.raises(sqlite3.OperationalError, match="newer"):
        asyncio.run(SqliteBackend.open(path))


def _version_3_file(path: Path, tombs: list[Tombstone]) -> None:
    """A data file as a schema version 3 node left it: each tombstone row holds its whole
    signed delete."""
    with sqlite3.connect(path) as conn:
        conn.executescript(V3_SCHEMA)
        conn.executemany(
            "INSERT INTO tombstones VALUES (?, ?, ?, ?, ?)",
            [(t.mailbox_id, t.blob_id, t.deleted_ms, t.expires_ms, t.authorization) for t in tombs],
        )
        conn.execute("PRAGMA user_version = 3")


def test_a_version_3_file_keeps_each_signed_delete_once(tmp_path: Path) -> None:
    path, m = tmp_path / "v3.db", b"\x07" * 32
    first, second = b"signed delete 1 " * 800, b"signed delete 2 " * 800
    tombs = [
        Tombstone(m, bytes([n]) * 32, T0, T0 + DAY + n, first if n < 5 else second)
        for n in range(8)
    ]
    _version_3_file(path, tombs)

    async def go() -> None:
        b = await SqliteBackend.open(path)
        try:
            assert await b.get_tombstones(m, [t.blob_id for t in tombs], T0) == tombs
            assert (await listing(b, m, T0))[1] == tombs
            assert await b.mailboxes() == 1  # its tombstones counted at migration (v5)
            assert await b.signed_deletes() == Usage(2, len(first) + len(second))
            # which were stored for IDs not held is not known (v7): none counts, and GC
            # removing them takes nothing off the node's count
            assert await b.unheld_tombstones() == 0
            assert await b.expire(T0 + DAY + 4, 100) == 5  # every tombstone of the first
            assert await b.unheld_tombstones() == 0
            assert await b.signed_deletes() == Usage(1, len(second))
            assert await b.expire(T0 + DAY + 8, 100) == 3
            assert await b.signed_deletes() == Usage(0, 0)
            assert await b.mailboxes() == 0
            assert integrity_ok(b.path)
        finally:
            await b.close()

    asyncio.run(go())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (sqlite_backend.SCHEMA_VERSION,)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(tombstones)")]
        assert "authorization" not in columns


def test_a_failed_migration_leaves_the_old_file_untouched(tmp_path: Path) -> None:
    path, m = tmp_path / "v3.db", b"\x07" * 32
    tomb = Tombstone(m, b"\x01" * 32, T0, T0 + DAY, b"auth")
    _version_3_file(path, [tomb])
    with sqlite3.connect(path) as conn:  # a name the migration needs is taken
        conn.execute("CREATE TABLE tombstones_v4 (x)")
    with pytest.raises(sqlite3.OperationalError, match="tombstones_v4"):
        asyncio.run(SqliteBackend.open(path))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        assert conn.execute("SELECT authorization FROM tombstones").fetchall() == [(b"auth",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "signed_deletes" not in tables


def test_a_file_another_process_keeps_locked_answers_unavailable_then_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process (an operator's `sqlite3` shell, a copy tool) holds the write lock
    past the busy timeout: the write fails as ``StoreUnavailableError`` (UNAVAILABLE at the
    node, which turns unready until a call is answered), not as a bare
    ``sqlite3.OperationalError`` (a traceback and INTERNAL per request); it changed
    nothing, and once the lock is released the same backend writes again."""
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 200)
    path = tmp_path / "mail.db"

    async def main() -> None:
        b = await SqliteBackend.open(path)
        try:
            await b.put_many([blob(1)], T0)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StoreUnavailableError, match=r"unavailable: sqlite: .*locked"):
                    await b.put_many([blob(2)], T0)
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert (await b.usage(b"\x01" * 32, T0)).blobs == 1
            assert await b.put_many([blob(2)], T0) == [PutOutcome.STORED]
        finally:
            await b.close()

    asyncio.run(main())


def test_usage_reads_no_expired_row_gc_has_not_reached(tmp_path: Path) -> None:
    """A mailbox with 20,000 expired blobs GC has not reached (a node restarted after a day
    lags a day): the quota's usage is answered from counters, not by reading every expired
    row on the reader connection each put (9 ms a put at 100,000). Counted in SQLite VM
    steps; checked to fail without ``expiry_hours`` (~200,000 steps)."""
    m, path, hour = b"\x01" * 32, tmp_path / "usage.db", 3_600_000

    async def fill() -> None:
        b = await SqliteBackend.open(path)
        expired = [replace(blob(n), expires_ms=T0 + 1000) for n in range(20_000)]
        for i in range(0, len(expired), 1000):
            await b.put_many(expired[i : i + 1000], T0)
        await b.put_many([replace(blob(20_000), expires_ms=T0 + 10 * hour)], T0)
        assert await b.usage(m, T0 + 2 * hour) == Usage(1, 64)
        await b.close()

    asyncio.run(fill())
    conn = sqlite3.connect(path)
    steps = [0]

    def count() -> int:
        steps[0] += 100
        return 0

    conn.set_progress_handler(count, 100)
    try:
        assert sqlite_backend._usage(conn, m, T0 + 2 * hour) == (1, 64)
    finally:
        conn.close()
    assert steps[0] < 5_000, steps[0]


def test_whole_mailbox_reads_take_ids_from_an_index_not_the_rows(tmp_path: Path) -> None:
    """Repair's whole index of a mailbox, the digests a replica compares and the quota's
    usage read the blobs table through a covering index only: its rows hold the payloads,
    and reading one per blob took repair's index of 100,000 blobs of 2 KB 630 ms (digests
    360-500 ms) on the reader every fetch waits for. Every statement they run is checked by
    its query plan; checked to fail without ``blobs_live`` (row reads for both)."""
    m, path = b"\x01" * 32, tmp_path / "plans.db"

    async def fill() -> None:
        b = await SqliteBackend.open(path)
        await b.put_many([blob(n, size=3000) for n in range(300)], T0)
        await b.close()

    asyncio.run(fill())
    conn = sqlite3.connect(path)
    statements: list[str] = []
    try:
        conn.set_trace_callback(statements.append)
        index = sqlite_backend._sync_index(conn, m, T0, b"", -1)
        digests = sqlite_backend._digests_of(conn, [m], T0)
        usage = sqlite_backend._usage(conn, m, T0)
        conn.set_trace_callback(None)
        assert len(index.blob_ids) == digests[m].blobs == usage[0] == 300
        reads = [
            line[3]
            for sql in statements
            for line in conn.execute("EXPLAIN QUERY PLAN " + sql)
            if line[3].startswith(("SEARCH blobs", "SCAN blobs"))
        ]
    finally:
        conn.close()
    assert len(reads) >= 3
    assert all("COVERING INDEX" in read for read in reads), reads


def test_a_fetch_past_an_expired_backlog_reads_only_live_entries(tmp_path: Path) -> None:
    """20,000 expired blobs GC has not reached and 3 live ones: a fetch from cursor 0 steps
    through the live blobs' index entries, not every expired row (46 ms a fetch at 100,000).
    (Those expired in the hour under way are still counted, index entries only, by the
    mailbox's usage that chooses the path.)
    Counted in SQLite VM instructions on the reader's connection; fails without the live
    path (checked: ~100,000 instructions, 5 a row skipped; with it, at most 100)."""

    async def go() -> None:
        b = await SqliteBackend.open(tmp_path / "backlog.db")
        try:
            box = b"\x05" * 32
            expired = [replace(blob(n, box), expires_ms=T0 + 1000) for n in range(20_000)]
            live = [blob(n, box) for n in range(20_000, 20_003)]
            for i in range(0, len(expired), 1000):
                await b.put_many(expired[i : i + 1000], T0)
            await b.put_many(live, T0)
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0  # go on

            await b._reader.submit(lambda c: c.set_progress_handler(count, 100))
            page = await b.fetch(box, 0, 100, T0 + 2 * 3_600_000)  # expired an hour before
            await b._reader.submit(lambda c: c.set_progress_handler(None, 0))
            assert [x.blob_id for x in page.blobs] == [x.blob_id for x in live]
            assert steps[0] * 100 < 5_000, steps[0] * 100
        finally:
            await b.close()

    asyncio.run(go())


def test_blobs_named_by_id_are_looked_up_by_id_not_through_the_mailbox(tmp_path: Path) -> None:
    """A repair pull reads the blobs it is asked for 8 at a time, a push offer and a delete
    ask which of up to 4,096 IDs are held: with ``expires_ms > ?`` beside the IDs SQLite's
    planner took ``blobs_live`` and stepped through every live blob of the mailbox for each
    read (8 blobs of a 30,000-blob mailbox: 40 ms; a whole pull of it O(n^2)). Counted in
    SQLite VM instructions on the reader's connection, in a mailbox of 20,000 blobs; checked
    to fail without ``INDEXED BY blobs_id`` (180,100 and 161,600 instructions; with it 200
    and 4,200)."""

    async def go() -> None:
        b = await SqliteBackend.open(tmp_path / "by_id.db")
        try:
            box = b"\x06" * 32
            held = [blob(n, box) for n in range(20_000)]
            for i in range(0, len(held), 1000):
                await b.put_many(held[i : i + 1000], T0)
            steps = [0]

            def count() -> int:
                steps[0] += 100
                return 0  # go on

            async def counted(read: object) -> int:
                steps[0] = 0
                await b._reader.submit(lambda c: c.set_progress_handler(count, 100))
                await read  # type: ignore[misc]
                await b._reader.submit(lambda c: c.set_progress_handler(None, 0))
                return steps[0]

            wanted = [x.blob_id for x in held[5_000:5_008]]
            got = await b.get_blobs(box, wanted, T0)
            assert sorted(x.blob_id for x in got) == sorted(wanted)
            asked = [x.blob_id for x in held[:200]]
            assert (await b.held(box, asked, T0))[0] == set(asked)
            read_steps = await counted(b.get_blobs(box, wanted, T0))
            held_steps = await counted(b.held(box, asked, T0))
            assert read_steps > 0 and held_steps > 0  # counted at all: not a vacuous bound
            assert read_steps < 2_000, read_steps
            assert held_steps < 20_000, held_steps
        finally:
            await b.close()

    asyncio.run(go())
