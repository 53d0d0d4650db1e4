"""A storage node process: an overlay member that also serves the Mailbox service.

Composition: the shared OverlayServer (UDP routing, gRPC Overlay service with
records, health, reflection, ops HTTP) plus the Mailbox gRPC service over a
backend (SQLite by default, Redis optionally), an admission controller and a
garbage-collection loop that expires blobs and tombstones incrementally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from dna_core.overlay.aio.node import OverlayNode
from dna_core.overlay.aio.server import OverlayServer, OverlayServiceConfig
from dna_core.wire.gen.dna.v1 import common_pb2, mailbox_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from dna_storage.admission import Admission, AdmissionConfig
from dna_storage.backends.base import MailboxBackend
from dna_storage.backends.redis import RedisBackend
from dna_storage.backends.sqlite import SqliteBackend
from dna_storage.mailbox_service import DAY_S, MailboxService, Retention
from dna_storage.replication import Repairer

log = logging.getLogger("dna.storage")
MAILBOX_SERVICE = "dna.v1.Mailbox"


@dataclass(frozen=True)
class StorageSection:
    backend: str = "sqlite"  # or "redis"
    data_dir: Path = Path("data")
    redis_url: str = "redis://127.0.0.1:6379/0"
    ttl_days: int = 30  # default blob lifetime
    max_ttl_days: int = 30  # the most a client may ask for
    gc_interval_s: float = 30.0
    gc_batch: int = 1000
    repair_interval_s: float = 60.0  # anti-entropy pass over every mailbox held

    def __post_init__(self) -> None:
        if self.backend not in ("sqlite", "redis"):
            raise ValueError(f"backend must be sqlite or redis, got {self.backend!r}")
        if not 0 < self.ttl_days <= self.max_ttl_days:
            raise ValueError("ttl_days must be > 0 and <= max_ttl_days")


@dataclass(frozen=True)
class StorageNodeConfig(OverlayServiceConfig):
    storage: StorageSection = field(default_factory=StorageSection)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def data_dir(self) -> Path:
        """The record file lives beside the mailboxes, in `[storage] data_dir`."""
        return self.storage.data_dir


async def open_backend(section: StorageSection) -> MailboxBackend:
    if section.backend == "redis":
        return await RedisBackend.connect(section.redis_url)
    section.data_dir.mkdir(parents=True, exist_ok=True)
    return await SqliteBackend.open(section.data_dir / "mailboxes.sqlite3")


class StorageMetrics:
    """The storage node's own series, in the node's registry (docs/storage.md)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "dna_storage_requests",
            "Mailbox requests by method and outcome (ok, size, pow, rate, quota, disk, ...)",
            ["method", "outcome"],
            registry=registry,
        )
        self.blobs = Gauge("dna_storage_blobs", "Blobs stored (incl. expired not yet collected)",
                           registry=registry)  # fmt: skip
        self.bytes = Gauge("dna_storage_bytes", "Bytes of blobs stored", registry=registry)
        self.gc_removed = Counter(
            "dna_storage_gc_removed", "Expired blobs and tombstones removed", registry=registry
        )


class StorageNode:
    def __init__(self, config: StorageNodeConfig) -> None:
        self.config = config
        self.backend: MailboxBackend | None = None
        self.server: OverlayServer | None = None
        self.admission = Admission(config.admission)
        self.metrics = StorageMetrics(CollectorRegistry())  # replaced by the server's at start
        self._tasks: list[asyncio.Task[None]] = []
        self.repairer: Repairer | None = None

    async def start(self) -> None:
        section = self.config.storage
        self.backend = backend = await open_backend(section)
        retention = Retention(section.ttl_days * DAY_S, section.max_ttl_days * DAY_S)

        def add_mailbox(server: grpc.aio.Server, node: OverlayNode) -> list[str]:
            service = MailboxService(
                backend, self.admission, retention=retention,
                sync_puzzle_bits=self.config.node.puzzle_bits, node_id=node.node_id,
                on_outcome=lambda method, outcome: self.metrics.requests.labels(
                    method=method, outcome=outcome
                ).inc(),
            )  # fmt: skip
            mailbox_pb2_grpc.add_MailboxServicer_to_server(service, server)
            return [MAILBOX_SERVICE]

        self.server = OverlayServer(
            self.config,
            role=common_pb2.NODE_ROLE_STORAGE,
            extra_services=add_mailbox,
            extra_readiness=self._disk_readiness,
        )
        self.metrics = StorageMetrics(self.server.registry)
        await self.server.start()
        node = self.server.node
        assert node is not None
        self.repairer = Repairer(
            node, backend, max_ttl_ms=retention.max_ttl_s * 1000,
            registry=self.server.registry, interval_s=section.repair_interval_s,
        )  # fmt: skip
        self._tasks = [
            asyncio.create_task(self._collect_garbage(backend)),
            asyncio.create_task(self.repairer.run_forever()),
        ]

    async def _collect_garbage(self, backend: MailboxBackend) -> None:
        """Expire in bounded batches so GC never stalls the node."""
        section = self.config.storage
        while True:
            removed = await backend.expire(time.time_ns() // 1_000_000, section.gc_batch)
            self._check_disk()
            totals = await backend.totals()
            self.metrics.blobs.set(totals.blobs)
            self.metrics.bytes.set(totals.bytes)
            if removed:
                self.metrics.gc_removed.inc(removed)
                log.info("expired", extra={"removed": removed})
            if removed < section.gc_batch:
                await asyncio.sleep(section.gc_interval_s)

    def _check_disk(self) -> None:
        """Over the high-water mark the node refuses writes and turns unready, but keeps
        serving reads and repair (docs/storage.md)."""
        if self.config.storage.backend == "sqlite":
            usage = shutil.disk_usage(self.config.storage.data_dir)
            self.admission.high_water.update(usage.used, usage.total)

    def _disk_readiness(self) -> tuple[bool, str]:
        if self.admission.high_water.tripped:
            return False, "disk over the high-water mark: refusing writes"
        return True, "disk ok"

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.server is not None:
            await self.server.stop()
        if self.backend is not None:
            await self.backend.close()
