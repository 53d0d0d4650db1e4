"""Record store policy (dna_core.overlay.records): what a node accepts, keeps, replaces,
expires and hands back for republishing; every refusal raises the documented
ProtocolError subclass and leaves the store exactly as it was.

Records are really signed (seeded identities alice, bob, carol); time is fixed.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pytest
from dna_core.crypto import Identity, open_record, pow, sign_record, signature
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import (
    CapacityError,
    ConflictError,
    ExpiredError,
    MalformedError,
    ProtocolError,
    VerificationError,
)
from dna_core.overlay.aio.records_rpc import ChannelPool, OverlayService, RecordClient
from dna_core.overlay.contact import Contact, Endpoint, source_groups
from dna_core.overlay.records import (
    HOUR_MS,
    MAX_PRESENCE_TTL_MS,
    MAX_ROTATION_TTL_MS,
    MAX_SILENCE,
    MAX_TTL_MS,
    NAME_MOVE_DOMAIN,
    REPUBLISH_JITTER,
    REPUBLISH_PACE,
    ContestedError,
    Gone,
    RecordStore,
    RepublishClock,
    StoreResult,
    Verdict,
    identity_payload,
    identity_proof,
    judge_answers,
    name_key,
    name_move_message,
    name_pow_hash,
    normalize_name,
    record_key,
    rotation_accept_message,
    select_best,
)
from dna_core.wire import encode_message
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, records_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

NOW = 1_780_000_000_000
DAY_MS = 24 * HOUR_MS
BITS = 4  # name proof of work, kept small for speed
IDENTITY = common_pb2.RECORD_KIND_IDENTITY
PRESENCE = common_pb2.RECORD_KIND_PRESENCE
ROTATION = common_pb2.RECORD_KIND_KEY_ROTATION
NAME = common_pb2.RECORD_KIND_NAME_CLAIM


class NoLag(random.Random):
    """Republish clocks without their random lag: due exactly an interval on."""

    def random(self) -> float:
        return 0.0


def store(*, max_records: int = 20_000, max_bytes: int = 64 << 20) -> RecordStore:
    return RecordStore(
        name_pow_bits=BITS, identity_pow_bits=BITS, max_records=max_records,
        max_bytes=max_bytes, rng=NoLag(),
    )  # fmt: skip


# -- record builders -------------------------------------------------------------------


def identity_rec(
    who: Identity,
    *,
    seq: int = 1,
    at: int = NOW,
    ttl: int = DAY_MS,
    key: bytes | None = None,
    display: str = "someone",
) -> bytes:
    payload = identity_payload(who.fingerprint, display, pow_bits=BITS, now_ms=at)
    key = record_key(IDENTITY, who.fingerprint) if key is None else key
    return sign_record(who, kind=IDENTITY, key=key, seq=seq, now_ms=at, ttl_ms=ttl, payload=payload)


def presence_rec(
    who: Identity,
    *,
    seq: int = 1,
    at: int = NOW,
    ttl: int = HOUR_MS,
    key: bytes | None = None,
    padding: int = 0,
) -> bytes:
    msg = records_pb2.PresenceRecord(
        status=records_pb2.PRESENCE_STATUS_ONLINE,
        last_seen_ms=at,
        sealed_candidates=[b"c" * padding],
        pow=identity_proof(who.fingerprint, pow_bits=BITS, now_ms=at),
    )
    key = record_key(PRESENCE, who.fingerprint) if key is None else key
    return sign_record(
        who, kind=PRESENCE, key=key, seq=seq, now_ms=at, ttl_ms=ttl, payload=encode_message(msg)
    )


def solve(name: str, fingerprint: bytes, *, at: int = NOW, bits: int = BITS) -> pow.Proof:
    proof, _ = pow.solve(name_pow_hash(name, fingerprint), bits, now_ms=at)
    return proof


def failing_proof(name: str, fingerprint: bytes, proof: pow.Proof) -> pow.Proof:
    """``proof`` with the nonce moved until it no longer meets its difficulty for this claim."""
    for delta in range(1, 10_000):
        candidate = pow.Proof(proof.difficulty, proof.timestamp_ms, proof.nonce + delta)
        try:
            pow.verify(
                candidate, name_pow_hash(name, fingerprint), required=0, now_ms=NOW,
                max_age_ms=MAX_TTL_MS,
            )  # fmt: skip
        except VerificationError:
            return candidate
    raise AssertionError("every nonce met the difficulty")


def proof_not_for(name: str, fingerprint: bytes, make: Callable[[], pow.Proof]) -> pow.Proof:
    """A proof from ``make`` that does not happen to meet its difficulty for this claim
    too (a proof for other data passes with probability 2^-bits)."""
    for _ in range(100):
        proof = make()
        try:
            pow.verify(proof, name_pow_hash(name, fingerprint), required=0, now_ms=NOW)
        except VerificationError:
            return proof
    raise AssertionError("every proof also fit this claim")


def name_rec(
    who: Identity,
    name: str,
    *,
    seq: int = 1,
    at: int = NOW,
    ttl: int = DAY_MS,
    key: bytes | None = None,
    claimed_name: str | None = None,
    fingerprint: bytes | None = None,
    proof: pow.Proof | None = None,
) -> bytes:
    fingerprint = who.fingerprint if fingerprint is None else fingerprint
    claimed = name if claimed_name is None else claimed_name
    proof = solve(claimed, fingerprint, at=at) if proof is None else proof
    claim = records_pb2.NameClaim(name=claimed, fingerprint=fingerprint, pow=proof.to_proto())
    key = name_key(name) if key is None else key
    return sign_record(
        who, kind=NAME, key=key, seq=seq, now_ms=at, ttl_ms=ttl, payload=encode_message(claim)
    )


def rotation_rec(
    old: Identity,
    new: Identity,
    *,
    seq: int = 1,
    at: int = NOW,
    cosigner: Identity | None = None,
    accept: bytes | None = None,
    old_fp: bytes | None = None,
    key: bytes | None = None,
    sig: bytes | None = None,
    ttl: int = DAY_MS,
) -> bytes:
    old_fp = old.fingerprint if old_fp is None else old_fp
    accept = rotation_accept_message(old_fp, new.fingerprint) if accept is None else accept
    if sig is None:
        sig = signature.sign(new if cosigner is None else cosigner, b"rotation-accept", accept)
    rot = records_pb2.KeyRotation(
        old_fingerprint=old_fp,
        new_keys=new.public.to_proto(),
        effective_ms=at,
        new_key_signature=sig,
        reason="device lost",
        pow=identity_proof(old.fingerprint, pow_bits=BITS, now_ms=at),
    )
    key = record_key(ROTATION, old.fingerprint) if key is None else key
    return sign_record(
        old, kind=ROTATION, key=key, seq=seq, now_ms=at, ttl_ms=ttl, payload=encode_message(rot)
    )


# -- the no-change check -----------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    size: int
    bytes_held: int
    held: tuple[bytes | None, ...]


def snapshot(s: RecordStore, keys: Iterable[bytes], now: int = NOW) -> Snapshot:
    held = tuple(r.raw if (r := s.get(k, now)) else None for k in keys)
    return Snapshot(len(s), s.bytes_held, held)


def refused(
    s: RecordStore,
    data: bytes,
    error: type[ProtocolError],
    keys: Iterable[bytes],
    now: int = NOW,
) -> ProtocolError:
    keys = list(keys)
    before = snapshot(s, keys, now)
    with pytest.raises(ProtocolError) as info:
        s.put(data, now)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value.reason}"
    assert info.value.reason
    assert snapshot(s, keys, now) == before
    return info.value


def all_keys(*who: Identity, names: Iterable[str] = ("alice", "bob")) -> list[bytes]:
    keys = [record_key(kind, w.fingerprint) for w in who for kind in (IDENTITY, PRESENCE, ROTATION)]
    return keys + [name_key(n) for n in names]


# -- where records live --------------------------------------------------------------------


def test_identity_bound_records_live_under_their_derived_key(
    alice: Identity, carol: Identity
) -> None:
    s = store()
    for kind, data in (
        (IDENTITY, identity_rec(alice)),
        (PRESENCE, presence_rec(alice)),
        (ROTATION, rotation_rec(alice, carol)),
    ):
        assert s.put(data, NOW) == StoreResult(1, changed=True)
        held = s.get(record_key(kind, alice.fingerprint), NOW)
        assert held is not None and held.raw == data
    assert len(s) == 3
    assert s.bytes_held == sum(
        len(r.raw) for k in all_keys(alice) if (r := s.get(k, NOW)) is not None
    )
    assert len({record_key(k, alice.fingerprint) for k in (IDENTITY, PRESENCE, ROTATION)}) == 3


@pytest.mark.parametrize("kind", [IDENTITY, PRESENCE])
@pytest.mark.parametrize("where", ["other identity", "other kind", "name key", "arbitrary"])
def test_identity_bound_records_elsewhere_are_refused(
    alice: Identity, bob: Identity, kind: int, where: str
) -> None:
    s = store()
    s.put(identity_rec(bob), NOW)
    key = {
        "other identity": record_key(kind, bob.fingerprint),
        "other kind": record_key(PRESENCE if kind == IDENTITY else IDENTITY, alice.fingerprint),
        "name key": name_key("alice"),
        "arbitrary": bytes(32),
    }[where]
    build = identity_rec if kind == IDENTITY else presence_rec
    refused(s, build(alice, key=key), VerificationError, all_keys(alice, bob))


def test_rotation_under_another_identity_key_is_refused(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    s = store()
    refused(
        s,
        rotation_rec(alice, carol, key=record_key(ROTATION, bob.fingerprint)),
        VerificationError,
        all_keys(alice, bob),
    )


# -- lifetimes -------------------------------------------------------------------------------


def test_presence_lives_at_most_an_hour(alice: Identity) -> None:
    s = store()
    refused(s, presence_rec(alice, ttl=MAX_PRESENCE_TTL_MS + 1), MalformedError, all_keys(alice))
    refused(s, presence_rec(alice, ttl=2 * HOUR_MS), MalformedError, all_keys(alice))
    assert s.put(presence_rec(alice, ttl=MAX_PRESENCE_TTL_MS), NOW).changed


def test_other_records_live_at_most_a_year(alice: Identity) -> None:
    s = store()
    refused(s, identity_rec(alice, ttl=MAX_TTL_MS + 1), MalformedError, all_keys(alice))
    refused(s, name_rec(alice, "alice", ttl=MAX_TTL_MS + 1), MalformedError, all_keys(alice))
    assert s.put(identity_rec(alice, ttl=MAX_TTL_MS), NOW).changed
    assert s.put(name_rec(alice, "alice", ttl=MAX_TTL_MS), NOW).changed


def test_expired_records_vanish(alice: Identity, bob: Identity) -> None:
    s = store()
    short = presence_rec(alice, ttl=60_000)
    long = identity_rec(bob)
    s.put(short, NOW)
    s.put(long, NOW)
    key = record_key(PRESENCE, alice.fingerprint)
    assert s.get(key, NOW + 59_999) is not None
    assert s.get(key, NOW + 60_000) is None  # past expiry, even before expire() ran
    assert len(s) == 2
    assert s.expire(NOW + 59_999) == 0
    assert s.expire(NOW + 60_000) == 1
    assert len(s) == 1 and s.bytes_held == len(long)
    assert s.get(key, NOW) is None  # really gone, whatever time is asked about
    assert s.expire(NOW + 60_000) == 0
    assert s.expire(NOW + DAY_MS) == 1
    assert len(s) == 0 and s.bytes_held == 0


def test_an_expired_record_is_refused(alice: Identity) -> None:
    s = store()
    refused(s, presence_rec(alice, ttl=60_000), ExpiredError, all_keys(alice), now=NOW + 60_000)


def test_a_tampered_record_is_refused(alice: Identity) -> None:
    s = store()
    data = bytearray(identity_rec(alice, display="before"))
    data[data.index(b"before")] ^= 1
    refused(s, bytes(data), VerificationError, all_keys(alice))
    refused(s, b"\xff" * 10, MalformedError, all_keys(alice))


# -- name claims -----------------------------------------------------------------------------


def test_valid_name_claim_is_accepted(alice: Identity) -> None:
    s = store()
    data = name_rec(alice, "alice.w-1_x")
    assert s.put(data, NOW) == StoreResult(1, changed=True)
    held = s.get(name_key("Alice.W-1_X"), NOW)  # looked up by any spelling of the name
    assert held is not None and held.raw == data and held.body.kind == NAME


def test_name_normalization() -> None:
    assert normalize_name("\uff21\uff2c\uff29\uff23\uff25") == "alice"  # fullwidth, NFKC
    assert normalize_name("Straße") == "strasse"  # casefold
    assert name_key("Alice") == name_key("alice") != name_key("alice2")
    for bad in ("ab", "a" * 33, "al ice", "alice!", "", "ali\u200bce"):
        with pytest.raises(MalformedError):
            normalize_name(bad)


def _garbage_claim(alice: Identity, bob: Identity) -> bytes:
    return sign_record(
        alice, kind=NAME, key=name_key("alice"), seq=1, now_ms=NOW, ttl_ms=DAY_MS,
        payload=b"\xff\xff",
    )  # fmt: skip


def _good(alice: Identity) -> pow.Proof:
    return solve("alice", alice.fingerprint)


Claim = Callable[[Identity, Identity], bytes]  # (alice, bob) -> alice's bad claim to "alice"
BAD_CLAIMS: dict[str, tuple[Claim, type[ProtocolError]]] = {
    "not normalized": (lambda a, b: name_rec(a, "alice", claimed_name="Alice"), MalformedError),
    "too short": (
        lambda a, b: name_rec(a, "alice", claimed_name="al", proof=_good(a)),
        MalformedError,
    ),
    "bad character": (
        lambda a, b: name_rec(a, "alice", claimed_name="alice!", proof=_good(a)),
        MalformedError,
    ),
    "key of another name": (
        lambda a, b: name_rec(a, "alice", key=name_key("alicia")),
        VerificationError,
    ),
    "claims another fingerprint": (
        lambda a, b: name_rec(a, "alice", fingerprint=b.fingerprint),
        VerificationError,
    ),
    "difficulty below required": (
        lambda a, b: name_rec(a, "alice", proof=solve("alice", a.fingerprint, bits=BITS - 2)),
        VerificationError,
    ),
    "hash misses its difficulty": (
        lambda a, b: name_rec(a, "alice", proof=failing_proof("alice", a.fingerprint, _good(a))),
        VerificationError,
    ),
    "proof for another fingerprint": (
        lambda a, b: name_rec(
            a,
            "alice",
            proof=proof_not_for("alice", a.fingerprint, lambda: solve("alice", b.fingerprint)),
        ),
        VerificationError,
    ),
    "proof for another name": (
        lambda a, b: name_rec(
            a,
            "alice",
            proof=proof_not_for("alice", a.fingerprint, lambda: solve("alicia", a.fingerprint)),
        ),
        VerificationError,
    ),
    "proof too old": (
        lambda a, b: name_rec(
            a, "alice", proof=solve("alice", a.fingerprint, at=NOW - MAX_TTL_MS - 1)
        ),
        ExpiredError,
    ),
    "proof from the future": (
        lambda a, b: name_rec(a, "alice", proof=solve("alice", a.fingerprint, at=NOW + 61_000)),
        ExpiredError,
    ),
    "difficulty over 64": (
        lambda a, b: name_rec(a, "alice", proof=pow.Proof(65, NOW, 0)),
        MalformedError,
    ),
    "payload not a claim": (_garbage_claim, MalformedError),
}


@pytest.mark.parametrize("case", list(BAD_CLAIMS))
def test_bad_name_claims_are_refused(alice: Identity, bob: Identity, case: str) -> None:
    make, error = BAD_CLAIMS[case]
    refused(store(), make(alice, bob), error, all_keys(alice, bob))


def test_a_held_name_cannot_be_claimed_by_another_identity(alice: Identity, bob: Identity) -> None:
    s = store()
    first = name_rec(alice, "alice")
    s.put(first, NOW)
    for seq in (1, 2, 1000):
        refused(s, name_rec(bob, "alice", seq=seq, at=NOW + 1), ConflictError, all_keys(alice, bob))
    assert s.put(name_rec(alice, "alice", seq=2), NOW).changed  # the owner updates it
    held = s.get(name_key("alice"), NOW)
    assert held is not None and held.body.signer_fingerprint == alice.fingerprint


def test_an_expired_claim_can_be_taken_by_anyone(alice: Identity, bob: Identity) -> None:
    s = store()
    s.put(name_rec(alice, "alice", seq=9, ttl=HOUR_MS), NOW)
    later = NOW + HOUR_MS
    taken = name_rec(bob, "alice", seq=1, at=later)
    assert s.put(taken, later) == StoreResult(1, changed=True)
    held = s.get(name_key("alice"), later)
    assert held is not None and held.raw == taken
    assert len(s) == 1 and s.bytes_held == len(taken)
    # and now alice is the one refused
    refused(s, name_rec(alice, "alice", seq=10, at=later), ConflictError, all_keys(alice), later)


# -- sequence numbers --------------------------------------------------------------------------


def test_sequence_rules(alice: Identity) -> None:
    s = store()
    keys = all_keys(alice)
    key = record_key(IDENTITY, alice.fingerprint)
    v5 = identity_rec(alice, seq=5, display="five")
    assert s.put(v5, NOW) == StoreResult(5, changed=True)
    assert s.put(v5, NOW + 1) == StoreResult(5, changed=False)  # the same bytes again
    assert len(s) == 1 and s.bytes_held == len(v5)
    refused(s, identity_rec(alice, seq=4), ConflictError, keys)  # rollback
    refused(s, identity_rec(alice, seq=0), ConflictError, keys)
    refused(s, identity_rec(alice, seq=5, display="other five"), ConflictError, keys)
    refused(s, identity_rec(alice, seq=5, display="five", at=NOW + 1), ConflictError, keys)
    v6 = identity_rec(alice, seq=6, display="six, a longer display name")
    assert s.put(v6, NOW) == StoreResult(6, changed=True)
    held = s.get(key, NOW)
    assert held is not None and held.raw == v6
    assert len(s) == 1 and s.bytes_held == len(v6)
    v100 = identity_rec(alice, seq=100)
    assert s.put(v100, NOW).changed and s.bytes_held == len(v100)


def test_a_deleted_record_still_refuses_older_versions_until_they_must_have_expired(
    alice: Identity, bob: Identity
) -> None:
    """Once a held record had expired (deleted or not yet), a replay of an older version
    signed earlier with a longer life (a lower seq, still unexpired) was taken: a rollback.
    Now the store remembers the signer and seq of what it deleted until the kind's longest
    lifetime after the record's creation, when every older version has expired too.
    Checked to fail without the fix (the older version was stored)."""
    s = store()
    keys = all_keys(alice, bob)
    key = record_key(IDENTITY, alice.fingerprint)
    s.put(identity_rec(alice, seq=5, ttl=HOUR_MS), NOW)
    older = identity_rec(alice, seq=3, at=NOW - HOUR_MS, ttl=2 * DAY_MS)
    later = NOW + 2 * HOUR_MS
    # expired, not yet deleted: already refused, with the live check's reason
    assert "lower than held 5" in refused(s, older, ConflictError, keys, later).reason
    assert s.expire(later) == 1 and len(s) == 0 and s.bytes_held == 0
    assert "lower than held 5" in refused(s, older, ConflictError, keys, later).reason
    assert s.gone(key) is not None and s.gone(key) == Gone(alice.fingerprint, 5, NOW + MAX_TTL_MS)
    # another identity's record does not count against alice's
    assert s.put(identity_rec(bob, seq=1, at=later), later).changed
    # a newer version is taken, as the same seq is (evicted bytes may come back)
    assert s.put(identity_rec(alice, seq=5, at=NOW, ttl=3 * HOUR_MS), later).changed
    # the memory lapses when every older version must have expired: created_ms + 7 days
    s2 = store()
    s2.put(identity_rec(alice, seq=5, ttl=HOUR_MS), NOW)
    s2.expire(NOW + MAX_TTL_MS - 1)
    assert s2.gone(key) is not None
    s2.expire(NOW + MAX_TTL_MS)
    assert s2.gone(key) is None


def test_a_lower_seq_after_a_presence_s_deletion_waits_out_the_hour(alice: Identity) -> None:
    """A presence lives at most an hour: what the store remembers of one lasts that long."""
    s = store()
    s.put(presence_rec(alice, seq=50, ttl=60_000), NOW)
    later = NOW + 60_000
    s.expire(later)
    refused(s, presence_rec(alice, seq=1, at=later), ConflictError, all_keys(alice), later)
    end = NOW + MAX_PRESENCE_TTL_MS
    s.expire(end)
    assert s.put(presence_rec(alice, seq=1, at=end), end) == StoreResult(1, changed=True)


def test_what_the_store_remembers_is_bounded_and_evicted_records_count_too() -> None:
    """At most ``max_gone`` keys (IDs and numbers, no record bytes), the oldest forgotten
    first and counted; a record evicted for room is remembered as an expired one is."""
    who = [Identity.generate() for _ in range(3)]
    s = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=2, rng=NoLag())
    for w in who:
        s.put(identity_rec(w, ttl=HOUR_MS), NOW)
    s.expire(NOW + HOUR_MS)
    keys = [record_key(IDENTITY, w.fingerprint) for w in who]
    assert [s.gone(k) is not None for k in keys] == [False, True, True]
    assert s.gone_evicted == 1 and len(dict(s.gone_items())) == 2

    full = store(max_records=2)
    flooder = [Identity.generate() for _ in range(2)]
    for w in flooder:
        full.put(identity_rec(w, seq=7), NOW, "198.51.100.1")
    result = full.put(identity_rec(who[0]), NOW, "203.0.113.1")
    (victim,) = result.evicted
    gone = full.gone(victim)
    assert gone is not None and gone.seq == 7
    victim_id = next(w for w in flooder if record_key(IDENTITY, w.fingerprint) == victim)
    older = identity_rec(victim_id, seq=6)
    refused(full, older, ConflictError, [victim])


def older_identity(who: Identity, seq: int) -> bytes:
    """A version of ``who``'s identity signed an hour before NOW that lives a day: still
    valid when a later one (created NOW, living an hour) has been deleted."""
    return identity_rec(who, seq=seq, at=NOW - HOUR_MS, ttl=DAY_MS)


def test_a_flood_of_deleted_records_forgets_its_own_memories_not_the_others() -> None:
    """An attacker with many addresses gets many short-lived records of its own deleted (name
    claims here: one signing key, names and keys cost nothing) to push the memory of an
    honest record out, then replays an older version of it. The memory held ``max_gone``
    keys, the oldest forgotten first: the honest memories went, and the replay was taken.
    Now the source holding the most memories loses its own oldest first (by /24; by /32,
    then /48 for IPv6), so the flood forgets only its own. Checked to fail without the
    fix (the oldest-first memory took every replay)."""
    honest = {w: src for w, src in zip(
        [Identity.generate() for _ in range(4)],
        ["203.0.113.1", "192.0.2.1", "2001:db8:1::/64", ""], strict=True,
    )}  # fmt: skip
    s = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=10, rng=NoLag())
    for who, source in honest.items():
        s.put(identity_rec(who, seq=5, ttl=HOUR_MS), NOW, source)
    attacker = Identity.generate()
    at = NOW + HOUR_MS  # the honest records expire first: theirs are the oldest memories
    flood = {  # 30 addresses of one IPv4 /24, and one /48 in the honest IPv6 record's /32
        f"flood{i}": f"198.51.100.{i}" if i % 2 else f"2001:db8:2:{i:x}::/64" for i in range(30)
    }
    for name, source in flood.items():
        s.put(name_rec(attacker, name, at=at, ttl=60_000), at, source)
    later = at + 60_000
    s.expire(later)
    assert s.gone_count == 10 and s.gone_evicted == 24
    for who in honest:
        refused(s, older_identity(who, seq=4), ConflictError, all_keys(who), later)
    # each flooding subnet keeps its newest: /24 198.51.100 and three IPv6 /48s share the rest
    kept = [k for k, _ in s.gone_items() if k not in [record_key(IDENTITY, w.fingerprint)
                                                      for w in honest]]  # fmt: skip
    assert len(kept) == 6 and name_key("flood29") in kept


def test_memories_of_deleted_records_count_where_they_were_stored_from() -> None:
    """A deleted record's memory carries its source (evicted for room, or expired), and the
    fair eviction counts it there: many subnets each keep their share, the fullest loses
    its oldest; the store's counters and `take_forgotten` say what went."""
    s = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS, max_gone=4, rng=NoLag())
    who = [Identity.generate() for _ in range(6)]
    sources = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "192.0.2.1", "203.0.113.4",
               "198.51.100.1"]  # fmt: skip
    for w, source in zip(who, sources, strict=True):
        s.put(identity_rec(w, ttl=HOUR_MS), NOW, source)
    s.expire(NOW + HOUR_MS)
    keys = [record_key(IDENTITY, w.fingerprint) for w in who]
    assert {k: g.source for k, g in s.gone_items()} == {
        keys[2]: "203.0.113.3", keys[3]: "192.0.2.1", keys[4]: "203.0.113.4",
        keys[5]: "198.51.100.1",
    }  # fmt: skip
    assert s.gone_evicted == 2
    # remembered again after being forgotten: no longer one for the file to delete
    s.remember(keys[0], Gone(who[0].fingerprint, 1, NOW + MAX_TTL_MS, ""))
    assert s.gone(keys[2]) is None and s.gone_evicted == 3  # 203.0.113 held the most
    assert s.take_forgotten() == [keys[1], keys[2]] and s.take_forgotten() == []


