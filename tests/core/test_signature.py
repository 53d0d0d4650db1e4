"""Hybrid signatures: both halves must verify; domains separate purposes."""

from __future__ import annotations

import pytest
from dna_core.crypto import Identity, signature
from dna_core.crypto.primitives import ML_DSA_65_SIGNATURE
from dna_core.errors import VerificationError
from support import single_byte_tampers

MSG = b"attack at dawn" * 10


def test_round_trip(alice: Identity) -> None:
    sig = signature.sign(alice, b"test", MSG)
    assert len(sig) == 3373
    signature.verify(alice.public, b"test", MSG, sig)


def test_wrong_signer_domain_or_message_fails(alice: Identity, bob: Identity) -> None:
    sig = signature.sign(alice, b"test", MSG)
    with pytest.raises(VerificationError):
        signature.verify(bob.public, b"test", MSG, sig)
    with pytest.raises(VerificationError):
        signature.verify(alice.public, b"other", MSG, sig)
    with pytest.raises(VerificationError):
        signature.verify(alice.public, b"test", MSG + b"!", sig)


def test_forging_the_ml_dsa_half_fails(alice: Identity, bob: Identity) -> None:
    """An attacker who breaks only Ed25519 can make that half, but not the ML-DSA half."""
    real = signature.sign(alice, b"test", MSG)
    forged_pq = signature.sign(bob, b"test", MSG)[:ML_DSA_65_SIGNATURE]
    with pytest.raises(VerificationError, match="ML-DSA-65"):
        signature.verify(alice.public, b"test", MSG, forged_pq + real[ML_DSA_65_SIGNATURE:])


def test_forging_the_ed25519_half_fails(alice: Identity, bob: Identity) -> None:
    """An attacker who breaks only ML-DSA can make that half, but not the Ed25519 half."""
    real = signature.sign(alice, b"test", MSG)
    forged_classic = signature.sign(bob, b"test", MSG)[ML_DSA_65_SIGNATURE:]
    with pytest.raises(VerificationError, match="Ed25519"):
        signature.verify(alice.public, b"test", MSG, real[:ML_DSA_65_SIGNATURE] + forged_classic)


def test_every_single_byte_tamper_fails(alice: Identity) -> None:
    sig = signature.sign(alice, b"test", MSG)
    count = 0
    for tampered in single_byte_tampers(sig):
        with pytest.raises(VerificationError):
            signature.verify(alice.public, b"test", MSG, tampered)
        count += 1
    assert count >= len(sig)


def test_truncated_or_extended_signature_fails(alice: Identity) -> None:
    sig = signature.sign(alice, b"test", MSG)
    for bad in (sig[:-1], sig + b"\0", b""):
        with pytest.raises(VerificationError, match="bytes"):
            signature.verify(alice.public, b"test", MSG, bad)
