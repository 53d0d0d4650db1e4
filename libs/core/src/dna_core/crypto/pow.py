"""Hashcash-style proof of work over SHA-256 (admission control for writes and names).

A proof for a payload is (difficulty, timestamp_ms, nonces) such that, for each of its
``n`` nonces, SHA-256(label || payload_hash || timestamp_ms || nonce) has at least
``difficulty - log2(n)`` leading zero bits. ``n`` (the proof's parts) is a power of two
up to `MAX_PARTS` and the nonces are strictly increasing, so no part counts twice.
Binding the payload hash stops a proof being reused for other data; the timestamp lets a
verifier refuse stale proofs without remembering them all. Verification is ``n`` hashes,
whatever the difficulty.

Why parts: finding one nonce of ``d`` bits takes a geometric number of attempts, mean
2^d but p99 4.6 times the mean, and that tail is what a sender waits for on its slowest
messages. ``n`` nonces of ``d - log2 n`` bits take the same 2^d attempts on average (a
proof costs exactly the same work), but their sum is far steadier: with 8 parts the p99
is about 1.9 times the mean. A one-part proof is the classic hashcash proof, still
accepted everywhere (records use it).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
from dataclasses import dataclass

from dna_core.crypto import primitives as p
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.wire.gen.dna.v1 import common_pb2

_LABEL = p.label("pow")
MAX_DIFFICULTY = 64  # above this a proof could never be solved; refuse it as malformed
MAX_PARTS = 16  # nonces in one proof: verification is one hash each
PUT_PARTS = 8  # what mailbox puts use (records keep one part: `solve`'s default)
MAX_AGE_MS = 10 * 60_000  # a proof older than this is stale: how long a put can be replayed
MAX_SKEW_MS = 60_000  # how far in the future a proof's timestamp may be
_NONCE = struct.Struct(">Q")


@dataclass(frozen=True)
class Proof:
    difficulty: int
    timestamp_ms: int
    nonce: int
    more_nonces: tuple[int, ...] = ()  # parts 2..n, strictly increasing after ``nonce``

    @property
    def nonces(self) -> tuple[int, ...]:
        return (self.nonce, *self.more_nonces)

    def to_proto(self) -> common_pb2.ProofOfWork:
        return common_pb2.ProofOfWork(
            difficulty=self.difficulty, timestamp_ms=self.timestamp_ms, nonce=self.nonce,
            more_nonces=self.more_nonces,
        )  # fmt: skip

    @classmethod
    def from_proto(cls, msg: common_pb2.ProofOfWork) -> Proof:
        if msg.difficulty > MAX_DIFFICULTY:
            raise MalformedError(
                f"proof of work: difficulty {msg.difficulty} over {MAX_DIFFICULTY}", kind="pow"
            )
        proof = cls(msg.difficulty, msg.timestamp_ms, msg.nonce, tuple(msg.more_nonces))
        part_bits(proof)  # the shape is checked at decoding: parts, their order
        return proof


def part_bits(proof: Proof) -> int:
    """The leading zero bits each of the proof's nonces must have; raises MalformedError
    for a shape no solver makes (parts not a power of two, too many, out of order)."""
    parts = 1 + len(proof.more_nonces)
    shift = parts.bit_length() - 1
    if parts > MAX_PARTS or parts != 1 << shift or shift > proof.difficulty:
        most = min(MAX_PARTS, 1 << min(proof.difficulty, 8))
        raise MalformedError(
            f"proof of work: {parts} parts, not a power of two up to {most}", kind="pow"
        )
    nonces = proof.nonces
    if any(a >= b for a, b in itertools.pairwise(nonces)):
        raise MalformedError("proof of work: nonces not strictly increasing", kind="pow")
    return proof.difficulty - shift


def _prefix(payload_hash: bytes, timestamp_ms: int) -> hashlib._Hash:
    if len(payload_hash) != 32:
        raise ValueError("payload hash must be 32 bytes")
    h = hashlib.sha256(_LABEL)
    h.update(payload_hash)
    h.update(p.u64(timestamp_ms))
    return h


def solve(
    payload_hash: bytes, difficulty: int, *, now_ms: int, parts: int = 1
) -> tuple[Proof, int]:
    """Find a proof; returns it with the number of hashes tried."""
    search = Search(payload_hash, difficulty, now_ms, parts=parts)
    while (found := search.step(1 << 32)) is None:
        pass
    return found


def parts_for(difficulty: int, wanted: int = PUT_PARTS) -> int:
    """``wanted`` parts, fewer where the difficulty is too low to split that far."""
    return min(wanted, 1 << difficulty)


class Search:
    """A proof being searched for, a slice of nonces at a time (from a random start), so
    an event loop can solve one without stalling (see `MailboxClient`)."""

    def __init__(
        self, payload_hash: bytes, difficulty: int, now_ms: int, *, parts: int = 1
    ) -> None:
        if not 0 <= difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be 0..{MAX_DIFFICULTY}")
        shape = Proof(difficulty, now_ms, 0, tuple(range(1, parts)))
        try:
            bits = part_bits(shape)
        except MalformedError as exc:
            raise ValueError(str(exc)) from None
        self.difficulty, self.now_ms, self.parts = difficulty, now_ms, parts
        self._copy = _prefix(payload_hash, now_ms).copy
        # A digest meets the difficulty iff, read big-endian, it is below 2^(256-bits):
        # comparing the bytes says the same as comparing the integers, at a quarter less
        # time per attempt (the loop is all the cost: ~4,000 attempts at 12 bits).
        self._limit = (1 << (256 - bits)).to_bytes(32, "big") if bits else None
        self._next = int.from_bytes(os.urandom(4), "big") << 32  # solvers don't collide
        self._found: list[int] = []
        self.attempts = 0

    def step(self, count: int) -> tuple[Proof, int] | None:
        """Try up to ``count`` more nonces: the proof and the attempts, or None."""
        copy, limit, pack, found = self._copy, self._limit, _NONCE.pack, self._found
        start = self._next
        end = min(start + count, 1 << 64)
        if limit is None:  # no bits per part: any nonces
            end = min(end, start + self.parts - len(found))
            found.extend(range(start, end))
        else:
            for nonce in range(start, end):
                h = copy()
                h.update(pack(nonce))
                if h.digest() < limit:
                    found.append(nonce)
                    if len(found) == self.parts:
                        end = nonce + 1
                        break
        self.attempts += end - start
        self._next = end
        if len(found) == self.parts:
            return Proof(self.difficulty, self.now_ms, found[0], tuple(found[1:])), self.attempts
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
    bits = part_bits(proof)
    prefix = _prefix(payload_hash, proof.timestamp_ms)
    for nonce in proof.nonces:
        h = prefix.copy()
        h.update(p.u64(nonce))
        if p.leading_zero_bits(h.digest()) < bits:
            raise VerificationError("proof of work: hash does not meet its difficulty", kind="pow")
