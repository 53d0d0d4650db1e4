"""Records are deleted against the node's ExpiryClock (`dna_core.expiry`), not the raw wall
clock: a forward step, under a running node or across a restart, no longer deletes every
record from memory and from the record file. Reads (find-value) and republishing still go
by the wall clock, so a record the stepped clock calls expired is hidden, not lost, and
served again when the clock is set right.

A whole overlay node (`OverlayServer`, real gRPC and UDP on 127.0.0.1, its record file) runs
in this process with both of its clocks injected; the upkeep pass is called directly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import ConflictError
from dna_core.ops.config import ConfigError, OpsSection, load_config
from dna_core.overlay.aio.record_file import RecordFile
from dna_core.overlay.aio.server import (
    NodeSection,
    OverlaySection,
    OverlayServer,
    OverlayServiceConfig,
    RecordsSection,
)
from dna_core.overlay.records import DEFAULT_MAX_GONE, RecordStore, identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2

NOW = 1_780_000_000_000
MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
STEP_MS = 31 * DAY_MS  # past every record's TTL
IDENTITY = common_pb2.RECORD_KIND_IDENTITY
SOURCE = "192.0.2.1"


@dataclass
class Clocks:
    wall: int  # ms, the wall clock (may step)
    monotonic: int  # ms, since this process started (a restart begins it again)


def identity_rec(ttl: int = HOUR_MS) -> tuple[bytes, bytes]:
    who = Identity.generate()
    key = record_key(IDENTITY, who.fingerprint)
    payload = identity_payload(who.fingerprint, "x", pow_bits=0, now_ms=NOW)
    return key, sign_record(who, kind=IDENTITY, key=key, seq=1, now_ms=NOW, ttl_ms=ttl,
                            payload=payload)  # fmt: skip


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, clocks: Clocks, max_gone: int = DEFAULT_MAX_GONE
) -> AsyncIterator[OverlayServer]:
    records = RecordsSection(
        path=tmp_path / "records.sqlite3", identity_pow_bits=0, max_gone=max_gone
    )
    config = OverlayServiceConfig(
        node=NodeSection(udp_port=0, grpc_port=0, key_file=tmp_path / "node.key"),
        overlay=OverlaySection(allow_loopback=True),
        records=records,
        ops=OpsSection(http_port=0),
    )
    server = OverlayServer(config, role=common_pb2.NODE_ROLE_BOOTSTRAP)
    server.wall_ms = lambda: clocks.wall
    server.monotonic_ms = lambda: clocks.monotonic
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def held(server: OverlayServer) -> RecordStore:
    assert server.node is not None and server.node.store is not None
    return server.node.store


def store(server: OverlayServer, rec: tuple[bytes, bytes]) -> bytes:
    """Store a record through the node's Overlay service (written through to its file)."""
    key, raw = rec
    assert server.records is not None
    request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(raw))
    assert server.records.store_one(request, SOURCE).stored_seq == 1
    return key


def found(server: OverlayServer, key: bytes) -> bool:
    """Whether the node's find-value answer carries the record."""
    assert server.records is not None
    answer = server.records.find_value_one(overlay_pb2.FindValueRequest(key=key))
    return len(answer.records) == 1


def upkeep(server: OverlayServer) -> list[VerifiedRecord]:
    interval_ms = int(server.config.overlay.republish_interval * 1000)
    return server.upkeep_pass(held(server), interval_ms)


