"""gRPC failures as the project's errors, mapped here once for every client.

The clients (`dna_core.mailbox.client`, the overlay's `RecordClient`) await each
gRPC call through `call`, so a failed call is a `RemoteError` (`errors.py`) and
nothing above them catches, or even imports, grpc: `UnavailableError` when the
node did not answer or could not serve now, `RefusedError` when it answered no.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
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
    """The project's error for a failed gRPC call (with the node's retry-after, if any)."""
    code, details = err.code(), err.details() or ""
    if code in UNAVAILABLE_CODES:
        return UnavailableError(code.name, details, retry_after_ms(err.trailing_metadata()))
    return RefusedError(code.name, details)


def retry_after_ms(metadata: Iterable[tuple[str, str | bytes]] | None) -> int:
    """The ``retry-after-ms`` trailer a rate-limited call carries, or 0 (none, or not a
    positive whole number of at most 18 digits: a malformed hint is no hint)."""
    for key, value in metadata or ():
        if key == "retry-after-ms":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            # isdigit alone takes '²' and other digits int() refuses; past 4,300 digits
            # int() raises (ValueError), and no wait needs more than 18 (10^18 ms: 30 million years)
            well_formed = text.isascii() and text.isdigit() and len(text) <= 18
            return int(text) if well_formed else 0
    return 0


async def call(rpc: Awaitable[T]) -> T:
    """Await one gRPC call; its failure is raised as a `RemoteError`."""
    try:
        return await rpc
    except grpc.aio.AioRpcError as err:
        raise remote_error(err) from err
