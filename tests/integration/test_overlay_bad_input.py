"""Garbage against a live node's UDP and gRPC ports: refused, counted, nothing changes."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster import GRPC_PORT, NodeProcess, free_ips, wait_ready
from dna_core.crypto import sign_record
from dna_core.crypto.node import NodeIdentity
from dna_core.overlay.aio import NodeConfig, OverlayNode
from dna_core.overlay.codec import Datagram, FindNode, Nodes, decode_datagram, encode_datagram
from dna_core.overlay.records import identity_payload, record_key
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from process_mark import starts_processes
from support import SETTLE_S, seeded_identity, until

IP = free_ips(1)[0]


@pytest.fixture(scope="module")
@starts_processes
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    proc = NodeProcess("target", IP, tmp_path_factory.mktemp("bad"), [])
    proc.start()
    try:
        wait_ready([proc])
        yield proc
    finally:
        proc.kill()


def _metric(node: NodeProcess, name: str, label: str) -> float:
    total = 0.0
    for line in node.http("/metrics").text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def rejected(node: NodeProcess, reason: str) -> float:
    """Datagrams the node rejected for ``reason`` (a label prefix), so far. Counted as the
    node reads them: a loaded node may still be reading after the test's 0.3 s of quiet."""
    return _metric(node, "dna_overlay_rejected_total", reason)


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.3)
    return sock


def _answered_by_ping(node: NodeProcess) -> bool:
    async def ping() -> bool:
        client = OverlayNode(
            NodeIdentity.generate(0)[0],
            NodeConfig(host="127.0.0.1", client_mode=True, puzzle_bits=4),
        )
        await client.start()
        try:
            return await client.ping(node.udp, timeout=2.0) is not None
        finally:
            await client.stop()

    return asyncio.run(ping())


def test_garbage_datagrams_are_refused_and_never_answered(node: NodeProcess) -> None:
    before = rejected(node, "datagram_")
    rng = random.Random(11)
    valid = encode_datagram(Datagram(rng.getrandbits(64), FindNode(os.urandom(32)), padding=400))
    sock = _udp()
    sent = 0
    for i in range(500):
        if i % 2:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 1500)))
        else:
            mutated = bytearray(valid)
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            data = bytes(mutated)
        sock.sendto(data, node.udp)
        sent += 1
    answers = 0
    with pytest.raises(TimeoutError):
        while True:
            sock.recvfrom(2048)
            answers += 1
    # A flipped padding or body byte can still decode; nothing else may be answered.
    assert answers < sent // 4
    until(lambda: rejected(node, "datagram_") - before >= sent // 2, "the datagrams refused")
    assert _answered_by_ping(node)
    assert node.is_ready()


def test_unproven_address_gets_no_amplification(node: NodeProcess) -> None:
    sock = _udp()
    request = encode_datagram(Datagram(42, FindNode(os.urandom(32))))  # no token, no padding
    sock.sendto(request, node.udp)
    reply, _ = sock.recvfrom(2048)
    assert len(reply) <= 3 * len(request)  # RFC 9000 §8.1's factor, whatever the body
    assert decode_datagram(reply, puzzle_bits=4).request_id == 42


def test_unsolicited_responses_are_dropped(node: NodeProcess) -> None:
    before = rejected(node, "unsolicited")
    sock = _udp()
    for i in range(20):
        sock.sendto(encode_datagram(Datagram(i, Nodes(()))), node.udp)
    with pytest.raises(TimeoutError):
        sock.recvfrom(2048)
    until(lambda: rejected(node, "unsolicited") - before >= 20, "the 20 dropped")
    assert rejected(node, "unsolicited") - before == 20


def test_bad_records_over_grpc_get_clear_statuses(node: NodeProcess, tmp_path: Path) -> None:
    who = seeded_identity("bad-input")
    kind = common_pb2.RECORD_KIND_IDENTITY
    good = sign_record(
        who, kind=kind, key=record_key(kind, who.fingerprint), seq=1, now_ms=_now_ms(),
        ttl_ms=60_000, payload=identity_payload(who.fingerprint, "", now_ms=_now_ms()),
    )  # fmt: skip
    forged = common_pb2.SignedRecord.FromString(good)
    forged.signature = bytes(3373)
    wrong_key = sign_record(
        who, kind=kind, key=b"\1" * 32, seq=1, now_ms=_now_ms(), ttl_ms=60_000, payload=b""
    )

    async def calls() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"{IP}:{GRPC_PORT}") as channel:
            stub = overlay_pb2_grpc.OverlayStub(channel)
            codes = []
            for req in (
                overlay_pb2.StoreRequest(record=forged),
                overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(wrong_key)),
                overlay_pb2.StoreRequest(record=common_pb2.SignedRecord(body=b"\xff\xff")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Store(req, timeout=SETTLE_S)
                assert err.value.details()
                codes.append(err.value.code())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.FindValue(overlay_pb2.FindValueRequest(key=b"short"), timeout=SETTLE_S)
            codes.append(err.value.code())
            raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/dna.v1.Overlay/Store"
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\xff\xff\xff garbage", timeout=SETTLE_S)
            codes.append(err.value.code())
            stored = await stub.Store(
                overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(good)),
                timeout=SETTLE_S,
            )
            assert stored.stored_seq == 1
            return codes

    codes = asyncio.run(calls())
    assert codes[:4] == [
        grpc.StatusCode.PERMISSION_DENIED,  # forged signature
        grpc.StatusCode.PERMISSION_DENIED,  # stored under a key the signer does not own
        grpc.StatusCode.INVALID_ARGUMENT,  # body does not decode
        grpc.StatusCode.INVALID_ARGUMENT,  # key is not 32 bytes
    ]
    assert codes[4] != grpc.StatusCode.OK  # undecodable request: refused by gRPC itself
    assert node.status()["records"] == 1  # only the good record was kept
    assert node.is_ready()
