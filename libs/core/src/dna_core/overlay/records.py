"""Record store policy for the signed records the overlay holds (sans-I/O).

What a node accepts, keeps and hands out for a key:

* the record verifies (`crypto.records.open_record`: signature, size cap,
  expiry) and is stored under the key its kind dictates, so nobody can squat
  another identity's keys: identity, presence and rotation records live at
  ``H(label(kind) || signer fingerprint)``, a name claim at
  ``H(label("name") || normalized name)`` and carries a valid proof of work;
* a lower sequence number than the one held is refused (no rollback); the same
  sequence with other bytes is refused (the first one stays); a name claimed by
  an unexpired record of another identity is refused (first come, first served);
* a key rotation must be cross-signed by the new key;
* presence records live at most an hour, everything else at most a year;
* expired records disappear (`expire`) and held records are handed back for
  republishing on a timer (`republish_due`).

Readers apply the same per-record rules (`check_policy`) to every answer before
`select_best` picks one: otherwise a single dishonest node could answer with a
record no honest node would hold (a name claim without its proof of work, a
rotation without its cross-signature) and a higher sequence number, and win.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from dna_core.crypto import pow, signature
from dna_core.crypto import primitives as p
from dna_core.crypto.keys import PublicKeySet
from dna_core.crypto.records import VerifiedRecord, open_record
from dna_core.errors import CapacityError, ConflictError, MalformedError, VerificationError
from dna_core.wire import decode_message
from dna_core.wire.gen.dna.v1 import common_pb2, records_pb2

HOUR_MS = 3_600_000
MAX_TTL_MS = 365 * 24 * HOUR_MS
MAX_PRESENCE_TTL_MS = HOUR_MS
NAME_MIN, NAME_MAX = 3, 32
DEFAULT_NAME_POW_BITS = 16  # a name claim's proof of work (overlay.name_pow_bits)
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_KIND_LABEL: dict[int, str] = {
    common_pb2.RECORD_KIND_IDENTITY: "identity",
    common_pb2.RECORD_KIND_PRESENCE: "presence",
    common_pb2.RECORD_KIND_KEY_ROTATION: "rotation",
}


def record_key(kind: int, fingerprint: bytes) -> bytes:
    """The overlay key of an identity-bound record (identity, presence, rotation)."""
    return p.sha256(p.label(_KIND_LABEL[kind]), fingerprint)


def normalize_name(name: str) -> str:
    """NFKC + casefold; 3-32 of a-z 0-9 . _ - (so look-alike names collide on purpose)."""
    norm = unicodedata.normalize("NFKC", name).casefold()
    if not NAME_MIN <= len(norm) <= NAME_MAX or not set(norm) <= _NAME_CHARS:
        raise MalformedError(f"name must be {NAME_MIN}-{NAME_MAX} of a-z 0-9 . _ -")
    return norm


def name_key(name: str) -> bytes:
    return p.sha256(p.label("name"), normalize_name(name).encode())


def name_pow_hash(name: str, fingerprint: bytes) -> bytes:
    return p.sha256(p.label("name-pow"), normalize_name(name).encode(), fingerprint)


ROTATION_ACCEPT_DOMAIN = b"rotation-accept"  # the new key's cross-signature


def rotation_accept_message(old_fp: bytes, new_fp: bytes) -> bytes:
    return old_fp + new_fp


@dataclass(frozen=True, slots=True)
class StoreResult:
    seq: int
    changed: bool  # False when the same record was already held


@dataclass(slots=True)
class _Held:
    record: VerifiedRecord
    republished_ms: float


class RecordStore:
    def __init__(
        self,
        *,
        name_pow_bits: int = DEFAULT_NAME_POW_BITS,
        max_records: int = 100_000,
        max_bytes: int = 256 << 20,
    ) -> None:
        self.name_pow_bits = name_pow_bits
        self.max_records, self.max_bytes = max_records, max_bytes
        self._held: dict[bytes, _Held] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def put(self, data: bytes, now_ms: int) -> StoreResult:
        """Validate and store a SignedRecord; raises a ProtocolError and changes nothing."""
        rec = open_record(data, now_ms=now_ms)
        check_policy(rec, name_pow_bits=self.name_pow_bits)
        held = self._held.get(rec.body.key)
        if held is not None and held.record.body.expires_ms > now_ms:
            if held.record.raw == rec.raw:
                return StoreResult(rec.body.seq, changed=False)
            _check_replaces(held.record, rec)
        freed = len(held.record.raw) if held is not None else 0
        full = held is None and len(self._held) >= self.max_records
        if full or self._bytes - freed + len(rec.raw) > self.max_bytes:
            raise CapacityError("record store is full")
        self._replace(rec, now_ms)
        return StoreResult(rec.body.seq, changed=True)

    def get(self, key: bytes, now_ms: int) -> VerifiedRecord | None:
        held = self._held.get(key)
        if held is None or held.record.body.expires_ms <= now_ms:
            return None
        return held.record

    def expire(self, now_ms: int) -> int:
        gone = [k for k, h in self._held.items() if h.record.body.expires_ms <= now_ms]
        for key in gone:
            self._bytes -= len(self._held.pop(key).record.raw)
        return len(gone)

    def republish_due(self, now_ms: int, interval_ms: int) -> list[VerifiedRecord]:
        """Records not republished within ``interval_ms``; marks them as republished now."""
        due = []
        for held in self._held.values():
            if now_ms - held.republished_ms >= interval_ms and held.record.body.expires_ms > now_ms:
                held.republished_ms = now_ms
                due.append(held.record)
        return due

    def _replace(self, rec: VerifiedRecord, now_ms: int) -> None:
        old = self._held.get(rec.body.key)
        if old is not None:
            self._bytes -= len(old.record.raw)
        self._held[rec.body.key] = _Held(rec, now_ms)
        self._bytes += len(rec.raw)


def check_policy(rec: VerifiedRecord, *, name_pow_bits: int) -> None:
    """The rules of one record on its own (module docstring), for stores and readers
    alike; raises a ProtocolError. What depends on what is held (sequence numbers, first
    come first served) is the store's alone."""
    body = rec.body
    ttl = body.expires_ms - body.created_ms
    limit = MAX_PRESENCE_TTL_MS if body.kind == common_pb2.RECORD_KIND_PRESENCE else MAX_TTL_MS
    if ttl > limit:
        raise MalformedError(f"record: lifetime over {limit // HOUR_MS} h for its kind")
    if body.kind == common_pb2.RECORD_KIND_NAME_CLAIM:
        _check_name_claim(rec, name_pow_bits)
        return
    if body.key != record_key(body.kind, body.signer_fingerprint):
        raise VerificationError("record: stored under a key its signer does not own")
    if body.kind == common_pb2.RECORD_KIND_KEY_ROTATION:
        rotation_target(rec)


