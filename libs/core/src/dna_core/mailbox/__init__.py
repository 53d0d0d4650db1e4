"""Mailbox contracts shared by storage nodes and peers: identifiers, proof-of-work
binding, owner-signed fetch/delete requests with replay protection, fetch sessions."""

from dna_core.mailbox.auth import (
    FetchSession,
    NonceCache,
    OwnerRequest,
    SessionStore,
    fetch_body,
    fetch_cursor,
    open_session,
    session_fetch,
    sign_delete,
    sign_fetch,
    verify_delete,
    verify_fetch,
)
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash

__all__ = [
    "FetchSession",
    "NonceCache",
    "OwnerRequest",
    "SessionStore",
    "blob_id",
    "fetch_body",
    "fetch_cursor",
    "mailbox_id",
    "open_session",
    "put_pow_hash",
    "session_fetch",
    "sign_delete",
    "sign_fetch",
    "verify_delete",
    "verify_fetch",
]
