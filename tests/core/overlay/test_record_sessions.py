"""The record client's session pool, against an in-process Overlay service behind the gRPC
gate: at most as many sessions as channels, the least recently used closed."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from dna_core.errors import UnavailableError
from dna_core.overlay.aio.records_rpc import ChannelPool, RecordClient
from dna_core.overlay.contact import Contact, Endpoint
from prometheus_client import CollectorRegistry
from stream_sessions import overlay_server


def test_the_pool_keeps_at_most_its_size_of_sessions_closing_the_least_recent() -> None:
    async def go() -> None:
        registry = CollectorRegistry()
        server, _ = overlay_server(registry)
        ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(3)]  # 3 targets
        await server.start()
        nodes = [Contact(os.urandom(32), b"", (Endpoint("127.0.0.1", p, p),)) for p in ports]
        client = RecordClient(ChannelPool(size=2), puzzle_bits=4)
        assert client.sessions is not None
        try:
            first = None
            for node in nodes:
                assert await client.find_value(os.urandom(32), [node]) is None
                if first is None:
                    first = await client.sessions.get(node.endpoint.grpc_target)
            assert len(client.sessions) == 2
            assert client.unary_calls == 0
            assert first is not None
            for _ in range(50):  # its close runs in the background
                if first.closed is not None:
                    break
                await asyncio.sleep(0.02)
            assert first.closed is not None
            for _ in range(50):
                if registry.get_sample_value("dna_overlay_sessions_open") == 2:
                    break
                await asyncio.sleep(0.02)
            assert registry.get_sample_value("dna_overlay_sessions_open") == 2
            found = registry.get_sample_value(
                "dna_overlay_session_requests_total", {"op": "find_value", "outcome": "ok"}
            )
            assert found == 3
        finally:
            await client.close()
            await client.pool.close()
            await server.stop(None)

    asyncio.run(go())


def test_find_value_says_nobody_answered_apart_from_nothing_found() -> None:
    """None meant both "the holders hold nothing" and "no holder answered": a reader took a
    network fault for an unpublished key (an honest sender's message refused). One node
    answering empty is None; none answering (a closed port, no node) is UnavailableError."""

    async def go() -> None:
        server, _ = overlay_server(CollectorRegistry())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        dead_port = closed.getsockname()[1]
        live = Contact(os.urandom(32), b"", (Endpoint("127.0.0.1", port, port),))
        dead = Contact(os.urandom(32), b"", (Endpoint("127.0.0.1", dead_port, dead_port),))
        client = RecordClient(ChannelPool(), puzzle_bits=4, timeout=2.0)
        try:
            assert await client.find_value(os.urandom(32), [live, dead]) is None
            with pytest.raises(UnavailableError, match="none of the 1 nodes asked"):
                await client.find_value(os.urandom(32), [dead])
            with pytest.raises(UnavailableError, match="none of the 0 nodes asked"):
                await client.find_value(os.urandom(32), [])
        finally:
            closed.close()
            await client.close()
            await client.pool.close()
            await server.stop(None)

    asyncio.run(go())