def _check_name_claim(rec: VerifiedRecord, name_pow_bits: int) -> None:
    claim = decode_message(
        records_pb2.NameClaim, rec.body.payload, max_size=1024, what="name claim"
    )
    if normalize_name(claim.name) != claim.name:
        raise MalformedError("name claim: name is not in normal form")
    if rec.body.key != name_key(claim.name) or claim.fingerprint != rec.body.signer_fingerprint:
        raise VerificationError("name claim: key or fingerprint does not match the claim")
    proof = pow.Proof.from_proto(claim.pow)
    pow.verify(
        proof, name_pow_hash(claim.name, claim.fingerprint), required=name_pow_bits,
        now_ms=rec.body.created_ms, max_age_ms=MAX_TTL_MS,
    )  # fmt: skip


def rotation_target(rec: VerifiedRecord) -> PublicKeySet:
    """The keys a rotation record moves to, after checking that the record is signed by the
    old key it names and cross-signed by the new one; raises a ProtocolError otherwise."""
    rot = decode_message(
        records_pb2.KeyRotation, rec.body.payload, max_size=8192, what="key rotation"
    )
    if rot.old_fingerprint != rec.body.signer_fingerprint:
        raise VerificationError("key rotation: not signed by the old key")
    new_keys = PublicKeySet.from_proto(rot.new_keys)
    signature.verify(
        new_keys,
        ROTATION_ACCEPT_DOMAIN,
        rotation_accept_message(rot.old_fingerprint, new_keys.fingerprint),
        rot.new_key_signature,
    )
    return new_keys


def _check_replaces(held: VerifiedRecord, new: VerifiedRecord) -> None:
    if new.body.signer_fingerprint != held.body.signer_fingerprint:
        raise ConflictError("record: key already held by another identity (name taken)")
    if new.body.seq < held.body.seq:
        raise ConflictError(f"record: sequence {new.body.seq} is lower than held {held.body.seq}")
    if new.body.seq == held.body.seq:
        raise ConflictError(f"record: a different record with sequence {new.body.seq} is held")


def select_best(records: Iterable[VerifiedRecord]) -> VerifiedRecord | None:
    """Of several verified answers for one key: highest seq, then latest, then lowest bytes
    (a total order, so every reader picks the same record whatever order answers came in)."""
    return min(records, key=lambda r: (-r.body.seq, -r.body.created_ms, r.raw), default=None)
