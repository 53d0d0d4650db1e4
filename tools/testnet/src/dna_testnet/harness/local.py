"""The local driver: nodes as OS processes on loopback addresses, each with its own TOML
file, key file, data directory and log under one directory (`LocalNode`), and
`local_cluster`, a topology's nodes on addresses from the allocator.

Used by `dna-testnet` (up, status, down, demo), the integration tests and the benches.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from dna_core.hostport import host_port

from dna_testnet.harness.addresses import LOOPBACK, LoopbackAllocator
from dna_testnet.harness.driver import Cluster, NodeAddress, NotReadyError
from dna_testnet.topology import (
    COMMANDS,
    HTTP_PORT,
    STUN_PORT,
    TESTNET_CONNECTIONS,
    TESTNET_RECORDS,
    UDP_PORT,
    NodePaths,
    NodeSpec,
    Role,
    Topology,
    node_toml,
    stun_toml,
)

__all__ = ["LocalDriver", "LocalNode", "local_cluster", "wait_ready"]

BIN = Path(sys.executable).parent


@dataclass
class LocalNode:
    name: str
    ip: str
    root: Path
    bootstraps: list[str]
    command: str = "dna-bootstrap"  # or dna-storage-node, dna-stun
    puzzle_bits: int = 4
    extra_toml: str = ""  # more sections, e.g. [admission]
    records_toml: str = TESTNET_RECORDS  # more keys of the [records] section
    connections_toml: str = TESTNET_CONNECTIONS  # keys of the [connections] section
    overlay_toml: str = ""  # more keys of the [overlay] section
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def role(self) -> Role:
        return next(role for role, command in COMMANDS.items() if command == self.command)

    @property
    def udp(self) -> tuple[str, int]:
        return (self.ip, STUN_PORT if self.role == "stun" else UDP_PORT)

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.name}.toml"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def write_config(self) -> None:
        if self.role == "stun":
            # The testnet's peers live on loopback, where aioice gathers no host candidate:
            # their one pair is relay to relay, so the allow-list is the relay's own address
            # (allocation to allocation, its relay ports only), not the rest of 127.0.0.0/8
            # where the nodes' and the machine's loopback services listen.
            text = stun_toml(self.ip, http_host=self.ip, allowed_peers=[f"{self.ip}/32"])
            self.config_path.write_text(text)
            return
        spec = NodeSpec(self.name, self.role)
        paths = self.disk
        self.config_path.write_text(
            node_toml(spec, host=self.ip, seeds=self.bootstraps, paths=paths, http_host=self.ip,
                      allow_loopback=True, puzzle_bits=self.puzzle_bits,
                      records_toml=self.records_toml, connections_toml=self.connections_toml,
                      extra_toml=self.extra_toml, overlay_toml=self.overlay_toml)
        )  # fmt: skip

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN / self.command), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("DNA_")},
                start_new_session=True,  # the testnet outlives `dna-testnet up`
            )

    def http(self, path: str) -> httpx.Response:
        return httpx.get(f"http://{host_port(self.ip, HTTP_PORT)}{path}", timeout=2.0)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.http("/status").json()
        return data

    def is_ready(self) -> bool:
        try:
            return self.http("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def answers(self) -> bool:
        """Something (this node or another process) serves this node's HTTP address."""
        try:
            self.http("/readyz")
        except httpx.HTTPError:
            return False
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a paused node is thawed first, or it could not act on it), SIGKILL
        after ``timeout``."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGCONT)
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None, f"{self.name} is not running"
        self.proc.send_signal(signal.SIGCONT)

    @property
    def disk(self) -> NodePaths:
        return NodePaths(
            key_file=str(self.root / f"{self.name}.key"),
            records=str(self.root / f"{self.name}-records.sqlite3"),
            data_dir=str(self.root / f"{self.name}-data"),
        )

    def wipe(self) -> None:
        """Delete the node's key, records and mailboxes (SQLite's side files too)."""
        if self.alive():
            raise RuntimeError(f"{self.name} is running: stop or kill it before wiping its disk")
        disk = self.disk
        for path in (disk.key_file, disk.records, disk.records + "-wal", disk.records + "-shm"):
            Path(path).unlink(missing_ok=True)
        shutil.rmtree(disk.data_dir, ignore_errors=True)

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(nodes: list[LocalNode], timeout: float = 60.0) -> None:
    """Every node of a list ready (`Cluster.wait_ready` for nodes outside a cluster); one
    this process started that exits meanwhile fails the wait at once, with its log."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for node in list(pending):
            if node.proc is not None and not node.alive():
                raise NotReadyError(f"{node.name} exited:\n{node.tail()}")
            if node.is_ready():
                pending.remove(node)
        time.sleep(0.2)
    if pending:
        raise NotReadyError(f"not ready: {[n.name for n in pending]}\n{pending[0].tail()}")


class LocalDriver:
    """The `Driver` over `LocalNode` processes (``nodes`` by name)."""

    def __init__(self, nodes: Sequence[LocalNode]) -> None:
        self.nodes = list(nodes)
        self._by_name = {node.name: node for node in nodes}

    def node(self, name: str) -> LocalNode:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no node {name!r}: {', '.join(self._by_name)}") from None

    def start(self, name: str) -> None:
        node = self.node(name)
        if node.alive():
            raise RuntimeError(f"{name} is already running (pid {node.proc and node.proc.pid})")
        node.start()

    def stop(self, name: str, timeout: float = 15.0) -> None:
        self.node(name).stop(timeout)

    def kill(self, name: str) -> None:
        self.node(name).kill()

    def restart(self, name: str) -> None:
        self.stop(name)
        self.start(name)

    def pause(self, name: str) -> None:
        self.node(name).pause()

    def resume(self, name: str) -> None:
        self.node(name).resume()

    def wipe(self, name: str) -> None:
        self.node(name).wipe()

    def address(self, name: str) -> NodeAddress:
        return NodeAddress(self.node(name).ip)

    def is_running(self, name: str) -> bool:
        return self.node(name).alive()

    def is_ready(self, name: str) -> bool:
        return self.node(name).is_ready()

    def logs(self, name: str) -> str:
        path = self.node(name).log_path
        return path.read_text(errors="replace") if path.exists() else ""


def local_cluster(
    root: Path,
    topology: Topology,
    *,
    addresses: Sequence[str] | None = None,
    allocator: LoopbackAllocator = LOOPBACK,
    seeds: Sequence[str] | None = None,
    storage_toml: str = "",
    bootstrap_toml: str = "",
) -> Cluster[LocalDriver]:
    """``topology``'s nodes as processes under ``root``, on ``addresses`` (one per node, in
    order) or on fresh ones from ``allocator``. ``seeds`` names the well-known nodes every
    node starts from (the bootstrap-role nodes by default); ``storage_toml`` and
    ``bootstrap_toml`` are appended to each node's file by role (more keys of [storage],
    more sections)."""
    ips = list(addresses) if addresses is not None else allocator.take(len(topology.nodes))
    if len(ips) != len(topology.nodes):
        raise ValueError(f"{len(topology.nodes)} nodes need as many addresses, got {len(ips)}")
    by_name = dict(zip((spec.name for spec in topology.nodes), ips, strict=True))
    seed_names = list(seeds) if seeds is not None else [n.name for n in topology.bootstraps]
    unknown = [name for name in seed_names if name not in by_name]
    if unknown:
        raise ValueError(f"seeds {unknown} are not nodes of the topology")
    listed = [host_port(by_name[name], UDP_PORT) for name in seed_names]
    nodes = [
        LocalNode(
            spec.name,
            by_name[spec.name],
            root,
            listed,
            command=spec.command,
            extra_toml=storage_toml if spec.role == "storage" else bootstrap_toml,
        )
        for spec in topology.nodes
    ]
    return Cluster(topology, LocalDriver(nodes))
