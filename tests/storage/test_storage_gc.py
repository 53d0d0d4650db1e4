"""The storage node's GC pass over a backlog, on a real SQLite store: it expires everything
expired ``gc_batch`` at a time, lets other work run between batches, and refreshes the held
figures (whose mailbox count reads every tombstone's mailbox on SQLite) once per pass, not
once per batch. GC follows a wall clock stepped forward at most twice as fast as time
passes, in a running node and across a restart (SQLite and Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from dna_storage.backends.base import MailboxBackend, PutOutcome, StoredBlob
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.node import StorageNode, StorageNodeConfig, StorageSection

BATCH, EXPIRED, LIVE = 10, 105, 3
M = hashlib.sha256(b"gc mailbox").digest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Counting:
    """A real backend, counting the calls made to it by method name."""

    def __init__(self, backend: MailboxBackend, on_call: Callable[[str], None]) -> None:
        self._backend, self._on_call = backend, on_call
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            self._on_call(name)
            return await attr(*args, **kwargs)

        return counted


def blobs(count: int, expires_ms: int, tag: bytes) -> list[StoredBlob]:
    out = []
    for i in range(count):
        payload = tag + b" %d" % i
        out.append(StoredBlob(M, hashlib.sha256(payload).digest(), payload, 0, expires_ms))
    return out


def test_a_backlog_is_expired_in_batches_and_the_figures_refreshed_once(tmp_path: Path) -> None:
    config = StorageNodeConfig(
        storage=StorageSection(data_dir=tmp_path, gc_batch=BATCH, gc_interval_s=3600.0)
    )
    node = StorageNode(config)

    async def scenario() -> None:
        raw = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        now = now_ms()
        expired = blobs(EXPIRED, now - 1, b"expired")
        live = blobs(LIVE, now + 3_600_000, b"live")
        await raw.put_many(expired + live, now - 10_000)  # stored before they expired
        ticks = 0
        between: list[int] = []  # event-loop ticks seen before each expire batch

        def on_call(name: str) -> None:
            if name == "expire":
                between.append(ticks)

        backend = Counting(cast(MailboxBackend, raw), on_call)

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        gc = asyncio.ensure_future(node._collect_garbage(cast(MailboxBackend, backend)))
        try:
            deadline = time.monotonic() + 30
            while not backend.calls["signed_deletes"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the pass's end; then it sleeps for gc_interval_s
        finally:
            gc.cancel()
            ticker.cancel()
        assert backend.calls["expire"] == EXPIRED // BATCH + 1  # the last one came back short
        for figure in ("mailboxes", "totals", "signed_deletes"):
            assert backend.calls[figure] == 1, backend.calls  # once a pass, not a batch
        assert between == sorted(set(between))  # other work ran between the batches
        assert (await raw.totals()).blobs == LIVE
        assert node._held.blobs == LIVE and node._mailboxes == 1
        assert node.metrics.gc_removed._value.get() == EXPIRED
        assert await raw.put_many(blobs(1, now_ms() + 60_000, b"new"), now_ms()) == [
            PutOutcome.STORED
        ]
        await raw.close()

    asyncio.run(scenario())


def test_a_wall_clock_stepped_forward_does_not_make_gc_delete_what_has_not_expired(
    tmp_path: Path,
) -> None:
    """The wall clock steps 31 days forward (a bad NTP server) under a running node: reads
    hide what expired by the new time (undone when the clock is set right), but the next
    GC pass removes nothing that had not expired before the step. Before, it deleted every
    blob and tombstone held (30-day TTLs) at once, on every node the step reached."""
    config = StorageNodeConfig(storage=StorageSection(data_dir=tmp_path, gc_interval_s=3600.0))
    node = StorageNode(config)
    now = now_ms()
    wall = [now]
    node.wall_ms = lambda: wall[0]

    async def scenario() -> None:
        backend = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        held = blobs(20, now + 3_600_000, b"an hour left")
        await backend.put_many(held, now)
        assert await node._collect_pass(cast(MailboxBackend, backend)) == 0
        wall[0] = now + 31 * 86_400_000
        assert await node._collect_pass(cast(MailboxBackend, backend)) == 0
        assert node.expiry_clock.stepped_ms > 30 * 86_400_000
        assert (await backend.fetch(M, 0, 100, wall[0])).blobs == []  # hidden meanwhile
        wall[0] = now + 1_000  # set right: everything is there
        assert len((await backend.fetch(M, 0, 100, wall[0])).blobs) == len(held)
        assert await node._collect_pass(cast(MailboxBackend, backend)) == 0
        await backend.close()

    asyncio.run(scenario())


def test_a_node_restarted_after_a_step_forward_resumes_gc_where_it_was(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """The wall clock steps 31 days forward while the node is stopped (or just before a
    restart): the restarted node's first GC pass expires against the time its store saved,
    not the stepped wall clock, so it removes nothing that had not expired. Before, its
    ExpiryClock started from the wall clock and the pass deleted every blob held. Checked
    to fail without the fix (20 removed, on both backends)."""
    prefix = f"restart{tmp_path.name}:"

    async def open_store() -> MailboxBackend:
        if kind == "redis":
            url = str(request.getfixturevalue("redis_url"))
            return cast(MailboxBackend, await RedisBackend.connect(url, prefix=prefix))
        return cast(MailboxBackend, await SqliteBackend.open(tmp_path / "mailboxes.sqlite3"))

    def node_at(wall: int) -> StorageNode:
        section = StorageSection(data_dir=tmp_path, gc_interval_s=3600.0)
        config = StorageNodeConfig(storage=section.model_copy(update={"backend": kind}))
        node = StorageNode(config)
        node.wall_ms = lambda: wall
        return node

    now = now_ms()
    held = blobs(20, now + 3_600_000, b"an hour left")

    async def scenario() -> None:
        backend = await open_store()
        await backend.put_many(held, now)
        assert await node_at(now)._collect_pass(backend) == 0
        await backend.close()
        backend = await open_store()  # restarted, the wall clock 31 days ahead
        stepped = node_at(now + 31 * 86_400_000)
        assert await stepped._collect_pass(backend) == 0
        assert stepped.expiry_clock.stepped_ms > 30 * 86_400_000
        assert len((await backend.fetch(M, 0, 100, now + 1_000)).blobs) == len(held)
        await backend.close()

    with caplog.at_level(logging.INFO, logger="dna.storage"):
        asyncio.run(scenario())
    (said,) = [r.getMessage() for r in caplog.records if "ahead of the time GC" in r.getMessage()]
    assert "the node was stopped that long, or the clock stepped forward" in said


def test_a_node_restarted_while_its_clock_is_set_back_resumes_where_gc_was(tmp_path: Path) -> None:
    """The clock is set back a year (an RTC reset), the node restarts, then NTP sets the
    clock right: GC resumes at once where it was before the reset, not a year behind
    catching up at twice real time (no GC for a year). Checked to fail without the fix
    (the pass saved the year-old time it used)."""
    config = StorageNodeConfig(storage=StorageSection(data_dir=tmp_path, gc_interval_s=3600.0))
    now = now_ms()
    year = 365 * 86_400_000

    def node_at(wall: int) -> StorageNode:
        node = StorageNode(config)
        node.wall_ms = lambda: wall
        return node

    async def scenario() -> None:
        backend = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        await backend.put_many(blobs(5, now + 60_000, b"a minute left"), now)
        assert await node_at(now)._collect_pass(cast(MailboxBackend, backend)) == 0
        assert await node_at(now - year)._collect_pass(cast(MailboxBackend, backend)) == 0
        await backend.close()
        backend = await SqliteBackend.open(tmp_path / "mailboxes.sqlite3")
        restarted = node_at(now - year)  # restarted with the clock still a year back
        assert await restarted._collect_pass(cast(MailboxBackend, backend)) == 0
        restarted.wall_ms = lambda: now + 1_000  # set right
        assert await restarted._collect_pass(cast(MailboxBackend, backend)) == 0
        assert restarted.expiry_clock.stepped_ms == 0  # GC follows the wall clock at once
        await backend.close()

    asyncio.run(scenario())
