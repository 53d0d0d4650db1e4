"""Operator HTTP endpoints every node serves: ``/healthz``, ``/readyz``, ``/metrics``, ``/status``.

The app knows nothing about nodes: it calls the callbacks it is given, on the event loop (the
handlers are ``async`` on purpose, so callbacks read node state from the loop's own thread and
never from a worker thread), and exposes the node's own ``CollectorRegistry``, so many nodes in
one process never share a metric.

``OpsServer`` runs uvicorn inside the caller's event loop. The node owns process signals
(``lifecycle.GracefulShutdown``), so uvicorn's handlers are disabled, and uvicorn's logging
config is skipped so its lines flow through the root logger (JSON, see ``logs``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from dna_core.ops.logs import Log

__all__ = ["OpsServer", "build_ops_app"]

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

    def __init__(self, app: FastAPI, *, log: Log | None = None) -> None:
        self._app = app
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
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    sock.setblocking(False)
    return sock
