"""Each refused put is counted under its own label (the error's ``kind``), not under one
catch-all: the Mailbox service on a real grpc.aio server in this process (port 0, behind
the node's GrpcGate), over a real SQLite backend, called by the generated stub."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from dna_core.crypto import pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.wire import mailbox_pb2, mailbox_pb2_grpc
from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends import sqlite as sqlite_backend
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_service import MailboxService
from support import seeded_identity

ALICE, BOB = seeded_identity("labels-alice"), seeded_identity("labels-bob")
POW_BITS = 4
MAILBOX = mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def put_request(
    blob: bytes, box: bytes, *, version: int = 1, bits: int | None = POW_BITS
) -> mailbox_pb2.PutRequest:
    request = mailbox_pb2.PutRequest(version=version, mailbox_id=box, blob=blob)
    if bits is not None:
        proof, _ = pow.solve(put_pow_hash(box, blob), bits, now_ms=now_ms())
        request.pow.CopyFrom(proof.to_proto())
    return request


def outcomes_of(
    puts: list[mailbox_pb2.PutRequest], db: Path, *, batched: bool = False
) -> list[tuple[str, str]]:
    """Send each put in turn (or all in one PutMany); what the service reported to its
    metrics, in order."""
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        backend = await SqliteBackend.open(db)
        service = MailboxService(
            backend,
            Admission(AdmissionConfig(pow_base_bits=POW_BITS, max_blob_bytes=64 * 1024)),
            on_outcome=lambda method, outcome: seen.append((method, outcome)),
        )
        server = grpc.aio.server()
        GrpcGate(max_message=1 << 20).add(server, service, MAILBOX)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = mailbox_pb2_grpc.MailboxStub(channel)
                if batched:
                    await stub.PutMany(mailbox_pb2.PutManyRequest(puts=puts), timeout=5)
                    return
                for request in puts:
                    try:
                        await stub.Put(request, timeout=5)
                    except grpc.aio.AioRpcError as err:
                        assert err.code() != grpc.StatusCode.UNKNOWN, err.details()
        finally:
            await server.stop(grace=None)
            await backend.close()

    asyncio.run(main())
    return seen


@pytest.mark.parametrize(
    ("case", "label"),
    [
        ("ok", "ok"),
        ("wrong mailbox", "mailbox"),
        ("short mailbox ID", "mailbox"),
        ("unknown version", "version"),
        ("not an envelope", "malformed"),
        ("too large", "size"),
        ("no proof of work", "pow"),
    ],
)
def test_a_refused_put_is_counted_under_its_own_label(
    case: str, label: str, tmp_path: Path
) -> None:
    box = mailbox_id(BOB.fingerprint)
    envelope = seal(ALICE, BOB.public, b"labelled", now_ms=now_ms())
    request = {
        "ok": lambda: put_request(envelope, box),
        "wrong mailbox": lambda: put_request(envelope, mailbox_id(ALICE.fingerprint)),
        "short mailbox ID": lambda: put_request(envelope, box[:31]),
        "unknown version": lambda: put_request(envelope, box, version=2),
        "not an envelope": lambda: put_request(b"not an envelope", box),
        "too large": lambda: put_request(
            seal(ALICE, BOB.public, bytes(70 * 1024), now_ms=now_ms()), box
        ),
        "no proof of work": lambda: put_request(envelope, box, bits=None),
    }[case]()
    assert outcomes_of([request], tmp_path / "mailboxes.db") == [("put", label)]


def test_put_many_counts_each_refused_put_under_its_own_label(tmp_path: Path) -> None:
    box = mailbox_id(BOB.fingerprint)
    envelopes = [seal(ALICE, BOB.public, bytes([i]), now_ms=now_ms()) for i in range(3)]
    puts = [
        put_request(envelopes[0], mailbox_id(ALICE.fingerprint)),
        put_request(envelopes[1], box),
        put_request(envelopes[2], box, version=7),
    ]
    assert outcomes_of(puts, tmp_path / "mailboxes.db", batched=True) == [
        ("put", "mailbox"),
        ("put", "version"),
        ("put", "ok"),  # stored after the others were judged
    ]


def test_a_put_many_the_store_fails_answers_each_put_keeping_earlier_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails the batch's write (here another process holds the SQLite file's
    write lock past the busy timeout): each admitted put answers UNAVAILABLE, counted
    under ``unavailable``, and a put refused before keeps its own reason. Before, the whole
    call failed UNAVAILABLE: the earlier refusal (a quota's, which must not be handed off)
    read as the node's failure, and nothing was counted."""
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 200)
    box = mailbox_id(BOB.fingerprint)
    envelopes = [seal(ALICE, BOB.public, bytes([i]), now_ms=now_ms()) for i in range(2)]
    puts = [
        put_request(envelopes[0], mailbox_id(ALICE.fingerprint)),
        put_request(envelopes[1], box),
    ]
    seen: list[tuple[str, str]] = []
    db = tmp_path / "mailboxes.db"

    async def main() -> mailbox_pb2.PutManyResponse:
        backend = await SqliteBackend.open(db)
        service = MailboxService(
            backend, Admission(AdmissionConfig(pow_base_bits=POW_BITS)),
            on_outcome=lambda method, outcome: seen.append((method, outcome)),
        )  # fmt: skip
        server = grpc.aio.server()
        GrpcGate(max_message=1 << 20).add(server, service, MAILBOX)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = mailbox_pb2_grpc.MailboxStub(channel)
                answer: mailbox_pb2.PutManyResponse = await stub.PutMany(
                    mailbox_pb2.PutManyRequest(puts=puts), timeout=5
                )
                return answer
        finally:
            other.execute("ROLLBACK")
            other.close()
            await server.stop(grace=None)
            await backend.close()

    answer = asyncio.run(main())
    refused, failed = answer.outcomes
    assert refused.kind == "mailbox" and refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.kind == "unavailable" and failed.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "store is unavailable" in failed.reason
    assert seen == [("put", "mailbox"), ("put", "unavailable")]
