"""A name claim a node took first cannot outvote the name's owner by its sequence number.

Whole overlay nodes (`OverlayServer`: UDP, gRPC, record file) on 127.0.0.1 in this process
and a peer's client node (`join_overlay`), none of them modified. Mallory signs a claim of a
name with her own keys and a sequence number no honest claim reaches (2^63: the field is
hers to choose, in the signed body) and stores it on the one node closest to the name
before Alice claims it: that node takes it as a first claim and refuses Alice's (first
come, first served), the others take Alice's. A node that never held Alice's claim does
the same later (a newcomer store-on-join missed, or one Mallory runs herself). Until
2026-12-05 a reader asking that node picked the highest sequence number among the
answers, so one node resolved the name to Mallory for everyone whose get asked it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dna_core.crypto import Identity, sign_record
from dna_core.crypto import pow as pow_
from dna_core.ops.config import OpsSection
from dna_core.overlay import name_key, name_pow_hash, normalize_name
from dna_core.overlay.aio.node import OverlayNode
from dna_core.overlay.aio.server import (
    NodeSection,
    OverlaySection,
    OverlayServer,
    OverlayServiceConfig,
    RecordsSection,
)
from dna_core.overlay.contact import Contact
from dna_core.wire.gen.dna.v1 import common_pb2, records_pb2
from dna_peer import keyserver
from dna_peer.network import join_overlay
from support import seeded_identity

ALICE, MALLORY = seeded_identity("claim-alice"), seeded_identity("claim-mallory")
NODES = 4
BOOTSTRAP = common_pb2.NODE_ROLE_BOOTSTRAP
UNREACHABLE_SEQ = 2**63


def config(root: Path, seeds: tuple[str, ...]) -> OverlayServiceConfig:
    root.mkdir(parents=True, exist_ok=True)
    return OverlayServiceConfig(
        node=NodeSection(udp_port=0, grpc_port=0, key_file=root / "node.key", puzzle_bits=4),
        overlay=OverlaySection(allow_loopback=True, bootstrap=seeds),
        records=RecordsSection(path=root / "records.sqlite3", identity_pow_bits=0),
        ops=OpsSection(http_port=0),
    )


def node(server: OverlayServer) -> OverlayNode:
    assert server.node is not None
    return server.node


@contextlib.asynccontextmanager
async def network(root: Path) -> AsyncIterator[list[OverlayServer]]:
    servers: list[OverlayServer] = []
    try:
        for i in range(NODES):
            seeds = (f"127.0.0.1:{node(servers[0]).udp_addr[1]}",) if servers else ()
            servers.append(OverlayServer(config(root / f"n{i}", seeds), role=BOOTSTRAP))
            await servers[-1].start()
        deadline = time.monotonic() + 20
        while not all(s.ready for s in servers):
            assert time.monotonic() < deadline, "the nodes did not join"
            await asyncio.sleep(0.05)
        yield servers
    finally:
        for server in servers:
            await server.stop()


def claim(who: Identity, name: str, seq: int) -> bytes:
    """``who``'s claim of ``name`` with its proof of work, numbered ``seq``."""
    norm, now = normalize_name(name), time.time_ns() // 1_000_000
    proof, _ = pow_.solve(name_pow_hash(norm, who.fingerprint), keyserver.NAME_POW_BITS, now_ms=now)
    payload = records_pb2.NameClaim(name=norm, fingerprint=who.fingerprint, pow=proof.to_proto())
    return sign_record(
        who, kind=common_pb2.RECORD_KIND_NAME_CLAIM, key=name_key(norm), seq=seq, now_ms=now,
        ttl_ms=keyserver.RECORD_TTL_MS, payload=payload.SerializeToString(),
    )  # fmt: skip


async def known_closest(reader: OverlayNode, key: bytes, servers: list[OverlayServer]) -> Contact:
    """The server closest to ``key``, as the reader's table knows it (all of them, first)."""
    ids = {node(s).node_id for s in servers}
    deadline = time.monotonic() + 10
    while {c.node_id for c in reader.table.closest(key, 20)} != ids:
        assert time.monotonic() < deadline, "the reader does not know every node"
        await reader.refresh(0)
        await asyncio.sleep(0.05)
    return reader.table.closest(key, 1)[0]


def test_a_claim_one_node_took_first_does_not_outvote_the_names_holders(tmp_path: Path) -> None:
    async def main() -> None:
        async with network(tmp_path) as servers:
            reader = await join_overlay([("127.0.0.1", node(servers[0]).udp_addr[1])])
            try:
                name = "victim"
                first = await known_closest(reader, name_key(name), servers)
                assert reader.first_asked(name_key(name))[0] == first  # a get asks it
                taken = await reader.records.store(claim(MALLORY, name, UNREACHABLE_SEQ), [first])
                assert taken == 1
                assert await keyserver.claim_name(reader, ALICE, name) == NODES - 1
                assert await keyserver.lookup_name(reader, name) == ALICE.fingerprint
            finally:
                await reader.stop()

    asyncio.run(main())


def closest_two(
    reader: OverlayNode, name: str, servers: list[OverlayServer]
) -> list[OverlayServer]:
    """The servers a get of ``name`` asks first (`first_asked`), closest first."""
    by_id = {node(s).node_id: s for s in servers}
    return [by_id[c.node_id] for c in reader.first_asked(name_key(name))]


def test_a_tie_between_an_owner_and_a_squatter_resolves_to_neither(tmp_path: Path) -> None:
    """Mallory's claim (2^63) held first by 2 of the 4 nodes, the closest among them, Alice's
    by the other 2: the fast holders answer one each, and so do the lookup's. A tie
    between signers is never settled by seq: the name lookup refuses to resolve it. Fails
    without it (checked: resolved to Mallory, the higher seq)."""

    async def main() -> None:
        async with network(tmp_path) as servers:
            reader = await join_overlay([("127.0.0.1", node(servers[0]).udp_addr[1])])
            try:
                name = "victim"
                first = await known_closest(reader, name_key(name), servers)
                squatted = [first, reader.table.closest(name_key(name), 3)[2]]
                squat = claim(MALLORY, name, UNREACHABLE_SEQ)
                assert await reader.records.store(squat, squatted) == 2
                assert await keyserver.claim_name(reader, ALICE, name) == NODES - 2
                with pytest.raises(keyserver.NameContestedError, match="victim"):
                    await keyserver.lookup_name(reader, name)
            finally:
                await reader.stop()

    asyncio.run(main())


def test_a_squatters_lone_fast_answer_is_not_believed(tmp_path: Path) -> None:
    """Mallory's claim held first by the closest node, Alice's by the 3 others, and the
    second fast holder (honest) down: Mallory's is the only answer of the 2 fast holders
    asked. A name believed from fewer fast holders than were asked goes on to the lookup,
    whose holders answer Alice's. Fails without it (checked: resolved to Mallory)."""

    async def main() -> None:
        async with network(tmp_path) as servers:
            reader = await join_overlay([("127.0.0.1", node(servers[0]).udp_addr[1])])
            try:
                name = "victim"
                first = await known_closest(reader, name_key(name), servers)
                taken = await reader.records.store(claim(MALLORY, name, UNREACHABLE_SEQ), [first])
                assert taken == 1
                assert await keyserver.claim_name(reader, ALICE, name) == NODES - 1
                squatter, honest = closest_two(reader, name, servers)
                assert node(squatter).node_id == first.node_id
                servers.remove(honest)  # stopped here, not again by `network`
                await honest.stop()
                assert await keyserver.lookup_name(reader, name) == ALICE.fingerprint
            finally:
                await reader.stop()

    asyncio.run(main())
