"""Overlay record sessions: one long-lived bidirectional gRPC stream per client and node
carrying many stores and find-values (docs/protocol.md, "Stream sessions"). The client's
session is `OverlaySession` (its transport: `dna_core.rpc_session`); the rest is the
server's.

Each request carries the client's ID and is judged by the same code as the unary call of
the same name (``OverlayService.store_one``, ``find_value_one``: the rate limit per source,
the record checks, the journal, the rejection metrics); a refusal is that request's
``OverlayRequestStatus`` with the unary call's code and reason, and the session goes on.

Both operations are served as they are read, in order (neither waits on I/O: a unary call
runs the same code on the event loop too), so what a session holds is the responses the
client has not read yet. The session is cut, with a status saying why and counted by
reason, when the client breaks its rules: more than ``window`` requests unanswered
(RESOURCE_EXHAUSTED), an ID still in use (INVALID_ARGUMENT), a frame that does not decode
(the gRPC gate's INVALID_ARGUMENT: nothing in it is applied), or responses left unread for
``stall_s`` (RESOURCE_EXHAUSTED). So a session holds at most ``window`` responses.

This is a smaller copy of the mailbox's session loop (``dna_storage.mailbox_stream``:
the window, the writer with its stall cut, the reader cutting on malformed frames), which
also serves concurrent requests and subscriptions; the two are not shared code yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from dna_core.errors import MalformedError, ProtocolError
from dna_core.ratelimit import RateLimited
from dna_core.rpc_session import StreamSession
from dna_core.wire.gen.dna.v1 import overlay_pb2, overlay_pb2_grpc

log = logging.getLogger("dna.overlay.session")
WINDOW = 64  # unanswered requests a session may have
STALL_S = 30.0  # how long a response may wait for the client to read it
Ctx = grpc.aio.ServicerContext[Any, Any]
Answer = Callable[[overlay_pb2.OverlaySessionRequest, str], overlay_pb2.OverlaySessionResponse]


class OverlaySession(StreamSession):
    """The client's session to one node: ``exchange({"store": ...})`` or
    ``{"find_value": ...}``; the answer's ``error`` is the unary call's refusal."""

    def _start_stream(self, channel: grpc.aio.Channel) -> Any:
        return overlay_pb2_grpc.OverlayStub(channel).Session()

    def _frame(self, request_id: int, op: dict[str, Any]) -> overlay_pb2.OverlaySessionRequest:
        return overlay_pb2.OverlaySessionRequest(id=request_id, **op)


class SessionCutError(Exception):
    """The session breaks a rule: end it with ``code`` and ``reason`` (counted by kind)."""

    def __init__(self, code: grpc.StatusCode, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.code, self.reason, self.kind = code, reason, kind


class RecordSessionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "dna_overlay_sessions_open", "Overlay record sessions open", registry=registry
        )
        self.requests = Counter(
            "dna_overlay_session_requests",
            "Requests received on overlay record sessions, by operation and outcome (ok, refused)",
            ["op", "outcome"],
            registry=registry,
        )
        self.cuts = Counter(
            "dna_overlay_session_cuts",
            "Overlay record sessions cut (window, duplicate_id, malformed, stalled), by reason",
            ["reason"],
            registry=registry,
        )


def request_status(exc: ProtocolError) -> overlay_pb2.OverlayRequestStatus:
    """A refusal inside a session: what the unary call answers as its status."""
    retry_ms = 0
    if isinstance(exc, RateLimited):
        retry_ms = max(1, int(exc.retry_after_s * 1000 + 0.999))
    code: grpc.StatusCode = getattr(grpc.StatusCode, exc.grpc_code)
    return overlay_pb2.OverlayRequestStatus(
        code=code.value[0], reason=exc.reason, retry_after_ms=retry_ms
    )


class RecordSession:
    """One client's session: reads requests, answers each in turn, writes the answers."""

    def __init__(
        self,
        answer: Answer,
        context: Ctx,
        metrics: RecordSessionMetrics,
        *,
        source: str,
        window: int = WINDOW,
        stall_s: float = STALL_S,
    ) -> None:
        self.answer, self.context, self.metrics = answer, context, metrics
        self.source, self.window, self.stall_s = source, window, stall_s
        self.unanswered: set[int] = set()  # request IDs whose response is not being written
        # A request counts against the window until the writer takes its response.
        self.out: asyncio.Queue[overlay_pb2.OverlaySessionResponse] = asyncio.Queue()
        self.closed = False

    async def run(self, requests: AsyncIterator[overlay_pb2.OverlaySessionRequest]) -> None:
        self.metrics.open.inc()
        hello = overlay_pb2.OverlaySessionHello(window=self.window)
        self.out.put_nowait(overlay_pb2.OverlaySessionResponse(hello=hello))
        writer = asyncio.create_task(self._write_out())
        reader = asyncio.create_task(self._read(requests))
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # raises a cut
                await self._finish(writer)  # the client closed its side
            else:
                writer.result()  # raises a cut
        except SessionCutError as cut:
            self.metrics.cuts.labels(reason=cut.kind).inc()
            # Free the session first: grpc sends the status only after the response a
            # client that never reads left stuck in flow control, which may be never.
            await self._close(reader, writer)
            await self._abort(cut)
        finally:
            await self._close(reader, writer)

    async def _abort(self, cut: SessionCutError) -> None:
        try:
            await self.context.abort(cut.code, cut.reason)
        except grpc.aio.AbortError:
            raise
        except Exception:  # grpc could not send it: the call is gone, nobody to tell
            log.debug("session cut after its call ended", extra={"reason": cut.kind})

    async def _finish(self, writer: asyncio.Task[None]) -> None:
        """The client closed its side: write every answer, then end."""
        written = asyncio.ensure_future(self.out.join())
        await asyncio.wait((written, writer), return_when=asyncio.FIRST_COMPLETED)
        written.cancel()
        if writer.done():
            writer.result()  # a cut while answering
        writer.cancel()

    async def _close(self, *tasks: asyncio.Task[None]) -> None:
        if self.closed:
            return
        self.closed = True
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        while not self.out.empty():  # responses never to be written
            self.out.get_nowait()
        self.metrics.open.dec()

    async def _read(self, requests: AsyncIterator[overlay_pb2.OverlaySessionRequest]) -> None:
        try:
            async for request in requests:
                self._take(request)
                await asyncio.sleep(0)  # let the writer and other calls run between requests
        except MalformedError as exc:  # a frame that does not decode (the gRPC gate)
            raise SessionCutError(
                grpc.StatusCode.INVALID_ARGUMENT, exc.reason, "malformed"
            ) from None

    def _take(self, request: overlay_pb2.OverlaySessionRequest) -> None:
        if len(self.unanswered) >= self.window:
            raise SessionCutError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"session: more than {self.window} requests unanswered (the window)",
                "window",
            )
        if request.id in self.unanswered:
            raise SessionCutError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"session: request ID {request.id} is still in use",
                "duplicate_id",
            )
        self.unanswered.add(request.id)
        response = self.answer(request, self.source)
        op = request.WhichOneof("op") or "none"
        outcome = "refused" if response.HasField("error") else "ok"
        self.metrics.requests.labels(op=op, outcome=outcome).inc()
        response.id = request.id
        self.out.put_nowait(response)  # bounded by the window

    async def _write_out(self) -> None:
        while True:
            response = await self.out.get()
            self.unanswered.discard(response.id)
            write = asyncio.ensure_future(self.context.write(response))
            await asyncio.wait((write,), timeout=self.stall_s)
            if not write.done():
                # Not cancelled: grpc fails a call whose write was cancelled under it, and
                # the status must still follow this response out.
                write.add_done_callback(_retrieve)
                raise SessionCutError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"session: responses left unread for {self.stall_s:g} s",
                    "stalled",
                )
            write.result()
            self.out.task_done()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a write that ended with its call: nothing to say
