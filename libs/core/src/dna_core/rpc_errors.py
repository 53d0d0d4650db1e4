"""gRPC failures as the project's errors, mapped here once for every client.

The clients (`dna_core.mailbox.client`, the overlay's `RecordClient`) await each
gRPC call through `call`, so a failed call is a `RemoteError` (`errors.py`) and
nothing above them catches, or even imports, grpc: `UnavailableError` when the
node did not answer or could not serve now, `RefusedError` when it answered no.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from dna_core.errors import RefusedError, RemoteError, UnavailableError

T = TypeVar("T")

# Statuses that say "not now" rather than "no": a retry, or another node, may succeed.
UNAVAILABLE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
})  # fmt: skip


def remote_error(err: grpc.aio.AioRpcError) -> RemoteError:
    """The project's error for a failed gRPC call."""
    code, details = err.code(), err.details() or ""
    if code in UNAVAILABLE_CODES:
        return UnavailableError(code.name, details)
    return RefusedError(code.name, details)


async def call(rpc: Awaitable[T]) -> T:
    """Await one gRPC call; its failure is raised as a `RemoteError`."""
    try:
        return await rpc
    except grpc.aio.AioRpcError as err:
        raise remote_error(err) from err
