"""Every node of a network killed at once (a power cut, a fleet-wide upgrade gone wrong)
and started again at once: every acknowledged message that was not deleted is fetched
again, no deleted one comes back, and no node logs a traceback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from cluster import UDP_PORT, client_node, free_ips, running, storage_network, wait_ready
from dna_core.crypto import seal
from dna_core.mailbox.client import MailboxClient
from dna_testnet.harness.local import LocalNode
from process_mark import starts_processes
from support import seeded_identity

STORAGE = 6
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
ALICE = seeded_identity("restart-all-alice")
BOBS = [seeded_identity(f"restart-all-bob-{i}") for i in range(3)]


@pytest.fixture(scope="module")
@starts_processes
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalNode]]:
    root = tmp_path_factory.mktemp("restart-all")
    toml = "repair_interval_s = 1.0\ngc_interval_s = 1.0\n[admission]\npow_base_bits = 8\n"
    with running(storage_network(root, STORAGE, toml, ADDRESSES)) as nodes:
        yield nodes


async def _put_and_delete() -> tuple[set[bytes], set[bytes]]:
    """Ten messages to each recipient; each deletes its first four. (kept, deleted)"""
    client = await client_node([SEED])
    mail = MailboxClient(client, pow_bits=8)
    kept: set[bytes] = set()
    deleted: set[bytes] = set()
    for bob in BOBS:
        ids = []
        for i in range(10):
            env = seal(
                ALICE, bob.public, b"before the outage %d" % i, now_ms=time.time_ns() // 10**6
            )
            ids.append((await mail.put(bob.fingerprint, env)).blob_id)
        await mail.delete(bob, ids[:4])
        deleted |= set(ids[:4])
        kept |= set(ids[4:])
    await client.stop()
    return kept, deleted


async def _fetch_all() -> set[bytes]:
    client = await client_node([SEED])
    mail = MailboxClient(client, pow_bits=8)
    present: set[bytes] = set()
    for bob in BOBS:
        blobs, _ = await mail.fetch(bob)
        present |= {b.blob_id for b in blobs}
    await client.stop()
    return present


def test_every_node_killed_and_started_at_once(network: list[LocalNode]) -> None:
    kept, deleted = asyncio.run(_put_and_delete())
    for node in network:
        node.kill()
    began = time.monotonic()
    for node in network:
        node.start()
    wait_ready(network)
    print(f"\nall {len(network)} nodes ready {time.monotonic() - began:.1f} s after the restart")
    present = asyncio.run(_fetch_all())
    assert kept <= present, f"lost {len(kept - present)} of {len(kept)}"
    assert not deleted & present, "a deleted message came back"
    time.sleep(3)  # a few GC and repair passes after the restart
    assert asyncio.run(_fetch_all()) & (kept | deleted) == kept
    for node in network:
        assert "Traceback" not in node.log_path.read_text(), node.tail(40)
