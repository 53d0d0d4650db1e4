"""Write the known-answer vectors of our own formats (tests/core/vectors/v1.json).

Run once per format version. Regenerating v1 after a change defeats its purpose:
a change that makes tests/core/test_vectors.py fail breaks compatibility with
every v1 peer, so it needs a new version number (and a v2 vector file) instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dna_core.crypto import Identity, keystore, open_record, seal, sign_record, signature
from dna_core.crypto.envelope import Header, _aead_key_nonce
from dna_core.crypto.kem import _combine
from dna_core.crypto.keys import SEEDS_SIZE
from dna_core.crypto.keystore import KdfParams
from dna_core.crypto.node import NodeIdentity, puzzle_bits
from dna_core.crypto.pow import solve
from dna_core.wire.gen.dna.v1 import common_pb2

OUT = Path(__file__).resolve().parent.parent / "tests" / "core" / "vectors" / "v1.json"
NOW = 1_780_000_000_000


def _seed(name: str, size: int) -> bytes:
    return hashlib.shake_256(f"dna-vectors/{name}".encode()).digest(size)


def main() -> None:
    alice, bob = Identity(_seed("alice", SEEDS_SIZE)), Identity(_seed("bob", SEEDS_SIZE))
    header = Header(bob.fingerprint, NOW, _seed("message-id", 16))
    key_material = _seed("kem-parts", 32 * 3)
    combined = _combine(
        key_material[:32], key_material[32:64], _seed("ct-pq", 1088), key_material[64:], bob.public
    )
    aead, nonce = _aead_key_nonce(_seed("shared", 32), header)
    node = NodeIdentity(_seed("node", 32))
    pow_hash = hashlib.sha256(b"vector payload").digest()
    proof, _ = solve(pow_hash, 12, now_ms=NOW)
    record = sign_record(
        alice, kind=common_pb2.RECORD_KIND_IDENTITY, key=_seed("record-key", 32), seq=42,
        now_ms=NOW, ttl_ms=10**12, payload=b"identity payload",
    )  # fmt: skip
    open_record(record, now_ms=NOW)
    vectors = {
        "note": "DNA v1 known answers; see scripts/make_vectors.py. Never regenerate v1.",
        "now_ms": NOW,
        "alice_seeds": alice.seeds().hex(),
        "bob_seeds": bob.seeds().hex(),
        "alice_fingerprint": alice.fingerprint.hex(),
        "bob_fingerprint": bob.fingerprint.hex(),
        "alice_public_export_sha256": hashlib.sha256(alice.public.encode()).hexdigest(),
        "kem_combiner": {
            "inputs": key_material.hex(),
            "ct_pq_seed": "ct-pq",
            "out": combined.hex(),
        },
        "header_transcript": header.transcript().hex(),
        "aead_key_nonce": {
            "shared": _seed("shared", 32).hex(),
            "nonce": nonce.hex(),
            "probe": aead.encrypt(nonce, b"probe", b"").hex(),
        },
        "envelope": {
            "hex": seal(
                alice, bob.public, b"known answer", now_ms=NOW, include_sender_keys=True
            ).hex(),
            "payload": b"known answer".hex(),
        },
        "signature": {
            "domain": "vectors",
            "message": b"signed vector".hex(),
            "hex": signature.sign(alice, b"vectors", b"signed vector").hex(),
        },
        "record": {"hex": record.hex(), "seq": 42},
        "keyfile": {
            "hex": keystore.lock(alice, "vector passphrase", KdfParams(1024, 1, 1)).hex(),
            "passphrase": "vector passphrase",
        },
        "pow": {
            "payload_hash": pow_hash.hex(),
            "difficulty": proof.difficulty,
            "timestamp_ms": proof.timestamp_ms,
            "nonce": proof.nonce,
        },
        "node": {
            "seed": node.seed().hex(),
            "node_id": node.node_id.hex(),
            "puzzle_bits": puzzle_bits(node.node_id),
            "signature": node.sign(b"vectors", b"node message").hex(),
        },
    }
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
