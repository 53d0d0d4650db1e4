"""Presence records alone: what a contact, a stranger and a storage node can read, and
the forged, misplaced and stale records a reader refuses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from dna_core.crypto import Identity, PublicKeySet, sign_record
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.overlay import identity_proof
from dna_core.wire import records_pb2
from dna_peer.cache import Cache, Contact, Message
from dna_peer.direct.link import IceConfig
from dna_peer.direct.service import DirectService
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


def test_the_record_is_sealed_to_contacts_written_to_never_to_someone_who_only_wrote(
    tmp_path: Path, alice: Identity, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record says where the device is. It was sealed to the contacts of the newest
    conversations, received messages included, so anyone who wrote (a stranger, pinned on
    first contact) got this device's addresses at its next refresh. Now: the contacts
    written to most recently, then the others this identity added (by name or by
    fingerprint: `Contact.chosen`); never a stranger. And no stranger's keys are even
    decoded: every refresh decoded every contact's (0.32 s for 10,000 strangers pinned,
    which anyone can make, on the event loop every refresh)."""

    @dataclass
    class Owner:
        cache: Cache

    cache = Cache.open(tmp_path / "cache.db", os.urandom(32))
    me = alice.fingerprint

    def pin(keys: PublicKeySet, name: str | None, *, chosen: bool = False) -> None:
        cache.pin(Contact(keys.fingerprint, keys, name, False, NOW, keys.fingerprint,
                          chosen=chosen))  # fmt: skip

    def message(peer: bytes, *, outgoing: bool, at: int) -> None:
        sender, recipient = (me, peer) if outgoing else (peer, me)
        cache.add_message(Message(os.urandom(16), peer, sender, recipient, at, "hi", outgoing))

    pin(bob.public, "bob", chosen=True)  # added by name, never written to
    by_fingerprint = Identity.generate().public
    pin(by_fingerprint, None, chosen=True)  # added by fingerprint, never written to
    written = [Identity.generate().public for _ in range(2)]
    for n, keys in enumerate(written):
        pin(keys, None)  # a stranger who wrote first, then written to
        message(keys.fingerprint, outgoing=True, at=NOW + n)
    strangers = [Identity.generate().public for _ in range(MAX_SEALED_CONTACTS)]
    for keys in strangers:
        pin(keys, None)
        message(keys.fingerprint, outgoing=False, at=NOW + 100)  # the newest: they wrote
    service = DirectService(Owner(cache), IceConfig(), deliver=None)  # type: ignore[arg-type]
    decoded: list[bytes] = []
    decode = PublicKeySet.decode

    def counted(raw: bytes) -> PublicKeySet:
        decoded.append(raw)
        return decode(raw)

    monkeypatch.setattr(PublicKeySet, "decode", counted)
    sealed = service._sealed_to()
    assert len(decoded) == 4  # bob, by_fingerprint and the two written to: no stranger
    assert sealed[:2] == [written[1], written[0]]
    assert sorted(k.fingerprint for k in sealed[2:]) == sorted(
        [bob.fingerprint, by_fingerprint.fingerprint]
    )


def test_a_cache_from_before_chosen_contacts_keeps_its_named_and_verified_ones(
    tmp_path: Path, bob: Identity
) -> None:
    """Schema 1 had no `chosen`: opening such a cache adds it, set for the contacts named
    or verified (a contact added by fingerprint alone is chosen by adding it again)."""
    key, path = os.urandom(32), tmp_path / "cache.db"
    cache = Cache.open(path, key)
    others = [Identity.generate().public for _ in range(2)]
    for keys, name in ((bob.public, "bob"), (others[0], None), (others[1], None)):
        cache.pin(Contact(keys.fingerprint, keys, name, False, NOW, keys.fingerprint))
    cache.set_verified(others[1].fingerprint, True)
    cache._db.execute("ALTER TABLE contacts DROP COLUMN chosen")  # as schema 1 made it
    cache._db.execute("PRAGMA user_version = 1")
    cache.close()
    again = Cache.open(path, key)
    chosen = {c.fingerprint: c.chosen for c in again.contacts()}
    assert chosen == {bob.fingerprint: True, others[0].fingerprint: False,
                      others[1].fingerprint: True}  # fmt: skip
    again.choose(others[0].fingerprint)
    assert again.contact(others[0].fingerprint).chosen  # type: ignore[union-attr]
    cache.close()
