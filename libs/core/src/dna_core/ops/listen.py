"""TCP listening sockets for a node's asyncio servers (the connection guard, ops HTTP)."""

from __future__ import annotations

import socket

__all__ = ["tcp_listener"]


def tcp_listener(host: str, port: int, *, backlog: int | None = None) -> socket.socket:
    """`socket.create_server` on ``host:port`` (IPv6 when the host has a colon), as a socket
    that says it is TCP.

    asyncio turns Nagle's algorithm off on an accepted connection only when the socket's
    ``proto`` is TCP, and `socket.create_server` leaves it 0, which every accepted socket
    inherits. With Nagle on, a write that follows one not yet acknowledged waits for the
    peer's delayed ACK (40 ms on Linux): about one round trip in a thousand through the
    connection guard paid that, and a message crosses it several times (docs/performance.md).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    return socket.socket(fileno=sock.detach())  # family, type and protocol from the kernel