# -- capacity ----------------------------------------------------------------------------------


def test_record_count_limit(alice: Identity, bob: Identity, carol: Identity) -> None:
    s = store(max_records=2)
    s.put(identity_rec(alice), NOW)
    s.put(identity_rec(bob), NOW)
    keys = all_keys(alice, bob, carol)
    refused(s, identity_rec(carol), CapacityError, keys)
    refused(s, name_rec(alice, "alice"), CapacityError, keys)
    # a newer version of a held record is not a new record
    assert s.put(identity_rec(alice, seq=2), NOW).changed
    assert len(s) == 2


def test_byte_limit(alice: Identity, bob: Identity) -> None:
    first = identity_rec(alice)
    s = store(max_bytes=len(first) + 100)
    s.put(first, NOW)
    refused(s, identity_rec(bob), CapacityError, all_keys(alice, bob))
    assert s.bytes_held == len(first) <= s.max_bytes


def test_replacing_with_a_larger_record_respects_the_byte_limit(alice: Identity) -> None:
    small = presence_rec(alice, seq=1)
    s = store(max_bytes=len(small) + 100)
    s.put(small, NOW)
    big = presence_rec(alice, seq=2, padding=4000)
    keys = all_keys(alice)
    before = snapshot(s, keys)
    with pytest.raises(CapacityError):  # it cannot fit even alone: refused, not swapped in
        s.put(big, NOW)
    assert snapshot(s, keys) == before
    assert s.bytes_held <= s.max_bytes, f"{s.bytes_held} bytes held, cap {s.max_bytes}"


