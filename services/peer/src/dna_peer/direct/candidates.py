"""Which local addresses become ICE host candidates, and in which order (sans-I/O).

The rules of RFC 8445 section 5.1.1.1 that aioice leaves to its caller (it gathers every
interface address but 127.0.0.1, ``::1`` and scoped IPv6 ones):

* an address another host can use: no loopback, link-local (``fe80::/10`` needs a scope,
  ``169.254/16`` is per link), unspecified, multicast, IPv4-mapped or IPv4-compatible
  IPv6, or deprecated site-local (``fec0::/10``) address;
* no IPv6 address the kernel does not use as a source yet or any more (tentative, failed
  duplicate detection, deprecated: ``/proc/net/if_inet6`` flags, Linux only);
* where an interface has a temporary (privacy) IPv6 address in a prefix, not the stable
  one of the same prefix: "host candidates that correspond to IPv6 addresses that do allow
  location tracking, are configured on the same interface, and are part of the same network
  prefix MUST NOT be gathered" (RFC 8445 section 5.1.1.1).

Order (`local_preferences`): RFC 8421 section 4, IPv6 first and the families interleaved,
so a host with many IPv4 interfaces (bridges, VPNs) does not push its IPv6 address to the
end of the check list, and a dual-stack pair tries IPv6 then IPv4 about 20 ms later (one
aioice check tick) instead of one family after all pairs of the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IF_INET6 = "/proc/net/if_inet6"
# Flags of /proc/net/if_inet6 (linux/if_addr.h).
IFA_F_TEMPORARY, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x01, 0x08, 0x20, 0x40
_NOT_A_SOURCE = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


@dataclass(frozen=True)
class Inet6Entry:
    """One line of ``/proc/net/if_inet6``: an IPv6 address of an interface."""

    interface: str
    prefix_len: int
    flags: int

    @property
    def temporary(self) -> bool:
        return bool(self.flags & IFA_F_TEMPORARY)


def usable_across_hosts(ip: IPAddress) -> bool:
    """Whether another host can send to ``ip`` (RFC 8445 section 5.1.1.1)."""
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return not (ip.ipv4_mapped or ip in _SITE_LOCAL or ip in _IPV4_COMPATIBLE)
    return True


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def loopback_servers(*servers: tuple[str, int] | None) -> frozenset[str]:
    """The loopback IP addresses among ``servers`` (a device's STUN and TURN servers): a
    testnet on one host, whose relayed candidates are there (`dialable`)."""
    found = set()
    for server in servers:
        if server is None:
            continue
        try:
            ip = ipaddress.ip_address(server[0])
        except ValueError:
            continue  # a name: never a testnet's loopback literal
        if ip.is_loopback:
            found.add(str(ip))
    return frozenset(found)


def dialable(host: str, local_servers: Container[str] = ()) -> bool:
    """Whether a contact's candidate address (from its presence record or its offer: text
    the contact wrote) is one to send checks to: an IP address another host can use (an
    honest device publishes no other, `select_host_addresses`), not loopback, broadcast or
    reserved, and not a name (a lookup the contact would choose). A hostile contact cannot
    make this device probe its own services or flood its link this way. The one exception,
    ``local_servers``: our own STUN/TURN server's loopback address (`loopback_servers`), on
    a testnet on one host, where both ends' relayed candidates are on it."""
    if host in local_servers:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip == _BROADCAST or (ip.version == 4 and ip.is_reserved):
        return False
    return usable_across_hosts(ip)


def parse_if_inet6(text: str) -> dict[IPAddress, Inet6Entry]:
    """``/proc/net/if_inet6``: "address ifindex prefix_len scope flags name", all hex but
    the name. Malformed lines are skipped (the file is the kernel's, not a peer's)."""
    table: dict[IPAddress, Inet6Entry] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        try:
            ip = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            table[ip] = Inet6Entry(fields[5], int(fields[2], 16), int(fields[4], 16))
        except ValueError:
            continue
    return table


def select_host_addresses(
    addresses: Iterable[str], inet6: Mapping[IPAddress, Inet6Entry] | None = None
) -> list[str]:
    """The addresses to gather host candidates on, in ``addresses``' order (duplicates
    dropped). ``inet6``: the kernel's view of the IPv6 addresses, None where unknown."""
    ips: list[IPAddress] = []
    for text in addresses:
        ip = ipaddress.ip_address(text.partition("%")[0])
        if usable_across_hosts(ip) and ip not in ips:
            ips.append(ip)
    if inet6:
        ips = [ip for ip in ips if ip.version == 4 or not _not_a_source(ip, inet6)]
        private = {_prefix(ip, inet6) for ip in ips if ip in inet6 and inet6[ip].temporary}
        ips = [ip for ip in ips if not _trackable_beside_private(ip, inet6, private)]
    return [str(ip) for ip in ips]


def _not_a_source(ip: IPAddress, inet6: Mapping[IPAddress, Inet6Entry]) -> bool:
    entry = inet6.get(ip)
    return entry is not None and bool(entry.flags & _NOT_A_SOURCE)


def _prefix(ip: IPAddress, inet6: Mapping[IPAddress, Inet6Entry]) -> tuple[str, str]:
    entry = inet6[ip]
    net = ipaddress.ip_network(f"{ip}/{entry.prefix_len}", strict=False)
    return entry.interface, str(net)


def _trackable_beside_private(
    ip: IPAddress, inet6: Mapping[IPAddress, Inet6Entry], private: set[tuple[str, str]]
) -> bool:
    """A stable IPv6 address in a prefix where the interface has a temporary one."""
    entry = inet6.get(ip)
    return entry is not None and not entry.temporary and _prefix(ip, inet6) in private


def interleaved(addresses: Iterable[str]) -> list[str]:
    """IPv6 first, then the families alternating (RFC 8421 section 4), each family in its
    given order."""
    ips = [ipaddress.ip_address(a) for a in addresses]
    v6 = [str(ip) for ip in ips if ip.version == 6]
    v4 = [str(ip) for ip in ips if ip.version == 4]
    ordered: list[str] = []
    for i in range(max(len(v6), len(v4))):
        ordered += v6[i : i + 1] + v4[i : i + 1]
    return ordered


def local_preferences(addresses: Iterable[str]) -> dict[str, int]:
    """The local preference of each host address (RFC 8445 section 5.1.2.1, 0-65535; the
    formula there gives 65535 to the one address of a single-homed host): the order of
    `interleaved`, 65535 for the first and one less per address after it."""
    return {address: 65535 - rank for rank, address in enumerate(interleaved(addresses))}
