"""`dna-testnet`'s network: the testnet topology on the harness's local driver (node
processes on 127.0.0.2 onwards, under one state directory), and finding its processes
again from another invocation (`status`, `down`).

`LocalNode` and `wait_ready` live in `dna_testnet.harness.local`; they are re-exported
here for the callers that import them from this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from dna_peer.network import join_overlay as client_node

from dna_testnet.harness.addresses import LoopbackAllocator
from dna_testnet.harness.driver import NotReadyError
from dna_testnet.harness.local import LocalNode, local_cluster, wait_ready
from dna_testnet.topology import GRPC_PORT, HTTP_PORT, TESTNET_ADMISSION, UDP_PORT, make_topology

__all__ = [
    "GRPC_PORT",
    "HTTP_PORT",
    "UDP_PORT",
    "LocalNode",
    "NoTestnetError",
    "Testnet",
    "TestnetRunningError",
    "client_node",
    "wait_ready",
]


class TestnetRunningError(RuntimeError):
    """`up` while another testnet's nodes answer on these addresses."""


class NoTestnetError(RuntimeError):
    """`status` of a directory no testnet ever started in."""

    __test__ = False


class Testnet:
    """The testnet topology's nodes (``bootstraps`` bootstrap then ``storage`` storage nodes,
    `topology.TESTNET` by default) as processes on 127.0.0.``first`` onwards, or on
    ``addresses`` (tests take them from the harness's allocator). Every storage
    node keeps its mailboxes in SQLite here: the compose testnet runs the topology's Redis
    nodes on a Redis server."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        root: Path,
        *,
        bootstraps: int = 3,
        storage: int = 6,
        stun: int = 0,
        first: int = 2,
        addresses: Sequence[str] | None = None,
    ):
        self.root = root
        topology = make_topology(bootstraps, storage, stun=stun)
        count = len(topology.nodes) + len(topology.relays)
        if addresses is None:  # fixed, so `status` and `down` from another shell find them
            addresses = LoopbackAllocator(f"127.0.0.{first}", probe=False).take(count)
        if len(addresses) != count:
            raise ValueError(
                f"{count} nodes and relays need as many addresses, got {len(addresses)}"
            )
        overlay, relays = addresses[: len(topology.nodes)], addresses[len(topology.nodes) :]
        self.cluster = local_cluster(
            root, topology, addresses=overlay, storage_toml=TESTNET_ADMISSION
        )
        self.nodes = self.cluster.driver.nodes
        # STUN/TURN relays, on the addresses after the overlay nodes: not overlay members.
        self.relays = [
            LocalNode(spec.name, ip, root, [], command=spec.command)
            for spec, ip in zip(topology.relays, relays, strict=True)
        ]

    @property
    def members(self) -> list[LocalNode]:
        """Every process of the testnet: the overlay nodes, then the relays."""
        return self.nodes + self.relays

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [n.udp for n in self.nodes if n.role == "bootstrap"]

    def up(self, timeout: float = 90.0) -> list[str]:
        """Start every node of this state directory that is not running, with the keys and
        data it had (all of them the first time; after a crash or a kill, the ones missing)
        and return their names. Refused while something else answers on one of their
        addresses (a testnet in another directory)."""
        running = self.running()
        missing = [node for node in self.members if node.name not in running]
        taken = [n.name for n in missing if n.answers()]
        if taken:
            raise TestnetRunningError(
                f"another node already answers on the addresses of {', '.join(taken)}"
                f" ({self.nodes[0].ip}...): a testnet from another directory?"
                " Stop it with `dna-testnet down --dir ...`"
            )
        try:
            for node in missing:
                node.start()
            wait_ready(missing, timeout)
        except Exception as exc:
            self._stop_started(missing)
            raise NotReadyError(
                f"{exc}\n(stopped the nodes this `up` had started: fix the cause above, then"
                " run `dna-testnet up` again)"
            ) from exc
        except BaseException:  # ^C: the same, without a word
            self._stop_started(missing)
            raise
        self._save(running)
        return [node.name for node in missing]

    def _stop_started(self, nodes: list[LocalNode]) -> None:
        """Stop those of ``nodes`` this process started: an `up` that fails (a port taken by
        something else, a node that cannot start) leaves no half network behind, and the
        next `up` starts from what ran before it."""
        for node in nodes:
            node.stop(5.0)

    def started_here(self) -> bool:
        """A testnet started in this state directory once: a node's config file (written
        as it starts, kept by `down`, like its keys and data)."""
        return any(node.config_path.exists() for node in self.members)

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

    def _save(self, running: dict[str, int]) -> None:
        pids = running | {n.name: n.proc.pid for n in self.members if n.proc is not None}
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
