"""A mailbox at its quota is not handed off, on real processes (1 bootstrap + 8 storage
nodes, so 3 hand-off candidates beyond the 5 replicas; a quota of 3 blobs): the sender
reads "full", and no node outside the replica set took the blob, which its owner would
never fetch there (a fetch asks hand-off nodes only for replicas that do not answer)."""

from __future__ import annotations

import asyncio

import pytest
from cluster import (
    UDP_PORT,
    NodeProcess,
    client_node,
    free_ips,
    held_by,
    now_ms,
    storage_network_fixture,
)
from dna_core.crypto import seal
from dna_core.mailbox import mailbox_id
from dna_core.mailbox.client import MailboxClient, QuorumError
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.contact import Contact
from support import seeded_identity

STORAGE = 8
QUOTA = 3
ADDRESSES = free_ips(1 + STORAGE)
SEED = (ADDRESSES[0], UDP_PORT)
TOML = f"repair_interval_s = 1.0\n[admission]\npow_base_bits = 8\nquota_max_blobs = {QUOTA}\n"
ALICE, BOB = seeded_identity("full-alice"), seeded_identity("full-bob")

network = storage_network_fixture("full", ADDRESSES, TOML)


def test_a_full_mailbox_is_refused_as_full_and_not_handed_off(
    network: list[NodeProcess],
) -> None:
    async def scenario() -> None:
        client = await client_node([SEED])
        mail = MailboxClient(client, pow_bits=8)
        try:
            everyone = await mail.storage_nodes(mailbox_id(BOB.fingerprint), STORAGE)
            replicas, others = everyone[:5], everyone[5:]
            assert len(others) == STORAGE - 5
            kept = set()
            for i in range(QUOTA):
                env = seal(ALICE, BOB.public, f"fits {i}".encode(), now_ms=now_ms())
                result = await mail.put(BOB.fingerprint, env)
                assert set(result.stored_on) <= {c.node_id for c in replicas}
                kept.add(result.blob_id)
            await until_every_replica_holds(client, replicas, kept)
            env = seal(ALICE, BOB.public, b"one too many", now_ms=now_ms())
            with pytest.raises(QuorumError, match="mailbox quota") as refused:
                await mail.put(BOB.fingerprint, env)
            assert refused.value.full
            for other in others:  # nothing handed off: nobody else holds anything of his
                assert await held_by(client, BOB, other, strict=True) == set()
        finally:
            await client.stop()

    asyncio.run(scenario())


async def until_every_replica_holds(
    client: OverlayNode, replicas: list[Contact], kept: set[bytes]
) -> None:
    """Repair fills a replica a put missed (W is 3 of 5): then all 5 are at the quota."""
    for _ in range(60):
        if all([await held_by(client, BOB, r, strict=True) == kept for r in replicas]):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"the replicas did not all hold the {QUOTA} blobs within 30 s")
