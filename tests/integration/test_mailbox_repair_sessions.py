"""Repair over mailbox sessions, on real processes (1 bootstrap + 5 storage nodes, every
one a replica of every mailbox): two replicas killed and wiped are made whole again by
sync calls that travel on sessions, and once the network is whole no exchange is made;
a node that serves no sessions and no SyncCompare (as nodes before them) is still
repaired, by the unary calls of the per-mailbox exchange."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    FAST_REPAIR,
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    now_ms,
    running,
    scrape,
    storage_network,
    until_whole,
    wait_ready,
)
from dna_core.crypto import Identity, seal
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.contact import Contact, distance
from process_mark import starts_processes
from prometheus_client.samples import Sample
from support import seeded_identity, until_async

STORAGE = 5
ADDRESSES = free_ips(1 + STORAGE + 1)  # the bootstrap, 5 storage nodes, the older node
SEED = (ADDRESSES[0], UDP_PORT)
REPAIR_BOUND_S = 30.0  # repair_interval_s = 1
ALICE = seeded_identity("repair-session-alice")
WITHOUT_SESSIONS = Path(__file__).with_name("storage_node_without_sessions.py")


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("repair-sessions")
    with running(storage_network(root, STORAGE, FAST_REPAIR, ADDRESSES[:-1])) as nodes:
        yield nodes


@dataclasses.dataclass
class NodeWithoutSessions(NodeProcess):
    """A storage node process whose Mailbox serves no sessions (the script beside this)."""

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(WITHOUT_SESSIONS), str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("DNA_")},
            )  # fmt: skip


def storage(network: list[NodeProcess]) -> list[NodeProcess]:
    return [n for n in network if n.role == "storage"]


def node_id_of(node: NodeProcess) -> bytes:
    return bytes.fromhex(node.status()["node_id"])


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of every series of ``name`` with ``labels`` (whatever its other labels)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def calls(node: NodeProcess, via: str) -> float:
    return total(scrape(node), "dna_storage_repair_calls_total", via=via)


def exchanged_unary(node: NodeProcess) -> float:
    """Unary sync calls of the node's repair other than SyncCompare (unary by design)."""
    samples = scrape(node)
    return sum(total(samples, "dna_storage_repair_calls_total", method=m, via="unary")
               for m in ("SyncList", "SyncPull", "SyncPush"))  # fmt: skip


def passes(node: NodeProcess) -> float:
    return total(scrape(node), "dna_storage_repair_passes_total")


async def passes_end(nodes: list[NodeProcess], count: int) -> None:
    """Until each node has ended ``count`` more repair passes (counted at a pass's end, so
    ``count - 1`` whole ones ran). Counted, not slept: on a loaded machine a pass takes
    longer than its 1 s interval, and a window of seconds may hold no pass at all."""
    since = {n.name: passes(n) for n in nodes}
    await until_async(
        lambda: all(passes(n) >= since[n.name] + count for n in nodes),
        f"{count} repair passes of each node", timeout_s=2 * REPAIR_BOUND_S, every_s=0.2,
    )  # fmt: skip


def served_on_sessions(node: NodeProcess, op: str) -> float:
    return total(scrape(node), "dna_storage_session_requests_total", op=op)


async def send(owner: Identity, count: int) -> tuple[set[bytes], list[Contact]]:
    """``count`` messages to ``owner``, stored on all its replicas; their IDs and the
    replicas."""
    client = await client_node([SEED])
    mail = MailboxClient(client, pow_bits=8)
    replicas = await mail.storage_nodes(mailbox_id(owner.fingerprint), 5)
    assert len(replicas) == 5
    sent = set()
    for i in range(count):
        env = seal(ALICE, owner.public, b"message %d" % i, now_ms=now_ms())
        sent.add((await mail.put(owner.fingerprint, env)).blob_id)
    await mail.close()
    await client.stop()
    return sent, replicas


def kill_and_wipe(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.kill()
        shutil.rmtree(node.root / f"{node.name}-data")


def test_two_wiped_replicas_are_repaired_over_sessions(network: list[NodeProcess]) -> None:
    bob = seeded_identity("repair-session-bob")

    async def scenario() -> None:
        sent, replicas = await send(bob, 10)
        lost = storage(network)[:2]
        kill_and_wipe(lost)
        for node in lost:
            node.start()
        await asyncio.to_thread(wait_ready, lost)
        took = await until_whole(SEED, bob, replicas, sent, REPAIR_BOUND_S)
        print(f"2 wiped replicas whole again over sessions {took:.1f} s after the restarts")
        # Fresh processes: the others pushed them their mailbox, and listed it, on sessions.
        for node in lost:
            assert served_on_sessions(node, "sync_push") > 0, node.name
            assert served_on_sessions(node, "sync_list") > 0, node.name
        # Whole and steady: a pass is one SyncCompare per peer (unary: docs/storage.md
        # "Range compare"), and no exchange goes over the unary calls.
        before = {n.name: (calls(n, "unary"), exchanged_unary(n)) for n in storage(network)}
        await passes_end(storage(network), 4)  # 3 whole passes each
        for node in storage(network):
            unary, exchanged = before[node.name]
            assert calls(node, "unary") > unary, node.name
            assert exchanged_unary(node) == exchanged, node.name

    asyncio.run(scenario())


def owner_with_replica(node_id: bytes, storage_ids: set[bytes]) -> Identity:
    """An owner whose mailbox's 5 closest storage nodes include ``node_id``."""
    for i in range(100):
        owner = seeded_identity(f"repair-session-carol-{i}")
        box = mailbox_id(owner.fingerprint)
        if node_id in sorted(storage_ids, key=lambda n: distance(n, box))[:5]:
            return owner
    raise AssertionError("no owner of 100 has the node among its replicas")


def test_a_node_serving_no_sessions_is_repaired_by_the_unary_calls(
    network: list[NodeProcess],
) -> None:
    older = NodeWithoutSessions(
        **{f.name: getattr(network[1], f.name) for f in dataclasses.fields(NodeProcess)}
    )
    older.name, older.ip = "older", ADDRESSES[-1]
    older.proc = None

    async def scenario() -> None:
        others = {node_id_of(n) for n in storage(network)}
        older_id = node_id_of(older)
        # a mailbox whose 5 replicas include the older node (of 6 storage nodes)
        carol = owner_with_replica(older_id, others | {older_id})
        sent, replicas = await send(carol, 10)
        assert older_id in {r.node_id for r in replicas}
        pushed_unary = sum(
            total(scrape(n), "dna_storage_repair_calls_total", method="SyncPush", via="unary")
            for n in storage(network)
        )
        older.kill()
        shutil.rmtree(older.root / f"{older.name}-data")
        older.start()
        await asyncio.to_thread(wait_ready, [older])
        took = await until_whole(SEED, carol, replicas, sent, REPAIR_BOUND_S)
        print(f"a node serving no sessions whole again {took:.1f} s after its restart")
        assert total(scrape(older), "dna_storage_session_requests_total") == 0
        # It serves no SyncCompare either: its peers fell back to the exchange with it.
        assert (
            sum(
                total(scrape(n), "dna_storage_repair_compared_total", outcome="unsupported")
                for n in storage(network)
            )
            > 0
        )
        assert (
            sum(
                total(scrape(n), "dna_storage_repair_calls_total", method="SyncPush", via="unary")
                for n in storage(network)
            )
            > pushed_unary
        )

    with running([older]):
        asyncio.run(scenario())
