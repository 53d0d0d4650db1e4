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

The loop and its rules (the window, the writer with its stall cut, the reader cutting on
malformed frames) are the ones the mailbox's sessions keep too: `dna_core.rpc_session_server`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from dna_core.errors import ProtocolError
from dna_core.ratelimit import RateLimited
from dna_core.rpc_session import StreamSession
from dna_core.rpc_session_server import Ctx, ServerSession, SourceCaps, nothing
from dna_core.wire.gen.dna.v1 import overlay_pb2, overlay_pb2_grpc

WINDOW = 64  # unanswered requests a session may have
STALL_S = 30.0  # how long a response may wait for the client to read it
Answer = Callable[[overlay_pb2.OverlaySessionRequest, str], overlay_pb2.OverlaySessionResponse]


SESSIONS_PER_SOURCE = 32  # record sessions open at once from one address
SESSIONS = 4096  # and on the node


class OverlaySession(StreamSession):
    """The client's session to one node: ``exchange({"store": ...})`` or
    ``{"find_value": ...}``; the answer's ``error`` is the unary call's refusal."""

    def _start_stream(self, channel: grpc.aio.Channel) -> Any:
        return overlay_pb2_grpc.OverlayStub(channel).Session()

    def _frame(self, request_id: int, op: dict[str, Any]) -> overlay_pb2.OverlaySessionRequest:
        return overlay_pb2.OverlaySessionRequest(id=request_id, **op)


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
            "Overlay record sessions cut (window, duplicate_id, malformed, stalled) or refused "
            "at opening (source_limit, site_limit: the source's IPv6 /48, node_limit), by reason",
            ["reason"],
            registry=registry,
        )


def request_status(exc: ProtocolError) -> overlay_pb2.OverlayRequestStatus:
    """A refusal inside a session: what the unary call answers as its status."""
    retry_ms = exc.retry_after_ms if isinstance(exc, RateLimited) else 0
    code: grpc.StatusCode = getattr(grpc.StatusCode, exc.grpc_code)
    return overlay_pb2.OverlayRequestStatus(
        code=code.value[0], reason=exc.reason, retry_after_ms=retry_ms
    )


class RecordSession(ServerSession):
    """One client's session: reads requests and answers each in turn (the loop and its
    rules: `dna_core.rpc_session_server`)."""

    def __init__(
        self,
        answer: Answer,
        context: Ctx,
        metrics: RecordSessionMetrics,
        *,
        source: str,
        window: int = WINDOW,
        stall_s: float = STALL_S,
        caps: SourceCaps | None = None,
    ) -> None:
        super().__init__(
            context, window=window, stall_s=stall_s, opened=metrics.open, cuts=metrics.cuts,
            caps=caps, source=source,
        )  # fmt: skip
        self.answer, self.metrics, self.source = answer, metrics, source

    def _hello(self) -> overlay_pb2.OverlaySessionResponse:
        return overlay_pb2.OverlaySessionResponse(
            hello=overlay_pb2.OverlaySessionHello(window=self.window)
        )

    def _take(self, request: overlay_pb2.OverlaySessionRequest) -> None:
        self.claim(request.id)
        response = self.answer(request, self.source)
        op = request.WhichOneof("op") or "none"
        outcome = "refused" if response.HasField("error") else "ok"
        self.metrics.requests.labels(op=op, outcome=outcome).inc()
        response.id = request.id
        self.out.put_nowait((response, nothing, request.id))  # bounded by the window
