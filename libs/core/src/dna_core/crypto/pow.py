"""Hashcash-style proof of work over SHA-256 (admission control for writes and names).

A proof for a payload is (difficulty, timestamp_ms, nonce) such that
SHA-256(label || payload_hash || timestamp_ms || nonce) has at least `difficulty`
leading zero bits. Binding the payload hash stops a proof being reused for other
data; the timestamp lets a verifier refuse stale proofs without remembering them
all. Verification is one hash: O(1) whatever the difficulty.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from dna_core.crypto import primitives as p
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.wire.gen.dna.v1 import common_pb2

_LABEL = p.label("pow")
MAX_DIFFICULTY = 64  # above this a proof could never be solved; refuse it as malformed
MAX_AGE_MS = 10 * 60_000  # a proof older than this is stale: how long a put can be replayed
MAX_SKEW_MS = 60_000  # how far in the future a proof's timestamp may be
_NONCE = struct.Struct(">Q")


@dataclass(frozen=True)
class Proof:
    difficulty: int
    timestamp_ms: int
    nonce: int

    def to_proto(self) -> common_pb2.ProofOfWork:
        return common_pb2.ProofOfWork(
            difficulty=self.difficulty, timestamp_ms=self.timestamp_ms, nonce=self.nonce
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.ProofOfWork) -> Proof:
        if msg.difficulty > MAX_DIFFICULTY:
            raise MalformedError(
                f"proof of work: difficulty {msg.difficulty} over {MAX_DIFFICULTY}", kind="pow"
            )
        return cls(msg.difficulty, msg.timestamp_ms, msg.nonce)


def _prefix(payload_hash: bytes, timestamp_ms: int) -> hashlib._Hash:
    if len(payload_hash) != 32:
        raise ValueError("payload hash must be 32 bytes")
    h = hashlib.sha256(_LABEL)
    h.update(payload_hash)
    h.update(p.u64(timestamp_ms))
    return h


def solve(payload_hash: bytes, difficulty: int, *, now_ms: int) -> tuple[Proof, int]:
    """Find a proof; returns it with the number of hashes tried."""
    search = Search(payload_hash, difficulty, now_ms)
    while (found := search.step(1 << 32)) is None:
        pass
    return found


class Search:
    """A proof being searched for, a slice of nonces at a time (from a random start), so
    an event loop can solve one without stalling (see `MailboxClient`)."""

    def __init__(self, payload_hash: bytes, difficulty: int, now_ms: int) -> None:
        if not 0 <= difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be 0..{MAX_DIFFICULTY}")
        self.difficulty, self.now_ms = difficulty, now_ms
        self._copy = _prefix(payload_hash, now_ms).copy
        # A digest meets the difficulty iff, read big-endian, it is below 2^(256-bits):
        # comparing the bytes says the same as comparing the integers, at a quarter less
        # time per attempt (the loop is all the cost: ~4,000 attempts at 12 bits).
        self._limit = (1 << (256 - difficulty)).to_bytes(32, "big") if difficulty else None
        self._next = int.from_bytes(os.urandom(4), "big") << 32  # solvers don't collide
        self.attempts = 0

    def step(self, count: int) -> tuple[Proof, int] | None:
        """Try up to ``count`` more nonces: the proof and the attempts, or None."""
        copy, limit, pack = self._copy, self._limit, _NONCE.pack
        start = self._next
        if limit is None:  # difficulty 0: any nonce
            self.attempts += 1
            return Proof(0, self.now_ms, start), self.attempts
        for nonce in range(start, min(start + count, 1 << 64)):
            h = copy()
            h.update(pack(nonce))
            if h.digest() < limit:
                self.attempts += nonce - start + 1
                return Proof(self.difficulty, self.now_ms, nonce), self.attempts
        self.attempts += count
        self._next = start + count
        if self._next >= 1 << 64:
            raise ValueError(f"no proof of {self.difficulty} bits left to try")
        return None


def verify(
    proof: Proof,
    payload_hash: bytes,
    *,
    required: int,
    now_ms: int,
    max_age_ms: int = MAX_AGE_MS,
    max_skew_ms: int = MAX_SKEW_MS,
) -> None:
    """Raise unless ``proof`` meets ``required`` bits for this payload and is fresh; every
    refusal is of kind ``pow`` (its class says how it failed)."""
    if proof.difficulty < required:
        raise VerificationError(
            f"proof of work: difficulty {proof.difficulty} < required {required}", kind="pow"
        )
    if proof.timestamp_ms < now_ms - max_age_ms:
        raise ExpiredError("proof of work: too old", kind="pow")
    if proof.timestamp_ms > now_ms + max_skew_ms:
        raise ExpiredError("proof of work: timestamped in the future", kind="pow")
    h = _prefix(payload_hash, proof.timestamp_ms)
    h.update(p.u64(proof.nonce))
    if p.leading_zero_bits(h.digest()) < proof.difficulty:
        raise VerificationError("proof of work: hash does not meet its difficulty", kind="pow")
