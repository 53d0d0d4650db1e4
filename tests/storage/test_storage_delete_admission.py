"""Deletes are admitted by what they would make the node store (docs/storage.md "Deletes"):
IDs held cost nothing, IDs held neither as blobs nor as tombstones are rated per source
(retry-after) and bounded per mailbox, and a refused delete stores nothing. The Mailbox
service's own delete path (``delete_one``, which `Delete` and sessions call) over real
SQLite and Redis backends, signed deletes from a real identity."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence

import pytest
from dna_core.crypto import Identity
from dna_core.errors import CapacityError
from dna_core.mailbox import mailbox_id, sign_delete
from dna_core.ratelimit import RateLimited
from dna_core.wire import mailbox_pb2
from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.base import MailboxBackend, StoredBlob
from dna_storage.mailbox_service import MailboxService
from storage.storage_harness import Stores
from support import seeded_identity

OWNER = seeded_identity("delete-admission")
OTHERS = [seeded_identity(f"delete-admission {i}") for i in range(3)]
BOX = mailbox_id(OWNER.fingerprint)
DAY_MS = 86_400_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def delete_of(ids: list[bytes], owner: Identity = OWNER) -> mailbox_pb2.DeleteRequest:
    return mailbox_pb2.DeleteRequest.FromString(sign_delete(owner, ids, now_ms=now_ms()))


def random_ids(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


async def put_blobs(backend: MailboxBackend, n: int) -> list[bytes]:
    at = now_ms()
    payloads = [os.urandom(64) for _ in range(n)]
    blobs = [StoredBlob(BOX, hashlib.sha256(p).digest(), p, at, at + DAY_MS) for p in payloads]
    for i in range(0, n, 500):
        await backend.put_many(blobs[i : i + 500], at)
    return [b.blob_id for b in blobs]


def service(
    backend: MailboxBackend, seen: list[tuple[str, str]], **config: float
) -> MailboxService:
    admission = Admission(AdmissionConfig(**config))  # type: ignore[arg-type]
    return MailboxService(backend, admission, on_outcome=lambda m, o: seen.append((m, o)))


def test_deletes_of_ids_not_held_are_rated_per_source(stores: Stores, kind: str) -> None:
    """Fails without the delete admission (checked: all 3 deletes stored 600 tombstones)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(backend, seen, delete_ip_rate_per_s=1, delete_ip_burst=400)
        await node.delete_one(delete_of(random_ids(200)), "10.0.0.1", now_ms())
        await node.delete_one(delete_of(random_ids(200)), "10.0.0.1", now_ms())
        with pytest.raises(RateLimited) as refused:
            await node.delete_one(delete_of(random_ids(200)), "10.0.0.1", now_ms())
        assert 150 < refused.value.retry_after_s <= 200
        assert await backend.tombstones(BOX) == 400  # the refused one stored nothing
        assert seen == [("delete", "ok"), ("delete", "ok"), ("delete", "rate")]
        # another source has its own budget
        await node.delete_one(delete_of(random_ids(200)), "10.0.0.2", now_ms())
        assert await backend.tombstones(BOX) == 600

    stores.run(main())


