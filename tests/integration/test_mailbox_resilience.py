"""The storage issue's resilience run: messages to many mailboxes on a 10-storage-node
network; in rounds, SIGKILL 4 of some mailbox's 5 replicas and wipe their data. After
every loss every acknowledged message is still fetchable; after the restarts every
mailbox is back to 5 whole replicas within REPAIR_BOUND_S.

The default suite runs a short version (200 messages, 20 mailboxes, 2 rounds); the
issue's size (1,000 messages, 50 mailboxes) runs with `pytest -m slow`.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator

import pytest
from cluster import (
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    held_by,
    running,
    storage_network,
    wait_ready,
)
from dna_core.crypto import Identity, seal
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.client import MailboxClient
from dna_core.overlay.contact import Contact
from process_mark import starts_processes
from support import seeded_identity

STORAGE = 10
REPAIR_BOUND_S = 60.0  # with repair_interval_s = 1: a pass over 50 mailboxes takes ~1 s
ALICE = seeded_identity("resilience-alice")
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
STORAGE_TOML = (
    "repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"
    "ip_rate_per_s = 1000.0\nip_burst = 2000.0\nmailbox_burst = 100.0\n"
)


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("resilience")
    nodes = storage_network(root, STORAGE, STORAGE_TOML, ADDRESSES)
    with running(nodes):
        yield nodes


@pytest.mark.parametrize(
    ("messages", "mailboxes", "rounds"),
    [
        pytest.param(200, 20, 2, id="short"),
        pytest.param(1000, 50, 5, id="full", marks=pytest.mark.slow),
    ],
)
def test_replica_loss_and_repair(
    network: list[NodeProcess], messages: int, mailboxes: int, rounds: int
) -> None:
    owners = [seeded_identity(f"resilience-{mailboxes}-{i}") for i in range(mailboxes)]
    by_id = {bytes.fromhex(n.status()["node_id"]): n for n in network}

    async def scenario() -> list[float]:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8)
        acked: dict[bytes, set[bytes]] = {o.fingerprint: set() for o in owners}
        for i in range(messages):
            owner = owners[i % mailboxes]
            env = seal(ALICE, owner.public, f"m{i}".encode(), now_ms=time.time_ns() // 10**6)
            acked[owner.fingerprint].add((await mail.put(owner.fingerprint, env)).blob_id)
        replicas = {
            o.fingerprint: await mail.storage_nodes(mailbox_id(o.fingerprint), 5) for o in owners
        }
        await client.stop()
        repair_times = []
        for r in range(rounds):
            victim_owner = owners[(r * 7) % mailboxes]
            lost = [by_id[c.node_id] for c in replicas[victim_owner.fingerprint][1:]]
            for node in lost:
                node.kill()
                shutil.rmtree(node.root / f"{node.name}-data", ignore_errors=True)
            client = await client_node([SEED])
            mail = MailboxClient(client, pow_bits=8)
            for owner in owners:  # set-full check: every acknowledged write is present
                blobs, _ = await mail.fetch(owner)
                missing = acked[owner.fingerprint] - {b.blob_id for b in blobs}
                assert not missing, f"round {r}: {len(missing)} acknowledged messages lost"
            await client.stop()
            for node in lost:
                node.start()
            wait_ready(lost)
            repair_times.append(await _until_whole(owners, replicas, acked))
        return repair_times

    times = asyncio.run(scenario())
    print(f"{messages} messages, {mailboxes} mailboxes: every mailbox whole again after {times} s")
    assert max(times) <= REPAIR_BOUND_S


async def _until_whole(
    owners: list[Identity],
    replicas: dict[bytes, list[Contact]],
    acked: dict[bytes, set[bytes]],
) -> float:
    client = await client_node([SEED])
    started = time.monotonic()
    try:
        pending = list(owners)
        while pending and time.monotonic() - started < REPAIR_BOUND_S:
            owner = pending[0]
            holdings = [await held_by(client, owner, r) for r in replicas[owner.fingerprint]]
            if all(h >= acked[owner.fingerprint] for h in holdings):
                pending.pop(0)
            else:
                await asyncio.sleep(0.5)
        assert not pending, f"{len(pending)} mailboxes not back to 5 replicas"
        return round(time.monotonic() - started, 1)
    finally:
        await client.stop()
