"""Operator HTTP endpoints every node serves: ``/healthz``, ``/readyz``, ``/metrics``, ``/status``.

The app knows nothing about nodes: it calls the callbacks it is given, on the event loop (the
handlers are ``async`` on purpose, so callbacks read node state from the loop's own thread and
never from a worker thread), and exposes the node's own ``CollectorRegistry``, so many nodes in
one process never share a metric.

``OpsServer`` runs uvicorn inside the caller's event loop. The node owns process signals
(``lifecycle.GracefulShutdown``), so uvicorn's handlers are disabled, and uvicorn's logging
config is skipped so its lines flow through the root logger (JSON, see ``logs``).

Connections are guarded at accept (``HttpLimits``): uvicorn alone keeps a connection that
never sends a request open forever, so one address could hold every file descriptor of the
node. A connection over the per-source or total cap is closed at once, and one that has not
sent a whole request head within ``idle_timeout_s`` (idle, or a request trickled byte by
byte) is closed then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from uvicorn.protocols.http.h11_impl import H11Protocol

from dna_core.ops.connections import ConnectionCaps, ConnectionLimits
from dna_core.ops.listen import tcp_listener
from dna_core.ops.logs import Log

__all__ = ["HttpLimits", "OpsServer", "build_ops_app"]

T = TypeVar("T")

# How long stop() lets in-flight requests finish before cancelling them.
GRACEFUL_STOP_SECONDS = 5.0


def build_ops_app(
    *,
    health: Callable[[], bool],
    ready: Callable[[], tuple[bool, str]],
    status: Callable[[], dict[str, Any]],
    registry: CollectorRegistry,
    log: Log | None = None,
) -> FastAPI:
    """The ops app of one node. ``health``: is the process alive and sane (restart me if not);
    ``ready``: should traffic come here now, and if not why; ``status``: a JSON snapshot.
    ``log`` (the node's logger) records probes that raise."""
    probe_log = log if log is not None else logging.getLogger(__name__)
    app = FastAPI(title="dna node ops", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok = _safely(health, False, probe_log)
        return JSONResponse({"ok": ok}, status_code=200 if ok else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        is_ready, reason = _safely(ready, (False, "readiness check failed"), probe_log)
        body = {"ready": is_ready, "reason": reason}
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # Prometheus negotiates OpenMetrics through Accept; plain text is the fallback.
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), media_type=content_type)

    @app.get("/status")
    async def node_status() -> JSONResponse:
        return JSONResponse(status())

    return app


def _safely(check: Callable[[], T], failed: T, log: Log) -> T:
    """A probe that raises is a failing probe (503), not a 500 with a stack trace."""
    try:
        return check()
    except Exception:
        log.exception("ops probe raised", extra={"probe": getattr(check, "__name__", "?")})
        return failed


@dataclass(frozen=True)
class HttpLimits:
    """Connection caps of the ops port; it serves operators and scrapers, not the public."""

    max_connections: int = 64
    max_connections_per_source: int = 8
    idle_timeout_s: float = 10.0  # to send a whole request head, on a new or kept-alive one

    def caps(self) -> ConnectionCaps:
        return ConnectionCaps(
            ConnectionLimits(self.max_connections, self.max_connections_per_source)
        )


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol behind the connection caps, with a deadline for each request head."""

    caps: ConnectionCaps  # set on the per-server subclass (uvicorn builds the instances)
    idle_timeout_s: float

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._source = self.client[0] if self.client else "?"
        self._admitted = self.caps.admit(self._source) is None
        self._head_deadline: asyncio.TimerHandle | None = None
        self._waiting_cycle: object = None
        if not self._admitted:
            transport.abort()  # over a cap: no response, no buffers, the fd back at once
            return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.caps.release(self._source)
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._waiting_cycle:
            self._disarm_head_deadline()  # a whole request head arrived: a new cycle began

    def on_response_complete(self) -> None:
        super().on_response_complete()
        idle = self.cycle is None or self.cycle.response_complete  # not a pipelined request
        if idle and not self.transport.is_closing():
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._waiting_cycle = self.cycle
        self._head_deadline = self.loop.call_later(self.idle_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def _guarded_protocol(limits: HttpLimits) -> type[_GuardedH11Protocol]:
    """A protocol class bound to its own caps (one per server, not per process)."""
    own = {"caps": limits.caps(), "idle_timeout_s": limits.idle_timeout_s}
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), own)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers, reporting when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node, not uvicorn, decides what SIGTERM means

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class OpsServer:
    """Serves an ops app inside the running event loop: ``await start(host, port)``, then
    ``await stop()``. Port 0 picks a free port; ``port`` tells which."""

    def __init__(
        self, app: FastAPI, *, log: Log | None = None, limits: HttpLimits | None = None
    ) -> None:
        self._app = app
        self._limits = limits if limits is not None else HttpLimits()
        self._log = log if log is not None else logging.getLogger(__name__)
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._port = 0

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("OpsServer is not started")
        return self._port

    async def start(self, host: str, port: int) -> None:
        """Bind and return once connections are accepted; a bind failure raises ``OSError``."""
        if self._server is not None:
            raise RuntimeError("OpsServer already started")
        # We bind the socket ourselves so the real port is known even for port 0.
        sock = _bind(host, port)
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_config=None,  # leave logging to configure_logging: JSON on the root logger
            access_log=False,
            lifespan="off",
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=int(GRACEFUL_STOP_SECONDS),
            http=_guarded_protocol(self._limits),
            limit_concurrency=self._limits.max_connections,  # requests in flight, too
        )
        server = self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="ops-http")
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        if not server.listening.is_set():
            listening.cancel()
            sock.close()
            self._server = None
            await self._task  # re-raises why uvicorn could not start
            raise RuntimeError("ops HTTP server exited during startup")
        self._log.info("ops http listening", extra={"host": host, "port": self._port})

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close. Idempotent."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        await task
        self._server = self._task = None
        self._log.info("ops http stopped", extra={"port": self._port})


def _bind(host: str, port: int) -> socket.socket:
    sock = tcp_listener(host, port)  # Nagle off on what it accepts
    sock.setblocking(False)
    return sock