def test_deletes_of_held_blobs_are_never_slowed(stores: Stores, kind: str) -> None:
    """The owner's cleanup: 2,000 held blobs in batches of 200 from one source whose budget
    for IDs not held is 1 (and spent), and a mailbox over the bound for such deletes."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(
            backend, seen, delete_ip_rate_per_s=0.001, delete_ip_burst=1, max_tombstones_unheld=1
        )
        held = await put_blobs(backend, 2000)
        await node.delete_one(delete_of(random_ids(1)), "10.0.0.1", now_ms())  # the budget
        deleted = 0
        for i in range(0, len(held), 200):
            answer = await node.delete_one(delete_of(held[i : i + 200]), "10.0.0.1", now_ms())
            deleted += answer.deleted
        assert deleted == 2000
        # the same IDs again: tombstoned here already, so still free
        await node.delete_one(delete_of(held[:200]), "10.0.0.1", now_ms())
        assert seen == [("delete", "ok")] * 12

    stores.run(main())


def test_tombstones_for_ids_not_held_are_bounded_per_mailbox(stores: Stores, kind: str) -> None:
    """Fails without the bound (checked: the third delete stored 200 more tombstones)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(
            backend, seen, delete_ip_rate_per_s=1000, delete_ip_burst=1000,
            max_tombstones_unheld=500,
        )  # fmt: skip
        await node.delete_one(delete_of(random_ids(200)), "10.0.0.1", now_ms())
        await node.delete_one(delete_of(random_ids(200)), "10.0.0.2", now_ms())
        with pytest.raises(CapacityError, match="tombstones: the mailbox holds 400") as refused:
            await node.delete_one(delete_of(random_ids(200)), "10.0.0.3", now_ms())
        assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        assert refused.value.kind == "tombstones"
        assert await backend.tombstones(BOX) == 400  # nothing stored
        # the refusal spent no rate tokens: 10.0.0.3 still has its whole burst
        assert node.admission.deletes_per_ip.tokens("10.0.0.3", time.monotonic()) == 1000
        # held blobs are still deleted, whatever the bound
        held = await put_blobs(backend, 200)
        answer = await node.delete_one(delete_of(held), "10.0.0.3", now_ms())
        assert answer.deleted == 200
        assert seen[-2:] == [("delete", "tombstones"), ("delete", "ok")]

    stores.run(main())


def test_tombstones_for_ids_not_held_are_bounded_node_wide(stores: Stores, kind: str) -> None:
    """Many mailboxes from many sources, each within its own bounds, stop at the node's
    bound, which a restart keeps and GC lowers. Fails without the node's bound (checked:
    the third mailbox's delete stored 200 more tombstones)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        bounds = {"max_tombstones_unheld": 10_000, "node_max_tombstones_unheld": 500}
        node = service(backend, seen, **bounds)
        held = await put_blobs(backend, 200)
        await node.delete_one(delete_of(held), "10.0.0.9", now_ms())  # held: not counted
        for owner, source in zip(OTHERS[:2], ["10.0.0.1", "10.0.0.2"], strict=True):
            await node.delete_one(delete_of(random_ids(200), owner), source, now_ms())
        assert await backend.unheld_tombstones() == 400
        backend = await stores.reopen(backend)  # a restart: the count is stored
        node = service(backend, seen, **bounds)
        with pytest.raises(CapacityError, match="tombstones: the node holds 400") as refused:
            await node.delete_one(delete_of(random_ids(200), OTHERS[2]), "10.0.0.3", now_ms())
        assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        assert refused.value.kind == "tombstones"
        assert await backend.tombstones(mailbox_id(OTHERS[2].fingerprint)) == 0
        assert node.admission.deletes_per_ip.tokens("10.0.0.3", time.monotonic()) == 1000
        # the owner's cleanup is never refused by it
        more = await put_blobs(backend, 200)
        assert (await node.delete_one(delete_of(more), "10.0.0.3", now_ms())).deleted == 200
        assert seen[-2:] == [("delete", "tombstones"), ("delete", "ok")]
        # once GC has removed them, such deletes are taken again
        assert await backend.expire(now_ms() + 40 * DAY_MS, 10_000) == 800
        assert await backend.unheld_tombstones() == 0
        await node.delete_one(delete_of(random_ids(200), OTHERS[2]), "10.0.0.3", now_ms())
        assert await backend.unheld_tombstones() == 200

    stores.run(main())


def test_concurrent_deletes_stay_within_the_node_bound(stores: Stores, kind: str) -> None:
    """20 deletes of 200 IDs not held, each from its own source into its own mailbox, all
    at once against a node bound of 1,000: exactly 5 are stored, the others are refused
    whole (``tombstones``), store nothing and spend no token. Fails without the bound
    judged again at the write (checked: all 20 passed the admission against counts read
    before any was stored, and the node held 4,000)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(backend, seen, node_max_tombstones_unheld=1000)
        owners = [seeded_identity(f"concurrent deletes {i}") for i in range(20)]
        sources = [f"10.0.1.{i}" for i in range(20)]
        answers = await asyncio.gather(
            *(
                node.delete_one(delete_of(random_ids(200), owner), source, now_ms())
                for owner, source in zip(owners, sources, strict=True)
            ),
            return_exceptions=True,
        )
        refused = [a for a in answers if isinstance(a, BaseException)]
        assert len(refused) == 15
        for error in refused:
            assert isinstance(error, CapacityError), error
            assert error.kind == "tombstones"
            assert "over the node's limit of 1000" in str(error)
        assert await backend.unheld_tombstones() == 1000
        held = [await backend.tombstones(mailbox_id(o.fingerprint)) for o in owners]
        assert sorted(held) == [0] * 15 + [200] * 5
        for source, answer in zip(sources, answers, strict=True):
            if isinstance(answer, BaseException):  # the refusal gave its tokens back
                assert node.admission.deletes_per_ip.tokens(source, time.monotonic()) == 1000
        assert sorted(seen) == [("delete", "ok")] * 5 + [("delete", "tombstones")] * 15

    stores.run(main())


