"""Bootstrap nodes named by DNS (`bootstrap = ["dna-bootstrap-0.dna-bootstrap:7400"]`, as a
Kubernetes chart or a compose file writes them, or `DNA_BOOTSTRAP` for a peer): resolved on
every join attempt, and a name that does not resolve yet is retried, never taken as "no
other bootstrap" (which would make the node seed a network of its own). A peer reaching a
network beyond this machine binds every interface, not loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import UDP_PORT, NodeProcess, node_process, running
from dna_core.overlay.aio.seeds import local_host_for, resolve_seeds, seed_family
from dna_peer.network import NetworkUnreachableError, join_overlay

pytestmark = pytest.mark.process  # helm, promtool, bash or node processes

UNRESOLVABLE = "no-such-node.invalid"


def test_names_resolve_to_every_address_and_ips_stay_as_they_are() -> None:
    addrs = [("localhost", 7400), ("127.0.0.9", 7401), (UNRESOLVABLE, 7400)]
    found, unresolved = asyncio.run(resolve_seeds(addrs, socket.AF_INET))
    assert found == [("127.0.0.1", 7400), ("127.0.0.9", 7401)]
    assert unresolved == [f"{UNRESOLVABLE}:7400"]


def test_a_client_binds_loopback_only_for_a_network_on_this_machine() -> None:
    assert local_host_for([("127.0.0.2", 7400), ("127.0.0.3", 7400)]) == "127.0.0.1"
    assert local_host_for([("127.0.0.2", 7400), ("10.1.2.3", 7400)]) == "0.0.0.0"
    assert local_host_for([("2001:db8::1", 7400)]) == "::"
    assert seed_family([("2001:db8::1", 7400)]) == socket.AF_INET6
    assert seed_family([("dna-bootstrap-0.dna", 7400)]) == socket.AF_INET


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # "localhost" is the one name every machine resolves: the bootstrap listens on 127.0.0.1.
    node = NodeProcess("boot", "127.0.0.1", tmp_path_factory.mktemp("names"), [])
    with running([node]):
        yield node


def test_a_storage_node_joins_through_a_bootstrap_named_by_dns(
    boot: NodeProcess, tmp_path: Path
) -> None:
    store = node_process("store", tmp_path, [f"localhost:{UDP_PORT}"], command="dna-storage-node")
    with running([store]):
        status = store.status()
        assert status["ready"] and status["routing_table_size"] >= 1, status


def test_a_peer_joins_through_a_name_and_from_every_interface(boot: NodeProcess) -> None:
    async def join(seeds: list[tuple[str, int]], host: str | None) -> tuple[str, int]:
        node = await join_overlay(seeds, host=host)
        try:
            return node.udp_addr[0], len(node.table)
        finally:
            await node.stop()

    assert asyncio.run(join([("localhost", UDP_PORT)], None)) == ("127.0.0.1", 1)
    # What a peer in a pod or container does: the wildcard reaches any address.
    assert asyncio.run(join([("127.0.0.1", UDP_PORT)], "0.0.0.0")) == ("0.0.0.0", 1)
    with pytest.raises(NetworkUnreachableError, match=f"{UNRESOLVABLE}:7400 did not resolve"):
        asyncio.run(join([(UNRESOLVABLE, 7400)], None))


def test_a_name_that_does_not_resolve_keeps_the_node_joining(tmp_path: Path) -> None:
    lonely = node_process("lonely", tmp_path, [f"{UNRESOLVABLE}:{UDP_PORT}"])
    lonely.start()
    try:
        deadline = time.monotonic() + 60  # a node starting on a loaded machine
        while time.monotonic() < deadline and "unresolved" not in lonely.log_path.read_text():
            time.sleep(0.2)
        assert UNRESOLVABLE in lonely.log_path.read_text()
        readyz = lonely.http("/readyz")
        assert readyz.status_code == 503 and "joining" in readyz.json()["reason"]
    finally:
        lonely.kill()
