"""Node IDs, XOR distance and contacts: the vocabulary of the overlay.

IDs are 256-bit (SHA-256 of the node key). Internally a contact also keeps its
ID as an int, because every routing decision is an XOR of two IDs and Python
ints make that one operation.

A contact's first endpoint also has a *scope* (``Scope``): where it can be reached
from. Contacts a node hears of in find-node answers are followed only if the answerer
could have reached them itself from where we reached it (``Scope.reachable_via``): a
public node that lists loopback or private addresses would otherwise make its askers
send to their own host's or network's services, and martian addresses (unspecified,
multicast, broadcast, reserved, IPv6 link-local without its zone, IPv4-mapped) reach
nobody (OpenDHT's ``isMartian``).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dna_core.hostport import host_port

ID_BITS = 256
ID_BYTES = ID_BITS // 8


class Scope(enum.IntEnum):
    """Where an address can be reached from, narrowest last; MARTIAN: from nowhere."""

    MARTIAN = -1
    LOOPBACK = 0  # this host
    LOCAL = 1  # a private network: RFC 1918, shared (RFC 6598), link-local IPv4, IPv6 ULA
    GLOBAL = 2

    def reachable_via(self, answerer: Scope) -> bool:
        """Whether an address of this scope, listed by a node we reached at an address of
        scope ``answerer``, is one we can reach too: a loopback answerer is on our host
        (any scope), a private one in our network (private or global), a global one
        anywhere (global only)."""
        return self is not Scope.MARTIAN and self >= answerer


_MARTIAN_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4",  # this network; multicast; reserved, broadcast
        "::/128", "ff00::/8", "fe80::/10", "::ffff:0:0/96",  # multicast; link-local; v4-mapped
    )
)  # fmt: skip
_LOCAL_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
        "fc00::/7",
    )
)  # fmt: skip


def address_scope(ip: str) -> Scope:
    """The scope of an IP address (``Scope``); MARTIAN for what is not an address."""
    if ":" not in ip:
        return _ipv4_scope(ip)
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return Scope.MARTIAN
    if any(address in net for net in _MARTIAN_NETS):  # (first: ::ffff:127.0.0.1 too)
        return Scope.MARTIAN
    if address.is_loopback:
        return Scope.LOOPBACK
    if any(address in net for net in _LOCAL_NETS):
        return Scope.LOCAL
    return Scope.GLOBAL


def subnet_cap_exempt(scope: Scope, allow_loopback: bool) -> bool:
    """Whether an address of ``scope`` is outside every per-subnet cap (routing table,
    remembered proofs, tokens, suspects, key challenges, replica spread). Private addresses
    are, as BEP 42 exempts local networks: the operator's own network hands them out (a
    Kubernetes pod range gives a machine's pods one /24, so the caps would starve its
    tables), and only a host inside that network can prove a key at one (a lookup does not
    follow them from a public node: ``Scope.reachable_via``), so no outside attacker can
    use them. Loopback only on a local testnet."""
    return scope is Scope.LOCAL or (allow_loopback and scope is Scope.LOOPBACK)


def _ipv4_scope(ip: str) -> Scope:
    """``address_scope`` of a dotted IPv4 address by its first two octets (~10x faster than
    ``ipaddress``: the simulator mints a contact per node)."""
    parts = ip.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and int(p) < 256 for p in parts):
        return Scope.MARTIAN
    a, b = int(parts[0]), int(parts[1])
    if a == 127:
        return Scope.LOOPBACK
    if a == 0 or a >= 224:
        return Scope.MARTIAN
    private = (
        a == 10
        or (a == 172 and 16 <= b < 32)
        or (a == 192 and b == 168)
        or (a == 100 and 64 <= b < 128)
        or (a == 169 and b == 254)
    )
    return Scope.LOCAL if private else Scope.GLOBAL


def host_of(ip: str) -> str:
    """An IPv4 address, or an IPv6 address's /64: one host's addresses (an IPv6 host picks
    its interface identifiers freely, RFC 8981), as per-host limits count them."""
    if ":" not in ip:
        return ip
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


def subnet_of(ip: str) -> str:
    """The /24 (IPv4) or /48 (IPv6) ``ip`` belongs to (Sybil limits count per subnet): one
    site's addresses (RIPE-690 gives a customer site a /48; BEP 42 and libp2p group IPv6 by
    /48 too)."""
    if ":" not in ip:
        return ip.rsplit(".", 1)[0]
    return str(ipaddress.ip_network(f"{ip}/48", strict=False))


def block_of(ip: str) -> str:
    """The coarser group Sybil limits also count: an IPv6 address's /32 (one ISP's or
    LIR's allocation, 65,536 /48s, so one holder of it passes every /48 cap); an IPv4
    address's /24, as `subnet_of` (a /16 costs far more than a /32 of IPv6, and honest
    nodes share cloud /16s)."""
    if ":" not in ip:
        return ip.rsplit(".", 1)[0]
    return str(ipaddress.ip_network(f"{ip}/32", strict=False))


# A block (`block_of`) may hold this many times one subnet's share of any per-subnet cap:
# two sites' worth. One holder of an IPv6 /32 gets no more than two /48s would; honest nodes
# of one provider's /32 still get twice a site's room. (IPv4: the block is the /24 itself.)
BLOCK_FACTOR = 2


@functools.lru_cache(maxsize=4096)  # memories file entries by subnet name
def block_of_subnet(subnet: str) -> str:
    """The block (`block_of`) of a subnet as `subnet_of` names it."""
    return block_of(subnet.split("/", 1)[0]) if "/" in subnet else subnet


@functools.lru_cache(maxsize=65_536)  # asked once per record stored or loaded
def source_groups(source: str, allow_loopback: bool = False) -> tuple[str, str]:
    """The (block, subnet) a record store counts a source's records under (`block_of`,
    `subnet_of`), as the routing table counts contacts. ``source`` is an address or the
    rate limiter's key (`ratelimit.source_key`: an IPv6 address's /64 as ``net/64``). A
    source exempt from subnet caps (`subnet_cap_exempt`: a private address, loopback on a
    local testnet), or one that is not an address at all, is its own group."""
    host = source.split("/", 1)[0]
    scope = address_scope(host)
    if scope is Scope.MARTIAN or subnet_cap_exempt(scope, allow_loopback):
        return (source, source)
    return (block_of(host), subnet_of(host))


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1"


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
        return host_port(self.ip, port)

    def subnet(self) -> str:
        return subnet_of(self.ip)

    def is_loopback(self) -> bool:
        return is_loopback(self.ip)

    def scope(self) -> Scope:
        return address_scope(self.ip)


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
    block: str = field(init=False, repr=False, compare=False)  # of the first endpoint
    loopback: bool = field(init=False, repr=False, compare=False)
    scope: Scope = field(init=False, repr=False, compare=False)  # of the first endpoint

    def __post_init__(self) -> None:
        first = self.endpoints[0]
        object.__setattr__(self, "key", id_int(self.node_id))
        object.__setattr__(self, "subnet", first.subnet())
        object.__setattr__(self, "block", block_of(first.ip))
        object.__setattr__(self, "loopback", first.is_loopback())
        object.__setattr__(self, "scope", first.scope())

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


def spread_over_subnets(
    contacts: Sequence[Contact], count: int, *, per_subnet: int = 2, loopback_exempt: bool = False
) -> list[Contact]:
    """``count`` of ``contacts`` (closest first), at most ``per_subnet`` of one /24 (/48)
    while others are left, then the closest of the rest; in their order. The replicas of a
    record (and of a mailbox): IDs cost 8 puzzle bits, so one subnet's IDs ground near a
    key used to take all 8 places. Loopback is exempt on a local testnet, as in the table."""
    chosen = {c.node_id for c in _within_cap(contacts, per_subnet, loopback_exempt)[:count]}
    skipped = [c for c in contacts if c.node_id not in chosen]
    chosen.update(c.node_id for c in skipped[: count - len(chosen)])
    return [c for c in contacts if c.node_id in chosen]


def spread_depth(
    contacts: Sequence[Contact], count: int, *, per_subnet: int = 2, loopback_exempt: bool = False
) -> int | None:
    """How many of ``contacts`` (closest first) `spread_over_subnets` decides from: up to
    its last choice when ``count`` were found within the cap; None when they were not (it
    filled from the rest, and one more contact of another subnet, farther than all of
    these, would have changed the choice). What a reused lookup must be certain of."""
    if count <= 0:
        return 0
    within = _within_cap(contacts, per_subnet, loopback_exempt)
    if len(within) < count:
        return None
    last = within[count - 1].node_id
    return next(n for n, c in enumerate(contacts, 1) if c.node_id == last)


def _within_cap(
    contacts: Sequence[Contact], per_subnet: int, loopback_exempt: bool
) -> list[Contact]:
    """The contacts, in order, that find fewer than ``per_subnet`` of their subnet before
    them among those taken (loopback exempt when asked)."""
    taken: list[Contact] = []
    held: Counter[str] = Counter()
    for c in contacts:
        if not subnet_cap_exempt(c.scope, loopback_exempt):
            if held[c.subnet] >= per_subnet:
                continue
            held[c.subnet] += 1
        taken.append(c)
    return taken
