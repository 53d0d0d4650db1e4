"""Hybrid signatures: ML-DSA-65 and Ed25519 over the same domain-separated message.

A signature is ML-DSA-65 (3,309 bytes) || Ed25519 (64 bytes); it verifies only
when *both* halves do, so forging it requires breaking both algorithms. Both
halves sign M' = label("sig") || len(domain) || domain || message, which binds
every signature to the purpose it was made for (record, envelope, mailbox-auth...).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature

from dna_core.crypto import primitives as p
from dna_core.crypto.keys import Identity, PublicKeySet
from dna_core.errors import VerificationError

_SIG_LABEL = p.label("sig")


def _transcript(domain: bytes, message: bytes) -> bytes:
    if not 0 < len(domain) < 256:
        raise ValueError("signature domain must be 1..255 bytes")
    return _SIG_LABEL + bytes([len(domain)]) + domain + message


def sign(identity: Identity, domain: bytes, message: bytes) -> bytes:
    """Sign ``message`` for ``domain`` with both halves of the identity."""
    m = _transcript(domain, message)
    return identity.ml_dsa.sign(m) + identity.ed25519.sign(m)


def verify(signer: PublicKeySet, domain: bytes, message: bytes, signature: bytes) -> None:
    """Return if both halves verify, else raise VerificationError."""
    if len(signature) != p.HYBRID_SIGNATURE_SIZE:
        raise VerificationError(
            f"hybrid signature is {len(signature)} bytes, not {p.HYBRID_SIGNATURE_SIZE}"
        )
    m = _transcript(domain, message)
    pq, classic = signature[: p.ML_DSA_65_SIGNATURE], signature[p.ML_DSA_65_SIGNATURE :]
    try:
        signer.ml_dsa_key().verify(pq, m)
    except InvalidSignature:
        raise VerificationError("ML-DSA-65 half of the signature does not verify") from None
    try:
        signer.ed25519_key().verify(classic, m)
    except InvalidSignature:
        raise VerificationError("Ed25519 half of the signature does not verify") from None