def test_a_full_store_replaces_an_expired_record_in_place(alice: Identity) -> None:
    s = store(max_records=1)
    s.put(presence_rec(alice, seq=1, ttl=60_000), NOW)
    later = NOW + 120_000
    fresh = presence_rec(alice, seq=2, at=later)
    assert s.put(fresh, later) == StoreResult(2, changed=True)  # one record in, one out
    assert len(s) == 1 and s.bytes_held == len(fresh)


def test_a_full_store_evicts_the_biggest_holder_and_never_the_newcomer_s_peers() -> None:
    """Issue 10 defect 4: a flood from one source only ever displaces its own records."""
    flood = [Identity.generate() for _ in range(4)]
    s = store(max_records=4)
    for who in flood:
        assert s.put(identity_rec(who), NOW, "10.0.0.1").changed
    # the flooder is full and holds everything: its next record is refused, nothing moves
    with pytest.raises(CapacityError):
        s.put(identity_rec(Identity.generate()), NOW, "10.0.0.1")
    # someone else gets in by evicting the flooder's oldest record
    alice, bob = Identity.generate(), Identity.generate()
    result = s.put(identity_rec(alice), NOW, "192.0.2.7")
    assert result.changed and result.evicted == (record_key(IDENTITY, flood[0].fingerprint),)
    assert s.put(identity_rec(bob), NOW, "198.51.100.9").changed
    assert len(s) == 4 and s.source_of(record_key(IDENTITY, alice.fingerprint)) == "192.0.2.7"
    # once shares are even (2, 1, 1) nobody with a share as big as its own is displaced
    with pytest.raises(CapacityError):
        s.put(identity_rec(Identity.generate()), NOW, "192.0.2.7")


