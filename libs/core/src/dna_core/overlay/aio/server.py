"""An overlay member as a service: UDP routing, the gRPC Overlay service with health
and reflection, the operator HTTP endpoints, joining, and background upkeep.

Bootstrap nodes run exactly this; storage nodes run it with more gRPC services.
Configuration is one frozen dataclass loaded from TOML + environment
(`dna_core.ops.config`); see docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from dna_core import __version__
from dna_core.ops.config import dump_config
from dna_core.ops.grpc_ops import HealthController, add_health_and_reflection
from dna_core.ops.http import OpsServer, build_ops_app
from dna_core.ops.logs import node_logger
from dna_core.ops.node_key import load_or_create_node_key
from dna_core.overlay.protocol import Addr
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RECORDS,
    DEFAULT_NAME_POW_BITS,
    RecordStore,
)
from dna_core.ratelimit import RateLimiter
from dna_core.wire.gen.dna.v1 import overlay_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from .node import NodeConfig, OverlayNode
from .record_file import RecordFile
from .records_rpc import (
    DEFAULT_SOURCE_BURST,
    DEFAULT_SOURCE_MAX_KEYS,
    DEFAULT_SOURCE_RATE_PER_S,
    MAX_GRPC_MESSAGE,
    OverlayService,
    wall_ms,
)

T = TypeVar("T")
OVERLAY_SERVICE = "dna.v1.Overlay"
BOOTSTRAP_DATA_DIR = "bootstrap-data"
RECORD_FILE_NAME = "records.sqlite3"
ExtraServices = Callable[[grpc.aio.Server, OverlayNode], Sequence[str]]


@dataclass(frozen=True)
class NodeSection:
    host: str = "127.0.0.1"
    udp_port: int = 7400
    grpc_port: int = 7401
    key_file: Path = Path("node.key")
    puzzle_bits: int = 8


@dataclass(frozen=True)
class OverlaySection:
    bootstrap: tuple[str, ...] = ()  # "host:udp_port" of well-known nodes
    k: int = 20
    alpha: int = 3
    allow_loopback: bool = False  # local testnets only: lifts the per-/24 limit for 127/8
    refresh_interval: float = 600.0
    republish_interval: float = 3600.0
    name_pow_bits: int = DEFAULT_NAME_POW_BITS


@dataclass(frozen=True)
class RecordsSection:
    """The record store: where it is kept, how big it may grow, what a sender may do."""

    # Kept across restarts, one file per node. Empty: `records.sqlite3` in the node's own
    # data directory (OverlayServiceConfig.data_dir), so two nodes started from one working
    # directory never share it.
    path: Path = Path("")
    max_records: int = DEFAULT_MAX_RECORDS
    max_bytes: int = DEFAULT_MAX_BYTES
    source_rate_per_s: float = DEFAULT_SOURCE_RATE_PER_S  # new records per source address
    source_burst: float = DEFAULT_SOURCE_BURST
    source_max_keys: int = DEFAULT_SOURCE_MAX_KEYS
    identity_pow_bits: int = DEFAULT_IDENTITY_POW_BITS

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_bytes < 1:
            raise ValueError("max_records and max_bytes must be >= 1")


@dataclass(frozen=True)
class OpsSection:
    http_host: str = "127.0.0.1"
    http_port: int = 7480


@dataclass(frozen=True)
class OverlayServiceConfig:
    node: NodeSection = field(default_factory=NodeSection)
    overlay: OverlaySection = field(default_factory=OverlaySection)
    records: RecordsSection = field(default_factory=RecordsSection)
    ops: OpsSection = field(default_factory=OpsSection)
    log_level: str = "info"

    def data_dir(self) -> Path:
        """Where this node keeps its files by default: a bootstrap node's own directory,
        relative to the working directory like `node.key_file`; roles with a data
        directory of their own (a storage node's `[storage] data_dir`) override it."""
        return Path(BOOTSTRAP_DATA_DIR)

    def records_path(self) -> Path:
        """The record file: `[records] path` if given, else one in the node's data dir."""
        if self.records.path != Path(""):
            return self.records.path
        return self.data_dir() / RECORD_FILE_NAME


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {text!r} is not host:port")
    return host.strip("[]"), int(port)


class OverlayServer:
    def __init__(
        self,
        config: OverlayServiceConfig,
        *,
        role: int,
        extra_services: ExtraServices | None = None,
        extra_readiness: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.config, self.role = config, role
        self._extra = extra_services
        self._extra_ready = extra_readiness  # e.g. a storage node over its disk high-water mark
        self.registry = CollectorRegistry()
        self.started_at = time.time()
        self.ready = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.node: OverlayNode | None = None
        self.health: HealthController | None = None
        self.grpc: grpc.aio.Server | None = None
        self.ops: OpsServer | None = None
        self.record_file: RecordFile | None = None
        self.log = node_logger("dna.node", role=str(role))

    async def start(self) -> None:
        cfg = self.config
        identity, created = load_or_create_node_key(cfg.node.key_file, cfg.node.puzzle_bits)
        self.log = node_logger("dna.node", role=str(self.role), node_id=identity.node_id.hex()[:16])
        if created:
            self.log.info("minted a new node key", extra={"key_file": str(cfg.node.key_file)})
        store = self._open_records()
        self.node = node = OverlayNode(
            identity, self._node_config(), store=store, registry=self.registry
        )
        grpc_port = await self._start_grpc(node, store)
        await node.start(grpc_port=grpc_port)
        self.ops = OpsServer(self._ops_app(), log=self.log)
        await self.ops.start(cfg.ops.http_host, cfg.ops.http_port)
        self._tasks = [
            asyncio.create_task(self._join_and_refresh()),
            asyncio.create_task(self._upkeep()),
        ]
        self.log.info("started", extra={"status": self.status()})

    def _open_records(self) -> RecordStore:
        """The record store, filled from the node's record file (each record verified again:
        what expired while the node was down, or fails a rule, is dropped)."""
        cfg = self.config
        store = RecordStore(
            name_pow_bits=cfg.overlay.name_pow_bits,
            identity_pow_bits=cfg.records.identity_pow_bits,
            max_records=cfg.records.max_records, max_bytes=cfg.records.max_bytes,
        )  # fmt: skip
        path = cfg.records_path()
        self.record_file = RecordFile(path)
        loaded, dropped = self.record_file.load_into(store, wall_ms())
        self.log.info(
            "records loaded", extra={"path": str(path), "loaded": loaded, "dropped": dropped}
        )
        return store

    def _node_config(self) -> NodeConfig:
        cfg = self.config
        return NodeConfig(
            host=cfg.node.host, udp_port=cfg.node.udp_port, grpc_port=cfg.node.grpc_port,
            role=self.role, puzzle_bits=cfg.node.puzzle_bits, k=cfg.overlay.k,
            alpha=cfg.overlay.alpha, allow_loopback=cfg.overlay.allow_loopback,
            refresh_interval=cfg.overlay.refresh_interval,
            name_pow_bits=cfg.overlay.name_pow_bits,
            identity_pow_bits=cfg.records.identity_pow_bits,
        )  # fmt: skip

    async def _start_grpc(self, node: OverlayNode, store: RecordStore) -> int:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
            ]
        )
        records = self.config.records
        evicted = Counter("dna_overlay_records_evicted", "Records evicted to make room",
                          registry=self.registry)  # fmt: skip
        Gauge("dna_overlay_records", "Records held", registry=self.registry).set_function(
            lambda: len(store)
        )
        Gauge("dna_overlay_record_bytes", "Bytes of records held",
              registry=self.registry).set_function(lambda: store.bytes_held)  # fmt: skip
        service = OverlayService(
            store=store,
            closest=node.table.closest,
            local=lambda: _require(node.contact),
            k=self.config.overlay.k,
            limiter=RateLimiter(
                records.source_rate_per_s, records.source_burst, records.source_max_keys
            ),
            journal=self.record_file,
            on_rejected=lambda reason: node.metrics.rejected.labels(reason=reason).inc(),
            on_evicted=evicted.inc,
        )
        overlay_pb2_grpc.add_OverlayServicer_to_server(service, server)
        names = [OVERLAY_SERVICE, *(self._extra(server, node) if self._extra else ())]
        self.health = add_health_and_reflection(server, names)
        port = server.add_insecure_port(f"{self.config.node.host}:{self.config.node.grpc_port}")
        if port == 0:
            raise OSError(
                f"cannot bind gRPC on {self.config.node.host}:{self.config.node.grpc_port}"
            )
        await server.start()
        self.grpc = server
        return port

    def _ops_app(self) -> Any:
        return build_ops_app(
            health=lambda: not self._stopping,
            ready=self._readiness,
            status=self.status,
            registry=self.registry,
            log=self.log,
        )

    def _readiness(self) -> tuple[bool, str]:
        if self._stopping:
            return False, "shutting down"
        if not self.ready:
            return False, "joining the overlay: routing table not usable yet"
        if self._extra_ready is not None:
            ready, reason = self._extra_ready()
            if not ready:
                return False, reason
        return True, f"{len(_require(self.node).table)} contacts"

    async def _join_and_refresh(self) -> None:
        node = _require(self.node)
        seeds = [parse_addr(a) for a in self.config.overlay.bootstrap]
        seeds = [a for a in seeds if a != node.udp_addr]
        delay = 0.5
        while seeds and not await node.join(seeds):
            self.log.warning("no bootstrap answered; retrying", extra={"retry_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        # A seed node (no other bootstrap configured) is usable as soon as it listens.
        await self._set_ready(True)
        self.log.info("joined", extra={"contacts": len(node.table)})
        await node.refresh(0)
        await node.refresh_forever()

    async def _upkeep(self) -> None:
        """Expire records every minute; republish held records to the current k closest."""
        node, store = _require(self.node), _require(_require(self.node).store)
        interval_ms = int(self.config.overlay.republish_interval * 1000)
        while True:
            await asyncio.sleep(60)
            _require(self.record_file).delete(store.expire_keys(wall_ms()))
            for record in store.republish_due(wall_ms(), interval_ms):
                node.spawn(node.put_record(record.raw, record.body.key))

    async def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.health is not None:
            await self.health.set_serving(ready)

    async def stop(self) -> None:
        """Fail readiness, drain gRPC, then close everything."""
        self._stopping = True
        await self._set_ready(False)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.grpc is not None:
            await self.grpc.stop(grace=2.0)
        if self.node is not None:
            await self.node.stop()
        if self.ops is not None:
            await self.ops.stop()
        if self.record_file is not None:
            self.record_file.close()
        self.log.info("stopped")

    def status(self) -> dict[str, Any]:
        node = self.node
        info: dict[str, Any] = {
            "version": __version__,
            "role": self.role,
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config": dump_config(self.config),
            "record_file": str(self.config.records_path()),  # the default resolved
        }
        if node is not None and node.contact is not None:
            ep = node.contact.endpoint
            info |= {
                "node_id": node.node_id.hex(),
                "udp": f"{ep.ip}:{ep.udp_port}",
                "grpc": ep.grpc_target,
                "http": f"{self.config.ops.http_host}:{self.ops.port if self.ops else 0}",
                "routing_table_size": len(node.table),
                "buckets": node.table.bucket_sizes(),
                "records": len(node.store) if node.store is not None else 0,
                "record_bytes": node.store.bytes_held if node.store is not None else 0,
            }
        return info


def _require(value: T | None) -> T:
    if value is None:
        raise RuntimeError("server not started")
    return value
