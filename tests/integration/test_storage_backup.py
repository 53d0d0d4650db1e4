"""Backup and restore of a storage node (issue 13 #9), on real processes: back up a live
SQLite node while a writer keeps putting, lose the node, restore the backup on a fresh
one, and fetch every blob acknowledged before the backup from it; a cursor the lost node
issued reads from the start there (fresh incarnation). Bad input changes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cluster import GRPC_PORT, NodeProcess, free_ips, now_ms, wait_ready
from dna_core.crypto import pow, seal
from dna_core.mailbox import blob_id, mailbox_id, put_pow_hash, sign_fetch
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.harness.local import BIN
from support import seeded_identity

pytestmark = pytest.mark.process  # starts nodes and the backup/restore commands

LIVE_IP, FRESH_IP = free_ips(2)
POW_BITS = 4
ALICE, BOB = seeded_identity("backup-alice"), seeded_identity("backup-bob")
BOX = mailbox_id(BOB.fingerprint)
SETTINGS = f"""
[admission]
pow_base_bits = {POW_BITS}
ip_rate_per_s = 1000.0
ip_burst = 1000.0
mailbox_rate_per_s = 1000.0
mailbox_burst = 1000.0
"""


class Writer:
    """Puts blobs into bob's mailbox one after another, noting when each was acknowledged."""

    def __init__(self, ip: str) -> None:
        self.target = f"{ip}:{GRPC_PORT}"
        self.acked: list[tuple[float, bytes]] = []  # (monotonic time, blob ID)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self, count: int | None = None) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            while not self._stop.is_set() and (count is None or len(self.acked) < count):
                blob = seal(ALICE, BOB.public, b"message %d" % len(self.acked), now_ms=now_ms())
                proof, _ = pow.solve(put_pow_hash(BOX, blob), POW_BITS, now_ms=now_ms())
                request = mailbox_pb2.PutRequest(
                    version=1, mailbox_id=BOX, blob=blob, pow=proof.to_proto()
                )
                answer = await stub.Put(request, timeout=5)
                assert answer.blob_id == blob_id(blob)
                self.acked.append((time.monotonic(), answer.blob_id))

    def put(self, count: int) -> None:
        asyncio.run(self._run(count))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def acked_between(self, start: float, end: float) -> set[bytes]:
        return {blob for at, blob in self.acked if start <= at < end}


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer stopped acknowledging puts"
        time.sleep(0.05)


def fetch_all(ip: str, cursor: bytes = b"") -> tuple[list[bytes], bytes]:
    """Every blob ID bob's mailbox holds on one node from ``cursor`` on, and the last cursor."""

    async def go() -> tuple[list[bytes], bytes]:
        nonlocal cursor
        held: list[bytes] = []
        async with grpc.aio.insecure_channel(f"{ip}:{GRPC_PORT}") as channel:
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            while True:
                signed = sign_fetch(BOB, cursor=cursor, limit=1000, now_ms=now_ms())
                page = await stub.Fetch(mailbox_pb2.FetchRequest.FromString(signed), timeout=5)
                held += [b.blob_id for b in page.blobs]
                cursor = page.next_cursor
                if not page.more:
                    return held, cursor

    return asyncio.run(go())


def storage_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dna-storage-node"), *map(str, args)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to show a refused command changed nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def refused_in_one_line(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_backup_of_a_live_node_restored_on_a_fresh_one_serves_the_same_mailbox(
    tmp_path: Path,
) -> None:
    live = NodeProcess("live", LIVE_IP, tmp_path, [], command="dna-storage-node",
                       extra_toml=SETTINGS)  # fmt: skip
    fresh = NodeProcess("fresh", FRESH_IP, tmp_path, [], command="dna-storage-node",
                        extra_toml=SETTINGS)  # fmt: skip
    backup = tmp_path / "backup"
    try:
        live.start()
        wait_ready([live])
        writer = Writer(LIVE_IP)
        writer.put(40)
        writer.start()  # and it keeps writing through the backup
        wait_for(lambda: len(writer.acked) >= 60)
        began = time.monotonic()
        made = storage_cli("backup", "--config", live.config_path, "--out", backup)
        ended = time.monotonic()
        wait_for(lambda: writer.acked[-1][0] > ended + 0.5)  # writes go on after it too
        writer.stop()
        assert made.returncode == 0, made.stderr
        manifest = json.loads(made.stdout)
        before = writer.acked_between(0, began)
        after = writer.acked_between(ended, float("inf"))
        assert len(before) >= 60 and after
        assert manifest["node_id"] == live.status()["node_id"]
        assert sorted(manifest["files"]) == ["mailboxes.sqlite3", "node.key", "records.sqlite3"]
        # One consistent copy: all acknowledged before it began, nothing after it ended.
        assert len(before) <= manifest["blobs"] <= len(writer.acked) - len(after)

        again = snapshot(backup)
        result = storage_cli("backup", "--config", live.config_path, "--out", backup)
        refused_in_one_line(result, "exists and is not an empty directory")
        assert snapshot(backup) == again

        held_live, live_cursor = fetch_all(LIVE_IP)
        assert set(held_live) == {blob for _, blob in writer.acked}
        live.kill()  # the machine is lost

        fresh.write_config()
        restored = storage_cli("restore", "--config", fresh.config_path, "--from", backup)
        assert restored.returncode == 0, restored.stderr
        fresh.start()
        wait_ready([fresh])
        assert fresh.status()["node_id"] == manifest["node_id"]  # the same node, elsewhere
        served, _ = fetch_all(FRESH_IP)
        assert before <= set(served) and not set(served) & after
        assert len(served) == len(set(served)) == manifest["blobs"]
        # The lost node's cursor is past every restored seq; a fresh incarnation makes it
        # read from the start instead of hiding the blobs stored from now on.
        from_old_cursor, _ = fetch_all(FRESH_IP, live_cursor)
        assert sorted(from_old_cursor) == sorted(served)

        state = snapshot(tmp_path)
        result = storage_cli("restore", "--config", fresh.config_path, "--from", backup)
        refused_in_one_line(result, "restore needs a fresh node")
        assert snapshot(tmp_path).keys() == state.keys()
    finally:
        live.kill()
        fresh.kill()


def test_a_corrupt_backup_is_refused_and_nothing_is_restored(tmp_path: Path) -> None:
    node = NodeProcess("source", LIVE_IP, tmp_path, [], command="dna-storage-node",
                       extra_toml=SETTINGS)  # fmt: skip
    target = NodeProcess("target", FRESH_IP, tmp_path, [], command="dna-storage-node",
                         extra_toml=SETTINGS)  # fmt: skip
    try:
        node.start()
        wait_ready([node])
        Writer(LIVE_IP).put(5)
        backup = tmp_path / "backup"
        assert storage_cli("backup", "--config", node.config_path, "--out", backup).returncode == 0
    finally:
        node.kill()
    target.write_config()
    database = backup / "mailboxes.sqlite3"
    data = bytearray(database.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a page
    database.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    result = storage_cli("restore", "--config", target.config_path, "--from", backup)
    refused_in_one_line(result, "mailboxes.sqlite3 is missing or corrupt")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "target-data").exists() and not (tmp_path / "target.key").exists()

    (backup / "backup.json").write_text("{")
    result = storage_cli("restore", "--config", target.config_path, "--from", backup)
    refused_in_one_line(result, "is not a storage node backup")
    result = storage_cli("restore", "--config", target.config_path, "--from", tmp_path / "none")
    refused_in_one_line(result, "is not a storage node backup")
    assert snapshot(tmp_path) == {**before, "backup/backup.json": b"{"}
