"""The testnet's shape, in one place: which nodes, their roles and storage backends, the
peers and their NATs, the ports, and the settings a testnet changes from a public
deployment; and `node_toml`, the one renderer of a node's configuration file.

Two drivers of the node harness (`dna_testnet.harness`) run it: `dna-testnet` (processes on
127.0.0.x, `network.Testnet` on the local driver) and the docker-compose testnet
(`compose.render`, written to docker-compose.yml and deploy/compose/ by
scripts/gen_compose.py; the compose driver acts on its containers). Both take their node
names, roles, ports and settings from here; only the addresses and paths differ, and the
local driver keeps every mailbox in SQLite (a Redis server is not assumed on a developer's
machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "GRPC_PORT",
    "HTTP_PORT",
    "PUZZLE_BITS",
    "STUN_PORT",
    "TESTNET",
    "TESTNET_ADMISSION",
    "TESTNET_CONNECTIONS",
    "TESTNET_RECORDS",
    "UDP_PORT",
    "NodePaths",
    "NodeSpec",
    "PeerSpec",
    "Role",
    "Topology",
    "make_topology",
    "node_toml",
    "stun_toml",
]

UDP_PORT, GRPC_PORT, HTTP_PORT = 7400, 7401, 7480
STUN_PORT = 3478
# The testnet's STUN/TURN credentials: one static user, and the shared secret that mints
# time-limited ones (docs/nat.md). Public for a testnet; a real deployment keeps its own.
TESTNET_TURN_USER, TESTNET_TURN_PASSWORD = "testnet", "testnet"
TESTNET_USER_ALLOCATIONS = 1000  # the relay's default in all (every peer is that user)
TESTNET_TURN_SECRET = "dna-testnet-turn-secret"
PUZZLE_BITS = 4  # the static ID puzzle: cheap on a testnet (a public network uses 8)
# Every client of a local testnet comes from 127.0.0.1 (and every client of the compose
# testnet from one of two NAT routers), so the per-address rate limit (20 puts/s for one
# person's address on a public network) would be shared by everyone; a testnet allows what
# 50 people would. The per-mailbox limits, PoW and quotas stay as on a public network.
TESTNET_ADMISSION = "[admission]\nip_rate_per_s = 1000.0\nip_burst = 2000.0\n"
# Likewise for record stores (a public node allows 30 at once, then 1/s, per address).
TESTNET_RECORDS = "source_rate_per_s = 200.0\nsource_burst = 1000.0\n"
# And for gRPC connections (a public node takes 64 from one address): every client and
# every node of a local testnet connects from 127.0.0.1, so only the total cap applies.
TESTNET_CONNECTIONS = "grpc_max_connections_per_source = 4096\n"

Role = Literal["bootstrap", "storage", "stun"]
Backend = Literal["sqlite", "redis"]
Nat = Literal["port-preserving", "symmetric"]
COMMANDS: dict[Role, str] = {
    "bootstrap": "dna-bootstrap",
    "storage": "dna-storage-node",
    "stun": "dna-stun",
}


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: Role
    backend: Backend = "sqlite"  # storage nodes only

    @property
    def command(self) -> str:
        return COMMANDS[self.role]


@dataclass(frozen=True)
class PeerSpec:
    """A person with the `dna` CLI behind a NAT, talking to ``contact``."""

    name: str
    contact: str
    nat: Nat


@dataclass(frozen=True)
class Topology:
    nodes: tuple[NodeSpec, ...]
    peers: tuple[PeerSpec, ...] = ()
    # STUN/TURN nodes: not overlay members (no seeds, no records). `dna-testnet` runs them
    # on loopback addresses, the compose testnet as `dna-stun` containers.
    relays: tuple[NodeSpec, ...] = ()

    @property
    def bootstraps(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.role == "bootstrap")

    @property
    def storage(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.role == "storage")


def make_topology(
    bootstraps: int,
    storage: int,
    *,
    redis: int = 0,
    stun: int = 0,
    peers: tuple[PeerSpec, ...] = (),
) -> Topology:
    """bootstrap1..N, storage1..M; the last ``redis`` storage nodes on the Redis backend;
    stun1..S STUN/TURN relays."""
    if not 0 <= redis <= storage:
        raise ValueError(f"redis must be 0..{storage} (the storage nodes), got {redis}")
    return Topology(
        tuple(NodeSpec(f"bootstrap{i}", "bootstrap") for i in range(1, bootstraps + 1))
        + tuple(
            NodeSpec(f"storage{i}", "storage", "redis" if i > storage - redis else "sqlite")
            for i in range(1, storage + 1)
        ),
        peers,
        tuple(NodeSpec(f"stun{i}", "stun") for i in range(1, stun + 1)),
    )


# The testnet of `dna-testnet up` and of docker-compose.yml.
TESTNET = make_topology(
    3,
    6,
    redis=2,
    stun=1,
    peers=(PeerSpec("alice", "bob", "port-preserving"), PeerSpec("bob", "alice", "symmetric")),
)


@dataclass(frozen=True)
class NodePaths:
    """Where one node keeps its files (on the host, or inside its container)."""

    key_file: str
    records: str
    data_dir: str  # a storage node's mailboxes (SQLite backend)


def node_toml(
    spec: NodeSpec,
    *,
    host: str,
    seeds: Sequence[str],
    paths: NodePaths,
    http_host: str,
    allow_loopback: bool,
    redis_url: str | None = None,
    puzzle_bits: int = PUZZLE_BITS,
    records_toml: str = TESTNET_RECORDS,
    connections_toml: str = TESTNET_CONNECTIONS,
    storage_toml: str = "",
    extra_toml: str = "",
    overlay_toml: str = "",
) -> str:
    """The node's TOML file: its address and paths, the bootstrap nodes, the testnet's
    settings; ``redis_url`` (storage on Redis), ``overlay_toml``, ``records_toml`` and
    ``storage_toml`` (more keys of [overlay], [records], [storage]) and ``extra_toml`` (more
    sections) as given."""
    listed = ", ".join(f'"{seed}"' for seed in seeds)
    text = (
        f'log_level = "info"\n[node]\nhost = "{host}"\nudp_port = {UDP_PORT}\n'
        f'grpc_port = {GRPC_PORT}\nkey_file = "{paths.key_file}"\npuzzle_bits = {puzzle_bits}\n'
        f"[overlay]\nbootstrap = [{listed}]\nallow_loopback = {str(allow_loopback).lower()}\n"
        f"{overlay_toml}"
        f'[ops]\nhttp_host = "{http_host}"\nhttp_port = {HTTP_PORT}\n'
        f'[records]\npath = "{paths.records}"\n{records_toml}'
        f"[connections]\n{connections_toml}"
    )
    if spec.role == "storage":
        text += f'[storage]\ndata_dir = "{paths.data_dir}"\n'
        if redis_url is not None:
            text += f'backend = "redis"\nredis_url = "{redis_url}"\n'
        text += storage_toml
    return text + extra_toml


def stun_toml(
    host: str,
    *,
    http_host: str,
    allowed_peers: Sequence[str] = (),
    server_toml: str = "",
    relay_toml: str = "",
) -> str:
    """A STUN/TURN node's TOML file: the testnet's credentials, relaying to ``allowed_peers``
    (CIDRs denied on a public node, such as the loopback or private network the testnet's
    peers live on); ``server_toml`` and ``relay_toml``: more keys of [server] and [relay]."""
    allowed = ", ".join(f'"{cidr}"' for cidr in allowed_peers)
    return (
        f'log_level = "info"\n[server]\nhost = "{host}"\nudp_port = {STUN_PORT}\n{server_toml}'
        f'[auth]\nrealm = "dna-testnet"\nusers = ["{TESTNET_TURN_USER}:{TESTNET_TURN_PASSWORD}"]\n'
        f'auth_secret = "{TESTNET_TURN_SECRET}"\n[relay]\nallowed_peers = [{allowed}]\n'
        # Every peer of a testnet signs in as the one user above: its quota (10 by
        # default, for one person's devices) would let the 11th peer online relay nothing.
        f"max_allocations_per_user = {TESTNET_USER_ALLOCATIONS}\n{relay_toml}"
        f'[ops]\nhttp_host = "{http_host}"\nhttp_port = {HTTP_PORT}\n'
    )
