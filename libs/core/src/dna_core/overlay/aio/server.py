"""An overlay member as a service: UDP routing, the gRPC Overlay service with health
and reflection, the operator HTTP endpoints, joining, and background upkeep.

Bootstrap nodes run exactly this; storage nodes run it with more gRPC services.
Configuration is one frozen model loaded from TOML + environment
(`dna_core.ops.config`); every key is in docs/configuration.md.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import resource
import socket
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from pydantic import Field, field_validator

from dna_core import __version__
from dna_core.crypto.node import MAX_PUZZLE_BITS
from dna_core.crypto.records import VerifiedRecord
from dna_core.errors import cannot_open
from dna_core.expiry import ExpiryClock
from dna_core.hostport import host_port
from dna_core.ops.answers import ANSWER_STALL_S, ANSWERS_MAX, ANSWERS_PER_SOURCE, AnswerSlots
from dna_core.ops.config import (
    ConfigModel,
    ConfigPath,
    LogLevelSetting,
    OpsSection,
    Port,
    Secret,
    Strings,
    dump_config,
    no_default_shown,
)
from dna_core.ops.connections import ConnectionCaps, ConnectionLimits
from dna_core.ops.grpc_gate import GrpcGate, ServiceRegistrar
from dna_core.ops.grpc_ops import HealthController, add_health_and_reflection
from dna_core.ops.http import HttpLimits, OpsServer, build_ops_app
from dna_core.ops.logs import node_logger
from dna_core.ops.node_key import load_or_create_node_key
from dna_core.ops.relay import TcpRelay
from dna_core.overlay.contact import source_groups
from dna_core.overlay.protocol import Addr
from dna_core.overlay.records import (
    DEFAULT_IDENTITY_POW_BITS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_GONE,
    DEFAULT_MAX_RECORDS,
    DEFAULT_NAME_POW_BITS,
    RecordStore,
)
from dna_core.ratelimit import RateLimiter, SiteTier
from dna_core.rpc_session_server import SourceCaps
from dna_core.tasks import stop_tasks
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2

from .metrics import GoneCollector
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
from .records_session import SESSIONS, SESSIONS_PER_SOURCE
from .records_session import STALL_S as SESSION_STALL_S
from .records_session import WINDOW as SESSION_WINDOW
from .seeds import resolve_seeds

T = TypeVar("T")
# Registers a role's own gRPC services (``registrar(servicer, service_descriptor)``, behind
# the node's GrpcGate) and returns their full names for health and reflection.
ExtraServices = Callable[[ServiceRegistrar, OverlayNode], Sequence[str]]
OVERLAY_DESCRIPTOR = overlay_pb2.DESCRIPTOR.services_by_name["Overlay"]
BOOTSTRAP_DATA_DIR = "bootstrap-data"
GUARDED_HOST = "127.0.0.1"  # where the gRPC server listens behind the connection guard
FD_HEADROOM = 256  # descriptors a node holds besides connections (files, UDP, channels out)
RECORD_FILE_NAME = "records.sqlite3"
UPKEEP_S = 60.0  # records: expired ones dropped, due ones republished (a share each time)
STEP_WARNING_MS = 5 * 60_000  # upkeep's time this far behind the wall clock is said


class NodeSection(ConfigModel):
    """This node's addresses and identity."""

    host: str = "127.0.0.1"
    """The address others reach; UDP and gRPC bind here. Left at 127.0.0.1 no other machine
    can reach the node (it warns at start)."""
    udp_port: Port = 7400
    """Routing (ping, find-node)."""
    grpc_port: Port = 7401
    """Records (find-value, store), health, reflection; a storage node's mailboxes too."""
    # Where the node's private key lives is nobody's business but the operator's.
    key_file: Annotated[ConfigPath, Secret()] = Path("node.key")
    """The node's Ed25519 seed (mode 0600), minted on first start if absent."""
    puzzle_bits: int = Field(default=8, ge=0, le=MAX_PUZZLE_BITS)
    """The static node-ID puzzle; must match the network."""

    @field_validator("host")
    @classmethod
    def _host_is_an_address_others_reach(cls, host: str) -> str:
        """The node binds ``host`` and tells it to others: a name would be a traceback at
        start, and a wildcard (0.0.0.0, ::) an address no other node can use."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address: set the address others reach"
                " (the node binds it and tells it to others; bootstrap entries may be names)"
            ) from None
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(
                f"{host} cannot be reached: set the address others reach"
                " (the node binds it and tells it to others)"
            )
        return str(ip)


class OverlaySection(ConfigModel):
    """Joining and keeping up the overlay (docs/overlay.md)."""

    bootstrap: Strings = ()
    """Well-known nodes to join through, as "host:udp_port"; empty: seed a new network."""
    k: int = Field(default=20, ge=1)
    """Bucket size of the routing table and width of a lookup (records go to the first
    `RECORD_REPLICAS` = 8 of a lookup's k, docs/overlay.md)."""
    alpha: int = Field(default=3, ge=1)
    """Lookups in flight at once."""
    allow_loopback: bool = False
    """Local testnets only: lifts the per-/24 limit for 127/8 and silences the host warning."""
    refresh_interval: float = Field(default=600.0, gt=0)
    """Seconds between refreshes of idle buckets."""
    seed_ping_interval: float = Field(default=60.0, gt=0)
    """Seconds (on average) between this node's pings to the bootstrap nodes once joined:
    a bootstrap node that restarted, its routing table empty, learns every node again
    within one interval, so clients joining through it find the network."""
    republish_interval: float = Field(default=3600.0, gt=0)
    """Seconds between republishes of the records this node holds."""
    name_pow_bits: int = Field(default=DEFAULT_NAME_POW_BITS, ge=0)
    """Proof of work a name claim must carry."""
    datagram_rate_per_s: float = Field(default=500.0, gt=0)
    """Overlay datagrams (ping, find-node, their answers) taken from one source address
    (IPv6: per /64) per second, checked before decoding; more are dropped (counted as
    `dna_overlay_rejected_total{reason="datagram_rate"}`). An honest node sends a peer a
    few a second; the room is for clients behind one NAT."""
    datagram_burst: float = Field(default=2000.0, ge=1)
    """...after a burst of this many."""

    @field_validator("bootstrap")
    @classmethod
    def _seeds_are_addresses(cls, seeds: tuple[str, ...]) -> tuple[str, ...]:
        for seed in seeds:
            parse_addr(seed, key="bootstrap")  # a bad seed fails at start, not in a task
        return seeds


class RecordsSection(ConfigModel):
    """The record store: where it is kept, how big it may grow, what a sender may do."""

    # Path("") is "unset" (ConfigPath refuses an empty path from the file or environment), so
    # the schema shows no default.
    path: ConfigPath = Field(default=Path(""), json_schema_extra=no_default_shown)
    """The record file, kept across restarts and verified again on load. Unset: records.sqlite3
    in the node's own data directory (bootstrap-data/, or a storage node's storage.data_dir), so
    two nodes started from one working directory never share it."""
    max_records: int = Field(default=DEFAULT_MAX_RECORDS, ge=1)
    """Records held at most; when full, the biggest holder (per /24; IPv6: per /32, then
    per /48 within it) is evicted."""
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, ge=1)
    """Bytes of records held at most (64 MiB: a full store measured 256 MB RSS)."""
    max_gone: int = Field(default=DEFAULT_MAX_GONE, ge=1)
    """Deleted records remembered at most (key, signer, sequence: no record bytes), so
    that an older version of one is refused (no rollback); beyond it the oldest memory of
    the source holding the most is forgotten (per /24; IPv6: per /32, then per /48)."""
    source_rate_per_s: float = Field(default=DEFAULT_SOURCE_RATE_PER_S, gt=0)
    """New records per second from one source address (IPv6: per /64)..."""
    source_burst: float = Field(default=DEFAULT_SOURCE_BURST, ge=1)
    """...after a burst of this many."""
    source_max_keys: int = Field(default=DEFAULT_SOURCE_MAX_KEYS, ge=1)
    """Source addresses the rate limiter remembers."""
    identity_pow_bits: int = Field(default=DEFAULT_IDENTITY_POW_BITS, ge=0)
    """Proof of work identity, presence and rotation records carry."""
    session_window: int = Field(default=SESSION_WINDOW, ge=1, le=1024)
    """Requests a record session may have unanswered; a client sending more is cut."""
    session_stall_s: float = Field(default=SESSION_STALL_S, gt=0)
    """Seconds a record session's response may wait for the client to read it before the
    session is cut (a client that never reads costs the node nothing more)."""
    sessions_max_per_source: int = Field(default=SESSIONS_PER_SOURCE, ge=1)
    """Record sessions open at once from one address (IPv6: per /64); one more is refused
    (RESOURCE_EXHAUSTED) before it holds anything."""
    sessions_max: int = Field(default=SESSIONS, ge=1)
    """Record sessions open at once on this node, from every address."""


