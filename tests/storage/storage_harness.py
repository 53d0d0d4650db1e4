"""The per-test harness behind the ``stores`` fixture (a module of its own so tests can
import the type; importing from a conftest is fragile)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from dna_storage.backends.base import MailboxBackend, Tombstone
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend

T = TypeVar("T")


class Stores:
    """Opens isolated backends of either kind inside this test's event loop."""

    def __init__(self, redis_url: Callable[[], str], tmp_path: Path) -> None:
        self._redis_url = redis_url
        self._tmp = tmp_path
        self._runner = asyncio.Runner()
        self._opened: list[MailboxBackend] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    async def open(self, kind: str) -> MailboxBackend:
        backend: MailboxBackend
        if kind == "sqlite":
            backend = await SqliteBackend.open(self._tmp / f"store-{uuid.uuid4().hex}.db")
        elif kind == "redis":
            prefix = f"t{uuid.uuid4().hex}:"
            backend = await RedisBackend.connect(self._redis_url(), prefix=prefix)
        else:
            raise ValueError(kind)
        self._opened.append(backend)
        return backend

    async def reopen(self, backend: MailboxBackend) -> MailboxBackend:
        """Close ``backend`` and open its store again (a node restart)."""
        await backend.close()
        again: MailboxBackend
        if isinstance(backend, SqliteBackend):
            again = await SqliteBackend.open(backend.path)
        else:
            assert isinstance(backend, RedisBackend)
            again = await RedisBackend.connect(self._redis_url(), prefix=backend._p)
        self._opened.append(again)
        return again

    def close(self) -> None:
        try:
            for backend in self._opened:
                self._runner.run(backend.close())
        finally:
            self._runner.close()


async def listing(
    backend: MailboxBackend, mailbox_id: bytes, now_ms: int
) -> tuple[list[bytes], list[Tombstone]]:
    """A mailbox's sorted unexpired blob IDs and live tombstones, read as repair reads them
    (``sync_index``, then ``get_tombstones``): the tests check the path the node uses."""
    index = await backend.sync_index(mailbox_id, now_ms)
    tombs = await backend.get_tombstones(mailbox_id, [t for t, _ in index.tombstones], now_ms)
    return index.blob_ids, tombs


def integrity_ok(path: Path) -> bool:
    """``PRAGMA integrity_check`` says "ok", on a connection of its own (WAL: beside a
    backend that has the file open). A check that trips over a malformed page is a failed
    check; an operational failure (locked, I/O) raises: it says nothing about integrity."""
    conn = sqlite3.connect(path)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)])
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()