def _fill(s: RecordStore, sources: Iterable[str], who: Identity) -> None:
    """One name claim of ``who`` from each of ``sources`` (each its own key)."""
    for n, source in enumerate(sources):
        assert s.put(name_rec(who, f"flood-{n}"), NOW, source).changed


def test_one_ipv6_site_filling_the_store_from_many_64s_holds_one_share() -> None:
    """A /48 holds 65,536 /64s: counted per /64 (the rate limiter's key), one site filled
    the store from as many /64s as it has records (20,000 of them at the defaults) and then
    every newcomer was refused, as nobody held two more than it. Records count per /48."""
    flooder, alice = Identity.generate(), Identity.generate()
    s = store(max_records=30)
    _fill(s, (f"2001:db8:1:{n:x}::/64" for n in range(30)), flooder)
    result = s.put(identity_rec(alice), NOW, "2a01:4f8:7::/64")  # another ISP's site
    assert result.changed and result.evicted == (name_key("flood-0"),)  # the flood's oldest
    assert len(s) == 30


def test_one_ipv6_allocation_filling_the_store_from_many_48s_holds_one_share() -> None:
    """A /32 holds 65,536 /48s, so a cap per /48 alone is passed as a cap per /64 was: a
    store filled from 30 /48s of one /32 still takes a newcomer from another /32."""
    flooder, alice = Identity.generate(), Identity.generate()
    s = store(max_records=30)
    _fill(s, (f"2001:db8:{n:x}::/64" for n in range(30)), flooder)
    result = s.put(identity_rec(alice), NOW, "2a01:4f8:7::/64")
    assert result.changed and result.evicted == (name_key("flood-0"),)


