"""The mailbox storage interface every backend implements.

Model (docs/storage.md): a mailbox is a grow-only set of immutable,
content-addressed blobs (blob ID = SHA-256 of the blob) plus delete tombstones.
Replicas merge by union, so every operation here is idempotent:

* ``put`` of a blob already held is a no-op (``DUPLICATE``); of a blob with a
  live tombstone is refused (``TOMBSTONED``): deleted data never comes back
  through repair or a late replay;
* ``delete`` stores tombstones and drops the blobs they name; a tombstone
  outlives the blob it deletes (its ``expires_ms`` is later);
* ``expire`` removes expired blobs and expired tombstones, a bounded batch at a
  time (incremental GC), and nothing expired is ever returned by a read;
* ``forget`` removes this node's copies without a tombstone: only for a hinted
  hand-off copy that every rightful replica confirmed (replication.py);
* an acknowledged write is durable (SQLite ``synchronous=FULL``; Redis with
  AOF ``appendfsync always`` when configured for durability).

Each blob gets a per-node, per-mailbox increasing ``seq`` at first store: the
fetch cursor. Cursors are local to one replica (clients keep one per replica).
A put of a blob already held changes nothing of it (stored time, expiry, seq, proof):
a replayed put never extends a blob's life.

Every integer a backend stores fits a signed 64-bit column (``dna_core.mailbox.MAX_STORED_INT``);
callers range-check what they decode before it gets here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dna_core.errors import CapacityError, ProtocolError
from dna_core.mailbox import StoredBlob, Tombstone

# StoredBlob and Tombstone are the mailbox domain's (dna_core.mailbox.codec, shared with
# clients), named here too so that a backend finds its whole interface in one module.
__all__ = [
    "WRITE_METHODS", "MailboxBackend", "MailboxDigest", "Page", "PutOutcome", "Quota",
    "StorageFullError", "StoreUnavailableError", "StoredBlob", "SyncIndex", "Tombstone",
    "TombstoneBoundError", "TombstoneBounds", "Usage",
]  # fmt: skip


# The methods of ``MailboxBackend`` that write: on SQLite they wait for the one writer (which
# another process's lock can hold up) while reads go on, so the node judges them apart.
WRITE_METHODS = frozenset({"put_many", "delete", "expire", "forget", "save_gc_time"})


class StorageFullError(CapacityError):
    """A write found no room: the disk is full (SQLite) or Redis is out of memory or
    refusing writes. The write changed nothing; reads still work (RESOURCE_EXHAUSTED)."""

    kind = "disk"


class StoreUnavailableError(ProtocolError):
    """The store did not answer: the Redis server is down, restarting, still loading its
    data, a read-only replica, or too slow. The call failed; a write may or may not have
    been applied (every write is idempotent: a retry is safe). Not the caller's fault, so
    UNAVAILABLE (a client asks another replica); the node serves again once the store
    answers, without a restart."""

    grpc_code = "UNAVAILABLE"
    kind = "unavailable"


class StoreDamagedError(ProtocolError):
    """The store's file is damaged (SQLite finds a malformed page): the request touching it
    failed and changed nothing. Not the caller's fault, so UNAVAILABLE: a client asks
    another replica. A `ProtocolError` so every path answers it as a status, without a
    traceback."""

    grpc_code = "UNAVAILABLE"
    kind = "damaged"


class PutOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    TOMBSTONED = "tombstoned"
    EXPIRED = "expired"
    OVER_QUOTA = "quota"  # ``put_many`` with a ``Quota``: no room left, nothing stored


@dataclass(frozen=True, slots=True)
class Page:
    blobs: list[StoredBlob]
    next_cursor: int  # pass back to fetch the next page
    more: bool


@dataclass(frozen=True, slots=True)
class Usage:
    blobs: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-mailbox limits on what is held: blob count and total blob bytes
    (``AdmissionConfig.quota_max_blobs``, ``quota_max_bytes``). The service checks them
    before the write against the usage it read (the fast path: a flood is refused before
    any write) and the backend again where it writes (``MailboxBackend.put_many``): puts
    admitted together each passed the first against usage read before any was stored."""

    max_blobs: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_blobs < 1 or self.max_bytes < 1:
            raise ValueError("quota limits must be >= 1")

    def fits(self, usage_blobs: int, usage_bytes: int, new_bytes: int) -> bool:
        """Whether one more blob of ``new_bytes`` fits a mailbox holding this much."""
        return usage_blobs < self.max_blobs and usage_bytes + new_bytes <= self.max_bytes

    def check_quota(self, usage_blobs: int, usage_bytes: int, new_bytes: int) -> None:
        """Raise `CapacityError` unless one more blob of ``new_bytes`` fits the mailbox."""
        if usage_blobs + 1 > self.max_blobs:
            raise CapacityError(
                f"mailbox quota: holds {usage_blobs} blobs, the limit is {self.max_blobs}",
                kind="quota",
            )
        if usage_bytes + new_bytes > self.max_bytes:
            raise CapacityError(
                f"mailbox quota: {usage_bytes} bytes held + {new_bytes} new "
                f"is over the limit of {self.max_bytes} bytes",
                kind="quota",
            )

    def refused_at_write(self) -> CapacityError:
        """The refusal of a put the backend found no room for (``PutOutcome.OVER_QUOTA``):
        the admission's, with what the backend knew (puts written meanwhile filled it)."""
        return CapacityError(
            f"mailbox quota: puts stored meanwhile filled the mailbox to its limit "
            f"({self.max_blobs} blobs, {self.max_bytes} bytes)",
            kind="quota",
        )


