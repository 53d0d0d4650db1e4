"""Mailbox contracts shared by storage nodes and peers: identifiers, proof-of-work
binding, owner-signed fetch/delete requests with replay protection, fetch sessions, and
the wire rules of blobs and tombstones (``codec``).

Services, tools and benches import from ``dna_core.mailbox`` only, never a module under
it (tests/core/test_package_faces.py keeps to that).
"""

from dna_core.mailbox.auth import (
    MAX_DELETE_IDS,
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
from dna_core.mailbox.codec import (
    MAX_STORED_INT,
    PUT_VERSION,
    MailboxRules,
    StoredBlob,
    Tombstone,
    blob_proto,
    check_addressed,
    check_put,
    fetched_blob,
    put_request,
    tombstone_proto,
    tombstone_ttl_ms,
)
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash

__all__ = [
    "MAX_DELETE_IDS",
    "MAX_STORED_INT",
    "PUT_VERSION",
    "FetchSession",
    "MailboxRules",
    "NonceCache",
    "OwnerRequest",
    "SessionStore",
    "StoredBlob",
    "Tombstone",
    "blob_id",
    "blob_proto",
    "check_addressed",
    "check_put",
    "fetch_body",
    "fetch_cursor",
    "fetched_blob",
    "mailbox_id",
    "open_session",
    "put_pow_hash",
    "put_request",
    "session_fetch",
    "sign_delete",
    "sign_fetch",
    "tombstone_proto",
    "tombstone_ttl_ms",
    "verify_delete",
    "verify_fetch",
]
