"""Presence records alone: what a contact, a stranger and a storage node can read, and
the forged, misplaced and stale records a reader refuses."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.overlay import identity_proof
from dna_core.wire import records_pb2
from dna_peer.presence import (
    MAX_SEALED_CONTACTS,
    PRESENCE,
    PRESENCE_TTL_MS,
    Reach,
    presence_key,
    presence_record,
    read_presence,
)

NOW = 1_800_000_000_000
HOST = "candidate:1 1 udp 2130706431 10.77.1.1 40000 typ host"
REACH = Reach(b"d" * 16, "ufra", "p" * 22, "call", "q" * 22, (HOST,))


def test_the_reach_opens_for_a_contact_only(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    raw = presence_record(alice, [bob.public], REACH, now_ms=NOW)
    seen_by_bob = read_presence(raw, alice.public, bob, now_ms=NOW)
    assert seen_by_bob.online and seen_by_bob.reach == REACH
    seen_by_carol = read_presence(raw, alice.public, carol, now_ms=NOW)  # not a contact
    assert seen_by_carol.online and seen_by_carol.reach is None
    assert b"10.77.1.1" not in raw and b"ufra" not in raw  # a storage node learns nothing


def test_a_withdrawn_record_says_offline(alice: Identity, bob: Identity) -> None:
    raw = presence_record(alice, [bob.public], None, now_ms=NOW)
    presence = read_presence(raw, alice.public, bob, now_ms=NOW)
    assert not presence.online and presence.reach is None


def test_a_record_signed_by_another_key_is_refused_as_forged(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    """carol signs a record under alice's presence key (no overlay node would store it,
    but a dishonest one could hand it out): bob, who pinned alice, refuses it."""
    payload = records_pb2.PresenceRecord(
        status=records_pb2.PRESENCE_STATUS_ONLINE, last_seen_ms=NOW,
        pow=identity_proof(carol.fingerprint, now_ms=NOW),
    ).SerializeToString()  # fmt: skip
    forged = sign_record(carol, kind=PRESENCE, key=presence_key(alice.fingerprint), seq=NOW,
                         now_ms=NOW, ttl_ms=PRESENCE_TTL_MS, payload=payload)  # fmt: skip
    with pytest.raises(VerificationError, match="forged"):
        read_presence(forged, alice.public, bob, now_ms=NOW)
    carols_own = presence_record(carol, [bob.public], REACH, now_ms=NOW)
    with pytest.raises(VerificationError, match="not a presence record of this contact"):
        read_presence(carols_own, alice.public, bob, now_ms=NOW)


def test_stale_records_are_refused(alice: Identity, bob: Identity) -> None:
    raw = presence_record(alice, [bob.public], REACH, now_ms=NOW)
    with pytest.raises(ExpiredError, match="expired"):
        read_presence(raw, alice.public, bob, now_ms=NOW + PRESENCE_TTL_MS)
    payload = records_pb2.PresenceRecord(
        status=records_pb2.PRESENCE_STATUS_ONLINE, last_seen_ms=NOW,
        pow=identity_proof(alice.fingerprint, now_ms=NOW),
    ).SerializeToString()  # fmt: skip
    hour_long = sign_record(alice, kind=PRESENCE, key=presence_key(alice.fingerprint), seq=NOW,
                            now_ms=NOW, ttl_ms=3_600_000, payload=payload)  # fmt: skip
    with pytest.raises(ExpiredError, match="stale"):
        read_presence(hour_long, alice.public, bob, now_ms=NOW)


def test_a_record_seals_to_a_bounded_number_of_contacts(alice: Identity, bob: Identity) -> None:
    with pytest.raises(MalformedError, match="at most"):
        presence_record(alice, [bob.public] * (MAX_SEALED_CONTACTS + 1), REACH, now_ms=NOW)
    full = presence_record(alice, [bob.public] * MAX_SEALED_CONTACTS, REACH, now_ms=NOW)
    assert read_presence(full, alice.public, bob, now_ms=NOW).reach == REACH
