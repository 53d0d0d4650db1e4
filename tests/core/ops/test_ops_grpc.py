"""gRPC health and reflection on a real grpc.aio server (port 0), queried by real stubs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from dna_core.ops.grpc_ops import HealthController, add_health_and_reflection
from dna_core.wire.gen.dna.v1 import mailbox_pb2, mailbox_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import (  # type: ignore[import-untyped]
    reflection_pb2,
    reflection_pb2_grpc,
)

MAILBOX = mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

Body = Callable[[grpc.aio.Channel, HealthController], Awaitable[None]]


def serve(body: Body) -> None:
    """A grpc.aio server with a real (unimplemented) Mailbox service, health and reflection."""

    async def main() -> None:
        server = grpc.aio.server()
        # The generated base servicer answers UNIMPLEMENTED; the stubs declare it abstract.
        mailbox = mailbox_pb2_grpc.MailboxServicer()  # type: ignore[abstract]
        mailbox_pb2_grpc.add_MailboxServicer_to_server(mailbox, server)
        health = add_health_and_reflection(server, [MAILBOX])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await body(channel, health)
        finally:
            await server.stop(grace=None)

    asyncio.run(main())


async def status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


def test_health_starts_not_serving_then_flips() -> None:
    async def body(channel: grpc.aio.Channel, health: HealthController) -> None:
        assert health.names == ("", MAILBOX)
        assert [await status(channel, name) for name in health.names] == [NOT_SERVING] * 2
        assert not health.serving

        await health.set_serving(True)
        assert [await status(channel, name) for name in health.names] == [SERVING] * 2
        assert health.serving

        await health.set_serving(False)
        assert [await status(channel, name) for name in health.names] == [NOT_SERVING] * 2

    serve(body)


def test_unknown_service_is_not_found() -> None:
    async def body(channel: grpc.aio.Channel, _: HealthController) -> None:
        try:
            await status(channel, "dna.v1.Nope")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("expected NOT_FOUND")

    serve(body)


def test_watch_sees_the_flip() -> None:
    """A load balancer watching the stream learns about the drain without polling."""

    async def body(channel: grpc.aio.Channel, health: HealthController) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        await health.set_serving(True)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=MAILBOX), timeout=5)
        assert (await call.read()).status == SERVING
        await health.set_serving(False)
        assert (await call.read()).status == NOT_SERVING
        call.cancel()

    serve(body)


def test_reflection_lists_the_services() -> None:
    async def body(channel: grpc.aio.Channel, _: HealthController) -> None:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=MAILBOX),
        ]
        responses = [response async for response in stub.ServerReflectionInfo(iter(requests))]
        listed = {s.name for s in responses[0].list_services_response.service}
        assert listed == {
            MAILBOX,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        # The descriptor of our own service is served too, so grpcurl can call it.
        assert responses[1].file_descriptor_response.file_descriptor_proto

    serve(body)
