"""Safety numbers, link codes and rotation statements (no network)."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.errors import VerificationError
from dna_core.overlay.records import RecordStore, record_key
from dna_core.wire.gen.dna.v1 import records_pb2
from dna_peer.keyserver import ROTATION, now_ms, rotation_record, safety_number
from dna_peer.link import LinkError, link_identity, new_code


def test_safety_number_is_the_same_on_both_sides(alice: Identity, bob: Identity) -> None:
    number = safety_number(alice.fingerprint, bob.fingerprint)
    assert number == safety_number(bob.fingerprint, alice.fingerprint)
    groups = number.split()
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert number != safety_number(alice.fingerprint, Identity.generate().fingerprint)


def test_a_link_code_derives_one_throwaway_identity() -> None:
    code = new_code()
    assert len(code) == 19 and code.count("-") == 3
    same = link_identity(code.lower().replace("-", " "))
    assert same.fingerprint == link_identity(code).fingerprint
    assert link_identity(new_code()).fingerprint != same.fingerprint
    with pytest.raises(LinkError):
        link_identity("ABCD-EFGH")


def test_only_the_old_key_can_state_a_rotation(alice: Identity, bob: Identity) -> None:
    store = RecordStore()
    new_alice = Identity.generate()
    assert store.put(rotation_record(alice, new_alice, reason="lost phone"), now_ms()).changed
    # bob signs a statement that alice's key moved to his: refused, and nothing changes
    statement = records_pb2.KeyRotation(old_fingerprint=alice.fingerprint,
                                        new_keys=bob.public.to_proto())  # fmt: skip
    key = record_key(ROTATION, alice.fingerprint)
    forged = sign_record(bob, kind=ROTATION, key=key, seq=now_ms() + 1, now_ms=now_ms(),
                         ttl_ms=60_000, payload=statement.SerializeToString())  # fmt: skip
    with pytest.raises(VerificationError):
        store.put(forged, now_ms())
    held = store.get(key, now_ms())
    assert held is not None and held.signer == alice.public
