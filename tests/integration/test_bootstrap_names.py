"""Bootstrap nodes named by DNS (`bootstrap = ["dna-bootstrap-0.dna-bootstrap:7400"]`, as a
Kubernetes chart or a compose file writes them): resolved on every join attempt, and a name
that does not resolve yet is retried, never taken as "no other bootstrap" (which would
make the node seed a network of its own)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from cluster import UDP_PORT, NodeProcess, running
from dna_core.overlay.aio.server import resolve_seeds

UNRESOLVABLE = "no-such-node.invalid"


def test_names_resolve_to_every_address_and_ips_stay_as_they_are() -> None:
    seeds = ["localhost:7400", "127.0.0.9:7401", f"{UNRESOLVABLE}:7400"]
    found, unresolved = asyncio.run(resolve_seeds(seeds, socket.AF_INET))
    assert found == [("127.0.0.1", 7400), ("127.0.0.9", 7401)]
    assert unresolved == [f"{UNRESOLVABLE}:7400"]


def test_a_storage_node_joins_through_a_bootstrap_named_by_dns(tmp_path: Path) -> None:
    # "localhost" is the one name every machine resolves: the bootstrap listens on 127.0.0.1.
    boot = NodeProcess("boot", "127.0.0.1", tmp_path, [])
    store = NodeProcess(
        "store", "127.0.0.187", tmp_path, [f"localhost:{UDP_PORT}"], command="dna-storage-node"
    )
    with running([boot, store]):
        status = store.status()
        assert status["ready"] and status["routing_table_size"] >= 1, status


def test_a_name_that_does_not_resolve_keeps_the_node_joining(tmp_path: Path) -> None:
    lonely = NodeProcess("lonely", "127.0.0.188", tmp_path, [f"{UNRESOLVABLE}:{UDP_PORT}"])
    lonely.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "unresolved" not in lonely.log_path.read_text():
            time.sleep(0.2)
        assert UNRESOLVABLE in lonely.log_path.read_text()
        readyz = lonely.http("/readyz")
        assert readyz.status_code == 503 and "joining" in readyz.json()["reason"]
    finally:
        lonely.kill()
