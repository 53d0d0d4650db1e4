"""A subscription whose push read fails because the store is unavailable for a moment (a
Redis restarting right after the write that woke it) reads again and pushes, instead of
ending its pump and leaving the subscription open and silent. The Mailbox service with
sessions on a real grpc.aio server in this process (port 0), a real SQLite store whose
reads are made to fail (the fault only: the store answers every other call), the client's
own session."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from dna_core.crypto import pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.mailbox.session import NodeSession
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.wire import mailbox_pb2
from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.base import MailboxBackend, StoreUnavailableError
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_stream import (
    PUSH_RETRY_S,
    MailboxSessionService,
    NotifyingBackend,
    SessionMetrics,
    SessionRules,
    Subscribers,
)
from prometheus_client import CollectorRegistry
from support import SETTLE_S, seeded_identity, until_async

ALICE, BOB = seeded_identity("push-alice"), seeded_identity("push-bob")
POW_BITS = 4
MAILBOX = mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ReadsFail:
    """A real backend whose fetches fail as an unavailable store's do while ``failing``."""

    def __init__(self, backend: MailboxBackend) -> None:
        self._backend, self.failing = backend, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            raise StoreUnavailableError("the mailbox store is unavailable: redis: restarting")
        return await self._backend.fetch(*args, **kwargs)


def put_request(text: bytes) -> mailbox_pb2.PutRequest:
    box = mailbox_id(BOB.fingerprint)
    blob = seal(ALICE, BOB.public, text, now_ms=now_ms())
    proof, _ = pow.solve(put_pow_hash(box, blob), POW_BITS, now_ms=now_ms())
    return mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())


@contextlib.asynccontextmanager
async def serving(store: Any, registry: CollectorRegistry) -> AsyncIterator[NodeSession]:
    """The Mailbox service with sessions over ``store`` (a real backend, wrapped by the
    fault under test) on a grpc.aio server in this process, and a client session to it."""
    subscribers = Subscribers()
    backend: Any = NotifyingBackend(store, subscribers)
    service = MailboxSessionService(backend, Admission(AdmissionConfig(pow_base_bits=4)))
    service.session_rules = SessionRules(service, subscribers, SessionMetrics(registry))
    server = grpc.aio.server()
    GrpcGate(max_message=4 << 20).add(server, service, MAILBOX)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    session = NodeSession(channel, 5.0)
    await session.open()
    try:
        yield session
    finally:
        await session.close()
        await channel.close()
        await server.stop(grace=None)


def bob_fetch() -> mailbox_pb2.FetchRequest:
    return mailbox_pb2.FetchRequest.FromString(
        sign_fetch(BOB, cursor=b"", limit=10, now_ms=now_ms())
    )


def test_a_push_whose_read_failed_is_read_again(tmp_path: Path) -> None:
    async def main() -> None:
        raw = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        reads = ReadsFail(raw)
        pages: list[mailbox_pb2.FetchResponse | None] = []
        try:
            async with serving(reads, CollectorRegistry()) as session:
                await session.subscribe(bob_fetch(), pages.append)
                reads.failing = True  # the store goes away right after the next write
                outcome = await session.put(put_request(b"stored just before the outage"))
                assert outcome.code == 0, outcome
                await asyncio.sleep(PUSH_RETRY_S / 2)
                reads.failing = False  # back
                deadline = time.monotonic() + SETTLE_S
                while time.monotonic() < deadline and len(pushed(pages)) < 1:
                    await asyncio.sleep(0.05)
                assert len(pushed(pages)) == 1  # read again and pushed, with no other write
                outcome = await session.put(put_request(b"after the outage"))
                assert outcome.code == 0, outcome
                deadline = time.monotonic() + SETTLE_S
                while time.monotonic() < deadline and len(pushed(pages)) < 2:
                    await asyncio.sleep(0.05)
                assert len(pushed(pages)) == 2  # and the subscription goes on
        finally:
            await raw.close()

    asyncio.run(main())


def pushed(pages: list[mailbox_pb2.FetchResponse | None]) -> list[bytes]:
    return [blob.blob_id for page in pages if page is not None for blob in page.blobs]


class ReadSwallowsCancel:
    """A real backend whose fetch, once ``gate`` is armed, waits for it and then turns a
    cancel that lands meanwhile into a normal answer: what redis-py does when a cancel lands
    as a command's send completes (Python 3.11's ``wait_for``; tests/core/test_tasks.py)."""

    def __init__(self, backend: MailboxBackend) -> None:
        self._backend = backend
        self.gate: asyncio.Event | None = None
        self.reading = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate is not None:
            self.reading.set()
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                await self.gate.wait()  # the cancel is lost; the read answers
        return await self._backend.fetch(*args, **kwargs)


def test_an_unsubscribed_pump_whose_cancel_was_lost_pushes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        raw = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        reads = ReadSwallowsCancel(raw)
        registry = CollectorRegistry()
        try:
            async with serving(reads, registry) as session:
                sub_id = await session.subscribe(bob_fetch(), lambda page: None)
                reads.gate = asyncio.Event()
                outcome = await session.put(put_request(b"wakes the pump"))
                assert outcome.code == 0, outcome
                await asyncio.wait_for(reads.reading.wait(), 5)  # the pump is reading
                await session.unsubscribe(sub_id)  # sent, not answered: wait for the node
                await until_async(
                    lambda: registry.get_sample_value("dna_storage_subscriptions") == 0,
                    "the unsubscribe reached the node (the pump cancelled)",
                )
                reads.gate.set()
                await asyncio.sleep(0.5)
                # nothing pushed for a subscription gone
                assert registry.get_sample_value("dna_storage_pushed_blobs_total") == 0
        finally:
            await raw.close()

    asyncio.run(main())