def test_a_site_sharing_an_allocation_with_a_flooder_still_gets_in() -> None:
    """Within one /32 the /48s share its place fairly: a flooder's /48 that holds the
    block's records is the one that gives way to its neighbour."""
    flooder, alice = Identity.generate(), Identity.generate()
    s = store(max_records=6)
    _fill(s, ["2001:db8:1::/64"] * 3 + ["2a01:4f8:1::/64", "2a01:4f8:2::/64", "2a01:4f8:3::/64"],
          flooder)  # fmt: skip
    # the /32s hold 3 each: no other block is fuller, so its own block's fullest gives way
    result = s.put(identity_rec(alice), NOW, "2001:db8:2:5::/64")
    assert result.changed and result.evicted == (name_key("flood-0"),)  # 2001:db8:1::/48
    # the flooder's /48 (2 left) holds within one of alice's (1) now: it is not evicted
    with pytest.raises(CapacityError):
        s.put(identity_rec(Identity.generate()), NOW, "2001:db8:2:6::/64")


def test_one_ipv4_24_filling_the_store_from_many_addresses_holds_one_share() -> None:
    flooder, alice = Identity.generate(), Identity.generate()
    s = store(max_records=20)
    _fill(s, (f"198.51.100.{n}" for n in range(20)), flooder)
    result = s.put(identity_rec(alice), NOW, "203.0.113.9")
    assert result.changed and result.evicted == (name_key("flood-0"),)


def test_private_addresses_each_hold_their_own_share() -> None:
    """Private addresses are exempt from subnet caps (`contact.subnet_cap_exempt`): in a
    Kubernetes pod range one /24 is one machine's many nodes, not one party."""
    assert source_groups("10.1.2.3") == ("10.1.2.3", "10.1.2.3")
    assert source_groups("fd00:1:2:3::/64") == ("fd00:1:2:3::/64", "fd00:1:2:3::/64")
    assert source_groups("127.0.0.1") == ("127.0.0", "127.0.0")
    assert source_groups("127.0.0.1", allow_loopback=True) == ("127.0.0.1", "127.0.0.1")
    assert source_groups("2001:db8:1:2::/64") == ("2001:db8::/32", "2001:db8:1::/48")
    assert source_groups("203.0.113.9") == ("203.0.113", "203.0.113")
    flooder = Identity.generate()
    s = store(max_records=3)
    _fill(s, ["10.0.0.1", "10.0.0.2", "10.0.0.3"], flooder)
    with pytest.raises(CapacityError):  # three sources of one share each: all even
        s.put(identity_rec(Identity.generate()), NOW, "10.0.0.4")


def test_a_repeat_of_held_bytes_is_answered_without_verifying(alice: Identity) -> None:
    s = store()
    data = identity_rec(alice)
    assert s.repeat(data, NOW) is None
    s.put(data, NOW)
    assert s.repeat(data, NOW) == StoreResult(1, changed=False)
    assert s.repeat(data, NOW + DAY_MS) is None  # expired: no longer held


@pytest.mark.parametrize("kind", ["identity", "presence", "rotation"])
def test_identity_bound_records_need_a_proof_of_work(
    kind: str, alice: Identity, carol: Identity
) -> None:
    """Issue 10 defect 4: a fresh identity's records cost 2^bits hashes to store."""
    if kind == "identity":
        payload = encode_message(records_pb2.IdentityRecord(display_name="free"))
    elif kind == "presence":
        payload = encode_message(records_pb2.PresenceRecord(last_seen_ms=NOW))
    else:
        payload = encode_message(records_pb2.KeyRotation(old_fingerprint=alice.fingerprint))
    k = {"identity": IDENTITY, "presence": PRESENCE, "rotation": ROTATION}[kind]
    data = sign_record(alice, kind=k, key=record_key(k, alice.fingerprint), seq=1, now_ms=NOW,
                       ttl_ms=HOUR_MS, payload=payload)  # fmt: skip
    refused(store(), data, VerificationError, all_keys(alice))
    weak = identity_payload(alice.fingerprint, "weak", pow_bits=BITS - 1, now_ms=NOW)
    data = sign_record(alice, kind=IDENTITY, key=record_key(IDENTITY, alice.fingerprint),
                       seq=1, now_ms=NOW, ttl_ms=HOUR_MS, payload=weak)  # fmt: skip
    s = RecordStore(name_pow_bits=BITS, identity_pow_bits=BITS + 8)
    refused(s, data, VerificationError, all_keys(alice))


def test_lifetimes_are_days_not_years(alice: Identity, carol: Identity) -> None:
    s = store()
    refused(s, rotation_rec(alice, carol, ttl=MAX_ROTATION_TTL_MS + 1), MalformedError,
            all_keys(alice))  # fmt: skip
    assert s.put(rotation_rec(alice, carol, ttl=MAX_ROTATION_TTL_MS), NOW).changed
    assert MAX_TTL_MS <= 7 * DAY_MS and MAX_ROTATION_TTL_MS <= 30 * DAY_MS


# -- rotation ----------------------------------------------------------------------------------


def test_cross_signed_rotation_is_accepted(alice: Identity, carol: Identity) -> None:
    s = store()
    data = rotation_rec(alice, carol)
    assert s.put(data, NOW).changed
    held = s.get(record_key(ROTATION, alice.fingerprint), NOW)
    assert held is not None and held.raw == data


@pytest.mark.parametrize(
    "case",
    [
        "accepted by the old key",
        "accepted by a third key",
        "accept message reversed",
        "accept message for another identity",
        "no accept signature",
        "old fingerprint is not the signer",
    ],
)
def test_rotation_without_a_valid_cross_signature_is_refused(
    alice: Identity, bob: Identity, carol: Identity, case: str
) -> None:
    if case == "accepted by the old key":
        data = rotation_rec(alice, carol, cosigner=alice)
    elif case == "accepted by a third key":
        data = rotation_rec(alice, carol, cosigner=bob)
    elif case == "accept message reversed":
        data = rotation_rec(
            alice, carol, accept=rotation_accept_message(carol.fingerprint, alice.fingerprint)
        )
    elif case == "accept message for another identity":
        data = rotation_rec(
            alice, carol, accept=rotation_accept_message(bob.fingerprint, carol.fingerprint)
        )
    elif case == "no accept signature":
        data = rotation_rec(alice, carol, sig=b"")
    else:
        data = rotation_rec(alice, carol, old_fp=bob.fingerprint)
    refused(store(), data, VerificationError, all_keys(alice, bob, carol))


