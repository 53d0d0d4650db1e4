"""Process clusters for integration tests, on the testnet's real node processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dna_testnet.network import GRPC_PORT, UDP_PORT, LocalNode, client_node, wait_ready

NodeProcess = LocalNode
__all__ = [
    "GRPC_PORT",
    "UDP_PORT",
    "NodeProcess",
    "client_node",
    "make_cluster",
    "running",
    "stop_all",
    "wait_ready",
]


def make_cluster(root: Path, count: int, bootstraps: int = 3) -> list[LocalNode]:
    """Nodes on 127.0.0.2, .3, ...; the first ``bootstraps`` are the well-known ones."""
    ips = [f"127.0.0.{i + 2}" for i in range(count)]
    seeds = [f"{ip}:{UDP_PORT}" for ip in ips[:bootstraps]]
    return [LocalNode(f"node{i}", ip, root, seeds) for i, ip in enumerate(ips)]


def stop_all(nodes: list[LocalNode]) -> None:
    for node in nodes:
        if node.alive():
            node.kill()


@contextlib.contextmanager
def running(nodes: list[LocalNode]) -> Iterator[list[LocalNode]]:
    """Start ``nodes``, wait until all are ready, SIGKILL whatever is left at the end."""
    try:
        for node in nodes:
            node.start()
        wait_ready(nodes)
        yield nodes
    finally:
        stop_all(nodes)
