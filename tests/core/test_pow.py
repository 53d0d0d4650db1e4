"""Proof of work: bound to payload and time, O(1) verification, attempts reported."""

from __future__ import annotations

import asyncio
import hashlib
import itertools

import pytest
from dna_core.crypto import pow
from dna_core.crypto.pow import Proof
from dna_core.crypto.primitives import label, leading_zero_bits, u64
from dna_core.errors import ExpiredError, MalformedError, VerificationError
from dna_core.mailbox.client import solve_yielding
from dna_core.wire.gen.dna.v1 import common_pb2

NOW = 1_780_000_000_000
PAYLOAD = hashlib.sha256(b"an envelope").digest()


def test_solve_and_verify() -> None:
    proof, attempts = pow.solve(PAYLOAD, 12, now_ms=NOW)
    assert attempts >= 1
    assert proof.difficulty == 12 and proof.timestamp_ms == NOW
    pow.verify(proof, PAYLOAD, required=12, now_ms=NOW)
    pow.verify(proof, PAYLOAD, required=8, now_ms=NOW)


@pytest.mark.parametrize("bits", [0, 1, 7, 8, 9, 15, 16])
def test_every_difficulty_yields_a_proof_with_exactly_that_many_leading_zero_bits(
    bits: int,
) -> None:
    """The solver's byte comparison against 2^(256-bits) agrees with the verifier's bit
    count, across byte boundaries: the proof verifies, and the nonce before it did not."""
    proof, attempts = pow.solve(PAYLOAD, bits, now_ms=NOW)
    pow.verify(proof, PAYLOAD, required=bits, now_ms=NOW)
    if attempts > 1:  # the attempt before this one failed the difficulty
        earlier = Proof(bits, NOW, proof.nonce - 1)
        with pytest.raises(VerificationError):
            pow.verify(earlier, PAYLOAD, required=bits, now_ms=NOW)


def test_attempts_scale_with_difficulty() -> None:
    """Over 40 solves the mean attempts at 10 bits is near 2^10 (a loose 3x band)."""
    total = sum(pow.solve(bytes([i]) * 32, 10, now_ms=NOW)[1] for i in range(40))
    assert 1024 / 3 < total / 40 < 1024 * 3


def test_proof_is_bound_to_the_payload() -> None:
    proof, _ = pow.solve(PAYLOAD, 16, now_ms=NOW)
    other = hashlib.sha256(b"another envelope").digest()
    with pytest.raises(VerificationError, match="does not meet"):
        pow.verify(proof, other, required=16, now_ms=NOW)


def test_proof_is_bound_to_its_timestamp_and_nonce() -> None:
    proof, _ = pow.solve(PAYLOAD, 16, now_ms=NOW)
    for forged in (
        Proof(16, proof.timestamp_ms + 1, proof.nonce),
        Proof(16, proof.timestamp_ms, proof.nonce + 1),
    ):
        with pytest.raises(VerificationError):
            pow.verify(forged, PAYLOAD, required=16, now_ms=NOW)


def test_too_little_work_is_refused() -> None:
    proof, _ = pow.solve(PAYLOAD, 4, now_ms=NOW)
    with pytest.raises(VerificationError, match="required 20"):
        pow.verify(proof, PAYLOAD, required=20, now_ms=NOW)
    inflated = Proof(20, proof.timestamp_ms, proof.nonce)  # claims more than it did
    with pytest.raises(VerificationError):
        pow.verify(inflated, PAYLOAD, required=20, now_ms=NOW)


def test_stale_and_future_proofs_are_refused() -> None:
    proof, _ = pow.solve(PAYLOAD, 8, now_ms=NOW)
    with pytest.raises(ExpiredError, match="too old"):
        pow.verify(proof, PAYLOAD, required=8, now_ms=NOW + 11 * 60_000)
    with pytest.raises(ExpiredError, match="future"):
        pow.verify(proof, PAYLOAD, required=8, now_ms=NOW - 2 * 60_000)


def test_proto_round_trip_and_cap() -> None:
    proof, _ = pow.solve(PAYLOAD, 8, now_ms=NOW)
    assert Proof.from_proto(proof.to_proto()) == proof
    with pytest.raises(MalformedError):
        Proof.from_proto(common_pb2.ProofOfWork(difficulty=65))


def test_solver_refuses_impossible_difficulty() -> None:
    with pytest.raises(ValueError):
        pow.solve(PAYLOAD, 65, now_ms=NOW)


def test_a_search_in_slices_finds_what_one_solve_call_would() -> None:
    """`Search.step` tries a slice of nonces at a time and picks up where it stopped: the
    proof found in slices of 7 is the first nonce from its start meeting the difficulty."""
    search = pow.Search(PAYLOAD, 10, NOW)
    steps = 0
    while (found := search.step(7)) is None:
        steps += 1
    proof, attempts = found
    pow.verify(proof, PAYLOAD, required=10, now_ms=NOW)
    assert steps == (attempts - 1) // 7
    for earlier in range(proof.nonce - attempts + 1, proof.nonce):  # all tried, all short
        with pytest.raises(VerificationError):
            pow.verify(Proof(10, NOW, earlier), PAYLOAD, required=10, now_ms=NOW)


