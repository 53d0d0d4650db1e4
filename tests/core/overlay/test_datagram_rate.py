"""One source address's datagrams are rate-limited before decoding: a flood from one
address costs a node a bucket check per datagram, and other sources are still answered."""

from __future__ import annotations

import asyncio
import os
import random

from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.overlay.codec import Datagram, FindNode, encode_datagram
from dna_testnet.harness import LOOPBACK
from support import datagrams_within, udp_socket

RATE, BURST, FLOOD = 5.0, 20.0, 300


def _find_node(rng: random.Random) -> bytes:
    return encode_datagram(Datagram(rng.getrandbits(64), FindNode(os.urandom(32)), padding=400))


def test_a_flood_from_one_address_is_dropped_undecoded_and_others_are_answered() -> None:
    async def main() -> None:
        config = NodeConfig(host="127.0.0.1", puzzle_bits=0, datagram_rate_per_s=RATE,
                            datagram_burst=BURST)  # fmt: skip
        node = OverlayNode(NodeIdentity.generate(0)[0], config)
        await node.start()
        rng = random.Random(5)
        flooder, other = udp_socket("127.0.0.1"), udp_socket(LOOPBACK.one())
        try:
            for _ in range(FLOOD):
                flooder.sendto(_find_node(rng), node.contact.endpoint.udp)  # type: ignore[union-attr]
            answered = await datagrams_within([flooder], 1.0)
            assert 0 < answered <= BURST + RATE * 2, answered  # the burst, then the rate
            dropped = node.metrics.registry.get_sample_value(
                "dna_overlay_rejected_total", {"reason": "datagram_rate"}
            )
            assert dropped is not None and dropped >= FLOOD - BURST - RATE * 2, dropped
            other.sendto(_find_node(rng), node.contact.endpoint.udp)  # type: ignore[union-attr]
            assert await datagrams_within([other], 1.0) == 1  # another address: its own bucket
        finally:
            flooder.close()
            other.close()
            await node.stop()

    asyncio.run(main())
