"""Hybrid KEM: ML-KEM-768 + X25519, combined X-Wing style.

The shared secret is HKDF-SHA256 over both component secrets *and* both
ciphertexts and public keys (draft-connolly-cfrg-xwing-kem binds the X25519
ciphertext and key; we also bind the ML-KEM ones, which costs ~5 µs of hashing
and removes any reliance on ML-KEM's ciphertext-collision properties). The
result is secure as long as either component is.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dna_core.crypto import primitives as p
from dna_core.crypto.keys import Identity, PublicKeySet
from dna_core.errors import MalformedError, VerificationError

SHARED_SECRET_SIZE = 32
_COMBINER_SALT = p.label("hybrid-kem")


def _combine(
    ss_pq: bytes, ss_classic: bytes, ct_pq: bytes, ct_classic: bytes, pk: PublicKeySet
) -> bytes:
    ikm = ss_pq + ss_classic + ct_classic + pk.x25519 + ct_pq + pk.ml_kem_768
    hkdf = HKDF(hashes.SHA256(), SHARED_SECRET_SIZE, salt=_COMBINER_SALT, info=b"")
    return hkdf.derive(ikm)


def encapsulate(recipient: PublicKeySet) -> tuple[bytes, bytes, bytes]:
    """Return (shared_secret, ML-KEM ciphertext, ephemeral X25519 public key)."""
    ss_pq, ct_pq = recipient.ml_kem_key().encapsulate()
    ephemeral = x25519.X25519PrivateKey.generate()
    ct_classic = ephemeral.public_key().public_bytes_raw()
    ss_classic = ephemeral.exchange(recipient.x25519_key())
    return _combine(ss_pq, ss_classic, ct_pq, ct_classic, recipient), ct_pq, ct_classic


def decapsulate(identity: Identity, ct_pq: bytes, ct_classic: bytes) -> bytes:
    """Recover the shared secret. A wrong key gives a different secret (ML-KEM's
    implicit rejection), which the caller's AEAD then refuses."""
    if len(ct_pq) != p.ML_KEM_768_CIPHERTEXT or len(ct_classic) != p.X25519_PUBLIC:
        raise MalformedError("hybrid KEM ciphertext has the wrong size")
    try:
        ss_pq = identity.ml_kem.decapsulate(ct_pq)
        peer = x25519.X25519PublicKey.from_public_bytes(ct_classic)
        ss_classic = identity.x25519.exchange(peer)
    except ValueError as exc:  # e.g. a low-order X25519 point gives an all-zero secret
        raise VerificationError("hybrid KEM ciphertext rejected") from exc
    return _combine(ss_pq, ss_classic, ct_pq, ct_classic, identity.public)
