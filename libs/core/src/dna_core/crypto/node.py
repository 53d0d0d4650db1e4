"""Node identities for overlay members (bootstrap and storage nodes).

A node key is Ed25519; node ID = SHA-256(public key), so an ID cannot be claimed
without its key. S/Kademlia's static puzzle makes IDs costly to mint in bulk:
SHA-256(node ID) must have `puzzle_bits` leading zero bits, found by generating
keys until one fits (2^bits tries on average; verification is two hashes).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from dna_core.crypto import primitives as p
from dna_core.errors import MalformedError, VerificationError

NODE_ID_SIZE = 32
DEFAULT_PUZZLE_BITS = 8
MAX_PUZZLE_BITS = 32


def node_id_of(public_key: bytes) -> bytes:
    return p.sha256(public_key)


def puzzle_bits(node_id: bytes) -> int:
    return p.leading_zero_bits(p.sha256(node_id))


def verify_node_key(public_key: bytes, required_bits: int) -> bytes:
    """Check a contact's key proof; returns its node ID or raises."""
    if len(public_key) != p.ED25519_PUBLIC:
        raise MalformedError(f"node key is {len(public_key)} bytes, not {p.ED25519_PUBLIC}")
    node_id = node_id_of(public_key)
    if puzzle_bits(node_id) < required_bits:
        raise VerificationError(f"node ID does not solve the {required_bits}-bit static puzzle")
    return node_id


class NodeIdentity:
    """A node's private key with its ID."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise MalformedError("node key seed must be 32 bytes")
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes_raw()
        self.node_id = node_id_of(self.public_key)

    @classmethod
    def generate(cls, puzzle: int = DEFAULT_PUZZLE_BITS) -> tuple[NodeIdentity, int]:
        """Mint a key whose ID solves the puzzle; returns it with the number of keys tried."""
        if not 0 <= puzzle <= MAX_PUZZLE_BITS:
            raise ValueError(f"puzzle bits must be 0..{MAX_PUZZLE_BITS}")
        attempts = 0
        while True:
            attempts += 1
            node = cls(os.urandom(32))
            if puzzle_bits(node.node_id) >= puzzle:
                return node, attempts

    def seed(self) -> bytes:
        return self._key.private_bytes_raw()

    def sign(self, domain: bytes, message: bytes) -> bytes:
        return self._key.sign(p.label("node-sig") + bytes([len(domain)]) + domain + message)


def verify_node_signature(public_key: bytes, domain: bytes, message: bytes, sig: bytes) -> None:
    """Verify a NodeIdentity.sign signature; raises VerificationError."""
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(sig, p.label("node-sig") + bytes([len(domain)]) + domain + message)
    except (InvalidSignature, ValueError):
        raise VerificationError("node signature does not verify") from None