def test_rotation_with_garbage_new_keys_is_refused(alice: Identity) -> None:
    rot = records_pb2.KeyRotation(
        old_fingerprint=alice.fingerprint,
        new_keys=common_pb2.PublicKeySet(ed25519=b"short"),
        new_key_signature=b"x",
        pow=identity_proof(alice.fingerprint, pow_bits=BITS, now_ms=NOW),
    )
    data = sign_record(
        alice, kind=ROTATION, key=record_key(ROTATION, alice.fingerprint), seq=1, now_ms=NOW,
        ttl_ms=DAY_MS, payload=encode_message(rot),
    )  # fmt: skip
    refused(store(), data, MalformedError, all_keys(alice))


# -- republishing ------------------------------------------------------------------------------


def test_republish_due(alice: Identity, bob: Identity) -> None:
    s = store()
    interval = 10 * 60_000
    a = identity_rec(alice)
    b = presence_rec(bob, ttl=HOUR_MS)
    s.put(a, NOW)
    s.put(b, NOW + 1000)

    def due(at: int) -> list[bytes]:
        return sorted(r.raw for r in s.republish_due(at, interval))

    assert due(NOW + interval - 1) == []
    assert due(NOW + interval) == [a]  # b arrived a second later
    assert due(NOW + interval) == []  # marked
    assert due(NOW + interval + 1000) == [b]
    assert due(NOW + 2 * interval) == [a]
    assert due(NOW + HOUR_MS + 1000) == [a]  # b expired at NOW+1000+1h: not republished
    assert due(NOW + 5 * HOUR_MS) == [a]
    assert len(s) == 2  # republish_due does not expire anything


def name_recs(alice: Identity, count: int) -> list[bytes]:
    return [name_rec(alice, f"name-{i:03}") for i in range(count)]


def loaded_at_once(records: list[bytes]) -> RecordStore:
    """A store that got ``records`` in one moment (a restart loading its file)."""
    s = store()
    for raw in records:
        s.put(raw, NOW)
    return s


def test_records_loaded_at_once_are_republished_over_half_an_interval(alice: Identity) -> None:
    """Each republish is a lookup and R stores: a node that loaded 20,000 records at start
    used to start them all in one tick of its upkeep, an hour later."""
    interval, tick = 10 * 60_000, 60_000
    names = name_recs(alice, 200)
    s = loaded_at_once(names)
    share = REPUBLISH_PACE * 200 * tick // interval  # 40: twice the even share of a tick
    per_tick = [s.republish_due(NOW + interval + t * tick, interval, tick) for t in range(6)]
    assert [len(due) for due in per_tick] == [share] * 5 + [0]
    republished = [r.raw for due in per_tick for r in due]
    assert sorted(republished) == sorted(names)  # each once, all within half an interval
    # and the next round keeps that pace: the longest waiting first
    assert [r.raw for r in s.republish_due(NOW + 2 * interval, interval, tick)] == [
        r.raw for r in per_tick[0]
    ]


def test_holders_restarted_together_spread_their_first_republish(alice: Identity) -> None:
    """The R holders of a record restart at once (an upgrade of every node): without a
    spread, each republished the same records in the same ticks, so no holder's store came
    before the others' to restart their clocks (``repeat``), and every one of the R sent
    every record."""
    interval, tick = 10 * 60_000, 60_000
    records = name_recs(alice, 200)
    holders = [loaded_at_once(records) for _ in range(2)]
    for seed, s in enumerate(holders):
        s.spread_republish(NOW, interval, random.Random(seed))
    first: list[dict[bytes, int]] = [{}, {}]
    for t in range(1, 11):
        for held, s in zip(first, holders, strict=True):
            for r in s.republish_due(NOW + t * tick, interval, tick):
                held.setdefault(r.raw, t)
    assert len(first[0]) == len(first[1]) == 200  # all within the interval
    together = sum(first[0][raw] == first[1][raw] for raw in first[0])
    assert together < 200 * 0.25, together  # ~10% by chance; without the spread 100%


def test_a_repeat_restarts_the_republish_clock(alice: Identity) -> None:
    """Another holder republished it to us: we skip our own republish for an interval."""
    s = store()
    interval = 60_000
    data = identity_rec(alice)
    s.put(data, NOW)
    assert s.repeat(data, NOW + 40_000) is not None
    assert s.republish_due(NOW + interval, interval) == []
    assert [r.raw for r in s.republish_due(NOW + 40_000 + interval, interval)] == [data]
    assert s.repeat(data, NOW + DAY_MS) is None  # expired: nothing held, nothing restarted


def test_only_a_fellow_holders_copy_counts_as_our_republish(alice: Identity) -> None:
    """Anyone could send a holder the bytes it holds (uncharged) every few minutes: that
    stopped its republishing for good, so after churn the record never reached the
    nodes now closest to its key. Only a store from one of the k nodes we know closest
    to the key (a fellow holder, republishing) counts."""
    interval = 60_000
    data = identity_rec(alice)
    key = open_record(data, now_ms=NOW).body.key
    holder = Contact(b"h" * 32, b"k" * 32, (Endpoint("192.0.2.7", 4000),))
    service = OverlayService(
        store=store(), closest=lambda target, k: [holder] if target == key else [],
        local=lambda: holder, clock=lambda: NOW,
    )  # fmt: skip
    service.store.put(data, NOW)
    request = overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(data))
    for at in range(NOW + 10_000, NOW + 5 * interval, 10_000):  # a stranger, every 10 s
        assert service.store_one(request, "198.51.100.9").stored_seq == 1
        assert service._store(data, "198.51.100.9", at).changed is False
    due = service.store.republish_due(NOW + interval, interval)
    assert [r.raw for r in due] == [data]  # republished all the same
    assert service._store(data, "192.0.2.7", NOW + interval + 1).changed is False  # a holder
    assert service.store.republish_due(NOW + 2 * interval, interval) == []
    assert [r.raw for r in service.store.republish_due(NOW + 2 * interval + 1, interval)] == [data]


def holding_with_fellows(data: bytes, *addresses: str) -> OverlayService:
    """A node holding ``data`` (at NOW) that knows ``addresses`` closest to its key."""
    key = open_record(data, now_ms=NOW).body.key
    fellows = [
        Contact(bytes([n]) * 32, b"k" * 32, (Endpoint(ip, 4000),)) for n, ip in enumerate(addresses)
    ]
    service = OverlayService(
        store=store(), closest=lambda target, k: fellows if target == key else [],
        local=lambda: fellows[0], clock=lambda: NOW,
    )  # fmt: skip
    service.store.put(data, NOW)
    return service


def test_one_subnet_cannot_postpone_our_republish_twice_in_a_row(alice: Identity) -> None:
    """IDs ground near a key are among the k closest we know, and the spread hands their
    /24 2 of the 8 replicas, so they have the bytes: sending them just before our
    republish was due, every interval, stopped it for good (dna-sim durability
    --sybils 2 --suppress: 0.0015 durable after 24 h at 30% churn). Checked: fails with
    every fellow holder's copy restarting the clock."""
    interval = 60_000
    gap = int(interval * (1 - REPUBLISH_JITTER)) - 1  # before any clock can be due
    data = identity_rec(alice)
    service = holding_with_fellows(data, "203.0.113.5", "203.0.113.6", "198.51.100.5")
    first = NOW + gap
    assert service._store(data, "203.0.113.5", first).changed is False  # restarts the clock
    assert service.store.republish_due(first + gap, interval) == []
    assert service._store(data, "203.0.113.6", first + gap).changed is False  # same /24
    assert [r.raw for r in service.store.republish_due(first + interval, interval)] == [data]
    # another subnet's copy, and then the first one's again, do postpone it
    at = first + interval
    for source in ("198.51.100.5", "203.0.113.5"):
        at += gap
        assert service._store(data, source, at).changed is False
        assert service.store.republish_due(at + gap, interval) == []


