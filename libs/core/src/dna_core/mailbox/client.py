"""The client side of store-and-forward: replicated put, merged fetch, delete.

A mailbox lives on the R = 5 storage nodes closest to its ID. A put goes to all
of them in parallel with one proof of work (it is bound to mailbox and blob,
not to a node) and succeeds once W = 3 stored it durably. When replicas are
down or refuse, the next-closest storage nodes take the write instead (hinted
hand-off: anti-entropy moves it to the rightful replicas later). A fetch asks
every replica from its own cursor and merges by blob ID.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from dna_core.crypto import Identity
from dna_core.crypto import pow as pow_
from dna_core.errors import DnaError
from dna_core.mailbox.auth import sign_delete, sign_fetch
from dna_core.mailbox.ids import blob_id, mailbox_id, put_pow_hash
from dna_core.overlay.aio.node import OverlayNode
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import common_pb2, mailbox_pb2, mailbox_pb2_grpc

REPLICAS = 5
WRITE_QUORUM = 3
HANDOFF_CANDIDATES = 4  # further storage nodes that may take writes for absent replicas
MAX_POW_BITS = 28  # a client does not solve harder than this: ~0.3 G hashes


class QuorumError(DnaError):
    """Fewer than W replicas stored the blob."""


@dataclass(frozen=True, slots=True)
class PutResult:
    blob_id: bytes
    stored_on: tuple[bytes, ...]  # node IDs that acknowledged
    pow_bits: int


@dataclass
class FetchState:
    """Per-replica cursors of one mailbox (node ID -> opaque cursor)."""

    cursors: dict[bytes, bytes] = field(default_factory=dict)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class MailboxClient:
    def __init__(
        self,
        node: OverlayNode,
        *,
        replicas: int = REPLICAS,
        write_quorum: int = WRITE_QUORUM,
        pow_bits: int = 12,
        timeout: float = 5.0,
    ) -> None:
        self.node, self.replicas, self.write_quorum = node, replicas, write_quorum
        self.pow_bits, self.timeout = pow_bits, timeout

    async def storage_nodes(self, box: bytes, count: int) -> list[Contact]:
        """The ``count`` storage nodes closest to a mailbox, closest first."""
        found = await self.node.find_node(box)
        storage = [c for c in found if c.role == common_pb2.NODE_ROLE_STORAGE]
        return storage[:count]

    def _stub(self, contact: Contact) -> mailbox_pb2_grpc.MailboxAsyncStub:
        return mailbox_pb2_grpc.MailboxStub(self.node.channels.get(contact.endpoint.grpc_target))

    # -- put ---------------------------------------------------------------------

    async def put(self, recipient_fp: bytes, blob: bytes, *, ttl_s: int = 0) -> PutResult:
        box = mailbox_id(recipient_fp)
        candidates = await self.storage_nodes(box, self.replicas + HANDOFF_CANDIDATES)
        if len(candidates) < self.write_quorum:
            raise QuorumError(f"only {len(candidates)} storage nodes found for the mailbox")
        request = self._put_request(box, blob, ttl_s, self.pow_bits)
        primary, spare = candidates[: self.replicas], list(candidates[self.replicas :])
        stored: list[bytes] = []
        pending = list(primary)
        while pending:
            results = await asyncio.gather(*(self._put_one(c, request) for c in pending))
            stored += [c.node_id for c, ok in zip(pending, results, strict=True) if ok is True]
            harder = max((r for r in results if isinstance(r, int)), default=0)
            if harder > request.pow.difficulty and harder <= MAX_POW_BITS:
                request = self._put_request(box, blob, ttl_s, harder)  # node raised the bar
                pending = [c for c, r in zip(pending, results, strict=True) if r is not True]
                continue
            missing = self.replicas - len(stored)
            pending, spare = spare[:missing], spare[missing:]  # hinted hand-off
        if len(stored) < self.write_quorum:
            raise QuorumError(f"stored on {len(stored)} of {self.write_quorum} required replicas")
        return PutResult(blob_id(blob), tuple(stored), request.pow.difficulty)

    def _put_request(
        self, box: bytes, blob: bytes, ttl_s: int, bits: int
    ) -> mailbox_pb2.PutRequest:
        proof, _ = pow_.solve(put_pow_hash(box, blob), bits, now_ms=_wall_ms())
        return mailbox_pb2.PutRequest(
            version=1, mailbox_id=box, blob=blob, pow=proof.to_proto(), ttl_s=ttl_s
        )

    async def _put_one(self, contact: Contact, request: mailbox_pb2.PutRequest) -> bool | int:
        """True when stored; the required PoW bits when the node wants more; else False."""
        for attempt in range(3):
            try:
                await self._stub(contact).Put(request, timeout=self.timeout)
                return True
            except grpc.aio.AioRpcError as err:
                meta = dict(err.trailing_metadata() or ())
                if "dna-pow-required" in meta:
                    return int(meta["dna-pow-required"])
                if "retry-after-ms" in meta and attempt < 2:
                    await asyncio.sleep(min(2.0, int(meta["retry-after-ms"]) / 1000))
                    continue
                return False
        return False

    # -- fetch and delete ---------------------------------------------------------

    async def fetch(
        self, owner: Identity, state: FetchState | None = None, *, limit: int = 200
    ) -> tuple[list[mailbox_pb2.StoredBlob], FetchState]:
        """New blobs from every replica (each from its own cursor), merged by blob ID."""
        state = state or FetchState()
        box = mailbox_id(owner.fingerprint)
        replicas = await self.storage_nodes(box, self.replicas + HANDOFF_CANDIDATES)
        pages = await asyncio.gather(*(self._fetch_all(owner, c, state, limit) for c in replicas))
        merged: dict[bytes, mailbox_pb2.StoredBlob] = {}
        for page in pages:
            for stored in page:
                if blob_id(stored.blob) == stored.blob_id:  # a replica cannot alter a blob
                    merged.setdefault(stored.blob_id, stored)
        return sorted(merged.values(), key=lambda b: (b.stored_ms, b.blob_id)), state

    async def _fetch_all(
        self, owner: Identity, contact: Contact, state: FetchState, limit: int
    ) -> list[mailbox_pb2.StoredBlob]:
        blobs: list[mailbox_pb2.StoredBlob] = []
        while True:
            cursor = state.cursors.get(contact.node_id, b"")
            req = mailbox_pb2.FetchRequest.FromString(
                sign_fetch(owner, cursor=cursor, limit=limit, now_ms=_wall_ms())
            )
            try:
                page = await self._stub(contact).Fetch(req, timeout=self.timeout)
            except grpc.aio.AioRpcError:
                return blobs  # a replica down: the others have the data
            blobs += page.blobs
            state.cursors[contact.node_id] = page.next_cursor
            if not page.more:
                return blobs

    async def delete(self, owner: Identity, blob_ids: Sequence[bytes]) -> int:
        """Tombstone blobs on every replica; returns how many replicas accepted."""
        box = mailbox_id(owner.fingerprint)
        replicas = await self.storage_nodes(box, self.replicas + HANDOFF_CANDIDATES)

        async def one(contact: Contact) -> bool:
            req = mailbox_pb2.DeleteRequest.FromString(
                sign_delete(owner, list(blob_ids), now_ms=_wall_ms())
            )
            try:
                await self._stub(contact).Delete(req, timeout=self.timeout)
            except grpc.aio.AioRpcError:
                return False
            return True

        return sum(await asyncio.gather(*(one(c) for c in replicas)))
