"""The ops HTTP server, run for real on 127.0.0.1:0 inside an event loop, queried by httpx."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from dna_core.ops.http import OpsServer, build_ops_app
from dna_core.ops.logs import JsonFormatter, configure_logging, node_logger
from prometheus_client import CollectorRegistry, Counter


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    out = io.StringIO()
    configure_logging("info", out)
    yield out
    for handler in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(handler)
    root.setLevel(level)


@dataclass
class FakeNode:
    """Just the state a node's probes read; flipped by the tests."""

    healthy: bool = True
    ready: bool = False
    reason: str = "joining overlay"
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def app_server(self) -> OpsServer:
        app = build_ops_app(
            health=lambda: self.healthy,
            ready=lambda: (self.ready, self.reason),
            status=lambda: {"node_id": "ab12", "peers": 3, "ready": self.ready},
            registry=self.registry,
        )
        return OpsServer(app)


Body = Callable[[httpx.AsyncClient, OpsServer], Awaitable[None]]


def serve(node: FakeNode, body: Body) -> None:
    """Start the node's ops server, run ``body`` against it, always stop it."""

    async def main() -> None:
        server = node.app_server()
        await server.start("127.0.0.1", 0)
        try:
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                await body(client, server)
        finally:
            await server.stop()

    asyncio.run(main())


def test_probes_flip_with_node_state() -> None:
    node = FakeNode()

    async def body(client: httpx.AsyncClient, _: OpsServer) -> None:
        health = await client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"ok": True})
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (
            503,
            {"ready": False, "reason": "joining overlay"},
        )

        node.ready, node.reason = True, "serving"
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True, "reason": "serving"})

        node.healthy = False
        health = await client.get("/healthz")
        assert (health.status_code, health.json()) == (503, {"ok": False})

    serve(node, body)


def test_metrics_expose_the_nodes_registry() -> None:
    node = FakeNode()
    stored = Counter("dna_blobs_stored", "Blobs stored.", registry=node.registry)

    async def body(client: httpx.AsyncClient, _: OpsServer) -> None:
        stored.inc(3)
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert "# TYPE dna_blobs_stored_total counter" in response.text
        assert "dna_blobs_stored_total 3.0" in response.text
        stored.inc()
        assert "dna_blobs_stored_total 4.0" in (await client.get("/metrics")).text

    serve(node, body)


def test_metrics_speak_openmetrics_when_asked() -> None:
    node = FakeNode()
    Counter("dna_pings", "Pings.", registry=node.registry).inc()

    async def body(client: httpx.AsyncClient, _: OpsServer) -> None:
        accept = {"accept": "application/openmetrics-text; version=1.0.0"}
        response = await client.get("/metrics", headers=accept)
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")

    serve(node, body)


def test_status_json() -> None:
    async def body(client: httpx.AsyncClient, _: OpsServer) -> None:
        response = await client.get("/status")
        assert response.status_code == 200
        assert response.json() == {"node_id": "ab12", "peers": 3, "ready": False}

    serve(FakeNode(), body)


def test_a_probe_that_raises_is_failing_not_crashing(log_stream: io.StringIO) -> None:
    def broken() -> bool:
        raise RuntimeError("store unreachable")

    def broken_ready() -> tuple[bool, str]:
        raise RuntimeError("store unreachable")

    async def main() -> None:
        log = node_logger("dna.test", node_id="ab12")
        registry = CollectorRegistry()
        app = build_ops_app(
            health=broken, ready=broken_ready, status=dict, registry=registry, log=log
        )
        server = OpsServer(app, log=log)
        await server.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                assert (await client.get("/healthz")).status_code == 503
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["ready"] is False
        finally:
            await server.stop()

    asyncio.run(main())
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    raised = [line for line in lines if line["msg"] == "ops probe raised"]
    assert [line["probe"] for line in raised] == ["broken", "broken_ready"]
    assert all(line["node_id"] == "ab12" for line in raised)
    assert "RuntimeError: store unreachable" in raised[0]["exc"]


def test_two_nodes_in_one_process_keep_their_metrics_apart() -> None:
    alpha, beta = FakeNode(), FakeNode()
    Counter("dna_alpha_events", "a", registry=alpha.registry).inc()
    Counter("dna_beta_events", "b", registry=beta.registry).inc()

    async def main() -> None:
        servers = [alpha.app_server(), beta.app_server()]
        for server in servers:
            await server.start("127.0.0.1", 0)
        try:
            assert servers[0].port != servers[1].port
            async with httpx.AsyncClient() as client:
                texts = [
                    (await client.get(f"http://127.0.0.1:{s.port}/metrics")).text for s in servers
                ]
        finally:
            for server in servers:
                await server.stop()
        assert "dna_alpha_events_total" in texts[0]
        assert "dna_beta_events_total" not in texts[0]
        assert "dna_beta_events_total" in texts[1]

    asyncio.run(main())


def test_stop_closes_the_port_and_is_idempotent() -> None:
    async def main() -> None:
        server = FakeNode().app_server()
        await server.start("127.0.0.1", 0)
        port = server.port
        await server.stop()
        await server.stop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(RuntimeError):
            _ = server.port

    asyncio.run(main())


def test_stop_before_start_is_a_no_op(log_stream: io.StringIO) -> None:
    """Nothing to stop: it says nothing and leaves the server as new, so it starts after."""

    async def main() -> None:
        server = FakeNode().app_server()
        await server.stop()
        with pytest.raises(RuntimeError):
            _ = server.port  # still not started
        assert log_stream.getvalue() == ""  # no "ops http stopped" for what never ran
        await server.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                assert (await client.get("/healthz")).status_code == 200
        finally:
            await server.stop()

    asyncio.run(main())


def test_port_in_use_fails_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]

        async def main() -> None:
            with pytest.raises(OSError):
                await FakeNode().app_server().start("127.0.0.1", port)

        asyncio.run(main())


def test_uvicorn_leaves_signals_to_the_node() -> None:
    signals = (signal.SIGTERM, signal.SIGINT)

    async def main() -> None:
        before = {sig: signal.getsignal(sig) for sig in signals}  # asyncio.run's own included
        server = FakeNode().app_server()
        await server.start("127.0.0.1", 0)
        try:
            assert {sig: signal.getsignal(sig) for sig in signals} == before
        finally:
            await server.stop()
        assert {sig: signal.getsignal(sig) for sig in signals} == before

    asyncio.run(main())


def test_server_logs_are_json_and_no_access_log(log_stream: io.StringIO) -> None:
    ports: list[int] = []

    async def body(client: httpx.AsyncClient, server: OpsServer) -> None:
        ports.append(server.port)
        for _ in range(3):
            await client.get("/healthz")

    serve(FakeNode(), body)
    lines: list[dict[str, Any]] = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    listening = [line for line in lines if line["msg"] == "ops http listening"]
    assert listening[0]["port"] == ports[0]
    assert [line["logger"] for line in lines if "/healthz" in line["msg"]] == ["httpx"] * 3
    assert lines[-1]["msg"] == "ops http stopped"
    assert not [line for line in lines if "color_message" in line]
