"""The STUN/TURN node as a service: the core (`dna_stun.core`) behind non-blocking UDP sockets
on the event loop, the operator HTTP endpoints, and upkeep.

The adapter is thin on purpose: each readable socket is drained (up to a batch, so one busy
socket cannot starve the others), the batch goes through the core in one call with the time
of a monotonic clock, and the core's ``Send`` instructions go out on the listening socket or
the named relay socket. Relay sockets are plain sockets registered with ``loop.add_reader``:
binding one is synchronous, so the core learns the relay address in the same call that
answers the Allocate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from dna_core import __version__
from dna_core.hostport import host_port
from dna_core.interfaces import interface_addresses
from dna_core.ops.config import dump_config
from dna_core.ops.http import HttpLimits, OpsServer, build_ops_app
from dna_core.ops.logs import LogThrottle, node_logger
from dna_core.tasks import stop_tasks
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dna_stun.auth import Credentials, Nonces
from dna_stun.config import StunServiceConfig, config_warnings
from dna_stun.core import (
    AUTH_FAILURE_REASONS,
    DIRECTIONS,
    REFUSAL_REASONS,
    REQUEST_KINDS,
    Addr,
    Datagram,
    Limits,
    Send,
    TurnCore,
)
from dna_stun.policy import RelayPolicy

__all__ = ["StunServer"]

BATCH = 256  # datagrams read from one socket before the loop serves the others
UPKEEP_INTERVAL_S = 5.0
RECV_SIZE = 65536  # a UDP datagram's largest payload, rounded up
BIND_TRIES = 64  # random ports tried before a relay is refused (508)
SOCKET_BUFFER = 1 << 21
# A datagram that raises is a bug, but whoever found it can send it again and again: its
# traceback is logged at most once a minute, with how many were not (each is counted).
LOG_EVERY_S = 60.0


def _udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host``; ``::`` is dual-stack (IPv4 clients
    arrive as IPv4-mapped addresses, which `_drain` turns back into IPv4 ones)."""
    ip = ipaddress.ip_address(host)
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if ip.version == 6 and ip.is_unspecified:  # whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _drain(sock: socket.socket) -> list[Datagram]:
    """What one socket holds, up to ``BATCH`` datagrams (so one busy socket cannot starve the
    others): the hot path, so the IPv4 loop appends what ``recvfrom`` returns as it is. On an
    IPv6 socket an IPv4-mapped source (a dual-stack socket's IPv4 client) becomes the IPv4
    address it is: the client's reflexive address is IPv4 (XOR-MAPPED-ADDRESS family 0x01,
    RFC 8489 section 14.2), and the policy and the allocations see one form of it."""
    batch: list[Datagram] = []
    append, recvfrom = batch.append, sock.recvfrom
    ipv6 = sock.family == socket.AF_INET6
    for _ in range(BATCH):
        try:
            if ipv6:
                data, addr = recvfrom(RECV_SIZE)
                host = addr[0]
                if host.startswith("::ffff:") and "." in host:
                    host = host[7:]
                append((data, (host, addr[1])))  # from (host, port, flowinfo, scope_id)
            else:
                append(recvfrom(RECV_SIZE))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # ICMP errors surface here (port unreachable): not ours to act on
            continue
    return batch


class RelaySockets:
    """``RelayPorts`` with real sockets: one non-blocking UDP socket per allocation."""

    def __init__(
        self,
        hosts: dict[int, str],
        port_range: tuple[int, int],
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[socket.socket, Addr], None],
    ) -> None:
        self.hosts, self.port_range, self.loop = hosts, port_range, loop  # family -> address
        self.on_readable = on_readable
        self.sockets: dict[Addr, socket.socket] = {}
        self.retired: list[Addr] = []  # closed, but their sockets wait for ``flush``

    def open(self, even: bool, family: int) -> Addr | None:
        host = self.hosts.get(family)
        if host is None:
            return None
        low, high = self.port_range
        for _ in range(BIND_TRIES):
            port = random.randint(low, high)
            if even and port % 2:
                port = port - 1 if port > low else port + 1
            if not low <= port <= high:
                continue
            try:
                sock = _udp_socket(host, port)
            except OSError:
                continue  # taken: try another
            relay = (host, port)
            self.sockets[relay] = sock
            self.loop.add_reader(sock.fileno(), self.on_readable, sock, relay)
            return relay
        return None

    def close(self, relay: Addr) -> None:
        """Stops reading now; the socket itself closes at ``flush``, after the sends of the
        batch that deleted its allocation (what a client relayed just before its Refresh
        of lifetime 0 still goes out, as it would have one datagram at a time)."""
        sock = self.sockets.get(relay)
        if sock is not None and relay not in self.retired:
            self.loop.remove_reader(sock.fileno())
            self.retired.append(relay)

    def flush(self) -> None:
        for relay in self.retired:
            self.sockets.pop(relay).close()
        self.retired.clear()

    def close_all(self) -> None:
        for relay in list(self.sockets):
            self.close(relay)
        self.flush()


