"""The record file: what a node reloads after a restart is verified again (issue 11 item 2)."""

from __future__ import annotations

import contextlib
import logging
import resource
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import CapacityError, ConflictError, DnaError
from dna_core.overlay.aio.record_file import RecordFile
from dna_core.overlay.aio.records_rpc import OverlayService
from dna_core.overlay.aio.server import OverlayServer, OverlayServiceConfig, RecordsSection
from dna_core.overlay.contact import Contact
from dna_core.overlay.records import RecordStore, identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2

NOW = 1_780_000_000_000
HOUR_MS = 3_600_000
BITS = 4
IDENTITY = common_pb2.RECORD_KIND_IDENTITY


def identity_rec(who: Identity, ttl: int = HOUR_MS, seq: int = 1) -> tuple[bytes, bytes]:
    key = record_key(IDENTITY, who.fingerprint)
    payload = identity_payload(who.fingerprint, "x", pow_bits=BITS, now_ms=NOW)
    return key, sign_record(who, kind=IDENTITY, key=key, seq=seq, now_ms=NOW, ttl_ms=ttl,
                            payload=payload)  # fmt: skip


def rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])


def test_reload_verifies_again_and_forgets_what_fails(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    good, short, forged = Identity.generate(), Identity.generate(), Identity.generate()
    saved = RecordFile(path)
    key, raw = identity_rec(good)
    saved.save(raw, key, "192.0.2.1", NOW + HOUR_MS)
    key, raw = identity_rec(short, ttl=60_000)  # expires while the node is down
    saved.save(raw, key, "192.0.2.1", NOW + 60_000)
    key, raw = identity_rec(forged)
    saved.save(raw[:-1] + bytes([raw[-1] ^ 1]), key, "192.0.2.1", NOW + HOUR_MS)
    saved.close()

    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    reopened = RecordFile(path)
    assert reopened.load_into(store, NOW + 120_000) == (1, 2)
    reopened.close()
    assert len(store) == 1 and rows(path) == 1
    assert store.source_of(record_key(IDENTITY, good.fingerprint)) == "192.0.2.1"


def test_rows_of_the_wrong_types_or_sizes_are_deleted_unread(tmp_path: Path) -> None:
    """A file written by something else (edited by hand, another program): rows whose
    columns are not what `save` writes neither stop the load nor allocate their claim."""
    path = tmp_path / "records.sqlite3"
    good = Identity.generate()
    saved = RecordFile(path)
    key, raw = identity_rec(good)
    saved.save(raw, key, "192.0.2.1", NOW + HOUR_MS)
    wrong = [
        (b"k" * 32, raw.decode("latin-1"), "192.0.2.1"),  # the record as text
        (b"n" * 32, 10**12, "192.0.2.1"),  # a number: bytes(n) would allocate a terabyte
        (b"s" * 32, b"\0" * (16 * 1024 + 1), "192.0.2.1"),  # over the record size cap
        (b"t" * 32, raw, 5),  # the source as a number
        ("text key", raw, "192.0.2.1"),  # the key as text
        (b"short", raw, "192.0.2.1"),  # a key not 32 bytes
    ]
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO records VALUES (?, ?, ?, 0)", wrong)
    saved.close()

    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    reopened = RecordFile(path)
    assert reopened.load_into(store, NOW) == (1, len(wrong))
    reopened.close()
    assert len(store) == 1 and rows(path) == 1


def test_a_node_on_a_record_file_damaged_below_its_header_stops_in_one_line(
    tmp_path: Path,
) -> None:
    """Pages overwritten (a disk fault) show only when the rows are read: the node stops at
    start with the same one line as for a file SQLite cannot open, not a traceback."""
    path = tmp_path / "records.sqlite3"
    saved = RecordFile(path)
    for i in range(400):
        saved.save(b"r" * 3000, i.to_bytes(32, "big"), "192.0.2.1", NOW)
    saved.close()  # (the last connection's close checkpoints the WAL into the file)
    data = path.read_bytes()
    path.write_bytes(data[:4096] + b"\xff" * (len(data) // 2) + data[4096 + len(data) // 2 :])
    server = OverlayServer(
        OverlayServiceConfig(records=RecordsSection(path=path)), role=common_pb2.NODE_ROLE_BOOTSTRAP
    )
    with pytest.raises(DnaError) as refused:
        server._open_records()
    assert str(refused.value) == f"cannot open {path}: database disk image is malformed"
    assert server.record_file is None  # closed


def store_request(raw: bytes) -> overlay_pb2.StoreRequest:
    return overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(raw))


def service_on(path: Path, store: RecordStore | None = None) -> OverlayService:
    """The Store handler of a node whose record file is ``path`` (as `OverlayServer` builds
    it), with its store filled from the file as a node's start fills it."""
    journal = RecordFile(path)
    if store is None:
        store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
        journal.load_into(store, NOW)
    return OverlayService(
        store=store, closest=lambda key, k: [], local=_unused, journal=journal,
        clock=lambda: NOW,
    )  # fmt: skip


@contextlib.contextmanager
def files_limited_to(size: int) -> Iterator[None]:
    """No file this process writes may grow past ``size`` bytes (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so a write past it fails with EFBIG): a full disk, without a mount."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_store_whose_write_fails_is_refused_and_a_restart_serves_what_was_acknowledged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills between two versions of alice's identity record: writing the newer
    one fails (EFBIG, a real failing write). The store used to take it in memory anyway
    and answer stored_seq 2 while the file kept version 1, so the restarted node served
    version 1, older than what it had acknowledged. Now the write comes first: the store
    is refused (RESOURCE_EXHAUSTED, nothing held changes), and once the disk has room
    the same store is taken and survives a restart. Checked to fail without the fix
    (stored_seq 2 answered, version 1 reloaded)."""
    caplog.set_level(logging.INFO, "dna.overlay")
    path = tmp_path / "records.sqlite3"
    alice = Identity.generate()
    key, v1 = identity_rec(alice)
    _, v2 = identity_rec(alice, seq=2)
    service = service_on(path)
    assert service.store_one(store_request(v1), "192.0.2.1").stored_seq == 1
    full = max(p.stat().st_size for p in tmp_path.iterdir())
    with files_limited_to(full), pytest.raises(CapacityError) as refused:
        service.store_one(store_request(v2), "192.0.2.1")
    assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert "the record file refused the write" in refused.value.reason
    held = service.store.get(key, NOW)
    assert held is not None and held.raw == v1 and len(service.store) == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "a write failed" in errors[0].getMessage()
    assert _restarted(path).raw == v1  # what the node acknowledged: version 1

    assert service.store_one(store_request(v2), "192.0.2.1").stored_seq == 2  # room again
    assert "writes succeed again" in caplog.records[-1].getMessage()
    assert _restarted(path).raw == v2
    _journal(service).close()


def _restarted(path: Path) -> VerifiedRecord:
    """The one record a node restarted on ``path`` holds."""
    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    reopened = RecordFile(path)
    assert reopened.load_into(store, NOW) == (1, 0)
    reopened.close()
    (key,) = store.keys()
    held = store.get(key, NOW)
    assert held is not None
    return held


def _journal(service: OverlayService) -> RecordFile:
    assert isinstance(service.journal, RecordFile)
    return service.journal


def test_a_store_whose_eviction_cannot_be_written_changes_nothing(tmp_path: Path) -> None:
    """A store that evicts writes the new row, deletes the evicted one and remembers it in
    one transaction: refused, neither the store nor the file changes (SQLite's own
    refusal here: the connection made read-only)."""
    path = tmp_path / "records.sqlite3"
    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_records=2)
    service = service_on(path, store)
    for _ in range(2):  # one source holds the store: a newcomer from elsewhere evicts one
        _, raw = identity_rec(Identity.generate())
        assert service.store_one(store_request(raw), "192.0.2.1").stored_seq == 1
    before = (list(store.keys()), rows(path))
    _journal(service)._db.execute("PRAGMA query_only = ON")  # every write refused
    with pytest.raises(CapacityError, match="the record file refused the write"):
        service.store_one(store_request(identity_rec(Identity.generate())[1]), "198.51.100.1")
    assert (list(store.keys()), rows(path)) == before and not list(store.gone_items())
    _journal(service).forget(list(store.keys()), [], NOW)  # upkeep's: logged, not raised
    assert _journal(service).write_failures == 2 and rows(path) == 2
    _journal(service)._db.execute("PRAGMA query_only = OFF")
    newcomer = identity_rec(Identity.generate())[1]
    assert service.store_one(store_request(newcomer), "198.51.100.1").stored_seq == 1
    (evicted,) = [k for k in before[0] if store.get(k, NOW) is None]
    assert rows(path) == 2 and store.gone(evicted) is not None
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT key FROM gone").fetchall() == [(evicted,)]
    _journal(service).close()


def test_what_was_deleted_is_remembered_across_a_restart(tmp_path: Path) -> None:
    """What the store remembers of deleted records (against a rollback) is kept in the
    file: deleted by upkeep, or found expired by the load (it expired while the node was
    down); a restart used to forget both, and took an older version again."""
    path = tmp_path / "records.sqlite3"
    alice, bob = Identity.generate(), Identity.generate()
    journal = RecordFile(path)
    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    for who in (alice, bob):
        key, raw = identity_rec(who, seq=5, ttl=60_000)
        journal.save(raw, key, "192.0.2.1", NOW + 60_000)
    journal.load_into(store, NOW)
    later = NOW + 120_000
    alice_key = record_key(IDENTITY, alice.fingerprint)
    assert len(store.expire_keys(later)) == 2  # upkeep deletes both from memory; the file
    alice_gone = store.gone(alice_key)  # loses alice's row, keeps bob's (a failed delete)
    assert alice_gone is not None
    journal.forget([alice_key], [(alice_key, alice_gone)], later)
    journal.close()

    for restart in range(2):
        store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
        reopened = RecordFile(path)
        assert reopened.load_into(store, later)[0] == 0
        reopened.close()
        assert rows(path) == 0, restart
        for who in (alice, bob):
            key = record_key(IDENTITY, who.fingerprint)
            older = sign_record(
                who, kind=IDENTITY, key=key, seq=4, now_ms=NOW - HOUR_MS, ttl_ms=24 * HOUR_MS,
                payload=identity_payload(who.fingerprint, "x", pow_bits=BITS, now_ms=NOW - HOUR_MS),
            )  # fmt: skip
            with pytest.raises(ConflictError, match="lower than held 5"):
                store.put(older, later)


def _unused() -> Contact:
    raise AssertionError("not asked for in these tests")


def test_what_the_load_evicts_is_remembered_in_the_file_too(tmp_path: Path) -> None:
    """A load into a smaller store (max_records lowered) evicts records; the store
    remembers them against a rollback, and the file must too: it deleted their rows but
    kept no memory, so the restart after took an older version of the evicted record."""
    path = tmp_path / "records.sqlite3"
    journal = RecordFile(path)
    owners = [Identity.generate() for _ in range(3)]
    for who, source in zip(owners, ["192.0.2.1", "192.0.2.1", "198.51.100.1"], strict=True):
        key, raw = identity_rec(who, seq=5)
        journal.save(raw, key, source, NOW + HOUR_MS)
    journal.close()
    small = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_records=2)
    reopened = RecordFile(path)
    assert reopened.load_into(small, NOW) == (3, 1)  # the third evicts one of the first two
    reopened.close()
    (evicted,) = [
        who for who in owners if small.get(record_key(IDENTITY, who.fingerprint), NOW) is None
    ]
    assert small.gone(record_key(IDENTITY, evicted.fingerprint)) is not None

    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    again = RecordFile(path)
    assert again.load_into(store, NOW) == (2, 0)
    again.close()
    key = record_key(IDENTITY, evicted.fingerprint)
    older = sign_record(
        evicted, kind=IDENTITY, key=key, seq=4, now_ms=NOW - HOUR_MS, ttl_ms=24 * HOUR_MS,
        payload=identity_payload(evicted.fingerprint, "x", pow_bits=BITS, now_ms=NOW - HOUR_MS),
    )  # fmt: skip
    with pytest.raises(ConflictError, match="lower than held 5"):
        store.put(older, NOW)