def rows(tmp_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(tmp_path / "records.sqlite3")) as db:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons given by each "wall clock is ahead" line."""
    lines = [r.getMessage() for r in caplog.records]
    return [
        line[line.index("(") : line.index(")") + 1]
        for line in lines
        if "ahead of the time records are deleted against" in line
    ]


def test_a_running_node_whose_clock_steps_31_days_forward_keeps_its_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The wall clock steps 31 days forward under a running node: the next upkeep pass
    deletes only what had expired by the time it follows (at most twice real time), the
    rest stays in memory and in the file, hidden from find-value and not republished
    until the clock is set right. Checked to fail without the fix (0 records left)."""
    clocks = Clocks(wall=NOW, monotonic=0)

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            keys = [store(server, identity_rec()) for _ in range(3)]
            store(server, identity_rec(ttl=2 * MINUTE_MS))  # really expires meanwhile
            clocks.wall, clocks.monotonic = NOW + MINUTE_MS, MINUTE_MS
            upkeep(server)
            clocks.wall, clocks.monotonic = NOW + STEP_MS, 3 * MINUTE_MS  # the step
            assert upkeep(server) == []  # nothing the wall clock hides is offered to others
            assert len(held(server)) == 3 and rows(tmp_path) == 3
            assert server.expiry_clock.stepped_ms > 30 * DAY_MS
            assert not any(found(server, key) for key in keys)  # hidden meanwhile
            clocks.wall = NOW + 3 * MINUTE_MS + 1_000  # set right: served again
            assert all(found(server, key) for key in keys)

    with caplog.at_level(logging.INFO, logger="dna.node"):
        asyncio.run(scenario())
    assert warnings(caplog) == ["(a step forward?)"]


def test_a_node_restarted_with_its_clock_31_days_ahead_keeps_its_record_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The clock steps while the node is stopped: the restarted node resumes from the time
    its record file saved, so the load and the first upkeep pass keep every row. Before,
    the load judged expiry by the stepped wall clock and deleted every row (checked to
    fail without the fix: 0 loaded, 0 rows)."""
    clocks = Clocks(wall=NOW, monotonic=0)

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            keys = [store(server, identity_rec()) for _ in range(3)]
            clocks.wall, clocks.monotonic = NOW + MINUTE_MS, MINUTE_MS
            upkeep(server)
        saved = RecordFile(tmp_path / "records.sqlite3")
        assert saved.expiry_time() == NOW + MINUTE_MS
        saved.close()
        clocks.wall, clocks.monotonic = NOW + STEP_MS, 0  # restarted after the step
        async with serving(tmp_path, clocks) as server:
            assert len(held(server)) == 3 and rows(tmp_path) == 3
            assert server.expiry_clock.stepped_ms > 30 * DAY_MS
            clocks.monotonic = MINUTE_MS
            upkeep(server)
            assert len(held(server)) == 3 and rows(tmp_path) == 3
            clocks.wall = NOW + 2 * MINUTE_MS  # set right
            assert all(found(server, key) for key in keys)

    with caplog.at_level(logging.INFO, logger="dna.node"):
        asyncio.run(scenario())
    stopped = "the node was stopped that long, or the clock stepped forward"
    assert warnings(caplog) == [f"(since the time the record file saved: {stopped})"]


@pytest.mark.parametrize("saved", [None, "soon"], ids=["no-saved-time", "malformed-saved-time"])
def test_without_a_saved_time_the_load_expires_by_the_wall_clock(
    tmp_path: Path, saved: str | None
) -> None:
    """A record file written before the time was saved (no meta table), or whose saved
    time is not an integer: the node starts from the wall clock as before, and a record
    that expired while it was down is dropped from memory and file."""
    path = tmp_path / "records.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE records (key BLOB PRIMARY KEY, raw BLOB NOT NULL,"
            " source TEXT NOT NULL, expires_ms INTEGER NOT NULL)"
        )
        for ttl in (HOUR_MS, HOUR_MS, MINUTE_MS):
            key, raw = identity_rec(ttl)
            db.execute("INSERT INTO records VALUES (?, ?, ?, ?)", (key, raw, SOURCE, NOW + ttl))
        if saved is not None:
            db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value)")
            db.execute("INSERT INTO meta VALUES ('expiry_ms', ?)", (saved,))
    clocks = Clocks(wall=NOW + 2 * MINUTE_MS, monotonic=0)

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            assert len(held(server)) == 2 and rows(tmp_path) == 2
            assert server.expiry_clock.high_ms == clocks.wall
            assert server.expiry_clock.stepped_ms == 0

    asyncio.run(scenario())


def test_a_node_restarted_with_its_clock_set_back_a_year_keeps_its_record_file(
    tmp_path: Path,
) -> None:
    """The sibling step back (an RTC reset to last year) across a restart: the load judges
    "created in the future" by the latest time the node had used, not the wall clock set
    back, so it keeps every row (and serves them: none has expired by the wall clock).
    Before, every record was "created in the future" and deleted from the file (checked
    to fail without the fix: 0 loaded)."""
    clocks = Clocks(wall=NOW, monotonic=0)

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            keys = [store(server, identity_rec()) for _ in range(3)]
            clocks.wall, clocks.monotonic = NOW + MINUTE_MS, MINUTE_MS
            upkeep(server)
        clocks.wall, clocks.monotonic = NOW - 365 * DAY_MS, 0  # restarted, a year back
        async with serving(tmp_path, clocks) as server:
            assert len(held(server)) == 3 and rows(tmp_path) == 3
            assert all(found(server, key) for key in keys)

    asyncio.run(scenario())


def alice_rec(alice: Identity, *, seq: int, at: int, ttl: int) -> bytes:
    key = record_key(IDENTITY, alice.fingerprint)
    payload = identity_payload(alice.fingerprint, f"v{seq}", pow_bits=0, now_ms=at)
    return sign_record(alice, kind=IDENTITY, key=key, seq=seq, now_ms=at, ttl_ms=ttl,
                       payload=payload)  # fmt: skip


def refused_store(server: OverlayServer, raw: bytes) -> str:
    """Store ``raw`` through the node's Overlay service, which must refuse it; its reason."""
    assert server.records is not None
    request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(raw))
    with pytest.raises(ConflictError) as info:
        server.records.store_one(request, SOURCE)
    return info.value.reason


