"""Whatever a storage node hands over, the inbox drops it with a reason and stores nothing:
every single-byte tamper of a real envelope and random bytes, on a real peer (real cache,
a real overlay node that has joined no network, so sender lookups find nothing)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from dna_core.crypto import Identity, seal
from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_peer.inbox import Inbox
from dna_peer.keyserver import now_ms
from dna_peer.peer import Peer
from dna_peer.profile import Profile
from support import single_byte_tampers


def test_tampered_and_random_blobs_are_dropped_and_store_nothing(
    tmp_path: Path, alice: Identity, bob: Identity
) -> None:
    async def go() -> None:
        profile = Profile(tmp_path / "bob")
        profile.create(bob, "pw")
        node = OverlayNode(NodeIdentity.generate(0)[0], NodeConfig(host="127.0.0.1",
                                                                   client_mode=True))  # fmt: skip
        await node.start()
        peer = Peer(bob, profile.open_cache(bob), node, profile.device())
        text = envelope_pb2.Payload(text=envelope_pb2.Text(body="hi")).SerializeToString()
        good = seal(alice, bob.public, text, now_ms=now_ms())  # no keys inside: lookups run
        blobs = [good, *single_byte_tampers(good, limit=150, seed=5)]
        blobs += [os.urandom(n) for n in (0, 1, 59, 4_700, 70_000)]
        inbox = Inbox(peer)
        for blob in blobs:
            await inbox.handle_blob(hashlib.sha256(blob).digest(), blob)
        assert len(inbox.report.rejected) == len(blobs)
        assert all(reason for _, reason in inbox.report.rejected)
        assert inbox.report.rejected[0][1] == "sealed content: unknown sender, cannot verify"
        assert inbox.report.new_messages == [] and peer.cache.message_count() == 0
        assert peer.cache.contacts() == []
        await peer.close()

    asyncio.run(go())
