"""A real `dna-storage-node` restarted on a SQLite file whose pages were overwritten (a disk
fault): a request that reads the damage is answered UNAVAILABLE (a client asks another
replica), the node says so once in one line and turns unready, with no traceback per
request, and the mailboxes the damage did not reach are still served."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import NodeProcess, free_ips, mailbox_call, wait_ready
from dna_core.crypto import Identity, pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from support import seeded_identity

IP = free_ips(1)[0]
ALICE, BOB, CAROL = (seeded_identity(f"damaged-{who}") for who in ("alice", "bob", "carol"))
SETTINGS = (
    "gc_interval_s = 3600.0\n[admission]\npow_base_bits = 4\n"
    "ip_rate_per_s = 1e6\nip_burst = 1e6\nmailbox_rate_per_s = 1e6\nmailbox_burst = 1e6\n"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def call(method: str, request: Any) -> Any:
    return mailbox_call(IP, method, request)


def put(to: Identity, text: bytes) -> bytes:
    box = mailbox_id(to.fingerprint)
    blob = seal(ALICE, to.public, text, now_ms=now_ms())
    proof, _ = pow.solve(put_pow_hash(box, blob), 4, now_ms=now_ms())
    answer = call(
        "Put", mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())
    )
    assert isinstance(answer, mailbox_pb2.PutResponse), answer
    return answer.blob_id


def fetch(owner: Identity) -> Any:
    return call("Fetch", mailbox_pb2.FetchRequest.FromString(
        sign_fetch(owner, cursor=b"", limit=1000, now_ms=now_ms())
    ))  # fmt: skip


def damage(path: Path, start: float, end: float) -> None:
    """Overwrite the pages between fractions ``start`` and ``end`` of the file."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(int(size * start) // 4096 * 4096)
        f.write(os.urandom(int(size * (end - start))))


@pytest.mark.process
def test_a_damaged_store_answers_unavailable_once_said_and_serves_the_rest(
    tmp_path: Path,
) -> None:
    node = NodeProcess("storage", IP, tmp_path, [], command="dna-storage-node", extra_toml=SETTINGS)
    node.start()
    try:
        wait_ready([node])
        for i in range(60):  # Bob's blobs: most of the file
            put(BOB, f"bob {i} ".encode() + b"b" * 6_000)
        carol = {put(CAROL, f"carol {i}".encode()) for i in range(3)}  # after them
        node.terminate()
        damage(node.root / "storage-data" / "mailboxes.sqlite3", 0.2, 0.5)
        log_from = node.log_path.stat().st_size
        node.start()
        wait_ready([node])

        for _ in range(3):  # every time, the same answer and no traceback
            hurt = fetch(BOB)
            assert isinstance(hurt, grpc.aio.AioRpcError), hurt
            assert hurt.code() == grpc.StatusCode.UNAVAILABLE, hurt
            assert "the mailbox store is damaged" in (hurt.details() or "")
        ready = node.http("/readyz")
        assert ready.status_code == 503, ready.text
        assert "damaged" in ready.json()["reason"]
        assert node.alive()

        page = fetch(CAROL)
        assert isinstance(page, mailbox_pb2.FetchResponse), page
        assert {b.blob_id for b in page.blobs} == carol  # the rest is still served
        log = node.log_path.read_text()[log_from:]
        assert "Traceback" not in log
        said = [line for line in log.splitlines() if '"level": "ERROR"' in line]
        assert len(said) == 1 and "restore its data directory" in said[0], said
    finally:
        if node.alive():
            node.terminate()
