"""Mailbox contracts shared by storage nodes and peers: identifiers, proof-of-work
binding, and owner-signed fetch/delete requests with replay protection."""

from dna_core.mailbox.auth import (
    NonceCache,
    OwnerRequest,
    fetch_cursor,
    sign_delete,
    sign_fetch,
    verify_delete,
    verify_fetch,
)
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash

__all__ = [
    "NonceCache",
    "OwnerRequest",
    "blob_id",
    "fetch_cursor",
    "mailbox_id",
    "put_pow_hash",
    "sign_delete",
    "sign_fetch",
    "verify_delete",
    "verify_fetch",
]
