"""Process clusters for integration tests: real node processes on the harness's local
driver, on addresses from its allocator (`dna_testnet.harness`; no test picks one)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from dna_core.crypto import Identity
from dna_core.mailbox import sign_fetch
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from dna_testnet.harness import LOOPBACK, LocalNode, local_cluster, wait_ready
from dna_testnet.network import GRPC_PORT, UDP_PORT, client_node
from dna_testnet.topology import NodeSpec, Topology
from process_mark import starts_processes
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support import SETTLE_S

NodeProcess = LocalNode
__all__ = [
    "FAST_REPAIR",
    "GRPC_PORT",
    "UDP_PORT",
    "NodeProcess",
    "client_node",
    "free_ips",
    "held_by",
    "idle_connections",
    "mailbox_call",
    "make_cluster",
    "node_process",
    "now_ms",
    "running",
    "sample_value",
    "scrape",
    "stop_all",
    "storage_network",
    "wait_ready",
]


def make_cluster(root: Path, count: int, bootstraps: int = 3) -> list[LocalNode]:
    """``count`` bootstrap processes node0.. on fresh addresses; the first ``bootstraps``
    are the well-known ones every node starts from."""
    topology = Topology(tuple(NodeSpec(f"node{i}", "bootstrap") for i in range(count)))
    seeds = [f"node{i}" for i in range(bootstraps)]
    return local_cluster(root, topology, seeds=seeds).driver.nodes


def node_process(
    name: str, root: Path, seeds: list[str] | None = None, **settings: Any
) -> LocalNode:
    """One node process on a fresh address (``settings``: `LocalNode`'s fields)."""
    return LocalNode(name, LOOPBACK.one(), root, seeds or [], **settings)


def free_ips(count: int) -> list[str]:
    """Addresses for what is not a node (a client's source address, a node started by hand
    with `dna-storage-node`), from the same allocator."""
    return LOOPBACK.take(count)


def idle_connections(source: str, target: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections from ``source`` to ``target``:``port`` that never send a
    byte (non-blocking: a test reads whether the node closed them)."""
    family = socket.AF_INET6 if ipaddress.ip_address(target).version == 6 else socket.AF_INET
    conns = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect((target, port))
        sock.setblocking(False)
        conns.append(sock)
    return conns


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


def storage_network(
    root: Path, storage: int, extra_toml: str, addresses: list[str] | None = None
) -> list[LocalNode]:
    """A bootstrap ("boot", first) and ``storage`` storage nodes (store0..) on
    ``addresses`` (a module's block from `free_ips`, when its helpers need the bootstrap's
    address before the network runs) or fresh ones; ``extra_toml`` goes in every storage
    node's file."""
    stores = (NodeSpec(f"store{i}", "storage") for i in range(storage))
    topology = Topology((NodeSpec("boot", "bootstrap"), *stores))
    return local_cluster(root, topology, addresses=addresses, storage_toml=extra_toml).driver.nodes


def storage_network_fixture(
    name: str, addresses: list[str], extra_toml: str = FAST_REPAIR
) -> Callable[[pytest.TempPathFactory], Iterator[list[LocalNode]]]:
    """A module-scoped ``network`` fixture: ``storage_network`` on ``addresses`` (the
    bootstrap's, then one per storage node) running for the module."""

    @pytest.fixture(scope="module")
    @starts_processes
    def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalNode]]:
        root = tmp_path_factory.mktemp(name)
        with running(storage_network(root, len(addresses) - 1, extra_toml, addresses)) as nodes:
            yield nodes

    return network


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def mailbox_call(ip: str, method: str, request: Any) -> Any:
    """One unary Mailbox call to the node at ``ip``, in a loop of its own: its answer, or
    the `grpc.aio.AioRpcError` it ended with."""

    async def go() -> Any:
        async with grpc.aio.insecure_channel(f"{ip}:{GRPC_PORT}") as channel:
            stub = mailbox_pb2_grpc.MailboxStub(channel)
            try:
                return await getattr(stub, method)(request, timeout=5)
            except grpc.aio.AioRpcError as err:
                return err

    return asyncio.run(go())


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
            # strict: the caller asserts on this answer once, so a loaded node gets SETTLE_S;
            # else the caller polls, and a node that does not answer soon holds nothing yet
            page = await stub.Fetch(req, timeout=SETTLE_S if strict else 3)
        except grpc.aio.AioRpcError:
            if strict:
                raise
            return held
        held |= {b.blob_id for b in page.blobs}
        cursor = page.next_cursor
        if not page.more:
            return held


async def until_whole(
    seed: tuple[str, int],
    owner: Identity,
    replicas: list[Contact],
    sent: set[bytes],
    bound_s: float,
) -> float:
    """Seconds until every replica holds every blob sent (fails after ``bound_s``)."""
    return await until_all_whole(seed, [(owner, replicas, sent)], bound_s)


async def until_all_whole(
    seed: tuple[str, int],
    mailboxes: Sequence[tuple[Identity, Sequence[Contact], set[bytes]]],
    bound_s: float,
) -> float:
    """Seconds until, for each mailbox (owner, replicas, blobs sent), every replica holds
    every blob sent; fails after ``bound_s`` with, for each mailbox still short, how many of
    them each replica holds. Each poll reads every mailbox not yet whole on all its replicas
    at once (one after the other, 20 mailboxes of 5 replicas were 100 round trips a poll)."""
    client = await client_node([seed])
    started = time.monotonic()

    async def held(owner: Identity, replicas: Sequence[Contact]) -> list[set[bytes]]:
        return list(await asyncio.gather(*(held_by(client, owner, r) for r in replicas)))

    try:
        pending = list(mailboxes)
        while True:
            holdings = await asyncio.gather(*(held(owner, rs) for owner, rs, _ in pending))
            short = [
                (sent, hs)
                for (_, _, sent), hs in zip(pending, holdings, strict=True)
                if not all(h >= sent for h in hs)
            ]
            pending = [
                m for m, hs in zip(pending, holdings, strict=True) if not all(h >= m[2] for h in hs)
            ]
            if not pending or time.monotonic() - started >= bound_s:
                break
            await asyncio.sleep(0.5)
        took = time.monotonic() - started
    finally:
        await client.stop()
    assert not short, [[len(h & sent) for h in hs] for sent, hs in short]
    return took


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
