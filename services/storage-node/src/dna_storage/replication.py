"""Replica anti-entropy between storage nodes.

Every ``interval`` a node walks the mailboxes it holds. For each, it finds the
R = 5 storage nodes closest to the mailbox (its rightful replicas) and, with
each of them: lists what the peer holds, pulls blobs and tombstones it lacks,
and pushes what the peer lacks. Pulling alone would never reach a replica that
lost everything (it does not know the mailbox exists); pushing alone would
never reach a node that was down when the data arrived. A node that took a
write by hinted hand-off pushes it to the rightful replicas the same way, and
drops its copy once all R of them report holding it.

Each pass also observes, per mailbox held, how many of the replica set hold the
mailbox's least-replicated item (``dna_storage_mailbox_replicas``).

Everything received is checked as if it came from a client: the blob must hash
to its ID and be an envelope for that mailbox; a tombstone must carry the
owner's signed delete naming it. Sync requests are signed by the sender's node
key (domain ``mailbox-sync``) and accepted only from storage nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import grpc
from dna_core.crypto.envelope import decode_envelope
from dna_core.crypto.node import NodeIdentity, verify_node_signature
from dna_core.crypto.primitives import u64
from dna_core.errors import ExpiredError, MalformedError, ProtocolError, VerificationError
from dna_core.mailbox import blob_id, mailbox_id, verify_delete
from dna_core.overlay.aio.node import OverlayNode
from dna_core.overlay.codec import contact_from_proto, contact_to_proto
from dna_core.overlay.contact import Contact, distance
from dna_core.wire import decode_message
from dna_core.wire.gen.dna.v1 import common_pb2, mailbox_pb2, mailbox_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dna_storage.backends.base import MailboxBackend, StoredBlob, Tombstone

log = logging.getLogger("dna.storage.repair")
SYNC_DOMAIN = b"mailbox-sync"
SYNC_WINDOW_MS = 5 * 60_000
MAX_SYNC_ITEMS = 500
REPAIR_RANGES = 256  # slices of the mailbox ID space a repair pass lists one at a time


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def id_ranges(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` (at most 256) ``[start, end)`` slices covering every ID, in ID order, by
    first byte: ``b""`` starts the first and ends the last (``digests``: no bound)."""
    cuts = [bytes([256 * i // count]) for i in range(1, count)]
    return list(zip([b"", *cuts], [*cuts, b""], strict=True))


def _signed(method: str, subject: bytes, timestamp_ms: int) -> bytes:
    return method.encode() + b"\0" + subject + u64(timestamp_ms)


def sign_proof(
    identity: NodeIdentity, contact: Contact, method: str, subject: bytes
) -> mailbox_pb2.NodeProof:
    now = _now_ms()
    return mailbox_pb2.NodeProof(
        sender=contact_to_proto(contact),
        timestamp_ms=now,
        signature=identity.sign(SYNC_DOMAIN, _signed(method, subject, now)),
    )


def verify_proof(
    proof: mailbox_pb2.NodeProof, method: str, subject: bytes, *, puzzle_bits: int
) -> Contact:
    """The authenticated storage node behind a sync request, or a ProtocolError."""
    sender = contact_from_proto(proof.sender, puzzle_bits)
    if sender.role != common_pb2.NODE_ROLE_STORAGE:
        raise VerificationError("sync: only storage nodes may sync replicas")
    if abs(proof.timestamp_ms - _now_ms()) > SYNC_WINDOW_MS:
        raise ExpiredError("sync: proof timestamp outside the window")
    message = _signed(method, subject, proof.timestamp_ms)
    verify_node_signature(sender.public_key, SYNC_DOMAIN, message, proof.signature)
    return sender


def check_blob(
    box: bytes, stored: mailbox_pb2.StoredBlob, now_ms: int, max_ttl_ms: int
) -> StoredBlob:
    """A blob from another replica, held to the same rules as a client's put."""
    if blob_id(stored.blob) != stored.blob_id:
        raise VerificationError("sync: blob does not hash to its ID")
    if mailbox_id(decode_envelope(stored.blob).recipient) != box:
        raise MalformedError("sync: the envelope is addressed to another mailbox")
    expires = min(stored.expires_ms, now_ms + max_ttl_ms)
    return StoredBlob(box, stored.blob_id, stored.blob, stored.stored_ms, expires)


def check_tombstone(box: bytes, tomb: mailbox_pb2.Tombstone) -> Tombstone:
    """A tombstone is only as good as the owner's signed delete it carries."""
    request = decode_message(
        mailbox_pb2.DeleteRequest, tomb.authorization, max_size=64 * 1024, what="tombstone"
    )
    owner, body = verify_delete(request, now_ms=tomb.deleted_ms, nonces=None)
    if owner.mailbox_id != box or tomb.blob_id not in body.blob_ids:
        raise VerificationError("sync: tombstone not authorized by the mailbox owner")
    return Tombstone(box, tomb.blob_id, tomb.deleted_ms, tomb.expires_ms, tomb.authorization)


def tombstone_proto(t: Tombstone) -> mailbox_pb2.Tombstone:
    return mailbox_pb2.Tombstone(
        blob_id=t.blob_id, deleted_ms=t.deleted_ms, expires_ms=t.expires_ms,
        authorization=t.authorization,
    )  # fmt: skip


def blob_proto(b: StoredBlob) -> mailbox_pb2.StoredBlob:
    return mailbox_pb2.StoredBlob(
        blob_id=b.blob_id, blob=b.blob, stored_ms=b.stored_ms, expires_ms=b.expires_ms
    )


async def accept(
    backend: MailboxBackend,
    box: bytes,
    blobs: Sequence[mailbox_pb2.StoredBlob],
    tombstones: Sequence[mailbox_pb2.Tombstone],
    max_ttl_ms: int,
) -> tuple[int, int]:
    """Store what passes the checks (the rest is dropped and logged); (blobs, tombstones)."""
    now = _now_ms()
    good_blobs, good_tombs = [], []
    for stored in blobs[:MAX_SYNC_ITEMS]:
        try:
            good_blobs.append(check_blob(box, stored, now, max_ttl_ms))
        except ProtocolError as exc:
            log.warning("refused a synced blob: %s", exc.reason)
    for tomb in tombstones[:MAX_SYNC_ITEMS]:
        try:
            good_tombs.append(check_tombstone(box, tomb))
        except ProtocolError as exc:
            log.warning("refused a synced tombstone: %s", exc.reason)
    if good_tombs:
        await backend.delete(good_tombs, now)
    outcomes = await backend.put_many(good_blobs, now) if good_blobs else []
    return sum(o.value == "stored" for o in outcomes), len(good_tombs)


@dataclass(frozen=True)
class Holdings:
    """The blob and tombstone IDs one node holds for one mailbox."""

    blob_ids: frozenset[bytes]
    tombstone_ids: frozenset[bytes]

    def settles_blob(self, blob_id: bytes) -> bool:
        """Holding a blob or its tombstone: either way the node needs nothing more for it."""
        return blob_id in self.blob_ids or blob_id in self.tombstone_ids


def copies(ours: Holdings, peers: Sequence[Holdings]) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """For each blob and each tombstone we hold, how many of ``peers`` hold it too."""
    blobs = {b: sum(p.settles_blob(b) for p in peers) for b in ours.blob_ids}
    tombs = {t: sum(t in p.tombstone_ids for p in peers) for t in ours.tombstone_ids}
    return blobs, tombs


@dataclass
class RepairMetrics:
    passes: Counter
    pulled: Counter
    pushed: Counter
    last_pass: Gauge
    pass_seconds: Gauge
    replicas: Histogram
    handoff_dropped: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry, replicas: int) -> RepairMetrics:
        return cls(
            Counter("dna_storage_repair_passes", "Anti-entropy passes", registry=registry),
            Counter("dna_storage_repair_pulled", "Blobs and tombstones pulled", registry=registry),
            Counter("dna_storage_repair_pushed", "Blobs and tombstones pushed", registry=registry),
            Gauge(
                "dna_storage_repair_last_pass_timestamp_seconds",
                "When the last pass ended",
                registry=registry,
            ),
            Gauge(
                "dna_storage_repair_last_pass_duration_seconds",
                "How long the last pass took",
                registry=registry,
            ),
            Histogram(
                "dna_storage_mailbox_replicas",
                "Per mailbox held, per repair pass: replicas of the mailbox's replica set found "
                "holding its least-replicated blob or tombstone (this node counts if it is one)",
                buckets=tuple(range(replicas + 1)),
                registry=registry,
            ),
            Counter(
                "dna_storage_handoff_dropped",
                "Hand-off blobs and tombstones dropped once every rightful replica held them",
                registry=registry,
            ),
        )


class Repairer:
    def __init__(
        self,
        node: OverlayNode,
        backend: MailboxBackend,
        *,
        max_ttl_ms: int,
        registry: CollectorRegistry,
        replicas: int = 5,
        interval_s: float = 60.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.node, self.backend = node, backend
        self.max_ttl_ms, self.replicas = max_ttl_ms, replicas
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.metrics = RepairMetrics.create(registry, replicas)

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.repair_once()
            except (grpc.aio.AioRpcError, ProtocolError, OSError) as exc:
                log.warning("repair pass failed: %s", exc)
            except Exception:  # a bug must not stop repair for good: log it, try next pass
                log.exception("repair pass crashed")

    async def repair_once(self) -> int:
        """One pass over every mailbox held; returns how many were synced.

        The mailbox ID space is walked in REPAIR_RANGES slices: listing everything at once
        would hold every blob ID of the node in memory (~100 MB at a million blobs)."""
        started = time.monotonic()
        synced = 0
        for start, end in id_ranges(REPAIR_RANGES):
            for digest in await self.backend.digests(start, end, _now_ms()):
                await self.sync_mailbox(digest.mailbox_id)
                synced += 1
        self.metrics.passes.inc()
        self.metrics.last_pass.set(time.time())
        self.metrics.pass_seconds.set(time.monotonic() - started)
        return synced

    async def replica_peers(self, box: bytes) -> tuple[list[Contact], bool]:
        """The other storage nodes of the mailbox's replica set (the R closest storage
        nodes), and whether this node is one of them. A lookup never returns the node that
        asks, so this node is placed by its own distance: otherwise a replica would take the
        (R+1)-th closest for a replica and keep pushing the mailbox to it."""
        found = await self.node.find_node(box)
        me = self.node.node_id
        others = [c for c in found if c.role == common_pb2.NODE_ROLE_STORAGE and c.node_id != me]
        others.sort(key=lambda c: distance(c.node_id, box))
        mine = distance(me, box)
        rightful = sum(distance(c.node_id, box) < mine for c in others) < self.replicas
        return others[: self.replicas - 1 if rightful else self.replicas], rightful

    async def sync_mailbox(self, box: bytes) -> None:
        peers, rightful = await self.replica_peers(box)
        our_ids, our_tombs = await self.backend.ids(box, _now_ms())
        ours = Holdings(frozenset(our_ids), frozenset(t.blob_id for t in our_tombs))
        views = await asyncio.gather(
            *(self._sync_with(peer, box, our_ids, our_tombs) for peer in peers)
        )
        answered = [v for v in views if v is not None]
        blob_copies, tomb_copies = copies(ours, answered)
        least = min((*blob_copies.values(), *tomb_copies.values()), default=None)
        if least is not None:
            self.metrics.replicas.observe(least + rightful)
        if not rightful:
            whole = self.replicas  # every rightful replica reported holding it
            await self._drop_handoff(
                box,
                [b for b, n in blob_copies.items() if n == whole],
                [t for t, n in tomb_copies.items() if n == whole],
            )

    async def _drop_handoff(self, box: bytes, blob_ids: list[bytes], tomb_ids: list[bytes]) -> None:
        """A node outside the replica set holds a mailbox only as a hinted hand-off copy:
        once all R rightful replicas report holding an item (their own SyncList answer,
        after an earlier pass pushed it), the copy here is surplus. Items not yet
        confirmed, and anything that arrived since the listing, stay for the next pass."""
        if not blob_ids and not tomb_ids:
            return
        removed = await self.backend.forget(box, blob_ids, tomb_ids)
        if removed:
            self.metrics.handoff_dropped.inc(removed)
            log.info("dropped a confirmed hand-off copy", extra={"removed": removed})

    def _stub(self, peer: Contact) -> mailbox_pb2_grpc.MailboxAsyncStub:
        return mailbox_pb2_grpc.MailboxStub(self.node.channels.get(peer.endpoint.grpc_target))

    def _proof(self, method: str, box: bytes) -> mailbox_pb2.NodeProof:
        assert self.node.contact is not None
        return sign_proof(self.node.identity, self.node.contact, method, box)

    async def _sync_with(
        self, peer: Contact, box: bytes, our_ids: list[bytes], our_tombs: list[Tombstone]
    ) -> Holdings | None:
        """List, pull and push with one replica; what it held before this exchange, or None
        when it did not answer (the next pass tries again)."""
        stub = self._stub(peer)
        try:
            theirs = await stub.SyncList(
                mailbox_pb2.SyncListRequest(
                    **{"from": self._proof("SyncList", box)}, mailbox_id=box
                ),
                timeout=self.timeout_s,
            )
            held = Holdings(
                frozenset(theirs.blob_ids), frozenset(t.blob_id for t in theirs.tombstones)
            )
            dead = held.tombstone_ids | {t.blob_id for t in our_tombs}
            await self._pull(stub, box, held.blob_ids - set(our_ids) - dead, theirs, our_tombs)
            await self._push(
                stub,
                box,
                [b for b in our_ids if not held.settles_blob(b)],
                [t for t in our_tombs if t.blob_id not in held.tombstone_ids],
            )
        except grpc.aio.AioRpcError as err:
            log.info("sync with %s failed: %s %s", peer.short(), err.code().name, err.details())
            return None
        return held

    async def _push(
        self,
        stub: mailbox_pb2_grpc.MailboxAsyncStub,
        box: bytes,
        push_ids: list[bytes],
        push_tombs: list[Tombstone],
    ) -> None:
        if not push_ids and not push_tombs:
            return
        blobs = await self.backend.get_blobs(box, push_ids[:MAX_SYNC_ITEMS], _now_ms())
        request = mailbox_pb2.SyncPushRequest(
            **{"from": self._proof("SyncPush", box)}, mailbox_id=box,
            blobs=[blob_proto(b) for b in blobs],
            tombstones=[tombstone_proto(t) for t in push_tombs[:MAX_SYNC_ITEMS]],
        )  # fmt: skip
        await stub.SyncPush(request, timeout=self.timeout_s)
        self.metrics.pushed.inc(len(blobs) + len(push_tombs[:MAX_SYNC_ITEMS]))

    async def _pull(
        self,
        stub: mailbox_pb2_grpc.MailboxAsyncStub,
        box: bytes,
        missing: Collection[bytes],
        theirs: mailbox_pb2.SyncListResponse,
        our_tombs: list[Tombstone],
    ) -> None:
        known = {t.blob_id for t in our_tombs}
        new_tombs = [t for t in theirs.tombstones if t.blob_id not in known]
        blobs: Sequence[mailbox_pb2.StoredBlob] = []
        if missing:
            request = mailbox_pb2.SyncPullRequest(
                **{"from": self._proof("SyncPull", box)}, mailbox_id=box,
                blob_ids=sorted(missing)[:MAX_SYNC_ITEMS],
            )  # fmt: skip
            blobs = (await stub.SyncPull(request, timeout=self.timeout_s)).blobs
        if blobs or new_tombs:
            stored, tombed = await accept(self.backend, box, blobs, new_tombs, self.max_ttl_ms)
            self.metrics.pulled.inc(stored + tombed)
