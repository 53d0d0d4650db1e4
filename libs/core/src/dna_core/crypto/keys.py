"""User identities: the hybrid key set and its fingerprint.

An identity is four key pairs: ML-DSA-65 + Ed25519 (signing) and ML-KEM-768 +
X25519 (key encapsulation). All four are derived from 160 bytes of seeds, which
is what the keystore encrypts at rest. The fingerprint, SHA-256 over a fixed
layout of the four public keys, is the identity's stable, collision-resistant name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypeVar, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from dna_core.crypto import primitives as p
from dna_core.errors import MalformedError
from dna_core.wire import decode_message, encode_message
from dna_core.wire.gen.dna.v1 import common_pb2

K = TypeVar("K")

SEEDS_SIZE = p.ML_DSA_65_SEED + p.SEED_32 + p.ML_KEM_768_SEED + p.SEED_32  # 160
CANONICAL_PUBLIC_SIZE = (
    2 + p.ML_DSA_65_PUBLIC + p.ED25519_PUBLIC + p.ML_KEM_768_PUBLIC + p.X25519_PUBLIC
)  # 3202
MAX_PUBLIC_KEY_SET_BYTES = 4096
_FINGERPRINT_LABEL = p.label("fingerprint")


@dataclass(frozen=True, eq=False)
class PublicKeySet:
    """The public half of an identity, validated on construction.

    Key objects are parsed lazily and cached, so a key set that is reused (a
    contact) pays the parsing once.
    """

    ml_dsa_65: bytes
    ed25519: bytes
    ml_kem_768: bytes
    x25519: bytes
    suite: int = p.SUITE_HYBRID_V1
    _cache: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.suite != p.SUITE_HYBRID_V1:
            raise MalformedError(f"public key set: unknown suite {self.suite}")
        for name, value, size in (
            ("ML-DSA-65", self.ml_dsa_65, p.ML_DSA_65_PUBLIC),
            ("Ed25519", self.ed25519, p.ED25519_PUBLIC),
            ("ML-KEM-768", self.ml_kem_768, p.ML_KEM_768_PUBLIC),
            ("X25519", self.x25519, p.X25519_PUBLIC),
        ):
            if len(value) != size:
                raise MalformedError(
                    f"public key set: {name} key is {len(value)} bytes, not {size}"
                )

    def canonical(self) -> bytes:
        """The fixed 3,202-byte layout: suite (u16) || ML-DSA || Ed25519 || ML-KEM || X25519."""
        return (
            self.suite.to_bytes(2, "big")
            + self.ml_dsa_65
            + self.ed25519
            + self.ml_kem_768
            + self.x25519
        )

    @cached_property
    def fingerprint(self) -> bytes:
        """SHA-256(label || canonical layout): 32 bytes."""
        return p.sha256(_FINGERPRINT_LABEL, self.canonical())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKeySet) and self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    # Parsed key objects. Parsing can fail on bytes of the right length that are
    # not a valid key (e.g. an ML-KEM key with out-of-range coefficients).
    def ml_dsa_key(self) -> MLDSA65PublicKey:
        return self._parsed("ml_dsa", MLDSA65PublicKey.from_public_bytes, self.ml_dsa_65)

    def ed25519_key(self) -> Ed25519PublicKey:
        return self._parsed("ed", Ed25519PublicKey.from_public_bytes, self.ed25519)

    def ml_kem_key(self) -> MLKEM768PublicKey:
        return self._parsed("ml_kem", MLKEM768PublicKey.from_public_bytes, self.ml_kem_768)

    def x25519_key(self) -> X25519PublicKey:
        return self._parsed("x", X25519PublicKey.from_public_bytes, self.x25519)

    def _parsed(self, slot: str, parse: Callable[[bytes], K], raw: bytes) -> K:
        cached = self._cache.get(slot)
        if cached is None:
            try:
                cached = parse(raw)
            except ValueError as exc:
                raise MalformedError(f"public key set: invalid {slot} key") from exc
            self._cache[slot] = cached
        return cast(K, cached)

    def to_proto(self) -> common_pb2.PublicKeySet:
        return common_pb2.PublicKeySet(
            suite=self.suite,  # type: ignore[arg-type]
            ml_dsa_65=self.ml_dsa_65,
            ed25519=self.ed25519,
            ml_kem_768=self.ml_kem_768,
            x25519=self.x25519,
        )

    @classmethod
    def from_proto(cls, msg: common_pb2.PublicKeySet) -> PublicKeySet:
        return cls(
            ml_dsa_65=msg.ml_dsa_65,
            ed25519=msg.ed25519,
            ml_kem_768=msg.ml_kem_768,
            x25519=msg.x25519,
            suite=msg.suite,
        )

    def encode(self) -> bytes:
        """Export: the protobuf PublicKeySet (what `identity export` writes)."""
        return encode_message(self.to_proto())

    @classmethod
    def decode(cls, data: bytes) -> PublicKeySet:
        """Import an exported key set; raises MalformedError. The same bytes give the same
        (immutable) object while recently decoded: a contact's keys come out of the cache
        for every message from it, and parsing ML-DSA and ML-KEM keys is the cost."""
        return _decode_key_set(bytes(data))


@functools.lru_cache(maxsize=256)  # ~6 KB each with the parsed keys
def _decode_key_set(data: bytes) -> PublicKeySet:
    msg = decode_message(
        common_pb2.PublicKeySet, data, max_size=MAX_PUBLIC_KEY_SET_BYTES, what="public key set"
    )
    keys = PublicKeySet.from_proto(msg)
    # Parse all four now: an imported set must be usable, not fail later.
    keys.ml_dsa_key(), keys.ed25519_key(), keys.ml_kem_key(), keys.x25519_key()
    return keys


class Identity:
    """A full identity: the four private keys and their public set."""

    def __init__(self, seeds: bytes) -> None:
        if len(seeds) != SEEDS_SIZE:
            raise MalformedError(f"identity seeds are {len(seeds)} bytes, not {SEEDS_SIZE}")
        self._seeds = bytes(seeds)
        a, b, c = p.ML_DSA_65_SEED, p.ML_DSA_65_SEED + p.SEED_32, SEEDS_SIZE - p.SEED_32
        try:
            self.ml_dsa = MLDSA65PrivateKey.from_seed_bytes(seeds[:a])
            self.ed25519 = Ed25519PrivateKey.from_private_bytes(seeds[a:b])
            self.ml_kem = MLKEM768PrivateKey.from_seed_bytes(seeds[b:c])
            self.x25519 = X25519PrivateKey.from_private_bytes(seeds[c:])
        except ValueError as exc:
            raise MalformedError("identity seeds do not form valid keys") from exc
        self.public = PublicKeySet(
            ml_dsa_65=self.ml_dsa.public_key().public_bytes_raw(),
            ed25519=self.ed25519.public_key().public_bytes_raw(),
            ml_kem_768=self.ml_kem.public_key().public_bytes_raw(),
            x25519=self.x25519.public_key().public_bytes_raw(),
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(SEEDS_SIZE))

    @property
    def fingerprint(self) -> bytes:
        return self.public.fingerprint

    def seeds(self) -> bytes:
        """The 160 secret bytes: ML-DSA seed || Ed25519 || ML-KEM seed (d||z) || X25519."""
        return self._seeds

    def __repr__(self) -> str:
        return f"Identity({self.fingerprint.hex()[:16]}…)"
