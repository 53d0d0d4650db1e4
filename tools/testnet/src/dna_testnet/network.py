"""Real node processes on distinct loopback addresses (127.0.0.x), each with its own
TOML file, key file, data directory and log under one state directory.

Used by `dna-testnet` (up, status, down, demo) and by the integration tests,
which SIGKILL, SIGTERM and restart nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from dna_peer.network import join_overlay as client_node

from dna_testnet.topology import (
    COMMANDS,
    GRPC_PORT,
    HTTP_PORT,
    STUN_PORT,
    TESTNET_ADMISSION,
    TESTNET_CONNECTIONS,
    TESTNET_RECORDS,
    UDP_PORT,
    NodePaths,
    NodeSpec,
    Role,
    make_topology,
    node_toml,
    stun_toml,
)

__all__ = [
    "GRPC_PORT",
    "HTTP_PORT",
    "UDP_PORT",
    "LocalNode",
    "Testnet",
    "TestnetRunningError",
    "client_node",
    "wait_ready",
]

BIN = Path(sys.executable).parent


class TestnetRunningError(RuntimeError):
    """`up` while a testnet already runs on these addresses."""

    __test__ = False


@dataclass
class LocalNode:
    name: str
    ip: str
    root: Path
    bootstraps: list[str]
    command: str = "dna-bootstrap"  # or dna-storage-node
    puzzle_bits: int = 4
    extra_toml: str = ""  # more sections, e.g. [admission]
    records_toml: str = TESTNET_RECORDS  # more keys of the [records] section
    connections_toml: str = TESTNET_CONNECTIONS  # keys of the [connections] section
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
        if self.role == "stun":  # the testnet's peers live on loopback addresses
            text = stun_toml(self.ip, http_host=self.ip, allowed_peers=["127.0.0.0/8"])
            self.config_path.write_text(text)
            return
        spec = NodeSpec(self.name, self.role)
        paths = NodePaths(
            key_file=str(self.root / f"{self.name}.key"),
            records=str(self.root / f"{self.name}-records.sqlite3"),
            data_dir=str(self.root / f"{self.name}-data"),
        )
        self.config_path.write_text(
            node_toml(spec, host=self.ip, seeds=self.bootstraps, paths=paths, http_host=self.ip,
                      allow_loopback=True, puzzle_bits=self.puzzle_bits,
                      records_toml=self.records_toml, connections_toml=self.connections_toml,
                      extra_toml=self.extra_toml)
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
        return httpx.get(f"http://{self.ip}:{HTTP_PORT}{path}", timeout=2.0)

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

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_ready(nodes: list[LocalNode], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending and time.monotonic() < deadline:
        for node in list(pending):
            if node.proc is not None and not node.alive():
                raise RuntimeError(f"{node.name} exited:\n{node.tail()}")
            if node.is_ready():
                pending.remove(node)
        time.sleep(0.2)
    if pending:
        raise RuntimeError(f"not ready: {[n.name for n in pending]}\n{pending[0].tail()}")


class Testnet:
    """The testnet topology's nodes (``bootstraps`` bootstrap then ``storage`` storage nodes,
    `topology.TESTNET` by default) as processes on 127.0.0.``first`` onwards. Every storage
    node keeps its mailboxes in SQLite here: the compose testnet runs the topology's Redis
    nodes on a Redis server."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self, root: Path, *, bootstraps: int = 3, storage: int = 6, stun: int = 0, first: int = 2
    ):
        self.root = root
        topology = make_topology(bootstraps, storage, stun=stun)
        ips = [f"127.0.0.{first + i}" for i in range(len(topology.nodes) + len(topology.relays))]
        seeds = [f"{ip}:{UDP_PORT}" for ip in ips[:bootstraps]]
        self.nodes = [
            LocalNode(
                spec.name,
                ip,
                root,
                seeds,
                command=spec.command,
                extra_toml=TESTNET_ADMISSION if spec.role == "storage" else "",
            )
            for spec, ip in zip(topology.nodes, ips, strict=False)
        ]
        # STUN/TURN relays, on the addresses after the overlay nodes.
        self.relays = [
            LocalNode(spec.name, ip, root, [], command=spec.command)
            for spec, ip in zip(topology.relays, ips[len(self.nodes) :], strict=True)
        ]

    @property
    def members(self) -> list[LocalNode]:
        """Every process of the testnet: the overlay nodes, then the relays."""
        return self.nodes + self.relays

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [n.udp for n in self.nodes if n.role == "bootstrap"]

    def up(self, timeout: float = 90.0) -> None:
        """Start every node; refused while any node of this state directory runs, or while
        something else answers on one of its addresses (a testnet in another directory)."""
        running = self.running()
        if running:
            names = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
            raise TestnetRunningError(
                f"a testnet is already running in {self.root}: {names}; `dna-testnet down` stops it"
            )
        taken = [n.name for n in self.members if n.answers()]
        if taken:
            raise TestnetRunningError(
                f"another node already answers on the addresses of {', '.join(taken)}"
                f" ({self.nodes[0].ip}...): a testnet from another directory?"
                " Stop it with `dna-testnet down --dir ...`"
            )
        for node in self.members:
            node.start()
        wait_ready(self.members, timeout)
        self._save()

    def running(self) -> dict[str, int]:
        """Node name -> PID of every live process running one of this testnet's config files,
        found by command line (so nodes restarted by hand or by tests count, not only the PIDs
        an earlier `up` recorded)."""
        if not Path("/proc").is_dir():  # not Linux: only the PIDs `up` recorded
            return {name: pid for name, pid in self._saved_pids().items() if _exists(pid)}
        owned = {node.config_path.resolve(): node.name for node in self.members}
        found: dict[str, int] = {}
        for pid, config in _node_processes():
            name = owned.get(config)
            if name is not None:
                found.setdefault(name, pid)
        for node in self.members:  # started by this process: certain, even before /proc shows it
            if node.alive() and node.proc is not None:
                found[node.name] = node.proc.pid
        return found

    def down(self, timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM every node this state directory owns (then SIGKILL what outlives
        ``timeout``); returns name -> PID of what was stopped."""
        stopped = self.running()
        for node in self.members:
            if node.alive():
                node.terminate(timeout)
        ours = {n.proc.pid for n in self.members if n.proc is not None}
        for pid in set(stopped.values()) - ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.running().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        (self.root / "state.json").unlink(missing_ok=True)
        return {name: stopped[name] for name in (n.name for n in self.members) if name in stopped}

    def kill_all(self) -> None:
        for node in self.members:
            if node.alive():
                node.kill()

    def _save(self) -> None:
        pids = {n.name: n.proc.pid for n in self.members if n.proc is not None}
        (self.root / "state.json").write_text(json.dumps({"pids": pids}))

    def _saved_pids(self) -> dict[str, int]:
        state = self.root / "state.json"
        if not state.exists():
            return {}
        pids: dict[str, int] = json.loads(state.read_text())["pids"]
        return pids


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _node_processes() -> list[tuple[int, Path]]:
    """(PID, resolved --config path) of every live `... run --config FILE` process (Linux
    /proc; a relative path is taken from the process's working directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--config" not in argv or b"run" not in argv:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its parent to reap it
            config = Path(os.fsdecode(argv[argv.index(b"--config") + 1]))
            if not config.is_absolute():
                config = Path(os.readlink(entry / "cwd")) / config
            found.append((int(entry.name), config.resolve()))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found