def test_a_record_a_stepped_clock_hides_is_not_rolled_back(tmp_path: Path) -> None:
    """A held record stands against replacement until the node deletes it (its ExpiryClock),
    not only until the wall clock calls it expired: with the clock stepped past its expiry
    (hidden from reads, kept), a replay of an older record of its signer that lives longer
    used to replace it, and the node served the rollback once the clock was set right.
    Now the replay is refused, while running and after a restart (the reload follows the
    same clock); checked to fail without the fix (stored_seq 3)."""
    clocks = Clocks(wall=NOW, monotonic=0)
    alice = Identity.generate()
    key = record_key(IDENTITY, alice.fingerprint)
    newer = alice_rec(alice, seq=5, at=NOW, ttl=HOUR_MS)
    older = alice_rec(alice, seq=3, at=NOW - HOUR_MS, ttl=DAY_MS)  # signed before, lives longer

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            assert server.records is not None
            request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(newer))
            assert server.records.store_one(request, SOURCE).stored_seq == 5
            clocks.wall, clocks.monotonic = NOW + 2 * HOUR_MS, MINUTE_MS  # a step forward
            upkeep(server)
            assert not found(server, key)  # hidden, not deleted
            deleted_to = server.expiry_clock.high_ms
            for _ in range(20):  # (within the source's burst of 30)
                assert "lower than held 5" in refused_store(server, older)
            assert server.expiry_clock.high_ms == deleted_to  # stores read it, never advance it
        async with serving(tmp_path, clocks) as server:  # restarted, the clock still ahead
            assert "lower than held 5" in refused_store(server, older)
            clocks.wall = NOW + 2 * MINUTE_MS  # set right: the newer record is served
            held_now = held(server).get(key, clocks.wall)
            assert held_now is not None and held_now.body.seq == 5

    asyncio.run(scenario())


def test_a_node_whose_clock_is_set_back_still_takes_fresh_records(tmp_path: Path) -> None:
    """A store is verified at the latest time the node has used, as the load at start is:
    with the wall clock set back a day (an RTC reset), every fresh record was refused as
    "created in the future" until the clock was set right. Checked to fail without the fix
    (ExpiredError)."""
    clocks = Clocks(wall=NOW, monotonic=0)

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            store(server, identity_rec())
            clocks.wall, clocks.monotonic = NOW + MINUTE_MS, MINUTE_MS
            upkeep(server)
            clocks.wall, clocks.monotonic = NOW - DAY_MS, 2 * MINUTE_MS  # set back a day
            fresh = identity_rec()  # signed at NOW by a publisher whose clock is right
            key = store(server, fresh)
            assert held(server).get(key, NOW) is not None and rows(tmp_path) == 2
            upkeep(server)  # deletion follows the step back: less is deleted, nothing lost
            assert len(held(server)) == 2

    asyncio.run(scenario())


