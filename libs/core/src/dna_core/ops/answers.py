"""Large unary answers: how many a node holds at once, and for how long a client may leave
one unread.

A unary call's answer is in the node's memory from the moment the handler builds it until
the client has read it: grpc keeps what it cannot send yet, and a client that never reads
keeps it there for as long as its connection lives. For a small answer that is nothing;
for a page of a mailbox (2 MiB) asked by a 300-byte request it is an amplification: one
address, with the connection guard's 64 connections of 100 calls each, could make a node
hold 12 GiB (measured: 100 unread calls on one connection, +400 MiB).

So a method whose answer may be large is marked (`large_answer`) and the gate
(`dna_core.ops.grpc_gate`) serves it under `AnswerSlots`. The call takes a slot (at most
``per_source`` held by one address, ``total`` by all) before its handler reads anything,
and writes its answer itself. The slot is given back once grpc is done with the answer:
sent (which happens only as the client reads), or dropped with its connection.

* An answer not sent within ``stall_s`` ends its call and, behind the connection guard,
  its connection: grpc frees an answer it could not send only when the connection ends.
  Without the guard (a load balancer in front) the slot stays taken until then
  (``grpc_max_age_s``).
* A call that finds no slot within ``stall_s`` is refused RESOURCE_EXHAUSTED before its
  handler runs.

Both are counted in ``dna_grpc_answers_refused_total{reason}``.

Such a method is registered server-streaming: a unary call and a server-streaming call that
sends one message are the same bytes on the wire (the client still calls it unary), but
only a streamed write can be awaited until the client takes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from dna_core.errors import CapacityError
from dna_core.rpc_session_server import SharedSlots

__all__ = ["ANSWERS_MAX", "ANSWERS_PER_SOURCE", "ANSWER_STALL_S", "AnswerSlots", "large_answer"]

ANSWERS_MAX = 32  # large answers held at once, node-wide (~5 MiB each for a page)
ANSWERS_PER_SOURCE = 4  # of them, from one address (IPv6: per /64)
ANSWER_STALL_S = 30.0  # how long an answer may wait to be read, or a call for a slot

Ctx = grpc.aio.ServicerContext[Any, Any]
# What grpcio raises when a write meets a call that has ended (ExecuteBatchError is an
# InternalError; UsageError: the call is already finished).
_CALL_ENDED = (grpc.aio.InternalError, grpc.aio.UsageError)
F = TypeVar("F", bound=Callable[..., Any])


def large_answer(method: F) -> F:
    """Mark a unary servicer method whose answer may be large: the gate serves it under
    the node's `AnswerSlots`."""
    method.large_answer = True  # type: ignore[attr-defined]
    return method


def is_large_answer(behaviour: Callable[..., Any]) -> bool:
    return bool(getattr(behaviour, "large_answer", False))


class AnswerSlots:
    """The node's slots for large unary answers (module docstring)."""

    def __init__(
        self,
        *,
        per_source: int = ANSWERS_PER_SOURCE,
        total: int = ANSWERS_MAX,
        stall_s: float = ANSWER_STALL_S,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.slots = SharedSlots(per_source, total)
        self.stall_s = stall_s
        self.refused = Counter(
            "dna_grpc_answers_refused",
            "Unary calls with a large answer refused, no slot free in time (busy), or ended, "
            "the answer left unread (stalled)",
            ["reason"],
            registry=registry,
        )
        Gauge(
            "dna_grpc_answers_held",
            "Large unary answers being built or waiting for their client to read them",
            registry=registry,
        ).set_function(lambda: self.slots.count)

    async def serve(
        self,
        context: Ctx,
        source: str,
        answer: Callable[[], Awaitable[Any]],
        on_stall: Callable[[], object] = lambda: None,
    ) -> None:
        """Build ``answer`` in a slot of ``source``'s and write it, both within the bounds;
        raise `CapacityError` if no slot came free in time. An answer left unread: counted,
        ``on_stall`` (the connection guard drops the connection), and the call ended."""
        await self._take(source)
        try:
            await self._write(context, await answer(), on_stall)
        finally:
            # Once grpc is done with the answer: sent, or dropped with its connection. Not
            # before: an answer grpc could not send cannot be taken back from a call (an
            # abort fails while a write is under way, and a cancelled call's answer stays
            # until its connection ends).
            self.slots.release(source)

    async def _take(self, source: str) -> None:
        if self.slots.take(source):
            return
        try:
            async with asyncio.timeout(self.stall_s):
                await self.slots.acquire(source)
        except TimeoutError:
            self.refused.labels(reason="busy").inc()
            raise CapacityError(
                f"busy: no room for another large answer within {self.stall_s:g} s "
                f"({self.slots.per_source} per address, {self.slots.held.per_site} per IPv6 "
                f"/{self.slots.held.site.prefix_len}, {self.slots.total} in all); retry"
            ) from None

    async def _write(self, context: Ctx, response: Any, on_stall: Callable[[], object]) -> None:
        def stall() -> None:
            self.refused.labels(reason="stalled").inc()
            on_stall()

        # A timer, not a timeout: the write must not be cancelled under grpc (it fails the
        # call), and a write awaited directly costs a task less per call.
        timer = asyncio.get_running_loop().call_later(self.stall_s, stall)
        try:
            await context.write(response)
        except _CALL_ENDED:
            # The call ended under the write: its client went away, or its connection was
            # dropped (this answer's stall, or another's on the same connection). No status
            # can follow; grpc ends a call whose handler is cancelled without one (and
            # without a traceback).
            raise asyncio.CancelledError from None
        finally:
            timer.cancel()