def gone_rows(path: Path) -> dict[bytes, str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {bytes(k): str(s) for k, s in db.execute("SELECT key, source FROM gone")}


def test_the_file_keeps_the_memories_the_store_keeps_after_a_flood(tmp_path: Path) -> None:
    """Memories forgotten for room (the source holding the most loses its oldest,
    `records.GoneMemory`) leave the file at the next upkeep, and only they: the file used
    to keep the newest ``max_gone`` rows, so after a flood from one /24 a restart forgot
    the honest memory that memory had kept, and took a rollback of it."""
    path = tmp_path / "records.sqlite3"
    journal = RecordFile(path)
    honest, flooders = Identity.generate(), [Identity.generate() for _ in range(4)]
    key, raw = identity_rec(honest, seq=5, ttl=60_000)
    journal.save(raw, key, "203.0.113.1", NOW + 60_000)
    for i, who in enumerate(flooders):  # expire after the honest one: its memory is oldest
        k, r = identity_rec(who, ttl=120_000)
        journal.save(r, k, f"198.51.100.{i}", NOW + 120_000)
    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=3)
    assert journal.load_into(store, NOW) == (5, 0)
    for later in (NOW + 60_000, NOW + 120_000):  # two upkeeps
        expired = store.expire_keys(later)
        remembered = [(k, g) for k in expired if (g := store.gone(k)) is not None]
        journal.forget(expired, remembered, later, store.take_forgotten())
    assert gone_rows(path) == {k: g.source for k, g in store.gone_items()}
    assert store.gone(key) is not None and store.gone_evicted == 2
    journal.close()

    restarted = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=3)
    reopened = RecordFile(path)
    reopened.load_into(restarted, NOW + 120_000)
    reopened.close()
    assert dict(restarted.gone_items()) == dict(store.gone_items())
    older = sign_record(
        honest, kind=IDENTITY, key=key, seq=4, now_ms=NOW - HOUR_MS, ttl_ms=24 * HOUR_MS,
        payload=identity_payload(honest.fingerprint, "x", pow_bits=BITS, now_ms=NOW - HOUR_MS),
    )  # fmt: skip
    with pytest.raises(ConflictError, match="lower than held 5"):
        restarted.put(older, NOW + 120_000)


