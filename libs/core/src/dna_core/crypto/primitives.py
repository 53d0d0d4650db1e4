"""Sizes, domain labels and small helpers shared by the crypto suite.

Every hash, KDF and signature input starts with a distinct ASCII label, so a
value made for one purpose can never be accepted for another.
"""

from __future__ import annotations

import hashlib
import struct

SUITE_HYBRID_V1 = 1

ML_DSA_65_PUBLIC = 1952
ML_DSA_65_SIGNATURE = 3309
ML_DSA_65_SEED = 32
ML_KEM_768_PUBLIC = 1184
ML_KEM_768_CIPHERTEXT = 1088
ML_KEM_768_SEED = 64
ED25519_PUBLIC = 32
ED25519_SIGNATURE = 64
X25519_PUBLIC = 32
SEED_32 = 32
FINGERPRINT_SIZE = 32
HYBRID_SIGNATURE_SIZE = ML_DSA_65_SIGNATURE + ED25519_SIGNATURE  # 3373
AES_GCM_NONCE = 12
AES_GCM_TAG = 16


def sha256(*parts: bytes) -> bytes:
    """SHA-256 over the concatenation of ``parts``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.digest()


def u64(value: int) -> bytes:
    """Big-endian unsigned 64-bit encoding (refuses values that do not fit)."""
    return struct.pack(">Q", value)


def label(name: str) -> bytes:
    """The domain label ``dna/v1/<name>`` with a length prefix, so labels never run into data."""
    raw = f"dna/v1/{name}".encode()
    return bytes([len(raw)]) + raw


def leading_zero_bits(digest: bytes) -> int:
    """How many leading zero bits ``digest`` has."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()
