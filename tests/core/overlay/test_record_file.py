"""The record file: what a node reloads after a restart is verified again (issue 11 item 2)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.errors import DnaError
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


def identity_rec(who: Identity, ttl: int = HOUR_MS) -> tuple[bytes, bytes]:
    key = record_key(IDENTITY, who.fingerprint)
    payload = identity_payload(who.fingerprint, "x", pow_bits=BITS, now_ms=NOW)
    return key, sign_record(who, kind=IDENTITY, key=key, seq=1, now_ms=NOW, ttl_ms=ttl,
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


def test_a_write_that_fails_is_logged_once_and_the_store_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write the file refuses (SQLite's own refusal: the connection made read-only, as a
    full disk or an I/O error would refuse it) no longer fails the store that caused it,
    after the store took the record, nor ends the node's upkeep: the record is held and
    served, the failure logged once for the run of them, the recovery once."""
    caplog.set_level(logging.INFO, "dna.overlay")
    path = tmp_path / "records.sqlite3"
    journal = RecordFile(path)
    service = OverlayService(
        store=RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS),
        closest=lambda key, k: [], local=_unused, journal=journal, clock=lambda: NOW,
    )  # fmt: skip
    journal._db.execute("PRAGMA query_only = ON")  # every write refused from here on
    stored = []
    for who in (Identity.generate(), Identity.generate()):
        key, raw = identity_rec(who)
        request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(raw))
        assert service.store_one(request, "192.0.2.1").stored_seq == 1
        stored.append(key)
    journal.delete(stored[:1])  # upkeep's expiry: refused too, and not raised
    assert all(service.store.get(key, NOW) is not None for key in stored)
    assert journal.write_failures == 3 and rows(path) == 0
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "a write failed" in errors[0].getMessage()

    journal._db.execute("PRAGMA query_only = OFF")  # the disk has room again
    key, raw = identity_rec(Identity.generate())
    journal.save(raw, key, "192.0.2.1", NOW + HOUR_MS)
    assert rows(path) == 1 and "writes succeed again" in caplog.records[-1].getMessage()
    journal.close()


def _unused() -> Contact:
    raise AssertionError("not asked for in these tests")
