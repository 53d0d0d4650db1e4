"""Mailbox identifiers.

* mailbox ID = SHA-256(label("mailbox") || owner fingerprint): public, so anyone
  can find the k = 5 storage nodes closest to it; it reveals no more than the
  fingerprint itself.
* blob ID = SHA-256(blob): blobs are content-addressed, so replicas merge by union.
* a put's proof of work is bound to SHA-256(label("mailbox-put") || mailbox ID ||
  blob ID): it cannot be reused for another blob or another mailbox.
"""

from __future__ import annotations

from dna_core.crypto import primitives as p


def mailbox_id(fingerprint: bytes) -> bytes:
    return p.sha256(p.label("mailbox"), fingerprint)


def blob_id(blob: bytes) -> bytes:
    return p.sha256(blob)


def put_pow_hash(mailbox: bytes, blob: bytes) -> bytes:
    return p.sha256(p.label("mailbox-put"), mailbox, blob_id(blob))
