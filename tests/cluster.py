"""Process clusters for integration tests, on the testnet's real node processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from dna_core.crypto import Identity
from dna_core.mailbox import sign_fetch
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.network import GRPC_PORT, UDP_PORT, LocalNode, client_node, wait_ready
from process_mark import starts_processes
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

NodeProcess = LocalNode
__all__ = [
    "FAST_REPAIR",
    "GRPC_PORT",
    "UDP_PORT",
    "NodeProcess",
    "client_node",
    "held_by",
    "make_cluster",
    "now_ms",
    "running",
    "sample_value",
    "scrape",
    "stop_all",
    "storage_network",
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


FAST_REPAIR = "repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"


def storage_network(root: Path, first: int, storage: int, extra_toml: str) -> list[LocalNode]:
    """A bootstrap on 127.0.0.``first`` and ``storage`` storage nodes on the next addresses."""
    seed = f"127.0.0.{first}:{UDP_PORT}"
    nodes = [LocalNode("boot", f"127.0.0.{first}", root, [seed])]
    for i in range(storage):
        ip = f"127.0.0.{first + 1 + i}"
        nodes.append(
            LocalNode(
                f"store{i}", ip, root, [seed], command="dna-storage-node", extra_toml=extra_toml
            )
        )
    return nodes


def storage_network_fixture(
    name: str, first: int, storage: int, extra_toml: str = FAST_REPAIR
) -> Callable[[pytest.TempPathFactory], Iterator[list[LocalNode]]]:
    """A module-scoped ``network`` fixture: ``storage_network`` running for the module."""

    @pytest.fixture(scope="module")
    @starts_processes
    def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalNode]]:
        root = tmp_path_factory.mktemp(name)
        with running(storage_network(root, first, storage, extra_toml)) as nodes:
            yield nodes

    return network


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def held_by(
    node: OverlayNode, owner: Identity, replica: Contact, *, strict: bool = False
) -> set[bytes]:
    """Blob IDs one replica holds for ``owner``'s mailbox (empty when it does not answer,
    or the gRPC error raised with ``strict``: "holds nothing" must not mean "is down")."""
    stub = mailbox_pb2_grpc.MailboxStub(node.channels.get(replica.endpoint.grpc_target))
    held: set[bytes] = set()
    cursor = b""
    while True:
        req = mailbox_pb2.FetchRequest.FromString(
            sign_fetch(owner, cursor=cursor, limit=1000, now_ms=time.time_ns() // 10**6)
        )
        try:
            page = await stub.Fetch(req, timeout=3)
        except grpc.aio.AioRpcError:
            if strict:
                raise
            return held
        held |= {b.blob_id for b in page.blobs}
        cursor = page.next_cursor
        if not page.more:
            return held


def scrape(node: LocalNode) -> list[Sample]:
    """Every sample of a node's /metrics, read at once (so related series agree)."""
    text = node.http("/metrics").text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def sample_value(samples: list[Sample], name: str, **labels: str) -> float:
    """One series' value; 0 when it does not exist yet (a labelled counter never counted)."""
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return 0.0
