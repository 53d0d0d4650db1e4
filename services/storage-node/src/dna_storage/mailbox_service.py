"""The Mailbox gRPC service of a storage node: put, fetch since a cursor, delete.

Every request passes the same gates before it touches storage: strict decoding,
envelope-to-mailbox binding (a put must carry an envelope addressed to the
owner of that mailbox), admission (size, proof of work, rate, quota, disk),
owner signatures with a time window and nonce cache for fetch and delete. A
refused request changes nothing and gets a distinct status with a reason;
rate limits add `retry-after-ms`, proof-of-work refusals `dna-pow-required`
(trailing metadata) so clients can retry.

The Sync* RPCs serve replica anti-entropy between storage nodes (replication.py): only
to the mailbox's replicas as this node sees them, bounded in bytes and items, and every
blob pushed or pulled is judged as a put is.

Integers from the wire are range-checked here, where they are decoded, before anything
reaches a backend (signed 64-bit columns): a fetch cursor, a put's TTL (capped) and its
proof of work's timestamp (within its window); sync times in ``SyncRules``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from dna_core import trace
from dna_core.crypto import pow
from dna_core.crypto.pow import Proof
from dna_core.errors import (
    ConflictError,
    ExpiredError,
    MalformedError,
    ProtocolError,
    VerificationError,
)
from dna_core.mailbox import (
    MAX_STORED_INT,
    NonceCache,
    OwnerRequest,
    SessionStore,
    blob_id,
    blob_proto,
    check_put,
    fetch_cursor,
    put_pow_hash,
    tombstone_ttl_ms,
    verify_delete,
    verify_fetch,
)
from dna_core.ops.answers import large_answer
from dna_core.overlay import Contact
from dna_core.ratelimit import grpc_peer_ip
from dna_core.wire import mailbox_pb2, mailbox_pb2_grpc

from dna_storage.admission import Admission, PowRequired, RateLimited
from dna_storage.backends.base import (
    MailboxBackend,
    Page,
    PutOutcome,
    Quota,
    StoredBlob,
    Tombstone,
    TombstoneBoundError,
    Usage,
)
from dna_storage.replication import (
    MAX_SYNC_IDS,
    MAX_SYNC_ITEMS,
    SYNC_BYTES,
    ReplicaView,
    SyncRules,
    accept,
    check_mailbox_id,
    compare_answer,
    compare_problem,
    compare_subject,
    list_answer,
    pull_answer,
    verify_proof,
)

log = logging.getLogger("dna.storage")

Ctx = grpc.aio.ServicerContext[Any, Any]
SyncRequest = (
    mailbox_pb2.SyncListRequest | mailbox_pb2.SyncPullRequest | mailbox_pb2.SyncPushRequest
)
DAY_S = 86_400
PAGE_BYTES = 2 * 1024 * 1024  # half the gRPC message limit: room for framing
MAX_PUT_BATCH = 64  # puts per PutMany call
# PutMany batches (unary or on sessions) judged and written at once on the node: each holds
# up to the 4 MiB message limit several times over while judged (its blobs, their envelopes
# decoded, the rows written), ~16 MiB; the others wait their turn, already read.
BATCHES_AT_ONCE = 4
DELETE_ADMISSION = frozenset({"rate", "tombstones"})  # a delete's refusals counted by kind


@dataclass(frozen=True)
class Retention:
    default_ttl_s: int = 30 * DAY_S
    max_ttl_s: int = 30 * DAY_S

    @property
    def tombstone_ttl_ms(self) -> int:
        return tombstone_ttl_ms(self.max_ttl_s * 1000)

    def expiry_ms(self, requested_s: int, now_ms: int, proof_ms: int) -> int:
        """Counted from the put's proof-of-work timestamp, not from its arrival: a replay of
        the same put gets the same expiry, on every replica. At least the proof's own
        lifetime, so no blob expires while its put can still be replayed (a replay would
        store it again, with a new seq); never past ``max_ttl_s`` from now or the proof."""
        ttl_ms = max(min(requested_s or self.default_ttl_s, self.max_ttl_s) * 1000, pow.MAX_AGE_MS)
        return min(proof_ms + ttl_ms, now_ms + self.max_ttl_s * 1000)


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


def _not_stored(outcome: PutOutcome, quota: Quota) -> ProtocolError | None:
    """Why an admitted put was still not stored (a duplicate was stored before: fine)."""
    if outcome is PutOutcome.OVER_QUOTA:
        return quota.refused_at_write()
    if outcome is PutOutcome.TOMBSTONED:
        return ConflictError("blob was deleted by its owner", kind="deleted")
    if outcome is PutOutcome.EXPIRED:
        return ExpiredError("blob expired: its proof of work is too old for its TTL")
    return None


def encode_cursor(seq: int, incarnation: bytes) -> bytes:
    return incarnation + seq.to_bytes(8, "big")


def decode_cursor(cursor: bytes, incarnation: bytes) -> int:
    """The seq a fetch cursor stands for: ``incarnation || seq`` (16 bytes), or a bare
    8-byte seq from nodes before incarnations. A cursor from an earlier incarnation of the
    store (wiped and refilled by repair, its seqs counting from 1 again) reads from the
    start: taken as is, it would hide every blob stored since, up to its old seq. The
    client drops what it already has by blob ID."""
    if not cursor:
        return 0
    if len(cursor) not in (8, 8 + len(incarnation)):
        raise MalformedError("fetch: cursor is not one this node issued")
    seq = int.from_bytes(cursor[-8:], "big")
    if seq > MAX_STORED_INT:
        raise MalformedError("fetch: cursor is not one this node issued")
    if len(cursor) > 8 and cursor[:-8] != incarnation:
        return 0
    return seq


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
        replica_view: ReplicaView | None = None,
        node_id: bytes | None = None,
        batches_at_once: int = BATCHES_AT_ONCE,
    ) -> None:
        self.backend, self.admission = backend, admission
        self.batches = asyncio.Semaphore(batches_at_once)  # PutMany judged at once
        self.retention = retention or Retention()
        self.nonces = nonces if nonces is not None else NonceCache()  # empty is falsy
        self.sessions = sessions if sessions is not None else SessionStore()
        self.wall_ms, self.monotonic, self.on_outcome = wall_ms, monotonic, on_outcome
        self.sync_puzzle_bits = sync_puzzle_bits  # None: refuse replica sync
        self.replica_view = replica_view  # None: refuse replica sync
        self.sync_rules = SyncRules(
            admission.config.max_blob_bytes, admission.config.pow_base_bits,
            self.retention.max_ttl_s * 1000, admission.quota,
        )  # fmt: skip
        self.node_id = node_id  # None: refuse fetches addressed to named nodes
        self._writes: set[asyncio.Future[list[PutOutcome]]] = set()  # see `_write`

    async def Put(  # noqa: N802 (gRPC method names)
        self, request: mailbox_pb2.PutRequest, context: Ctx
    ) -> mailbox_pb2.PutResponse:
        try:
            return await self.put_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def put_one(
        self,
        request: mailbox_pb2.PutRequest,
        source_ip: str,
        now_ms: int,
        store: Callable[[StoredBlob, int], Awaitable[PutOutcome]] | None = None,
    ) -> mailbox_pb2.PutResponse:
        """One put, as `Put` and a session judge it, or raise why not (counted).
        ``store`` writes the admitted blob (default: a backend call of its own; a session
        passes its group writer)."""
        write = store or self._store_alone
        try:
            blob = await self._admit(request, source_ip, now_ms, {})

            async def one() -> list[PutOutcome]:
                return [await write(blob, now_ms)]

            (outcome,) = await self._write(one(), [blob])
            if (why := _not_stored(outcome, self.admission.quota)) is not None:
                raise why
        except ProtocolError as exc:
            self.count_refusal("put", exc)
            raise
        self.on_outcome("put", "ok")
        return mailbox_pb2.PutResponse(
            blob_id=blob.blob_id, acknowledged_replicas=1, expires_ms=blob.expires_ms
        )

    async def _store_alone(self, blob: StoredBlob, now_ms: int) -> PutOutcome:
        (outcome,) = await self.backend.put_many([blob], now_ms, self.admission.quota)
        return outcome

    async def _write(
        self, write: Awaitable[list[PutOutcome]], blobs: list[StoredBlob]
    ) -> list[PutOutcome]:
        """``write``'s outcomes for ``blobs``; each put the backend refused for the quota
        (judged again where it writes, after puts admitted meanwhile) gives the mailbox's
        rate token back (``Admission.refund_put``: the source's stays spent). The write
        runs to its end even when its caller goes away meanwhile (a session reset, a
        cancelled call): a job handed to the writer is done anyway, and the mailbox's
        token of a put it refused is given back all the same."""
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        task.add_done_callback(lambda done: self._refund_over_quota(done, blobs))
        return await asyncio.shield(task)

    async def drain(self) -> None:
        """Wait for the writes whose callers went away (`_write`): at stop, before the
        backend closes under them (their refunds are due, their failures logged there)."""
        for outcome in await asyncio.gather(*self._writes, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, asyncio.CancelledError
            ):
                log.warning("a write left by its caller failed at stop: %s", outcome)

    def _refund_over_quota(
        self, done: asyncio.Future[list[PutOutcome]], blobs: list[StoredBlob]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # nothing known stored or refused: the caller (if any) sees why
        for blob, outcome in zip(blobs, done.result(), strict=True):
            if outcome is PutOutcome.OVER_QUOTA:
                self.admission.refund_put(mailbox_id=blob.mailbox_id, now_s=self.monotonic())

    async def PutMany(  # noqa: N802
        self, request: mailbox_pb2.PutManyRequest, context: Ctx
    ) -> mailbox_pb2.PutManyResponse:
        """Each put judged as `Put` judges it (`put_many_one`)."""
        try:
            return await self.put_many_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def put_many_one(
        self, request: mailbox_pb2.PutManyRequest, source: str, now_ms: int
    ) -> mailbox_pb2.PutManyResponse:
        """Each put judged as `Put` judges it, in order (so the rate limits and quotas
        count the earlier ones); the admitted ones stored in one backend call, which the
        SQLite backend commits as one group. A batch of 0 or over ``MAX_PUT_BATCH`` puts is
        refused whole (raised, counted)."""
        if not 1 <= len(request.puts) <= MAX_PUT_BATCH:
            exc = MalformedError(
                f"put many: {len(request.puts)} puts, not 1..{MAX_PUT_BATCH}", kind="batch"
            )
            self.count_refusal("put", exc)
            raise exc
        async with self.batches:
            return await self._put_many(request, source, now_ms)

    async def _put_many(
        self, request: mailbox_pb2.PutManyRequest, source: str, now_ms: int
    ) -> mailbox_pb2.PutManyResponse:
        outcomes: list[mailbox_pb2.PutOutcome] = []
        admitted: list[tuple[mailbox_pb2.PutOutcome, StoredBlob]] = []
        in_call: dict[bytes, Usage] = {}  # usage after this call's earlier puts
        received_ns = time.monotonic_ns()
        for put in request.puts:
            try:
                blob = await self._admit(put, source, now_ms, in_call)
            except ProtocolError as exc:
                outcomes.append(self._refused(exc))
                continue
            trace.mark("node.recv", blob.blob_id, received_ns)
            trace.mark("node.admitted", blob.blob_id)
            outcomes.append(mailbox_pb2.PutOutcome())
            admitted.append((outcomes[-1], blob))
        try:
            blobs = [blob for _, blob in admitted]
            stored = await self._write(
                self.backend.put_many(blobs, now_ms, self.admission.quota), blobs
            )
        except ProtocolError as exc:  # the store: full, unavailable, damaged
            # Each admitted put answers it, as its own Put would have; the puts refused
            # before keep their reasons. Failing the whole call reported a put refused for
            # the mailbox's quota as the node's failure, which the client hands off.
            for result, _ in admitted:
                result.CopyFrom(self._refused(exc))
            return mailbox_pb2.PutManyResponse(outcomes=outcomes)
        for (result, blob), outcome in zip(admitted, stored, strict=True):
            if (why := _not_stored(outcome, self.admission.quota)) is not None:
                result.CopyFrom(self._refused(why))
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
        check_put(request)
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
        assert proof is not None  # admit_put refuses a put without one
        return StoredBlob(
            box, blob_id(request.blob), request.blob, now_ms,
            self.retention.expiry_ms(request.ttl_s, now_ms, proof.timestamp_ms), pow=proof,
        )  # fmt: skip

    def _refused(self, exc: ProtocolError) -> mailbox_pb2.PutOutcome:
        """A put's refusal inside PutMany: what `_refuse` puts in status and metadata."""
        self.on_outcome("put", exc.kind)
        return mailbox_pb2.PutOutcome(
            code=getattr(grpc.StatusCode, exc.grpc_code).value[0],
            reason=exc.reason,
            pow_required=exc.required_bits if isinstance(exc, PowRequired) else 0,
            retry_after_ms=exc.retry_after_ms if isinstance(exc, RateLimited) else 0,
            deleted=exc.kind == "deleted",
            kind=exc.kind,
        )

    @large_answer
    async def Fetch(  # noqa: N802
        self, request: mailbox_pb2.FetchRequest, context: Ctx
    ) -> mailbox_pb2.FetchResponse:
        try:
            return await self.fetch_one(request, self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def fetch_one(
        self, request: mailbox_pb2.FetchRequest, now_ms: int, *, method: str = "fetch"
    ) -> mailbox_pb2.FetchResponse:
        """One fetch, as `Fetch` and a session judge it, or raise why not (counted under
        ``method``: a subscription's first page is a "subscribe")."""
        owner, body, cursor = await self.verify_fetch(request, now_ms, method=method)
        response = await self.read_page(owner.mailbox_id, cursor, body.limit, now_ms)
        self.on_outcome(method, "ok")
        if body.open_session:  # only a signed request may ask (verify_fetch)
            response.session.CopyFrom(self.sessions.grant(owner.owner, now_ms))
        return response

    async def verify_fetch(
        self, request: mailbox_pb2.FetchRequest, now_ms: int, *, method: str = "fetch"
    ) -> tuple[OwnerRequest, mailbox_pb2.FetchBody, int]:
        """The owner, body and cursor (a seq here) of a fetch, or raise why not (counted)."""
        try:
            owner, body = verify_fetch(
                request, now_ms=now_ms, nonces=self.nonces, node_id=self.node_id,
                sessions=self.sessions,
            )  # fmt: skip
            raw_cursor = fetch_cursor(body, self.node_id)
            cursor = decode_cursor(raw_cursor, await self.backend.incarnation())
        except ProtocolError as exc:
            self.count_refusal(method, exc)
            raise
        return owner, body, cursor

    async def read_page(
        self, box: bytes, cursor: int, limit: int, now_ms: int
    ) -> mailbox_pb2.FetchResponse:
        """The blobs after ``cursor`` (a seq), cut to one response's bytes by the backend,
        which reads no more than those (a page of ``limit`` max-size blobs read whole, then
        cut, held 1,000 x 256 KiB for a moment per fetch)."""
        incarnation = await self.backend.incarnation()
        page = await self.backend.fetch(box, cursor, limit, now_ms, max_bytes=PAGE_BYTES)
        blobs, next_cursor, more = _cut_by_bytes(page, PAGE_BYTES)
        return mailbox_pb2.FetchResponse(
            blobs=[blob_proto(b) for b in blobs],
            next_cursor=encode_cursor(next_cursor, incarnation),
            more=more,
        )

    async def Delete(  # noqa: N802
        self, request: mailbox_pb2.DeleteRequest, context: Ctx
    ) -> mailbox_pb2.DeleteResponse:
        try:
            return await self.delete_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def delete_one(
        self, request: mailbox_pb2.DeleteRequest, source_ip: str, now_ms: int
    ) -> mailbox_pb2.DeleteResponse:
        """One delete, as `Delete` and a session judge it, or raise why not (counted):
        signed by the owner, then admitted by what it would store (``_admit_delete``)."""
        try:
            owner, body = verify_delete(request, now_ms=now_ms, nonces=self.nonces)
            unheld = await self._admit_delete(owner.mailbox_id, body, source_ip, now_ms)
        except ProtocolError as exc:
            self.count_refusal("delete", exc)
            raise
        authorization = request.SerializeToString(deterministic=True)
        expires = now_ms + self.retention.tombstone_ttl_ms
        tombstones = [
            Tombstone(owner.mailbox_id, bid, now_ms, expires, authorization)
            for bid in body.blob_ids
        ]
        try:
            # The bounds again, where the write happens: concurrent deletes each passed the
            # admission against counts read before any of them was stored.
            bounds = self.admission.tombstone_bounds
            deleted = await self.backend.delete(tombstones, now_ms, bounds)
        except TombstoneBoundError as exc:
            if not exc.stored_some:  # else its first step, what it was charged for, stays
                now_s = self.monotonic()
                self.admission.refund_delete(source_ip=source_ip, unheld=unheld, now_s=now_s)
            self.count_refusal("delete", exc)
            raise
        self.on_outcome("delete", "ok")
        return mailbox_pb2.DeleteResponse(deleted=deleted)

    async def _admit_delete(
        self, box: bytes, body: mailbox_pb2.DeleteBody, source_ip: str, now_ms: int
    ) -> int:
        """Return how many IDs of a signed delete the node holds neither way if it may store
        its tombstones, or raise why not (``Admission.admit_delete``): IDs held cost nothing,
        the others are rated per source and bounded per mailbox and per node, so a delete of
        random IDs cannot make this node (and every replica repair spreads it to) store much
        more than it received. The bounds are checked here against counts read before the
        write (the fast path: a refusal costs no write) and again by the backend's write."""
        blobs, tombs = await self.backend.held(box, body.blob_ids, now_ms)
        unheld = len(set(body.blob_ids) - blobs - tombs)
        if unheld:
            now_s = self.monotonic()
            self.admission.precheck_delete(source_ip=source_ip, unheld=unheld, now_s=now_s)
            self.admission.admit_delete(
                source_ip=source_ip, unheld=unheld,
                tombstones=await self.backend.tombstones(box),
                node_unheld=await self.backend.unheld_tombstones(), now_s=now_s,
            )  # fmt: skip
        return unheld

    # The node serves `mailbox_stream.MailboxSessionService`, which has sessions; this one
    # (tests of the unary calls) says it has none, as an older node does.
    async def Session(  # type: ignore[override]  # noqa: N802 (a coroutine: mailbox_stream)
        self, requests: AsyncIterator[mailbox_pb2.SessionRequest], context: Ctx
    ) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Session: not served here")

    # -- replica sync (replicas only, bounded; see replication.py) -------------------

    @large_answer
    async def SyncList(  # noqa: N802
        self, request: mailbox_pb2.SyncListRequest, context: Ctx
    ) -> mailbox_pb2.SyncListResponse:
        try:
            return await self.sync_list_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    @large_answer
    async def SyncPull(  # noqa: N802
        self, request: mailbox_pb2.SyncPullRequest, context: Ctx
    ) -> mailbox_pb2.SyncPullResponse:
        try:
            return await self.sync_pull_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def SyncPush(  # noqa: N802
        self, request: mailbox_pb2.SyncPushRequest, context: Ctx
    ) -> mailbox_pb2.SyncPushResponse:
        try:
            return await self.sync_push_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def SyncCompare(  # noqa: N802
        self, request: mailbox_pb2.SyncCompareRequest, context: Ctx
    ) -> mailbox_pb2.SyncCompareResponse:
        try:
            return await self.sync_compare_one(request, peer_ip(context), self.wall_ms())
        except ProtocolError as exc:
            await self._refuse(context, exc)

    async def sync_compare_one(
        self, request: mailbox_pb2.SyncCompareRequest, source_ip: str, now_ms: int
    ) -> mailbox_pb2.SyncCompareResponse:
        """Which of the caller's mailboxes differ here (``compare_answer``), or raise why
        not (counted): signed by a storage node, one call of its rate, well formed, and
        the caller a replica of at least one of them (as this node sees it, from its
        cached lookups: a mailbox it is refused for is answered as differing, and its
        SyncList gets the fresh look)."""
        try:
            caller = self._sync_caller(request, "SyncCompare", compare_subject(request.mailboxes))
            assert self.replica_view is not None  # ``_sync_caller`` refuses without one
            self.replica_view.admit(caller, source_ip)
            if bad := compare_problem(request.mailboxes):
                raise MalformedError(bad)
            judged = {
                e.mailbox_id
                for e in request.mailboxes
                if await self.replica_view.is_replica(e.mailbox_id, caller)
            }
            if not judged:
                raise VerificationError(
                    "sync: the caller is among the replicas of none of these mailboxes"
                )
        except ProtocolError as exc:
            self.count_refusal("sync", exc)
            raise
        return await compare_answer(self.backend, request.mailboxes, judged, now_ms)

    async def sync_list_one(
        self, request: mailbox_pb2.SyncListRequest, source_ip: str, now_ms: int
    ) -> mailbox_pb2.SyncListResponse:
        """One page of a mailbox's listing, as `SyncList` and a session judge it, or raise
        why not (counted)."""
        bad = "sync: `after` is not an ID" if request.after and len(request.after) != 32 else ""
        await self._admit_sync(request, "SyncList", source_ip, push=False, malformed=bad)
        return await list_answer(self.backend, request.mailbox_id, request.after, now_ms)

    async def sync_pull_one(
        self, request: mailbox_pb2.SyncPullRequest, source_ip: str, now_ms: int
    ) -> mailbox_pb2.SyncPullResponse:
        """The blobs asked for, bounded, as `SyncPull` and a session judge it, or raise why
        not (counted)."""
        count = len(request.blob_ids)
        bad = (
            f"sync: pull of {count} IDs, not 1..{MAX_SYNC_IDS}"
            if not 1 <= count <= MAX_SYNC_IDS
            else ""
        )
        await self._admit_sync(request, "SyncPull", source_ip, push=False, malformed=bad)
        budget = min(request.max_bytes or SYNC_BYTES, SYNC_BYTES)
        return await pull_answer(self.backend, request.mailbox_id, request.blob_ids, budget, now_ms)

    async def sync_push_one(
        self, request: mailbox_pb2.SyncPushRequest, source_ip: str, now_ms: int
    ) -> mailbox_pb2.SyncPushResponse:
        """Store what a replica hands over, each item judged as a put is, as `SyncPush`
        and a session judge it; what this node now holds of it. Or raise why not (counted)."""
        box = request.mailbox_id
        counts = (len(request.blobs), len(request.tombstones), len(request.offered_ids))
        limits = (MAX_SYNC_ITEMS, MAX_SYNC_ITEMS, MAX_SYNC_IDS)
        over = any(n > limit for n, limit in zip(counts, limits, strict=True))
        bad = f"sync: push of {counts} (blobs, tombstones, IDs) over {limits}" if over else ""
        await self._admit_sync(request, "SyncPush", source_ip, push=True, malformed=bad)
        got = await accept(self.backend, box, request.blobs, request.tombstones, self.sync_rules)
        blobs, tombs = set(got.held_blobs), set(got.held_tombstones)
        if request.offered_ids:
            offered = await self.backend.held(box, request.offered_ids, now_ms)
            blobs |= offered[0]
            tombs |= offered[1]
        return mailbox_pb2.SyncPushResponse(
            stored=got.stored, tombstoned=got.tombstoned,
            blob_ids=sorted(blobs), tombstone_ids=sorted(tombs),
        )  # fmt: skip

    async def _admit_sync(
        self, request: SyncRequest, method: str, source_ip: str, *, push: bool, malformed: str
    ) -> None:
        """Authorized (``_authorize_sync``) first, then within its bounds (``malformed``
        says how it is not: the call's own check); or raise why not (counted)."""
        try:
            await self._authorize_sync(request, method, source_ip, push=push)
            if malformed:
                raise MalformedError(malformed)
        except ProtocolError as exc:
            self.count_refusal("sync", exc)
            raise

    async def _authorize_sync(
        self, request: SyncRequest, method: str, source_ip: str, *, push: bool
    ) -> None:
        """A storage node's key signed this call, and this node finds the caller among the
        mailbox's replicas (or, for a push, itself): ``ReplicaView.authorize``; or raise."""
        box = check_mailbox_id(request.mailbox_id)
        caller = self._sync_caller(request, method, box)
        assert self.replica_view is not None  # ``_sync_caller`` refuses without one
        await self.replica_view.authorize(box, caller, source_ip, push=push)

    def _sync_caller(
        self, request: SyncRequest | mailbox_pb2.SyncCompareRequest, method: str, subject: bytes
    ) -> Contact:
        """The storage node whose key signed ``method`` on ``subject``, or raise why not
        (sync disabled here, or a proof that does not verify)."""
        if self.sync_puzzle_bits is None or self.replica_view is None:
            raise VerificationError("replica sync is disabled on this node")
        proof = getattr(request, "from")  # a Python keyword: no attribute access
        return verify_proof(proof, method, subject, puzzle_bits=self.sync_puzzle_bits)

    def count_refusal(self, method: str, exc: ProtocolError) -> None:
        """A refusal in the requests metric: a put's by its kind, a delete's admission
        refusals too (``rate``, ``tombstones``), the others as "refused"."""
        by_kind = method == "put" or (method == "delete" and exc.kind in DELETE_ADMISSION)
        self.on_outcome(method, exc.kind if by_kind else "refused")

    async def _refuse(self, context: Ctx, exc: ProtocolError) -> NoReturn:
        """Abort the call with the refusal's status (the ``*_one`` handlers counted it)."""
        await context.abort(*status_of(exc), trailing_metadata(exc))
        raise AssertionError("abort returned")  # grpc's abort always raises


def status_of(exc: ProtocolError) -> tuple[grpc.StatusCode, str]:
    return getattr(grpc.StatusCode, exc.grpc_code), exc.reason


def trailing_metadata(exc: ProtocolError) -> tuple[tuple[str, str], ...]:
    """What a client needs to retry a refusal: ``retry-after-ms``, ``dna-pow-required``."""
    metadata: list[tuple[str, str]] = []
    if isinstance(exc, RateLimited):
        metadata.append(("retry-after-ms", str(exc.retry_after_ms)))
    if isinstance(exc, PowRequired):
        metadata.append(("dna-pow-required", str(exc.required_bits)))
    return tuple(metadata)


def request_status(exc: ProtocolError) -> mailbox_pb2.RequestStatus:
    """A refusal inside a session: what the unary call puts in its status and metadata."""
    return mailbox_pb2.RequestStatus(
        code=status_of(exc)[0].value[0],
        reason=exc.reason,
        pow_required=exc.required_bits if isinstance(exc, PowRequired) else 0,
        retry_after_ms=exc.retry_after_ms if isinstance(exc, RateLimited) else 0,
    )
