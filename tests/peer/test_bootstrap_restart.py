"""The only bootstrap node of a network SIGKILLed and restarted with its key and address
while the storage nodes keep running: it comes back with an empty routing table, and the
nodes' pings (`[overlay] seed_ping_interval`) fill it again, so a client that joins through
it afterwards finds the storage nodes and sends."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from cluster import free_ips, wait_ready
from dna_core.wire.gen.dna.v1 import envelope_pb2
from dna_testnet.network import Testnet
from peers import People

pytestmark = pytest.mark.process

PING_S = 1.0  # the default is a minute: the same code, sooner


def contacts(reason: str) -> int:
    return int(reason.split(maxsplit=1)[0]) if reason.endswith("contacts") else 0


def test_a_restarted_bootstrap_node_learns_the_network_again(tmp_path: Path) -> None:
    net = Testnet(tmp_path / "net", bootstraps=1, storage=3, addresses=free_ips(4))
    for node in net.nodes:
        node.overlay_toml = f"seed_ping_interval = {PING_S}\n"
    net.up()
    try:
        boot = net.nodes[0]
        boot.kill()
        boot.start()
        wait_ready([boot])
        deadline = time.monotonic() + 20 * PING_S
        while contacts(boot.http("/readyz").json()["reason"]) < 3:
            assert time.monotonic() < deadline, boot.http("/readyz").text
            time.sleep(0.2)

        async def send() -> None:
            who = People(tmp_path, net.seeds)
            alice = await who.new("alice", publish=False)
            bob = await who.new("bob", publish=False)
            text = envelope_pb2.Payload(text=envelope_pb2.Text(body="hi")).SerializeToString()
            assert (await bob.send_payload(alice.identity.public, text, with_keys=True)).stored_on
            assert [m.body for m in (await alice.sync()).new_messages] == ["hi"]
            await asyncio.gather(alice.close(), bob.close())

        asyncio.run(send())
    finally:
        net.down()