class _StatsCollector(Collector):
    """The core's plain counters as Prometheus series, read at scrape time (no per-packet
    metric calls on the hot path)."""

    def __init__(self, core: Callable[[], TurnCore | None]) -> None:
        self._core = core

    def collect(self) -> Iterator[Any]:
        core = self._core()
        if core is None:
            return
        stats = core.stats
        yield GaugeMetricFamily(
            "dna_stun_allocations", "TURN allocations held", len(core.by_client)
        )
        yield CounterMetricFamily(
            "dna_stun_allocations_created", "TURN allocations granted", stats.allocations_created
        )
        for name, help_text, label, counts, known in (
            ("dna_stun_relayed_packets", "Datagrams relayed, by direction", "direction",
             stats.relayed_packets, DIRECTIONS),
            ("dna_stun_relayed_bytes", "Payload bytes relayed, by direction", "direction",
             stats.relayed_bytes, DIRECTIONS),
            ("dna_stun_auth_failures", "Requests whose credentials failed, by reason", "reason",
             stats.auth_failures, AUTH_FAILURE_REASONS),
            ("dna_stun_refusals", "Datagrams refused or dropped, by reason", "reason",
             stats.refusals, REFUSAL_REASONS),
            ("dna_stun_requests", "STUN/TURN requests, by method", "method", stats.requests,
             REQUEST_KINDS),
        ):  # fmt: skip
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key in sorted({*known, *counts}):  # every known series, at 0 until it moves
                family.add_metric([key], counts.get(key, 0))
            yield family