@dataclass(frozen=True, slots=True)
class TombstoneBounds:
    """What a delete's tombstones for IDs held neither way may grow to (docs/storage.md
    "Deletes"; ``AdmissionConfig.max_tombstones_unheld`` and ``node_max_tombstones_unheld``).
    The service checks them before the write (a cheap read, the fast path) and the backend
    again where it writes (``MailboxBackend.delete``): concurrent deletes each passed the
    first against counts read before any of them was stored, and together went past it."""

    mailbox: int  # the mailbox's tombstones plus those for IDs not held
    node: int  # the node's tombstones for IDs not held plus those for IDs not held

    def check(self, mailbox_tombstones: int, node_unheld: int, unheld: int) -> None:
        """Raise `CapacityError` (``tombstones``) if storing ``unheld`` more tombstones for
        IDs not held, in one mailbox, would pass a bound, given what the mailbox and the
        node hold."""
        self.check_mailbox(mailbox_tombstones, unheld)
        self.check_node(node_unheld, unheld)

    def check_mailbox(self, tombstones: int, unheld: int) -> None:
        if unheld > 0 and tombstones + unheld > self.mailbox:
            raise CapacityError(
                f"tombstones: the mailbox holds {tombstones} and {unheld} of the IDs "
                f"named are not held here: over the limit of {self.mailbox} for such deletes",
                kind="tombstones",
            )

    def check_node(self, node_unheld: int, unheld: int) -> None:
        if unheld > 0 and node_unheld + unheld > self.node:
            raise CapacityError(
                f"tombstones: the node holds {node_unheld} tombstones for IDs it did not hold "
                f"and {unheld} of the IDs named are not held here: over the node's limit of "
                f"{self.node} for such deletes",
                kind="tombstones",
            )


class TombstoneBoundError(CapacityError):
    """``TombstoneBounds`` refused a delete where it is written (``MailboxBackend.delete``).
    ``stored_some``: steps of it before the refused one were applied (an ID held when its
    steps were planned was gone by its own), so what the delete cost stays spent."""

    kind = "tombstones"

    def __init__(self, reason: str, *, stored_some: bool) -> None:
        super().__init__(reason)
        self.stored_some = stored_some


@dataclass(frozen=True, slots=True)
class SyncIndex:
    """What a mailbox holds, without payloads or authorizations: what a sync list page
    is cut from (a tombstone's signed delete can be tens of kilobytes)."""

    blob_ids: list[bytes]  # sorted, unexpired
    tombstones: list[tuple[bytes, int]]  # (blob ID, authorization bytes), sorted, live


@dataclass(frozen=True, slots=True)
class MailboxDigest:
    mailbox_id: bytes
    digest: bytes  # SHA-256 over the sorted blob IDs then the sorted tombstone IDs
    blobs: int
    tombstones: int