def test_we_republish_within_max_silence_intervals_whatever_copies_come(
    alice: Identity,
) -> None:
    """Fellow holders in two subnets taking turns to send the bytes just before our
    republish is due postpone it only up to MAX_SILENCE intervals after our own last."""
    interval = 60_000
    gap = int(interval * (1 - REPUBLISH_JITTER)) - 1
    data = identity_rec(alice)
    service = holding_with_fellows(data, "203.0.113.5", "198.51.100.5")
    at, turn = NOW, 0
    while at + gap < NOW + MAX_SILENCE * interval:
        at += gap
        assert service.store.republish_due(at - 1, interval) == []
        assert service._store(data, ("203.0.113.5", "198.51.100.5")[turn % 2], at).changed is False
        turn += 1
    assert [r.raw for r in service.store.republish_due(NOW + MAX_SILENCE * interval, interval)] == [
        data
    ]


def test_the_holder_silent_longest_republishes_first() -> None:
    """Honest holders take turns: one that republished itself long ago is due earlier after
    the same copy than one that just did, so the copies rarely come from the same subnet
    twice in a row and the turns come round well within MAX_SILENCE."""
    interval = 3_600_000
    rng = random.Random(1)
    recent = RepublishClock(since_ms=0, own_ms=0, lag=0.5, hurry=0.5)
    silent = RepublishClock(since_ms=0, own_ms=-7 * interval, lag=0.5, hurry=0.5)
    for clock in (recent, silent):
        assert clock.postpone(interval, rng, "192.0.2")
    almost = 2 * interval - interval * REPUBLISH_JITTER // 2
    assert silent.due(almost, interval) and not recent.due(almost, interval)
    assert recent.due(2 * interval, interval)


def test_replacing_a_record_restarts_its_republish_clock(alice: Identity) -> None:
    s = store()
    interval = 60_000
    s.put(identity_rec(alice, seq=1), NOW)
    s.put(identity_rec(alice, seq=2), NOW + 50_000)
    assert s.republish_due(NOW + interval, interval) == []
    assert [r.body.seq for r in s.republish_due(NOW + 50_000 + interval, interval)] == [2]


# -- choosing among answers --------------------------------------------------------------------


def opened(data: bytes) -> VerifiedRecord:
    return open_record(data, now_ms=NOW + 10)


def test_select_best_picks_the_highest_seq(alice: Identity) -> None:
    recs = [opened(identity_rec(alice, seq=s, at=NOW - s)) for s in (3, 9, 1, 7)]
    best = select_best(recs)
    assert best is not None and best.body.seq == 9
    assert select_best(reversed(recs)) == best
    assert select_best([]) is None


def test_select_best_breaks_ties_by_creation_time(alice: Identity) -> None:
    older, newer = (
        opened(identity_rec(alice, seq=4, at=NOW)),
        opened(identity_rec(alice, seq=4, at=NOW + 5)),
    )
    assert select_best([older, newer]) == newer == select_best([newer, older])


def test_select_best_breaks_full_ties_by_lowest_bytes_in_any_order(alice: Identity) -> None:
    """Same seq, same creation time, different content: every replica must pick the same
    one ("then lowest bytes"), whatever order the answers arrived in."""
    recs = [opened(identity_rec(alice, seq=4, display=f"variant {i}")) for i in range(4)]
    lowest = min(recs, key=lambda r: r.raw)
    for order in (recs, recs[::-1], recs[1:] + recs[:1]):
        assert select_best(order) == lowest


def test_readers_drop_answers_no_honest_store_would_hold(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    """One dishonest node must not win `select_best` with a record the store policy
    refuses: a higher sequence number does not make up for a missing proof of work or
    cross-signature."""
    reader = RecordClient(
        ChannelPool(), puzzle_bits=4, name_pow_bits=BITS, identity_pow_bits=BITS, clock=lambda: NOW
    )
    honest = name_rec(alice, "alice")
    no_work = name_rec(
        bob,
        "alice",
        seq=9,
        proof=failing_proof("alice", bob.fingerprint, solve("alice", bob.fingerprint)),
    )
    answers = [reader._verify(raw, name_key("alice")) for raw in (honest, no_work)]
    assert answers[1] is None
    best = select_best(a for a in answers if a is not None)
    assert best is not None and best.raw == honest
    uncrossed = rotation_rec(alice, carol, cosigner=bob)  # not signed by the new key
    assert reader._verify(uncrossed, record_key(ROTATION, alice.fingerprint)) is None
    long_presence = presence_rec(alice, ttl=2 * HOUR_MS)
    assert reader._verify(long_presence, record_key(PRESENCE, alice.fingerprint)) is None
    assert reader._verify(identity_rec(alice), record_key(IDENTITY, alice.fingerprint))


# -- fairness under any sequence of puts (property) --------------------------------------------

_POOL: list[bytes] = []


def _pool() -> list[bytes]:
    """24 valid identity records of different sizes, signed once for every example."""
    if not _POOL:
        for i in range(24):
            who = Identity.generate()
            _POOL.append(identity_rec(who, display="d" * (i * 150)))
    return _POOL


@settings(max_examples=150, deadline=None)
@given(
    puts=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 3)), max_size=40),
    max_records=st.integers(1, 8),
    max_kib=st.integers(6, 40),
)
def test_any_put_sequence_keeps_the_bounds_and_refuses_only_the_biggest_holders(
    puts: list[tuple[int, int]], max_records: int, max_kib: int
) -> None:
    """Invariants: the store never exceeds its bounds; an eviction only ever takes from a
    source holding at least two more than the newcomer (a flood displaces only its own);
    when the record count is what binds, a refused record's source holds within one of
    the biggest share; a refusal changes nothing."""
    s = store(max_records=max_records, max_bytes=max_kib * 1024)
    pool = _pool()
    held_by: dict[bytes, str] = {}
    for index, who in puts:
        source = f"10.0.0.{who}"
        counts = {src: list(held_by.values()).count(src) for src in set(held_by.values())}
        mine = counts.get(source, 0)
        before = (len(s), s.bytes_held)
        try:
            result = s.put(pool[index], NOW, source)
        except CapacityError:
            assert (len(s), s.bytes_held) == before  # a refusal changes nothing
            if s.bytes_held + len(pool[index]) <= s.max_bytes:  # only the count binds
                assert max(counts.values()) <= mine + 1
            continue
        for key in result.evicted:
            assert counts[held_by[key]] >= mine + 2
            del held_by[key]
        if result.record is not None:
            held_by[result.record.body.key] = source
        assert len(s) <= s.max_records and s.bytes_held <= s.max_bytes
        assert len(s) == len(held_by)


