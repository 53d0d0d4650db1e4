"""The Mailbox gRPC service of a storage node: put, fetch since a cursor, delete.

Every request passes the same gates before it touches storage: strict decoding,
envelope-to-mailbox binding (a put must carry an envelope addressed to the
owner of that mailbox), admission (size, proof of work, rate, quota, disk),
owner signatures with a time window and nonce cache for fetch and delete. A
refused request changes nothing and gets a distinct status with a reason;
rate limits add `retry-after-ms`, proof-of-work refusals `dna-pow-required`
(trailing metadata) so clients can retry.

The Sync* RPCs serve replica anti-entropy between storage nodes (replication.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from dna_core.crypto.envelope import decode_envelope
from dna_core.crypto.pow import Proof
from dna_core.errors import ConflictError, MalformedError, ProtocolError, VerificationError
from dna_core.mailbox import (
    NonceCache,
    SessionStore,
    blob_id,
    fetch_cursor,
    mailbox_id,
    put_pow_hash,
    verify_delete,
    verify_fetch,
)
from dna_core.ratelimit import grpc_peer_ip
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc

from dna_storage.admission import Admission, PowRequired, RateLimited, rejection_reason
from dna_storage.backends.base import (
    MailboxBackend,
    Page,
    PutOutcome,
    StoredBlob,
    Tombstone,
    Usage,
)
from dna_storage.replication import (
    MAX_SYNC_ITEMS,
    accept,
    blob_proto,
    tombstone_proto,
    verify_proof,
)

Ctx = grpc.aio.ServicerContext[Any, Any]
DAY_S = 86_400
PUT_VERSION = 1
PAGE_BYTES = 2 * 1024 * 1024  # half the gRPC message limit: room for framing
MAX_PUT_BATCH = 64  # puts per PutMany call


@dataclass(frozen=True)
class Retention:
    default_ttl_s: int = 30 * DAY_S
    max_ttl_s: int = 30 * DAY_S

    @property
    def tombstone_ttl_ms(self) -> int:
        """Tombstones outlive any blob they can delete, so repair never resurrects it."""
        return (self.max_ttl_s + DAY_S) * 1000

    def expiry_ms(self, requested_s: int, now_ms: int) -> int:
        ttl = min(requested_s or self.default_ttl_s, self.max_ttl_s)
        return now_ms + ttl * 1000


def _cut_by_bytes(page: Page, budget: int) -> tuple[list[StoredBlob], int, bool]:
    """The page's first blobs that fit ``budget`` bytes (always at least one), so a
    response never outgrows the gRPC message limit; the cursor stops where it was cut."""
    taken: list[StoredBlob] = []
    size = 0
    for blob in page.blobs:
        if taken and size + len(blob.blob) > budget:
            return taken, taken[-1].seq, True
        taken.append(blob)
        size += len(blob.blob)
    return taken, page.next_cursor, page.more


def _deleted() -> ConflictError:
    return ConflictError("blob was deleted by its owner")


def _retry_after_ms(exc: RateLimited) -> int:
    return max(1, round(exc.retry_after_s * 1000))


def encode_cursor(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def decode_cursor(cursor: bytes) -> int:
    if cursor and len(cursor) != 8:
        raise MalformedError("fetch: cursor is not one this node issued")
    return int.from_bytes(cursor, "big") if cursor else 0


def peer_ip(context: Ctx) -> str:
    return grpc_peer_ip(context.peer() or "unknown")


class MailboxService(mailbox_pb2_grpc.MailboxServicer):
    def __init__(
        self,
        backend: MailboxBackend,
        admission: Admission,
        *,
        retention: Retention | None = None,
        nonces: NonceCache | None = None,
        sessions: SessionStore | None = None,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        monotonic: Callable[[], float] = time.monotonic,
        on_outcome: Callable[[str, str], None] = lambda method, outcome: None,
        sync_puzzle_bits: int | None = None,
        node_id: bytes | None = None,
    ) -> None:
        self.backend, self.admission = backend, admission
        self.retention = retention or Retention()
        self.nonces = nonces if nonces is not None else NonceCache()  # empty is falsy
        self.sessions = sessions if sessions is not None else SessionStore()
        self.wall_ms, self.monotonic, self.on_outcome = wall_ms, monotonic, on_outcome
        self.sync_puzzle_bits = sync_puzzle_bits  # None: refuse replica sync
        self.node_id = node_id  # None: refuse fetches addressed to named nodes

    async def Put(  # noqa: N802 (gRPC method names)
        self, request: mailbox_pb2.PutRequest, context: Ctx
    ) -> mailbox_pb2.PutResponse:
        now_ms = self.wall_ms()
        try:
            blob = await self._admit(request, peer_ip(context), now_ms, {})
        except ProtocolError as exc:
            await self._refuse(context, "put", exc)
        (outcome,) = await self.backend.put_many([blob], now_ms)
        if outcome is PutOutcome.TOMBSTONED:
            await self._refuse(context, "put", _deleted())
        self.on_outcome("put", "ok")
        return mailbox_pb2.PutResponse(
            blob_id=blob.blob_id, acknowledged_replicas=1, expires_ms=blob.expires_ms
        )

    async def PutMany(  # noqa: N802
        self, request: mailbox_pb2.PutManyRequest, context: Ctx
    ) -> mailbox_pb2.PutManyResponse:
        """Each put judged as `Put` judges it, in order (so the rate limits and quotas
        count the earlier ones); the admitted ones stored in one backend call, which the
        SQLite backend commits as one group."""
        now_ms = self.wall_ms()
        if not 1 <= len(request.puts) <= MAX_PUT_BATCH:
            exc = MalformedError(f"put many: {len(request.puts)} puts, not 1..{MAX_PUT_BATCH}")
            await self._refuse(context, "put", exc)
        source = peer_ip(context)
        outcomes: list[mailbox_pb2.PutOutcome] = []
        admitted: list[tuple[mailbox_pb2.PutOutcome, StoredBlob]] = []
        in_call: dict[bytes, Usage] = {}  # usage after this call's earlier puts
        for put in request.puts:
            try:
                blob = await self._admit(put, source, now_ms, in_call)
            except ProtocolError as exc:
                outcomes.append(self._refused(exc))
                continue
            outcomes.append(mailbox_pb2.PutOutcome())
            admitted.append((outcomes[-1], blob))
        stored = await self.backend.put_many([blob for _, blob in admitted], now_ms)
        for (result, blob), outcome in zip(admitted, stored, strict=True):
            if outcome is PutOutcome.TOMBSTONED:
                result.CopyFrom(self._refused(_deleted()))
                continue
            result.blob_id, result.expires_ms = blob.blob_id, blob.expires_ms
            self.on_outcome("put", "ok")
        return mailbox_pb2.PutManyResponse(outcomes=outcomes)

    async def _admit(
        self,
        request: mailbox_pb2.PutRequest,
        source_ip: str,
        now_ms: int,
        in_call: dict[bytes, Usage],
    ) -> StoredBlob:
        """One put through every gate (module docstring), or raise why not. ``in_call``
        carries a mailbox's usage between the puts of one PutMany: read once, then counted
        forward, so the quota sees the earlier puts of the same call."""
        self._check_put(request)
        box = request.mailbox_id
        proof = Proof.from_proto(request.pow) if request.HasField("pow") else None
        self.admission.precheck_put(
            source_ip=source_ip, mailbox_id=box, blob_len=len(request.blob),
            proof=proof, now_s=self.monotonic(),
        )  # fmt: skip
        usage = in_call.get(box) or await self.backend.usage(box, now_ms)  # not for a flood
        self.admission.admit_put(
            source_ip=source_ip, mailbox_id=box, blob_len=len(request.blob), proof=proof,
            payload_hash=put_pow_hash(box, request.blob),
            now_s=self.monotonic(), now_ms=now_ms, usage=usage,
        )  # fmt: skip
        in_call[box] = Usage(usage.blobs + 1, usage.bytes + len(request.blob))
        return StoredBlob(
            box, blob_id(request.blob), request.blob, now_ms,
            self.retention.expiry_ms(request.ttl_s, now_ms),
        )  # fmt: skip

    def _refused(self, exc: ProtocolError) -> mailbox_pb2.PutOutcome:
        """A put's refusal inside PutMany: what `_refuse` puts in status and metadata."""
        self.on_outcome("put", rejection_reason(exc))
        return mailbox_pb2.PutOutcome(
            code=getattr(grpc.StatusCode, exc.grpc_code).value[0],
            reason=exc.reason,
            pow_required=exc.required_bits if isinstance(exc, PowRequired) else 0,
            retry_after_ms=_retry_after_ms(exc) if isinstance(exc, RateLimited) else 0,
        )

    def _check_put(self, request: mailbox_pb2.PutRequest) -> None:
        if request.version != PUT_VERSION:
            raise MalformedError(f"put: unknown version {request.version}")
        if len(request.mailbox_id) != 32:
            raise MalformedError("put: mailbox ID is not 32 bytes")
        envelope = decode_envelope(request.blob)  # cheap: parse and sizes, no crypto
        if mailbox_id(envelope.recipient) != request.mailbox_id:
            raise MalformedError("put: the envelope is addressed to another mailbox")

    async def Fetch(  # noqa: N802
        self, request: mailbox_pb2.FetchRequest, context: Ctx
    ) -> mailbox_pb2.FetchResponse:
        now_ms = self.wall_ms()
        try:
            owner, body = verify_fetch(
                request, now_ms=now_ms, nonces=self.nonces, node_id=self.node_id,
                sessions=self.sessions,
            )  # fmt: skip
            cursor = decode_cursor(fetch_cursor(body, self.node_id))
        except ProtocolError as exc:
            await self._refuse(context, "fetch", exc)
        page = await self.backend.fetch(owner.mailbox_id, cursor, body.limit, now_ms)
        blobs, next_cursor, more = _cut_by_bytes(page, PAGE_BYTES)
        self.on_outcome("fetch", "ok")
        response = mailbox_pb2.FetchResponse(
            blobs=[blob_proto(b) for b in blobs],
            next_cursor=encode_cursor(next_cursor),
            more=more,
        )
        if body.open_session:  # only a signed request may ask (verify_fetch)
            response.session.CopyFrom(self.sessions.grant(owner.owner, now_ms))
        return response

    async def Delete(  # noqa: N802
        self, request: mailbox_pb2.DeleteRequest, context: Ctx
    ) -> mailbox_pb2.DeleteResponse:
        now_ms = self.wall_ms()
        try:
            owner, body = verify_delete(request, now_ms=now_ms, nonces=self.nonces)
        except ProtocolError as exc:
            await self._refuse(context, "delete", exc)
        authorization = request.SerializeToString(deterministic=True)
        expires = now_ms + self.retention.tombstone_ttl_ms
        tombstones = [
            Tombstone(owner.mailbox_id, bid, now_ms, expires, authorization)
            for bid in body.blob_ids
        ]
        deleted = await self.backend.delete(tombstones, now_ms)
        self.on_outcome("delete", "ok")
        return mailbox_pb2.DeleteResponse(deleted=deleted)

    # -- replica sync (node-authenticated; see replication.py) -----------------------

    async def _authorize_sync(
        self, context: Ctx, proof: mailbox_pb2.NodeProof, method: str, subject: bytes
    ) -> None:
        """Only storage nodes, proving their node key for this method and subject."""
        try:
            if self.sync_puzzle_bits is None:
                raise VerificationError("replica sync is disabled on this node")
            verify_proof(proof, method, subject, puzzle_bits=self.sync_puzzle_bits)
        except ProtocolError as exc:
            await self._refuse(context, "sync", exc)

    async def SyncDigest(  # noqa: N802
        self, request: mailbox_pb2.SyncDigestRequest, context: Ctx
    ) -> mailbox_pb2.SyncDigestResponse:
        subject = request.range_start + request.range_end
        await self._authorize_sync(context, getattr(request, "from"), "SyncDigest", subject)
        digests = await self.backend.digests(request.range_start, request.range_end, self.wall_ms())
        return mailbox_pb2.SyncDigestResponse(
            mailboxes=[
                mailbox_pb2.MailboxDigest(
                    mailbox_id=d.mailbox_id,
                    digest=d.digest,
                    blobs=d.blobs,
                    tombstones=d.tombstones,
                )
                for d in digests[:MAX_SYNC_ITEMS]
            ]
        )

    async def SyncList(  # noqa: N802
        self, request: mailbox_pb2.SyncListRequest, context: Ctx
    ) -> mailbox_pb2.SyncListResponse:
        await self._authorize_sync(
            context, getattr(request, "from"), "SyncList", request.mailbox_id
        )
        ids, tombstones = await self.backend.ids(request.mailbox_id, self.wall_ms())
        return mailbox_pb2.SyncListResponse(
            blob_ids=ids, tombstones=[tombstone_proto(t) for t in tombstones]
        )

    async def SyncPull(  # noqa: N802
        self, request: mailbox_pb2.SyncPullRequest, context: Ctx
    ) -> mailbox_pb2.SyncPullResponse:
        await self._authorize_sync(
            context, getattr(request, "from"), "SyncPull", request.mailbox_id
        )
        ids = list(request.blob_ids)[:MAX_SYNC_ITEMS]
        blobs = await self.backend.get_blobs(request.mailbox_id, ids, self.wall_ms())
        return mailbox_pb2.SyncPullResponse(blobs=[blob_proto(b) for b in blobs])

    async def SyncPush(  # noqa: N802
        self, request: mailbox_pb2.SyncPushRequest, context: Ctx
    ) -> mailbox_pb2.SyncPushResponse:
        await self._authorize_sync(
            context, getattr(request, "from"), "SyncPush", request.mailbox_id
        )
        stored, tombed = await accept(
            self.backend, request.mailbox_id, request.blobs, request.tombstones,
            self.retention.max_ttl_s * 1000,
        )  # fmt: skip
        return mailbox_pb2.SyncPushResponse(stored=stored, tombstoned=tombed)

    async def _refuse(self, context: Ctx, method: str, exc: ProtocolError) -> NoReturn:
        self.on_outcome(method, rejection_reason(exc) if method == "put" else "refused")
        metadata: list[tuple[str, str]] = []
        if isinstance(exc, RateLimited):
            metadata.append(("retry-after-ms", str(_retry_after_ms(exc))))
        if isinstance(exc, PowRequired):
            metadata.append(("dna-pow-required", str(exc.required_bits)))
        if metadata:
            context.set_trailing_metadata(tuple(metadata))
        await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.reason)
        raise AssertionError("abort returned")  # grpc's abort always raises
