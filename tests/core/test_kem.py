"""Hybrid KEM: both halves feed the secret; a wrong key or a bad point is refused."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dna_core.crypto import Identity, kem
from dna_core.errors import MalformedError, VerificationError


def test_round_trip(bob: Identity) -> None:
    secret, ct_pq, ct_classic = kem.encapsulate(bob.public)
    assert (len(secret), len(ct_pq), len(ct_classic)) == (32, 1088, 32)
    assert kem.decapsulate(bob, ct_pq, ct_classic) == secret


def test_wrong_recipient_gets_a_different_secret(bob: Identity, carol: Identity) -> None:
    secret, ct_pq, ct_classic = kem.encapsulate(bob.public)
    assert kem.decapsulate(carol, ct_pq, ct_classic) != secret


def test_each_ciphertext_half_changes_the_secret(bob: Identity) -> None:
    secret, ct_pq, ct_classic = kem.encapsulate(bob.public)
    other_classic = X25519PrivateKey.generate().public_key().public_bytes_raw()
    assert kem.decapsulate(bob, ct_pq, other_classic) != secret
    flipped = bytes([ct_pq[0] ^ 1]) + ct_pq[1:]
    assert kem.decapsulate(bob, flipped, ct_classic) != secret


def test_low_order_x25519_point_is_refused(bob: Identity) -> None:
    _, ct_pq, _ = kem.encapsulate(bob.public)
    with pytest.raises(VerificationError):
        kem.decapsulate(bob, ct_pq, b"\0" * 32)


def test_wrong_sizes_are_malformed(bob: Identity) -> None:
    with pytest.raises(MalformedError):
        kem.decapsulate(bob, b"\0" * 1087, b"\1" * 32)
