"""Node identities: ID = SHA-256(key), static puzzle, node signatures."""

from __future__ import annotations

import pytest
from dna_core.crypto.node import (
    NodeIdentity,
    node_id_of,
    puzzle_bits,
    verify_node_key,
    verify_node_signature,
)
from dna_core.crypto.primitives import sha256
from dna_core.errors import MalformedError, VerificationError


def test_generated_id_solves_the_puzzle() -> None:
    node, attempts = NodeIdentity.generate(puzzle=8)
    assert attempts >= 1
    assert node.node_id == sha256(node.public_key)
    assert puzzle_bits(node.node_id) >= 8
    assert verify_node_key(node.public_key, 8) == node.node_id


def test_key_that_misses_the_puzzle_is_refused() -> None:
    while True:  # find a key whose ID has no leading zero bit in its second hash
        node = NodeIdentity(NodeIdentity.generate(0)[0].seed())
        if puzzle_bits(node.node_id) == 0:
            break
    with pytest.raises(VerificationError, match="puzzle"):
        verify_node_key(node.public_key, 1)


def test_wrong_key_size_is_malformed() -> None:
    with pytest.raises(MalformedError):
        verify_node_key(b"\0" * 31, 0)


def test_seed_round_trip() -> None:
    node, _ = NodeIdentity.generate(0)
    assert NodeIdentity(node.seed()).node_id == node.node_id == node_id_of(node.public_key)


def test_node_signatures() -> None:
    node, _ = NodeIdentity.generate(0)
    other, _ = NodeIdentity.generate(0)
    sig = node.sign(b"sync", b"body")
    verify_node_signature(node.public_key, b"sync", b"body", sig)
    for key, domain, body in (
        (other.public_key, b"sync", b"body"),
        (node.public_key, b"other", b"body"),
        (node.public_key, b"sync", b"bodY"),
        (b"\0" * 5, b"sync", b"body"),
    ):
        with pytest.raises(VerificationError):
            verify_node_signature(key, domain, body, sig)
