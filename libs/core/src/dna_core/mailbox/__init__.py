"""Mailbox contracts shared by storage nodes and peers: identifiers, proof-of-work
binding, owner-signed fetch/delete requests with replay protection, fetch sessions, the
wire rules of blobs and tombstones (``codec``), the client's sans-I/O planner
(``planner``) and its asyncio adapter, `MailboxClient` (``client``), with its stream
sessions and push subscriptions (``session``).

Services, tools and benches import from ``dna_core.mailbox`` only, never a module under
it (tests/core/test_package_faces.py keeps to that). The adapter's names load on first
use: the storage node uses the codec and the rules, and should not load the client.
"""

import importlib
from typing import TYPE_CHECKING, Any

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
from dna_core.mailbox.planner import (
    FETCH_BUDGET_BYTES,
    HANDOFF_CANDIDATES,
    MAX_POW_BITS,
    REPLICAS,
    WRITE_QUORUM,
    Ask,
    FetchState,
    Finished,
    Put,
    PutResult,
    QuorumError,
    ReadPlan,
    ReplicaSetCache,
    TooFewNodesError,
    UnreachableError,
    Wait,
    WritePlan,
    mailbox_candidates,
    replica_set,
    replica_set_depth,
    storage_candidates,
)

if TYPE_CHECKING:
    from dna_core.mailbox.client import DELETE_BATCH_IDS, DeleteResult, MailboxClient
    from dna_core.mailbox.session import NoSession, SessionPool, Subscription, status_error

# The asyncio adapter: name -> the module that defines it (loaded by __getattr__).
_ADAPTER = {
    "DELETE_BATCH_IDS": "dna_core.mailbox.client",
    "DeleteResult": "dna_core.mailbox.client",
    "MailboxClient": "dna_core.mailbox.client",
    "NoSession": "dna_core.mailbox.session",
    "SessionPool": "dna_core.mailbox.session",
    "Subscription": "dna_core.mailbox.session",
    "status_error": "dna_core.mailbox.session",
}


def __getattr__(name: str) -> Any:
    if name not in _ADAPTER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_ADAPTER[name]), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


__all__ = [
    "DELETE_BATCH_IDS",
    "FETCH_BUDGET_BYTES",
    "HANDOFF_CANDIDATES",
    "MAX_DELETE_IDS",
    "MAX_POW_BITS",
    "MAX_STORED_INT",
    "PUT_VERSION",
    "REPLICAS",
    "WRITE_QUORUM",
    "Ask",
    "DeleteResult",
    "FetchSession",
    "FetchState",
    "Finished",
    "MailboxClient",
    "MailboxRules",
    "NoSession",
    "NonceCache",
    "OwnerRequest",
    "Put",
    "PutResult",
    "QuorumError",
    "ReadPlan",
    "ReplicaSetCache",
    "SessionPool",
    "SessionStore",
    "StoredBlob",
    "Subscription",
    "Tombstone",
    "TooFewNodesError",
    "UnreachableError",
    "Wait",
    "WritePlan",
    "blob_id",
    "blob_proto",
    "check_addressed",
    "check_put",
    "fetch_body",
    "fetch_cursor",
    "fetched_blob",
    "mailbox_candidates",
    "mailbox_id",
    "open_session",
    "put_pow_hash",
    "put_request",
    "replica_set",
    "replica_set_depth",
    "session_fetch",
    "sign_delete",
    "sign_fetch",
    "status_error",
    "storage_candidates",
    "tombstone_proto",
    "tombstone_ttl_ms",
    "verify_delete",
    "verify_fetch",
]
