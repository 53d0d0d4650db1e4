"""tcp_listener: what asyncio accepts on it has Nagle's algorithm off, as asyncio does for
the connections it makes itself, and unlike a `socket.create_server` socket."""

from __future__ import annotations

import asyncio
import socket

import pytest
from dna_core.ops.listen import tcp_listener


async def nodelay_of_accepted(listener: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on ``listener``."""
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    async with server:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            writer.close()


def test_connections_accepted_on_a_tcp_listener_have_nagle_off() -> None:
    listener = tcp_listener("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    assert asyncio.run(nodelay_of_accepted(listener)) == 1


def test_a_plain_create_server_socket_would_leave_nagle_on() -> None:
    """Why tcp_listener exists: asyncio reads the listener's ``proto`` (0 here)."""
    plain = socket.create_server(("127.0.0.1", 0))
    assert plain.proto == 0
    assert asyncio.run(nodelay_of_accepted(plain)) == 0


def test_ipv6_hosts_listen_on_ipv6() -> None:
    try:
        listener = tcp_listener("::1", 0)
    except OSError as exc:  # a machine without IPv6 loopback must say so, not pass
        pytest.fail(f"no IPv6 loopback here: {exc}")
    with listener:
        assert listener.family == socket.AF_INET6 and listener.proto == socket.IPPROTO_TCP