def test_concurrent_deletes_stay_within_the_mailbox_bound(stores: Stores, kind: str) -> None:
    """20 deletes of 200 IDs not held into one mailbox, each from its own source, all at
    once against a mailbox bound of 1,000: exactly 5 are stored, the others refused whole.
    Fails without the bound judged again at the write (checked: the mailbox held 4,000)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(backend, seen, max_tombstones_unheld=1000)
        answers = await asyncio.gather(
            *(
                node.delete_one(delete_of(random_ids(200)), f"10.0.2.{i}", now_ms())
                for i in range(20)
            ),
            return_exceptions=True,
        )
        refused = [a for a in answers if isinstance(a, BaseException)]
        assert len(refused) == 15
        for error in refused:
            assert isinstance(error, CapacityError), error
            assert error.kind == "tombstones"
            assert "over the limit of 1000" in str(error)
        assert await backend.tombstones(BOX) == 1000
        assert await backend.unheld_tombstones() == 1000
        assert sorted(seen) == [("delete", "ok")] * 5 + [("delete", "tombstones")] * 15

    stores.run(main())


def test_a_delete_refused_after_its_first_step_keeps_its_tokens_spent(
    stores: Stores, kind: str
) -> None:
    """A delete written in steps whose later step the backend refuses (an ID held when its
    steps were planned was dropped before its own: a hand-off copy forgotten meanwhile, as
    here) leaves its first step applied, the 200 tombstones for IDs not held: what they cost
    stays spent, or a source gets tombstones stored for free. Fails with every refusal at
    the write refunded (checked: the source got its 200 tokens back)."""

    async def main() -> None:
        backend = await stores.open(kind)
        seen: list[tuple[str, str]] = []
        node = service(backend, seen, max_tombstones_unheld=200, delete_ip_rate_per_s=1)
        held = await put_blobs(backend, 150)
        read_held = backend.held
        reads = 0

        async def held_then_forgotten(
            box: bytes, ids: Sequence[bytes], at_ms: int
        ) -> tuple[set[bytes], set[bytes]]:
            nonlocal reads
            found = await read_held(box, ids, at_ms)
            reads += 1
            if reads == 2:  # the backend planning its steps, after the admission's read
                await backend.forget(BOX, [held[0]], [])
            return found

        backend.held = held_then_forgotten  # type: ignore[method-assign, assignment]
        with pytest.raises(CapacityError, match="over the limit of 200") as refused:
            await node.delete_one(delete_of(random_ids(200) + held), "10.0.3.1", now_ms())
        assert refused.value.kind == "tombstones"
        assert await backend.tombstones(BOX) == 200  # the first step stays applied
        assert node.admission.deletes_per_ip.tokens("10.0.3.1", time.monotonic()) < 900
        assert seen == [("delete", "tombstones")]

    stores.run(main())
