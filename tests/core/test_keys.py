"""Identities: derivation from seeds, fingerprints, public-set export and import."""

from __future__ import annotations

from typing import Any

import pytest
from dna_core.crypto import Identity, PublicKeySet
from dna_core.crypto.keys import CANONICAL_PUBLIC_SIZE, SEEDS_SIZE
from dna_core.errors import MalformedError
from support import seeded_identity


def test_same_seeds_give_the_same_identity(alice: Identity) -> None:
    again = Identity(alice.seeds())
    assert again.public == alice.public
    assert again.fingerprint == alice.fingerprint
    assert len(alice.seeds()) == SEEDS_SIZE == 160


def test_identities_differ_and_fingerprints_are_32_bytes(alice: Identity, bob: Identity) -> None:
    assert alice.fingerprint != bob.fingerprint
    assert len(alice.fingerprint) == 32
    assert len(alice.public.canonical()) == CANONICAL_PUBLIC_SIZE == 3202


def test_public_set_export_import_round_trip(alice: Identity) -> None:
    exported = alice.public.encode()
    imported = PublicKeySet.decode(exported)
    assert imported == alice.public
    assert imported.fingerprint == alice.fingerprint


def test_every_key_changes_the_fingerprint(alice: Identity) -> None:
    pub = alice.public
    for field in ("ml_dsa_65", "ed25519", "ml_kem_768", "x25519"):
        raw = bytearray(getattr(pub, field))
        raw[0] ^= 1
        changed = PublicKeySet(**{**_fields(pub), field: bytes(raw)})
        assert changed.fingerprint != pub.fingerprint, field


def test_wrong_sizes_and_suite_are_refused(alice: Identity) -> None:
    with pytest.raises(MalformedError, match="Ed25519"):
        PublicKeySet(**{**_fields(alice.public), "ed25519": b"\0" * 31})
    with pytest.raises(MalformedError, match="suite"):
        PublicKeySet(**{**_fields(alice.public), "suite": 2})
    with pytest.raises(MalformedError):
        Identity(b"\0" * 159)


def test_import_refuses_a_key_that_does_not_parse(alice: Identity) -> None:
    # An ML-KEM key whose coefficients are all 0xFFF (>= q) is invalid (FIPS 203 §7.2).
    bad = PublicKeySet(**{**_fields(alice.public), "ml_kem_768": b"\xff" * 1184})
    with pytest.raises(MalformedError, match="invalid"):
        PublicKeySet.decode(bad.encode())


def test_generated_identities_are_fresh() -> None:
    assert Identity.generate().fingerprint != Identity.generate().fingerprint
    assert seeded_identity("x").fingerprint == seeded_identity("x").fingerprint


def _fields(pub: PublicKeySet) -> dict[str, Any]:
    return {
        "ml_dsa_65": pub.ml_dsa_65,
        "ed25519": pub.ed25519,
        "ml_kem_768": pub.ml_kem_768,
        "x25519": pub.x25519,
        "suite": pub.suite,
    }
