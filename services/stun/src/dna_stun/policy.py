"""Which peer addresses a relay may send to (relay hardening, as coturn does it).

A TURN server relays to any address a client names, so left open it is a proxy into the
server's own network: its loopback services, its cloud metadata endpoint (169.254.169.254),
the private networks behind it. By default every such range is refused, in each of the
disguises an IPv6 address can give an IPv4 one (mapped ``::ffff:a.b.c.d``, compatible
``::a.b.c.d``, 6to4 ``2002:aabb:ccdd::``, NAT64 ``64:ff9b::a.b.c.d``, Teredo's client; the
local-use NAT64 prefix ``64:ff9b:1::/48`` is refused whole), and so are ``0.0.0.0``
and ``::``, which the kernel delivers to the host itself (CVE-2020-26262), and the server's
own addresses (where its ssh, ops port or a database may listen) except its relay port range,
so two clients of one server can still relay to each other (both behind symmetric NATs).
``allowed`` (CIDRs) lifts the refusal of ranges for test networks; nothing lifts the refusal of
the server's own listening endpoints (a relay to the TURN port itself is a loop).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_DENIED", "RelayPolicy", "embedded_ipv4"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENIED: tuple[str, ...] = (
    "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the host itself
    "10.0.0.0/8",
    "100.64.0.0/10",  # carrier-grade NAT
    "127.0.0.0/8",
    "169.254.0.0/16",  # link local, cloud metadata
    "172.16.0.0/12",
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and the broadcast address
    "::/128",  # unspecified: reaches the host itself (CVE-2020-26262)
    "::1/128",
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): a site's translator, to its private IPv4 too
    "fc00::/7",  # unique local
    "fe80::/10",  # link local
    "ff00::/8",  # multicast
)

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, 6to4, NAT64, Teredo's
    client, as `dna_core.ratelimit` reads a source), if any."""
    if ip.version == 4:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.teredo is not None:  # a relay host running a Teredo client sends there in IPv4
        return ip.teredo[1]
    if ip in _MAPPED or ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


TEREDO_SERVER_PORT = 3544  # where a Teredo client's bubbles go (RFC 4380)


def _forms(ip: IPAddress, port: int) -> list[tuple[IPAddress, int]]:
    """Every (address, port) a datagram to ``ip``:``port`` may reach: the address itself and
    the IPv4 one it carries; for Teredo, the client's own port (obfuscated beside its
    address, not the outer one) and the Teredo server, which gets the client's bubbles."""
    forms: list[tuple[IPAddress, int]] = [(ip, port)]
    if isinstance(ip, ipaddress.IPv6Address) and ip.teredo is not None:
        server, client = ip.teredo
        client_port = ((int(ip) >> 32) & 0xFFFF) ^ 0xFFFF
        return [*forms, (client, client_port), (server, TEREDO_SERVER_PORT)]
    inner = embedded_ipv4(ip)
    return forms if inner is None else [*forms, (inner, port)]


def _networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


@dataclass
class RelayPolicy:
    """``check(ip, port)`` -> None if relaying there is allowed, else the refusal's reason."""

    denied: tuple[str, ...] = DEFAULT_DENIED
    allowed: tuple[str, ...] = ()
    own_ips: set[str] = field(default_factory=set)  # the server's addresses
    own_endpoints: set[tuple[str, int]] = field(default_factory=set)  # listening: never
    relay_ports: tuple[int, int] = (49152, 65535)  # on own_ips: other allocations' relays

    def __post_init__(self) -> None:
        self._denied = _networks(self.denied)
        self._allowed = _networks(self.allowed)
        self._cache: dict[str, str | None] = {}
        # Ports listened on at a wildcard address, by IP version: on every address of the
        # host, including those the configuration does not name.
        self._any_address_ports: set[tuple[int, int]] = set()

    def add_own_endpoint(self, addr: tuple[str, int]) -> None:
        ip = ipaddress.ip_address(addr[0])
        self.own_endpoints.add((str(ip), addr[1]))
        self.own_ips.add(str(ip))
        if ip.is_unspecified:  # "::" is dual-stack here: IPv4 addresses too
            for version in (4, 6) if ip.version == 6 else (4,):
                self._any_address_ports.add((version, addr[1]))
        self._cache.clear()

    def add_host_addresses(self, addresses: Iterable[str]) -> None:
        """The host's own addresses (its interfaces'), for a server listening at a wildcard
        address: every one of them reaches the host, whose other UDP services (DNS, NTP,
        SNMP, a second node) a relay must not reach, as for a named ``host``."""
        for text in addresses:
            try:
                ip = ipaddress.ip_address(text.partition("%")[0])  # fe80::1%eth0: the zone
            except ValueError:
                continue
            self.own_ips.add(str(ip))
        self._cache.clear()

    @property
    def at_wildcard(self) -> bool:
        """Listening at 0.0.0.0 or ``::``: the host's addresses are not all named."""
        return bool(self._any_address_ports)

    def check(self, host: str, port: int) -> str | None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return "forbidden_peer"
        for form, form_port in _forms(ip, port):
            if form_port == 0 or (str(form), form_port) in self.own_endpoints:
                return "forbidden_peer"
            if (form.version, form_port) in self._any_address_ports:
                return "forbidden_peer"
            to_relay = self.relay_ports[0] <= form_port <= self.relay_ports[1]
            if str(form) in self.own_ips and not to_relay:
                return "forbidden_peer"
            reason = self._address_reason(form)
            if reason is not None:
                return reason
        return None

    def _address_reason(self, ip: IPAddress) -> str | None:
        text = str(ip)
        if text in self._cache:
            return self._cache[text]
        reason: str | None = None
        allowed = any(ip in net for net in self._allowed if net.version == ip.version)
        if not allowed and any(ip in net for net in self._denied if net.version == ip.version):
            reason = "forbidden_peer"
        if len(self._cache) > 4096:  # bounded: peers are chosen by clients
            self._cache.clear()
        self._cache[text] = reason
        return reason
