"""How a peer reaches the network: an overlay node in client mode joined through seeds."""

from __future__ import annotations

import ipaddress
import os

from dna_core.crypto.node import NodeIdentity
from dna_core.errors import DnaError
from dna_core.hostport import host_port
from dna_core.overlay import NodeConfig, OverlayNode, local_host_for, resolve_seeds, seed_family

from dna_peer.direct.link import IceConfig

# The local testnet's bootstrap nodes (`dna-testnet up`): the embedded default.
TESTNET_SEEDS = (("127.0.0.2", 7400), ("127.0.0.3", 7400), ("127.0.0.4", 7400))
SEEDS_ENV = "DNA_BOOTSTRAP"
STUN_ENV, TURN_ENV = "DNA_STUN", "DNA_TURN"  # host:port of the STUN and TURN servers
TURN_USER_ENV, TURN_PASSWORD_ENV = "DNA_TURN_USER", "DNA_TURN_PASSWORD"
DIRECT_ENV = "DNA_DIRECT"  # "0": never the direct path, always store-and-forward


class NetworkUnreachableError(DnaError):
    """No bootstrap node answered."""


def parse_seeds(text: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> addresses (IPv6 as ``[addr]:port``)."""
    seeds = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not (port.isascii() and port.isdigit()):
            raise DnaError(f"bootstrap address {item!r} is not host:port")
        if not 1 <= int(port) <= 65535:
            raise DnaError(f"bootstrap address {item!r}: port {port} is not in 1-65535")
        seeds.append((host.strip("[]"), int(port)))
    if not seeds:
        raise DnaError("no bootstrap address given (host:port[,host:port])")
    return seeds


def default_seeds() -> list[tuple[str, int]]:
    """$DNA_BOOTSTRAP, else the local testnet's bootstrap nodes."""
    if SEEDS_ENV not in os.environ:
        return list(TESTNET_SEEDS)
    try:
        return parse_seeds(os.environ[SEEDS_ENV])
    except DnaError as exc:
        raise DnaError(f"{SEEDS_ENV}={os.environ[SEEDS_ENV]!r}: {exc}") from None


async def join_overlay(
    seeds: list[tuple[str, int]], *, host: str | None = None, puzzle_bits: int = 4
) -> OverlayNode:
    """A peer's overlay node: client mode (it queries and is never routed through),
    joined through ``seeds`` (IPs or DNS names) with its buckets refreshed. It binds
    ``host``, by default loopback for a network on this machine, else every interface."""
    addrs, unresolved = await resolve_seeds(seeds, seed_family(seeds))
    node = OverlayNode(
        NodeIdentity.generate(0)[0],
        NodeConfig(
            host=host or local_host_for(addrs), puzzle_bits=puzzle_bits,
            client_mode=True, allow_loopback=True,
        ),
    )  # fmt: skip
    await node.start()
    if not addrs or not await node.join(addrs):
        await node.stop()
        names = f" ({', '.join(unresolved)} did not resolve)" if unresolved else ""
        raise NetworkUnreachableError(
            f"no bootstrap node answered among {', '.join(host_port(h, p) for h, p in seeds)}"
            f"{names} (is the network up? `dna-testnet up` starts a local one)"
        )
    await node.refresh(0)
    return node


def direct_enabled() -> bool:
    return os.environ.get(DIRECT_ENV, "1") != "0"


def ice_config() -> IceConfig:
    """The STUN/TURN servers of the direct path, from $DNA_STUN, $DNA_TURN (host:port),
    $DNA_TURN_USER and $DNA_TURN_PASSWORD (long-term or time-limited credentials).
    $DNA_STUN may name the server twice, ``ipv4:port,[ipv6]:port``: aioice asks STUN
    from IPv4 sockets only, so the IPv6 address serves the IPv6 reflexive candidates
    (a DNS name with A and AAAA records serves both)."""
    servers: dict[str, list[tuple[str, int]]] = {}
    for env in (STUN_ENV, TURN_ENV):
        text = os.environ.get(env, "").strip()
        try:
            servers[env] = parse_seeds(text) if text else []
        except DnaError as exc:
            raise DnaError(f"{env}={text!r}: {exc}") from None
    if len(servers[TURN_ENV]) > 1:
        raise DnaError(f"{TURN_ENV} names one TURN server (host:port)")
    stun4 = [s for s in servers[STUN_ENV] if not _is_ipv6(s[0])]
    stun6 = [s for s in servers[STUN_ENV] if _is_ipv6(s[0])]
    turn = servers[TURN_ENV][0] if servers[TURN_ENV] else None
    turn_user, turn_password = os.environ.get(TURN_USER_ENV), os.environ.get(TURN_PASSWORD_ENV)
    if turn is not None and not (turn_user and turn_password):
        raise DnaError(f"{TURN_ENV} needs {TURN_USER_ENV} and {TURN_PASSWORD_ENV}")
    return IceConfig(stun=stun4[0] if stun4 else None, stun6=stun6[0] if stun6 else None,
                     turn=turn, turn_username=turn_user, turn_password=turn_password)  # fmt: skip


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:  # a name
        return False
