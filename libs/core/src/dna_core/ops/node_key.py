"""A node's key on disk: the 32-byte Ed25519 seed, readable by its owner only, written whole
or not at all (`dna_core.files.write_atomic`): a node killed while minting it starts next
time with a new key, not a torn one it cannot read."""

from __future__ import annotations

from pathlib import Path

from dna_core.crypto.node import NodeIdentity, puzzle_bits
from dna_core.errors import MalformedError
from dna_core.files import write_atomic


def create_node_key(path: Path, puzzle: int) -> tuple[NodeIdentity, int]:
    """Mint a node key solving ``puzzle`` bits and write it to ``path`` (mode 0600)."""
    node, attempts = NodeIdentity.generate(puzzle)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, node.seed(), mode=0o600, overwrite=False)
    return node, attempts


def load_node_key(path: Path, puzzle: int) -> NodeIdentity:
    """Read a node key and check it still solves the network's puzzle."""
    node = NodeIdentity(path.read_bytes())
    if puzzle_bits(node.node_id) < puzzle:
        raise MalformedError(f"{path}: node ID does not solve the {puzzle}-bit puzzle")
    return node


def load_or_create_node_key(path: Path, puzzle: int) -> tuple[NodeIdentity, bool]:
    """The node's key, minted on first start; returns (key, created)."""
    if path.exists():
        return load_node_key(path, puzzle), False
    return create_node_key(path, puzzle)[0], True
