"""Node IDs, XOR distance and contacts: the vocabulary of the overlay.

IDs are 256-bit (SHA-256 of the node key). Internally a contact also keeps its
ID as an int, because every routing decision is an XOR of two IDs and Python
ints make that one operation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

ID_BITS = 256
ID_BYTES = ID_BITS // 8


def id_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def distance(a: bytes, b: bytes) -> int:
    """The Kademlia XOR metric."""
    return id_int(a) ^ id_int(b)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a node: UDP for routing, TCP (gRPC) for records and data."""

    ip: str
    udp_port: int
    grpc_port: int = 0  # 0 = same as udp_port

    @property
    def udp(self) -> tuple[str, int]:
        return (self.ip, self.udp_port)

    @property
    def grpc_target(self) -> str:
        port = self.grpc_port or self.udp_port
        return f"[{self.ip}]:{port}" if ":" in self.ip else f"{self.ip}:{port}"

    def subnet(self) -> str:
        """The /24 (IPv4) or /48 (IPv6) this address belongs to (Sybil limits count per subnet)."""
        if ":" not in self.ip:
            return self.ip.rsplit(".", 1)[0]
        return str(ipaddress.ip_network(f"{self.ip}/48", strict=False))

    def is_loopback(self) -> bool:
        return self.ip.startswith("127.") or self.ip == "::1"


@dataclass(frozen=True, slots=True)
class Contact:
    """A node as the overlay knows it. Only the codec (which checks the key proof)
    and the simulator (which mints IDs itself) create contacts."""

    node_id: bytes
    public_key: bytes
    endpoints: tuple[Endpoint, ...]
    role: int = 0
    key: int = field(init=False, repr=False, compare=False)
    subnet: str = field(init=False, repr=False, compare=False)  # of the first endpoint
    loopback: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", id_int(self.node_id))
        object.__setattr__(self, "subnet", self.endpoints[0].subnet())
        object.__setattr__(self, "loopback", self.endpoints[0].is_loopback())

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[0]

    def short(self) -> str:
        return self.node_id.hex()[:12]


def closest_first(target: bytes, *answers: Iterable[Contact]) -> list[Contact]:
    """Several lookups' answers as one: each node once, closest to ``target`` first."""
    merged = {c.node_id: c for answer in answers for c in answer}
    key = id_int(target)
    return sorted(merged.values(), key=lambda c: c.key ^ key)
