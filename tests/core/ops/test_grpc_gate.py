"""GrpcGate on a real grpc.aio server: what escapes a handler never leaves as UNKNOWN, and a
flood of one failure is one log line, not one traceback per call."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from dna_core.errors import CapacityError, MalformedError
from dna_core.ops.grpc_gate import GrpcGate
from dna_core.wire.gen.dna.v1 import overlay_pb2, overlay_pb2_grpc
from prometheus_client import CollectorRegistry

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
