"""Overlay record sessions on real processes (3 bootstrap nodes, one of them with a tight
store rate limit): records are put and got over sessions, a refused request is refused on
its own and the session goes on, a malformed frame ends the session with
INVALID_ARGUMENT and stores nothing, a node without sessions is served by the unary
calls, and a node restarted under an open session is reached again over a new one."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from cluster import (
    GRPC_PORT,
    UDP_PORT,
    NodeProcess,
    client_node,
    node_process,
    running,
    sample_value,
    scrape,
    wait_ready,
)
from dna_core.crypto import Identity, sign_record
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.overlay.aio import OverlayNode
from dna_core.overlay.aio.records_rpc import ChannelPool, OverlayService, RecordClient
from dna_core.overlay.aio.records_session import OverlaySession
from dna_core.overlay.aio.server import OVERLAY_DESCRIPTOR
from dna_core.overlay.contact import Contact, Endpoint
from dna_core.overlay.records import RecordStore, identity_payload, record_key
from dna_core.rpc_session import NoSession
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from process_mark import starts_processes
from support import seeded_identity

T = TypeVar("T")
IDENTITY = common_pb2.RECORD_KIND_IDENTITY
BURST = 3  # stores the strict node takes from one source before refusing
STRICT = f"source_rate_per_s = 0.001\nsource_burst = {BURST}.0\n"
SESSION_METHOD = "/dna.v1.Overlay/Session"
OPEN_METRIC = "dna_overlay_session_requests_total"


@pytest.fixture(scope="module")
@starts_processes
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("overlay-sessions")
    seed = node_process("seed", root)
    seeds = [f"{seed.ip}:{UDP_PORT}"]
    other = node_process("other", root, seeds)
    strict = node_process("strict", root, seeds, records_toml=STRICT)
    with running([seed, other, strict]) as started:
        yield started


def target(node: NodeProcess) -> str:
    return f"{node.ip}:{GRPC_PORT}"


def record(who: Identity, display: str = "session test") -> tuple[bytes, bytes]:
    """(key, raw) of a fresh signed identity record of ``who``."""
    now = time.time_ns() // 1_000_000
    key = record_key(IDENTITY, who.fingerprint)
    payload = identity_payload(who.fingerprint, display, now_ms=now)
    raw = sign_record(
        who, kind=IDENTITY, key=key, seq=now, now_ms=now, ttl_ms=3_600_000, payload=payload
    )
    return key, raw


def store_request(raw: bytes) -> overlay_pb2.StoreRequest:
    return overlay_pb2.StoreRequest(record=common_pb2.SignedRecord.FromString(raw))


def session_requests(nodes: list[NodeProcess], op: str, outcome: str = "ok") -> float:
    return sum(sample_value(scrape(n), OPEN_METRIC, op=op, outcome=outcome) for n in nodes)


def with_client(nodes: list[NodeProcess], work: Callable[[OverlayNode], Awaitable[T]]) -> T:
    async def go() -> T:
        client = await client_node([nodes[0].udp])
        try:
            return await work(client)
        finally:
            await client.stop()

    return asyncio.run(go())


async def open_session(client: OverlayNode, node: NodeProcess) -> OverlaySession:
    session = OverlaySession(client.channels.get(target(node)), timeout=5.0)
    await session.open()
    return session


def test_records_are_put_and_got_over_sessions(nodes: list[NodeProcess]) -> None:
    key, raw = record(seeded_identity("session-put-get"))
    stores, finds = session_requests(nodes, "store"), session_requests(nodes, "find_value")

    async def work(client: OverlayNode) -> tuple[int, Any, int]:
        stored = await client.put_record(raw, key)
        found = await client.get_record(key)
        return stored, found, client.records.unary_calls

    stored, found, unary = with_client(nodes, work)
    assert stored >= 2  # the strict node may already have spent its burst on other tests
    assert found is not None and found.raw == raw
    assert unary == 0
    assert session_requests(nodes, "store") - stores >= stored
    assert session_requests(nodes, "find_value") - finds >= 1


def test_a_put_whose_lookup_missed_a_frozen_node_looks_again(nodes: list[NodeProcess]) -> None:
    """A node that stops answering (frozen) is asked by the put's lookup in vain: the
    lookup, short of the record's replicas, is made once more before the record is stored
    on the nodes that answer."""
    key, raw = record(seeded_identity("frozen-lookup"))
    frozen = nodes[1]

    async def work(client: OverlayNode) -> tuple[int, list[int]]:
        await client.find_node(key)  # the client knows all three while they answer
        missed: list[int] = []
        lookup = client.find_closest

        async def counted(target: bytes, **options: Any) -> Any:
            found = await lookup(target, **options)
            missed.append(found.missed)
            return found

        client.find_closest = counted  # type: ignore[method-assign]
        frozen.pause()
        try:
            return await client.put_record(raw, key), missed
        finally:
            frozen.resume()

    stored, missed = with_client(nodes, work)
    assert len(missed) == 2 and missed[0] >= 1  # asked the frozen node, then looked again
    assert 1 <= stored <= 2  # the strict node may have spent its burst on other tests


def test_a_refused_request_is_refused_alone_and_the_session_goes_on(
    nodes: list[NodeProcess],
) -> None:
    seed, strict = nodes[0], nodes[2]
    fresh = [record(Identity.generate()) for _ in range(BURST + 2)]
    key, good = record(seeded_identity("session-refusals"))
    tampered = bytearray(good)
    tampered[-10] ^= 0x01  # inside the signature
    refused_before = session_requests(nodes, "store", "refused")

    async def work(client: OverlayNode) -> None:
        # The strict node: its burst is taken, then each store is refused for the rate.
        session = await open_session(client, strict)
        answers = [await session.exchange({"store": store_request(r)}) for _, r in fresh]
        kinds = [a.WhichOneof("result") for a in answers]
        assert "error" in kinds and kinds[0] == "store", kinds
        limited = answers[kinds.index("error")].error
        assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert limited.retry_after_ms > 0 and "retry after" in limited.reason
        found = await session.exchange({"find_value": overlay_pb2.FindValueRequest(key=key)})
        assert found.WhichOneof("result") == "find_value"  # the session went on
        await session.close()
        # The seed node: a bad signature is refused as the unary call refuses it.
        stub = overlay_pb2_grpc.OverlayStub(client.channels.get(target(seed)))
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Store(store_request(bytes(tampered)))
        session = await open_session(client, seed)
        bad = await session.exchange({"store": store_request(bytes(tampered))})
        assert bad.WhichOneof("result") == "error"
        assert bad.error.code == unary.value.code().value[0]
        assert bad.error.reason == unary.value.details()
        assert (await session.exchange({"store": store_request(good)})).store.stored_seq > 0
        await session.close()

    with_client(nodes, work)
    assert session_requests(nodes, "store", "refused") - refused_before >= 2


def test_a_malformed_frame_ends_the_session_and_stores_nothing(nodes: list[NodeProcess]) -> None:
    seed = nodes[0]
    key, raw = record(seeded_identity("session-malformed"))
    valid = overlay_pb2.OverlaySessionRequest(id=1, store=store_request(raw))
    cuts = sample_value(scrape(seed), "dna_overlay_session_cuts_total", reason="malformed")

    async def work(client: OverlayNode) -> tuple[grpc.StatusCode, str, Any]:
        channel = client.channels.get(target(seed))
        call: Any = channel.stream_stream(
            SESSION_METHOD, request_serializer=None, response_deserializer=None
        )()
        hello = overlay_pb2.OverlaySessionResponse.FromString(await call.read())
        assert hello.hello.window > 0
        # The store's frame with a field no canonical encoder writes: refused whole.
        await call.write(valid.SerializeToString() + b"\xf8\x06\x01")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await call.read() is not grpc.aio.EOF:
                pass
        stub = overlay_pb2_grpc.OverlayStub(channel)
        held = await stub.FindValue(overlay_pb2.FindValueRequest(key=key))
        return ended.value.code(), ended.value.details() or "", held

    code, details, held = with_client(nodes, work)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details  # the gate's reason
    assert not held.records  # the store inside the malformed frame was not applied
    assert sample_value(scrape(seed), "dna_overlay_session_cuts_total", reason="malformed") == (
        cuts + 1
    )


class _NoSessions(OverlayService):
    """An older node: the Overlay service without sessions (UNIMPLEMENTED, via the gate)."""

    async def Session(self, requests: Any, context: Any) -> None:  # type: ignore[override]  # noqa: N802
        raise NotImplementedError


def test_a_node_without_sessions_is_served_by_the_unary_calls() -> None:
    key, raw = record(seeded_identity("session-old-node"))

    async def go() -> None:
        store = RecordStore()
        service = _NoSessions(store=store, closest=lambda key, k: [], local=_unused)
        server = grpc.aio.server()
        GrpcGate(max_message=4 << 20).add(server, service, OVERLAY_DESCRIPTOR)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        old = Contact(os.urandom(32), b"", (Endpoint("127.0.0.1", port, port),))
        client = RecordClient(ChannelPool(), puzzle_bits=4)
        try:
            assert await client.store(raw, [old]) == 1
            found = await client.find_value(key, [old])
            assert found is not None and found.raw == raw
            assert client.unary_calls == 2
            assert client.sessions is not None
            with pytest.raises(NoSession):  # remembered: not asked again for a while
                await client.sessions.get(old.endpoint.grpc_target)
            assert len(store) == 1
        finally:
            await client.close()
            await client.pool.close()
            await server.stop(None)

    asyncio.run(go())


def _unused() -> Contact:
    raise AssertionError("not asked")


def test_a_node_restarted_under_a_session_is_reached_over_a_new_one(
    nodes: list[NodeProcess],
) -> None:
    other = nodes[1]
    before, after = record(seeded_identity("restart-1")), record(seeded_identity("restart-2"))

    async def work(client: OverlayNode) -> None:
        contact = next(c for c in client.table.closest(before[0], 20) if c.endpoint.ip == other.ip)
        assert await client.records.store(before[1], [contact]) == 1
        assert client.records.sessions is not None
        session = await client.records.sessions.get(target(other))
        other.kill()
        other.start()
        await asyncio.to_thread(wait_ready, [other])
        # The same client, its session to the old process gone: a new one, no unary call.
        assert await client.records.store(after[1], [contact]) == 1
        assert session.closed is not None
        assert client.records.unary_calls == 0
        found = await client.records.find_value(before[0], [contact])
        assert found is not None and found.raw == before[1]  # kept in its record file

    with_client(nodes, work)
    assert sample_value(scrape(other), OPEN_METRIC, op="store", outcome="ok") >= 1
