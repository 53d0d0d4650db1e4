"""gRPC health checking and server reflection for a node's gRPC server.

Health (``grpc.health.v1.Health``) lets load balancers and ``grpc_health_probe`` see readiness
on the gRPC port itself; reflection lets ``grpcurl`` list and call services without the protos.
Every listed service and the whole server (``""``) share one status, because a node is either
taking traffic or draining: there is no per-service readiness today.

Statuses start at NOT_SERVING: a node says SERVING only once it is really ready
(``set_serving(True)`` after start), and says NOT_SERVING first when it stops, before draining.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2  # type: ignore[import-untyped]
from grpc_health.v1._async import HealthServicer  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection, reflection_pb2  # type: ignore[import-untyped]
from grpc_reflection.v1alpha._async import ReflectionServicer  # type: ignore[import-untyped]

from dna_core.ops.grpc_gate import GrpcGate

__all__ = ["HealthController", "add_health_and_reflection"]

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # grpcio's default receive limit
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _NodeHealthServicer(HealthServicer):  # type: ignore[misc]
    """The aio servicer, seeded NOT_SERVING for every name. Its public ``set`` is a coroutine,
    and registration happens before the loop serves, so the seed goes into the status table the
    servicer itself declares (``_server_status``, stable since grpcio 1.32)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        for name in names:
            self._server_status[name] = _NOT_SERVING


class HealthController:
    """Flips every listed service and ``""`` together between SERVING and NOT_SERVING."""

    def __init__(self, servicer: _NodeHealthServicer, names: Sequence[str]) -> None:
        self._servicer = servicer
        self._names = tuple(names)
        self._serving = False

    @property
    def serving(self) -> bool:
        return self._serving

    @property
    def names(self) -> tuple[str, ...]:
        """The health service names this controller answers for (``""`` included)."""
        return self._names

    async def set_serving(self, serving: bool) -> None:
        """Async because the aio servicer wakes ``Watch`` streams under an asyncio lock."""
        status = _SERVING if serving else _NOT_SERVING
        for name in self._names:
            await self._servicer.set(name, status)
        self._serving = serving


def add_health_and_reflection(
    server: grpc.aio.Server, service_full_names: Sequence[str], gate: GrpcGate | None = None
) -> HealthController:
    """Register health and reflection on ``server`` (before ``server.start()``), behind
    ``gate`` like the node's own services (a private one if none is given).

    ``service_full_names`` are the node's own services (``"dna.v1.Mailbox"``); reflection lists
    them plus health and reflection themselves.
    """
    gate = gate if gate is not None else GrpcGate(max_message=DEFAULT_MAX_MESSAGE)
    names = ("", *service_full_names)
    servicer = _NodeHealthServicer(names)
    gate.add(server, servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    reflected = [*service_full_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    gate.add(
        server,
        ReflectionServicer(reflected),
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    return HealthController(servicer, names)
