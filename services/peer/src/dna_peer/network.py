"""How a peer reaches the network: an overlay node in client mode joined through seeds."""

from __future__ import annotations

import os

from dna_core.crypto.node import NodeIdentity
from dna_core.errors import DnaError
from dna_core.overlay.aio import NodeConfig, OverlayNode

# The local testnet's bootstrap nodes (`dna-testnet up`): the embedded default.
TESTNET_SEEDS = (("127.0.0.2", 7400), ("127.0.0.3", 7400), ("127.0.0.4", 7400))
SEEDS_ENV = "DNA_BOOTSTRAP"


class NetworkUnreachableError(DnaError):
    """No bootstrap node answered."""


def parse_seeds(text: str) -> list[tuple[str, int]]:
    """``"host:port,host:port"`` -> addresses (IPv6 as ``[addr]:port``)."""
    seeds = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
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
    seeds: list[tuple[str, int]], *, host: str = "0.0.0.0", puzzle_bits: int = 4
) -> OverlayNode:
    """A peer's overlay node: client mode (it queries and is never routed through),
    joined through ``seeds`` with its buckets refreshed. It listens on every address
    (``host``): a client is never contacted first, and bound to 127.0.0.1 it could reach a
    local testnet only, not nodes on another interface (the compose testnet, a real one)."""
    node = OverlayNode(
        NodeIdentity.generate(0)[0],
        NodeConfig(host=host, puzzle_bits=puzzle_bits, client_mode=True, allow_loopback=True),
    )
    await node.start()
    if not await node.join(seeds):
        await node.stop()
        raise NetworkUnreachableError(
            f"no bootstrap node answered among {', '.join(f'{h}:{p}' for h, p in seeds)}"
            " (is the network up? `dna-testnet up` starts a local one)"
        )
    await node.refresh(0)
    return node
