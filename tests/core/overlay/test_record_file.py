"""The record file: what a node reloads after a restart is verified again (issue 11 item 2)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from dna_core.crypto import Identity, sign_record
from dna_core.overlay.aio.record_file import RecordFile
from dna_core.overlay.records import RecordStore, identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2

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
