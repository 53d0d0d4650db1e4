"""The mailbox's wire rules, in one place for the storage node and the client.

A stored blob and a tombstone are domain objects here (`StoredBlob`, `Tombstone`); the
protobuf messages carrying them are built and judged only in this module:

* a put: `put_request` builds it (the client), `check_put` judges its form (the node:
  version, mailbox ID, and that its envelope is addressed to that mailbox);
* "this envelope is for this mailbox" (`check_addressed`): the binding every put and
  every synced blob must keep, so a mailbox holds only what was sent to its owner;
* a blob or tombstone from another replica (`MailboxRules.check_blob`,
  `MailboxRules.check_tombstone`): held to what a client's put or delete is held to;
* a blob a node returned to a fetch (`fetched_blob`): it must hash to its ID (a replica
  cannot alter a blob); the client does not judge its proof of work, the nodes did.

Integers from the wire are range-checked where they are decoded, before they reach a
backend's signed 64-bit columns (``MAX_STORED_INT``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dna_core.crypto import pow
from dna_core.crypto.envelope import decode_envelope
from dna_core.crypto.pow import Proof
from dna_core.errors import MalformedError, VerificationError
from dna_core.mailbox.auth import verify_delete
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash
from dna_core.wire import decode_message
from dna_core.wire.gen.dna.v1 import mailbox_pb2

PUT_VERSION = 1
MAX_STORED_INT = (1 << 63) - 1  # SQLite INTEGER and Redis scores/INCR: signed 64-bit
TOMBSTONE_LINGER_MS = 86_400_000  # how much longer than any blob a tombstone lives
MAX_AUTHORIZATION_BYTES = 64 * 1024  # a tombstone's signed delete


@dataclass(frozen=True, slots=True)
class StoredBlob:
    mailbox_id: bytes
    blob_id: bytes
    blob: bytes
    stored_ms: int
    expires_ms: int
    seq: int = 0  # assigned by the backend; 0 outside it (a fetched blob)
    # The put's proof of work, kept so that replicas can check it again in sync (and its
    # timestamp bounds the expiry); None for blobs stored before it was kept, and for a
    # blob a client fetched (it does not judge the proof).
    pow: Proof | None = None


@dataclass(frozen=True, slots=True)
class Tombstone:
    mailbox_id: bytes
    blob_id: bytes
    deleted_ms: int
    expires_ms: int
    authorization: bytes  # the owner's signed DeleteRequest, checked again by peers in repair


def blob_proto(b: StoredBlob) -> mailbox_pb2.StoredBlob:
    out = mailbox_pb2.StoredBlob(
        blob_id=b.blob_id, blob=b.blob, stored_ms=b.stored_ms, expires_ms=b.expires_ms
    )
    if b.pow is not None:
        out.pow.CopyFrom(b.pow.to_proto())
    return out


def tombstone_proto(t: Tombstone) -> mailbox_pb2.Tombstone:
    return mailbox_pb2.Tombstone(
        blob_id=t.blob_id, deleted_ms=t.deleted_ms, expires_ms=t.expires_ms,
        authorization=t.authorization,
    )  # fmt: skip


def put_request(box: bytes, blob: bytes, proof: Proof, ttl_s: int) -> mailbox_pb2.PutRequest:
    return mailbox_pb2.PutRequest(
        version=PUT_VERSION, mailbox_id=box, blob=blob, pow=proof.to_proto(), ttl_s=ttl_s
    )


def check_addressed(blob: bytes, box: bytes, what: str) -> None:
    """The envelope in ``blob`` is addressed to the owner of mailbox ``box``. Cheap: it
    parses the envelope and checks its sizes, no cryptography."""
    if mailbox_id(decode_envelope(blob).recipient) != box:
        raise MalformedError(
            f"{what}: the envelope is addressed to another mailbox", kind="mailbox"
        )


def check_put(request: mailbox_pb2.PutRequest) -> None:
    """A put's form (admission judges its size, proof of work, rate and quota)."""
    if request.version != PUT_VERSION:
        raise MalformedError(f"put: unknown version {request.version}", kind="version")
    if len(request.mailbox_id) != 32:
        raise MalformedError("put: mailbox ID is not 32 bytes", kind="mailbox")
    check_addressed(request.blob, request.mailbox_id, "put")


