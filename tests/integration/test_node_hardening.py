"""A real `dna-storage-node` process under hostile input on its public ports (issue 10):
malformed gRPC bodies on every method of every service, idle connections on both ports,
and secrets kept out of `/status` and the logs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from cluster import GRPC_PORT, NodeProcess, scrape, wait_ready
from dna_core.wire.gen.dna.v1 import mailbox_pb2, overlay_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection_pb2  # type: ignore[import-untyped]

IP = "127.0.0.71"
SERVICES: list[ServiceDescriptor] = [
    mailbox_pb2.DESCRIPTOR.services_by_name["Mailbox"],
    overlay_pb2.DESCRIPTOR.services_by_name["Overlay"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]
GARBAGE = {
    "not protobuf": b"\xff\xff\xff\xff\xff",
    "truncated": b"\x0a\x05ab",
    "unknown field": b"\xf8\x06\x01",  # field 99, varint 1: parses, but is not canonical
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("hardening")
    proc = NodeProcess("storage", IP, root, [], command="dna-storage-node")
    proc.start()
    try:
        wait_ready([proc])
        yield proc
    finally:
        proc.kill()


async def raw_call(channel: grpc.aio.Channel, method: MethodDescriptor, body: bytes) -> None:
    """Send ``body`` as the request of ``method`` with identity serializers, read the
    answer to the end (raises the AioRpcError)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:

        async def requests() -> AsyncIterator[bytes]:
            yield body

        if method.server_streaming:
            async for _ in channel.stream_stream(path, _same, _same)(requests(), timeout=5):
                pass
        else:
            await channel.stream_unary(path, _same, _same)(requests(), timeout=5)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, _same, _same)(body, timeout=5):
            pass
    else:
        await channel.unary_unary(path, _same, _same)(body, timeout=5)


def _same(data: bytes) -> bytes:
    return data


def log_lines(node: NodeProcess) -> list[str]:
    return node.log_path.read_text(errors="replace").splitlines()


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_malformed_bodies_answer_invalid_argument_without_a_traceback(
    node: NodeProcess, kind: str
) -> None:
    before_log = len(log_lines(node))
    before = malformed_total(node)

    async def send_all() -> list[tuple[str, grpc.StatusCode, str]]:
        answers = []
        async with grpc.aio.insecure_channel(f"{IP}:{GRPC_PORT}") as channel:
            for method in METHODS:
                try:
                    await raw_call(channel, method, GARBAGE[kind])
                except grpc.aio.AioRpcError as err:
                    answers.append((method.full_name, err.code(), err.details() or ""))
                else:
                    answers.append((method.full_name, grpc.StatusCode.OK, ""))
        return answers

    answers = asyncio.run(send_all())
    wrong = [a for a in answers if a[1] != grpc.StatusCode.INVALID_ARGUMENT]
    assert not wrong, wrong
    for name, _, details in answers:
        assert 0 < len(details) < 120 and "Error" not in details, (name, details)
    new_lines = log_lines(node)[before_log:]
    assert not [line for line in new_lines if "Traceback" in line or '"ERROR"' in line]
    assert malformed_total(node) - before >= len(METHODS)


def malformed_total(node: NodeProcess) -> float:
    return sum(s.value for s in scrape(node) if s.name == "dna_grpc_malformed_requests_total")