def test_the_mailbox_client_solves_proofs_without_stalling_its_loop() -> None:
    """`solve_yielding` hands the loop back between slices of attempts: a task beside it
    runs between every two slices, and the proof verifies."""

    async def main() -> tuple[Proof, int, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        proof, attempts = await solve_yielding(PAYLOAD, 14, now_ms=NOW, chunk=64)
        task.cancel()
        return proof, attempts, ticks

    proof, attempts, ticks = asyncio.run(main())
    pow.verify(proof, PAYLOAD, required=14, now_ms=NOW)
    assert ticks >= attempts // 64 - 1


@pytest.mark.parametrize(("bits", "parts"), [(0, 1), (1, 2), (3, 8), (8, 8), (12, 8), (12, 16)])
def test_a_proof_in_parts_verifies_and_each_part_meets_its_share(bits: int, parts: int) -> None:
    """n parts of ``bits - log2 n`` bits each: the proof verifies at ``bits``, its nonces
    rise strictly, and a part changed to the nonce after it no longer does."""
    proof, _ = pow.solve(PAYLOAD, bits, now_ms=NOW, parts=parts)
    assert len(proof.nonces) == parts and list(proof.nonces) == sorted(set(proof.nonces))
    pow.verify(proof, PAYLOAD, required=bits, now_ms=NOW)
    assert Proof.from_proto(proof.to_proto()) == proof
    share = bits - (parts.bit_length() - 1)
    if share:  # a part that misses its share fails the proof (at 0 bits every nonce passes)
        last = next(n for n in itertools.count(proof.nonces[-1] + 1) if _zero_bits(n) < share)
        nonces = (*proof.nonces[:-1], last)
        with pytest.raises(VerificationError, match="does not meet"):
            pow.verify(Proof(bits, NOW, nonces[0], nonces[1:]), PAYLOAD, required=bits, now_ms=NOW)


def _zero_bits(nonce: int) -> int:
    """Leading zero bits of one part's hash (PAYLOAD, NOW), as the verifier counts them."""
    digest = hashlib.sha256(label("pow") + PAYLOAD + u64(NOW) + u64(nonce)).digest()
    return leading_zero_bits(digest)


def test_parts_cost_the_same_work_with_a_far_shorter_tail() -> None:
    """Counted in attempts, not time: 8 parts of 5 bits take 2^8 attempts on average, as
    one part of 8 bits does, but their spread (coefficient of variation) is about 0.35
    against about 1 for one part."""

    def attempts(parts: int) -> list[int]:
        return [pow.solve(bytes([i % 256, i // 256]) * 16, 8, now_ms=NOW, parts=parts)[1]
                for i in range(300)]  # fmt: skip

    def mean_and_cv(xs: list[int]) -> tuple[float, float]:
        mean = sum(xs) / len(xs)
        return mean, (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5 / mean

    one_mean, one_cv = mean_and_cv(attempts(1))
    eight_mean, eight_cv = mean_and_cv(attempts(8))
    assert 256 * 0.7 < one_mean < 256 * 1.3 and 256 * 0.8 < eight_mean < 256 * 1.2
    assert one_cv > 0.7 and eight_cv < 0.55


@pytest.mark.parametrize(
    ("difficulty", "nonce", "more", "why"),
    [
        (12, 1, (2, 3), "not a power of two"),  # 3 parts
        (12, 1, tuple(range(2, 33)), "not a power of two"),  # 32 parts: over MAX_PARTS
        (2, 1, (2, 3, 4, 5, 6, 7, 8), "not a power of two"),  # 8 parts of -1 bits
        (12, 5, (5,), "strictly increasing"),  # one part counted twice
        (12, 9, (5,), "strictly increasing"),
    ],
)
def test_proofs_of_a_shape_no_solver_makes_are_malformed(
    difficulty: int, nonce: int, more: tuple[int, ...], why: str
) -> None:
    """Refused before any hash, at decoding and at verification alike, as ``pow``."""
    msg = common_pb2.ProofOfWork(
        difficulty=difficulty, timestamp_ms=NOW, nonce=nonce, more_nonces=more
    )
    with pytest.raises(MalformedError, match=why) as decoded:
        Proof.from_proto(msg)
    assert decoded.value.kind == "pow"
    with pytest.raises(MalformedError, match=why):
        pow.verify(Proof(difficulty, NOW, nonce, more), PAYLOAD, required=0, now_ms=NOW)


def test_a_proof_in_parts_claims_no_more_than_its_difficulty() -> None:
    """8 parts of 9 bits prove 12 bits: refused where 13 are required; the same nonces
    claimed as 13 bits (8 parts of 10) pass only if every part happens to have 10."""
    proof, _ = pow.solve(PAYLOAD, 12, now_ms=NOW, parts=8)
    with pytest.raises(VerificationError, match="required 13"):
        pow.verify(proof, PAYLOAD, required=13, now_ms=NOW)
    assert min(_zero_bits(n) for n in proof.nonces) >= 9
    inflated = Proof(13, NOW, proof.nonce, proof.more_nonces)
    if min(_zero_bits(n) for n in proof.nonces) >= 10:  # luck, 1 in 256
        pow.verify(inflated, PAYLOAD, required=13, now_ms=NOW)
    else:
        with pytest.raises(VerificationError, match="does not meet"):
            pow.verify(inflated, PAYLOAD, required=13, now_ms=NOW)