_TIERED_SOURCES = [  # two /32s; the first with three /48s, one of them with two /64s
    "2001:db8:1:1::/64", "2001:db8:1:2::/64", "2001:db8:2::/64", "2001:db8:3::/64",
    "2a01:4f8:1::/64", "2a01:4f8:2::/64",
]  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    puts=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 5)), max_size=40),
    max_records=st.integers(1, 8),
    max_kib=st.integers(6, 40),
)
def test_any_put_sequence_evicts_only_from_a_fuller_block_or_a_fuller_site_of_its_own(
    puts: list[tuple[int, int]], max_records: int, max_kib: int
) -> None:
    """The same over IPv6 sources, counted by /32 and /48: an eviction takes from another
    /32 holding at least two more than the newcomer's, or from another /48 of its own /32
    holding at least two more than its own; when the count binds, a refused newcomer's /32
    holds within one of every other, and its /48 within one of every other in its /32."""
    s = store(max_records=max_records, max_bytes=max_kib * 1024)
    pool = _pool()
    held_by: dict[bytes, tuple[str, str]] = {}
    for index, who in puts:
        block, subnet = source_groups(_TIERED_SOURCES[who])
        blocks = Counter(b for b, _ in held_by.values())
        subnets = Counter(n for _, n in held_by.values())
        before = (len(s), s.bytes_held)
        try:
            result = s.put(pool[index], NOW, _TIERED_SOURCES[who])
        except CapacityError:
            assert (len(s), s.bytes_held) == before
            if s.bytes_held + len(pool[index]) <= s.max_bytes:  # only the count binds
                assert all(c <= blocks[block] + 1 for b, c in blocks.items() if b != block)
                assert all(c <= subnets[subnet] + 1 for (b, n), c in _by_pair(held_by).items()
                           if b == block and n != subnet)  # fmt: skip
            continue
        for key in result.evicted:
            their_block, their_subnet = held_by.pop(key)
            if their_block != block:
                assert blocks[their_block] >= blocks[block] + 2
            else:
                assert their_subnet != subnet and subnets[their_subnet] >= subnets[subnet] + 2
            blocks[their_block] -= 1
            subnets[their_subnet] -= 1
        if result.record is not None:
            held_by[result.record.body.key] = (block, subnet)
        assert len(s) <= s.max_records and s.bytes_held <= s.max_bytes
        assert len(s) == len(held_by)


def _by_pair(held_by: dict[bytes, tuple[str, str]]) -> Counter[tuple[str, str]]:
    return Counter(held_by.values())


# -- a name moving to the holder's new keys (key rotation) ---------------------------------


def moved_claim(new: Identity, name: str, signed_by: Identity, *, seq: int = 2) -> bytes:
    """``new``'s claim of ``name``, carrying ``signed_by``'s signature moving it to ``new``."""
    proof = solve(name, new.fingerprint, at=NOW + 1)
    moved_by = signature.sign(signed_by, NAME_MOVE_DOMAIN, name_move_message(name, new.fingerprint))
    claim = records_pb2.NameClaim(name=name, fingerprint=new.fingerprint, pow=proof.to_proto(),
                                  moved_by=moved_by)  # fmt: skip
    return sign_record(new, kind=NAME, key=name_key(name), seq=seq, now_ms=NOW + 1,
                       ttl_ms=DAY_MS, payload=encode_message(claim))  # fmt: skip


def test_a_name_moves_to_new_keys_signed_over_by_its_holder(alice: Identity, bob: Identity) -> None:
    s = store()
    s.put(name_rec(alice, "alice"), NOW)
    new_alice = Identity.generate()
    s.put(moved_claim(new_alice, "alice", alice), NOW + 1)
    held = s.get(name_key("alice"), NOW + 1)
    assert held is not None and held.signer.fingerprint == new_alice.fingerprint


def test_a_name_move_not_signed_by_its_holder_is_refused(alice: Identity, bob: Identity) -> None:
    s = store()
    s.put(name_rec(alice, "alice"), NOW)
    keys = all_keys(alice, bob)
    refused(s, moved_claim(bob, "alice", bob), VerificationError, keys, NOW + 1)
    mallory = Identity.generate()
    refused(s, moved_claim(mallory, "alice", bob), VerificationError, keys, NOW + 1)
    refused(s, moved_claim(bob, "alice", alice, seq=1), ConflictError, keys, NOW + 1)


def test_readers_believe_a_name_by_its_holders_not_by_the_highest_seq(
    alice: Identity, bob: Identity, carol: Identity
) -> None:
    """Two identities' claims of one name (one node took Bob's first): the claim most
    holders answered with wins, whatever either's seq, and the verdict says holders
    disagreed and how many answered with the winner (``backers``)."""
    own = opened(name_rec(alice, "alice", seq=5))
    squat = opened(name_rec(bob, "alice", seq=2**63))
    verdict = judge_answers([[own], [squat], [own]])
    assert verdict == Verdict(own, contested=True, backers=2)
    assert judge_answers([[squat], [own], [own], [own, squat]]).best == own
    assert judge_answers([[own], [own], []]) == Verdict(own, backers=2)
    later = opened(name_rec(alice, "alice", seq=6, at=NOW + 1))
    assert judge_answers([[own], [later]]) == Verdict(later, backers=2)  # one signer: highest seq
    assert judge_answers([[], []]) == Verdict(None)


def test_a_tie_between_signers_is_never_settled_by_seq(alice: Identity, bob: Identity) -> None:
    """As many holders for each of two signers: no record is believed (``tied``), and
    `Verdict.believed` says so rather than hand the name to the higher seq. Before
    2026-12-05 (evening) the tie went to `select_best`: one squatting holder against one
    honest won."""
    own = opened(name_rec(alice, "alice", seq=5))
    squat = opened(name_rec(bob, "alice", seq=2**63))
    for answers in ([[own], [squat]], [[squat], [own]], [[own, squat]], [[own], [squat], []]):
        verdict = judge_answers(answers)
        assert verdict == Verdict(None, contested=True, tied=True, backers=1), answers
        with pytest.raises(ContestedError):
            verdict.believed(own.body.key)
    assert judge_answers([[own], [own]]).believed(own.body.key) == own


def test_readers_follow_a_name_moved_by_its_holder(alice: Identity, bob: Identity) -> None:
    """A claim carrying the other answer's signer's `moved_by` replaces it, however few
    holders have the move yet; one signed by someone else moves nothing."""
    old = opened(name_rec(alice, "alice"))
    new_alice = Identity.generate()
    moved = opened(moved_claim(new_alice, "alice", alice))
    assert judge_answers([[old], [old], [moved]]) == Verdict(moved, backers=1)
    forged = opened(moved_claim(new_alice, "alice", bob, seq=2**63))
    assert judge_answers([[old], [old], [forged]]) == Verdict(old, contested=True, backers=2)


# -- a record hidden by a stepped clock ------------------------------------------------------


def test_a_held_record_stands_until_the_deletion_clock_passes_its_expiry(
    alice: Identity, bob: Identity
) -> None:
    """Replacement follows the clock expiry deletes by (``expiry_ms``), not the wall clock
    reads go by: while a stepped wall clock hides a held record, neither an older record of
    its signer nor another identity's claim of its name replaces it; a newer one does."""
    s = store()
    key = record_key(IDENTITY, alice.fingerprint)
    assert s.put(identity_rec(alice, seq=5, ttl=DAY_MS), NOW).changed
    assert s.put(name_rec(alice, "alice", ttl=DAY_MS), NOW).changed
    stepped, deleted_to = NOW + 2 * DAY_MS, NOW + 60_000
    assert s.get(key, stepped) is None  # hidden from reads
    older = identity_rec(alice, seq=3, at=NOW - HOUR_MS, ttl=3 * DAY_MS)
    squat = name_rec(bob, "alice", at=stepped)
    keys = all_keys(alice, bob)
    for data, why in ((older, "lower than held 5"), (squat, "another identity")):
        before = snapshot(s, keys, deleted_to)
        with pytest.raises(ConflictError, match=why):
            s.put(data, stepped, expiry_ms=deleted_to)
        assert snapshot(s, keys, deleted_to) == before
    newer = identity_rec(alice, seq=6, at=stepped)
    assert s.put(newer, stepped, expiry_ms=deleted_to).changed
    # once deletion's time has passed the claim's expiry, the name is free, as when expired
    assert s.put(squat, stepped, expiry_ms=stepped).changed
