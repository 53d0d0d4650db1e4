"""Bootstrap addresses as the overlay uses them: IPs, resolved from names where given.

An overlay datagram's answer is matched by the address it comes from, so a seed named by
DNS (a Kubernetes pod, a compose service) must be resolved before it is pinged; sent to by
name, its answer would never match and the node would never join.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from dna_core.hostport import host_port
from dna_core.overlay.protocol import Addr

__all__ = ["local_host_for", "resolve_seeds", "seed_family"]


def seed_family(seeds: Sequence[Addr]) -> socket.AddressFamily:
    """IPv6 when every seed is an IPv6 literal, else IPv4 (names resolve to IPv4)."""
    if seeds and all(":" in host for host, _ in seeds):
        return socket.AF_INET6
    return socket.AF_INET


async def resolve_seeds(
    seeds: Sequence[Addr], family: socket.AddressFamily
) -> tuple[list[Addr], list[str]]:
    """The addresses of ``seeds`` in ``family``: an IP as it is, a DNS name as every
    address it has (so one service name can stand for several bootstrap nodes). Seeds
    whose name does not resolve (yet) come back apart as ``host:port``, to retry."""
    loop = asyncio.get_running_loop()
    found: list[Addr] = []
    unresolved: list[str] = []
    for host, port in seeds:
        try:
            infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        except OSError:  # socket.gaierror: no such name, no DNS answer
            unresolved.append(host_port(host, port))
            continue
        for info in infos:
            addr = (str(info[4][0]), port)
            if addr not in found:
                found.append(addr)
    return found, unresolved


def local_host_for(seeds: Sequence[Addr]) -> str:
    """Where a client binds to reach ``seeds`` (resolved): loopback for a network on this
    machine, else every interface, since a socket bound to 127.0.0.1 cannot send beyond
    it (a peer in a container or a pod reaching the network)."""
    if seeds and all(ipaddress.ip_address(host).is_loopback for host, _ in seeds):
        return "::1" if ":" in seeds[0][0] else "127.0.0.1"
    return "::" if seeds and ":" in seeds[0][0] else "0.0.0.0"
