"""The storage node's readiness while another process holds the SQLite file's write lock
(an operator's `sqlite3` shell, a backup or checkpoint tool): a lock shorter than the busy
timeout only delays writes and leaves the node ready; one held past it makes the node
unready until a write is answered again, and reads answered meanwhile (WAL readers do not
wait for the writer) do not make it flap back to ready and down again at every request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from dna_storage.backends import sqlite as sqlite_backend
from dna_storage.backends.base import MailboxBackend, PutOutcome, StoredBlob, StoreUnavailableError
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.node import StorageNode, StorageNodeConfig, StorageSection, _RoomWatch

pytestmark = pytest.mark.process  # another process holds the lock
M = hashlib.sha256(b"readiness mailbox").digest()
HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def blob(n: int) -> StoredBlob:
    payload = b"blob %d" % n
    now = time.time_ns() // 1_000_000
    return StoredBlob(M, hashlib.sha256(payload).digest(), payload, now, now + 3_600_000)


@contextmanager
def write_lock_held(path: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """Another process holds the file's write lock for ``seconds`` from when this enters."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.wait(timeout=30)


def watched(node: StorageNode, raw: SqliteBackend) -> MailboxBackend:
    """The backend as the node serves it (``StorageNode.start`` wraps it the same way)."""
    wrapper = _RoomWatch(raw, node._no_room, node._store_damaged, node._store_unavailable)
    return cast(MailboxBackend, wrapper)


def test_a_lock_shorter_than_the_busy_timeout_delays_writes_and_leaves_the_node_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = StorageNode(StorageNodeConfig(storage=StorageSection(data_dir=tmp_path)))
    path = tmp_path / "mailboxes.sqlite3"

    async def scenario() -> None:
        raw = await SqliteBackend.open(path)
        backend = watched(node, raw)
        try:
            with write_lock_held(path, 1.0):
                began = time.monotonic()
                assert await backend.put_many([blob(1)], 0) == [PutOutcome.STORED]
                waited = time.monotonic() - began
                assert node._disk_readiness() == (True, "disk ok")
            assert 0.5 < waited < sqlite_backend.BUSY_TIMEOUT_MS / 1000
            assert node._disk_readiness() == (True, "disk ok")
        finally:
            await raw.close()

    with caplog.at_level(logging.INFO, logger="dna.storage"):
        asyncio.run(scenario())
    assert "unready" not in caplog.text


def test_a_lock_held_past_the_busy_timeout_makes_the_node_unready_until_a_write_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes fail (UNAVAILABLE) while reads are answered: the node stays unready, said once,
    until a write is answered. Checked to fail without the fix: each answered read made it
    ready again ("answers again") and the next failed write unready, once per request."""
    monkeypatch.setattr(sqlite_backend, "BUSY_TIMEOUT_MS", 200)
    node = StorageNode(StorageNodeConfig(storage=StorageSection(data_dir=tmp_path)))
    path = tmp_path / "mailboxes.sqlite3"

    async def scenario() -> None:
        raw = await SqliteBackend.open(path)
        backend = watched(node, raw)
        try:
            await backend.put_many([blob(0)], 0)
            with write_lock_held(path, 3.0):
                for n in range(1, 4):
                    with pytest.raises(StoreUnavailableError, match="locked"):
                        await backend.put_many([blob(n)], 0)
                    assert node._disk_readiness()[0] is False
                    assert len((await backend.fetch(M, 0, 10, 0)).blobs) == 1  # reads go on
                    assert (await backend.totals()).blobs == 1
                    ready, reason = node._disk_readiness()
                    assert not ready and "locked" in reason
            assert await backend.put_many([blob(9)], 0) == [PutOutcome.STORED]
            assert node._disk_readiness() == (True, "disk ok")
        finally:
            await raw.close()

    with caplog.at_level(logging.INFO, logger="dna.storage"):
        asyncio.run(scenario())
    assert caplog.text.count("unready until it answers") == 1
    assert caplog.text.count("answers again") == 1
