"""gRPC failures reach the code above the clients as the project's errors (issue 12 item 3):
"not now" statuses as UnavailableError, the others as RefusedError, with the status name and
the node's words; on a real grpc.aio server and a port nobody listens on."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest
from dna_core.errors import DnaError, RefusedError, RemoteError, UnavailableError
from dna_core.rpc_errors import UNAVAILABLE_CODES, call, remote_error
from dna_core.rpc_session import status_error
from dna_core.wire.gen.dna.v1 import mailbox_pb2, overlay_pb2, overlay_pb2_grpc

PING = overlay_pb2.OverlayPingRequest()


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_maps_to_one_project_error(code: grpc.StatusCode) -> None:
    err = remote_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "why"))
    expected = UnavailableError if code in UNAVAILABLE_CODES else RefusedError
    assert type(err) is expected and isinstance(err, DnaError)
    assert (err.grpc_code, err.details, str(err)) == (code.name, "why", f"{code.name}: why")


class Refusing(overlay_pb2_grpc.OverlayServicer):
    async def Ping(  # noqa: N802 (gRPC method name)
        self, request: overlay_pb2.OverlayPingRequest, context: Any
    ) -> overlay_pb2.OverlayPingResponse:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not you")
        raise AssertionError("abort returns only by raising")


def ping_refused_by(servicer: overlay_pb2_grpc.OverlayServicer) -> RemoteError:
    """What `call` raises for a Ping that a real server running ``servicer`` refuses."""

    async def main() -> RemoteError:
        server = grpc.aio.server()
        overlay_pb2_grpc.add_OverlayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(RemoteError) as raised:
                    await call(overlay_pb2_grpc.OverlayStub(channel).Ping(PING, timeout=5))
                return raised.value
        finally:
            await server.stop(grace=None)

    return asyncio.run(main())


def test_a_refusal_from_a_real_server_is_a_refused_error() -> None:
    # The generated base answers the other methods UNIMPLEMENTED; the stubs call it abstract.
    err = ping_refused_by(Refusing())  # type: ignore[abstract]
    assert isinstance(err, RefusedError)
    assert (err.grpc_code, err.details) == ("PERMISSION_DENIED", "not you")


def test_a_node_that_is_not_there_is_unavailable() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def main() -> RemoteError:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(RemoteError) as raised:
                await call(overlay_pb2_grpc.OverlayStub(channel).Ping(PING, timeout=5))
            return raised.value

    err = asyncio.run(main())
    assert isinstance(err, UnavailableError) and err.grpc_code == "UNAVAILABLE"


def test_an_answer_passes_through() -> None:
    async def answer() -> int:
        return 7

    assert asyncio.run(call(answer())) == 7


class RateLimiting(overlay_pb2_grpc.OverlayServicer):
    async def Ping(  # noqa: N802 (gRPC method name)
        self, request: overlay_pb2.OverlayPingRequest, context: Any
    ) -> overlay_pb2.OverlayPingResponse:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "over rate", (("retry-after-ms", "250"),)
        )
        raise AssertionError("abort returns only by raising")


def test_a_rate_refusal_from_a_real_server_carries_its_retry_after() -> None:
    err = ping_refused_by(RateLimiting())  # type: ignore[abstract]
    assert isinstance(err, UnavailableError)
    assert (err.grpc_code, err.retry_after_ms) == ("RESOURCE_EXHAUSTED", 250)


@pytest.mark.parametrize(
    ("trailers", "expected"),
    [((), 0), ((("retry-after-ms", "40"),), 40), ((("retry-after-ms", "soon"),), 0),
     ((("retry-after-ms", "-5"),), 0), ((("other", "1"),), 0),
     ((("retry-after-ms", "²"),), 0), ((("retry-after-ms", "١٢"),), 0),
     # a hostile node's 5,000 digits: Python's int() refuses them (ValueError), which
     # escaped the mapping of the node's error
     ((("retry-after-ms", "9" * 5000),), 0), ((("retry-after-ms", "1" * 19),), 0)],
)  # fmt: skip
def test_a_retry_after_is_a_positive_whole_number_or_none(
    trailers: tuple[tuple[str, str], ...], expected: int
) -> None:
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    metadata = grpc.aio.Metadata(*trailers)
    err = remote_error(grpc.aio.AioRpcError(exhausted, grpc.aio.Metadata(), metadata, "busy"))
    assert err.retry_after_ms == expected


def test_a_session_refusal_carries_its_retry_after_as_the_unary_one() -> None:
    busy = status_error(mailbox_pb2.RequestStatus(code=8, reason="over", retry_after_ms=75))
    assert isinstance(busy, UnavailableError) and busy.retry_after_ms == 75
    denied = status_error(mailbox_pb2.RequestStatus(code=7, reason="no"))
    assert isinstance(denied, RefusedError) and denied.retry_after_ms == 0