def fetched_blob(box: bytes, stored: mailbox_pb2.StoredBlob) -> StoredBlob:
    """A blob from a node's fetch answer, or VerificationError when it does not hash to
    its ID (the client drops it: another replica may hold it intact)."""
    if blob_id(stored.blob) != stored.blob_id:
        raise VerificationError("fetch: blob does not hash to its ID")
    return StoredBlob(box, stored.blob_id, stored.blob, stored.stored_ms, stored.expires_ms)


def tombstone_ttl_ms(max_ttl_ms: int) -> int:
    """Tombstones outlive any blob they can delete (by a day), so repair never
    resurrects it."""
    return max_ttl_ms + TOMBSTONE_LINGER_MS


def _check_time(value: int, now_ms: int, what: str) -> int:
    """A time a peer says something happened: not after now (plus the skew a proof of
    work may have), which also keeps it inside a signed 64-bit column."""
    if value > now_ms + pow.MAX_SKEW_MS:
        raise MalformedError(f"sync: {what} {value} is in the future")
    return value


def _check_expiry(value: int, what: str) -> int:
    if value > MAX_STORED_INT:
        raise MalformedError(f"sync: {what} {value} out of range")
    return value


@dataclass(frozen=True)
class MailboxRules:
    """What a blob or tombstone from another node must pass: what a client's write passes.

    ``min_pow_bits`` is the node's base difficulty (a put admitted under load needed more,
    but the load then is unknown here). The proof's timestamp proves when the blob was
    first stored, within the proof's window: a blob lives at most ``max_ttl_ms`` from it,
    so a blob that expired everywhere cannot come back with a fresh expiry."""

    max_blob_bytes: int
    min_pow_bits: int
    max_ttl_ms: int

    @property
    def tombstone_ttl_ms(self) -> int:
        return tombstone_ttl_ms(self.max_ttl_ms)

    def check_blob(self, box: bytes, stored: mailbox_pb2.StoredBlob, now_ms: int) -> StoredBlob:
        """A blob from another replica, held to the same rules as a client's put."""
        stored_ms = _check_time(stored.stored_ms, now_ms, "stored time")
        _check_expiry(stored.expires_ms, "expiry")
        if len(stored.blob) > self.max_blob_bytes:
            raise MalformedError(f"sync: blob of {len(stored.blob)} bytes over the size cap")
        if blob_id(stored.blob) != stored.blob_id:
            raise VerificationError("sync: blob does not hash to its ID")
        check_addressed(stored.blob, box, "sync")
        if not stored.HasField("pow"):
            raise VerificationError("sync: blob carries no proof of work")
        proof = Proof.from_proto(stored.pow)
        pow.verify(
            proof, put_pow_hash(box, stored.blob), required=self.min_pow_bits, now_ms=now_ms,
            max_age_ms=self.max_ttl_ms,  # older: expired whatever the blob claims
        )  # fmt: skip
        expires = min(stored.expires_ms, proof.timestamp_ms + self.max_ttl_ms)
        return StoredBlob(box, stored.blob_id, stored.blob, stored_ms, expires, pow=proof)

    def check_tombstone(self, box: bytes, tomb: mailbox_pb2.Tombstone, now_ms: int) -> Tombstone:
        """A tombstone is only as good as the owner's signed delete it carries; it lives
        at most ``tombstone_ttl_ms`` from that delete."""
        deleted = _check_time(tomb.deleted_ms, now_ms, "deletion time")
        _check_expiry(tomb.expires_ms, "tombstone expiry")
        request = decode_message(
            mailbox_pb2.DeleteRequest, tomb.authorization, max_size=MAX_AUTHORIZATION_BYTES,
            what="tombstone",
        )  # fmt: skip
        owner, body = verify_delete(request, now_ms=deleted, nonces=None)
        if owner.mailbox_id != box or tomb.blob_id not in body.blob_ids:
            raise VerificationError("sync: tombstone not authorized by the mailbox owner")
        expires = min(tomb.expires_ms, deleted + self.tombstone_ttl_ms)
        return Tombstone(box, tomb.blob_id, deleted, expires, tomb.authorization)