class StunServer:
    def __init__(
        self,
        config: StunServiceConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        unix_time: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` times the core (lifetimes, the bandwidth bucket: a monotonic clock, so
        an NTP step neither drops every allocation nor starves them); ``unix_time`` judges
        time-limited credentials, whose expiry is a Unix time."""
        self.config = config
        self.clock, self.unix_time = clock, unix_time
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        Gauge(
            "dna_build_info", "Always 1: the running version and role", ["version", "role"],
            registry=self.registry,
        ).labels(version=__version__, role="stun").set(1)  # fmt: skip
        Gauge("dna_ready", "1 while /readyz answers 200, else 0", registry=self.registry
              ).set_function(lambda: 1.0 if self._readiness()[0] else 0.0)  # fmt: skip
        self.core: TurnCore | None = None
        self.registry.register(_StatsCollector(lambda: self.core))
        self.warnings = config_warnings(config)
        self.log = node_logger("dna.stun", role="stun")
        self.started_at = self.clock()
        self.ready = False
        self._stopping = False
        self._sock: socket.socket | None = None
        self._sock6: socket.socket | None = None  # [server] host_ipv6: IPv6 clients
        self._relays: RelaySockets | None = None
        self._ops: OpsServer | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self.udp_addr: Addr | None = None
        self.udp_addr6: Addr | None = None
        self._error_log = LogThrottle(LOG_EVERY_S, self.clock)

    @property
    def http_port(self) -> int:
        return self._ops.port if self._ops is not None else 0

    def _make_core(self, loop: asyncio.AbstractEventLoop) -> TurnCore:
        cfg = self.config
        relay_ips = cfg.server.relay_ips()
        ports = (cfg.server.relay_port_min, cfg.server.relay_port_max)
        self._relays = RelaySockets(relay_ips, ports, loop, self._from_peers)
        policy = RelayPolicy(
            denied=cfg.relay.denied(),
            allowed=cfg.relay.allowed_peers,
            relay_ports=(cfg.server.relay_port_min, cfg.server.relay_port_max),
        )
        policy.add_own_endpoint((cfg.server.host, cfg.server.udp_port))
        if cfg.server.host_ipv6:
            policy.add_own_endpoint((cfg.server.host_ipv6, cfg.server.udp_port))
        policy.own_ips.update(str(ipaddress.ip_address(ip)) for ip in relay_ips.values())
        if policy.at_wildcard:
            policy.add_host_addresses(interface_addresses())
        return TurnCore(
            credentials=Credentials(
                cfg.auth.realm,
                cfg.auth.user_passwords(),
                cfg.auth.secrets(),
                max_lifetime=cfg.auth.max_credential_lifetime_s,
            ),
            nonces=Nonces(cfg.auth.nonce_lifetime_s),
            policy=policy,
            ports=self._relays,
            limits=Limits(
                default_lifetime=cfg.relay.default_lifetime_s,
                max_lifetime=cfg.relay.max_lifetime_s,
                max_allocations=cfg.relay.max_allocations,
                max_allocations_per_user=cfg.relay.max_allocations_per_user,
                max_permissions=cfg.relay.max_permissions,
                max_channels=cfg.relay.max_channels,
                bandwidth_bytes_per_s=cfg.relay.bandwidth_bytes_per_s,
            ),
            relay_families=frozenset(relay_ips),
            unix_time=self.unix_time,
        )

    async def start(self) -> None:
        """Bind UDP then HTTP; on failure close what was opened and raise naming the address."""
        cfg, loop = self.config, asyncio.get_running_loop()
        for warning in self.warnings:
            self.log.warning(warning)
        self.core = self._make_core(loop)
        try:
            self._sock = self._listen(cfg.server.host, cfg.server.udp_port)
            self.udp_addr = self._sock.getsockname()[:2]
            if cfg.server.host_ipv6:  # the same port, unless a test's ephemeral one
                self._sock6 = self._listen(cfg.server.host_ipv6, cfg.server.udp_port)
                self.udp_addr6 = self._sock6.getsockname()[:2]
            self._check_relay_addresses()
            self._ops = OpsServer(self._ops_app(), log=self.log, limits=HttpLimits())
            try:
                await self._ops.start(cfg.ops.http_host, cfg.ops.http_port)
            except OSError as exc:
                where = f"HTTP {host_port(cfg.ops.http_host, cfg.ops.http_port)}"
                raise OSError(f"cannot listen on {where}: {exc.strerror or exc}") from None
        except BaseException:
            await self._close()
            raise
        self._upkeep = asyncio.create_task(self._expire_forever())
        self.ready = True
        self.log.info("started", extra={"status": self.status()})

    def _check_relay_addresses(self) -> None:
        """Relay sockets bind the address clients are told, one per allocation: one this host
        does not have (a cloud VM's public IP behind 1:1 NAT, a typo) started a ready relay
        that refused every Allocate (508 ``no_relay_port``) and logged nothing. Refused at
        start instead, naming the key."""
        server = self.config.server
        for ip in server.relay_ips().values():
            try:
                _udp_socket(ip, 0).close()
            except OSError as exc:
                key = "relay_host_ipv6" if ip == server.relay_host_ipv6 else (
                    "relay_host" if server.relay_host else "host")  # fmt: skip
                raise OSError(
                    f"cannot relay on {ip} ([server] {key}): {exc.strerror or exc}; relay "
                    "sockets bind the address clients are told, so it must be an address of "
                    "this host (dna-stun cannot relay from behind a 1:1 NAT)"
                ) from None

    def _listen(self, host: str, port: int) -> socket.socket:
        """A listening socket, read from now on; raises naming the address."""
        assert self.core is not None
        try:
            sock = _udp_socket(host, port)
        except OSError as exc:
            where = host_port(host, port)
            raise OSError(f"cannot listen on UDP {where}: {exc.strerror or exc}") from None
        if port == 0:  # a test's ephemeral port: refuse relaying to it too
            self.core.policy.add_own_endpoint(sock.getsockname()[:2])
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sock)
        return sock

    # --- datagrams ---------------------------------------------------------------------------

    def _readable(self, sock: socket.socket) -> None:
        assert self.core is not None
        batch = _drain(sock)
        if batch:
            self._relay(self.core.on_client_datagrams, batch)

    def _from_peers(self, sock: socket.socket, relay: Addr) -> None:
        assert self.core is not None
        batch = _drain(sock)
        if batch:
            self._relay(functools.partial(self.core.on_peer_datagrams, relay), batch)

    def _relay(
        self, handle: Callable[[list[Datagram], float], list[Send]], batch: list[Datagram]
    ) -> None:
        """One wakeup's datagrams through the core in one call, then its answers out."""
        try:
            out = handle(batch, self.clock())
        except Exception:  # a bug must cost one datagram, not the batch or the server
            self._internal_error()
            out = self._one_by_one(handle, batch)
        sock, relays = self._sock, self._relays
        assert sock is not None and relays is not None
        sock6 = self._sock6 or sock  # IPv6 clients: [server] host_ipv6's socket, if any
        sockets, dual = relays.sockets, sock.family == socket.AF_INET6
        for via, data, to in out:
            # A full buffer or an unreachable peer: UDP may drop, so do we. (Not
            # contextlib.suppress: a context manager per packet costs measurably.)
            try:
                if via is not None:
                    sockets[via].sendto(data, to)
                elif ":" in to[0]:
                    sock6.sendto(data, to)
                elif dual:  # an IPv4 client of a dual-stack ("::") socket
                    sock.sendto(data, ("::ffff:" + to[0], to[1]))
                else:
                    sock.sendto(data, to)
            except (OSError, KeyError):
                pass
        if relays.retired:
            relays.flush()

    def _one_by_one(
        self, handle: Callable[[list[Datagram], float], list[Send]], batch: list[Datagram]
    ) -> list[Send]:
        """After a batch raised: each datagram alone, so only the one that raises is lost."""
        out: list[Send] = []
        for datagram in batch:
            try:
                out += handle([datagram], self.clock())
            except Exception:
                self._internal_error()
        return out

    def _internal_error(self) -> None:
        if self.core is not None:
            self.core.stats.refusals["internal_error"] += 1
        suppressed = self._error_log.admit()
        if suppressed is None:
            return
        self.log.exception("datagram handling failed", extra={"suppressed": suppressed})

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(UPKEEP_INTERVAL_S)
            self.expire()

    def expire(self) -> None:
        """Drop what expired (the upkeep does it every ``UPKEEP_INTERVAL_S``)."""
        if self.core is not None and self._relays is not None:
            self.core.expire(self.clock())
            self._relays.flush()

    # --- ops ---------------------------------------------------------------------------------

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
            return False, "starting"
        held = len(self.core.by_client) if self.core is not None else 0
        return True, f"{held} allocations"

    def status(self) -> dict[str, Any]:
        core = self.core
        info: dict[str, Any] = {
            "version": __version__,
            "role": "stun",
            "ready": self.ready,
            "uptime_s": round(self.clock() - self.started_at, 1),
            "config": dump_config(self.config),
        }
        if self.udp_addr is not None:
            info["udp"] = host_port(*self.udp_addr)
            if self.udp_addr6 is not None:
                info["udp6"] = host_port(*self.udp_addr6)
            info["http"] = host_port(self.config.ops.http_host, self.http_port)
        if core is not None:
            info["allocations"] = len(core.by_client)
            info["refusals"] = dict(core.stats.refusals)
        if self.warnings:  # as the overlay nodes: what start logged once stays visible
            info["warnings"] = self.warnings
        return info

    # --- stopping ----------------------------------------------------------------------------

    async def _close(self) -> None:
        loop = asyncio.get_running_loop()
        if self.core is not None:
            self.core.close_all()  # closes every relay socket through RelaySockets.close
        if self._relays is not None:
            self._relays.close_all()
        for sock in (self._sock, self._sock6):
            if sock is not None:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(sock.fileno())
                sock.close()
        if self._ops is not None:
            await self._ops.stop()

    async def stop(self) -> None:
        """Fail readiness, stop upkeep, then drop allocations and close every socket."""
        self._stopping = True
        await stop_tasks([self._upkeep], failures_to=self.log)
        held = len(self.core.by_client) if self.core is not None else 0
        await self._close()
        self.log.info("stopped", extra={"allocations_dropped": held})
