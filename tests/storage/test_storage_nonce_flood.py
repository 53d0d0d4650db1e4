"""A flood of fresh nonces does not reopen replays: past its bound the node's nonce cache
forgets its oldest nonces, and a request whose nonce it forgot, still inside its 5-minute
window, must not be taken as new. The Mailbox service on a real grpc.aio server in this
process (port 0, behind the node's GrpcGate), over a real SQLite backend, with a nonce
cache bounded small (a node's holds 1,000,000) so a test can fill it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
from dna_core.mailbox import NonceCache, sign_delete, sign_fetch
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.wire import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_service import MailboxService
from support import seeded_identity

ALICE, MALLORY = seeded_identity("nonce-alice"), seeded_identity("nonce-mallory")
MAILBOX = mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"]
CACHE_SIZE = 8


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def fetch(raw: bytes) -> mailbox_pb2.FetchRequest:
    return mailbox_pb2.FetchRequest.FromString(raw)


async def status_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_a_request_whose_nonce_a_flood_pushed_out_is_still_a_replay(tmp_path: Path) -> None:
    """Alice's signed fetch (and delete) are captured; Mallory, signing fetches of her own
    mailbox (her identity costs nothing), pushes their nonces out of the node's cache; the
    captured requests, replayed within their window, are refused (ALREADY_EXISTS) as
    before the flood. Until 2026-12-05 the node served them as new: a replayed fetch read
    Alice's mailbox for whoever held the request, and a replayed subscribe would have been
    a live feed of it. Alice's own next requests (fresh nonces, later timestamps) pass."""

    async def main() -> None:
        backend = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        service = MailboxService(
            backend, Admission(AdmissionConfig()), nonces=NonceCache(max_size=CACHE_SIZE)
        )
        server = grpc.aio.server()
        GrpcGate(max_message=1 << 20).add(server, service, MAILBOX)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = mailbox_pb2_grpc.MailboxStub(channel)
                captured = fetch(sign_fetch(ALICE, limit=10, now_ms=now_ms()))
                deleted = mailbox_pb2.DeleteRequest.FromString(
                    sign_delete(ALICE, [bytes(32)], now_ms=now_ms())
                )
                assert await status_of(stub.Fetch(captured, timeout=5)) == grpc.StatusCode.OK
                assert await status_of(stub.Delete(deleted, timeout=5)) == grpc.StatusCode.OK
                replay = grpc.StatusCode.ALREADY_EXISTS
                assert await status_of(stub.Fetch(captured, timeout=5)) == replay
                for _ in range(2 * CACHE_SIZE):  # the flood: fresh nonces, each valid
                    own = fetch(sign_fetch(MALLORY, limit=10, now_ms=now_ms()))
                    assert await status_of(stub.Fetch(own, timeout=5)) == grpc.StatusCode.OK
                assert await status_of(stub.Fetch(captured, timeout=5)) == replay
                assert await status_of(stub.Delete(deleted, timeout=5)) == replay
                await asyncio.sleep(0.002)  # Alice's next request is timestamped later
                fresh = fetch(sign_fetch(ALICE, limit=10, now_ms=now_ms()))
                assert await status_of(stub.Fetch(fresh, timeout=5)) == grpc.StatusCode.OK
        finally:
            await server.stop(grace=None)
            await backend.close()

    asyncio.run(main())
