"""A node enters a routing table, or a lookup's result, only after proving its node key
from its address: real nodes on loopback UDP (addresses from the harness allocator) and
a spoofer on a raw socket that claims a known node's ID (its public key is no secret)
from its own address."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from cluster import free_ips
from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.overlay.codec import (
    Datagram,
    FindNode,
    Nodes,
    Ping,
    Pong,
    decode_datagram,
    encode_datagram,
)
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.protocol import PONG_DOMAIN, Addr, proven_contact
from support import udp_socket, until_async

PUZZLE = 4


def config(host: str) -> NodeConfig:
    return NodeConfig(host=host, puzzle_bits=PUZZLE, allow_loopback=True)


async def started(host: str) -> OverlayNode:
    node = OverlayNode(NodeIdentity.generate(PUZZLE)[0], config(host))
    await node.start()
    return node


def address_of(node: OverlayNode, contact_id: bytes) -> Addr | None:
    contacts = [c for c in node.table.closest(contact_id, 50) if c.node_id == contact_id]
    return contacts[0].endpoint.udp if contacts else None


class Spoofer:
    """A raw UDP socket that answers pings with a proof made by its own key."""

    def __init__(self) -> None:
        self.sock = udp_socket("127.0.0.1")
        self.addr: Addr = self.sock.getsockname()
        self.key = NodeIdentity.generate(PUZZLE)[0]

    def posing_as(self, victim: Contact) -> Contact:
        return Contact(victim.node_id, victim.public_key, (Endpoint(*self.addr),), victim.role)

    async def send(self, to: Addr, dgram: Datagram) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, encode_datagram(dgram), to)

    async def request(self, to: Addr, dgram: Datagram) -> Datagram:
        await self.send(to, dgram)
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 2048), 2.0)
        return decode_datagram(data, puzzle_bits=PUZZLE)

    async def answer_pings(self, posing: Contact, count: int) -> int:
        """Answer ``count`` pings as ``posing``, signing with the spoofer's own key."""
        loop = asyncio.get_running_loop()
        answered = 0
        for _ in range(count):
            try:
                data, frm = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 2048), 2.0)
            except TimeoutError:
                break
            dgram = decode_datagram(data, puzzle_bits=PUZZLE)
            if isinstance(dgram.body, Ping) and dgram.body.challenge:
                proof = self.key.sign(PONG_DOMAIN, dgram.body.challenge)
                pong = Datagram(dgram.request_id, Pong(None, proof), posing)
                await loop.sock_sendto(self.sock, encode_datagram(pong), frm)
                answered += 1
        return answered


def with_pair(work: Callable[[OverlayNode, OverlayNode], Awaitable[None]]) -> None:
    async def go() -> None:
        a, b = [await started(ip) for ip in free_ips(2)]
        try:
            await work(a, b)
        finally:
            await b.stop()
            await a.stop()

    asyncio.run(go())


def test_joining_nodes_prove_their_keys_and_enter_each_others_tables() -> None:
    with_pair(joining)


async def joining(a: OverlayNode, b: OverlayNode) -> None:
    assert await b.join([a.udp_addr]) >= 1
    assert address_of(b, a.node_id) == a.udp_addr
    await until_async(lambda: address_of(a, b.node_id) == b.udp_addr, "a has b at its address")


def test_a_copied_node_id_does_not_move_the_node_to_the_copiers_address() -> None:
    with_pair(copying)


async def copying(a: OverlayNode, b: OverlayNode) -> None:
    await b.join([a.udp_addr])
    await until_async(lambda: address_of(a, b.node_id) == b.udp_addr, "a has b at its address")
    assert b.contact is not None
    spoofer = Spoofer()
    fake_b = spoofer.posing_as(b.contact)
    # Earn an address token first, so the request is from a proven address.
    first = await spoofer.request(a.udp_addr, Datagram(1, FindNode(os.urandom(32)), padding=600))
    claim = Datagram(2, FindNode(os.urandom(32)), fake_b, first.token, padding=600)
    await spoofer.send(a.udp_addr, claim)
    assert await spoofer.answer_pings(fake_b, 2) == 1  # a challenged the claim (once)...
    rejected = a.metrics.rejected.labels(reason="key_unproven")
    await until_async(lambda: rejected._value.get() >= 1, "...and refused the proof")
    assert address_of(a, b.node_id) == b.udp_addr  # b stays where it proved its key
    assert all(c.endpoint.udp != spoofer.addr for c in a.table.closest(b.node_id, 50))


def test_the_address_a_contact_spoke_from_becomes_its_first_endpoint() -> None:
    key = NodeIdentity.generate(0)[0]
    first, second = Endpoint("10.0.0.1", 1), Endpoint("10.1.0.2", 2)
    contact = Contact(key.node_id, key.public_key, (first, second))
    assert proven_contact(contact, first.udp) is contact
    moved = proven_contact(contact, second.udp)
    assert moved is not None and moved.endpoints == (second, first)
    assert moved.subnet != contact.subnet  # the subnet limit counts the proven address
    assert moved.subnet == Contact(key.node_id, key.public_key, (second,)).subnet
    assert proven_contact(contact, ("10.0.0.3", 3)) is None


def test_a_node_posed_as_by_a_spoofer_is_not_in_a_lookups_result() -> None:
    """On real sockets: a spoofer that a node asks lists another node's ID (its public key
    is no secret) at the spoofer's own address, and answers there under that ID. The
    lookup's result holds the spoofer (it proved its own key) but not the ID it posed as,
    which it cannot prove; before, that ID was found at the spoofer's address."""

    async def go() -> None:
        [ip] = free_ips(1)
        a = await started(ip)
        spoofer = Spoofer()
        itself = Contact(spoofer.key.node_id, spoofer.key.public_key, (Endpoint(*spoofer.addr),))
        victim_key = NodeIdentity.generate(PUZZLE)[0]
        victim = Contact(victim_key.node_id, victim_key.public_key, (Endpoint(ip, 9),))
        posing = spoofer.posing_as(victim)
        a.table.observe(itself, 0.0)  # (as if it had joined: the lookup asks it first)
        try:
            serving = asyncio.ensure_future(spoof(spoofer, itself, posing))
            found = await a.find_node(os.urandom(32))
            serving.cancel()
            assert [c.node_id for c in found] == [itself.node_id]
            rejected = a.metrics.rejected.labels(reason="key_unproven")
            assert rejected._value.get() >= 1  # the proof it gave for the victim's ID
        finally:
            await a.stop()
            spoofer.sock.close()

    asyncio.run(go())


async def spoof(spoofer: Spoofer, itself: Contact, posing: Contact) -> None:
    """Answer find-nodes: the first as itself, listing ``posing``; the next as ``posing``.
    Answer each ping's challenge with a proof by its own key, under the ID pinged."""
    loop = asyncio.get_running_loop()
    asked = 0
    while True:
        data, frm = await loop.sock_recvfrom(spoofer.sock, 2048)
        dgram = decode_datagram(data, puzzle_bits=PUZZLE)
        if isinstance(dgram.body, FindNode):
            asked += 1
            sender, listed = (itself, (posing,)) if asked == 1 else (posing, ())
            answer = Datagram(dgram.request_id, Nodes(listed), sender)
        elif isinstance(dgram.body, Ping):
            proof = spoofer.key.sign(PONG_DOMAIN, dgram.body.challenge)
            # (the first challenge is for itself, the second for the ID it poses as)
            answer = Datagram(dgram.request_id, Pong(None, proof), itself if asked < 2 else posing)
        else:
            continue
        await loop.sock_sendto(spoofer.sock, encode_datagram(answer), frm)