def test_a_record_deleted_at_its_expiry_is_not_rolled_back_even_after_a_restart(
    tmp_path: Path,
) -> None:
    """Once upkeep had really deleted an expired record (the clocks ran on, no step), a
    replay of an older version of its signer, signed earlier with a longer life, was taken
    and served: a rollback. Now the node remembers the deleted record's signer and seq
    (IDs only, in its record file too) and refuses the replay as it refuses one against a
    held record, while running and after a restart. Checked to fail without the fix
    (stored_seq 3)."""
    clocks = Clocks(wall=NOW, monotonic=0)
    alice = Identity.generate()
    key = record_key(IDENTITY, alice.fingerprint)
    newer = alice_rec(alice, seq=5, at=NOW, ttl=HOUR_MS)
    older = alice_rec(alice, seq=3, at=NOW - HOUR_MS, ttl=DAY_MS)  # signed before, lives longer

    async def scenario() -> None:
        async with serving(tmp_path, clocks) as server:
            assert server.records is not None
            request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(newer))
            assert server.records.store_one(request, SOURCE).stored_seq == 5
            clocks.wall, clocks.monotonic = NOW + 2 * HOUR_MS, 2 * HOUR_MS  # time passes
            upkeep(server)
            assert len(held(server)) == 0 and rows(tmp_path) == 0  # really deleted
            assert "lower than held 5" in refused_store(server, older)
        clocks.monotonic = 0  # a new process
        async with serving(tmp_path, clocks) as server:
            assert "lower than held 5" in refused_store(server, older)
            assert held(server).get(key, clocks.wall) is None

    asyncio.run(scenario())


def test_the_memory_of_deleted_records_and_what_it_forgot_are_exported(tmp_path: Path) -> None:
    """Operators see how many deleted records' keys the node remembers against rollback
    (`dna_overlay_records_gone`) and how many it forgot early at ``max_gone``
    (`dna_overlay_records_gone_dropped_total`: from then on such a key can be rolled back),
    read from the node's own registry, the one its /metrics serves. The bound is the
    node's ``[records] max_gone`` (the store was built without it: 20,000 whatever the
    config said; checked to fail so)."""
    clocks = Clocks(wall=NOW, monotonic=0)

    def sample(server: OverlayServer, name: str) -> float | None:
        return server.registry.get_sample_value(name)

    async def scenario() -> None:
        async with serving(tmp_path, clocks, max_gone=2) as server:  # reached with three
            for _ in range(3):
                store(server, identity_rec())
            assert sample(server, "dna_overlay_records_gone") == 0
            assert sample(server, "dna_overlay_records_gone_dropped_total") == 0
            clocks.wall, clocks.monotonic = NOW + 2 * HOUR_MS, 2 * HOUR_MS  # all expired
            upkeep(server)
            assert len(held(server)) == 0
            assert sample(server, "dna_overlay_records_gone") == 2
            assert sample(server, "dna_overlay_records_gone_dropped_total") == 1
            metrics = (await asyncio.to_thread(scrape_ops, server)).splitlines()
            assert "dna_overlay_records_gone 2.0" in metrics
            assert "dna_overlay_records_gone_dropped_total 1.0" in metrics

    asyncio.run(scenario())


def test_max_gone_is_configured_and_checked(tmp_path: Path) -> None:
    """``[records] max_gone`` is read from the node's config; below 1 it is refused at
    start, naming the key."""
    path = tmp_path / "node.toml"
    path.write_text("[node]\nkey_file = 'node.key'\n[records]\nmax_gone = 7\n")
    loaded = load_config(OverlayServiceConfig, path, env_prefix="DNA", env={})
    assert loaded.records.max_gone == 7
    path.write_text("[node]\nkey_file = 'node.key'\n[records]\nmax_gone = 0\n")
    with pytest.raises(ConfigError, match=r"records\.max_gone"):
        load_config(OverlayServiceConfig, path, env_prefix="DNA", env={})


def scrape_ops(server: OverlayServer) -> str:
    """The node's /metrics page, over HTTP."""
    assert server.ops is not None
    return httpx.get(f"http://127.0.0.1:{server.ops.port}/metrics", timeout=5).text