def test_a_smaller_max_gone_at_load_deletes_the_rows_it_forgot(tmp_path: Path) -> None:
    """A load into a store remembering fewer (``max_gone`` lowered) forgets for room as at
    run time, and the file deletes those rows, not others."""
    path = tmp_path / "records.sqlite3"
    journal = RecordFile(path)
    who = [Identity.generate() for _ in range(3)]
    sources = ["192.0.2.1", "192.0.2.2", "203.0.113.1"]
    for w, source in zip(who, sources, strict=True):
        key, raw = identity_rec(w, seq=5, ttl=60_000)
        journal.save(raw, key, source, NOW + 60_000)
    journal.load_into(RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS), NOW + 60_000)
    journal.close()  # (the load found all three expired and remembered them)
    keys = [record_key(IDENTITY, w.fingerprint) for w in who]
    assert gone_rows(path) == dict(zip(keys, sources, strict=True))
    small = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=2)
    reopened = RecordFile(path)
    reopened.load_into(small, NOW + 60_000)
    reopened.close()
    assert gone_rows(path) == {keys[1]: "192.0.2.2", keys[2]: "203.0.113.1"}
    assert {k for k, _ in small.gone_items()} == {keys[1], keys[2]}


def test_a_file_from_before_memories_had_a_source_opens(tmp_path: Path) -> None:
    """A record file written before table ``gone`` had its ``source`` column gets the
    column (empty: those memories count as one source's) and keeps its memories."""
    path = tmp_path / "records.sqlite3"
    alice = Identity.generate()
    key = record_key(IDENTITY, alice.fingerprint)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE gone (key BLOB PRIMARY KEY, signer BLOB NOT NULL,"
            " seq INTEGER NOT NULL, until_ms INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO gone VALUES (?, ?, 5, ?)", (key, alice.fingerprint, NOW + HOUR_MS))
        db.commit()
    store = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS)
    reopened = RecordFile(path)
    reopened.load_into(store, NOW)
    reopened.close()
    gone = store.gone(key)
    assert gone is not None and (gone.seq, gone.source) == (5, "")
    assert gone_rows(path) == {key: ""}
