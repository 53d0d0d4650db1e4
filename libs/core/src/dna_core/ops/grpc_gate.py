"""The gRPC edge of a node: every request body goes through the strict decoding gate.

grpcio's generated registration (``add_XServicer_to_server``) parses requests with the lenient
``FromString`` before our code runs, so a malformed body answered UNKNOWN with a Python
exception name and logged a traceback per call. ``GrpcGate.add`` registers a servicer instead:
handlers receive raw bytes (identity deserializer), which ``wire.codec.decode_message`` turns
into the request (size cap, canonical form) or refuses with INVALID_ARGUMENT and a short
reason, counted in ``dna_grpc_malformed_requests_total`` and never logged.

It also owns what escapes a handler, so no exception of ours leaves as UNKNOWN: a
``ProtocolError`` answers its own wire code, a ``CapacityError`` RESOURCE_EXHAUSTED, and
anything else INTERNAL, counted in ``dna_grpc_internal_errors_total`` and logged with its
traceback at most once per ``LOG_EVERY_S`` per method (a flood of one bug is one line a minute).

Behind the connection guard (``dna_core.ops.relay``) grpc sees every client at the guard's
loopback address; ``real_peer`` maps that back, and handlers get a context whose ``peer()``
is the client's, so every rate limit and log by source needs nothing of its own.

A method marked `large_answer` (a page of a mailbox, a record) is served under the node's
``AnswerSlots`` (``dna_core.ops.answers``): bounded in number, per source and in all, and
cut when its client leaves the answer unread.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from prometheus_client import CollectorRegistry, Counter

from dna_core.errors import MalformedError, ProtocolError
from dna_core.ops.answers import AnswerSlots, is_large_answer
from dna_core.ops.logs import Log, LogThrottle
from dna_core.ratelimit import grpc_peer_ip, source_key
from dna_core.wire.codec import decode_message

__all__ = ["GrpcGate", "ServiceRegistrar"]

Ctx = grpc.aio.ServicerContext[Any, Any]
# Raised by context.abort (the status is already set) and by cancellation: pass through.
_PASS_THROUGH = (grpc.aio.AbortError,)
LOG_EVERY_S = 60.0  # at most one traceback per method per minute
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
ServiceRegistrar = Callable[[object, ServiceDescriptor], str]


class GrpcGate:
    """Registers servicers on a grpc.aio server behind strict decoding and one error mapping.

    ``max_message`` is the decode cap (the server's receive limit). Metrics go into
    ``registry`` (the node's own), so nodes sharing a process never share a series.
    ``answers``: the slots large answers are served under (defaults if not given);
    ``cut_connection(peer)``: drop the connection a call came in on (the connection
    guard's), for a client that leaves a large answer unread.
    """

    def __init__(
        self,
        *,
        max_message: int,
        registry: CollectorRegistry | None = None,
        log: Log | None = None,
        clock: Callable[[], float] = time.monotonic,
        real_peer: Callable[[str], str] | None = None,
        answers: AnswerSlots | None = None,
        cut_connection: Callable[[str], object] | None = None,
    ) -> None:
        self.max_message = max_message
        self.answers = answers if answers is not None else AnswerSlots(registry=registry)
        self._cut_connection = cut_connection
        self._real_peer = real_peer
        self._log = log if log is not None else logging.getLogger(__name__)
        self._log_throttle = LogThrottle(LOG_EVERY_S, clock)
        self.malformed = Counter(
            "dna_grpc_malformed_requests",
            "gRPC requests refused at decoding (INVALID_ARGUMENT), by method",
            ["method"],
            registry=registry,
        )
        self.internal = Counter(
            "dna_grpc_internal_errors",
            "gRPC calls that failed with an unexpected exception (INTERNAL), by method",
            ["method"],
            registry=registry,
        )

    def add(self, server: grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> str:
        """Serve ``service``'s methods from ``servicer``'s coroutines of the same names;
        returns the service's full name (for health and reflection)."""
        handlers = {m.name: self._handler(servicer, m) for m in service.methods}
        generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
        server.add_generic_rpc_handlers((generic,))
        return service.full_name

    def registrar(self, server: grpc.aio.Server) -> ServiceRegistrar:
        """``add`` bound to ``server``, for code that only registers services."""
        return lambda servicer, service: self.add(server, servicer, service)

    # -- handlers ----------------------------------------------------------------------

    def _handler(self, servicer: object, method: MethodDescriptor) -> Handler:
        behaviour = getattr(servicer, method.name)
        cls: type[Message] = GetMessageClass(method.input_type)
        name = f"/{method.containing_service.full_name}/{method.name}"

        async def decode_one(raw: bytes, context: Ctx) -> Any:
            return await self.decode(context, cls, raw, name)

        async def decode_each(raw: AsyncIterator[bytes], context: Ctx) -> AsyncIterator[Any]:
            # A frame that does not decode raises MalformedError (counted) to the handler,
            # not an abort: a handler reading its stream in a task of its own must end the
            # call itself (grpc fails an abort from another task); one that lets it escape
            # gets INVALID_ARGUMENT from `fail`, as an abort would have answered.
            async def each() -> AsyncIterator[Any]:
                async for item in raw:
                    yield self.decode_or_raise(cls, item, name)

            return each()

        prepare = decode_each if method.client_streaming else decode_one
        unary = not (method.client_streaming or method.server_streaming)
        if unary and is_large_answer(behaviour):
            # Written by the gate: a one-message stream is a unary answer's bytes on the wire.
            written = self._guard(self._written(behaviour), prepare, name)
            return grpc.unary_stream_rpc_method_handler(written, response_serializer=_serialize)
        guarded = self._guard(behaviour, prepare, name)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        return make(guarded, response_serializer=_serialize)

    def _written(self, behaviour: Callable[..., Any]) -> Callable[[Any, Ctx], Awaitable[None]]:
        """``behaviour``'s answer built and written under the node's `AnswerSlots`."""

        async def write(request: Any, context: Ctx) -> None:
            source = source_key(grpc_peer_ip(context.peer() or ""))
            await self.answers.serve(
                context, source, lambda: behaviour(request, context), lambda: self._cut(context)
            )

        return write

    def _guard(
        self,
        behaviour: Callable[..., Any],
        prepare: Callable[[Any, Ctx], Awaitable[Any]],
        name: str,
    ) -> Callable[[Any, Ctx], Any]:
        """``behaviour`` behind decoding and the error mapping, in its own shape: an async
        generator stays one (streamed responses); a coroutine returns its response or
        writes the stream itself (``context.write``, as the health servicer's Watch does)."""
        if inspect.isasyncgenfunction(behaviour):

            async def stream(raw: Any, context: Ctx) -> AsyncIterator[Any]:
                context = self._with_real_peer(context)
                request = await prepare(raw, context)
                try:
                    async for response in behaviour(request, context):
                        yield response
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await self.fail(context, name, exc)

            return stream

        async def call(raw: Any, context: Ctx) -> Any:
            context = self._with_real_peer(context)
            request = await prepare(raw, context)
            try:
                return await behaviour(request, context)
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                await self.fail(context, name, exc)

        return call

    def _cut(self, context: Ctx) -> None:
        if self._cut_connection is not None:
            relayed = context if isinstance(context, _RelayedContext) else None
            self._cut_connection(relayed.relayed_peer() if relayed else context.peer())

    def _with_real_peer(self, context: Ctx) -> Ctx:
        """``context``, or one whose ``peer()`` is the client a relay carried the call for."""
        if self._real_peer is None:
            return context
        peer = context.peer()
        real = self._real_peer(peer)
        return context if real == peer else cast(Ctx, _RelayedContext(context, real))

    async def decode(self, context: Ctx, cls: type[Message], raw: bytes, name: str) -> Any:
        """The request, or abort INVALID_ARGUMENT with the gate's reason (counted)."""
        try:
            return self.decode_or_raise(cls, raw, name)
        except MalformedError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.reason)
            raise AssertionError("abort returned") from None  # grpc's abort always raises

    def decode_or_raise(self, cls: type[Message], raw: bytes, name: str) -> Any:
        """The request, or `MalformedError` with the gate's reason (counted)."""
        try:
            return decode_message(cls, raw, max_size=self.max_message, what=_short(name))
        except MalformedError:
            self.malformed.labels(method=name).inc()
            raise

    async def fail(self, context: Ctx, name: str, exc: Exception) -> None:
        """Answer an exception that escaped a handler with a status of ours, never UNKNOWN."""
        if isinstance(exc, ProtocolError):
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.reason)
        if isinstance(exc, NotImplementedError):  # the generated base servicer's methods
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{_short(name)}: not served here")
        self.internal.labels(method=name).inc()
        self._log_rate_limited(name, exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"{_short(name)}: internal error")

    def _log_rate_limited(self, name: str, exc: Exception) -> None:
        suppressed = self._log_throttle.admit(name)
        if suppressed is None:
            return
        self._log.error(
            "grpc handler failed",
            exc_info=exc,
            extra={"method": name, "error": type(exc).__name__, "suppressed": suppressed},
        )


class _RelayedContext:
    """A call's context with the client's peer in place of the relay's; the rest is the
    call's own context."""

    __slots__ = ("_context", "_peer")

    def __init__(self, context: Ctx, peer: str) -> None:
        self._context, self._peer = context, peer

    def peer(self) -> str:
        return self._peer

    def relayed_peer(self) -> str:
        """The call's peer as grpc sees it: the relay's end of the connection."""
        return self._context.peer()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _short(name: str) -> str:
    """``/dna.v1.Mailbox/Put`` -> ``Put``: what a refusal's reason starts with."""
    return name.rpartition("/")[2]