class MailboxBackend(Protocol):
    async def put_many(
        self, blobs: Sequence[StoredBlob], now_ms: int, quota: Quota | None = None
    ) -> list[PutOutcome]:
        """Store blobs durably in one transaction (group commit); one outcome per blob.

        With ``quota`` (a client's put, or a replica's), a blob that would be stored is
        judged against it atomically with the write, counting what the mailbox holds
        then (every put written before it, this call's earlier blobs included): over it,
        that blob is ``OVER_QUOTA`` and nothing of it is stored; the others go on."""
        ...

    async def fetch(
        self, mailbox_id: bytes, cursor: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> Page:
        """Unexpired blobs with seq > cursor, in seq order, at most ``limit``; with
        ``max_bytes``, only those whose payloads fit it (always at least one), the page
        then ending at the last one taken (``more``). No more than that is read into
        memory (one blob past it at most): a page of 1,000 blobs of 256 KiB would be
        256 MiB."""
        ...

    async def get_blobs(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[StoredBlob]:
        """The unexpired blobs among ``blob_ids`` (for replica pulls)."""
        ...

    async def delete(
        self, tombstones: Sequence[Tombstone], now_ms: int, bounds: TombstoneBounds | None = None
    ) -> int:
        """Store tombstones, drop the blobs they name; returns blobs removed. Applied in
        bounded steps (the writer is not held for a whole 1,000-ID delete): a failure may
        leave the earlier steps applied, which a retry repeats harmlessly.

        With ``bounds`` (a client's delete; repair passes none), the tombstones for IDs held
        neither way are stored only within them, judged atomically with the write, or
        `TombstoneBoundError` is raised. Those IDs (as ``held`` reads them) go in the first
        step, whole, so a refusal stores nothing; an ID held then and gone by its later step
        (expired, or forgotten, meanwhile) is judged in that step, and a refusal there
        leaves the earlier steps applied, as any failure does (``stored_some``)."""
        ...

    async def forget(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], tombstone_ids: Sequence[bytes]
    ) -> int:
        """Remove the local copies of these blobs and tombstones, leaving no tombstone; the
        mailbox's seq counter is kept (a later put still gets a higher seq). Returns how
        many entries were held and removed."""
        ...

    async def sync_index(
        self, mailbox_id: bytes, now_ms: int, after: bytes = b"", limit: int = 0
    ) -> SyncIndex:
        """The mailbox's unexpired blob IDs and live tombstones' IDs and sizes, those with
        ID > ``after`` only; with ``limit``, the first ``limit`` of each kind (a list page
        needs a page of them, not the whole mailbox's at every page)."""
        ...

    async def get_tombstones(
        self, mailbox_id: bytes, blob_ids: Sequence[bytes], now_ms: int
    ) -> list[Tombstone]:
        """The live tombstones among ``blob_ids``, in ID order."""
        ...

    async def held(
        self, mailbox_id: bytes, ids: Sequence[bytes], now_ms: int
    ) -> tuple[set[bytes], set[bytes]]:
        """Of ``ids``, those held as unexpired blobs, and as live tombstones (answering a
        sync offer without reading payloads or the whole mailbox)."""
        ...

    async def digests(self, start: bytes, end: bytes, now_ms: int) -> list[MailboxDigest]:
        """Digests of every non-empty mailbox with ``start <= mailbox_id < end``."""
        ...

    async def digests_of(self, mailbox_ids: Sequence[bytes], now_ms: int) -> list[MailboxDigest]:
        """The digest of each mailbox named, in the order given, an empty one's included
        (counts 0): what a replica's ``SyncCompare`` is answered from."""
        ...

    async def usage(self, mailbox_id: bytes, now_ms: int) -> Usage:
        """What a mailbox holds now (for quotas)."""
        ...

    async def tombstones(self, mailbox_id: bytes) -> int:
        """How many tombstones a mailbox holds (expired ones GC has not reached included):
        a counter, not a scan, read for a delete naming IDs the node holds neither way
        (``AdmissionConfig.max_tombstones_unheld``)."""
        ...

    async def unheld_tombstones(self) -> int:
        """How many tombstones the node holds that were stored for an ID it held neither as
        an unexpired blob nor as a live tombstone of a held one (by a delete or by repair;
        expired ones GC has not reached included): a counter, not a scan, read for a delete
        naming such IDs (``AdmissionConfig.node_max_tombstones_unheld``)."""
        ...

    async def totals(self) -> Usage:
        """What the whole node holds (for metrics and the disk high-water mark)."""
        ...

    async def expire(self, now_ms: int, limit: int) -> int:
        """Remove up to ``limit`` expired blobs and tombstones, oldest first; returns how
        many. Applied in bounded steps, as ``delete``: other writes go between them."""
        ...

    async def signed_deletes(self) -> Usage:
        """The signed deletes held as tombstones' authorizations, and their bytes. Each is
        stored once however many tombstones it authorizes (a 200-ID delete: one copy of
        ~13 KB, not 200), and goes with the last tombstone referencing it."""
        ...

    async def mailboxes(self) -> int:
        """How many mailboxes hold blobs or tombstones (expired ones GC has not reached
        included), for `/status` and metrics: a count over the store, not for hot paths."""
        ...

    async def incarnation(self) -> bytes:
        """8 random bytes chosen when this store was created empty, the same for as long
        as its data lives: fetch cursors carry it, so a cursor issued before a wipe is
        not read as one of the new store's (whose seqs start again from 1)."""
        ...

    async def gc_time(self) -> int | None:
        """The time GC last expired against, as ``save_gc_time`` stored it (None: never):
        a restarted node's GC resumes from it, not from a wall clock that may have been
        stepped meanwhile (``dna_core.expiry``). Kept with the data, so it goes with it
        (a wipe, a restore from a backup)."""
        ...

    async def save_gc_time(self, now_ms: int) -> None:
        """Store the latest time GC has expired against (after a pass: saved late or not at
        all, a restart resumes GC further back, which only keeps expired items longer)."""
        ...

    async def configuration_problems(self) -> list[str]:
        """What in the store's configuration breaks "an acknowledged write is durable", or
        [] (SQLite sets its own at open; a Redis server's can change with a restart, so the
        node reads them again every GC pass)."""
        ...

    async def close(self) -> None: ...
