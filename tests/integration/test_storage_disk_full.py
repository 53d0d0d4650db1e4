"""A real `dna-storage-node` whose SQLite data directory is on a small tmpfs that fills up
between two high-water checks (issue 10 #7): the put answers RESOURCE_EXHAUSTED, `/readyz`
turns 503 at once, reads still work, and the database stays intact."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster import NodeProcess, free_ips, mailbox_call, wait_ready
from dna_core.crypto import pow, seal
from dna_core.mailbox import mailbox_id, put_pow_hash, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2
from process_mark import starts_processes
from support import seeded_identity

IP = free_ips(1)[0]
ALICE, BOB = seeded_identity("disk-alice"), seeded_identity("disk-bob")
# No disk reading between start and the test's puts (gc_interval_s), and the mark at 100 %
# so only the write itself can find the disk full.
SETTINGS = """gc_interval_s = 3600.0
[admission]
pow_base_bits = 4
disk_high_water = 1.0
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
@starts_processes
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def call(method: str, request: Any) -> Any:
    return mailbox_call(IP, method, request)


def put(text: bytes) -> Any:
    box = mailbox_id(BOB.fingerprint)
    blob = seal(ALICE, BOB.public, text, now_ms=now_ms())
    proof, _ = pow.solve(put_pow_hash(box, blob), 4, now_ms=now_ms())
    return call(
        "Put", mailbox_pb2.PutRequest(version=1, mailbox_id=box, blob=blob, pow=proof.to_proto())
    )


def fill(disk: Path) -> None:
    """Write a file until the filesystem has no byte left."""
    with (disk / "filler").open("wb", buffering=0) as f:
        for chunk in (65536, 512, 1):
            try:
                while f.write(b"\0" * chunk):
                    pass
            except OSError:
                pass


@dataclass
class SmallDiskNode(NodeProcess):
    """A storage node whose data directory is ``data_dir`` (the small disk)."""

    data_dir: Path = Path("data")

    def write_config(self) -> None:
        super().write_config()
        generated = f'data_dir = "{self.root / self.name}-data"'
        text = self.config_path.read_text()
        assert generated in text
        self.config_path.write_text(text.replace(generated, f'data_dir = "{self.data_dir}"'))


def test_a_full_disk_refuses_writes_and_turns_unready_at_once(
    tmp_path: Path, small_disk: Path
) -> None:
    node = SmallDiskNode(
        "storage", IP, tmp_path, [], command="dna-storage-node", extra_toml=SETTINGS,
        data_dir=small_disk,
    )  # fmt: skip
    node.start()
    try:
        wait_ready([node])
        first = put(b"before the disk filled")
        assert isinstance(first, mailbox_pb2.PutResponse), first
        fill(small_disk)

        refused = put(b"x" * 20_000)
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "full" in (refused.details() or "")
        ready = node.http("/readyz")
        assert ready.status_code == 503, ready.text
        assert "full" in ready.json()["reason"]
        assert node.http("/healthz").status_code == 200

        fetch = mailbox_pb2.FetchRequest.FromString(
            sign_fetch(BOB, cursor=b"", limit=10, now_ms=now_ms())
        )
        page = call("Fetch", fetch)
        assert isinstance(page, mailbox_pb2.FetchResponse), page
        assert [b.blob_id for b in page.blobs] == [first.blob_id]  # reads keep working
        assert "Traceback" not in node.log_path.read_text()
    finally:
        (small_disk / "filler").unlink(missing_ok=True)
        if node.alive():
            node.terminate()
    with sqlite3.connect(small_disk / "mailboxes.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
