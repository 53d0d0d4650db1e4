"""GrpcGate on a real grpc.aio server: what escapes a handler never leaves as UNKNOWN, a
flood of one failure is one log line, not one traceback per call, and large answers left
unread hold only their slots."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import grpc
import pytest
from cluster import free_ips
from dna_core.errors import CapacityError, MalformedError
from dna_core.ops.answers import AnswerSlots, large_answer
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.ops.relay import TcpRelay
from dna_core.wire.gen.dna.v1 import common_pb2, overlay_pb2, overlay_pb2_grpc
from prometheus_client import CollectorRegistry
from stream_sessions import StallingProxy
from support import until_async

OVERLAY = overlay_pb2.DESCRIPTOR.services_by_name["Overlay"]


class Broken:
    """Each method fails in its own way."""

    async def Ping(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise ZeroDivisionError("a bug of ours")

    async def FindNode(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise MalformedError("find-node: target is not 32 bytes")

    async def FindValue(self, request: Any, context: Any) -> Any:  # noqa: N802
        raise CapacityError("store full")

    async def Store(self, request: Any, context: Any) -> Any:  # noqa: N802
        return overlay_pb2.StoreResponse(stored_seq=request.record.ByteSize())

    async def Session(self, requests: Any, context: Any) -> Any:  # noqa: N802
        raise NotImplementedError


def test_escaping_exceptions_map_to_our_codes_and_log_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()

    async def main() -> list[tuple[grpc.StatusCode, str]]:
        server = grpc.aio.server()
        gate = GrpcGate(max_message=1 << 20, registry=registry)
        assert gate.add(server, Broken(), OVERLAY) == "dna.v1.Overlay"
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = overlay_pb2_grpc.OverlayStub(channel)
                calls: list[Any] = [stub.Ping(overlay_pb2.OverlayPingRequest()) for _ in range(5)]
                calls += [stub.FindNode(overlay_pb2.OverlayFindNodeRequest())]
                calls += [stub.FindValue(overlay_pb2.FindValueRequest())]
                for call in calls:
                    try:
                        await call
                    except grpc.aio.AioRpcError as err:
                        codes.append((err.code(), err.details() or ""))
                ok = await stub.Store(overlay_pb2.StoreRequest(), timeout=5)
                assert ok.stored_seq == 0  # a well-formed request still reaches the servicer
        finally:
            await server.stop(grace=None)
        return codes

    with caplog.at_level(logging.INFO):
        codes = asyncio.run(main())
    assert codes == [(grpc.StatusCode.INTERNAL, "Ping: internal error")] * 5 + [
        (grpc.StatusCode.INVALID_ARGUMENT, "find-node: target is not 32 bytes"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "store full"),
    ]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].getMessage() == "grpc handler failed"
    internal = registry.get_sample_value(
        "dna_grpc_internal_errors_total", {"method": "/dna.v1.Overlay/Ping"}
    )
    assert internal == 5


class Pages(Broken):
    """FindValue answers ~1 MiB (as a mailbox page does 2 MiB): a large answer."""

    answered = 0

    async def Ping(self, request: Any, context: Any) -> Any:  # noqa: N802
        return overlay_pb2.OverlayPingResponse()

    @large_answer
    async def FindValue(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.answered += 1
        record = common_pb2.SignedRecord(body=os.urandom(1 << 20))
        return overlay_pb2.FindValueResponse(records=[record])


def test_large_answers_left_unread_hold_a_few_slots_and_are_cut() -> None:
    """A client that never reads its answers (behind a proxy that stops reading) has 40
    large-answer calls in flight: the node builds only its address's 2, ends them once
    unread for the stall time, and refuses the calls that found no slot; a small call on the
    same node, and a large one from another address, are answered meanwhile."""
    registry = CollectorRegistry()
    answers = AnswerSlots(per_source=2, total=4, stall_s=2.0, registry=registry)
    pages = Pages()

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 4 << 20)])
        GrpcGate(max_message=1 << 20, registry=registry, answers=answers).add(
            server, pages, OVERLAY
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        options = [("grpc.max_receive_message_length", 4 << 20)]
        try:
            async with StallingProxy(("127.0.0.1", port)) as proxy:
                hostile = grpc.aio.insecure_channel(proxy.address, options=options)
                stub = overlay_pb2_grpc.OverlayStub(hostile)
                await stub.Ping(overlay_pb2.OverlayPingRequest(), timeout=5)  # connected
                proxy.stall()
                calls = [stub.FindValue(overlay_pb2.FindValueRequest()) for _ in range(40)]
                # The address's 2 slots come to hold answers that cannot be sent (and keep
                # them: without a guard to drop the connection, until it ends); the kernels'
                # socket buffers took in a few more, and the rest wait for a slot.
                await until_async(lambda: sample("dna_grpc_answers_held") >= 2, "2 answers held")
                assert sample("dna_grpc_answers_held") == 2
                assert pages.answered < 10
                await other_address_is_answered(port, options)
                # Each stuck answer is cut after 2 s, and a waiter refused after 2 s without
                # a slot: both clocks start about together, so either may be counted first.
                await until_async(
                    lambda: (
                        sample("dna_grpc_answers_refused_total", reason="stalled") >= 2
                        and sample("dna_grpc_answers_refused_total", reason="busy") > 0
                    ),
                    "the 2 stuck answers cut as stalled and a waiter refused as busy",
                    every_s=0.25,
                )
                for call in calls:
                    call.cancel()
                await hostile.close()
            await until_no_answer_held(sample)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


async def other_address_is_answered(port: int, options: list[tuple[str, int]]) -> None:
    """A large answer for another address, through a relay leaving from it."""
    relay = TcpRelay(("127.0.0.1", port), upstream_source=free_ips(1)[0])
    async with relay as via, grpc.aio.insecure_channel(via.address, options=options) as channel:
        stub = overlay_pb2_grpc.OverlayStub(channel)
        answer = await stub.FindValue(overlay_pb2.FindValueRequest(), timeout=5)
    assert len(answer.records[0].body) == 1 << 20


def test_behind_the_guard_an_unread_answer_drops_its_connection_and_every_call_on_it() -> None:
    """Behind the connection guard, the first answer left unread for the stall time drops
    the connection it came in on: its slots come back at once, and the other answers written
    on that connection, not stalled yet, end with it quietly (not as internal errors)."""
    registry = CollectorRegistry()
    answers = AnswerSlots(per_source=2, total=4, stall_s=2.0, registry=registry)

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    async def main() -> list[grpc.StatusCode]:
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 4 << 20)])
        guard = TcpRelay(("127.0.0.1", server.add_insecure_port("127.0.0.1:0")))
        gate = GrpcGate(
            max_message=1 << 20, registry=registry, answers=answers,
            real_peer=guard.grpc_peer, cut_connection=guard.cut,
        )  # fmt: skip
        gate.add(server, Pages(), OVERLAY)
        await server.start()
        options = [("grpc.max_receive_message_length", 4 << 20)]
        try:
            await guard.start()
            async with StallingProxy(("127.0.0.1", guard.port)) as proxy:
                hostile = grpc.aio.insecure_channel(proxy.address, options=options)
                stub = overlay_pb2_grpc.OverlayStub(hostile)
                await stub.Ping(overlay_pb2.OverlayPingRequest(), timeout=5)  # connected
                proxy.stall()
                first = stub.FindValue(overlay_pb2.FindValueRequest())
                await asyncio.sleep(0.5)  # the others' writes start later: not stalled yet
                calls = [first] + [stub.FindValue(overlay_pb2.FindValueRequest()) for _ in range(5)]
                await until_async(
                    lambda: sample("dna_grpc_answers_refused_total", reason="stalled") > 0,
                    "the stuck answer cut",
                )
                await until_no_answer_held(sample)
                for call in calls:
                    call.cancel()
                await hostile.close()
        finally:
            await server.stop(grace=None)
            await guard.close()
        return []

    asyncio.run(main())
    assert sample("dna_grpc_answers_refused_total", reason="stalled") >= 1
    assert sample("dna_grpc_internal_errors_total", method="/dna.v1.Overlay/FindValue") == 0
    assert sample("dna_grpc_answers_held") == 0


async def until_no_answer_held(sample: Any) -> None:
    await until_async(lambda: sample("dna_grpc_answers_held") == 0, "no answer held", every_s=0.1)
