"""The post-quantum hybrid crypto suite of DNA Messenger (``cryptography`` >= 47 only).

* ``keys`` - identities (ML-DSA-65 + Ed25519, ML-KEM-768 + X25519) and fingerprints
* ``signature`` - hybrid signatures (both halves must verify)
* ``kem`` - X-Wing-style hybrid KEM
* ``envelope`` - sealed-sender message envelopes and the replay guard
* ``keystore`` - private keys at rest (Argon2id + AES-256-GCM)
* ``records`` - signed records with sequence number and expiry
* ``pow`` - hashcash proof of work
* ``node`` - overlay node identities with the S/Kademlia static puzzle
"""

from dna_core.crypto.envelope import OpenedMessage, ReplayGuard, open_envelope, seal
from dna_core.crypto.keys import Identity, PublicKeySet
from dna_core.crypto.node import NodeIdentity, verify_node_key
from dna_core.crypto.records import VerifiedRecord, open_record, sign_record

__all__ = [
    "Identity",
    "NodeIdentity",
    "OpenedMessage",
    "PublicKeySet",
    "ReplayGuard",
    "VerifiedRecord",
    "open_envelope",
    "open_record",
    "seal",
    "sign_record",
    "verify_node_key",
]