GRPC_STREAM_WINDOW = 1 << 20  # what a client may send on a call before the node reads it


class ConnectionsSection(ConfigModel):
    """Caps on inbound connections, so idle or hoarded ones cannot use up the node's file
    descriptors (docs/operations.md). grpcio has no per-source cap: the connection guard
    (a relay in front of the gRPC server, `dna_core.ops.relay`) gives one."""

    # The guard on the public gRPC port; off only where a firewall or load balancer in
    # front of the node caps connections per source (behind a load balancer every client
    # has the balancer's address, so a per-source cap here would cap them all together).
    grpc_connection_guard: bool = True
    """Relay the public gRPC port through the connection guard, which caps connections per
    source; off only behind a firewall or load balancer that does."""
    grpc_max_connections: int = Field(default=4096, gt=0)
    """gRPC connections in total; over it a new connection is closed at once."""
    grpc_max_connections_per_source: int = Field(default=64, gt=0)
    """gRPC connections from one address (IPv6: per /64), with the guard on."""
    grpc_handshake_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds a new gRPC connection has to send the HTTP/2 preface and settings."""
    grpc_idle_timeout_s: float = Field(default=300.0, gt=0)
    """A gRPC connection without a call for this long is closed (GOAWAY)."""
    grpc_max_age_s: float = Field(default=3600.0, gt=0)
    """Then GOAWAY to every gRPC connection: clients reconnect, calls get 30 s to end."""
    grpc_max_streams: int = Field(default=100, gt=0)
    """Concurrent calls per gRPC connection."""
    grpc_stream_window_bytes: int = Field(default=GRPC_STREAM_WINDOW, ge=65_535, le=1 << 30)
    """Bytes a client may send on one call before the node reads them (HTTP/2 flow
    control), fixed: grpcio's default grows it with the measured bandwidth-delay product,
    and a stream whose frames the node does not read yet (a session waiting for room)
    then held tens of MiB inside grpc. 1 MiB: 10 MB/s per call at 100 ms round trip."""
    grpc_answers_max: int = Field(default=ANSWERS_MAX, gt=0)
    """Large unary answers (a page of a mailbox, a record) held at once, from every address:
    each is in memory until its client reads it (a page: ~5 MiB). One more waits for room,
    and is refused (RESOURCE_EXHAUSTED) if none comes within `grpc_answer_stall_s`. Sessions
    do not count here."""
    grpc_answers_max_per_source: int = Field(default=ANSWERS_PER_SOURCE, gt=0)
    """Of them, from one address (IPv6: per /64)."""
    grpc_answer_stall_s: float = Field(default=ANSWER_STALL_S, gt=0)
    """Seconds a large unary answer may wait for its client to read it before the call is
    ended (RESOURCE_EXHAUSTED) and the answer dropped."""
    grpc_keepalive_s: float = Field(default=60.0, gt=0)
    """Ping a quiet gRPC connection this often, to find dead peers."""
    http_max_connections: int = Field(default=64, gt=0)
    """Ops HTTP connections in total."""
    http_max_connections_per_source: int = Field(default=8, gt=0)
    """Ops HTTP connections from one address."""
    http_idle_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds an ops HTTP connection has to send a whole request head."""

    def descriptors_needed(self) -> int:
        """File descriptors the caps allow connections to hold, with room for the rest."""
        per_grpc = 3 if self.grpc_connection_guard else 1  # client, relay upstream, grpc's
        return per_grpc * self.grpc_max_connections + self.http_max_connections + FD_HEADROOM

    def grpc_caps(self) -> ConnectionCaps:
        return ConnectionCaps(
            ConnectionLimits(self.grpc_max_connections, self.grpc_max_connections_per_source)
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """grpcio's channel arguments for these caps (grpc_types.h)."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        return [
            ("grpc.max_allowed_incoming_connections", self.grpc_max_connections),
            ("grpc.server_handshake_timeout_ms", ms(self.grpc_handshake_timeout_s)),
            ("grpc.max_connection_idle_ms", ms(self.grpc_idle_timeout_s)),
            ("grpc.max_connection_age_ms", ms(self.grpc_max_age_s)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.max_concurrent_streams", self.grpc_max_streams),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", self.grpc_stream_window_bytes),
            ("grpc.keepalive_time_ms", ms(self.grpc_keepalive_s)),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]

    def answer_slots(self, registry: CollectorRegistry) -> AnswerSlots:
        return AnswerSlots(
            per_source=self.grpc_answers_max_per_source, total=self.grpc_answers_max,
            stall_s=self.grpc_answer_stall_s, registry=registry,
        )  # fmt: skip

    def http_limits(self) -> HttpLimits:
        return HttpLimits(
            max_connections=self.http_max_connections,
            max_connections_per_source=self.http_max_connections_per_source,
            idle_timeout_s=self.http_idle_timeout_s,
        )


class OverlayServiceConfig(ConfigModel):
    """A bootstrap node's configuration; a storage node's adds its own sections."""

    node: NodeSection = NodeSection()
    overlay: OverlaySection = OverlaySection()
    records: RecordsSection = RecordsSection()
    ops: OpsSection = OpsSection()
    connections: ConnectionsSection = ConnectionsSection()
    log_level: LogLevelSetting = "info"
    """Log lines below this level are dropped (any case: "INFO" is "info")."""

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


def parse_addr(text: str, key: str = "address") -> Addr:
    host, _, port = text.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{key}: {text!r} is not host:port")
    return host.strip("[]"), int(port)


async def _probe_tcp(host: str, port: int) -> None:
    socket.create_server(
        (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET
    ).close()


def _bind_grpc(server: grpc.aio.Server, address: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio says only "Failed to bind"; the usual cause is a taken port
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on gRPC {address}: address in use or not available")
    return port


async def _listen(what: str, start: Awaitable[T]) -> T:
    """``start`` a listener; a failure to bind names the listener and its address."""
    try:
        return await start
    except OSError as exc:
        raise OSError(f"cannot listen on {what}: {exc.strerror or exc}") from None


def role_name(role: int) -> str:
    """``NODE_ROLE_STORAGE`` (2) -> ``"storage"``: what logs and ``/status`` show."""
    return common_pb2.NodeRole.Name(role).removeprefix("NODE_ROLE_").lower()  # type: ignore[arg-type]


def config_warnings(config: OverlayServiceConfig, open_files_limit: int | None = None) -> list[str]:
    """Settings that work but are most likely a mistake on a public node.
    ``open_files_limit``: what the node raises its own to (default: the hard limit)."""
    warnings = []
    if ipaddress.ip_address(config.node.host).is_loopback and not config.overlay.allow_loopback:
        warnings.append(
            f"node.host is {config.node.host} (the default if left out): other machines "
            "cannot reach this node; set [node] host to the address others reach"
        )
    if open_files_limit is None:
        open_files_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    needed = config.connections.descriptors_needed()
    if open_files_limit != resource.RLIM_INFINITY and needed > open_files_limit:
        warnings.append(
            f"[connections] caps allow connections that need up to {needed} file descriptors "
            f"but the open-files limit is {open_files_limit}: past it new connections fail; "
            "raise the hard limit (systemd LimitNOFILE) or lower grpc_max_connections"
        )
    return warnings


class OverlayServer:
    def __init__(
        self,
        config: OverlayServiceConfig,
        *,
        role: int,
        extra_services: ExtraServices | None = None,
        extra_readiness: Callable[[], tuple[bool, str]] | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.config, self.role = config, role
        self._extra = extra_services
        self._extra_ready = extra_readiness  # e.g. a storage node over its disk high-water mark
        self._extra_status = extra_status  # a role's own figures, under its role's name
        self.registry = CollectorRegistry()
        # The process's CPU, memory and open files, and which build runs in which role.
        ProcessCollector(registry=self.registry)
        Gauge(
            "dna_build_info", "Always 1: the running version and role", ["version", "role"],
            registry=self.registry,
        ).labels(version=__version__, role=role_name(role)).set(1)  # fmt: skip
        # What /readyz answers, as a series: alerts on readiness flapping need it in
        # Prometheus, where neither compose nor a bare host has the kubelet's view.
        Gauge(
            "dna_ready", "1 while /readyz answers 200, else 0", registry=self.registry
        ).set_function(lambda: 1.0 if self._readiness()[0] else 0.0)
        self.warnings = config_warnings(config)
        self.started_at = time.time()
        self.ready = False
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.node: OverlayNode | None = None
        self.health: HealthController | None = None
        self.grpc: grpc.aio.Server | None = None
        self.records: OverlayService | None = None  # the Overlay gRPC service (its sessions)
        self.guard: TcpRelay | None = None  # in front of the gRPC server, if configured
        self.ops: OpsServer | None = None
        self.record_file: RecordFile | None = None
        # Records expire by the wall clock (reads, republishing), but are deleted against
        # the ExpiryClock's time (dna_core.expiry), resumed from the record file: a step
        # forward is followed at most twice as fast as time passes. Tests step the clocks.
        self.wall_ms: Callable[[], int] = wall_ms
        self.monotonic_ms: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000
        self.expiry_clock = ExpiryClock()
        self.log = node_logger("dna.node", role=role_name(role))

    async def start(self) -> None:
        """Bind gRPC, UDP and HTTP in that order; if one fails, close what was opened (so
        nothing is left for interpreter exit to trip over) and raise naming the address."""
        cfg = self.config
        identity, created = load_or_create_node_key(cfg.node.key_file, cfg.node.puzzle_bits)
        self.log = node_logger(
            "dna.node", role=role_name(self.role), node_id=identity.node_id.hex()[:16]
        )
        for warning in self.warnings:
            self.log.warning(warning)
        if created:
            self.log.info("minted a new node key (node.key_file)")
        store = self._open_records()
        self.node = node = OverlayNode(
            identity, self._node_config(), store=store, registry=self.registry
        )
        try:
            grpc_port = await self._start_grpc(node, store)
            udp = f"UDP {host_port(cfg.node.host, cfg.node.udp_port)}"
            await _listen(udp, node.start(grpc_port=grpc_port))
            self.ops = OpsServer(
                self._ops_app(), log=self.log, limits=cfg.connections.http_limits()
            )
            http = f"HTTP {host_port(cfg.ops.http_host, cfg.ops.http_port)}"
            await _listen(http, self.ops.start(cfg.ops.http_host, cfg.ops.http_port))
        except BaseException:
            await self._close_listeners()
            raise
        self._tasks = [
            asyncio.create_task(self._join_and_refresh()),
            asyncio.create_task(self._upkeep()),
        ]
        self.log.info("started", extra={"status": self.status()})

    def _open_records(self) -> RecordStore:
        """The record store, filled from the node's record file (each record verified again:
        what expired while the node was down, or fails a rule, is dropped; expired by the
        ExpiryClock resumed from the file's saved time, not by a stepped wall clock)."""
        cfg = self.config
        store = RecordStore(
            name_pow_bits=cfg.overlay.name_pow_bits,
            identity_pow_bits=cfg.records.identity_pow_bits,
            max_records=cfg.records.max_records, max_bytes=cfg.records.max_bytes,
            max_gone=cfg.records.max_gone,
            groups=functools.partial(source_groups, allow_loopback=cfg.overlay.allow_loopback),
        )  # fmt: skip
        path = cfg.records_path()
        try:
            self.record_file = RecordFile(path)
            self.expiry_clock = ExpiryClock(self.record_file.expiry_time())
            wall = self.wall_ms()
            expiry = self._expiry_now(wall, at_start=True)
            # Verified as of the latest time this node has used: with the clock set back (an
            # RTC reset) every record was "created in the future", and the load deleted it.
            verify_at = max(wall, _require(self.expiry_clock.high_ms))
            # (damage below the header shows only when the rows are read)
            loaded, dropped = self.record_file.load_into(store, verify_at, expiry)
            interval_ms = int(cfg.overlay.republish_interval * 1000)
            store.spread_republish(wall, interval_ms, random.Random())
        except (sqlite3.Error, OSError) as exc:
            if self.record_file is not None:
                self.record_file.close()
                self.record_file = None
            raise cannot_open(path, exc) from None
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
            republish_interval=cfg.overlay.republish_interval,
            name_pow_bits=cfg.overlay.name_pow_bits,
            identity_pow_bits=cfg.records.identity_pow_bits,
            datagram_rate_per_s=cfg.overlay.datagram_rate_per_s,
            datagram_burst=cfg.overlay.datagram_burst,
        )  # fmt: skip

    async def _start_grpc(self, node: OverlayNode, store: RecordStore) -> int:
        """The gRPC server with every service, on the public address or, with the guard,
        on loopback behind the guard; returns the public port."""
        self.grpc = server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
                # grpcio sets SO_REUSEPORT by default: a second node on the same port would
                # start and split the traffic with the first instead of failing to bind.
                ("grpc.so_reuseport", 0),
                *self.config.connections.grpc_options(),
            ]
        )
        if self.config.connections.grpc_connection_guard:
            self.guard = self._connection_guard(_bind_grpc(server, f"{GUARDED_HOST}:0"))
        gate = GrpcGate(
            max_message=MAX_GRPC_MESSAGE, registry=self.registry, log=self.log,
            real_peer=None if self.guard is None else self.guard.grpc_peer,
            answers=self.config.connections.answer_slots(self.registry),
            cut_connection=None if self.guard is None else self.guard.cut,
        )  # fmt: skip
        self.records = self._overlay_service(node, store)
        names = [gate.add(server, self.records, OVERLAY_DESCRIPTOR)]
        if self._extra is not None:
            names += self._extra(gate.registrar(server), node)
        self.health = add_health_and_reflection(server, names, gate)
        host, wanted = self.config.node.host, self.config.node.grpc_port
        address = f"gRPC {host_port(host, wanted)}"
        if self.guard is not None:
            await server.start()
            return await _listen(address, self.guard.start(host, wanted))
        if wanted:
            # grpcio reports a failed bind as a C-level log line and a bare "Failed to bind":
            # a bind of our own first gives the reason (in use, not an address of this host).
            await _listen(address, _probe_tcp(host, wanted))
        port = _bind_grpc(server, host_port(host, wanted))
        await server.start()
        return port

    def _connection_guard(self, grpc_port: int) -> TcpRelay:
        """The relay that caps connections per source in front of ``grpc_port``."""
        refused = Counter(
            "dna_grpc_connections_refused",
            "gRPC connections closed at accept by the connection guard, by reason",
            ["reason"],
            registry=self.registry,
        )
        guard = TcpRelay(
            (GUARDED_HOST, grpc_port),
            caps=self.config.connections.grpc_caps(),
            on_refused=lambda reason: refused.labels(reason=reason).inc(),
        )
        Gauge("dna_grpc_connections", "gRPC connections open through the connection guard",
              registry=self.registry).set_function(lambda: guard.open)  # fmt: skip
        return guard

    def _overlay_service(self, node: OverlayNode, store: RecordStore) -> OverlayService:
        records = self.config.records
        evicted = Counter("dna_overlay_records_evicted", "Records evicted to make room",
                          registry=self.registry)  # fmt: skip
        Gauge("dna_overlay_records", "Records held", registry=self.registry).set_function(
            lambda: len(store)
        )
        Gauge("dna_overlay_record_bytes", "Bytes of records held",
              registry=self.registry).set_function(lambda: store.bytes_held)  # fmt: skip
        self.registry.register(GoneCollector(store))
        return OverlayService(
            store=store,
            closest=node.table.closest,
            local=lambda: _require(node.contact),
            k=self.config.overlay.k,
            limiter=RateLimiter(
                records.source_rate_per_s,
                records.source_burst,
                records.source_max_keys,
                site=SiteTier(),
            ),
            journal=self.record_file,
            clock=self.wall_ms,  # reads hide what the wall clock calls expired
            # stores are judged by the ExpiryClock as the load is; read, not advanced: each
            # reading adds its slack, so a reading per store would let a flood of stores
            # catch it up with a stepped clock
            used_time=lambda: self.expiry_clock.high_ms,
            on_rejected=lambda reason: node.metrics.rejected.labels(reason=reason).inc(),
            on_evicted=evicted.inc,
            registry=self.registry,
            session_window=records.session_window,
            session_stall_s=records.session_stall_s,
            session_caps=SourceCaps(
                "record session", records.sessions_max_per_source, records.sessions_max
            ),
        )

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

    async def _other_seeds(self) -> tuple[list[Addr], list[str]]:
        """The configured bootstrap nodes other than this one, resolved again on every
        call (a name, a Kubernetes pod's or a compose service's, may not resolve yet, or
        point elsewhere after a restart), and those that did not resolve."""
        node = _require(self.node)
        family = socket.AF_INET6 if ":" in self.config.node.host else socket.AF_INET
        configured = [parse_addr(seed, key="bootstrap") for seed in self.config.overlay.bootstrap]
        found, unresolved = await resolve_seeds(configured, family)
        return [a for a in found if a != node.udp_addr], unresolved

    async def _join_and_refresh(self) -> None:
        node = _require(self.node)
        delay = 0.5
        while True:
            seeds, unresolved = await self._other_seeds()
            if not seeds and not unresolved:
                node.handoffs_open = True  # (its first contacts are the ones joining)
                break  # no other bootstrap configured: this node seeds the network
            if seeds and await node.join(seeds):
                break
            self.log.warning(
                "no bootstrap answered; retrying",
                extra={"retry_s": delay, "unresolved": unresolved},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        # A seed node (no other bootstrap configured) is usable as soon as it listens.
        await self._set_ready(True)
        self.log.info("joined", extra={"contacts": len(node.table)})
        await node.refresh(0)
        await asyncio.gather(node.refresh_forever(), self._ping_seeds_forever())

    async def _ping_seeds_forever(self) -> None:
        """Ping the bootstrap nodes now and then. A bootstrap node restarted with its key
        and address comes back with an empty routing table, and nodes that kept running
        may not query it for a long time (a bucket refresh, ten minutes): until one does,
        every client joining through it learns no node, and finds no storage node. A ping
        is a request, so the bootstrap node observes (and after a key proof, keeps) each
        node that pings it."""
        node = _require(self.node)
        interval = self.config.overlay.seed_ping_interval
        while True:
            await asyncio.sleep(interval * (0.5 + node.rng.random()))
            seeds, _ = await self._other_seeds()
            await asyncio.gather(*(node.ping(seed) for seed in seeds))

    async def _upkeep(self) -> None:
        """Expire records every minute; republish held records to the key's current closest
        nodes (`put_record`)."""
        node, store = _require(self.node), _require(_require(self.node).store)
        interval_ms = int(self.config.overlay.republish_interval * 1000)
        while True:
            await asyncio.sleep(UPKEEP_S)
            for record in self.upkeep_pass(store, interval_ms):
                node.spawn(node.put_record(record.raw, record.body.key))

    def upkeep_pass(self, store: RecordStore, interval_ms: int) -> list[VerifiedRecord]:
        """Delete what expired by the ExpiryClock's time (memory and file), save that time
        for the next start, and return the records due for republishing: those the wall
        clock calls unexpired (one it hides is not offered to other nodes, which would
        refuse it)."""
        wall = self.wall_ms()
        record_file = _require(self.record_file)
        deleted_to = self._expiry_now(wall)
        expired = store.expire_keys(deleted_to)
        remembered = [(key, gone) for key in expired if (gone := store.gone(key)) is not None]
        record_file.forget(expired, remembered, deleted_to, store.take_forgotten())
        record_file.save_expiry_time(_require(self.expiry_clock.high_ms))
        return store.republish_due(wall, interval_ms, int(UPKEEP_S * 1000))

    def _expiry_now(self, wall: int, *, at_start: bool = False) -> int:
        """The ExpiryClock's time now; a step forward it lags behind is said once."""
        now = self.expiry_clock.now_ms(wall, self.monotonic_ms())
        news = self.expiry_clock.step_news(STEP_WARNING_MS)
        if news == "behind":
            why = ("since the time the record file saved: the node was stopped that long,"
                   " or the clock stepped forward" if at_start else "a step forward?")  # fmt: skip
            self.log.warning(
                "the wall clock is %.0f s ahead of the time records are deleted against "
                "(%s): expired records are deleted catching up at most twice as fast as "
                "time passes; reads hide them meanwhile",
                self.expiry_clock.stepped_ms / 1000,
                why,
            )
        elif news == "caught up":
            self.log.info("records are deleted against the wall clock again")
        return now

    async def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if self.health is not None:
            await self.health.set_serving(ready)

    async def _close_listeners(self) -> None:
        """Undo a start that failed part-way (each step copes with never having started)."""
        if self.grpc is not None:
            await self.grpc.stop(grace=None)
        if self.guard is not None:
            await self.guard.close()
        if self.node is not None:
            await self.node.stop()
        if self.ops is not None:
            await self.ops.stop()

    async def stop(self) -> None:
        """Fail readiness, drain gRPC, then close everything."""
        self._stopping = True
        await self._set_ready(False)
        await stop_tasks(self._tasks, failures_to=self.log)
        if self.grpc is not None:
            await self.grpc.stop(grace=2.0)  # GOAWAY through the guard, then closes
        if self.guard is not None:
            await self.guard.close()
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
            "role": role_name(self.role),
            "ready": self.ready,
            "uptime_s": round(time.time() - self.started_at, 1),
            "config": dump_config(self.config),
            "record_file": str(self.config.records_path()),  # the default resolved
        }
        if node is not None and node.contact is not None:
            ep = node.contact.endpoint
            info |= {
                "node_id": node.node_id.hex(),
                "udp": host_port(ep.ip, ep.udp_port),
                "grpc": ep.grpc_target,
                "http": host_port(self.config.ops.http_host, self.ops.port if self.ops else 0),
                "routing_table_size": len(node.table),
                "buckets": node.table.bucket_sizes(),
                "records": len(node.store) if node.store is not None else 0,
                "record_bytes": node.store.bytes_held if node.store is not None else 0,
            }
        if self._extra_status is not None:
            info[role_name(self.role)] = self._extra_status()
        if self.warnings:
            info["warnings"] = self.warnings
        return info


def _require(value: T | None) -> T:
    if value is None:
        raise RuntimeError("server not started")
    return value
