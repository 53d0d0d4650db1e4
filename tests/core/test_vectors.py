"""Known-answer vectors of our v1 formats (committed in vectors/v1.json).

A change that fails here breaks compatibility with every existing v1 identity,
key file, record or envelope: bump the format version instead of the vectors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from dna_core.crypto import Identity, ReplayGuard, keystore, open_envelope, open_record, signature
from dna_core.crypto.envelope import Header, _aead_key_nonce
from dna_core.crypto.kem import _combine
from dna_core.crypto.node import NodeIdentity, puzzle_bits
from dna_core.crypto.pow import Proof, verify
from dna_core.crypto.primitives import ED25519_SIGNATURE, ML_DSA_65_SIGNATURE
from dna_core.errors import VerificationError

V: dict[str, Any] = json.loads((Path(__file__).parent / "vectors" / "v1.json").read_text())
NOW = V["now_ms"]


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity(bytes.fromhex(V["alice_seeds"]))


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity(bytes.fromhex(V["bob_seeds"]))


def _seed(name: str, size: int) -> bytes:
    return hashlib.shake_256(f"dna-vectors/{name}".encode()).digest(size)


def test_fingerprints_and_export(alice: Identity, bob: Identity) -> None:
    assert alice.fingerprint.hex() == V["alice_fingerprint"]
    assert bob.fingerprint.hex() == V["bob_fingerprint"]
    assert hashlib.sha256(alice.public.encode()).hexdigest() == V["alice_public_export_sha256"]


def test_kem_combiner(bob: Identity) -> None:
    parts = bytes.fromhex(V["kem_combiner"]["inputs"])
    out = _combine(parts[:32], parts[32:64], _seed("ct-pq", 1088), parts[64:], bob.public)
    assert out.hex() == V["kem_combiner"]["out"]


def test_header_transcript_and_aead_derivation(bob: Identity) -> None:
    header = Header(bob.fingerprint, NOW, _seed("message-id", 16))
    assert header.transcript().hex() == V["header_transcript"]
    aead, nonce = _aead_key_nonce(bytes.fromhex(V["aead_key_nonce"]["shared"]), header)
    assert nonce.hex() == V["aead_key_nonce"]["nonce"]
    assert aead.encrypt(nonce, b"probe", b"").hex() == V["aead_key_nonce"]["probe"]


def test_committed_envelope_opens(alice: Identity, bob: Identity) -> None:
    opened = open_envelope(
        bytes.fromhex(V["envelope"]["hex"]), bob, now_ms=NOW, replay_guard=ReplayGuard()
    )
    assert opened.payload.hex() == V["envelope"]["payload"]
    assert opened.sender == alice.public


def test_committed_signature_verifies_and_ed25519_half_is_exact(alice: Identity) -> None:
    sig = V["signature"]
    domain, message = sig["domain"].encode(), bytes.fromhex(sig["message"])
    committed = bytes.fromhex(sig["hex"])
    signature.verify(alice.public, domain, message, committed)
    # Ed25519 is deterministic, so this pins the exact signed transcript.
    fresh = signature.sign(alice, domain, message)
    assert fresh[ML_DSA_65_SIGNATURE:] == committed[ML_DSA_65_SIGNATURE:]
    assert len(fresh[ML_DSA_65_SIGNATURE:]) == ED25519_SIGNATURE


def test_committed_record_opens(alice: Identity) -> None:
    rec = open_record(bytes.fromhex(V["record"]["hex"]), now_ms=NOW)
    assert rec.body.seq == V["record"]["seq"]
    assert rec.signer == alice.public


def test_committed_key_file_unlocks(alice: Identity) -> None:
    kf = V["keyfile"]
    assert keystore.unlock(bytes.fromhex(kf["hex"]), kf["passphrase"]).seeds() == alice.seeds()


def test_committed_proof_of_work_verifies() -> None:
    w = V["pow"]
    proof = Proof(w["difficulty"], w["timestamp_ms"], w["nonce"])
    payload_hash = bytes.fromhex(w["payload_hash"])
    verify(proof, payload_hash, required=w["difficulty"], now_ms=NOW)
    # bound to its payload: the same proof for another hash is refused
    with pytest.raises(VerificationError):
        verify(proof, bytes(32), required=w["difficulty"], now_ms=NOW)


def test_node_identity() -> None:
    n = V["node"]
    node = NodeIdentity(bytes.fromhex(n["seed"]))
    assert node.node_id.hex() == n["node_id"]
    assert puzzle_bits(node.node_id) == n["puzzle_bits"]
    assert node.sign(b"vectors", b"node message").hex() == n["signature"]
